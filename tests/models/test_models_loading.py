"""Loading and checks: clear ModelErrors for the failures DeepSpeed-Chat users hit."""

import json
import logging
import shutil

import pytest
import torch

from chatrlhf.errors import ModelError
from chatrlhf.models import (
    check_seq_len,
    check_tokenizers_compatible,
    is_model_dir,
    load_causal_lm,
    load_tokenizer,
    max_positions,
)

SMALL = dict(hidden=32, layers=2, vocab=400, heads=4, max_positions=128)


@pytest.fixture
def model_copy(tiny_model_factory, tmp_path):
    """A private copy of a tiny gpt2 model that a test may break."""
    d = tmp_path / "copy"
    shutil.copytree(tiny_model_factory("gpt2", **SMALL), d)
    return d


def test_not_a_model_dir(tmp_path, model_copy):
    assert is_model_dir(model_copy) and not is_model_dir(tmp_path)
    with pytest.raises(ModelError, match="not a model directory.*no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelError, match="no such model directory"):
        load_causal_lm(tmp_path / "missing")
    (model_copy / "model.safetensors").unlink()
    assert not is_model_dir(model_copy)
    with pytest.raises(ModelError, match="no model weights.*found config.json"):
        load_causal_lm(model_copy)


def test_unknown_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unknown or unsupported model_type 'no_such_arch'"):
        load_causal_lm(model_copy)


def test_tokenizer_never_follows_name_or_path(model_copy):
    # The original re-downloaded the tokenizer named in config.json; a bogus hub name must not matter here.
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["_name_or_path"] = "facebook/opt-1.3b"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(model_copy, padding_side="left")
    assert tok.padding_side == "left" and len(tok) <= 400
    assert load_causal_lm(model_copy).config.vocab_size == 400


def test_missing_tokenizer_files(tiny_model_factory, tmp_path):
    d = tmp_path / "weights_only"
    shutil.copytree(tiny_model_factory("gpt2", **SMALL), d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    with pytest.raises(ModelError, match="no tokenizer files"):
        load_tokenizer(d)


def test_pad_falls_back_to_eos_then_errors(model_copy, caplog):
    tc_path = model_copy / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("pad_token")
    tc_path.write_text(json.dumps(tc))
    with caplog.at_level(logging.WARNING, logger="chatrlhf.models"):
        tok = load_tokenizer(model_copy)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert "no pad token" in caplog.text
    tc.pop("eos_token")
    tc.pop("bos_token")
    tc_path.write_text(json.dumps(tc))
    with pytest.raises(ModelError, match="neither a pad token nor an eos token"):
        load_tokenizer(model_copy)


def test_dropout_dtype_and_tokenizer_ids(tiny_model_factory):
    d = tiny_model_factory("opt", **SMALL)
    m = load_causal_lm(d, dropout=0.25, dtype="bf16")
    assert m.config.dropout == m.config.attention_dropout == 0.25 and m.dtype == torch.bfloat16
    assert load_causal_lm(d, dropout=0.0).config.dropout == 0.0
    llama_tok = load_tokenizer(tiny_model_factory("llama", **SMALL))
    m = load_causal_lm(d, tokenizer=llama_tok)
    assert m.config.pad_token_id == llama_tok.pad_token_id == m.generation_config.pad_token_id
    assert m.config.eos_token_id == llama_tok.eos_token_id
    with pytest.raises(ModelError, match="unknown dtype"):
        load_causal_lm(d, dtype="fp8")


def test_embeddings_grow_for_added_tokens(tiny_model_factory):
    d = tiny_model_factory("gpt2", **SMALL)
    tok = load_tokenizer(d)
    tok.add_special_tokens({"additional_special_tokens": [f"<extra_{i}>" for i in range(450 - len(tok))]})
    m = load_causal_lm(d, tokenizer=tok)
    assert m.get_input_embeddings().weight.shape[0] == 456  # 450 rounded up to a multiple of 8


def test_check_seq_len(tiny_model_factory):
    from transformers import AutoConfig

    opt = AutoConfig.from_pretrained(tiny_model_factory("opt", **SMALL))
    check_seq_len(opt, 128)
    with pytest.raises(ModelError, match=r"--max_seq_len 256 .*128 positions"):
        check_seq_len(opt, 256)
    gpt2 = AutoConfig.from_pretrained(tiny_model_factory("gpt2", **SMALL))
    with pytest.raises(ModelError, match="129.*128"):
        check_seq_len(gpt2, 129)
    for family in ("llama", "gpt_neox", "bloom"):  # RoPE / ALiBi: no hard limit
        cfg = AutoConfig.from_pretrained(tiny_model_factory(family, **SMALL))
        assert max_positions(cfg) is None
        check_seq_len(cfg, 4096)


def test_tokenizers_compatible(tiny_model_factory, tmp_path):
    opt_a = load_tokenizer(tiny_model_factory("opt", **SMALL))
    check_tokenizers_compatible(opt_a, load_tokenizer(tiny_model_factory("opt", **SMALL)))
    with pytest.raises(ModelError, match="vocabulary size"):
        check_tokenizers_compatible(opt_a, load_tokenizer(tiny_model_factory("opt", **{**SMALL, "vocab": 420})))
    # same size, different special tokens
    bloom = load_tokenizer(tiny_model_factory("bloom", **SMALL))
    assert len(opt_a) == len(bloom)
    with pytest.raises(ModelError, match=r"actor and reward model tokenizers differ: bos token '</s>' \(id 2\) vs '<s>' \(id 1\)"):
        check_tokenizers_compatible(opt_a, bloom)
    # same specials, but llama prepends its BOS and bloom does not
    llama = load_tokenizer(tiny_model_factory("llama", **SMALL))
    with pytest.raises(ModelError, match="differently from token 0"):
        check_tokenizers_compatible(llama, bloom)
    # same size and specials, different token ids (two vocabulary entries swapped)
    d = tmp_path / "swapped"
    shutil.copytree(tiny_model_factory("opt", **SMALL), d)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["ĠHuman"], vocab["ĠAssistant"] = vocab["ĠAssistant"], vocab["ĠHuman"]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelError, match=r"actor and critic tokenizers differ: they encode .* from token 1 "):
        check_tokenizers_compatible(opt_a, load_tokenizer(d), names=("actor", "critic"))
