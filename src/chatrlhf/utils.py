"""Small shared helpers: environment set-up, logging on rank 0, seeding, atomic files."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger("chatrlhf")


def setup_env() -> None:
    """Process start-up of every command. Picks no device: DeepSpeed's own accelerator detection does that when a
    command needs one (``accelerator_info``), so an NPU/XPU host is not pinned to the CPU here, and commands that
    need no device do not pay for importing torch or DeepSpeed.

    Keeps DeepSpeed's JIT-compiled ops in a per-user cache (first use compiles for ~30 s); INFO logging on rank 0
    only (every other rank of a multi-rank run would repeat each line).
    """
    # One cache per user, not per working directory: the shm_comm op takes tens of seconds to compile.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "chatrlhf" / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # our own progress bars show the work; the per-file "Loading weights"/"Writing model shards" bars only clutter
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # pinned to the CPU by the user: tune before the first big allocation (detected CPUs: accelerator_info)
        tune_cpu_malloc()
    if not logging.getLogger().handlers:
        # launchers (torchrun, deepspeed) set RANK before the process starts
        level = logging.INFO if env_rank() == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def cache_dir() -> Path:
    """chatrlhf's own cache root: ``$CHATRLHF_CACHE_DIR``, default ``~/.cache/chatrlhf`` (engine/calibrate.py's
    path choices, models/gguf.py's converted models). Here, not in the engine, so finding it imports no DeepSpeed."""
    return Path(os.environ.get("CHATRLHF_CACHE_DIR") or Path.home() / ".cache" / "chatrlhf")


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def progress_bars_enabled() -> bool:
    """Progress bars only where someone watches them: on a terminal. ``CHATRLHF_PROGRESS=1/0`` decides instead
    (``chatrlhf train`` sets it for its steps, whose output reaches the terminal through a pipe)."""
    forced = os.environ.get("CHATRLHF_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


_MALLOC_TUNED = False


def tune_cpu_malloc() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks over its (adaptive, at most 32 MiB) threshold with fresh ``mmap``s and trims the
    heap top after frees, so every step's activations and gradients arrive as new pages (here: no mmap for any
    size, no trim): 40-70k page faults and 0.1-0.3 s of kernel time in each ~1.4 s SFT step of the mid bench model
    (hidden 768), none once tuned. This is what jemalloc/tcmalloc are preloaded for in CPU training recipes;
    ``mallopt`` gets it without a preload. The process keeps its peak heap (as those allocators do). Off with
    CHATRLHF_MALLOC_TUNING=0; a no-op on non-glibc systems. Returns whether it applied.

    What it does not cure: torch allocates with ``posix_memalign(64)``, which glibc 2.36 serves by asking for size +
    64 + 32 bytes; once small blocks take the split-off bytes around a freed large block, a new tensor of the same
    size no longer fits in it and comes from fresh pages (a [49152, 576] fp32 ``zeros`` alternated 9 / 46 ms, 27.6k
    faults; a PPO step of SmolLM2-135M still takes ~180-200k faults, 1.0-1.7 s of kernel time in 12-17 s on a 2-core
    EPYC). So long-lived buffers are reused by their owners instead (the decoder's weight copies, engine/hybrid.py).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("CHATRLHF_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
        # mallopt takes a C int: ctypes masks wider Python ints to 32 bits (1 << 40 became 0 = trim on every free).
        # No mmap at all: blocks over the 32 MiB threshold's ceiling (SmolLM2's 49152 x 576 embedding gradient and
        # its fp32 copies, the logits chunks) were still fresh pages every step; from the heap, the real bench
        # model's SFT step ran 7% faster, RM 14%, PPO 17% (measured side by side)
        ok = (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_MMAP_MAX, 0)
              and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(M_TOP_PAD, 64 << 20))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def get_rank() -> int:
    try:
        import torch.distributed as dist  # lazy: torch

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return int(os.environ.get("RANK", "0"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_world_size() -> int:
    try:
        import torch.distributed as dist  # lazy: torch

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return get_rank() == 0


def print_rank0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def set_seed(seed: int) -> None:
    import numpy as np  # lazy: numpy
    import torch  # lazy: torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so a crash leaves either the old or the new content, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    A killed writer leaves only a ``.tmp-*`` directory behind, never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def free_port() -> int:
    """A free TCP port on the loopback interface (for a one-process torch.distributed group or a launcher)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_N`` dirs with trainer_state.json, which is written last) under root, any order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.glob("step_*") if p.name.split("_")[1].isdigit() and (p / "trainer_state.json").exists()]


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    done = latest_checkpoints(root)
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None
