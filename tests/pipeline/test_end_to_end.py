"""The whole pipeline on tiny models: `chatrlhf demo --quick` (all three steps + evaluation + report), a rerun that
skips every finished step, and a train killed mid-step-1 that resumes from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatrlhf.trainers.metrics import read_metrics

from .conftest import cli_env, run_cli


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_demo_quick_all_steps_then_rerun_skips_finished_steps(tmp_path):
    out = tmp_path / "demo"
    r = run_cli(["demo", "--quick", "--output_dir", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]

    # every step: done.json (last), metrics.jsonl with train records, a reloadable Hugging Face checkpoint
    for d, name in (("step1_sft", "sft"), ("step2_reward", "reward"), ("step3_ppo", "ppo")):
        done = json.loads((out / d / "done.json").read_text())
        assert done["step"] == name and done["metrics"]
        assert [m for m in read_metrics(out / d) if m["kind"] == "train"]
        assert (out / d / "step_config.yaml").is_file() and (out / d / "train.log").stat().st_size > 0
    import torch

    from chatrlhf.models.loading import load_causal_lm, load_tokenizer
    from chatrlhf.models.reward_model import load_reward_model

    ids = load_tokenizer(str(out / "step1_sft"))(" Human: Add 1 and 2. Assistant:", return_tensors="pt")["input_ids"]
    for actor in (out / "step1_sft", out / "step3_ppo" / "actor"):
        assert torch.isfinite(load_causal_lm(str(actor))(input_ids=ids).logits).all()
    for rm in (out / "step2_reward", out / "step3_ppo" / "critic"):
        assert torch.isfinite(load_reward_model(str(rm)).score(ids)).all()
    # PPO read step 1's actor and step 2's critic
    ppo_cfg = (out / "step3_ppo" / "step_config.yaml").read_text()
    assert f"actor_model_name_or_path: {out / 'step1_sft'}" in ppo_cfg
    assert f"critic_model_name_or_path: {out / 'step2_reward'}" in ppo_cfg

    summary = json.loads((out / "summary.json").read_text())
    ev = summary["eval"]
    assert 0.0 <= ev["win_rate_final_vs_sft"] <= 1.0 and 0.0 <= ev["rm_accuracy"] <= 1.0
    assert ev["kl_final_to_sft"] >= 0.0 and ev["n_prompts"] > 0 and ev["samples"]
    # sampled evaluation (temperature 1, several answers per prompt) next to the greedy one
    sm = ev["sampled"]
    assert sm["samples_per_prompt"] >= 2 and 0.0 <= sm["win_rate_final_vs_sft"] <= 1.0
    for who in ("sft", "final"):
        assert sm[who]["n"] == ev["n_prompts"] * sm["samples_per_prompt"] and 0.0 <= sm[who]["gold_mean"] <= 1.0
        assert abs(sum(v for k, v in sm[who].items() if k.startswith("kind_")) - 1.0) < 1e-9
    # step 1 learned from the SFT-only set alone (data_split 0,...), whose flawed targets are mostly fake turns
    assert "data_split: 0,6,4" in (out / "step1_sft" / "step_config.yaml").read_text()
    assert "sampled (T=1" in r.stdout
    assert all(summary["wall_s"][s] > 0 for s in ("sft", "reward", "ppo"))
    assert "gold win-rate of the final actor over the SFT actor" in r.stdout
    report = (out / "report.md").read_text()
    assert "SFT" in report and len(report) > 200

    # rerun from the resolved config: every step is skipped with a log line and nothing in the step dirs changes
    before = _files(out / "step1_sft") | {f"2/{k}": v for k, v in _files(out / "step2_reward").items()} \
        | {f"3/{k}": v for k, v in _files(out / "step3_ppo").items()}
    r2 = run_cli(["train", "--config", str(out / "resolved_config.yaml")], cwd=tmp_path)
    assert r2.returncode == 0, r2.stdout[-3000:]
    for n, name, d in ((1, "sft", "step1_sft"), (2, "reward", "step2_reward"), (3, "ppo", "step3_ppo")):
        assert f"step {n} ({name}): already done ({out / d / 'done.json'}), skipping" in r2.stdout
    assert "starting ->" not in r2.stdout
    after = _files(out / "step1_sft") | {f"2/{k}": v for k, v in _files(out / "step2_reward").items()} \
        | {f"3/{k}": v for k, v in _files(out / "step3_ppo").items()}
    assert after == before


@pytest.mark.slow
def test_killed_train_resumes_step1_from_its_checkpoint(quick_assets, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "chatrlhf", "train", "--actor-model", quick_assets["actor"], "--reward-model",
            quick_assets["reward"], "--data_path", quick_assets["data"], "--output-dir", str(out), "--step", "1",
            "--skip_preflight", "--sft", "{max_steps: 60, save_interval: 5, per_device_train_batch_size: 4, "
            "max_seq_len: 48, skip_bad_rows: true, eval_iters: 1}"]
    # own session: killing its process group takes the pipeline and its step subprocess down together
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = out / "step1_sft" / "checkpoints"
    deadline = time.time() + 240
    try:
        while not list(ckpts.glob("step_*/trainer_state.json")):
            assert proc.poll() is None, "train exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    assert not (out / "step1_sft" / "done.json").exists(), "step 1 finished before it could be interrupted"
    saved = max(int(p.parent.name.split("_")[1]) for p in ckpts.glob("step_*/trainer_state.json"))

    r = subprocess.run(args, cwd=tmp_path, env=cli_env(), text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    # the pipeline saw the checkpoint and the step restored it (its own resume line names the step)
    assert "step 1 (sft): resuming from " in r.stdout
    assert "[sft] resumed from " in r.stdout and f"at step {saved}" in r.stdout
    done = json.loads((out / "step1_sft" / "done.json").read_text())
    assert done["metrics"]["global_step"] == 60
    # after the kill only the steps after the checkpoint were trained again
    redone = sorted(m["step"] for m in read_metrics(out / "step1_sft")
                    if m["kind"] == "train" and m["time"] > killed_at)
    assert redone and redone[0] > saved and redone[-1] == 60
