"""Fixtures for the user-facing tools: a tiny OPT model with a locally trained byte-level BPE tokenizer.

Built here (not from chatrlhf.models.tiny) so these tests depend only on transformers/tokenizers; one model per
session, written to a temp dir like a real checkpoint (safetensors + tokenizer + generation_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = [
    " Human: Reverse the word: cat Assistant: tac",
    " Human: Add 3 and 4. Assistant: 7",
    " Human: hello there Assistant: hi, how can I help you today? Human: tell me a story Assistant: once",
    " Human: What comes after 9? Assistant: 10",
    "The quick brown fox jumps over the lazy dog. A wise frog sat on a log and sang a short poem.",
    "Telescopes gather light; birds migrate south in winter. The moon landing happened in 1969.",
]


def build_tiny_opt(out_dir: Path, vocab: int = 300, hidden: int = 32, layers: int = 2, max_positions: int = 128,
                   seed: int = 0, train_steps: int = 40) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    from chatrlhf.tasks.builtin import task_corpus

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(CORPUS * 20 + task_corpus(seed=1, n=300), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", bos_token="</s>",
                                  unk_token="<unk>", model_max_length=max_positions)
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, ffn_dim=hidden * 2,
                    num_attention_heads=4, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                    dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(cfg)
    _memorize(model, tok, steps=train_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    GenerationConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     bos_token_id=tok.eos_token_id).save_pretrained(out_dir)
    return out_dir


# A few seconds of overfitting so greedy replies are real text (a random tiny model emits only spaces).
DIALOGUES = [
    " Human: hello Assistant: hi there, I am a tiny model.</s>",
    " Human: tell me a story Assistant: once upon a time a fox met a frog.</s>",
]


def _memorize(model, tok, steps: int) -> None:
    import torch

    enc = tok(DIALOGUES, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def apps_model_dir(tmp_path_factory) -> Path:
    return build_tiny_opt(tmp_path_factory.mktemp("apps") / "tiny-opt")


@pytest.fixture(scope="session")
def apps_model(apps_model_dir):
    from chatrlhf.engine.generation import load_for_inference

    return load_for_inference(apps_model_dir)


