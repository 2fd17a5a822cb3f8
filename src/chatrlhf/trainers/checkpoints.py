"""What a checkpoint was trained with (the run record), which checkpoint a run resumes (refusing one of other
settings), the run's position in its data (Progress), and done.json, written last when a step has finished."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatrlhf.data.sources import fingerprint
from chatrlhf.engine.strategy import read_trainer_state, remove_stale_staging, set_run_record
from chatrlhf.errors import UserError
from chatrlhf.trainers.config import TrainConfig
from chatrlhf.trainers.metrics import cut_metrics, log_line, read_metrics
from chatrlhf.utils import atomic_write_json, find_latest_checkpoint, is_rank0


# ---- what a checkpoint was trained with ---------------------------------------------------------------------
# Fields a resumed run may change: where, how often and what is written or printed, and memory/speed trade-offs
# with the same math. Every other config field (including ones added later) is recorded and must match.
RESUME_FREE_FIELDS = frozenset({
    "output_dir", "resume", "local_rank", "log_interval", "print_loss", "enable_tensorboard", "tensorboard_path",
    "save_interval", "keep_last_checkpoints", "save_lora_adapter", "eval_interval", "eval_iters",
    "per_device_eval_batch_size", "skip_memory_check", "data_output_path", "reload", "offload",
    "gradient_checkpointing", "actor_gradient_checkpointing", "critic_gradient_checkpointing",
    "offload_reference_model", "offload_reward_model", "enable_hybrid_engine", "reuse_experience_forward",
    "print_answers", "print_answers_interval", "max_consecutive_skips", "trust_remote_code", "length_guard_steps",
    "length_guard_min_tokens"})
# The run's length may change (extending a run): noted, not refused. A non-constant schedule then follows the new
# length from the resume step on (the scheduler's position is restored, its length comes from the new flags).
RESUME_LENGTH_FIELDS = ("max_steps", "num_train_epochs", "enable_test_mode", "test_stop_step")
_PATH_FIELDS = ("data_path", "sft_only_data_path", "unsupervised_dataset_name")
_DATA_PARTS = {"data_path": "the content of the --data_path files",
               "sft_only_data_path": "the content of the --sft_only_data_path files",
               "unsupervised": "the content of --unsupervised_dataset_name",
               "tokenizer": "the model's tokenizer files"}
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece", "sentencepiece")


def _local_path(value: Any) -> Any:
    """A local path (or NAME=PATH entry) made absolute, so the same data named from another directory matches."""
    if not isinstance(value, str) or not value:
        return value
    if os.path.exists(os.path.expanduser(value)):
        return str(Path(value).expanduser().resolve())
    name, sep, path = value.partition("=")
    if sep and os.path.exists(os.path.expanduser(path)):
        return f"{name}={Path(path).expanduser().resolve()}"
    return value


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(cfg) -> dict[str, str]:
    """Digests of what the tokenized data is made from (the data files' content and the tokenizer's files; the
    split, seed and lengths are config fields): equal digests give equal tokenized sets, and this needs no data
    cache, which a run may share or rebuild."""

    def entry(e: str) -> Any:
        try:
            return fingerprint(e)
        except Exception:  # noqa: BLE001 - the data build already refused what cannot be read; keep the name
            return {"entry": e}

    parts: dict[str, Any] = {k: [entry(e) for e in getattr(cfg, k, None) or []]
                             for k in ("data_path", "sft_only_data_path")}
    if getattr(cfg, "unsupervised_dataset_name", ""):
        parts["unsupervised"] = entry(cfg.unsupervised_dataset_name)
    model = Path(getattr(cfg, "actor_model_name_or_path", "") or getattr(cfg, "model_name_or_path", "") or ".")
    tok: list[Any] = []
    if model.is_dir():
        for f in sorted(model.iterdir()):
            if f.is_file() and f.name.startswith(_TOKENIZER_FILES):
                tok.append([f.name, hashlib.sha256(f.read_bytes()).hexdigest()])
    parts["tokenizer"] = tok if tok else str(model)
    return {k: _digest(v) for k, v in parts.items()}


def run_record(cfg) -> dict:
    """What a checkpoint is trained with: every config field but RESUME_FREE_FIELDS (paths made absolute) and the
    data fingerprint. Saved in each checkpoint's trainer_state.json, compared when a run resumes from it."""

    config = {}
    for f in dataclasses.fields(cfg):
        if f.name in RESUME_FREE_FIELDS:
            continue
        v = getattr(cfg, f.name)
        if f.name.endswith("model_name_or_path") or f.name in _PATH_FIELDS:
            v = [_local_path(x) for x in v] if isinstance(v, (list, tuple)) else _local_path(v)
        config[f.name] = v
    return {"config": json.loads(json.dumps(config, default=str)), "data": data_fingerprint(cfg)}


def check_run_record(ckpt: Path, saved: Any, record: dict, force: bool = False) -> None:
    """Refuse (UserError listing each difference, old -> new) to resume a checkpoint trained with other settings or
    data; ``force`` turns that into a warning. A checkpoint without a record (older chatrlhf) resumes with a
    warning. A changed run length is only noted."""
    show = lambda v: json.dumps(v)  # noqa: E731
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        log_line(f"warning: {ckpt} does not record the settings it was trained with (saved by an older chatrlhf); "
                 "resuming without checking them against this run's")
        return
    old, new = saved["config"], record["config"]
    # a field only one side has came or went with a chatrlhf version: nothing to compare it with
    both = sorted(set(old) & set(new))
    diffs = [f"--{k} {show(old[k])} -> {show(new[k])}" for k in both
             if k not in RESUME_FREE_FIELDS and k not in RESUME_LENGTH_FIELDS and old[k] != new[k]]
    old_data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    diffs += [f"{_DATA_PARTS.get(k, k)} changed" for k in sorted(set(old_data) & set(record["data"]))
              if old_data[k] != record["data"][k]]
    if diffs and not force:
        raise UserError(f"--resume: {ckpt} was trained with other settings than this run: {'; '.join(diffs)}. "
                        "Start fresh with --resume never (or a new --output_dir), or continue from it anyway with "
                        "--resume force")
    if diffs:
        log_line(f"warning: --resume force: continuing from {ckpt} although it was trained with other settings: "
                 + "; ".join(diffs))
    lengths = [f"--{k} {show(old[k])} -> {show(new[k])}" for k in RESUME_LENGTH_FIELDS
               if k in both and old[k] != new[k]]
    if lengths:
        log_line(f"resuming {ckpt} with another run length ({'; '.join(lengths)}); a non-constant learning-rate "
                 "schedule follows the new length from here")


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start.

    ``--resume``: auto (latest complete checkpoint in OUTPUT/checkpoints), never, force (auto without refusing a
    settings/data mismatch), a path, or force:PATH. The checkpoint must have been trained with this run's settings
    and data (``check_run_record``); this run's record is registered for the checkpoints it will save. Rank 0 then
    readies the output dir: leftovers of a save killed midway go, and metrics.jsonl is cut back to the step the run
    starts from (the steps after it are redone; their rows would otherwise appear twice)."""

    out = Path(cfg.output_dir)
    record = run_record(cfg)
    set_run_record(out / "checkpoints", record)
    mode, force = str(cfg.resume), False
    if mode == "force" or mode.startswith("force:"):
        mode, force = mode[len("force:"):] or "auto", True
    ckpt: Path | None = None
    if mode == "auto":
        ckpt = find_latest_checkpoint(out / "checkpoints")
    elif mode != "never":
        p = Path(mode)
        ckpt = p if (p / "trainer_state.json").exists() else find_latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"--resume {p}: no complete checkpoint there (a step_N dir with trainer_state.json)")
    start = -1  # a fresh start keeps no rows
    if ckpt is not None:
        state = read_trainer_state(ckpt)
        check_run_record(ckpt, state.get("run"), record, force)
        try:
            start = int(state.get("step", 0))
        except (TypeError, ValueError):
            raise UserError(f"{ckpt / 'trainer_state.json'}: 'step' is not a number; the checkpoint is damaged "
                            "(remove it, or --resume never)") from None
    if is_rank0():
        for p in remove_stale_staging(out):
            log_line(f"removed {p} (left by a save that was interrupted)")
        n = cut_metrics(out, start)
        if n:
            why = f"rows after step {start} removed (those steps run again)" if start >= 0 else \
                "rows of an earlier run removed (this run starts fresh)"
            log_line(f"{out / 'metrics.jsonl'}: {n} {why}")
    return ckpt


@dataclass
class Progress:
    """Where the loop is: optimizer steps done, epoch, micro-batches consumed in that epoch."""
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def as_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


def restore_progress(state: dict) -> Progress:
    return Progress(int(state["global_step"]), int(state["epoch"]), int(state["batch_in_epoch"]))


def write_done(output_dir: str | os.PathLike, step: str, metrics: dict) -> None:
    """done.json, the pipeline's "this step finished" marker: only after real training, and always strict JSON.

    A step that took no optimizer step must not look finished (`chatrlhf train` would carry an untrained model
    forward): UserError instead. NaN/Infinity are not JSON: such metrics are written as null and listed under
    ``non_finite_metrics``."""

    # optimizer_steps (when a step reports it) counts only applied updates; global_step/steps count loop steps
    steps = next((metrics[k] for k in ("optimizer_steps", "global_step", "steps") if metrics.get(k) is not None), None)
    if steps is not None and int(steps) < 1:
        why = f" ({metrics['stopped_reason']})" if metrics.get("stopped_reason") else ""
        raise UserError(f"{step}: no optimizer step was taken{why}; done.json not written, so this step does not "
                        f"count as finished. Check the data and the step flags, then rerun")
    metrics = _with_run_totals(output_dir, metrics)
    bad: list[str] = []
    clean = _json_safe(metrics, "", bad)
    record = {"step": step, "metrics": clean, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if bad:
        record["non_finite_metrics"] = bad
        log_line(f"[{step}] non-finite metrics written as null in done.json: {', '.join(bad)}")
    if is_rank0():
        atomic_write_json(Path(output_dir) / "done.json", record)


# Per-step counters a step's summary takes from its last train record; done.json reports them summed over the run.
RUN_TOTALS = ("skipped",)


def _with_run_totals(output_dir: str | os.PathLike, metrics: dict) -> dict:
    """``metrics`` with each RUN_TOTALS counter summed over the run's train records in metrics.jsonl (cut back to
    the resume step on resume, so a resumed run counts each step once); the last step's own value stays as
    ``<name>_last_step``."""
    keys = [k for k in RUN_TOTALS if k in metrics]
    if not keys:
        return metrics

    rows = [r for r in read_metrics(Path(output_dir)) if r.get("kind") == "train"]
    out = dict(metrics)
    for k in keys:
        out[f"{k}_last_step"] = metrics[k]
        out[k] = sum(int(r.get(k) or 0) for r in rows)
    return out


def _json_safe(value: Any, where: str, bad: list[str]) -> Any:
    """``value`` with every NaN/Infinity float replaced by None (their paths appended to ``bad``)."""
    if isinstance(value, dict):
        return {k: _json_safe(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(where)
        return None
    return value
