"""Opt-in Liger-Kernel (``--use_liger_kernel``): its Triton kernels for RMSNorm, SwiGLU, RoPE and fused linear +
cross-entropy on GPUs, applied by model type through the library's own public ``apply_liger_kernel_to_<type>``
functions (as Liger does for transformers models; it patches the modeling module of that type, so every model of
the type in the process takes them). No Triton GPU, no package, or a model type Liger does not cover: one clear
error before any model loads, never a silent fallback for a flag the user asked for.
"""

from __future__ import annotations

import logging

from chatrlhf.errors import UserError

logger = logging.getLogger(__name__)


def check_available(device_type: str) -> None:
    """Raise a UserError when Liger-Kernel cannot run here (before models load)."""
    if device_type == "cpu":
        raise UserError("--use_liger_kernel needs a GPU: Liger-Kernel's kernels are Triton GPU kernels, and this run "
                        "is on the CPU (drop the flag)")
    try:
        import liger_kernel.transformers  # noqa: F401  # lazy: liger_kernel
    except ImportError as e:
        raise UserError(f"--use_liger_kernel: Liger-Kernel cannot be imported ({e}); pip install liger-kernel") \
            from None


def apply(model, model_type: str) -> str:
    """Patch ``model`` (a transformers model, or our reward model's body) with Liger's kernels for ``model_type``;
    returns the function applied."""
    import liger_kernel.transformers as lk  # lazy: liger_kernel

    name = f"apply_liger_kernel_to_{model_type}"
    fn = getattr(lk, name, None)
    if fn is None:
        raise UserError(f"--use_liger_kernel: Liger-Kernel has no kernels for model type {model_type!r}")
    fn(model=model)
    logger.info("Liger-Kernel applied to %s (%s)", type(model).__name__, name)
    return name
