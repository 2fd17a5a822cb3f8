"""The memory model of a training rank: weights, gradients and optimizer states under ZeRO and offload. Pure
arithmetic (no torch), so `chatrlhf train`'s preflight can use it before anything heavy is imported; the strategy
(estimate_memory) and the preflight (apps/preflight.py, which adds activations and KV caches) share it."""

from __future__ import annotations


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("fp32", "float32") else 2


def static_memory(n_params: int, zero_stage: int, dtype: str, world_size: int = 1, offload: bool = False,
                  on_cpu: bool = True, trainable: int | None = None, frozen: bool = False) -> dict[str, int]:
    """Bytes per rank for weights, gradients and Adam states (mixed precision: fp32 master + 2 moments = 12 B
    per trainable param; fp32: 2 moments = 8 B). ZeRO-1 shards optimizer states, 2 also gradients, 3 also weights.
    Offload moves optimizer state (and ZeRO-3 weights) to host memory, which on CPU is the same memory."""
    w = dtype_bytes(dtype)
    ws = max(1, world_size)
    trainable = 0 if frozen else (n_params if trainable is None else trainable)
    weights = n_params * w // (ws if zero_stage >= 3 else 1)
    grads = trainable * w // (ws if zero_stage >= 2 else 1)
    optim = trainable * (8 if w == 4 else 12) // (ws if zero_stage >= 1 else 1)
    if offload and zero_stage >= 1 and not on_cpu:  # ZeRO-0 cannot offload (the steps refuse it)
        optim = 0
        if zero_stage >= 3:
            weights = 0
    return {"weights": int(weights), "gradients": int(grads), "optimizer": int(optim)}
