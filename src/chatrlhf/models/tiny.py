"""Tiny random causal LMs with a locally trained tokenizer: the embedded default's actor/critic bases.

``build_tiny_model("opt", out_dir)`` writes a complete Hugging Face model directory (config, safetensors weights,
generation_config, tokenizer) without touching the network, so the whole pipeline runs offline on a CPU in
minutes. Each family mirrors the real one's tokenizer conventions that matter to RLHF code:

- opt:      every encoding starts with ``</s>``, which is also pad and eos (OPT + DeepSpeed-Chat's pad = eos), so
            ``num_padding_at_beginning == 1`` as for real OPT checkpoints;
- llama:    a distinct BOS ``<s>`` is prepended; pad ``<pad>`` is its own token;
- gpt_neox: no BOS added; eos ``<|endoftext|>``, pad ``<|padding|>`` (as Pythia);
- bloom:    no BOS added; ``<s>``/``</s>``/``<pad>``; ALiBi, so no position limit;
- gpt2:     no BOS added; pad = eos = ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from chatrlhf.config import parse_config
from chatrlhf.errors import UserError
from chatrlhf.tasks.builtin import task_corpus
from chatrlhf.utils import atomic_dir, atomic_write_json

FAMILIES = ("opt", "llama", "gpt_neox", "bloom", "gpt2")

# Special tokens per family: (vocabulary order, bos, eos, pad, unk, prepend bos to every encoding).
_SPECIALS: dict[str, tuple[list[str], str, str, str, str | None, bool]] = {
    "opt": (["<s>", "<pad>", "</s>", "<unk>"], "</s>", "</s>", "</s>", "<unk>", True),
    "llama": (["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", "<unk>", True),
    "gpt_neox": (["<|endoftext|>", "<|padding|>"], "<|endoftext|>", "<|endoftext|>", "<|padding|>", None, False),
    "bloom": (["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", "<unk>", False),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None, False),
}


@dataclass
class TinyModelConfig:
    out: str = field(default="", metadata={"help": "Output directory for the model (created; replaced if it exists)."})
    family: str = field(default="opt", metadata={"help": f"Model family: one of {', '.join(FAMILIES)}."})
    hidden: int = field(default=64, metadata={"help": "Hidden size."})
    layers: int = field(default=2, metadata={"help": "Number of transformer layers."})
    vocab: int = field(default=512, metadata={"help": "Vocabulary size of the byte-level BPE tokenizer (>= 260)."})
    heads: int = field(default=4, metadata={"help": "Attention heads; must divide --hidden."})
    max_positions: int = field(default=512, metadata={"help": "Maximum sequence length (position embeddings)."})
    seed: int = field(default=0, metadata={"help": "Seed for the random weights."})
    corpus_file: str = field(default="", metadata={"help": "Text file (one text per line) to train the tokenizer on; "
                                                           "default: the built-in task's corpus."})

    def validate(self) -> None:
        if not self.out:
            raise UserError("--out is required: the directory to write the tiny model to")
        _check_args(self.family, self.hidden, self.layers, self.vocab, self.heads, self.max_positions)
        if self.corpus_file and not Path(self.corpus_file).is_file():
            raise UserError(f"--corpus_file {self.corpus_file}: file not found")


def _check_args(family: str, hidden: int, layers: int, vocab: int, heads: int, max_positions: int) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if hidden <= 0 or layers <= 0 or heads <= 0 or max_positions <= 0:
        raise UserError("hidden, layers, heads and max_positions must be positive")
    if hidden % heads:
        raise UserError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if vocab < 256 + len(_SPECIALS[family][0]):
        raise UserError(f"vocab ({vocab}) must be at least {256 + len(_SPECIALS[family][0])}: 256 byte tokens plus specials")


def train_tokenizer(family: str, corpus: Iterable[str], vocab: int, max_positions: int = 512):
    """A byte-level BPE trained on ``corpus``, wrapped as a transformers fast tokenizer with the family's
    special tokens (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # lazy: tokenizers
    from transformers import PreTrainedTokenizerFast  # lazy: transformers

    specials, bos, eos, pad, unk, add_bos = _SPECIALS[family]
    tok = Tokenizer(models.BPE())
    # No prefix space: DeepSpeed-Chat text already starts with " Human:" and answers with a space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kw = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    if unk is not None:
        kw["unk_token"] = unk
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_positions, **kw)


def _model_config(family: str, hidden: int, layers: int, vocab: int, heads: int, max_positions: int, ids: dict,
                  kv_heads: int | None = None, intermediate: int | None = None, overrides: dict | None = None):
    """The family's config with tiny sizes; dropout off so tiny models learn fast (load_causal_lm can set it)."""
    from transformers import AutoConfig  # lazy: transformers

    ffn = intermediate or 4 * hidden
    if family == "opt":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                  max_position_embeddings=max_positions, word_embed_proj_dim=hidden, do_layer_norm_before=True,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=True)
    elif family == "llama":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads or heads,
                  intermediate_size=ffn, max_position_embeddings=max_positions, tie_word_embeddings=True,
                  attention_dropout=0.0)
    elif family == "gpt_neox":  # Pythia unties input and output embeddings
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                  max_position_embeddings=max_positions, tie_word_embeddings=False, hidden_dropout=0.0,
                  attention_dropout=0.0)
    elif family == "bloom":
        kw = dict(hidden_size=hidden, n_layer=layers, n_head=heads, hidden_dropout=0.0, attention_dropout=0.0,
                  tie_word_embeddings=True)
    else:  # gpt2
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, n_inner=ffn,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return AutoConfig.for_model(family, vocab_size=vocab, **ids, **{**kw, **(overrides or {})})


def build_tiny_model(family: str, out_dir: str | Path, hidden: int = 64, layers: int = 2, vocab: int = 512,
                     heads: int = 4, max_positions: int = 512, corpus: Sequence[str] | None = None,
                     seed: int = 0, kv_heads: int | None = None, intermediate: int | None = None,
                     overrides: dict | None = None) -> Path:
    """Build a random ``family`` model with a tokenizer trained on ``corpus`` (default: the built-in task's) and
    save both to ``out_dir`` (written atomically). Returns the directory. ``kv_heads`` (llama: grouped-query
    attention), ``intermediate`` (MLP width, default 4 x hidden) and ``overrides`` (any config field) shape a
    real model's architecture at random weights, e.g. for benchmarks."""
    import torch  # lazy: torch
    from transformers import AutoModelForCausalLM, GenerationConfig  # lazy: transformers

    _check_args(family, hidden, layers, vocab, heads, max_positions)
    if corpus is None:
        corpus = task_corpus(seed=1234, n=4000)
    tokenizer = train_tokenizer(family, corpus, vocab, max_positions)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    # Embedding rows = the requested vocab (>= the learned one) so sizes are predictable across corpora.
    config = _model_config(family, hidden, layers, max(vocab, len(tokenizer)), heads, max_positions, ids,
                           kv_heads=kv_heads, intermediate=intermediate, overrides=overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**ids)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "tiny_model.json", {
            "family": family, "hidden": hidden, "layers": layers, "vocab": vocab, "heads": heads,
            "max_positions": max_positions, "seed": seed, "tokenizer_vocab": len(tokenizer),
            "kv_heads": kv_heads, "intermediate": intermediate, "overrides": overrides or {},
            "parameters": sum(p.numel() for p in model.parameters())})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TinyModelConfig, argv, prog="chatrlhf tiny-model",
                       description="Build a tiny random causal LM plus a locally trained byte-level BPE tokenizer.")
    corpus = None
    if cfg.corpus_file:
        corpus = [line for line in Path(cfg.corpus_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = build_tiny_model(cfg.family, cfg.out, hidden=cfg.hidden, layers=cfg.layers, vocab=cfg.vocab,
                           heads=cfg.heads, max_positions=cfg.max_positions, corpus=corpus, seed=cfg.seed)
    info = json.loads((out / "tiny_model.json").read_text())
    print(f"tiny {cfg.family} model: {info['parameters']:,} parameters, tokenizer vocab {info['tokenizer_vocab']} -> {out}")
    return 0
