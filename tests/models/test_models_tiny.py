"""Tiny models: every family builds, saves, reloads offline and generates; tokenizer conventions per family."""

import json
import os

import pytest
import torch

from chatrlhf.models import FAMILIES, load_causal_lm, load_tokenizer, num_padding_at_beginning

PROMPT = " Human: Add 3 and 4. Assistant:"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_reloads_offline_and_generates(family, tiny_model_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_factory(family, hidden=32, layers=2, vocab=400, heads=4, max_positions=128)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    cfg = model.config
    assert cfg.model_type == family and cfg.num_hidden_layers == 2 and cfg.hidden_size == 32
    assert cfg.vocab_size == 400 >= len(tok)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    # byte-level BPE: lossless round trip, and the task's words are learned merges (short sequences)
    ids = tok(PROMPT + " 7", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == PROMPT + " 7" and len(ids) <= 12
    enc = tok([PROMPT], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 4
    assert json.loads((d / "tiny_model.json").read_text())["family"] == family


@pytest.mark.parametrize("family,first_is_pad", [("opt", True), ("llama", False), ("gpt_neox", False),
                                                 ("bloom", False), ("gpt2", False)])
def test_bos_conventions(family, first_is_pad, tiny_model_factory):
    tok = load_tokenizer(tiny_model_factory(family, hidden=32, layers=2, vocab=400, heads=4, max_positions=128))
    ids = tok("hi")["input_ids"]
    assert num_padding_at_beginning(tok) == int(first_is_pad)
    if family == "opt":  # OPT: "</s>" is BOS, EOS and pad, and starts every encoding
        assert ids[0] == tok.pad_token_id == tok.bos_token_id == tok.eos_token_id
        assert tok.convert_ids_to_tokens(ids[0]) == "</s>"
    elif family == "llama":  # a distinct BOS
        assert ids[0] == tok.bos_token_id != tok.pad_token_id
    else:
        assert tok.bos_token_id not in ids and tok.pad_token_id not in ids


def test_standard_tiny_model_dir(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer=tok)
    assert model.config.model_type == "opt" and model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert num_padding_at_beginning(tok) == 1 and tok.padding_side == "right"
    assert 300 < len(tok) <= 512


def test_same_seed_same_weights(tmp_path):
    from chatrlhf.models import build_tiny_model

    corpus = [" Human: Add 1 and 2. Assistant: 3"] * 20
    a = build_tiny_model("gpt2", tmp_path / "a", hidden=16, layers=1, heads=2, vocab=300, corpus=corpus, seed=3)
    b = build_tiny_model("gpt2", tmp_path / "b", hidden=16, layers=1, heads=2, vocab=300, corpus=corpus, seed=3)
    c = build_tiny_model("gpt2", tmp_path / "c", hidden=16, layers=1, heads=2, vocab=300, corpus=corpus, seed=4)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb, wc = (load_causal_lm(p).transformer.wte.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_cli_tiny_model(tmp_path, capsys):
    from chatrlhf.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" Human: Uppercase: dog Assistant: DOG\n" * 30)
    out = tmp_path / "m"
    rc = main(["tiny-model", "--family", "llama", "--out", str(out), "--hidden", "32", "--layers", "1",
               "--heads", "2", "--vocab", "300", "--max_positions", "64", "--corpus_file", str(corpus)])
    assert rc == 0 and "parameters" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", 32, 1, 300)
    assert load_tokenizer(out)(" DOG", add_special_tokens=False)["input_ids"] == [load_tokenizer(out).convert_tokens_to_ids("ĠDOG")]


@pytest.mark.parametrize("argv,msg", [
    (["--family", "t5"], "unknown model family 't5'"),
    (["--hidden", "30", "--heads", "4"], "divisible"),
    (["--vocab", "100"], "at least"),
    ([], "--out is required"),
])
def test_cli_errors(argv, msg, tmp_path, capsys):
    from chatrlhf.cli import main

    out = [] if not argv or argv == [] else ["--out", str(tmp_path / "x")]
    assert main(["tiny-model", *out, *argv]) == 2
    assert msg in capsys.readouterr().err
