"""DeepSpeed behind one object: see strategy.DeepSpeedStrategy."""

from chatrlhf.engine.strategy import (DeepSpeedStrategy, MemoryEstimate, StrategyConfig, available_memory_bytes,
                                      estimate_memory, find_latest_checkpoint, resolve_dtype, unwrap)

__all__ = ["DeepSpeedStrategy", "StrategyConfig", "MemoryEstimate", "estimate_memory", "available_memory_bytes",
           "find_latest_checkpoint", "resolve_dtype", "unwrap"]
