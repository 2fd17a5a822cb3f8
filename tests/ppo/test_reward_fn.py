"""--reward_fn / --eval_fn: loading by name, checked calls (the row and the message on failure), and wiring into
step 3 (alone, added to the reward model with weights, metadata passed through)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatrlhf.errors import UserError
from chatrlhf.trainers.ppo.rewards import Scorer, call_eval_fn, call_reward_fn, load_function


def test_load_by_module_and_by_file(tmp_path):
    assert load_function("chatrlhf.tasks.builtin:reward", "--reward_fn").__name__ == "reward"
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompts, answers, metas):\n    return [len(a) for a in answers]\n")
    fn = load_function(f"{f}:length", "--reward_fn")
    assert fn(["p"], ["abc"], [{}]) == [3]


@pytest.mark.parametrize("spec,match", [
    ("chatrlhf.tasks.builtin", "expected module:function"),
    ("chatrlhf.tasks.builtin:no_such_fn", "has no function 'no_such_fn'"),
    ("no_such_module_xyz:fn", "importing no_such_module_xyz failed"),
    ("/nonexistent/r.py:fn", "no such file"),
])
def test_load_errors_name_the_flag(spec, match):
    with pytest.raises(UserError, match=match) as e:
        load_function(spec, "--reward_fn")
    assert "--reward_fn" in str(e.value) and "\n" not in str(e.value)


def test_a_raising_function_names_its_row():
    def fn(prompts, answers, metas):
        return [1.0 / len(a) for a in answers]  # ZeroDivisionError on an empty answer

    with pytest.raises(UserError, match=r"row 1 \(prompt 'q2'\): raised ZeroDivisionError"):
        call_reward_fn(fn, "m:fn", "--reward_fn", ["q1", "q2"], ["ok", ""], [{}, {}])


@pytest.mark.parametrize("value,match", [(math.nan, "non-finite"), (math.inf, "non-finite")])
def test_non_finite_values_name_the_row(value, match):
    with pytest.raises(UserError, match=rf"row 1 .*{match}"):
        call_reward_fn(lambda p, a, m: [0.0, value], "m:fn", "--reward_fn", ["a", "b"], ["x", "y"], [{}, {}])


def test_wrong_shapes_and_types_are_refused():
    with pytest.raises(UserError, match="returned 1 values for 2 answers"):
        call_reward_fn(lambda p, a, m: [0.0], "m:fn", "--reward_fn", ["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(UserError, match="one number per answer"):
        call_reward_fn(lambda p, a, m: None, "m:fn", "--reward_fn", ["a"], ["x"], [{}])
    with pytest.raises(UserError, match="must return a dict"):
        call_eval_fn(lambda p, a, m: [1.0], "m:ev", ["a"], ["x"], [{}])
    assert call_eval_fn(lambda p, a, m: {"acc": 1}, "m:ev", ["a"], ["x"], [{}]) == {"acc": 1.0}


def test_scorer_weights_and_decoded_answers(tiny_model_dir):
    from chatrlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    seen = {}

    def fn(prompts, answers, metas):
        seen.update(prompts=prompts, answers=answers, metas=metas)
        return [float(len(a)) for a in answers]

    prompt = tok(" Human: hi Assistant:")["input_ids"]
    answer = tok(" cat dog", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seq = torch.tensor([prompt + answer])
    mask = torch.ones_like(seq)
    score, parts = Scorer(tok, fn=fn, spec="t:fn", fn_weight=0.5)(seq, mask, len(prompt), ["P"], [{"k": 1}])
    assert seen == {"prompts": ["P"], "answers": ["cat dog"], "metas": [{"k": 1}]}
    assert score.tolist() == [3.5] and parts["fn_score"].tolist() == [7.0] and "rm_score" not in parts


def _write_fn(tmp_path, body: str) -> str:
    f = tmp_path / "fns.py"
    f.write_text(body)
    return str(f)


def test_ppo_with_reward_fn_alone_passes_metadata(ppo_cfg, tmp_path, task_data_dir):
    """GRPO with no reward model: the function sees every row's prompt text and metadata; its score is the reward."""
    from chatrlhf.trainers.metrics import read_metrics
    from chatrlhf.trainers.ppo.trainer import run_ppo

    rows = json.loads((task_data_dir / "data" / "train.json").read_text())[:24]
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    with open(prompts_dir / "train.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"prompt": r["prompt"], "metadata": {"i": i, "prompt": r["prompt"]}}) + "\n")
    log = tmp_path / "calls.jsonl"
    path = _write_fn(tmp_path, f"""
import json
def check(prompts, answers, metas):
    with open({str(log)!r}, "a") as f:
        for p, m in zip(prompts, metas):
            f.write(json.dumps({{"ok": m["prompt"] == p, "i": m["i"]}}) + "\\n")
    return [0.25] * len(answers)
""")
    cfg = ppo_cfg(algo="grpo", num_samples_per_prompt=2, critic_model_name_or_path="",
                  reward_model_name_or_path="none", reward_fn=f"{path}:check", reward_fn_weight=2.0,
                  data_path=[str(prompts_dir)], data_split="0,0,1")
    summary = run_ppo(cfg)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert calls and all(c["ok"] for c in calls)  # texts and metadata belong to the same row
    train = [r for r in read_metrics(cfg.output_dir) if r["kind"] == "train"]
    assert [r["fn_score"] for r in train] == [0.25, 0.25]
    assert [r["reward_mean"] for r in train] == [0.5, 0.5]  # weight 2 x 0.25, nothing else
    assert summary["steps"] == 2


def test_ppo_reward_fn_added_to_the_reward_model(ppo_cfg):
    from chatrlhf.trainers.metrics import read_metrics
    from chatrlhf.trainers.ppo.trainer import run_ppo

    cfg = ppo_cfg(reward_fn="chatrlhf.tasks.builtin:reward", reward_model_weight=0.5, max_steps=1)
    run_ppo(cfg)
    r = [r for r in read_metrics(cfg.output_dir) if r["kind"] == "train"][0]
    assert r["reward_mean"] == pytest.approx(0.5 * r["rm_score"] + r["fn_score"], abs=1e-5)


def test_ppo_stops_on_a_raising_reward_fn_with_the_row(ppo_cfg, tmp_path):
    from chatrlhf.trainers.ppo.trainer import run_ppo

    path = _write_fn(tmp_path, "def bad(prompts, answers, metas):\n    raise ValueError('verifier broke')\n")
    with pytest.raises(UserError, match=r"--reward_fn .*bad: row 0 \(prompt .*\): raised ValueError: verifier broke"):
        run_ppo(ppo_cfg(reward_fn=f"{path}:bad", max_steps=1))


@pytest.mark.parametrize("kw,match", [
    (dict(reward_model_name_or_path="none"), "needs a --reward_fn"),
    (dict(save_best_by="pass_rate"), "needs --eval_interval"),
    (dict(reward_fn="chatrlhf.tasks.builtin:nope"), "has no function"),
    (dict(eval_fn="nomod_zz:f", eval_interval=1), "importing nomod_zz failed"),
    (dict(reward_model_weight=0.0), "nothing to reward"),
])
def test_config_errors(ppo_cfg, kw, match):
    with pytest.raises(UserError, match=match):
        ppo_cfg(**kw).validate()


def test_eval_interval_logs_and_best_checkpoint(ppo_cfg, tmp_path):
    """Eval at step 0 and every N steps; --save_best_by with an unknown metric names the ones there are."""
    from chatrlhf.trainers.metrics import read_metrics
    from chatrlhf.trainers.ppo.trainer import run_ppo

    cfg = ppo_cfg(eval_interval=1, eval_samples=4, eval_fn="chatrlhf.tasks.builtin:evaluate", save_best_by="gold_mean")
    summary = run_ppo(cfg)
    evals = [r for r in read_metrics(cfg.output_dir) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert {"gold_mean", "gold_pass", "rm_score", "response_length"} <= set(evals[0])
    best = json.loads((tmp_path / "out" / "best_actor" / "chatrlhf_config.json").read_text())
    assert best["best_value"] == max(r["gold_mean"] for r in evals) == summary["best_eval"]
    with pytest.raises(UserError, match="no eval metric 'nope'"):
        run_ppo(ppo_cfg(eval_interval=1, eval_samples=4, save_best_by="nope", output_dir=str(tmp_path / "o2")))
