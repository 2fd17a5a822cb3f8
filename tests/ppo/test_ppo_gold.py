"""Step 3 improves the actor as the gold scorer measures it (the project's PPO issue: RLHF must *learn*).

A small version of the demo, in one process: the built-in task with an SFT set whose flawed targets mostly go on
with a fake next turn (DeepSpeed-Chat's typical SFT flaw), one tiny pretrained base, step 1 (SFT on that set only),
step 2 (reward model on gold-ordered pairs), then short PPO / GRPO / RLOO runs. Each must raise the mean gold score
of greedy answers above the SFT actor's, on held-out prompts (task items never seen in training) and on seen
questions (SFT-set items), and must at least halve the share of answers that go on with a fake turn.

Measured (2-core CPU, fixed seeds, identical on reruns; ~65 s for the file), mean greedy gold SFT -> final:
  held-out (40 prompts): ppo 0.149 -> 0.264, grpo -> 0.257, rloo -> 0.265   (gain ~+0.11; asserted > +0.05)
  seen (60 prompts):     ppo 0.215 -> 0.490, grpo -> 0.430, rloo -> 0.442   (gain +0.22..0.28; asserted > +0.1)
  fake turns on seen prompts: 42% -> 0..3%. Held-out gains are capped: most held-out answers are wrong (unseen
  items), which no reward model trained on other items can judge; what RLHF fixes is the fake turn.
"""

import json

import pytest

from chatrlhf.tasks.builtin import gold_summary, read_heldout, write_task_dataset

pytestmark = pytest.mark.slow

TASK = dict(seed=1234, n_sft=1200, n_pairs=1600, n_eval=200, n_heldout=40, noise=0.35, sft_noise=0.7, n_corpus=3000)
BASE = dict(hidden=96, layers=3, heads=4, vocab=512, max_positions=96)
PRETRAIN_STEPS = 200
MAX_NEW_TOKENS = 16
# Gold gain (final - SFT, greedy) each algorithm must beat per prompt set; about half the measured gains (above).
MARGINS = {"heldout": 0.05, "seen": 0.1}


def greedy_gold(model_dir, prompt_sets: dict) -> dict:
    """gold_summary of greedy answers per prompt set."""
    from chatrlhf.apps.demo import _load_actor, greedy_answers

    model, tok = _load_actor(model_dir)
    out = {}
    for name, prompts in prompt_sets.items():
        ids = greedy_answers(model, tok, prompts, MAX_NEW_TOKENS)
        out[name] = gold_summary(prompts, [tok.decode(a, skip_special_tokens=True) for a in ids])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Task data, a pretrained tiny base, the SFT actor and the reward model; returns paths and the SFT gold."""
    import torch

    from chatrlhf.apps.demo import pretrain
    from chatrlhf.models.tiny import build_tiny_model
    from chatrlhf.trainers.reward import RewardConfig, run_reward
    from chatrlhf.trainers.sft import SFTConfig, run_sft
    from chatrlhf.tasks.builtin import task_corpus

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_gold")
    paths = write_task_dataset(root / "task", **TASK)
    corpus = task_corpus(TASK["seed"], TASK["n_corpus"])
    base = pretrain(build_tiny_model("opt", root / ".base-random", corpus=corpus, seed=1, **BASE), root / "base",
                    corpus, steps=PRETRAIN_STEPS, seed=1)
    data = dict(data_path=[str(paths["root"] / "data")], data_split="0,6,4", skip_bad_rows=True,
                data_output_path=str(root / "cache"), seed=1234, resume="never")
    run_sft(SFTConfig(model_name_or_path=str(base), sft_only_data_path=[str(paths["sft_root"] / "data")],
                      output_dir=str(root / "sft"), max_steps=100, per_device_train_batch_size=16, max_seq_len=80,
                      learning_rate=3e-4, num_warmup_steps=5, lr_scheduler_type="cosine", log_interval=50, **data))
    run_reward(RewardConfig(model_name_or_path=str(base), output_dir=str(root / "rm"), max_steps=60,
                            per_device_train_batch_size=16, max_seq_len=80, learning_rate=3e-4, weight_decay=0.1,
                            log_interval=30, **data))
    # held-out: task items never seen in training; seen: 60 SFT-set questions (items the actor knows)
    sft_rows = json.loads(paths["sft_train"].read_text())
    prompts = {"heldout": [h["prompt"] for h in read_heldout(paths["heldout"])],
               "seen": list(dict.fromkeys(r["prompt"] for r in sft_rows))[:60]}
    gold = greedy_gold(root / "sft", prompts)
    print(f"[ppo_gold] SFT: {json.dumps(gold)}", flush=True)
    return {"root": root, "data": data, "sft": root / "sft", "rm": root / "rm", "prompts": prompts, "gold_sft": gold}


def run_algo(trained, algo: str, name: str = "", **kw) -> float:
    from chatrlhf.trainers.ppo.trainer import PPOConfig, run_ppo

    out = trained["root"] / f"ppo_{name or algo}"
    kw = {"critic_model_name_or_path": str(trained["rm"]), **trained["data"], **kw}
    cfg = PPOConfig(actor_model_name_or_path=str(trained["sft"]), output_dir=str(out), algo=algo,
                    max_prompt_seq_len=32, max_answer_seq_len=MAX_NEW_TOKENS, actor_learning_rate=2e-5,
                    critic_learning_rate=2e-4, kl_ctl=0.1, log_interval=20, **kw)
    res = run_ppo(cfg)
    assert not res.get("stopped_reason") and res["steps"] == cfg.max_steps, res
    actor = out / "actor" if (out / "actor" / "config.json").is_file() else out
    gold = greedy_gold(actor, trained["prompts"])
    print(f"[ppo_gold] {algo}: {json.dumps(gold)}", flush=True)
    for name in gold:
        print(f"[ppo_gold] {algo} {name}: gold {trained['gold_sft'][name]['gold_mean']:.3f} -> {gold[name]['gold_mean']:.3f}"
              f", fake turns {trained['gold_sft'][name]['kind_fake_turn']:.0%} -> {gold[name]['kind_fake_turn']:.0%}",
              flush=True)
    return gold


def test_sft_actor_has_the_fake_turn_flaw(trained):
    # the premise: SFT leaves room that the reward model can see (fake next turns cost gold)
    sft = trained["gold_sft"]
    assert sft["seen"]["kind_fake_turn"] > 0.25 and sft["seen"]["gold_pass"] < 0.3, sft
    assert sft["heldout"]["gold_mean"] < 0.5, sft


def check_gain(trained, gold):
    sft = trained["gold_sft"]
    for name, margin in MARGINS.items():
        assert gold[name]["gold_mean"] > sft[name]["gold_mean"] + margin, (name, sft[name], gold[name])
    assert gold["seen"]["kind_fake_turn"] < sft["seen"]["kind_fake_turn"] / 2, (sft["seen"], gold["seen"])


def test_ppo_raises_gold(trained):
    check_gain(trained, run_algo(trained, "ppo", max_steps=60, per_device_generation_batch_size=16,
                                 per_device_training_batch_size=16))


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_algorithms_raise_gold(trained, algo):
    check_gain(trained, run_algo(trained, algo, num_samples_per_prompt=4, max_steps=40,
                                 per_device_generation_batch_size=8, per_device_training_batch_size=16))


# The critic-free variants the field now uses, each raising gold like the rest: REINFORCE++ and its group-baseline
# form; GRPO with Dr. GRPO's length-unbiased loss, with DAPO's clip-higher, and with equal-reward groups dropped.
VARIANTS = {
    "reinforce_pp": dict(algo="reinforce_pp"),
    "reinforce_pp_baseline": dict(algo="reinforce_pp_baseline"),
    "grpo-dr_grpo_loss": dict(algo="grpo", loss_agg="seq_mean_token_sum_norm"),
    # two epochs over each batch: the second is off-policy, so the (asymmetric) clip is active
    "grpo-clip_higher": dict(algo="grpo", cliprange_high=0.28, ppo_epochs=2),
    # scores clipped to +-1 often tie within a group: those groups must be dropped (asserted below)
    "grpo-drop_uniform_groups": dict(algo="grpo", drop_uniform_groups=True, clip_reward_value=1.0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_modern_critic_free_variants_raise_gold(trained, variant):
    kw = dict(VARIANTS[variant])
    algo = kw.pop("algo")
    check_gain(trained, run_algo(trained, algo, name=variant, num_samples_per_prompt=4, max_steps=40,
                                 per_device_generation_batch_size=8, per_device_training_batch_size=16, **kw))
    if kw.get("drop_uniform_groups"):
        from chatrlhf.trainers.metrics import read_metrics

        rows = [r for r in read_metrics(trained["root"] / f"ppo_{variant}") if r["kind"] == "train"]
        assert sum(r["uniform_dropped"] for r in rows) > 0, "no equal-reward group was ever dropped"


def test_gold_scorer_as_the_only_reward_with_eval_and_best_checkpoint(trained):
    """--reward_fn alone (no reward model): GRPO on the gold scorer raises gold; --eval_interval logs the gold
    summary of greedy held-out answers, and --save_best_by keeps the best of them as best_actor."""
    from chatrlhf.trainers.metrics import read_metrics

    gold = run_algo(trained, "grpo", name="reward_fn", num_samples_per_prompt=4, max_steps=30,
                    per_device_generation_batch_size=8, per_device_training_batch_size=16,
                    critic_model_name_or_path="", reward_model_name_or_path="none",
                    reward_fn="chatrlhf.tasks.builtin:reward", eval_fn="chatrlhf.tasks.builtin:evaluate", eval_interval=10,
                    eval_samples=32, save_best_by="gold_mean")
    # measured gains: held-out +0.065 and +0.048, seen +0.110 (0.168 -> 0.233, 0.173 -> 0.221, 0.227 -> 0.337);
    # asserted, as for the other algorithms, about half of them
    for name, margin in {"heldout": 0.025, "seen": 0.05}.items():
        assert gold[name]["gold_mean"] > trained["gold_sft"][name]["gold_mean"] + margin, (name, gold[name])
    out = trained["root"] / "ppo_reward_fn"
    rows = read_metrics(out)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert all("fn_score" in r and "rm_score" not in r for r in train)
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["gold_mean"] > evals[0]["gold_mean"], evals  # greedy held-out gold rose during RL
    best = json.loads((out / "best_actor" / "chatrlhf_config.json").read_text())
    assert best["best_value"] == max(r["gold_mean"] for r in evals) and best["best_step"] > 0
