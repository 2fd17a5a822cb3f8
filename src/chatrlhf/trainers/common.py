"""What every training step shares at run time: the strategy from the flags, tokenizer/model/LoRA/optimizer set-up,
dataloaders that can resume mid-epoch, the throughput line, the start and finish of a step, and train_loop, the
optimizer-step loop of sft/reward/dpo. The flags are in config.py; resume and done.json in checkpoints.py."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from chatrlhf.data import build_phase_datasets
from chatrlhf.data.phases import chat_format
from chatrlhf.engine import DeepSpeedStrategy, StrategyConfig, available_memory_bytes, estimate_memory
from chatrlhf.engine.device import announce_device, train_dtype
from chatrlhf.errors import ModelError, UserError
from chatrlhf.models.dims import ModelDims, flops_per_pass, unwrap
from chatrlhf.models.loading import check_remote_code, check_seq_len, load_causal_lm, load_tokenizer
from chatrlhf.models.lora import apply_lora, resolve_lora_targets
from chatrlhf.models.registry import resolve_model_path
from chatrlhf.trainers.checkpoints import Progress, resolve_resume, restore_progress, write_done
from chatrlhf.trainers.config import TrainConfig
from chatrlhf.trainers.metrics import MetricsWriter, log_line
from chatrlhf.utils import get_world_size, progress_bars_enabled


# ---- strategy, tokenizer, model --------------------------------------------------------------------------------
def build_strategy(cfg: TrainConfig, zero_stage: int | None = None, micro_batch: int | None = None):
    """The strategy from the shared flags; PPO passes its actor's ZeRO stage and training micro-batch."""

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
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: transformers

    # trust_remote_code always explicit: transformers' default (None) asks on stdin
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in m.parameters())


def memory_preflight(strategy, n_params: int, cfg: TrainConfig, what: str = "model",
                     n_trainable: int | None = None, extra_frozen_params: int = 0) -> None:
    """Refuse to start when weights+grads+optimizer state cannot fit, with advice (ZeRO stage, offload, LoRA)."""

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

    name = cfg.lora_module_name
    if name == "auto":
        name = ",".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                if n and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in skip}
                               | set(_conv1d_names(model, skip))))
    resolve_lora_targets(model, name)  # raises the clear UserError before any training
    return apply_lora(model, cfg.lora_dim, name, cfg.only_optimize_lora)


def _conv1d_names(model, skip):
    try:
        from transformers.pytorch_utils import Conv1D  # lazy: transformers
    except ImportError:
        return []
    return [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Conv1D)
            and n.rsplit(".", 1)[-1] not in skip]


def create_optimizer_and_scheduler(strategy, model, cfg: TrainConfig, total_steps: int,
                                   learning_rate: float | None = None):
    from transformers import get_scheduler  # lazy: transformers

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
def throughput_line(n_params: int, layers: int, hidden: int, vocab: int, latency: float, batch: int, seq: int,
                    gradient_checkpointing: bool = False) -> tuple[str, dict]:
    """DeepSpeed-Chat's step-1 line. F = 24 k B s l h^2 (1 + s/(6h) + V/(16 l h)), k = 3 (4 with gradient
    checkpointing); B is this device's batch (the original divided by world size: not here)."""
    k = 4 if gradient_checkpointing else 3
    flops = flops_per_pass(layers, hidden, vocab, batch, seq, k)
    tflops = flops / max(latency, 1e-9) / 1e12
    sps = batch / max(latency, 1e-9)
    line = (f"Model Parameters: {n_params / 1e9:.3f} B, Latency: {latency:.2f}s, TFLOPs: {tflops:.2f}, "
            f"Samples/sec: {sps:.2f}, Time/seq {latency / max(batch, 1):.2f}s, Batch Size: {batch}, "
            f"Sequence Length: {seq}")
    return line, {"latency_s": latency, "tflops": tflops, "samples_per_s": sps,
                  "time_per_seq_s": latency / max(batch, 1), "batch_size": batch, "seq_len": seq,
                  "params_b": n_params / 1e9}


def setup_step(cfg: TrainConfig, what: str, frozen_copies: int = 0):
    """Every check that can fail runs before a model is built: model dir, tokenizer, sequence length against the
    model's positions, memory estimate (``frozen_copies`` extra inference-only copies, e.g. DPO's reference).
    Returns (strategy, output dir, tokenizer)."""
    from transformers import AutoConfig  # lazy: transformers

    # run_<step>(cfg) called without validate(): a model name (smollm2) or a .gguf still becomes its folder
    cfg.model_name_or_path = resolve_model_path(cfg.model_name_or_path, "--model_name_or_path")
    check_model_dir(cfg.model_name_or_path)
    if Path(cfg.model_name_or_path).is_dir():  # run_<step>(cfg) without main's preflight: still one line
        check_remote_code(cfg.model_name_or_path, cfg.trust_remote_code)
    strategy = build_strategy(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer_for(cfg)
    local = Path(cfg.model_name_or_path).exists()
    check_seq_len(AutoConfig.from_pretrained(cfg.model_name_or_path, local_files_only=local,
                                             trust_remote_code=cfg.trust_remote_code), cfg.max_seq_len)
    n = count_params_from_config(cfg.model_name_or_path, cfg.trust_remote_code)
    memory_preflight(strategy, n, cfg, what=what, extra_frozen_params=frozen_copies * n)
    return strategy, out, tokenizer


def phase_loaders(phase: int, cfg, tokenizer, strategy, collate):
    """Train/eval dataloaders of a data phase and the run's optimizer-step count."""

    train_ds, eval_ds = build_phase_datasets(phase, cfg, tokenizer)
    train_dl = make_dataloader(train_ds, collate, cfg.per_device_train_batch_size, strategy, True, cfg.seed)
    eval_dl = make_dataloader(eval_ds, collate, cfg.per_device_eval_batch_size, strategy, False, cfg.seed)
    return train_dl, eval_dl, total_steps_for(cfg, len(train_dl))[1]


def start_run(step: str, cfg: TrainConfig, strategy, engine, tokenizer, out: Path, run_config: dict):
    """Resume from the latest checkpoint (when there is one), open the metrics writer, and return a
    ``save_checkpoint()`` that writes resumable state plus a Hugging Face copy under ``out/checkpoints``."""

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


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
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

    if get_world_size() > 1:
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


def save_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


# ---- the shared optimizer-step loop ---------------------------------------------------------------------------
def train_loop(name: str, cfg: TrainConfig, strategy, engine, train_dl, total_steps: int, prog: Progress,
               writer, compute_loss, evaluate, save_checkpoint, dims: ModelDims) -> dict:
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


_FORWARD_ARGS: dict[type, set[str]] = {}


def forward_args(model) -> set[str]:
    """Parameter names of the (unwrapped) model's forward, cached per class: which optional inputs
    (``position_ids``, ``logits_to_keep``) it takes."""
    m = unwrap(model)
    cls = type(m)
    if cls not in _FORWARD_ARGS:
        try:
            _FORWARD_ARGS[cls] = set(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            _FORWARD_ARGS[cls] = set()
    return _FORWARD_ARGS[cls]
