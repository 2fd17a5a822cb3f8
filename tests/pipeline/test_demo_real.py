"""The real-model demo (`chatrlhf demo --model smollm2`, chatrlhf.apps.demo_real) on SmolLM2-135M-Instruct.

One run of the ``small`` size through the CLI (``chatrlhf demo --model smollm2 --size small``, minutes): every
phase runs (setup, baseline, sampling, SFT, RM, PPO with verifier evals, final evaluation, report), summary.json /
report.md / the plots have what the report promises, and the verifiers' pass rate on held-out prompts (topics never
trained on) rises from the start model's to the final actor's. The same run is the suite's check of the real
pretrained chat model through all three steps: LoRA SFT (merged into the saved checkpoint) whose eval loss falls,
full reward-model and PPO training, and every step's output recording the model's chat template. Plus a fast check
of the reward-model comparisons (``labelled_pairs``, ``heldout_pairs``), which needs no model.
"""

import json

import pytest

from .conftest import run_cli

SUMMARY_KEYS = {"model", "size", "sizes", "steps", "data", "eval", "targets", "wall_s"}
EVAL_KEYS = {"scores", "win_rate", "start_loglik_per_token", "kl_final_to_sft", "rm_heldout_pair_accuracy",
             "rm_eval_split_accuracy", "samples", "n_test_seen", "n_test_heldout_types", "final_actor"}


def _rows(prompt_answers):
    meta = {"topic": "owl", "instructions": [{"type": "include_word", "params": {"word": "simple"}}], "split": "seen"}
    return [{"prompt": f"Tell me about owls ({i}). Use the word \"simple\".", "metadata": meta, "samples": a}
            for i, a in enumerate(prompt_answers)]


def test_labelled_pairs_rank_passing_on_topic_answers_first():
    from chatrlhf.apps.demo_real import dschat, heldout_pairs, labelled_pairs
    from chatrlhf.tasks.instructions import on_topic, passes

    good, bad, off = "Owls are simple birds.", "Owls hunt at night.", "Cats are simple."
    start = _rows([[bad, bad], [good, bad], [good, good]])  # no good answer / one of each / nothing to prefer
    sft = _rows([[good, off, bad], [off]])
    pairs = labelled_pairs({"start": start, "sft": sft}, {"start": (1, 1), "sft": (2, 0)})
    for p in pairs:
        m = p["metadata"]
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")  # as step 2's rows
        assert passes(p["chosen"].strip(), m) and on_topic(p["chosen"].strip(), m)
        assert not (passes(p["rejected"].strip(), m) and on_topic(p["rejected"].strip(), m))
    got = [(p["source"], p["kind"], p["prompt"], p["rejected"].strip()) for p in pairs]
    assert got == [("start", "fixed", dschat(start[0]["prompt"]), bad),
                   ("start", "natural", dschat(start[1]["prompt"]), bad),
                   ("start", "fixed", dschat(start[1]["prompt"]), bad),
                   ("sft", "natural", dschat(sft[0]["prompt"]), bad),
                   ("sft", "natural", dschat(sft[0]["prompt"]), off)]

    # swapped pairs: a source's good answers to other topics, made compliant, under this prompt's good answer
    cats = {"prompt": "Tell me about cats. Use the word \"simple\".",
            "metadata": {**start[0]["metadata"], "topic": "cat"}, "samples": ["Cats are simple pets."]}
    swapped = labelled_pairs({"sft": [cats] + sft}, {"sft": (0, 0, 1)}, seed=3)
    assert [(p["kind"], p["prompt"], p["chosen"].strip(), p["rejected"].strip()) for p in swapped] == [
        ("swap", dschat(cats["prompt"]), "Cats are simple pets.", good),
        ("swap", dschat(sft[0]["prompt"]), good, "Cats are simple pets.")]
    assert swapped == labelled_pairs({"sft": [cats] + sft}, {"sft": (0, 0, 1)}, seed=3)  # seeded

    # crossed pairs: a prompt's answer made compliant with its instructions over the same answer made compliant with
    # another prompt's (of other types)
    upper = {"prompt": "Tell me about owls in capitals.", "samples": ["OWLS HUNT AT NIGHT."],
             "metadata": {**start[0]["metadata"], "instructions": [{"type": "uppercase", "params": {}}]}}
    crossed = labelled_pairs({"sft": [upper] + start}, {"sft": (0, 0, 0, 1)}, seed=3)
    # start[2]'s answer passes its instruction once capitalised too; the others' bad answer is used
    assert [(p["kind"], p["prompt"]) for p in crossed] == [("cross", dschat(r["prompt"])) for r in (upper, *start[:2])]
    assert [(p["chosen"].strip(), p["rejected"].strip()) for p in crossed[:2]] == [
        ("OWLS HUNT AT NIGHT.", "OWLS HUNT AT NIGHT. It is truly simple."),
        ("Owls hunt at night. It is truly simple.", "OWLS HUNT AT NIGHT.")]
    for p, other in zip(crossed, (start[0], upper, upper)):
        c, r = p["chosen"].strip(), p["rejected"].strip()
        assert passes(c, p["metadata"]) and on_topic(c, p["metadata"])
        assert not passes(r, p["metadata"]) and on_topic(r, p["metadata"]) and passes(r, other["metadata"])
    assert crossed == labelled_pairs({"sft": [upper] + start}, {"sft": (0, 0, 0, 1)}, seed=3)  # seeded

    # held-out pairs: the same labeller over each policy's greedy answer and samples on the test prompts
    data = {"test": [{"prompt": r["prompt"], "metadata": r["metadata"]} for r in start]}
    answers = {"start": {"greedy_seen": [bad, good, good], "sampled_seen": [[bad], [bad], [good]]},
               "sft": {"greedy_seen": [good, good, good], "sampled_seen": [[off], [good], [good]]}}
    held = heldout_pairs(data, answers)
    assert [(p["source"], p["kind"], p["prompt"]) for p in held] == [
        ("start", "fixed", dschat(start[0]["prompt"])), ("start", "natural", dschat(start[1]["prompt"])),
        ("start", "fixed", dschat(start[1]["prompt"])), ("sft", "natural", dschat(start[0]["prompt"]))]


@pytest.mark.slow
@pytest.mark.heavy  # minutes: the real model trained by every step
def test_demo_real_small_run_reports_and_raises_the_heldout_pass_rate(tmp_path, smollm2_dir):
    out = tmp_path / "real"
    r = run_cli(["demo", "--model", "smollm2", "--size", "small", "--output_dir", str(out)], cwd=tmp_path,
                timeout=1200)
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
    # step 2's comparisons come from both the start model's and the SFT actor's samples; the held-out ones too
    assert summary["data"]["rm_pairs"] == sum(v for k, v in summary["data"].items() if k.startswith("rm_pairs_"))
    assert summary["data"]["rm_pairs_sft_natural"] + summary["data"]["rm_pairs_sft_fixed"] > 0
    assert (out / "data" / "sft_samples.json").is_file() and "sample_sft" in summary["wall_s"]
    groups = ev["rm_heldout_pairs"]["by_group"]
    assert sum(groups[k]["pairs"] for k in groups if k.startswith("kind=")) == ev["rm_heldout_pairs"]["pairs"] > 0

    # the real chat model through the three steps, its chat template recorded by each one's output
    from chatrlhf.trainers.metrics import read_metrics

    for d in ("step1_sft", "step2_reward", "step3_ppo/actor", "step3_ppo/best_actor"):
        rec = json.loads((out / d / "chatrlhf_config.json").read_text())["chat_format"]
        assert rec["name"] == "chat" and len(rec["sha256"]) == 16, (d, rec)
    sft_cfg = json.loads((out / "step1_sft" / "chatrlhf_config.json").read_text())
    assert (out / "step1_sft" / "model.safetensors").is_file() and "lora" not in json.dumps(
        json.loads((out / "step1_sft" / "config.json").read_text())).lower()  # LoRA merged: a plain HF folder
    assert sft_cfg["lora_dim"] == 16 and sft_cfg["only_optimize_lora"] is True
    eval_loss = [m["eval_loss"] for m in read_metrics(out / "step1_sft") if m["kind"] == "eval"]
    assert len(eval_loss) >= 2 and min(eval_loss[1:]) < eval_loss[0], eval_loss

    # PPO evaluated with the verifiers during RL and kept the best actor by pass rate

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
