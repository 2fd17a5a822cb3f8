"""PPO's guards on real runs: a learning-rate blow-up stops with the reason (not an IndexError in the sampler) and
keeps the last good checkpoint; answers whose length collapses (all empty, or all cut at the limit) stop the run;
neither marks the step done. Critic-free algorithms log no critic."""

import json
from pathlib import Path

import pytest
import torch

from chatrlhf.errors import UserError
from chatrlhf.trainers.ppo.trainer import PPOConfig, run_ppo


def _argv(cfg: PPOConfig, **kw) -> list[str]:
    """The command line for ``chatrlhf ppo`` equivalent to the fixture's config plus ``kw``."""
    args = {"actor_model_name_or_path": cfg.actor_model_name_or_path,
            "critic_model_name_or_path": cfg.critic_model_name_or_path, "data_path": cfg.data_path[0],
            "data_split": cfg.data_split, "data_output_path": cfg.data_output_path, "output_dir": cfg.output_dir,
            "per_device_generation_batch_size": 4, "per_device_training_batch_size": 2, "max_prompt_seq_len": 32,
            "max_answer_seq_len": 8, "dtype": "fp32", "resume": "never", "seed": 7, **kw}
    return ["ppo", "--skip_bad_rows"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_learning_rate_blow_up_stops_in_one_line_with_exit_2(ppo_cfg, capsys):
    """--actor_learning_rate 1e12: the first update leaves finite weights (~1e12) whose logits are inf/NaN; the next
    generation used to die in the sampler. Now: exit 2, one line with the reason, nothing marked done or saved."""
    from chatrlhf.cli import main as cli_main

    cfg = ppo_cfg()
    assert cli_main(_argv(cfg, actor_learning_rate=1e12, max_steps=3)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "non-finite actor logits after the update of step 1" in err[0], err
    assert "no checkpoint was saved before it" in err[0] and "done.json not written" in err[0]
    out = Path(cfg.output_dir)
    assert not (out / "done.json").exists() and not (out / "actor").exists()  # nothing non-finite is published


def test_blow_up_after_good_steps_keeps_the_last_good_checkpoint_which_resumes(ppo_cfg):
    # a one-step warmup from 0: step 1 runs at lr 0 (a good step), step 2 at 1e12 (the blow-up)
    flags = dict(actor_learning_rate=1e12, lr_scheduler_type="constant_with_warmup", num_warmup_steps=1,
                 per_device_training_batch_size=4, save_interval=1)
    with pytest.raises(UserError) as e:
        run_ppo(ppo_cfg(max_steps=4, **flags))
    bad = ppo_cfg(**flags)
    msg = str(e.value)
    out = Path(bad.output_dir)
    assert "\n" not in msg and "non-finite actor logits after the update of step 2" in msg, msg
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_1'}" in msg, msg
    assert not (out / "done.json").exists() and not (out / "actor").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1"]  # nothing saved after the blow-up
    # the kept checkpoint is sound: resumed as a run of that length, its actor is published and gives finite logits
    res = run_ppo(ppo_cfg(max_steps=1, resume="auto", **flags))
    assert res["steps"] == 1 and (out / "done.json").exists()
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(out / "actor", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.isfinite(actor(torch.randint(5, 500, (2, 12))).logits).all()


def test_answers_all_cut_at_the_limit_stop_the_run(ppo_cfg):
    # the tiny untrained actor never ends an answer within 8 tokens (greedy): every batch is "all at max length"
    cfg = ppo_cfg(temperature=0, length_guard_steps=2, max_steps=5)
    with pytest.raises(UserError, match=r"answer length collapsed: every answer ran to --max_answer_seq_len 8 "
                                        r"without an end-of-text token in 2 consecutive generation batches"):
        run_ppo(cfg)
    out = Path(cfg.output_dir)
    assert not (out / "done.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["kind"] == "train") == 1  # stopped before training on batch 2
    assert (out / "actor" / "model.safetensors").exists()  # finite weights stay for inspection
    # fixed-length generation (--min_new_tokens = --max_answer_seq_len) is not a collapse
    fixed = ppo_cfg(temperature=0, length_guard_steps=2, max_steps=3, min_new_tokens=8,
                    output_dir=str(out.parent / "fixed"))
    assert run_ppo(fixed)["steps"] == 3


def test_length_guard_counts_consecutive_batches_of_one_kind():
    from chatrlhf.engine import DeepSpeedStrategy
    from chatrlhf.trainers.ppo.trainer import RunState, _length_guard

    s = DeepSpeedStrategy(dtype="fp32")  # one process: the all-reduce is the identity
    cfg = PPOConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", max_answer_seq_len=16,
                    length_guard_steps=3, length_guard_min_tokens=2)
    state = RunState()

    def batch(lengths, cut=0):
        return _length_guard(state, cfg, {"answer_tokens": torch.tensor(lengths), "truncated": cut}, s)

    assert batch([1, 2, 2]) == "" and batch([2, 1, 1]) == ""
    assert batch([16, 16, 16], cut=3) == ""  # another kind of collapse starts its own count
    assert batch([1, 1, 1]) == "" and batch([1, 2, 1]) == ""
    assert batch([1, 5, 1]) == "" and state.length_streak == 0  # one real answer resets the count
    assert batch([16, 16, 9], cut=2) == ""  # most, not all, at the limit
    for _ in range(2):
        assert batch([2, 2, 1]) == ""
    assert batch([1, 1, 1]).startswith("answer length collapsed: every answer had at most 2 token(s) in 3 "
                                       "consecutive generation batches")
    # lengths the flags force never count
    state = RunState()
    one = PPOConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", max_answer_seq_len=1,
                    length_guard_steps=1)
    assert _length_guard(state, one, {"answer_tokens": torch.tensor([1, 1]), "truncated": 0}, s) == ""
    fixed = PPOConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", max_answer_seq_len=8,
                      min_new_tokens=8, length_guard_steps=1)
    assert _length_guard(state, fixed, {"answer_tokens": torch.tensor([8, 8]), "truncated": 2}, s) == ""
    off = PPOConfig(actor_model_name_or_path="a", critic_model_name_or_path="c", length_guard_steps=0)
    assert _length_guard(state, off, {"answer_tokens": torch.tensor([1, 1]), "truncated": 0}, s) == ""


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_runs_log_no_critic(ppo_cfg, capsys, algo):
    cfg = ppo_cfg(algo=algo, num_samples_per_prompt=2, per_device_generation_batch_size=2, max_steps=1)
    res = run_ppo(cfg)
    text = capsys.readouterr().out
    assert "critic" not in text.lower(), [ln for ln in text.splitlines() if "critic" in ln.lower()]
    assert f"step 3 ({algo})" in text and "actor ZeRO-0, reward model ZeRO-0 *****" in text
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and not any(k in r for r in train for k in ("critic_loss", "vf_clipfrac", "value_error"))
    assert "critic_loss" not in res and "actor_loss" in res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_check_finds_one_nan_or_inf_and_passes_large_finite_sums(dtype):
    """The guard's weight check is one sum per weight: one NaN or Inf anywhere fails it; finite weights whose fp16
    sum would overflow (65504) pass, because fp16 sums in fp32."""
    from chatrlhf.trainers.ppo.experience import _params_finite

    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(400, 300)).to(dtype)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # 120,000 ones: beyond fp16's range as a sum
    assert _params_finite(model)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with torch.no_grad():
            saved = model[1].bias[7].item()
            model[1].bias[7] = bad
        assert not _params_finite(model), bad
        with torch.no_grad():
            model[1].bias[7] = saved
    assert _params_finite(model)
