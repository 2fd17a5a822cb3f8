"""The real-model demo (`chatrlhf demo --model smollm2`, chatrlhf.demo_real) on SmolLM2-135M-Instruct.

One run of the ``small`` size through the CLI (``chatrlhf demo --model smollm2 --size small``, a few minutes): every
phase runs (setup, baseline, sampling, SFT, RM, PPO with verifier evals, final evaluation, report), summary.json /
report.md / the plots have what the report promises, and the verifiers' pass rate on held-out prompts (topics never
trained on) rises from the start model's to the final actor's.
"""

import json

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"model", "size", "sizes", "steps", "data", "eval", "targets", "wall_s"}
EVAL_KEYS = {"scores", "win_rate", "start_loglik_per_token", "kl_final_to_sft", "rm_heldout_pair_accuracy",
             "rm_eval_split_accuracy", "samples", "n_test_seen", "n_test_heldout_types", "final_actor"}


def test_demo_real_small_run_reports_and_raises_the_heldout_pass_rate(tmp_path, smollm2_dir):
    out = tmp_path / "real"
    r = run_cli(["demo", "--model", "smollm2", "--size", "small", "--output_dir", str(out)], cwd=tmp_path,
                timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "targets:" in r.stdout and "pass rate, seen types, greedy" in r.stdout  # the final table

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["size"] == "small"
    ev = summary["eval"]
    assert EVAL_KEYS <= set(ev), set(ev)
    for name in ("start", "sft", "final"):
        s = ev["scores"][name]
        assert {"greedy_seen", "greedy_heldout", "sampled_seen"} <= set(s)
        for key in ("greedy_seen", "greedy_heldout"):
            assert 0.0 <= s[key]["pass_rate"] <= 1.0 and "on_topic_rate" in s[key]
        assert any(k.startswith("pass_rate/") for k in s["greedy_heldout"])
    assert set(ev["win_rate"]) == {"greedy_seen", "greedy_heldout"}
    assert len(summary["targets"]) == 4 and all("met" in v for v in summary["targets"].values())

    # PPO evaluated with the verifiers during RL and kept the best actor by pass rate
    from chatrlhf.metrics import read_metrics

    evals = [m for m in read_metrics(out / "step3_ppo") if m["kind"] == "eval"]
    assert evals and all("pass_rate" in m for m in evals)
    assert (out / "step3_ppo" / "best_actor" / "config.json").is_file()

    report = (out / "report.md").read_text()
    for heading in ("## Targets", "## Pass rate by policy", "## Win-rates, reward model, KL", "## Sample answers",
                    "Step 3: PPO"):
        assert heading in report
    assert (out / "plots" / "pass_rate_by_type.png").is_file() and (out / "plots" / "rl_training.png").is_file()

    # learning, by the verifiers, on held-out prompts of the seen instruction types
    s = ev["scores"]
    start, sft, final = (s[n]["greedy_seen"]["pass_rate"] for n in ("start", "sft", "final"))
    print(f"[demo_real small] pass rate (seen types, held-out prompts): start {start:.3f} sft {sft:.3f} "
          f"final {final:.3f}; wall {summary['wall_s']}", flush=True)
    assert final > start, (start, sft, final)
    assert s["final"]["greedy_seen"]["on_topic_rate"] >= 0.5  # no collapse into answers about nothing
