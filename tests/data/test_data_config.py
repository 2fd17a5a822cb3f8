"""DataConfig as a command-line field set, and the build-once protocol between processes/ranks."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from chatrlhf.config import parse_config
from chatrlhf.data import DataConfig, build_phase_datasets
from chatrlhf.data.phases import _build_once
from chatrlhf.errors import DataError

from data_helpers import FIXTURES


def test_every_field_has_help_and_the_documented_defaults():
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    assert all(f.metadata.get("help") for f in fields.values())
    cfg = DataConfig()
    assert cfg.data_path == ["Dahoas/rm-static"] and cfg.data_split == "2,4,4" and cfg.sft_only_data_path == []
    assert (cfg.max_seq_len, cfg.max_prompt_seq_len, cfg.seed) == (512, 256, 1234)
    assert not (cfg.reload or cfg.train_on_prompt or cfg.skip_bad_rows or cfg.kwise)


def test_parse_config_with_deepspeed_chat_flags():
    cfg = parse_config(DataConfig, ["--data_path", "a.jsonl", "Dahoas/rm-static", "--data-split", "10,0,0",
                                    "--sft_only_data_path", "s.jsonl", "--max_seq_len", "128", "--kwise"])
    assert cfg.data_path == ["a.jsonl", "Dahoas/rm-static"] and cfg.data_split == "10,0,0"
    assert cfg.sft_only_data_path == ["s.jsonl"] and cfg.max_seq_len == 128 and cfg.kwise
    with pytest.raises(DataError, match="--data_split '1,2'"):
        parse_config(DataConfig, ["--data_split", "1,2"])


def test_build_once_lets_one_process_build_while_the_other_waits(tmp_path):
    builds, results = [], []

    def build(out):
        builds.append(out)
        time.sleep(0.3)  # long enough for the second caller to arrive and wait on the lock
        (out / "meta.json").write_text("{}")

    threads = [threading.Thread(target=lambda: results.append(_build_once(tmp_path / "phase1_x", False, build)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sorted(results) == [False, True]
    assert (tmp_path / "phase1_x" / "meta.json").is_file()


def test_failed_build_leaves_no_cache(tmp_path):
    def build(out):
        (out / "partial").write_text("x")
        raise DataError("boom")

    with pytest.raises(DataError, match="boom"):
        _build_once(tmp_path / "phase2_y", False, build)
    assert not (tmp_path / "phase2_y").exists() and not list(tmp_path.glob(".tmp-*"))


def test_distributed_single_rank_builds_and_propagates_errors(tmp_path, tokenizer):
    import torch.distributed as dist

    ours = not dist.is_initialized()  # an in-process DeepSpeed engine of an earlier test may have made one
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        cfg = DataConfig(data_path=[str(FIXTURES / "local_jsonfile")], data_split="1,0,0",
                         data_output_path=str(tmp_path / "cache"))
        train, _ = build_phase_datasets(1, cfg, tokenizer)
        assert len(train) == 2 and not train.info["cache_hit"]
        cfg.max_prompt_seq_len = 1
        cfg.data_split = "0,0,1"
        with pytest.raises(DataError, match="filtered out"):
            build_phase_datasets(3, cfg, tokenizer)
        assert isinstance(train[0]["input_ids"], torch.Tensor)
    finally:
        if ours:
            dist.destroy_process_group()
