"""The engine: DeepSpeed behind one object (strategy.DeepSpeedStrategy), devices/dtypes/RNG (device.py), the rollout
decoder (hybrid.py, native.py), CPU kernels (fused.py) and inference loading (generation.py).

The strategy's names are re-exported lazily (PEP 562): importing a light engine module does not import DeepSpeed.
"""

import importlib

_EXPORTS = {n: "strategy" for n in ("DeepSpeedStrategy", "MemoryEstimate", "StrategyConfig", "available_memory_bytes",
                                    "estimate_memory")}
_EXPORTS.update(resolve_dtype="device", unwrap="chatrlhf.models.dims", find_latest_checkpoint="chatrlhf.utils")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = _EXPORTS[name]
        return getattr(importlib.import_module(mod if "." in mod else f"{__name__}.{mod}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
