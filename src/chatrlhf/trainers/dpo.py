"""Step 2 alternative: direct preference optimization of the policy against a frozen reference copy.

logits = beta((pi_c - ref_c) - (pi_r - ref_r)), loss = -(1-eps) logsigmoid(logits) - eps logsigmoid(-logits).
Sequence log-probs sum over each answer's tokens from the first position where chosen and rejected differ: tokens
they share (the prompt, a common answer prefix) have equal log-probs in both and cancel in the logits anyway.
Logged: loss, chosen/rejected rewards (beta * (pi - ref)), their margin and accuracy (chosen reward > rejected).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chatrlhf.algo.losses import DPOLoss, chunked_token_logprobs, sequence_logprobs
from chatrlhf.config import option, parse_config
from chatrlhf.data import PairCollator
from chatrlhf.models.dims import model_dims
from chatrlhf.models.loading import load_causal_lm
from chatrlhf.trainers import common as C
from chatrlhf.trainers import lm_head
from chatrlhf.trainers.config import StepConfig
from chatrlhf.trainers.metrics import log_line
from chatrlhf.trainers.sft import labelled_span

STEP = "dpo"


@dataclass
class DPOConfig(StepConfig):
    learning_rate: float = option("Initial learning rate (after warmup).", 1e-6, gt=0)
    beta: float = option("DPO temperature: strength of the pull away from the reference model.", 0.1, gt=0)
    label_smoothing: float = option("Conservative DPO: assumed probability that a preference label is flipped "
                                    "(0 <= eps < 0.5).", 0.0, ge=0, lt=0.5)
    offload_reference_model: bool = option("Keep the frozen reference model's weights in host memory (ZeRO-3 "
                                           "parameter offload).", False)


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for a pair batch [2B, L] (chosen rows, then rejected rows): -100 before each pair's first differing
    position and on padding."""
    b = input_ids.shape[0] // 2
    c, r = input_ids[:b], input_ids[b:]
    both = (attention_mask[:b] + attention_mask[b:]) > 0
    differ = (c != r) & both
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(c)
    big = torch.full_like(pos, input_ids.shape[1])
    start = torch.where(differ, pos, big).min(dim=1).values.clamp(min=1)
    start = torch.cat([start, start])
    keep = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= start[:, None]) & \
        attention_mask.bool()
    return input_ids.masked_fill(~keep, -100)


def pair_logps(model, batch: dict, fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of the chosen and rejected rows. Chunked where the model allows it
    (steps/lm_head.py): from the lm head's input over the labelled span, never the [2B, L, V] logits (fp32 maths
    either way then)."""
    labels = answer_labels(batch["input_ids"], batch["attention_mask"])
    keep = labelled_span(labels)
    head = lm_head.head_inputs(model, batch["input_ids"], batch["attention_mask"], keep)
    if head is not None:
        lp = chunked_token_logprobs(head.hidden, head.weight, lm_head.next_token_targets(labels, keep),
                                    bias=head.bias, ignore_index=-100, transposed=head.transposed)[0].sum(-1)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        lp = sequence_logprobs(logits.float() if fp32 else logits, labels)
    b = lp.shape[0] // 2
    return lp[:b], lp[b:]


@torch.no_grad()
def evaluate(engine, ref, loader, strategy, cfg: DPOConfig) -> dict:
    engine.eval()
    loss_fn = DPOLoss(cfg.beta, cfg.label_smoothing)
    sums = torch.zeros(5)
    for batch in C.limited(loader, cfg.eval_iters):
        batch = C.to_device(batch, strategy.device)
        pc, pr = pair_logps(engine, batch)
        rc, rr = pair_logps(ref, batch)
        loss, cr, rr_ = loss_fn(pc, pr, rc, rr)
        n = len(cr)
        sums += torch.tensor([float(loss) * n, cr.float().sum(), rr_.float().sum(), (cr > rr_).float().sum(), n])
    engine.train()
    sums = strategy.all_reduce_sum(sums).cpu()
    n = max(float(sums[4]), 1.0)
    c, r = float(sums[1]) / n, float(sums[2]) / n
    return {"eval_loss": float(sums[0]) / n, "chosen_reward": c, "rejected_reward": r, "reward_margin": c - r,
            "accuracy": float(sums[3]) / n}


def run_dpo(cfg: DPOConfig) -> dict:
    strategy, out, tokenizer = C.setup_step(cfg, what="policy + reference", frozen_copies=1)

    train_dl, eval_dl, total_steps = C.phase_loaders(2, cfg, tokenizer, strategy, PairCollator(tokenizer.pad_token_id))

    model = C.load_causal_lm_for(cfg, strategy, tokenizer)
    with strategy.zero3_init_context(train=False):
        ref = load_causal_lm(cfg.model_name_or_path, dtype=strategy.torch_dtype, tokenizer=tokenizer,
                             trust_remote_code=cfg.trust_remote_code)
    ref = strategy.prepare_eval(ref, offload=cfg.offload_reference_model)
    optimizer, scheduler = C.create_optimizer_and_scheduler(strategy, model, cfg, total_steps)
    engine = strategy.prepare(model, optimizer, scheduler)

    run_config = {"step": STEP, **dataclasses.asdict(cfg)}
    prog, writer, save_checkpoint = C.start_run(STEP, cfg, strategy, engine, tokenizer, out, run_config)
    loss_fn = DPOLoss(cfg.beta, cfg.label_smoothing)

    def compute_loss(batch):
        pc, pr = pair_logps(engine, batch, fp32=True)
        with torch.no_grad():
            rc, rr = pair_logps(ref, batch)
        loss, cr, rj = loss_fn(pc, pr, rc, rr)
        return loss, {"chosen_reward": cr.mean(), "rejected_reward": rj.mean(),
                      "reward_margin": (cr - rj).mean(), "accuracy": (cr > rj).float().mean()}

    def run_eval() -> dict:
        return evaluate(engine, ref, eval_dl, strategy, cfg)

    first = run_eval()
    writer.log("eval", prog.global_step, **first)
    last = C.train_loop(STEP, cfg, strategy, engine, train_dl, total_steps, prog, writer, compute_loss, run_eval,
                        save_checkpoint, model_dims(engine))
    final = run_eval()
    writer.log("eval", prog.global_step, **final)
    log_line(f"[dpo] final step {prog.global_step}: margin {final['reward_margin']:.4f} accuracy "
               f"{final['accuracy']:.3f} loss {final['eval_loss']:.4f}")
    summary = {"global_step": prog.global_step, "train_loss": last.get("loss", float("nan")),
               "reward_margin_start": first["reward_margin"], **final}
    return C.finish_step(STEP, cfg, strategy, engine, tokenizer, out, run_config, writer, summary)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DPOConfig, argv, prog="chatrlhf dpo", description=__doc__)
    return C.run_main(run_dpo, cfg)
