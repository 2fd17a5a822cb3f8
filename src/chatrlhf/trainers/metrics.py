"""One place where training metrics go: ``metrics.jsonl`` in the step's output dir (read by reports) and
TensorBoard scalars (when enabled). Only rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from chatrlhf.utils import atomic_write_text, is_rank0


def _clean(v: Any) -> Any:
    try:
        import torch  # lazy: torch

        if isinstance(v, torch.Tensor):
            v = v.detach().float().item()
    except ImportError:
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; keep them visible as strings
    return v


class MetricsWriter:
    """``log(kind, step, **scalars)`` appends {"kind", "step", "time", ...} to metrics.jsonl and, when a
    TensorBoard dir is given, writes each scalar as ``kind/name``. Kinds used: "train", "eval", "throughput"."""

    def __init__(self, output_dir: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = is_rank0()
        self._tb = None
        self._fh = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # lazy: torch

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, kind: str, step: int, **scalars: Any) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _clean(v) for k, v in scalars.items()})
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("kind", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def cut_metrics(output_dir: str | Path, step: int) -> int:
    """Keep only the records up to ``step`` in OUTPUT/metrics.jsonl (-1: none): a run resumed from the checkpoint of
    ``step`` logs the steps after it again. Rewritten atomically (a kill leaves the old file or the new one); a torn
    last line goes too. Returns how many lines were dropped."""

    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = int(rec.get("step", 0)) <= step
        except (ValueError, TypeError, AttributeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in keep))
    return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl; a step logged twice (a file from before resumes cut it back) keeps its later record."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves at most one torn last line
        out[(rec.get("kind", ""), int(rec.get("step", 0)))] = rec
    return sorted(out.values(), key=lambda r: (r["kind"], r["step"]))


def log_line(msg: str) -> None:
    """A rank-0 line that does not tear the progress bar."""
    if is_rank0():
        from tqdm.auto import tqdm  # lazy: tqdm (report.py reads metrics at `chatrlhf train` start-up)

        tqdm.write(msg)
