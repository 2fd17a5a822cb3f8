"""Preflight (`chatrlhf train --preflight_only`): every problem found before anything trains, in one clear error."""

import json

import pytest

from chatrlhf.apps import pipeline
from chatrlhf.errors import UserError
from chatrlhf.apps.preflight import activation_memory, ModelInfo, static_memory


def _args(quick_assets, out, *extra, reward=None, data=None):
    return ["--actor-model", quick_assets["actor"], "--reward-model", reward or quick_assets["reward"],
            "--data_path", data or quick_assets["data"], "--output-dir", str(out), "--preflight_only",
            "--sft", "{skip_bad_rows: true, max_seq_len: 64}", "--reward", "{skip_bad_rows: true, max_seq_len: 64}",
            "--ppo", "{skip_bad_rows: true, max_prompt_seq_len: 32, max_answer_seq_len: 16}", *extra]


def test_preflight_ok_prints_per_step_memory_and_trains_nothing(quick_assets, tmp_path, capsys):
    assert pipeline.main(_args(quick_assets, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[preflight] ok" in out
    for step in ("sft", "reward", "ppo"):
        assert f"[preflight] {step}: ~" in out
    ppo_line = next(line for line in out.splitlines() if line.startswith("[preflight] ppo"))
    for part in ("actor optimizer", "reference weights", "critic gradients", "reward weights", "kv cache"):
        assert part in ppo_line
    assert not (tmp_path / "step1_sft" / "done.json").exists() and not (tmp_path / "step1_sft" / "train.log").exists()


def test_bad_data_path(quick_assets, tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.main(_args(quick_assets, tmp_path, data=str(tmp_path / "missing" / "pairs.json")))
    msg = str(e.value)
    assert "preflight found 1 problem(s)" in msg
    assert f"data {tmp_path / 'missing' / 'pairs.json'}" in msg and "no such file or directory" in msg


def test_bad_data_row_names_file_row_and_field(quick_assets, tmp_path):
    rows = [{"prompt": " Human: Add 1 and 2. Assistant:", "chosen": " 3", "rejected": " 4"},
            {"prompt": " Human: Add 2 and 2. Assistant:", "chosen": "", "rejected": " 5"}]
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--actor-model", quick_assets["actor"], "--reward-model", quick_assets["reward"], "--data_path", str(bad),
            "--output-dir", str(tmp_path / "run"), "--preflight_only"]
    with pytest.raises(UserError, match=r"pairs\.jsonl, row 2, field 'chosen': is empty.*--skip_bad_rows"):
        pipeline.main(args)


def test_incompatible_tokenizers(quick_assets, other_tokenizer_model, tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.main(_args(quick_assets, tmp_path, reward=other_tokenizer_model))
    msg = str(e.value)
    assert "tokenizers are incompatible" in msg and other_tokenizer_model in msg
    assert "vocabulary size" in msg or "token" in msg


def test_impossible_memory_budget_gives_advice(quick_assets, tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.main(_args(quick_assets, tmp_path, "--memory_budget_gb", "0.0005"))
    msg = str(e.value)
    assert "preflight found 3 problem(s)" in msg  # sft, reward and ppo, all listed at once
    assert "ppo: needs about" in msg and "per rank" in msg and "--memory_budget_gb" in msg
    assert "ZeRO" in msg and "LoRA" in msg and "gradient checkpointing" in msg


def test_all_problems_listed_together(quick_assets, other_tokenizer_model, tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.main(_args(quick_assets, tmp_path, "--memory_budget_gb", "0.0005", "--sft", "{max_seq_len: 4096}",
                            reward=other_tokenizer_model, data=str(tmp_path / "nope.jsonl")))
    msg = str(e.value)
    assert "tokenizers are incompatible" in msg
    assert "max_seq_len = 4096 exceeds" in msg
    assert "nope.jsonl" in msg
    assert "needs about" in msg


def test_memory_model_shards_with_zero_stage_and_world_size():
    n = 1_000_000_000
    z0 = static_memory(n, 0, "bf16", 8, offload=False, on_cpu=False)
    z1 = static_memory(n, 1, "bf16", 8, offload=False, on_cpu=False)
    z2 = static_memory(n, 2, "bf16", 8, offload=False, on_cpu=False)
    z3 = static_memory(n, 3, "bf16", 8, offload=False, on_cpu=False)
    assert z0 == {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n}  # bf16 + fp32 master + Adam m, v
    assert z1["optimizer"] == 12 * n // 8 and z1["gradients"] == 2 * n
    assert z2["gradients"] == 2 * n // 8 and z2["weights"] == 2 * n
    assert z3["weights"] == 2 * n // 8
    assert static_memory(n, 0, "fp32", 1, False, True)["optimizer"] == 8 * n  # fp32: no master copy
    assert static_memory(n, 2, "bf16", 1, offload=True, on_cpu=False)["optimizer"] == 0
    assert static_memory(n, 2, "bf16", 1, offload=True, on_cpu=True)["optimizer"] == 12 * n  # CPU: same memory
    info = ModelInfo("m", n, hidden=2048, layers=24, heads=32, vocab=50272, max_positions=2048)
    full = activation_memory(info, 8, 512, "bf16", grad_ckpt=False, lm_head=True)
    ckpt = activation_memory(info, 8, 512, "bf16", grad_ckpt=True, lm_head=True)
    assert ckpt < full / 4
