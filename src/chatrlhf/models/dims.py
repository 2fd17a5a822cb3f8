"""A model's size in the terms of the FLOPs formula, and the formula: one home for throughput figures (the steps'
logs, PPO's step split, the benchmark)."""

from __future__ import annotations

from typing import NamedTuple


def unwrap(model):
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


class ModelDims(NamedTuple):
    n_params: int  # ZeRO-3 aware: partitioned parameters count with their full size
    layers: int
    hidden: int
    vocab: int


def model_dims(model) -> ModelDims:
    """Parameters, layers, hidden size and vocabulary of a (possibly wrapped) Hugging Face model; 0 where its config
    has no such field."""
    m = unwrap(model)
    cfg = getattr(m, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first_int(*keys: str) -> int:
        return next((getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k, None), int)), 0)

    n = sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters())
    return ModelDims(int(n), first_int("num_hidden_layers", "n_layer", "num_layers"),
                     first_int("hidden_size", "n_embd", "d_model"), first_int("vocab_size"))


def flops_per_pass(layers: int, hidden: int, vocab: int, batch: int, seq_len: int, k: int = 1) -> float:
    """DeepSpeed-Chat's F(k, B, s) = 24 k B s l h^2 (1 + s/(6h) + V/(16 l h)); k=1 forward, 3 train, 4 with
    gradient checkpointing."""
    if layers <= 0 or hidden <= 0:
        return 0.0
    return 24.0 * k * batch * seq_len * layers * hidden ** 2 * (1.0 + seq_len / (6.0 * hidden)
                                                                 + vocab / (16.0 * layers * hidden))
