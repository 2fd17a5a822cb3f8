"""Evaluation during RL that does not trust the reward model alone (``--eval_interval``).

Greedy answers to a fixed set of held-out prompts (the step-3 eval split), scored by the reward model (``rm_score``)
and by the user's ``--eval_fn`` (a verifier or gold scorer), plus the mean answer length. The same prompts every
time, so the curve compares like with like; every rank generates the same number of batches (ZeRO-3 gathers weights
collectively), and the metrics are computed once over all ranks' answers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from chatrlhf.data import PromptCollator
from chatrlhf.trainers import common
from chatrlhf.trainers.ppo import experience as px
from chatrlhf.trainers.ppo.rewards import Scorer, answer_texts, call_eval_fn, load_function


class PolicyEval:
    """``evaluator(actor) -> (metrics, samples)``; ``samples`` = the first few (prompt, answer) pairs."""

    def __init__(self, dataset, cfg, strategy, tokenizer, scorer: Scorer, eval_fn: str = ""):
        self.strategy, self.tokenizer, self.scorer = strategy, tokenizer, scorer
        self.eval_spec = eval_fn
        self.eval_fn = load_function(eval_fn, "--eval_fn") if eval_fn else None
        n = min(cfg.eval_samples, len(dataset))
        world, rank = strategy.world_size, strategy.rank
        per_rank = math.ceil(n / world)
        # rank r evaluates items r, r + world, ...; a short rank repeats item 0 (marked, left out of the metrics)
        mine = [i for i in range(rank, n, world)]
        self.index = mine + [-1] * (per_rank - len(mine))
        items = [dataset[max(i, 0)] for i in self.index]
        collate = PromptCollator(tokenizer.pad_token_id)
        bs = cfg.per_device_generation_batch_size
        self.batches = [collate(items[j:j + bs]) for j in range(0, len(items), bs)]
        self.params = px.GenerationParams(max_new_tokens=cfg.max_answer_seq_len, do_sample=False,
                                          hybrid=cfg.enable_hybrid_engine)

    @torch.no_grad()
    def __call__(self, actor) -> tuple[dict[str, float], list[tuple[str, str]]]:
        rows: list[tuple[int, str, str, dict, float, int]] = []  # (index, prompt, answer, meta, rm, length)
        k = 0
        for batch in self.batches:
            batch = common.to_device(batch, self.strategy.device)
            ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
            seq, amask = px.generate_answers(actor, self.strategy, self.tokenizer, ids, mask, self.params)
            p = ids.shape[1]
            prompts = batch.get("prompt") or [""] * len(seq)
            metas = batch.get("meta") or [{}] * len(seq)
            rm_scores = (self.scorer(seq, amask, p)[1].get("rm_score") if self.scorer.reward_model is not None
                         else None)
            answers = answer_texts(self.tokenizer, seq, amask, p)
            lengths = amask[:, p:].sum(1).tolist()
            for j in range(len(seq)):
                rows.append((self.index[k], prompts[j], answers[j], metas[j],
                             float(rm_scores[j]) if rm_scores is not None else math.nan, int(lengths[j])))
                k += 1
        everyone = [r for part in self.strategy.all_gather_object(rows) for r in part if r[0] >= 0]
        everyone.sort(key=lambda r: r[0])
        prompts = [r[1] for r in everyone]
        answers = [r[2] for r in everyone]
        metas = [r[3] for r in everyone]
        metrics: dict[str, float] = {"response_length": sum(r[5] for r in everyone) / max(len(everyone), 1)}
        if self.scorer.reward_model is not None:
            metrics["rm_score"] = sum(r[4] for r in everyone) / max(len(everyone), 1)
        if self.eval_fn is not None:
            metrics.update(call_eval_fn(self.eval_fn, self.eval_spec, prompts, answers, metas))
        return metrics, list(zip(prompts, answers))[:3]


def metric_value(metrics: dict[str, Any], spec: str) -> tuple[str, float, bool]:
    """``--save_best_by NAME[:min]`` -> (name, value, higher_is_better); KeyError names the metrics there are."""
    name, _, mode = spec.partition(":")
    name = name.removeprefix("eval/")
    if name not in metrics:
        raise KeyError(f"--save_best_by {spec}: no eval metric {name!r} (there are: {', '.join(sorted(metrics))})")
    return name, float(metrics[name]), mode != "min"
