"""`chatrlhf report`: report.md + plots from synthetic run dirs, with and without missing steps."""

import json

import pytest
from apps_helpers import write_metrics

from chatrlhf.apps.report import write_report
from chatrlhf.cli import main as cli


def _full_run(run):
    write_metrics(run / "step1_sft" / "metrics.jsonl", [
        *({"kind": "train", "step": s, "time": 1.0, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)),
        {"kind": "eval", "step": 0, "time": 1.0, "eval_loss": 3.1, "perplexity": 22.2},
        {"kind": "eval", "step": 10, "time": 2.0, "eval_loss": 2.0, "perplexity": 7.39},
        {"kind": "throughput", "step": 10, "time": 2.0, "latency_s": 0.2, "tflops": 0.01, "samples_per_s": 40.0},
    ])
    (run / "step1_sft" / "done.json").write_text(json.dumps({"step": "sft", "metrics": {"eval_loss": 2.0}}))
    lines = (run / "step1_sft" / "metrics.jsonl").read_text()
    (run / "step1_sft" / "metrics.jsonl").write_text(lines + '{"kind": "train", "st')  # torn last line
    write_metrics(run / "step2_reward" / "metrics.jsonl", [
        {"kind": "eval", "step": 0, "accuracy": 0.5, "chosen_score": 0.0, "rejected_score": 0.0},
        {"kind": "eval", "step": 20, "accuracy": 0.9, "chosen_score": 1.5, "rejected_score": -0.5},
    ])
    write_metrics(run / "step3_ppo" / "metrics.jsonl", [
        {"kind": "train", "step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "response_length": 20 - s,
         "ema_reward": 0.05 * s, "actor_loss": "nan"} for s in range(1, 6)
    ] + [{"kind": "eval", "step": s, "pass_rate": 0.1 * s, "pass_rate/lowercase": 0.2, "rm_score": s,
          "response_length": 9} for s in (0, 2, 4)])
    (run / "summary.json").write_text(json.dumps({"wall_s": {"sft": 10.0, "ppo": 30.0}, "eval": {
        "n_prompts": 2, "gold_sft": 0.4, "gold_final": 0.8, "pass_sft": 0.25, "pass_final": 0.75,
        "kinds_sft": {"clean": 0.25, "ramble": 0.75}, "kinds_final": {"clean": 0.75, "ramble": 0.25},
        "rm_accuracy": 0.9, "kl_final_to_sft": 0.12,
        "samples": [{"prompt": " Human: Add 3 and 4. Assistant:", "expected": " 7", "sft": " 7 I hope | this helps",
                     "final": " 7", "gold_sft": 0.6, "gold_final": 1.0}]}}))
    (run / "resolved_config.yaml").write_text("actor_model_name_or_path: tiny\nzero_stage: 2\n")


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_full_report_sections_and_plots(tmp_path):
    run = tmp_path / "run"
    _full_run(run)
    path = write_report(run)
    md = path.read_text()
    for heading in ("## Before / after: SFT actor vs final actor", "## Step 1: supervised fine-tuning",
                    "## Step 2: reward model", "## Step 3: RLHF with PPO", "## Throughput", "## Resolved config",
                    "### Sample answers"):
        assert heading in md, heading
    for png in ("sft_loss.png", "reward_accuracy.png", "ppo_curves.png", "ppo_eval.png", "throughput.png"):
        assert f"](plots/{png})" in md
        data = (run / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "| gold | 0.4 | 0.8 |" in md and "| pass | 0.25 | 0.75 |" in md and "| kinds: clean | 0.25 | 0.75 |" in md
    assert "reward model held-out accuracy: **0.9**" in md
    assert "7 I hope \\| this helps" in md  # pipes in answers do not break the table
    assert "zero_stage: 2" in md
    assert "Status: **finished**" in md and "incomplete" in md  # SFT has done.json; the others do not
    # idempotent: regenerating gives the same files
    before = {p.name: p.read_bytes() for p in (run / "plots").iterdir()}
    assert cli(["report", str(run)]) == 0
    assert path.read_text() == md
    assert {p.name: p.read_bytes() for p in (run / "plots").iterdir()} == before


def test_report_with_missing_steps(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "step1_sft" / "metrics.jsonl", [{"kind": "train", "step": 1, "loss": 2.0}])
    md = write_report(run).read_text()
    assert "## Step 1: supervised fine-tuning" in md and "](plots/sft_loss.png)" in md
    assert "_not run (no `step2_reward/metrics.jsonl`)._" in md and "_not run (no `step3_ppo/metrics.jsonl`)._" in md
    assert "Before / after" not in md and "Resolved config" not in md and "throughput.png" not in md
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["sft_loss.png"]


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_report_removes_stale_plots_and_rejects_non_run_dirs(tmp_path, capsys):
    run = tmp_path / "run"
    _full_run(run)
    write_report(run)
    (run / "step3_ppo" / "metrics.jsonl").unlink()
    md = write_report(run).read_text()
    assert not (run / "plots" / "ppo_curves.png").exists() and "ppo_curves.png" not in md
    assert cli(["report", str(tmp_path / "empty_does_not_exist")]) == 2
    (tmp_path / "plain").mkdir()
    assert cli(["report", str(tmp_path / "plain")]) == 2
    assert "does not look like a run directory" in capsys.readouterr().err
