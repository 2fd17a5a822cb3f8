"""``chatrlhf demo``: the embedded default. Tiny models + the built-in task, all three steps on a CPU in minutes.

1. Assets (OUTPUT/assets): the built-in task's data (chatrlhf.tasks.builtin.write_task_dataset) and two tiny models with
   one locally trained tokenizer (chatrlhf.models.tiny), the actor base and the smaller reward-model base, each
   briefly pretrained (plain torch LM loss) on the task corpus - DeepSpeed-Chat starts from pretrained models,
   and a random reward-model body cannot learn preferences from a thousand pairs (held-out accuracy ~55% vs
   ~80% pretrained). The corpus covers every task item with answers of every quality (the models' "world
   knowledge"); the held-out prompts never occur in the SFT, reward or PPO data.
2. Steps 1 -> 2 -> 3 through ``chatrlhf train``'s run_train, with the demo's tuned per-step settings.
   Step 1 learns from the SFT-only set alone (data_split 0,6,4), whose flawed targets mostly go on with a fake
   next turn (DeepSpeed-Chat's typical SFT flaw); the reward model learns from gold-ordered pairs; PPO gets the
   pairs' prompts and mostly has to learn to stop (EOS) instead of starting a " Human:" turn.
3. Evaluation on held-out prompts (task items never seen in training): greedy answers (and ``eval_samples``
   temperature-1 samples per prompt) of the SFT actor and of the final (PPO) actor scored by the gold scorer,
   the gold win-rate of final over SFT (greedy; sampled: per-prompt means), the reward model's
   accuracy on held-out preference pairs, the KL of the final actor to the SFT actor (mean per answer token
   of the final actor's greedy answers), and a few answers side by side.
4. OUTPUT/summary.json, a before/after table on the terminal, OUTPUT/report.md.

``--quick`` shrinks every budget (tests use it); the numbers it gives are not meant to show learning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from chatrlhf.apps.demo_real import main_real
from chatrlhf.apps.pipeline import TrainPipelineConfig, _pop_section_flags, run_train, write_run_report
from chatrlhf.config import Check, parse_config
from chatrlhf.models.loading import load_causal_lm, load_tokenizer, max_positions
from chatrlhf.models.tiny import build_tiny_model
from chatrlhf.tasks.builtin import (classify_answer, gold_score, gold_summary, gold_win_rate, read_heldout, task_corpus,
                                    write_task_dataset)
from chatrlhf.utils import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    output_dir: str = field(default="demo_out", metadata={"help": "Run dir (assets/, step1_sft/, ..., summary.json)."})
    quick: bool = field(default=False, metadata={
        "help": "A much shorter run (tiny budgets, few eval prompts) for tests; shows the machinery, not learning."})
    model: str = field(default="tiny", metadata={
        "help": "tiny: the embedded demo (tiny models, built-in task); smollm2: the real-model demo (SmolLM2-135M-"
                "Instruct learns verifiable instructions; chatrlhf.apps.demo_real), output in demo_real_out by default.",
        "check": Check(choices=("tiny", "smollm2"))})
    size: str = field(default="full", metadata={
        "help": "--model smollm2 only: full (the demo, ~30-40 min on 2 cores) or small (a few minutes: the pipeline "
                "at a reduced size, as the slow test runs it); --quick is smaller still.",
        "check": Check(choices=("full", "small"))})
    family: str = field(default="opt", metadata={"help": "Tiny model family: opt, llama, gpt_neox, bloom, gpt2."})
    seed: int = field(default=1234, metadata={"help": "Seed for data, models and training."})
    deployment_type: str = field(default="cpu", metadata={
        "help": "Passed to chatrlhf train: cpu | single_gpu | single_node."})
    threads: int = field(default=0, metadata={
        "help": "torch/OpenMP threads per process (0: 1 for the tiny demo, every core for --model smollm2). Tiny "
                "models are latency-bound: one thread is as fast as two on an idle 2-core CPU and ~20x faster when "
                "other processes compete for the cores (OpenMP spin-waits)."})
    n_eval_prompts: int = field(default=40, metadata={"help": "Held-out prompts for the before/after evaluation."})
    n_samples: int = field(default=6, metadata={"help": "Answers shown side by side."})
    max_new_tokens: int = field(default=24, metadata={"help": "Answer length limit in the evaluation."})
    eval_samples: int = field(default=4, metadata={
        "help": "Sampled answers per held-out prompt (temperature 1, as in rollouts) besides the greedy one; 0: off."})
    sft: dict = field(default_factory=dict, metadata={
        "help": "Step-1 options over the demo's tuned ones: --sft '{max_steps: 50}' or a YAML section in --config."})
    reward: dict = field(default_factory=dict, metadata={"help": "Step-2 options over the demo's tuned ones."})
    ppo: dict = field(default_factory=dict, metadata={"help": "Step-3 options over the demo's tuned ones."})


# ---------------------------------------------------------------------------------------------- tuned defaults
# Why these numbers (measured on the 2-core CPU, see the final report): the bases are pretrained, so SFT only has
# to teach the answer format - its eval loss on unseen items rises from the first epoch on (it memorises the
# training items), hence one short epoch at a low rate. The reward model peaks after about one epoch over its
# pairs and then overfits. PPO gets most of the time: answers are short (1-4 words), rollouts are cheap.
ACTOR = {"hidden": 128, "layers": 4, "heads": 4, "vocab": 512, "max_positions": 128}
REWARD = {"hidden": 96, "layers": 3, "heads": 4, "vocab": 512, "max_positions": 128}
PRETRAIN_STEPS = 300  # ~2.4 passes over the 4000-line task corpus (the loss plateaus there)
# SFT (step 1) learns from the SFT-only set only (data_split 0,6,4), whose noisy chosen answers mostly go on with a
# fake next turn (chatrlhf.tasks.builtin.SFT_FLAWS): the SFT actor inherits DeepSpeed-Chat's typical flaw, which the reward
# model (gold-ordered pairs) learns to penalise and PPO can remove - one decision per answer (EOS vs " Human:").
TASK = {"n_sft": 2000, "n_pairs": 3000, "n_eval": 300, "n_heldout": 40, "noise": 0.35, "sft_noise": 0.7}
DATA_SPLIT = "0,6,4"

STEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"max_steps": 160, "per_device_train_batch_size": 16, "max_seq_len": 96, "learning_rate": 3e-4,
            "num_warmup_steps": 10, "lr_scheduler_type": "cosine", "skip_bad_rows": True, "log_interval": 40,
            "eval_iters": 4, "save_interval": 80},
    "reward": {"max_steps": 80, "per_device_train_batch_size": 16, "max_seq_len": 96, "learning_rate": 3e-4,
               "weight_decay": 0.1, "skip_bad_rows": True, "log_interval": 20, "eval_iters": 4, "save_interval": 40},
    "ppo": {"max_steps": 200, "per_device_generation_batch_size": 32, "per_device_training_batch_size": 32,
            "max_prompt_seq_len": 32, "max_answer_seq_len": 16, "actor_learning_rate": 2e-5,
            "critic_learning_rate": 2e-4, "kl_ctl": 0.2, "skip_bad_rows": True, "log_interval": 10,
            "save_interval": 50},
}

QUICK_ACTOR = {"hidden": 32, "layers": 1, "heads": 2, "vocab": 320, "max_positions": 64}
QUICK_REWARD = QUICK_ACTOR
QUICK_PRETRAIN_STEPS = 5
QUICK_TASK = {"n_sft": 64, "n_pairs": 96, "n_eval": 32, "n_heldout": 8, "noise": 0.35, "sft_noise": 0.7}
QUICK_STEPS: dict[str, dict[str, Any]] = {
    "sft": {"max_steps": 4, "per_device_train_batch_size": 8, "max_seq_len": 64, "learning_rate": 1e-3,
            "skip_bad_rows": True, "log_interval": 2},
    "reward": {"max_steps": 4, "per_device_train_batch_size": 8, "max_seq_len": 64, "learning_rate": 1e-3,
               "skip_bad_rows": True, "log_interval": 2},
    "ppo": {"max_steps": 2, "per_device_generation_batch_size": 4, "per_device_training_batch_size": 4,
            "max_prompt_seq_len": 32, "max_answer_seq_len": 8, "actor_learning_rate": 1e-4,
            "critic_learning_rate": 1e-4, "skip_bad_rows": True, "log_interval": 1},
}


# ---------------------------------------------------------------------------------------------- assets
def build_assets(out: Path, cfg: DemoConfig) -> dict[str, Path]:
    """Task data + tiny actor/reward bases under OUTPUT/assets; reused when already there (reruns resume)."""

    assets = out / "assets"
    task_kw = QUICK_TASK if cfg.quick else TASK
    paths = {"task": assets / "task", "actor": assets / "actor", "reward": assets / "reward"}
    if not (paths["task"] / "meta.json").is_file():
        write_task_dataset(paths["task"], seed=cfg.seed, **task_kw)
    corpus = task_corpus(seed=cfg.seed, n=1000 if cfg.quick else 4000)
    for role, shape in (("actor", QUICK_ACTOR if cfg.quick else ACTOR), ("reward", QUICK_REWARD if cfg.quick else REWARD)):
        if not (paths[role] / "config.json").is_file():
            # Same corpus + vocab + family -> the same tokenizer for both, as PPO needs.
            tmp = build_tiny_model(cfg.family, assets / f".{role}-random", corpus=corpus,
                                   seed=cfg.seed + (role == "reward"), **shape)
            steps = QUICK_PRETRAIN_STEPS if cfg.quick else PRETRAIN_STEPS
            pretrain(tmp, paths[role], corpus, steps=steps, seed=cfg.seed)
    return paths


def pretrain(src: Path, dst: Path, corpus: Sequence[str], steps: int, seed: int, batch_size: int = 32,
             lr: float = 3e-3) -> Path:
    """Language-model pretraining of a tiny random model on the task corpus (plain torch, one process), so the
    demo starts where DeepSpeed-Chat starts: from a *pretrained* base that knows the language but not yet how
    to answer like an assistant (the corpus mixes clean answers with rambling, fake turns, repetition and wrong
    answers). Written atomically to ``dst``; the random model in ``src`` is removed."""

    import torch  # lazy: torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(str(src))
    model = load_causal_lm(str(src))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.05)
    texts = [t + tok.eos_token for t in corpus]
    max_len = min(96, max_positions(model.config) or 96)
    for step in range(steps):
        enc = tok(rng.sample(texts, batch_size), return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"[chatrlhf demo] pretraining {dst.name}: step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for extra in ("tiny_model.json",):
            if (src / extra).is_file():
                shutil.copy(src / extra, tmp / extra)
    shutil.rmtree(src, ignore_errors=True)
    return dst


def pipeline_config(out: Path, assets: dict[str, Path], cfg: DemoConfig):
    """The TrainPipelineConfig the demo runs: tuned per-step sections, user overrides merged over them."""

    sections = {k: dict(v) for k, v in (QUICK_STEPS if cfg.quick else STEP_DEFAULTS).items()}
    for k in sections:
        sections[k].update(getattr(cfg, k) or {})
    pcfg = TrainPipelineConfig(
        actor_model=str(assets["actor"]), reward_model=str(assets["reward"]), data_path=[str(assets["task"] / "data")],
        sft_only_data_path=[str(assets["task"] / "sft" / "data")],
        data_split=DATA_SPLIT, output_dir=str(out), deployment_type=cfg.deployment_type, seed=cfg.seed,
        sft=sections["sft"], reward=sections["reward"], ppo=sections["ppo"])
    pcfg.validate()
    return pcfg


# ---------------------------------------------------------------------------------------------- evaluation
def _load_actor(path: Path):
    tok = load_tokenizer(str(path), padding_side="left")
    model = load_causal_lm(str(path))
    model.eval()
    return model, tok


def greedy_answers(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy answer token ids per prompt, cut after the first EOS (kept out of the ids). Decoded by the hybrid
    engine where it supports the model (the same tokens as generate())."""
    from chatrlhf.engine import hybrid  # lazy: torch

    out: list[list[int]] = []
    eos = tok.eos_token_id
    for i in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True)
        gen = hybrid.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        out += [_until_eos(row, eos) for row in gen[:, enc["input_ids"].shape[1]:].tolist()]
    return out


def _until_eos(row: list[int], eos: int) -> list[int]:
    """The answer ids before the first EOS (the EOS and any padding after it dropped)."""
    return row[:row.index(eos)] if eos in row else row


def sampled_answers(model, tok, prompts: Sequence[str], max_new_tokens: int, n: int, seed: int,
                    batch_size: int = 16) -> list[list[list[int]]]:
    """n answers per prompt sampled at temperature 1 (top_p 1, top_k off: the rollout distribution), cut at EOS."""
    import torch  # lazy: torch

    from chatrlhf.engine import hybrid  # lazy: torch

    torch.manual_seed(seed)
    out: list[list[list[int]]] = []
    eos = tok.eos_token_id
    for i in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True)
        gen = hybrid.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                              do_sample=True, num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        rows = gen[:, enc["input_ids"].shape[1]:].tolist()
        out += [[_until_eos(row, eos) for row in rows[j:j + n]] for j in range(0, len(rows), n)]
    return out


def answer_kl(final, ref, tok, prompts: Sequence[str], answers: Sequence[list[int]]) -> float:
    """Mean over answer tokens (and the EOS that ends each answer) of KL(final || ref) at that position, on the
    final actor's own greedy answers: how far PPO moved the policy where it actually generates."""
    import torch  # lazy: torch
    import torch.nn.functional as F  # lazy: torch

    total, count = 0.0, 0
    eos = tok.eos_token_id
    for p, a in zip(prompts, answers):
        p_ids = tok(p)["input_ids"]
        ids = torch.tensor([p_ids + a + [eos]])
        with torch.no_grad():
            lf = F.log_softmax(final(input_ids=ids).logits.float(), -1)
            lr = F.log_softmax(ref(input_ids=ids).logits.float(), -1)
        # positions predicting the answer tokens and the EOS
        sl = slice(len(p_ids) - 1, ids.shape[1] - 1)
        kl = (lf[0, sl].exp() * (lf[0, sl] - lr[0, sl])).sum(-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(1, count)


def reward_accuracy(rm_path: Path, pairs: Sequence[dict], max_len: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out preference accuracy of the step-2 reward model (chosen scored above rejected), texts cut to the
    step's max_seq_len as in training."""
    import torch  # lazy: torch

    from chatrlhf.models.reward_model import load_reward_model  # lazy: torch

    tok = load_tokenizer(str(rm_path), padding_side="right")
    rm = load_reward_model(str(rm_path))
    rm.eval()
    eos = tok.eos_token or ""
    correct, chosen_s, rejected_s = 0, [], []
    for i in range(0, len(pairs), batch_size):
        rows = pairs[i:i + batch_size]
        texts = [r["prompt"] + r["chosen"] + eos for r in rows] + [r["prompt"] + r["rejected"] + eos for r in rows]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        with torch.no_grad():
            s = rm.score(enc["input_ids"], enc["attention_mask"]).float()
        c, r = s[: len(rows)], s[len(rows):]
        correct += int((c > r).sum())
        chosen_s += c.tolist()
        rejected_s += r.tolist()
    n = max(1, len(chosen_s))
    return {"rm_accuracy": correct / n, "rm_chosen_mean": sum(chosen_s) / n, "rm_rejected_mean": sum(rejected_s) / n,
            "rm_pairs": len(chosen_s)}


def evaluate(out: Path, assets: dict[str, Path], cfg: DemoConfig) -> dict[str, Any]:
    """SFT actor vs final actor on held-out prompts with the gold scorer; RM accuracy; KL; samples."""

    held = read_heldout(assets["task"] / "heldout.jsonl")[: cfg.n_eval_prompts]
    prompts = [h["prompt"] for h in held]
    sft_path, final_path = out / "step1_sft", _final_actor_dir(out)
    sft_model, tok = _load_actor(sft_path)
    final_model, _ = _load_actor(final_path)
    sft_ids = greedy_answers(sft_model, tok, prompts, cfg.max_new_tokens)
    final_ids = greedy_answers(final_model, tok, prompts, cfg.max_new_tokens)
    sft_txt = [tok.decode(a, skip_special_tokens=True) for a in sft_ids]
    final_txt = [tok.decode(a, skip_special_tokens=True) for a in final_ids]
    sft_scores = [gold_score(p, a) for p, a in zip(prompts, sft_txt)]
    final_scores = [gold_score(p, a) for p, a in zip(prompts, final_txt)]

    def kinds(answers: list[str]) -> dict[str, float]:
        ks = [classify_answer(p, a) for p, a in zip(prompts, answers)]
        return {k: ks.count(k) / len(ks) for k in ("clean", "ramble", "fake_turn", "never_stop", "wrong", "empty")}

    if cfg.eval_samples > 0:  # the policy as PPO sees it: temperature-1 samples, several per prompt
        sft_s = sampled_answers(sft_model, tok, prompts, cfg.max_new_tokens, cfg.eval_samples, cfg.seed)
        final_s = sampled_answers(final_model, tok, prompts, cfg.max_new_tokens, cfg.eval_samples, cfg.seed)
        flat_p = [p for p in prompts for _ in range(cfg.eval_samples)]
        sft_st = [tok.decode(a, skip_special_tokens=True) for g in sft_s for a in g]
        final_st = [tok.decode(a, skip_special_tokens=True) for g in final_s for a in g]
        sampled = {"samples_per_prompt": cfg.eval_samples, "sft": gold_summary(flat_p, sft_st),
                   "final": gold_summary(flat_p, final_st)}
        k = cfg.eval_samples
        per_prompt = lambda txt: [sum(gold_score(p, a) for a in txt[i * k:(i + 1) * k]) / k for i, p in enumerate(prompts)]
        sampled["win_rate_final_vs_sft"] = gold_win_rate(per_prompt(final_st), per_prompt(sft_st))
    else:
        sampled = None

    eval_pairs = json.loads((assets["task"] / "data" / "eval.json").read_text(encoding="utf-8"))
    res: dict[str, Any] = {
        "n_prompts": len(prompts),
        "gold_sft": sum(sft_scores) / len(sft_scores),
        "gold_final": sum(final_scores) / len(final_scores),
        "pass_sft": sum(s == 1.0 for s in sft_scores) / len(sft_scores),
        "pass_final": sum(s == 1.0 for s in final_scores) / len(final_scores),
        "win_rate_final_vs_sft": gold_win_rate(final_scores, sft_scores),
        "answer_tokens_sft": sum(map(len, sft_ids)) / len(sft_ids),
        "answer_tokens_final": sum(map(len, final_ids)) / len(final_ids),
        "kinds_sft": kinds(sft_txt),
        "kinds_final": kinds(final_txt),
        "sampled": sampled,
        # flat copies (X_sft / X_final pairs) so report.md's before/after table shows the sampled numbers too
        **({"gold_sampled_sft": sampled["sft"]["gold_mean"], "gold_sampled_final": sampled["final"]["gold_mean"],
            "pass_sampled_sft": sampled["sft"]["gold_pass"], "pass_sampled_final": sampled["final"]["gold_pass"],
            "win_rate_sampled_final_vs_sft": sampled["win_rate_final_vs_sft"]} if sampled else {}),
        "kl_final_to_sft": answer_kl(final_model, sft_model, tok, prompts, final_ids),
        **reward_accuracy(out / "step2_reward", eval_pairs, _step_value(out / "step2_reward", "max_seq_len", 512)),
    }
    order = sorted(range(len(prompts)), key=lambda i: final_scores[i] - sft_scores[i], reverse=True)
    picks = order[: max(1, cfg.n_samples - cfg.n_samples // 3)] + order[::-1][: cfg.n_samples // 3]
    res["samples"] = [{"prompt": prompts[i], "expected": held[i]["answer"], "sft": sft_txt[i], "final": final_txt[i],
                       "gold_sft": round(sft_scores[i], 3), "gold_final": round(final_scores[i], 3)}
                      for i in dict.fromkeys(picks)]
    return res


def _step_value(step_dir: Path, key: str, default: Any) -> Any:
    import yaml  # lazy: yaml

    f = step_dir / "step_config.yaml"
    return (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get(key, default) if f.is_file() else default


def _final_actor_dir(out: Path) -> Path:
    ppo = out / "step3_ppo"
    return ppo / "actor" if (ppo / "actor" / "config.json").is_file() else ppo


# ---------------------------------------------------------------------------------------------- output
def format_table(summary: dict[str, Any]) -> str:
    e = summary["eval"]
    t = summary.get("wall_s", {})
    rows = [
        ("held-out prompts", f"{e['n_prompts']}", ""),
        ("greedy: gold score (mean)", f"{e['gold_sft']:.3f}", f"{e['gold_final']:.3f}"),
        ("exactly right and stops", f"{e['pass_sft']:.1%}", f"{e['pass_final']:.1%}"),
        ("answer tokens (mean)", f"{e['answer_tokens_sft']:.1f}", f"{e['answer_tokens_final']:.1f}"),
    ]
    for k in ("clean", "ramble", "fake_turn", "never_stop", "wrong", "empty"):
        rows.append((f"  {k}", f"{e['kinds_sft'][k]:.0%}", f"{e['kinds_final'][k]:.0%}"))
    sm = e.get("sampled")
    if sm:
        rows.append((f"sampled (T=1, {sm['samples_per_prompt']}/prompt): gold", f"{sm['sft']['gold_mean']:.3f}",
                     f"{sm['final']['gold_mean']:.3f}"))
        rows.append(("  exactly right and stops", f"{sm['sft']['gold_pass']:.1%}", f"{sm['final']['gold_pass']:.1%}"))
        for k in ("clean", "ramble", "fake_turn", "never_stop", "wrong", "empty"):
            rows.append((f"  {k}", f"{sm['sft']['kind_' + k]:.0%}", f"{sm['final']['kind_' + k]:.0%}"))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w}}  {'SFT actor':>10}  {'final actor':>11}"]
    lines += [f"{a:<{w}}  {b:>10}  {c:>11}" for a, b, c in rows]
    lines += ["",
              f"gold win-rate of the final actor over the SFT actor: {e['win_rate_final_vs_sft']:.1%} greedy"
              + (f", {sm['win_rate_final_vs_sft']:.1%} sampled (per-prompt mean)" if sm else "") + " (ties count half)",
              f"reward model held-out accuracy: {e['rm_accuracy']:.1%} on {e['rm_pairs']} pairs",
              f"KL(final || SFT), mean per answer token: {e['kl_final_to_sft']:.4f}",
              "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items() if v is not None), "",
              "samples (prompt | expected | SFT | final):"]
    for s in e["samples"]:
        lines.append(f"  {s['prompt'].strip()!r} | {s['expected']!r}\n"
                     f"      SFT   {s['gold_sft']:.2f} {s['sft']!r}\n      final {s['gold_final']:.2f} {s['final']!r}")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Assets -> steps 1, 2, 3 -> evaluation -> summary.json + table + report. Returns the summary."""

    import torch  # lazy: torch

    os.environ["OMP_NUM_THREADS"] = str(cfg.threads or 1)  # inherited by the step subprocesses
    torch.set_num_threads(cfg.threads or 1)
    out = Path(cfg.output_dir)
    t0 = time.time()
    print(f"[chatrlhf demo] building tiny models and the built-in task in {out / 'assets'}", flush=True)
    assets = build_assets(out, cfg)
    t_assets = time.time() - t0
    pcfg = pipeline_config(out, assets, cfg)
    pcfg.report = False  # written once below, after summary.json exists
    train = run_train(pcfg)
    print("[chatrlhf demo] evaluating the SFT and final actors on held-out prompts", flush=True)
    t1 = time.time()
    ev = evaluate(out, assets, cfg)
    wall = {"assets": t_assets}
    wall.update({k: v.get("wall_s") for k, v in train["steps"].items()})
    wall["eval"] = time.time() - t1
    summary = {"quick": cfg.quick, "family": cfg.family, "output_dir": str(out), "wall_s": wall,
               "steps_total_s": sum(v for k, v in wall.items() if k in ("sft", "reward", "ppo") and v),
               "steps": {k: {"status": v["status"], "metrics": v.get("metrics", {})} for k, v in train["steps"].items()},
               "eval": ev}
    atomic_write_json(out / "summary.json", summary)
    print("\n" + format_table(summary) + "\n", flush=True)
    report = write_run_report(out)
    if report:
        summary["report"] = report
        print(f"[chatrlhf demo] report: {report}", flush=True)
    print(f"[chatrlhf demo] summary: {out / 'summary.json'}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv, cli_sections = _pop_section_flags(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(DemoConfig, argv, prog="chatrlhf demo",
                       description="Tiny models + the built-in task: SFT -> reward model -> PPO on CPU, then before/after.")
    for name, values in cli_sections.items():
        getattr(cfg, name).update(values)
    if cfg.model != "tiny":  # the real-model demo (chatrlhf.apps.demo_real)

        return main_real(cfg)
    run_demo(cfg)
    return 0
