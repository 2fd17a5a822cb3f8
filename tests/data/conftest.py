"""Fixtures of the data tests: a tiny byte-level BPE tokenizer trained here (no network, no other modules)."""

from __future__ import annotations

import pytest

_WORDS = ("Human Assistant what is the a of to and you how why name color fruit apple paris answer best worst "
          "question hello hi bye say add rank good bad okay great sky blue cat water rice").split()


def _corpus() -> list[str]:
    lines = []
    for i in range(300):
        w = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(6)]
        lines.append(f" Human: {' '.join(w)} {i}? Assistant: {' '.join(reversed(w))}.")
    return lines


def _train(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if bos:  # OPT-like: every encoding starts with a BOS token
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token="<s>")


@pytest.fixture(scope="session")
def tokenizer():
    return _train(bos=False)


@pytest.fixture(scope="session")
def bos_tokenizer():
    return _train(bos=True)
