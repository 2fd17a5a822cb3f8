"""Step 1: supervised fine-tuning of the actor on prompt + chosen answer (loss on answer tokens only by default).

Reads top to bottom: config -> set-up (strategy, tokenizer, checks, data, model, optimizer, engine, resume) ->
eval before training -> loop (loss, step, throughput line, eval/save intervals) -> final eval, checkpoint, done.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatrlhf.algo.losses import chunked_cross_entropy
from chatrlhf.config import parse_config
from chatrlhf.data import SFTCollator
from chatrlhf.models.dims import model_dims
from chatrlhf.trainers import common as C
from chatrlhf.trainers import lm_head
from chatrlhf.trainers.config import StepConfig
from chatrlhf.trainers.metrics import log_line

STEP = "sft"


@dataclass
class SFTConfig(StepConfig):
    """Step 1: the shared data and training options (trainers/common.py, data/phases.py); no options of its own."""


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = False, reduction: str = "mean"):
    """Next-token cross entropy over labelled positions (labels == -100 are prompt/padding). The labels shift left
    (the last position gets -100), not the logits: slicing [B, S, V] logits would copy them, and their gradient,
    once more per step (16 MB each way at the bench's mid size; ~1-3% of its CPU step)."""
    labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    if fp32:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def labelled_span(labels: torch.Tensor) -> int:
    """How many trailing positions the loss reads logits from: from the one before the batch's earliest labelled
    token to the end (the prompt's logits are never used when only answers are trained)."""
    S = labels.shape[1]
    has = labels != -100
    rows = has.any(1)
    if not bool(rows.any()):
        return S
    first = int(has[rows].float().argmax(1).min())
    return min(S, S - first + 1)


def answer_logits(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over the labelled span only: the lm head, and its [B, S, V] logits and their gradient, skip
    the prompt (about half of an SFT step's head work and logits memory with DeepSpeed-Chat-like prompt/answer
    lengths). Models whose forward has no ``logits_to_keep`` get full logits."""
    labels = batch["labels"]
    keep = labelled_span(labels) if "logits_to_keep" in C.forward_args(engine) else labels.shape[1]
    kw = {"logits_to_keep": keep} if keep < labels.shape[1] else {}
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **kw).logits
    return logits, labels[:, labels.shape[1] - logits.shape[1]:]


def sft_loss(engine, batch: dict, fp32: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy of the answer tokens. Chunked where the model allows it (steps/lm_head.py): from
    the lm head's input over the labelled span, ``chunk`` rows of [*, V] logits at a time and in fp32 whatever
    ``fp32`` says (chatrlhf.algo.losses.chunked_cross_entropy): the same loss and gradients as :func:`lm_loss` without
    the [B, K, V] logits, their fp32 copy and log-softmax. Otherwise :func:`answer_logits` + :func:`lm_loss`."""
    labels = batch["labels"]
    keep = labelled_span(labels)
    head = lm_head.head_inputs(engine, batch["input_ids"], batch["attention_mask"], keep)
    if head is None:
        logits, labels = answer_logits(engine, batch)
        return lm_loss(logits, labels, fp32=fp32, reduction=reduction)
    return chunked_cross_entropy(head.hidden, head.weight, lm_head.next_token_targets(labels, keep),
                                 reduction=reduction, bias=head.bias, transposed=head.transposed)


@torch.no_grad()
def evaluate(engine, loader, strategy, cfg: SFTConfig) -> dict:
    """Token-weighted eval loss over all ranks and its perplexity."""
    engine.eval()
    total, count = 0.0, 0
    for batch in C.limited(loader, cfg.eval_iters):
        batch = C.to_device(batch, strategy.device)
        total += float(sft_loss(engine, batch, fp32=True, reduction="sum"))
        count += int((batch["labels"][:, 1:] != -100).sum())
    engine.train()
    total = float(strategy.all_reduce_sum(total))
    count = float(strategy.all_reduce_sum(count))
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def run_sft(cfg: SFTConfig) -> dict:
    # ---- set-up: every check that can fail runs before the model is built ----------------------------------
    strategy, out, tokenizer = C.setup_step(cfg, what="actor")

    train_dl, eval_dl, total_steps = C.phase_loaders(1, cfg, tokenizer, strategy, SFTCollator(tokenizer.pad_token_id))

    model = C.load_causal_lm_for(cfg, strategy, tokenizer)
    optimizer, scheduler = C.create_optimizer_and_scheduler(strategy, model, cfg, total_steps)
    engine = strategy.prepare(model, optimizer, scheduler)

    run_config = {"step": STEP, **dataclasses.asdict(cfg)}
    prog, writer, save_checkpoint = C.start_run(STEP, cfg, strategy, engine, tokenizer, out, run_config)

    # ---- eval before training, then the loop --------------------------------------------------------------
    first_eval = evaluate(engine, eval_dl, strategy, cfg)
    writer.log("eval", prog.global_step, **first_eval)
    log_line(f"[sft] step {prog.global_step} eval_loss {first_eval['eval_loss']:.4f} "
               f"perplexity {first_eval['perplexity']:.2f}")

    def compute_loss(batch):
        return sft_loss(engine, batch, fp32=cfg.compute_fp32_loss), {}

    last = C.train_loop(STEP, cfg, strategy, engine, train_dl, total_steps, prog, writer, compute_loss,
                        lambda: evaluate(engine, eval_dl, strategy, cfg), save_checkpoint, model_dims(engine))
    last_loss = last.get("loss", float("nan"))

    # ---- final eval, checkpoint, done --------------------------------------------------------------------
    final = evaluate(engine, eval_dl, strategy, cfg)
    writer.log("eval", prog.global_step, **final)
    log_line(f"[sft] final step {prog.global_step} eval_loss {final['eval_loss']:.4f} "
               f"perplexity {final['perplexity']:.2f}")
    summary = {"global_step": prog.global_step, "train_loss": last_loss,
               "eval_loss_start": first_eval["eval_loss"], "eval_loss": final["eval_loss"],
               "perplexity": final["perplexity"]}
    return C.finish_step(STEP, cfg, strategy, engine, tokenizer, out, run_config, writer, summary)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SFTConfig, argv, prog="chatrlhf sft", description=__doc__)
    return C.run_main(run_sft, cfg)
