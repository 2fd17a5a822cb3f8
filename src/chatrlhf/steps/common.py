"""What every training step shares: the TrainConfig flags (named as DeepSpeed-Chat names them) and small loop helpers
(strategy from flags, tokenizer/model set-up, dataloaders that can resume mid-epoch, schedulers, the throughput
line, RNG state as JSON, resume discovery, done.json)."""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from chatrlhf.errors import ModelError, UserError
from chatrlhf.utils import atomic_write_json

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _h(text: str, default: Any = None, **kw: Any):
    """A field with its help text and, as keywords, its rule (see chatrlhf.config.Check): _h("...", 16, ge=1)."""
    from chatrlhf.config import option

    if "default_factory" in kw:
        return option(text, **kw)
    return option(text, default, **kw)


DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    model_name_or_path: str = _h("Local Hugging Face model dir (or hub name when online) to start from.", "")
    output_dir: str = _h("Where the final checkpoint, metrics.jsonl, checkpoints/ and done.json go.", "output")
    per_device_train_batch_size: int = _h("Micro-batch size per device (rank) for training.", 16, ge=1)
    per_device_eval_batch_size: int = _h("Batch size per device for evaluation.", 16, ge=1)
    learning_rate: float = _h("Initial learning rate (after warmup).", 1e-3, gt=0)
    weight_decay: float = _h("AdamW weight decay (never applied to biases and norm weights).", 0.0, ge=0)
    num_train_epochs: int = _h("Passes over the training data.", 1, ge=1)
    max_steps: int = _h("Stop after this many optimizer steps (-1: run num_train_epochs). Sets the schedule "
                        "length when > 0.", -1, ge=1, special=(-1,))
    gradient_accumulation_steps: int = _h("Micro-batches per optimizer step.", 1, ge=1)
    lr_scheduler_type: str = _h(f"Learning-rate schedule: {', '.join(SCHEDULERS)}.", "cosine", choices=SCHEDULERS)
    num_warmup_steps: int = _h("Warmup steps of the schedule.", 0, ge=0)
    seed: int = _h("Random seed (model init, dropout, data order).", 1234, ge=0, le=2**32 - 1)
    gradient_checkpointing: bool = _h("Recompute activations in backward to save memory (~1/3 more compute).",
                                      False)
    use_liger_kernel: bool = _h("Liger-Kernel's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy) "
                                "for the model's type: GPUs only, needs the liger-kernel package.", False)
    dropout: Optional[float] = _h("Set every dropout probability of the model to this value.", None, ge=0, lt=1)
    disable_dropout: bool = _h("Set every dropout probability to 0 (deterministic training).", False)
    offload: bool = _h("ZeRO-Offload: optimizer states (and ZeRO-3 weights) in host memory, updated by DeepSpeed's "
                       "CPU Adam (its op is compiled on first use, 1-2 min). Needs ZeRO stage 1-3 (ZeRO-0 has no "
                       "partitioned state to offload: refused). On a CPU-only machine it saves no memory.", False)
    dtype: str = _h("Training dtype: auto, fp32, bf16, fp16. auto = bf16 where the device does bf16 natively "
                    "(GPUs with bf16, CPUs with AVX512-BF16/AMX), else fp32 on CPU / fp16 on old GPUs. fp16 is "
                    "refused on CPU.", "auto", choices=DTYPE_CHOICES)
    zero_stage: int = _h("DeepSpeed ZeRO stage 0-3 (3 partitions weights too).", 0, choices=(0, 1, 2, 3))
    lora_dim: int = _h("LoRA rank; 0 disables LoRA.", 0, ge=0)
    lora_module_name: str = _h("Comma-separated module names, suffixes or substrings to put LoRA on (e.g. "
                               "q_proj,v_proj or decoder.layers.). auto = every Linear/Conv1D except lm_head.",
                               "auto")
    only_optimize_lora: bool = _h("Train only the LoRA weights (base weights frozen).", False)
    lora_learning_rate: float = _h("Learning rate of the LoRA parameters.", 5e-4, gt=0)
    save_lora_adapter: bool = _h("Also write the LoRA adapter (peft layout) to OUTPUT/lora_adapter; the main "
                                 "checkpoint always has LoRA merged.", False)
    compute_fp32_loss: bool = _h("Compute the loss from fp32 logits (stabler under bf16/fp16).", False)
    enable_tensorboard: bool = _h("Write TensorBoard scalars.", False)
    tensorboard_path: str = _h("TensorBoard dir (default OUTPUT/tensorboard).", "")
    print_loss: bool = _h("Print the loss of every step on rank 0.", False)
    eval_interval: int = _h("Evaluate every N optimizer steps (0: only before training and after each epoch).", 0,
                            ge=0)
    eval_iters: int = _h("Evaluation batches per evaluation (0: the whole eval split).", 0, ge=0)
    save_interval: int = _h("Write a checkpoint (HF model + resumable state) every N steps (0: only at the end).",
                            0, ge=0)
    keep_last_checkpoints: int = _h("Resumable checkpoints kept under OUTPUT/checkpoints (0: keep all).", 2, ge=0)
    resume: str = _h("auto: continue from the latest checkpoint in OUTPUT/checkpoints if any, refused when it was "
                     "trained with other settings or data (each checkpoint records them); never: start fresh; "
                     "force: like auto, but continue even when settings or data differ (listed as a warning); or a "
                     "path to a checkpoints/step_N dir (force:PATH to skip the check there). A resumed run may "
                     "change --max_steps/--num_train_epochs (a non-constant schedule then follows the new length) "
                     "and flags that do not change the math (output, logging, eval and save intervals, offload, "
                     "gradient checkpointing).", "auto")
    add_eot_token: bool = _h("Add --eot_token as a special token, use it as end-of-text (resizes embeddings).",
                             False)
    eot_token: str = _h("The end-of-text token for --add_eot_token.", "<|endoftext|>")
    local_rank: int = _h("Set by the deepspeed launcher; leave at -1.", -1, ge=-1)
    log_interval: int = _h("Log train metrics and the throughput line every N steps (0: no throughput lines).", 10,
                           ge=0)
    gradient_clipping: float = _h("Clip the global gradient norm to this value (0: no clipping).", 1.0, ge=0)
    skip_memory_check: bool = _h("Skip the out-of-memory preflight estimate.", False)
    trust_remote_code: bool = _h("Run the Python code in the model folder: needed for a custom model family whose "
                                 "config.json auto_map names classes in the folder's modeling_*.py / "
                                 "configuration_*.py. That code runs with your permissions: only for folders you "
                                 "trust. Off: such a folder is refused.", False)

    def validate_train(self) -> None:
        """Every field's type and rule (declared with the field), then what spans fields or touches the disk."""
        from chatrlhf.config import check_fields, check_output_dir

        check_fields(self)
        if not self.model_name_or_path:
            raise UserError("--model_name_or_path is required")
        from chatrlhf.models.registry import resolve_model_path  # smollm2 / x.gguf -> its converted folder

        self.model_name_or_path = resolve_model_path(self.model_name_or_path, "--model_name_or_path")
        if self.add_eot_token and not self.eot_token:
            raise UserError("--add_eot_token needs a non-empty --eot_token")
        check_output_dir(self.output_dir, "--output_dir")
        if self.enable_tensorboard and self.tensorboard_path:
            check_output_dir(self.tensorboard_path, "--tensorboard_path")


# ---- strategy, tokenizer, model --------------------------------------------------------------------------------
def build_strategy(cfg: TrainConfig, zero_stage: int | None = None, micro_batch: int | None = None):
    """The strategy from the shared flags; PPO passes its actor's ZeRO stage and training micro-batch."""
    from chatrlhf.engine import DeepSpeedStrategy, StrategyConfig

    if cfg.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(cfg.local_rank))
    s = DeepSpeedStrategy(StrategyConfig(
        zero_stage=cfg.zero_stage if zero_stage is None else zero_stage, offload=cfg.offload, dtype=cfg.dtype,
        gradient_clipping=cfg.gradient_clipping,
        per_device_train_batch_size=micro_batch or cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, seed=cfg.seed,
        use_liger_kernel=cfg.use_liger_kernel))
    s.setup_distributed()
    return s


def dropout_value(cfg: TrainConfig) -> float | None:
    return 0.0 if cfg.disable_dropout else cfg.dropout


def load_tokenizer_for(cfg: TrainConfig, padding_side: str = "right"):
    from chatrlhf.models.loading import load_tokenizer

    tok = load_tokenizer(cfg.model_name_or_path, padding_side=padding_side, trust_remote_code=cfg.trust_remote_code)
    if cfg.add_eot_token:
        tok.add_special_tokens({"additional_special_tokens": [cfg.eot_token]})
        tok.eos_token = cfg.eot_token
    return tok


def check_model_dir(path: str) -> None:
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a model directory (no config.json); pass a Hugging Face model dir to "
                         "--model_name_or_path")


def count_params_from_config(path: str, trust_remote_code: bool = False) -> int:
    """Parameter count without materialising weights (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # trust_remote_code always explicit: transformers' default (None) asks on stdin
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in m.parameters())


def memory_preflight(strategy, n_params: int, cfg: TrainConfig, what: str = "model",
                     n_trainable: int | None = None, extra_frozen_params: int = 0) -> None:
    """Refuse to start when weights+grads+optimizer state cannot fit, with advice (ZeRO stage, offload, LoRA)."""
    from chatrlhf.engine import available_memory_bytes, estimate_memory

    if cfg.skip_memory_check:
        return
    if n_trainable is None and cfg.lora_dim > 0 and cfg.only_optimize_lora:
        n_trainable = max(1, n_params // 100)  # LoRA adapters are ~0.1-1% of the weights
    est = estimate_memory(n_params, cfg.zero_stage, strategy.cfg.dtype, strategy.world_size, cfg.offload,
                          trainable_params=n_trainable)
    frozen = extra_frozen_params * (4 if strategy.cfg.dtype == "fp32" else 2)
    need = int((est.bytes_per_rank + frozen) * 1.2)  # +20% for activations and buffers
    have = available_memory_bytes()
    if need > have:
        raise UserError(f"out of memory ahead: the {what} ({n_params / 1e9:.2f} B params, {strategy.cfg.dtype}, "
                        f"ZeRO-{cfg.zero_stage}, {strategy.world_size} rank(s)) needs about {need / 2**30:.1f} GiB "
                        f"per rank but {have / 2**30:.1f} GiB is available; {est.advice}. "
                        "(--skip_memory_check to try anyway)")


def load_causal_lm_for(cfg: TrainConfig, strategy, tokenizer=None):
    """The trainable causal LM: ZeRO-3-partitioned at load when stage 3, dropout flags, eot token, LoRA,
    gradient checkpointing."""
    from chatrlhf.models.loading import load_causal_lm

    with strategy.zero3_init_context():
        model = load_causal_lm(cfg.model_name_or_path, dtype=strategy.torch_dtype, dropout=dropout_value(cfg),
                               trust_remote_code=cfg.trust_remote_code)
        # inside the context so transformers gathers ZeRO-3 embeddings while resizing
        if tokenizer is not None and len(tokenizer) > embedding_rows(model):
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    model = maybe_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def embedding_rows(model) -> int:
    """Vocabulary rows of the input embedding, also when ZeRO-3 has partitioned it (weight.shape is then [0])."""
    w = model.get_input_embeddings().weight
    return int(w.ds_shape[0]) if hasattr(w, "ds_shape") else int(w.shape[0])


def maybe_lora(model, cfg: TrainConfig, skip: tuple[str, ...] = ("lm_head", "v_head")):
    if cfg.lora_dim <= 0:
        return model
    from chatrlhf.models.lora import apply_lora, resolve_lora_targets

    name = cfg.lora_module_name
    if name == "auto":
        import torch.nn as nn

        name = ",".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                if n and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in skip}
                               | set(_conv1d_names(model, skip))))
    resolve_lora_targets(model, name)  # raises the clear UserError before any training
    return apply_lora(model, cfg.lora_dim, name, cfg.only_optimize_lora)


def _conv1d_names(model, skip):
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return []
    return [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Conv1D)
            and n.rsplit(".", 1)[-1] not in skip]


def create_optimizer_and_scheduler(strategy, model, cfg: TrainConfig, total_steps: int,
                                   learning_rate: float | None = None):
    from transformers import get_scheduler

    lr = cfg.learning_rate if learning_rate is None else learning_rate
    opt = strategy.create_optimizer(model, lr, cfg.weight_decay,
                                    lora_lr=cfg.lora_learning_rate if cfg.lora_dim > 0 else None)
    sched = get_scheduler(cfg.lr_scheduler_type, optimizer=opt, num_warmup_steps=cfg.num_warmup_steps,
                          num_training_steps=max(1, total_steps))
    return opt, sched


# ---- data --------------------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded, set_epoch) that can start mid-epoch: ``set_start(k)`` skips this rank's first k
    samples, so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_start(self, n_samples: int) -> None:
        self.start = n_samples

    def __iter__(self):
        idx = list(super().__iter__())
        start, self.start = self.start, 0  # only the first epoch after resume is partial
        return iter(idx[start:])

    def __len__(self):
        return self.num_samples - self.start


def make_dataloader(ds: Dataset, collate, batch_size: int, strategy, shuffle: bool, seed: int) -> DataLoader:
    sampler = ResumableSampler(ds, strategy.world_size, strategy.rank, shuffle=shuffle, seed=seed)
    # A private generator: creating a DataLoader iterator otherwise draws from the global torch RNG, so an extra
    # eval pass (or a resumed run's fresh iterator) would shift dropout masks and break exact resume.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=0,
                      drop_last=False, generator=torch.Generator().manual_seed(seed))


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def total_steps_for(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else per_epoch * cfg.num_train_epochs
    return per_epoch, total


def limited(loader, n: int) -> Iterator:
    for i, b in enumerate(loader):
        if n > 0 and i >= n:
            return
        yield b


# ---- throughput ----------------------------------------------------------------------------------------------
def model_dims(model) -> tuple[int, int, int, int]:
    """(parameters, layers, hidden, vocab) for the FLOPs formula."""
    from chatrlhf.engine import unwrap

    m = unwrap(model)
    cfg = getattr(m, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    g = lambda *ks: next((getattr(cfg, k) for k in ks if isinstance(getattr(cfg, k, None), int)), 0)  # noqa: E731
    n = sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters())
    return n, g("num_hidden_layers", "n_layer", "num_layers"), g("hidden_size", "n_embd", "d_model"), \
        g("vocab_size")


def throughput_line(n_params: int, layers: int, hidden: int, vocab: int, latency: float, batch: int, seq: int,
                    gradient_checkpointing: bool = False) -> tuple[str, dict]:
    """DeepSpeed-Chat's step-1 line. F = 24 k B s l h^2 (1 + s/(6h) + V/(16 l h)), k = 3 (4 with gradient
    checkpointing); B is this device's batch (the original divided by world size: not here)."""
    k = 4 if gradient_checkpointing else 3
    flops = 24 * k * batch * seq * layers * hidden ** 2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))
    tflops = flops / max(latency, 1e-9) / 1e12
    sps = batch / max(latency, 1e-9)
    line = (f"Model Parameters: {n_params / 1e9:.3f} B, Latency: {latency:.2f}s, TFLOPs: {tflops:.2f}, "
            f"Samples/sec: {sps:.2f}, Time/seq {latency / max(batch, 1):.2f}s, Batch Size: {batch}, "
            f"Sequence Length: {seq}")
    return line, {"latency_s": latency, "tflops": tflops, "samples_per_s": sps,
                  "time_per_seq_s": latency / max(batch, 1), "batch_size": batch, "seq_len": seq,
                  "params_b": n_params / 1e9}


# ---- RNG state / resume / done -------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy, torch (and accelerator) RNG states as plain JSON (no pickles)."""
    import numpy as np

    py = random.getstate()
    npst = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
           "torch": torch.get_rng_state().tolist()}
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        if acc.device_name() != "cpu":
            out["accelerator"] = acc.get_rng_state().tolist()
    except Exception:
        pass
    return out


def set_rng_state(s: dict) -> None:
    import numpy as np

    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "accelerator" in s:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_rng_state(torch.tensor(s["accelerator"], dtype=torch.uint8))


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
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(cfg) -> dict[str, str]:
    """Digests of what the tokenized data is made from (the data files' content and the tokenizer's files; the
    split, seed and lengths are config fields): equal digests give equal tokenized sets, and this needs no data
    cache, which a run may share or rebuild."""
    import hashlib

    from chatrlhf.data.sources import fingerprint

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
    import dataclasses

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
    from chatrlhf.engine.strategy import (find_latest_checkpoint, read_trainer_state, remove_stale_staging,
                                          set_run_record)
    from chatrlhf.metrics import cut_metrics
    from chatrlhf.utils import is_rank0

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


def setup_step(cfg: TrainConfig, what: str, frozen_copies: int = 0):
    """Every check that can fail runs before a model is built: model dir, tokenizer, sequence length against the
    model's positions, memory estimate (``frozen_copies`` extra inference-only copies, e.g. DPO's reference).
    Returns (strategy, output dir, tokenizer)."""
    from transformers import AutoConfig

    from chatrlhf.models.loading import check_remote_code, check_seq_len
    from chatrlhf.models.registry import resolve_model_path

    # run_<step>(cfg) called without validate(): a model name (smollm2) or a .gguf still becomes its folder
    cfg.model_name_or_path = resolve_model_path(cfg.model_name_or_path, "--model_name_or_path")
    check_model_dir(cfg.model_name_or_path)
    if Path(cfg.model_name_or_path).is_dir():  # run_<step>(cfg) without main's preflight: still one line
        check_remote_code(cfg.model_name_or_path, cfg.trust_remote_code)
    strategy = build_strategy(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer_for(cfg)
    check_seq_len(AutoConfig.from_pretrained(cfg.model_name_or_path, local_files_only=Path(cfg.model_name_or_path).exists(),
                                             trust_remote_code=cfg.trust_remote_code), cfg.max_seq_len)
    n = count_params_from_config(cfg.model_name_or_path, cfg.trust_remote_code)
    memory_preflight(strategy, n, cfg, what=what, extra_frozen_params=frozen_copies * n)
    return strategy, out, tokenizer


def phase_loaders(phase: int, cfg, tokenizer, strategy, collate):
    """Train/eval dataloaders of a data phase and the run's optimizer-step count."""
    from chatrlhf.data import build_phase_datasets

    train_ds, eval_ds = build_phase_datasets(phase, cfg, tokenizer)
    train_dl = make_dataloader(train_ds, collate, cfg.per_device_train_batch_size, strategy, True, cfg.seed)
    eval_dl = make_dataloader(eval_ds, collate, cfg.per_device_eval_batch_size, strategy, False, cfg.seed)
    return train_dl, eval_dl, total_steps_for(cfg, len(train_dl))[1]


def start_run(step: str, cfg: TrainConfig, strategy, engine, tokenizer, out: Path, run_config: dict):
    """Resume from the latest checkpoint (when there is one), open the metrics writer, and return a
    ``save_checkpoint()`` that writes resumable state plus a Hugging Face copy under ``out/checkpoints``."""
    from chatrlhf.data.phases import chat_format
    from chatrlhf.metrics import MetricsWriter

    run_config["chat_format"] = chat_format(cfg, tokenizer).record()  # chat/serve/eval render as trained
    prog = Progress()
    ckpt = resolve_resume(cfg)
    if ckpt is not None:
        prog = restore_progress(strategy.load_state({"model": engine}, ckpt))
        log_line(f"[{step}] resumed from {ckpt} at step {prog.global_step} (epoch {prog.epoch}, "
                 f"batch {prog.batch_in_epoch})")
    writer = MetricsWriter(out, (cfg.tensorboard_path or out / "tensorboard") if cfg.enable_tensorboard else None)

    def save_checkpoint() -> None:
        sdir = strategy.save_state({"model": engine}, out / "checkpoints", prog.global_step, prog.as_dict(),
                                   keep_last=cfg.keep_last_checkpoints)
        strategy.save_hf(engine, tokenizer, sdir / "hf_model", run_config)

    return prog, writer, save_checkpoint


def finish_step(step: str, cfg: TrainConfig, strategy, engine, tokenizer, out: Path, run_config: dict, writer,
                summary: dict) -> dict:
    """Final Hugging Face checkpoint, then done.json last (the pipeline's "this step finished" marker)."""
    strategy.save_hf(engine, tokenizer, out, run_config, save_lora_adapter=cfg.save_lora_adapter)
    writer.close()
    write_done(out, step, summary)
    strategy.finish()
    return summary


def write_done(output_dir: str | os.PathLike, step: str, metrics: dict) -> None:
    """done.json, the pipeline's "this step finished" marker: only after real training, and always strict JSON.

    A step that took no optimizer step must not look finished (`chatrlhf train` would carry an untrained model
    forward): UserError instead. NaN/Infinity are not JSON: such metrics are written as null and listed under
    ``non_finite_metrics``."""
    from chatrlhf.utils import is_rank0

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
    from chatrlhf.metrics import read_metrics

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


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    from chatrlhf.utils import progress_bars_enabled

    # bars only on a terminal: in a log file every redraw is one more line of noise
    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and progress_bars_enabled()),
                dynamic_ncols=True, leave=False)


def finite(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN/Infinity (which JSON cannot hold)."""
    return float(x) if math.isfinite(float(x)) else None


def run_main(run_fn, cfg) -> int:
    """Shared ``main`` tail: the config's preflight (model files, value heads, lengths against positions: every
    check that needs the model dirs but no model), run, then a clean multi-process exit (barrier + os._exit, see
    stack notes). A run refused with a UserError leaves no output dir of its own making behind."""
    from chatrlhf.utils import announce_device, train_dtype

    announce_device(*train_dtype(getattr(cfg, "dtype", "auto")))
    out = Path(getattr(cfg, "output_dir", "") or ".")
    existed = out.exists()
    preflight = getattr(cfg, "preflight", None)
    if callable(preflight):
        preflight()
    try:
        run_fn(cfg)
    except UserError:
        if not existed:
            _remove_empty_dirs(out)
        raise
    from chatrlhf.utils import get_world_size

    if get_world_size() > 1:
        import torch.distributed as dist
        import sys

        if dist.is_initialized():
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _remove_empty_dirs(path: Path) -> None:
    """Remove ``path`` if it holds nothing but empty directories (what a refused run created); else leave it."""
    try:
        if not path.is_dir() or any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
            return
        for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        path.rmdir()
    except OSError:
        pass  # another rank got there first, or something appeared meanwhile: leave it


def log_line(msg: str) -> None:
    """Rank-0 line that does not tear the progress bar."""
    from chatrlhf.utils import is_rank0

    if is_rank0():
        from tqdm.auto import tqdm

        tqdm.write(msg)


def save_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


# ---- the shared optimizer-step loop ---------------------------------------------------------------------------
def train_loop(name: str, cfg: TrainConfig, strategy, engine, train_dl, total_steps: int, prog: Progress,
               writer, compute_loss, evaluate, save_checkpoint, dims: tuple[int, int, int, int]) -> dict:
    """Micro-batches -> optimizer steps until ``total_steps``: ``compute_loss(batch) -> (loss, {scalars})``;
    logs train metrics (all-ranks mean) every step, the throughput line every ``log_interval`` steps, evaluates
    every ``eval_interval`` steps and after each epoch (``evaluate() -> dict``, logged as "eval"), saves every
    ``save_interval`` steps. Data position lives in ``prog`` so a resumed run replays nothing and skips nothing.
    Returns the last step's train scalars."""
    bar = progress_bar(total_steps, prog.global_step, name, strategy.is_rank0)
    engine.train()
    acc: dict[str, float] = {}
    acc_n, t0, seq, samples = 0, time.time(), 0, 0
    last: dict[str, float] = {}

    def run_eval(tag: str) -> None:
        res = evaluate()
        writer.log("eval", prog.global_step, **res)
        log_line(f"[{name}] {tag} step {prog.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))

    while prog.global_step < total_steps:
        train_dl.sampler.set_epoch(prog.epoch)
        train_dl.sampler.set_start(prog.batch_in_epoch * cfg.per_device_train_batch_size)
        for batch in train_dl:
            batch = to_device(batch, strategy.device)
            loss, scalars = compute_loss(batch)
            strategy.backward(loss, engine)
            stepped = strategy.step(engine)
            prog.batch_in_epoch += 1
            for k, v in {"loss": loss.detach().item(), **scalars}.items():
                acc[k] = acc.get(k, 0.0) + float(v)
            acc_n += 1
            seq, samples = max(seq, batch["input_ids"].shape[1]), samples + len(batch["input_ids"])
            if not stepped:
                continue
            prog.global_step += 1
            latency = time.time() - t0
            keys = sorted(acc)
            means = strategy.all_reduce_mean(torch.tensor([acc[k] / acc_n for k in keys])).tolist()
            last = dict(zip(keys, means))
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if cfg.print_loss:
                log_line(f"[{name}] epoch {prog.epoch} step {prog.global_step} loss {last['loss']:.4f}")
            writer.log("train", prog.global_step, **last, lr=strategy.get_lr(engine)[0], epoch=prog.epoch)
            if cfg.log_interval > 0 and (prog.global_step % cfg.log_interval == 0 or prog.global_step == 1):
                line, tp = throughput_line(*dims, latency, samples, seq, cfg.gradient_checkpointing)
                log_line(line)
                writer.log("throughput", prog.global_step, **tp)
            if cfg.eval_interval > 0 and prog.global_step % cfg.eval_interval == 0:
                run_eval("eval")
            if cfg.save_interval > 0 and prog.global_step % cfg.save_interval == 0:
                save_checkpoint()
            acc, acc_n, t0, seq, samples = {}, 0, time.time(), 0, 0
            if prog.global_step >= total_steps:
                break
        else:  # the epoch ran out
            prog.epoch, prog.batch_in_epoch = prog.epoch + 1, 0
            if prog.global_step < total_steps:
                run_eval(f"epoch {prog.epoch} done:")
            continue
        break
    bar.close()
    return last


def unwrap_model(engine):
    from chatrlhf.engine import unwrap

    return unwrap(engine)


_FORWARD_ARGS: dict[type, set[str]] = {}


def forward_args(model) -> set[str]:
    """Parameter names of the (unwrapped) model's forward, cached per class: which optional inputs
    (``position_ids``, ``logits_to_keep``) it takes."""
    m = unwrap_model(model)
    cls = type(m)
    if cls not in _FORWARD_ARGS:
        try:
            _FORWARD_ARGS[cls] = set(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            _FORWARD_ARGS[cls] = set()
    return _FORWARD_ARGS[cls]
