"""Phase splits, blending, tokenization rules, the on-disk cache and the collators."""

from __future__ import annotations

import json
import logging

import torch

from chatrlhf.data import (DataConfig, PairCollator, PromptCollator, SFTCollator, build_phase_datasets,
                           plan_phase_rows)

from data_helpers import FIXTURES, pair_rows


def local_dir(root, train, evl):
    """A local/jsonfile dataset dir: root/data/train.json + eval.json."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (root / "data" / "eval.json").write_text(json.dumps(evl), encoding="utf-8")
    return str(root)


def cfg_for(tmp_path, data_path, **kw):
    return DataConfig(data_path=list(data_path), data_output_path=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------------------------------------------------------
# Row selection


def test_data_split_shares_are_disjoint_and_proportional(tmp_path):
    path = local_dir(tmp_path / "ds", pair_rows(100), pair_rows(50, prefix="e"))
    cfg = cfg_for(tmp_path, [path], data_split="2,4,4")
    plans = {p: plan_phase_rows(p, cfg) for p in (1, 2, 3)}
    assert [len(plans[p].train) for p in (1, 2, 3)] == [20, 40, 40]
    assert [len(plans[p].eval) for p in (1, 2, 3)] == [10, 20, 20]
    for split in ("train", "eval"):
        sets = [{r.prompt for r in getattr(plans[p], split)} for p in (1, 2, 3)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(sets[0] | sets[1] | sets[2]) == (100 if split == "train" else 50)
    again = plan_phase_rows(2, cfg)
    assert again.train == plans[2].train  # seeded: the same rows every time
    only_sft = plan_phase_rows(1, cfg_for(tmp_path, [path], data_split="10,0,0"))
    assert len(only_sft.train) == 100 and len(only_sft.eval) == 50


def test_blending_and_sft_only_paths(tmp_path):
    a = local_dir(tmp_path / "a", pair_rows(30, "alpha"), pair_rows(4, "alpha-e"))
    b = local_dir(tmp_path / "b", pair_rows(30, "beta"), pair_rows(4, "beta-e"))
    sft = str(FIXTURES / "zhihu_kol.jsonl")
    cfg = cfg_for(tmp_path, [a, b], data_split="10,0,0", sft_only_data_path=[sft])
    p1 = plan_phase_rows(1, cfg)
    prompts = [r.prompt for r in p1.train]
    assert len(prompts) == 61 and sum("alpha" in p for p in prompts) == 30 and sum("beta" in p for p in prompts) == 30
    assert " Human: 如何学习编程？ Assistant:" in prompts  # the sft-only dataset goes entirely to phase 1
    first_half = prompts[:30]
    assert any("alpha" in p for p in first_half) and any("beta" in p for p in first_half)  # shuffled, not stacked
    assert plan_phase_rows(1, cfg).train == p1.train
    cfg3 = cfg_for(tmp_path, [a, b], data_split="0,0,10", sft_only_data_path=[sft])
    assert all("如何" not in r.prompt for r in plan_phase_rows(3, cfg3).train)


def test_sft_only_rows_do_not_reach_phase_2(tmp_path, caplog):
    pairs = local_dir(tmp_path / "p", pair_rows(10), pair_rows(2, "e"))
    cfg = cfg_for(tmp_path, [pairs, str(FIXTURES / "miracl_ja.jsonl")], data_split="0,10,0")
    with caplog.at_level(logging.INFO, logger="chatrlhf"):
        plan = plan_phase_rows(2, cfg)
    assert all(r.rejected is not None for r in plan.train + plan.eval)
    assert plan.stats["sft_only_rows_ignored"] == 1  # miracl-ja row without negatives
    assert len(plan.train) + len(plan.eval) == 13
    assert "without a rejected answer" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


def test_phase1_masks_exactly_the_prompt_tokens(tmp_path, tokenizer):
    path = local_dir(tmp_path / "ds", pair_rows(6), pair_rows(2, "e"))
    train, evl = build_phase_datasets(1, cfg_for(tmp_path, [path], data_split="10,0,0"), tokenizer)
    rows = plan_phase_rows(1, cfg_for(tmp_path, [path], data_split="10,0,0")).train
    assert len(train) == 6 and len(evl) == 2
    for i, row in enumerate(rows):
        item = train[i]
        n_prompt = len(tokenizer(row.prompt)["input_ids"])
        expected = tokenizer(row.prompt + row.chosen)["input_ids"] + [tokenizer.eos_token_id]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == expected
        assert item["labels"][:n_prompt].tolist() == [-100] * n_prompt
        assert item["labels"][n_prompt:].tolist() == expected[n_prompt:]


def test_phase1_train_on_prompt_and_bos(tmp_path, bos_tokenizer):
    path = local_dir(tmp_path / "ds", pair_rows(4), pair_rows(1, "e"))
    on = build_phase_datasets(1, cfg_for(tmp_path, [path], data_split="1,0,0", train_on_prompt=True), bos_tokenizer)[0]
    off = build_phase_datasets(1, cfg_for(tmp_path, [path], data_split="1,0,0"), bos_tokenizer)[0]
    assert on[0]["labels"].tolist() == on[0]["input_ids"].tolist()
    ids, labels = off[0]["input_ids"].tolist(), off[0]["labels"].tolist()
    assert ids[0] == bos_tokenizer.bos_token_id and labels[0] == -100  # the OPT-style BOS is part of the prompt
    n_masked = labels.count(-100)
    row = plan_phase_rows(1, cfg_for(tmp_path, [path], data_split="1,0,0")).train[0]
    assert bos_tokenizer.decode(ids[n_masked:]) == row.chosen + "<|endoftext|>"
    assert bos_tokenizer.decode(ids[1:n_masked]) == row.prompt
    assert ids[-1] == bos_tokenizer.eos_token_id and labels[-1] == bos_tokenizer.eos_token_id


def test_phase1_truncation_and_prompt_that_fills_max_seq_len(tmp_path, tokenizer):
    long_prompt = {"prompt": " Human: " + "what is the answer " * 30 + "Assistant:", "chosen": " ok", "rejected": " no"}
    path = local_dir(tmp_path / "ds", pair_rows(3) + [long_prompt], [])
    train, _ = build_phase_datasets(1, cfg_for(tmp_path, [path], data_split="1,0,0", max_seq_len=16), tokenizer)
    assert len(train) == 3 and train.info["train"]["stats"]["dropped_prompt_fills_max_seq_len"] == 1
    assert all(len(train[i]["input_ids"]) <= 16 for i in range(3))


def test_phase2_pairs_and_collator(tmp_path, tokenizer):
    path = local_dir(tmp_path / "ds", pair_rows(4), pair_rows(1, "e"))
    cfg = cfg_for(tmp_path, [path], data_split="0,1,0")
    train, _ = build_phase_datasets(2, cfg, tokenizer)
    rows = plan_phase_rows(2, cfg).train
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        assert train[i]["chosen_input_ids"].tolist() == tokenizer(row.prompt + row.chosen)["input_ids"] + [eos]
        assert train[i]["rejected_input_ids"].tolist() == tokenizer(row.prompt + row.rejected)["input_ids"] + [eos]
    batch = PairCollator(tokenizer.pad_token_id)([train[0], train[1]])
    assert batch["input_ids"].shape[0] == 4
    c0 = train[0]["chosen_input_ids"]
    assert batch["input_ids"][0, :len(c0)].tolist() == c0.tolist()          # chosen block first
    r1 = train[1]["rejected_input_ids"]
    assert batch["input_ids"][3, :len(r1)].tolist() == r1.tolist()          # then the rejected block
    assert batch["attention_mask"].sum(1).tolist() == [len(c0), len(train[1]["chosen_input_ids"]),
                                                       len(train[0]["rejected_input_ids"]), len(r1)]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][3, len(r1):].tolist() == [tokenizer.pad_token_id] * (width - len(r1))  # right pad


def test_phase2_kwise_rankings(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path, [str(FIXTURES / "kwise.jsonl")], data_split="0,1,0", kwise=True)
    train, _ = build_phase_datasets(2, cfg, tokenizer)
    rows = plan_phase_rows(2, cfg).train
    assert len(train) == 2 and train.info["train"]["stats"]["k"] == 3
    item = train[0]
    assert len(item["input_ids_list"]) == 3
    for ids, answer in zip(item["input_ids_list"], rows[0].answers):
        assert ids.tolist() == tokenizer(rows[0].prompt + answer)["input_ids"] + [tokenizer.eos_token_id]
    batch = PairCollator(tokenizer.pad_token_id)([train[0], train[1]])
    assert batch["k"] == 3 and batch["input_ids"].shape[0] == 6
    for j in range(3):  # grouped per example: rows 3..5 are example 1's answers, best first
        seq = train[1]["input_ids_list"][j]
        assert batch["input_ids"][3 + j, :len(seq)].tolist() == seq.tolist()
    top2 = build_phase_datasets(2, cfg_for(tmp_path, [str(FIXTURES / "kwise.jsonl")], data_split="0,1,0",
                                           kwise=True, kwise_k=2), tokenizer)[0]
    assert len(top2[0]["input_ids_list"]) == 2
    assert top2[0]["input_ids_list"][1].tolist() == item["input_ids_list"][1].tolist()


def test_phase2_without_kwise_uses_best_vs_worst(tmp_path, tokenizer):
    plan = plan_phase_rows(2, cfg_for(tmp_path, [str(FIXTURES / "kwise.jsonl")], data_split="0,1,0"))
    by_prompt = {r.prompt: (r.chosen, r.rejected) for r in plan.train}
    assert by_prompt[" Human: Rank these. Assistant:"] == (" The best answer.", " The worst.")


def test_phase3_left_padding_and_dropped_count(tmp_path, tokenizer, caplog):
    long_prompt = {"prompt": " Human: " + "why is the sky blue " * 20 + "Assistant:", "chosen": " x", "rejected": " y"}
    path = local_dir(tmp_path / "ds", pair_rows(5) + [long_prompt], [])
    cfg = cfg_for(tmp_path, [path], data_split="0,0,1", max_prompt_seq_len=24)
    with caplog.at_level(logging.INFO, logger="chatrlhf"):
        train, evl = build_phase_datasets(3, cfg, tokenizer)
    assert len(train) == 5 and len(evl) == 0
    assert train.info["train"]["stats"]["dropped_prompt_too_long"] == 1
    assert "dropped_prompt_too_long=1" in caplog.text
    rows = plan_phase_rows(3, cfg).train
    kept = [r for r in rows if r is not None and "sky" not in r.prompt]
    assert train[0]["prompt_input_ids"].tolist() == tokenizer(kept[0].prompt)["input_ids"]
    short = {"prompt_input_ids": torch.tensor([5, 6])}
    batch = PromptCollator(tokenizer.pad_token_id)([train[0], short])
    width = batch["prompt_input_ids"].shape[1]
    pad = tokenizer.pad_token_id
    assert batch["prompt_input_ids"][1].tolist() == [pad] * (width - 2) + [5, 6]
    assert batch["prompt_attention_mask"][1].tolist() == [0] * (width - 2) + [1, 1]
    assert batch["prompt_attention_mask"][0].all()


def test_sft_collator_pads_right_with_ignore_labels():
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])}
    b = {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])}
    out = SFTCollator(pad_token_id=9)([a, b])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_miss_and_reload(tmp_path, tokenizer):
    path = local_dir(tmp_path / "ds", pair_rows(8), pair_rows(2, "e"))
    cfg = cfg_for(tmp_path, [path], data_split="1,0,0")
    first, _ = build_phase_datasets(1, cfg, tokenizer)
    meta = tmp_path / "cache" / first.info["cache_dir"].split("/")[-1] / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again, _ = build_phase_datasets(1, cfg, tokenizer)
    assert not first.info["cache_hit"] and again.info["cache_hit"]
    assert again.info["cache_dir"] == first.info["cache_dir"] and meta.stat().st_mtime_ns == stamp  # not rebuilt
    assert [again[i]["input_ids"].tolist() for i in range(8)] == [first[i]["input_ids"].tolist() for i in range(8)]

    longer = cfg_for(tmp_path, [path], data_split="1,0,0", max_seq_len=256)
    changed, _ = build_phase_datasets(1, longer, tokenizer)
    assert not changed.info["cache_hit"] and changed.info["cache_dir"] != first.info["cache_dir"]

    # step 3's cache does not depend on max_seq_len
    p3a, _ = build_phase_datasets(3, cfg_for(tmp_path, [path], data_split="1,0,1"), tokenizer)
    p3b, _ = build_phase_datasets(3, cfg_for(tmp_path, [path], data_split="1,0,1", max_seq_len=64), tokenizer)
    assert p3b.info["cache_hit"] and p3b.info["cache_dir"] == p3a.info["cache_dir"]

    reloaded, _ = build_phase_datasets(1, cfg_for(tmp_path, [path], data_split="1,0,0", reload=True), tokenizer)
    assert not reloaded.info["cache_hit"] and reloaded.info["cache_dir"] == first.info["cache_dir"]
    assert meta.stat().st_mtime_ns != stamp

    rows = pair_rows(8)
    rows[0]["chosen"] = " a different answer"
    (tmp_path / "ds" / "data" / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    edited, _ = build_phase_datasets(1, cfg, tokenizer)
    assert not edited.info["cache_hit"] and edited.info["cache_dir"] != first.info["cache_dir"]
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # atomic: no half-written dirs left


def test_cache_key_depends_on_the_tokenizer(tmp_path, tokenizer, bos_tokenizer):
    path = local_dir(tmp_path / "ds", pair_rows(4), [])
    cfg = cfg_for(tmp_path, [path], data_split="1,0,0")
    a, _ = build_phase_datasets(1, cfg, tokenizer)
    b, _ = build_phase_datasets(1, cfg, bos_tokenizer)
    assert a.info["cache_dir"] != b.info["cache_dir"] and not b.info["cache_hit"]


def test_cache_is_arrow_not_pickle(tmp_path, tokenizer):
    path = local_dir(tmp_path / "ds", pair_rows(4), [])
    train, _ = build_phase_datasets(1, cfg_for(tmp_path, [path], data_split="1,0,0"), tokenizer)
    from pathlib import Path

    files = {p.suffix for p in Path(train.info["cache_dir"]).rglob("*") if p.is_file()}
    assert ".arrow" in files and not files & {".pkl", ".pickle", ".pt"}
