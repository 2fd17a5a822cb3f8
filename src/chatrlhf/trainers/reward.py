"""Step 2: reward model = causal-LM body + scalar value head, trained on (prompt, chosen, rejected) pairs
(``--loss pairwise``: DeepSpeed-Chat's divergent-span loss; ``last_token``: end scores only) or on k-wise
rankings (``--kwise``: all ordered pairs of k answers).

Metrics are readable (problem 12): before training and at every eval the mean chosen and rejected end scores, their
gap, accuracy (chosen > rejected) and loss; a high accuracy with negative scores is fine, the gap is what matters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chatrlhf.algo.losses import KWiseLoss, LastTokenPairLoss, PairWiseLoss
from chatrlhf.config import option, parse_config
from chatrlhf.data import PairCollator
from chatrlhf.models.dims import model_dims, unwrap
from chatrlhf.models.loading import num_padding_at_beginning
from chatrlhf.models.reward_model import load_reward_model
from chatrlhf.trainers import common as C
from chatrlhf.trainers.config import StepConfig
from chatrlhf.trainers.metrics import log_line

STEP = "reward"


@dataclass
class RewardConfig(StepConfig):
    learning_rate: float = option("Initial learning rate (after warmup).", 5e-5, gt=0)
    loss: str = option("pairwise: -logsigmoid(r_c - r_r) over the tokens from where chosen and rejected diverge to "
                       "the end (DeepSpeed-Chat); last_token: on the end scores only. --kwise always uses the k-wise "
                       "loss.", "pairwise", choices=("pairwise", "last_token"))
    num_padding_at_beginning: int = option("Leading pad tokens every sequence starts with (OPT: 1). -1: derived "
                                           "from the tokenizer.", -1, ge=0, special=(-1,))


def reward_loss(model, values: torch.Tensor, batch: dict, cfg: RewardConfig):
    """(loss, chosen end scores, rejected end scores) for a pair batch ([2B, L]: chosen rows then rejected rows) or
    a k-wise batch ([B*k, L]; 'chosen' = each ranking's best answer, 'rejected' = its worst)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if "k" in batch:
        k = int(batch["k"])
        scores = model.end_scores(values, ids, mask).view(-1, k)
        return KWiseLoss()(scores), scores[:, 0], scores[:, -1]
    b = ids.shape[0] // 2
    if cfg.loss == "pairwise":
        return PairWiseLoss()(values[:b], values[b:], ids[:b], ids[b:], mask[:b], mask[b:],
                              pad_token_id=model.pad_token_id,
                              num_padding_at_beginning=model.num_padding_at_beginning)
    ends = model.end_scores(values, ids, mask)
    return LastTokenPairLoss()(ends[:b], ends[b:]), ends[:b], ends[b:]


@torch.no_grad()
def evaluate(engine, loader, strategy, cfg: RewardConfig) -> dict:
    """Mean chosen/rejected end scores, gap, accuracy and loss over the eval split (all ranks)."""
    model = unwrap(engine)
    engine.eval()
    sums = torch.zeros(5)
    for batch in C.limited(loader, cfg.eval_iters):
        batch = C.to_device(batch, strategy.device)
        values = engine(batch["input_ids"], batch["attention_mask"])
        loss, c, r = reward_loss(model, values, batch, cfg)
        n = len(c)
        sums += torch.tensor([c.float().sum(), r.float().sum(), (c > r).float().sum(), float(loss) * n, n])
    engine.train()
    sums = strategy.all_reduce_sum(sums).cpu()
    n = max(float(sums[4]), 1.0)
    chosen, rejected = float(sums[0]) / n, float(sums[1]) / n
    return {"chosen_score": chosen, "rejected_score": rejected, "score_gap": chosen - rejected,
            "accuracy": float(sums[2]) / n, "eval_loss": float(sums[3]) / n}


def run_reward(cfg: RewardConfig) -> dict:
    # ---- set-up: checks first ----------------------------------------------------------------------------
    strategy, out, tokenizer = C.setup_step(cfg, what="reward model")
    npb = cfg.num_padding_at_beginning if cfg.num_padding_at_beginning >= 0 else num_padding_at_beginning(tokenizer)

    train_dl, eval_dl, total_steps = C.phase_loaders(2, cfg, tokenizer, strategy, PairCollator(tokenizer.pad_token_id))

    with strategy.zero3_init_context():
        model = load_reward_model(cfg.model_name_or_path, dtype=strategy.torch_dtype, num_padding_at_beginning=npb,
                                  dropout=C.dropout_value(cfg), pad_token_id=tokenizer.pad_token_id,
                                  trust_remote_code=cfg.trust_remote_code)
        if len(tokenizer) > C.embedding_rows(model.rwtransformer):
            model.rwtransformer.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    C.maybe_lora(model.rwtransformer, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler = C.create_optimizer_and_scheduler(strategy, model, cfg, total_steps)
    engine = strategy.prepare(model, optimizer, scheduler)

    run_config = {"step": STEP, **dataclasses.asdict(cfg), "num_padding_at_beginning": npb}
    prog, writer, save_checkpoint = C.start_run(STEP, cfg, strategy, engine, tokenizer, out, run_config)

    def compute_loss(batch):
        values = engine(batch["input_ids"], batch["attention_mask"])
        loss, c, r = reward_loss(model, values, batch, cfg)
        c, r = c.detach().float(), r.detach().float()
        return loss, {"chosen_score": c.mean(), "rejected_score": r.mean(), "accuracy": (c > r).float().mean()}

    def run_eval() -> dict:
        return evaluate(engine, eval_dl, strategy, cfg)

    # ---- eval before training, loop, final eval ----------------------------------------------------------
    first = run_eval()
    writer.log("eval", prog.global_step, **first)
    log_line(f"[reward] before training: chosen {first['chosen_score']:.3f} rejected {first['rejected_score']:.3f} "
               f"gap {first['score_gap']:.3f} accuracy {first['accuracy']:.3f} loss {first['eval_loss']:.4f}")
    last = C.train_loop(STEP, cfg, strategy, engine, train_dl, total_steps, prog, writer, compute_loss, run_eval,
                        save_checkpoint, model_dims(engine))
    final = run_eval()
    writer.log("eval", prog.global_step, **final)
    log_line(f"[reward] final step {prog.global_step}: chosen {final['chosen_score']:.3f} rejected "
               f"{final['rejected_score']:.3f} gap {final['score_gap']:.3f} accuracy {final['accuracy']:.3f} "
               f"loss {final['eval_loss']:.4f}")

    summary = {"global_step": prog.global_step, "train_loss": last.get("loss", float("nan")),
               "accuracy_start": first["accuracy"], **final}
    return C.finish_step(STEP, cfg, strategy, engine, tokenizer, out, run_config, writer, summary)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RewardConfig, argv, prog="chatrlhf reward", description=__doc__)
    return C.run_main(run_reward, cfg)
