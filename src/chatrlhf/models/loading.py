"""Offline-safe loading of tokenizers and causal LMs, plus the checks that catch DeepSpeed-Chat's common failures
early with a clear ModelError: a directory that is not a model, a tokenizer with neither pad nor eos, a
--max_seq_len beyond the model's positions, and an actor and reward model with different tokenizers.

Local directories are always loaded with ``local_files_only=True`` and from the directory itself (the original
re-downloaded the tokenizer named by config.json's ``_name_or_path``, which broke local checkpoints).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from chatrlhf.errors import ModelError

logger = logging.getLogger("chatrlhf.models")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
# Config fields that hold a dropout probability in some family; the override touches only those present.
DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                  "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                  "classifier_dropout", "embed_dropout", "ffn_dropout")
# Attributes naming a hard position limit (learned absolute position embeddings).
_MAX_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
PROBE_TEXT = " Human: Reverse the word: cat Assistant: tac 1234 ÄÖ ok!\n"


def _local_dir(path: str | Path) -> Path | None:
    """The directory when ``path`` names a local one, else None (a hub name). A path-looking string that does not
    exist is an error rather than a silent hub download attempt."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    s = str(path)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise ModelError(f"{path}: no such model directory")
    return None


def is_model_dir(path: str | Path) -> bool:
    """True for a local directory holding config.json and model weights (safetensors or bin, sharded or not)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in WEIGHT_FILES)


def load_tokenizer(path: str | Path, padding_side: str = "right", trust_remote_code: bool = False):
    """The tokenizer saved in ``path`` (a local dir; a hub name only when it is not a path), with a pad token.

    pad = eos (with a warning) when the tokenizer has no pad token; ModelError when it has neither.
    """
    from transformers import AutoTokenizer

    local = _local_dir(path)
    if local is not None and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{local}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer next to the model with tokenizer.save_pretrained(dir)")
    try:
        tok = AutoTokenizer.from_pretrained(str(local or path), local_files_only=local is not None,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the tokenizer: {e}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"{path}: the tokenizer has neither a pad token nor an eos token; "
                             "set one (e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it again")
        logger.warning("%s: tokenizer has no pad token; using the eos token %r as pad", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _read_config(local: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{local}: not a model directory (no config.json); expected a Hugging Face model saved "
                         "with save_pretrained")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_file}: not valid JSON: {e}") from None
    try:
        return AutoConfig.from_pretrained(str(local), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise ModelError(f"{cfg_file}: unknown or unsupported model_type {model_type!r} ({e})") from None


def _to_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if str(dtype) not in names:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[str(dtype)]


def apply_dropout(config, dropout: float | None) -> list[str]:
    """Set every dropout field the config has to ``dropout`` (0.0 disables); returns the fields changed."""
    if dropout is None:
        return []
    changed = [f for f in DROPOUT_FIELDS if isinstance(getattr(config, f, None), (int, float))]
    for f in changed:
        setattr(config, f, float(dropout))
    return changed


def load_causal_lm(path: str | Path, dtype: Any = None, dropout: float | None = None, trust_remote_code: bool = False,
                   tokenizer=None):
    """AutoModelForCausalLM from a local model dir (or a hub name), with a clear ModelError otherwise.

    ``dropout`` overrides the config's dropout fields; ``tokenizer`` sets config/generation pad and eos ids and
    grows the embeddings (to a multiple of 8) when the tokenizer has more tokens than the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    local = _local_dir(path)
    if local is not None:
        config = _read_config(local, trust_remote_code)
        if not any((local / w).is_file() for w in WEIGHT_FILES):
            present = ", ".join(sorted(p.name for p in local.iterdir())) or "nothing"
            raise ModelError(f"{local}: no model weights (expected one of {', '.join(WEIGHT_FILES)}; found {present})")
    else:
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the model config: {e}") from None
    apply_dropout(config, dropout)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local or path), config=config, dtype=_to_dtype(dtype),
                                                     local_files_only=local is not None,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:  # e.g. a config of a model type without a causal-LM head
        raise ModelError(f"{path}: cannot load as a causal LM: {e}") from None
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(8 * ((len(tokenizer) + 7) // 8))
        for obj in (model.config, model.generation_config):
            if obj is not None:
                obj.pad_token_id = tokenizer.pad_token_id
                obj.eos_token_id = tokenizer.eos_token_id
    return model


def num_padding_at_beginning(tokenizer) -> int:
    """1 when the tokenizer starts every encoding with the pad token (OPT: BOS ``</s>`` == pad), else 0."""
    ids = tokenizer("hi")["input_ids"]
    pad = tokenizer.pad_token_id
    return 1 if pad is not None and ids and ids[0] == pad else 0


def _rope_or_alibi(config) -> bool:
    """Models whose positions are computed (RoPE, ALiBi) have no hard length limit."""
    if getattr(config, "model_type", "") in ("bloom", "mpt", "falcon"):
        return True
    return any(getattr(config, a, None) is not None for a in
               ("rope_theta", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base", "rotary_dim"))


def max_positions(config) -> int | None:
    """The model's hard maximum sequence length, or None when it has none (RoPE / ALiBi)."""
    if _rope_or_alibi(config):
        return None
    for a in _MAX_POSITION_FIELDS:
        v = getattr(config, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seq_len(config, max_seq_len: int) -> None:
    """ModelError when ``max_seq_len`` exceeds a model's learned position embeddings; RoPE/ALiBi models pass
    (with a warning past their trained length)."""
    limit = max_positions(config)
    if limit is not None and max_seq_len > limit:
        raise ModelError(f"--max_seq_len {max_seq_len} is longer than the model's {limit} positions "
                         f"({getattr(config, 'model_type', 'model')}); use --max_seq_len {limit} or less")
    trained = getattr(config, "max_position_embeddings", None)
    if limit is None and isinstance(trained, int) and max_seq_len > trained:
        logger.warning("--max_seq_len %d exceeds the %d positions the model was trained on", max_seq_len, trained)


def _special(tok) -> dict[str, tuple[str | None, int | None]]:
    return {name: (getattr(tok, f"{name}_token", None), getattr(tok, f"{name}_token_id", None))
            for name in ("bos", "eos", "pad", "unk")}


def check_tokenizers_compatible(tok_a, tok_b, names: tuple[str, str] = ("actor", "reward model")) -> None:
    """ModelError naming the first difference (vocabulary size, a special token, or a probe string's encoding)
    between two tokenizers that must agree, e.g. the actor's and the reward model's."""
    a, b = names
    if len(tok_a) != len(tok_b):
        raise ModelError(f"{a} and {b} tokenizers differ: vocabulary size {len(tok_a)} vs {len(tok_b)}")
    sa, sb = _special(tok_a), _special(tok_b)
    for name in sa:
        if sa[name] != sb[name]:
            raise ModelError(f"{a} and {b} tokenizers differ: {name} token {sa[name][0]!r} (id {sa[name][1]}) "
                             f"vs {sb[name][0]!r} (id {sb[name][1]})")
    ea, eb = tok_a(PROBE_TEXT)["input_ids"], tok_b(PROBE_TEXT)["input_ids"]
    if ea != eb:
        i = next((i for i, (x, y) in enumerate(zip(ea, eb)) if x != y), min(len(ea), len(eb)))
        raise ModelError(f"{a} and {b} tokenizers differ: they encode {PROBE_TEXT!r} differently from token {i} "
                         f"({ea[i:i + 4]} vs {eb[i:i + 4]})")
