"""What a step-3 run is built from: the tokenizer (checked against the reward model's and the critic's), the
actor-like and reward-like models, the ptx data, the EMA's weights in checkpoints, and the derived sizes.
:class:`chatrlhf.trainers.ppo.trainer.PPOTrainer` assembles them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from chatrlhf.engine.device import gathered
from chatrlhf.errors import UserError
from chatrlhf.models.dims import unwrap
from chatrlhf.models.loading import check_tokenizers_compatible, load_causal_lm, load_tokenizer
from chatrlhf.models.reward_model import load_reward_model
from chatrlhf.trainers import common
from chatrlhf.trainers.config import TrainConfig
from chatrlhf.trainers.ppo import experience as px
from chatrlhf.trainers.ppo.config import PPOConfig
from chatrlhf.utils import print_rank0


def load_tokenizers(cfg: PPOConfig) -> tuple[Any, str]:
    """The actor's tokenizer (left padding, for generation), checked against the reward model's and the critic's
    (they read the actor's token ids) before anything trains. Returns it and the reward model's path ('' when no
    reward model scores the answers)."""
    use_rm = cfg.uses_reward_model and cfg.reward_model_weight != 0
    reward_path = (cfg.reward_model_name_or_path or cfg.critic_model_name_or_path) if use_rm else ""
    trust = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.actor_model_name_or_path, padding_side="left", trust_remote_code=trust)
    if use_rm:
        check_tokenizers_compatible(tokenizer, load_tokenizer(reward_path, trust_remote_code=trust),
                                    ("actor", "reward model"))
    if cfg.algo == "ppo" and cfg.critic_model_name_or_path and cfg.critic_model_name_or_path != reward_path:
        check_tokenizers_compatible(tokenizer, load_tokenizer(cfg.critic_model_name_or_path, trust_remote_code=trust),
                                    ("actor", "critic"))
    return tokenizer, reward_path


def train_view(cfg: PPOConfig, who: str) -> TrainConfig:
    """The TrainConfig fields the shared helpers read, for the actor or the critic."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    d.update(model_name_or_path=getattr(cfg, f"{who}_model_name_or_path"), zero_stage=getattr(cfg, f"{who}_zero_stage"),
             lora_dim=getattr(cfg, f"{who}_lora_dim"), learning_rate=getattr(cfg, f"{who}_learning_rate"),
             weight_decay=getattr(cfg, f"{who}_weight_decay"), dropout=getattr(cfg, f"{who}_dropout"),
             gradient_checkpointing=getattr(cfg, f"{who}_gradient_checkpointing"),
             lora_module_name=getattr(cfg, f"{who}_lora_module_name") or cfg.lora_module_name,
             per_device_train_batch_size=cfg.per_device_training_batch_size)
    return TrainConfig(**d)


def load_actor_like(cfg: PPOConfig, strategy, tokenizer, zero_stage: int, train: bool, lora: bool):
    """Actor, reference or EMA: the step-1 model, partitioned at load under ZeRO-3."""
    view = train_view(cfg, "actor")
    with strategy.zero3_init_context(stage=zero_stage, train=train):
        model = load_causal_lm(cfg.actor_model_name_or_path, dtype=strategy.torch_dtype, dropout=cfg.actor_dropout,
                               tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code)
    if lora:
        model = common.maybe_lora(model, view)
    if train and cfg.actor_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_reward_like(cfg: PPOConfig, strategy, path: str, zero_stage: int, train: bool):
    """Critic (trained) or reward model (frozen): a step-2 reward model, partitioned at load under ZeRO-3."""
    with strategy.zero3_init_context(stage=zero_stage, train=train):
        model = load_reward_model(path, dtype=strategy.torch_dtype, dropout=cfg.critic_dropout,
                                  trust_remote_code=cfg.trust_remote_code)
    if train:
        model = common.maybe_lora(model, train_view(cfg, "critic"))
        if cfg.critic_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def rounds_per_epoch(n_prompt_batches: int, cfg: PPOConfig) -> int:
    """Steps per pass over the prompts (a step uses generation_batches prompt batches)."""
    return max(1, n_prompt_batches // cfg.generation_batches)


def micro_batches_per_round(cfg: PPOConfig) -> int:
    """Micro-steps per step and PPO epoch: each generation batch's rows in training-batch-sized pieces."""
    rows = cfg.per_device_generation_batch_size * cfg.group_size
    return cfg.generation_batches * math.ceil(rows / cfg.per_device_training_batch_size)


def reuses_experience_forward(cfg: PPOConfig, actor, critic) -> bool:
    """On-policy (--reuse_experience_forward, one epoch, one micro-batch per step, deterministic train-mode
    forwards): the experience pass's actor/critic forward is the training forward (see make_experience)."""
    reuse = (cfg.reuse_experience_forward and cfg.ppo_epochs == 1 and micro_batches_per_round(cfg) == 1
             and all(px.train_forward_is_deterministic(m) for m in (actor, critic) if m is not None))
    if cfg.reuse_experience_forward and not reuse:
        print_rank0("experience forwards are repeated for training: --reuse_experience_forward needs --ppo_epochs 1, "
                    "one micro-batch per step (generation rows <= --per_device_training_batch_size, "
                    "--generation_batches 1) and no dropout in the "
                    f"{'actor and critic' if cfg.algo == 'ppo' else 'actor'}")
    return reuse


def config_record(cfg: PPOConfig) -> dict:
    """The run's flags, as saved with its models."""
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ ptx data
def ptx_batches(cfg: PPOConfig, tokenizer, strategy) -> Iterator[dict] | None:
    """--unsupervised_dataset_name: ptx blocks of prompt + answer length, endlessly (reshuffled every pass)."""
    if not cfg.unsupervised_dataset_name:
        return None
    blocks = unsupervised_blocks(load_unsupervised_texts(cfg.unsupervised_dataset_name,
                                                         cfg.unsupervised_dataset_config_name),
                                 tokenizer, cfg.max_prompt_seq_len + cfg.max_answer_seq_len)
    loader = common.make_dataloader(blocks, _collate_blocks, cfg.per_device_training_batch_size, strategy,
                                    shuffle=True, seed=cfg.seed + 1)
    return _cycle(loader)


def _cycle(loader) -> Iterator[dict]:
    """The loader's batches forever, each pass in a new order."""
    ep = 0
    while True:
        loader.sampler.set_epoch(ep)
        yield from loader
        ep += 1


def load_unsupervised_texts(name: str, config_name: str = "") -> list[str]:
    p = Path(name)
    if p.is_file() and p.suffix in (".txt", ""):
        return [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        if p.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            rows = json.loads(p.read_text(encoding="utf-8"))
        return [r["text"] if isinstance(r, dict) else str(r) for r in rows]
    import datasets  # lazy: datasets (hub or save_to_disk ptx data only)

    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    else:
        ds = datasets.load_dataset(name, config_name or None)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[list(ds)[0]]
    if "text" not in ds.column_names:
        raise UserError(f"--unsupervised_dataset_name {name}: no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def unsupervised_blocks(texts: list[str], tokenizer, block_size: int) -> list[torch.Tensor]:
    """DeepSpeed-Chat's group_texts: concatenate all texts (EOS between them) and cut blocks of block_size."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"ptx data has {len(ids)} tokens, fewer than one block of {block_size}")
    return [torch.tensor(ids[i * block_size:(i + 1) * block_size]) for i in range(n)]


def _collate_blocks(items):
    x = torch.stack(items)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


# ------------------------------------------------------------------------------------------------ EMA weights
def named_params_rank0(module, strategy) -> dict[str, torch.Tensor] | None:
    """Raw (un-merged) parameters on rank 0, gathered one at a time under ZeRO-3."""
    out = {}
    for n, p in unwrap(module).named_parameters():
        with gathered([p]):
            if strategy.is_rank0:
                out[n] = p.detach().cpu().clone().contiguous()
    return out if strategy.is_rank0 else None


def load_named_params(module, strategy, path: Path) -> None:
    """The inverse of :func:`named_params_rank0`: rank 0 reads ``path`` into ``module`` (broadcast to the other
    ranks unless ZeRO-3 partitions it)."""
    from safetensors.torch import load_file  # lazy: safetensors (resuming an EMA run only)

    sd = load_file(str(path)) if strategy.is_rank0 else {}
    for n, p in unwrap(module).named_parameters():
        with gathered([p], modifier_rank=0):
            if strategy.is_rank0 or not hasattr(p, "ds_id"):
                if not strategy.is_rank0:
                    continue
                p.data.copy_(sd[n].to(p.dtype))
    if strategy.world_size > 1 and not strategy.is_zero3(module):
        for p in unwrap(module).parameters():
            dist.broadcast(p.data, src=0)
