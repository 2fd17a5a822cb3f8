"""Pick the fastest implementation of a hot path on the machine at hand: measured once per processor, software
version and shape, then cached.

A specialised path (the native decode step, packed weights, a fused kernel) can be several times faster on one
processor and several times slower on another (the native decode step: 21 ms a token on an AVX-512 Xeon, 311 ms on
an AVX2 EPYC where ``generate()`` took 50 ms). So nothing is chosen by a rule about the processor: :func:`choose`
runs every candidate side by side on the real shapes, keeps the fastest, and remembers it in
``$CHATRLHF_CACHE_DIR/calibration.json`` (default ``~/.cache/chatrlhf``) under a key made of the processor's model
and flags, the torch version, the thread count, the part and its shape. A later process with the same key reuses
the choice (so a resumed run takes the same path); a new processor or release measures again.

``CHATRLHF_PATH_<PART>=<candidate>`` (e.g. ``CHATRLHF_PATH_DECODE=generate``) forces a choice where that candidate
applies. :func:`decisions` lists what this process chose and why (the bench records it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from chatrlhf.utils import cache_dir

logger = logging.getLogger(__name__)

_decided: dict[str, dict] = {}  # key -> record, for this process


def cache_file() -> Path:

    return cache_dir() / "calibration.json"


@lru_cache(maxsize=1)
def processor() -> dict:
    """The processor's model name and its instruction-set flags (what decides which kernels are fast)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "Model") and model in ("", platform.processor(), platform.machine()):
                model = v.strip()
            elif k in ("flags", "Features") and not flags:
                flags = v.strip()
    except OSError:
        pass
    simd = sorted(f for f in flags.split() if f.startswith(("avx", "fma", "amx", "sse4", "neon", "asimd", "sve")))
    return {"model": model, "machine": platform.machine(), "simd": simd}


def _signature() -> str:
    p = processor()
    text = json.dumps([p["model"], p["machine"], p["simd"], torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(key: str, record: dict) -> None:
    """Add ``record`` to the cache file atomically (concurrent ranks each write a whole file; last one wins)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load()
        data[key] = record
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the choice holds for this process only
        logger.debug("calibration cache not written (%s)", e)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_candidates(candidates: dict[str, Callable[[], object]], reps: int = 3,
                    device: torch.device | None = None) -> dict[str, float]:
    """Best-of-``reps`` seconds of each candidate, run interleaved after one untimed warm-up call each (so a slow
    spell of a shared machine hits them alike)."""
    for fn in candidates.values():
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def choose(part: str, shape: dict, candidates: dict[str, Callable[[], object]], *, reps: int = 3,
           device: torch.device | None = None, describe: str = "") -> str:
    """The name of the fastest of ``candidates`` (callables running the part once on representative inputs) for
    ``part`` at ``shape`` on this machine, measured on first use and cached. A single candidate is returned as is;
    ``CHATRLHF_PATH_<PART>`` forces a candidate. ``describe`` names the shape in the log line."""
    names = list(candidates)
    forced = os.environ.get(f"CHATRLHF_PATH_{part.upper()}")
    if forced in candidates:
        return forced
    if len(names) == 1:
        return names[0]
    key = f"{part}|{json.dumps(shape, sort_keys=True)}|{'/'.join(sorted(names))}|{_signature()}"
    if key in _decided:
        return _decided[key]["choice"]
    record = _load().get(key)
    if not (isinstance(record, dict) and record.get("choice") in candidates):
        seconds = time_candidates(candidates, reps=reps, device=device)
        record = {"choice": min(seconds, key=seconds.get), "seconds": seconds, "part": part, "shape": shape,
                  "processor": processor()["model"], "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _store(key, record)
        how = "measured"
    else:
        how = "cached"
    _decided[key] = dict(record, how=how)
    times = ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in sorted(record["seconds"].items(), key=lambda x: x[1]))
    logger.info("%s%s: %s path (%s on %s: %s)", part, f" [{describe}]" if describe else "", record["choice"], how,
                record.get("processor", "?"), times)
    return record["choice"]


def decisions() -> list[dict]:
    """What this process chose: part, shape, choice, per-candidate seconds, measured or cached."""
    return [dict(r) for r in _decided.values()]
