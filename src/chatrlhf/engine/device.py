"""Devices, dtypes and RNG state: what DeepSpeed's accelerator abstraction decides, in one place.

Nothing here names a device: ``get_accelerator()`` picks it (DS_ACCELERATOR when set, else XPU, NPU, ..., CUDA, else
the CPU), so the same code runs everywhere, and every command prints the device and dtype it uses
(``announce_device``). Training and inference resolve ``--dtype auto`` differently on the CPU (training: bf16 where
the CPU has AVX512-BF16/AMX; inference: fp32, which decodes faster there), both through ``torch_dtype``.
"""

from __future__ import annotations

import os
import random
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatrlhf.errors import UserError
from chatrlhf.utils import env_rank, tune_cpu_malloc

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def accelerator():
    from deepspeed.accelerator import get_accelerator  # lazy: deepspeed

    return get_accelerator()


def accelerator_info() -> dict[str, Any]:
    """The device DeepSpeed's accelerator detection picked: DS_ACCELERATOR when the user set it, else the first
    accelerator it finds (XPU, NPU, ..., CUDA), else the CPU -> {"name", "count", "how"}. On the CPU the malloc
    tuning (utils.tune_cpu_malloc) is applied."""
    acc = accelerator()
    name = acc.device_name()
    forced = os.environ.get("DS_ACCELERATOR")
    if name == "cpu":
        tune_cpu_malloc()
        return {"name": "cpu", "count": 0,
                "how": f"DS_ACCELERATOR={forced}" if forced else "no accelerator found: DeepSpeed fell back to CPU"}
    return {"name": name, "count": int(acc.device_count()),
            "how": f"DS_ACCELERATOR={forced}" if forced else "detected by DeepSpeed"}


def total_memory() -> int:
    """Bytes of one accelerator device."""
    return int(accelerator().total_memory())


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32'/'float32', 'bf16'/'bfloat16', 'fp16'/'float16' (or a torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = _ALIASES.get(name, name)
    if key not in DTYPES:
        raise UserError(f"--dtype must be one of auto, fp32, bf16, fp16; got {name!r}")
    return DTYPES[key]


def resolve_dtype(dtype: str) -> str:
    """Training: 'auto' -> bf16 where the device does bf16 natively (GPU with bf16, CPU with AVX512-BF16/AMX), else
    fp32 (CPU) or fp16. fp16 on CPU is refused: matmuls run ~1 GFLOP/s there and overflow handling buys nothing."""
    acc = accelerator()
    on_cpu = acc.device_name() == "cpu"
    if dtype == "auto":
        if on_cpu:
            return "bf16" if cpu_supports_bf16() else "fp32"
        return "bf16" if acc.is_bf16_supported() else "fp16"
    torch_dtype(dtype)  # validates the name
    dtype = _ALIASES.get(dtype, dtype)
    if dtype == "fp16" and on_cpu:
        raise UserError("--dtype fp16 is not usable on CPU (fp16 matmuls are ~400x slower than bf16 here and "
                        "need loss scaling); use --dtype bf16 or --dtype fp32")
    return dtype


def inference_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Inference: ``None``/"auto" -> fp32 on CPU (fp16 is ~100x slower there), else bf16 where the accelerator
    supports it, fp16 where not."""
    if dtype in (None, "", "auto"):
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if accelerator().is_bf16_supported() else torch.float16
    return torch_dtype(dtype)


def train_dtype(flag: str) -> tuple[str, str]:
    """(dtype a training step uses for ``--dtype flag``, why) -- the strategy's own resolution."""
    dtype = resolve_dtype(flag)
    if flag != "auto":
        return dtype, "--dtype"
    name = accelerator_info()["name"]
    if name == "cpu":
        return dtype, "auto: " + ("AVX512-BF16/AMX on this CPU" if dtype == "bf16" else "no AVX512-BF16/AMX on this CPU")
    return dtype, f"auto: {name} " + ("supports bf16" if dtype == "bf16" else "has no bf16")


_ANNOUNCED: str | None = None


def device_line(dtype: str, why: str, info: dict[str, Any] | None = None) -> str:
    info = info or accelerator_info()
    label = info["name"] if info["count"] <= 1 else f"{info['name']} x{info['count']}"
    return f"device: {label} ({info['how']}) | dtype: {dtype} ({why})"


def announce_device(dtype: str, why: str, info: dict[str, Any] | None = None) -> str:
    """Print the device/dtype line once per process (rank 0, stderr: stdout may carry a command's answers)."""
    global _ANNOUNCED
    line = device_line(dtype, why, info)
    if _ANNOUNCED != line and env_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    _ANNOUNCED = line
    return line


def gathered(params, modifier_rank: int | None = None):
    """ZeRO-3: gather these (partitioned) parameters for the block (and, with ``modifier_rank``, broadcast that
    rank's changes when it ends). A plain no-op context for parameters that are not partitioned."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed  # lazy: deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


# ---- RNG state --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy, torch (and accelerator) RNG states as plain JSON (no pickles)."""

    py = random.getstate()
    npst = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
           "torch": torch.get_rng_state().tolist()}
    acc = accelerator()
    if acc.device_name() != "cpu":
        out["accelerator"] = acc.get_rng_state().tolist()
    return out


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "accelerator" in s:
        accelerator().set_rng_state(torch.tensor(s["accelerator"], dtype=torch.uint8))
