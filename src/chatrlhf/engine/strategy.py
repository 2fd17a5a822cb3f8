"""DeepSpeedStrategy: the only place that calls DeepSpeed.

Steps build models and optimizers, then hand them here: ``prepare`` returns a trained DeepSpeed engine,
``prepare_eval`` a frozen one; ``backward``/``step`` drive it; ``save_hf``/``save_state``/``load_state`` write Hugging
Face dirs and resumable state. Device, backend and dtype come from ``deepspeed.accelerator.get_accelerator()``; on
CPU the backend is gloo (see docs/stack-notes: client torch optimizer, HfDeepSpeedConfig for ZeRO-3, barrier+_exit).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from chatrlhf.engine import liger
from chatrlhf.engine.device import DTYPES, accelerator, resolve_dtype, rng_state, set_rng_state
from chatrlhf.engine.fused import fuse_cpu_kernels
from chatrlhf.engine.memory import static_memory
from chatrlhf.engine.optim import AdamW
from chatrlhf.errors import UserError
from chatrlhf.models import lora
from chatrlhf.models.dims import unwrap
from chatrlhf.models.lora import has_lora, merged_state_dict
from chatrlhf.models.reward_model import RewardModel
from chatrlhf.utils import atomic_dir, atomic_write_json, free_port, latest_checkpoints, set_seed

# Parameters whose names contain one of these get no weight decay (biases and all LayerNorm/RMSNorm weights).
NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight", "ln_1.weight",
            "ln_2.weight", "LayerNorm.weight")


@dataclass
class StrategyConfig:
    zero_stage: int = 0
    offload: bool = False
    dtype: str = "fp32"
    gradient_clipping: float = 1.0
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    seed: int = 1234
    offload_params: bool | None = None  # ZeRO-3 parameter offload; defaults to `offload`
    use_liger_kernel: bool = False  # Liger-Kernel's Triton kernels on the models it prepares (GPUs; engine/liger.py)


@dataclass
class MemoryEstimate:
    bytes_per_rank: int
    breakdown: dict[str, int] = field(default_factory=dict)
    advice: str = ""


def estimate_memory(n_params: int, zero_stage: int, dtype: str, world_size: int = 1, offload: bool = False,
                    trainable_params: int | None = None, on_cpu: bool | None = None) -> MemoryEstimate:
    """Bytes per rank for weights + gradients + Adam states (activations not included; callers add margin).

    Mixed precision keeps an fp32 master copy + 2 fp32 moments (12 B/param) for trainable params; fp32 keeps
    2 moments (8 B). ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also weights. Offload moves
    optimizer states (and ZeRO-3 weights) to host memory, which on a CPU-only machine is the same memory.
    """
    trainable = n_params if trainable_params is None else trainable_params
    ws = max(1, world_size)
    if on_cpu is None:
        on_cpu = accelerator().device_name() == "cpu"
    dev = static_memory(n_params, zero_stage, dtype, ws, offload, on_cpu, trainable)
    total = sum(dev.values())
    tips = []
    if zero_stage < 3 and ws > 1:
        tips.append(f"--zero_stage {min(3, zero_stage + 1)} (shards more state across the {ws} ranks)")
    if zero_stage < 3 and ws == 1:
        tips.append("more ranks with --zero_stage 2 or 3 (each shards optimizer/gradient/weight state)")
    if not offload and not on_cpu:
        tips.append("--offload (optimizer state in host memory)" if zero_stage >= 1 else
                    "--zero_stage 2 --offload (optimizer state in host memory; offload needs ZeRO 1-3)")
    if trainable == n_params:
        tips.append("LoRA: --lora_dim 8 --only_optimize_lora (no gradients/optimizer state for the base weights)")
    if dtype == "fp32":
        tips.append("--dtype bf16 (half the weight memory)")
    tips.append("a smaller model or --per_device_train_batch_size")
    return MemoryEstimate(int(total), dev, "try " + "; ".join(tips))


def available_memory_bytes() -> int:
    acc = accelerator()
    if acc.device_name() == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 1 << 62
    return int(acc.total_memory())


def check_offload(offload: bool, zero_stage: int, flag: str = "--zero_stage") -> None:
    """``--offload`` puts ZeRO's partitioned optimizer state (ZeRO-3: also weights) in host memory; ZeRO-0 keeps an
    unpartitioned optimizer on the device that DeepSpeed cannot offload, so the pair is refused, not ignored."""
    if offload and zero_stage == 0:
        raise UserError(f"--offload needs ZeRO stage 1, 2 or 3 ({flag} is 0): offload moves ZeRO's partitioned "
                        f"optimizer state to host memory; e.g. {flag} 2 --offload")


def _is_cpu_adam(optimizer: Any) -> bool:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: deepspeed

    return isinstance(optimizer, DeepSpeedCPUAdam)


def cpu_adam(param_groups: list[dict], lr: float, betas: tuple[float, float]):
    """DeepSpeed's CPU AdamW (decoupled weight decay, as torch's AdamW) for ZeRO-Offload. Its C++ op is built on
    first use (1-2.5 min, cached in TORCH_EXTENSIONS_DIR); a failed build is one clear line, not a compiler log."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: deepspeed

    try:
        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, adamw_mode=True)
    except Exception as e:  # noqa: BLE001 - the op build fails with RuntimeError/ImportError/CalledProcessError
        raise UserError(f"--offload needs DeepSpeed's cpu_adam op, which failed to build or load "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                        "check that a C++ compiler and ninja are installed, or train without --offload") from None


class DeepSpeedStrategy:
    """Owns the DeepSpeed config and every call into DeepSpeed for one run.

    One strategy can prepare several models with different ZeRO stages (PPO actor/critic) through the
    ``zero_stage``/``offload`` overrides of ``prepare``/``prepare_eval``/``ds_config``.
    """

    def __init__(self, cfg: StrategyConfig | None = None, **kw: Any):
        self.cfg = cfg or StrategyConfig(**kw)
        self.cfg.dtype = resolve_dtype(self.cfg.dtype)
        if self.cfg.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"--zero_stage must be 0, 1, 2 or 3; got {self.cfg.zero_stage}")
        check_offload(self.cfg.offload, self.cfg.zero_stage)
        if self.cfg.use_liger_kernel:
            liger.check_available(self.device.type)
        self._hf_ds = None

    # ---- distributed -------------------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        """Init torch.distributed once: without a launcher a 1-process group on a free local port; under
        torchrun / the deepspeed launcher the env (RANK, WORLD_SIZE, MASTER_*) is used."""
        import deepspeed  # lazy: deepspeed

        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
            acc = accelerator()
            backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
            # DeepSpeed prints "... shm_comm_op built successfully" on stdout at every start on CPU, also when it
            # only loaded a cached build: kept out of the user's output (debug log); anything else passes through
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
            for line in out.getvalue().splitlines():
                if line.startswith("DeepSpeed ") and line.endswith(" built successfully"):
                    logging.getLogger("chatrlhf").debug("%s", line)
                else:
                    print(line)
        if self.device.type != "cpu":
            accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self._seed_all(self.cfg.seed)

    def _seed_all(self, seed: int) -> None:
        set_seed(seed)
        accelerator().manual_seed_all(seed)

    @property
    def device(self) -> torch.device:
        acc = accelerator()
        if acc.device_name() == "cpu":
            return torch.device("cpu")
        return torch.device(acc.device_name(int(os.environ.get("LOCAL_RANK", "0"))))

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype]

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(tensor, dtype=torch.float32, device=self.device).clone().detach()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        return t

    def all_reduce_sum(self, tensor: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(tensor, dtype=torch.float32, device=self.device).clone().detach()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, obj)
            return out
        return [obj]

    def finish(self, exit_code: int | None = None) -> None:
        """Barrier so no rank leaves while others still save; in multi-process runs ``exit_code`` given ends the
        process with os._exit (interpreter teardown of gloo groups sometimes aborts after a finished run)."""
        self.barrier()
        if exit_code is not None and self.world_size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)

    # ---- DeepSpeed config --------------------------------------------------------------------------------
    def ds_config(self, train: bool = True, zero_stage: int | None = None, offload: bool | None = None) -> dict:
        c = self.cfg
        stage = c.zero_stage if zero_stage is None else zero_stage
        off = c.offload if offload is None else offload
        off_params = (c.offload_params if c.offload_params is not None else off) and stage == 3
        zero: dict[str, Any] = {"stage": stage}
        if off and stage >= 1 and train:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type != "cpu"}
        if off_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type != "cpu"}
        if stage == 3:
            zero.update(stage3_param_persistence_threshold=1e4, stage3_max_live_parameters=3e7,
                        stage3_prefetch_bucket_size=3e7, stage3_gather_16bit_weights_on_model_save=True)
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": c.per_device_train_batch_size,
            "train_batch_size": c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "zero_optimization": zero,
            "bf16": {"enabled": c.dtype == "bf16"},
            "fp16": {"enabled": c.dtype == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
            "steps_per_print": 10 ** 9,  # our loop logs; keep DeepSpeed quiet
            "wall_clock_breakdown": False,
            # the client torch AdamW (avoids 40 s op compiles); offload gets DeepSpeed's CPU Adam (create_optimizer)
            "zero_allow_untested_optimizer": True,
        }
        if train:
            cfg["gradient_clipping"] = c.gradient_clipping
        else:
            cfg.pop("fp16") if c.dtype != "fp16" else None
        return cfg

    @contextlib.contextmanager
    def zero3_init_context(self, stage: int | None = None, train: bool = True) -> Iterator[None]:
        """Models built inside are partitioned at construction when ZeRO-3 (never a full copy per rank).
        transformers only sees ZeRO-3 while an HfDeepSpeedConfig object is alive, so it is kept for the block."""
        stage = self.cfg.zero_stage if stage is None else stage
        if stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig  # lazy: transformers

        self._hf_ds = HfDeepSpeedConfig(self.ds_config(train=train, zero_stage=3))
        try:
            yield
        finally:
            self._hf_ds = None

    def is_zero3(self, engine_or_module: Any) -> bool:
        return any(hasattr(p, "ds_id") for p in unwrap(engine_or_module).parameters())

    @contextlib.contextmanager
    def gathered_params(self, module: nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
        """Full parameters inside the block under ZeRO-3 (generation, merging, saving); a no-op otherwise.
        Every rank must enter it. With ``modifier_rank`` that rank's in-place edits are kept."""
        module = unwrap(module)
        if not self.is_zero3(module):
            yield
            return
        import deepspeed  # lazy: deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
            yield

    # ---- optimizer / engines -----------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                         lora_lr: float | None = None, betas: tuple[float, float] = (0.9, 0.95)):
        """AdamW over trainable params in up to 3 groups: decayed, no-decay (bias and norm weights), LoRA (own
        learning rate, no decay). torch's fused AdamW, or DeepSpeed's CPU Adam when ``--offload``: ZeRO-Offload runs
        the update on the host copy of the fp32 state and refuses any other optimizer."""
        groups: dict[str, list] = {"decay": [], "no_decay": [], "lora": []}
        for n, p in unwrap(model).named_parameters():
            if not p.requires_grad:
                continue
            if "lora_" in n and lora_lr is not None:
                groups["lora"].append(p)
            elif any(k in n for k in NO_DECAY) or p.ndim < 2:
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        pg = []
        if groups["decay"]:
            pg.append({"params": groups["decay"], "weight_decay": weight_decay, "lr": lr})
        if groups["no_decay"]:
            pg.append({"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr})
        if groups["lora"]:
            pg.append({"params": groups["lora"], "weight_decay": 0.0, "lr": lora_lr})
        if not pg:
            raise UserError("no trainable parameters (check --only_optimize_lora / --lora_module_name)")
        if self.cfg.offload:
            return cpu_adam(pg, lr=lr, betas=betas)
        # fused AdamW: one kernel per parameter group instead of ~10 elementwise ops per tensor (about 0.3 s of
        # every PPO step on the mid bench model was unfused Adam); torch has fused kernels for CPU and GPUs.
        # Clipping is set by ``prepare``, which knows whether DeepSpeed or the optimizer does it (engine/optim.py).
        try:
            return AdamW(pg, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            return AdamW(pg, lr=lr, betas=betas, foreach=False)

    def _optimizer_clips(self, optimizer: torch.optim.Optimizer, stage: int) -> bool:
        """Where DeepSpeed would clip fp32 gradients itself (ZeRO-0, fp32: a norm and a scale pass per tensor)
        our AdamW clips inside its update instead; ZeRO 1-3 and bf16/fp16 clip in DeepSpeed's own optimizers."""
        return isinstance(optimizer, AdamW) and stage == 0 and self.cfg.dtype == "fp32"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                zero_stage: int | None = None, offload: bool | None = None):
        """Wrap a model for training; ``scheduler`` is a scheduler object or a callable(optimizer)."""
        import deepspeed  # lazy: deepspeed

        self._cast_extra_params(model)
        self._fuse_kernels(model)
        self._liger(model)
        stage = self.cfg.zero_stage if zero_stage is None else zero_stage
        config = self.ds_config(train=True, zero_stage=zero_stage, offload=offload)
        offloaded = "offload_optimizer" in config["zero_optimization"]
        if offloaded != _is_cpu_adam(optimizer):
            # DeepSpeed refuses a client optimizer under offload, and CPU Adam cannot update device-resident
            # weights without it: the optimizer must come from create_optimizer with the same offload setting
            raise UserError(f"ZeRO-{stage}{' with' if offloaded else ' without'} --offload needs "
                            f"{'DeepSpeed CPU Adam' if offloaded else 'a device optimizer'}, got "
                            f"{type(optimizer).__name__}; --offload needs ZeRO stage 1-3 for every trained model")
        if self._optimizer_clips(optimizer, stage):
            # 0, not absent: DeepSpeed's default when the key is missing is to clip at 1.0
            optimizer.max_grad_norm, config["gradient_clipping"] = config.get("gradient_clipping", 0.0), 0.0
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, dist_init_required=False)
        if self.world_size == 1 and stage == 0 and hasattr(engine, "enable_backward_allreduce"):
            # One rank has nothing to reduce with; DeepSpeed would still flatten every gradient, all-reduce it
            # over gloo and copy it back on each step (~5% of a mid-size SFT step on CPU). ZeRO 1-3 do their
            # partition bookkeeping in that path, so it stays on there.
            engine.enable_backward_allreduce = False
        return engine

    def prepare_eval(self, model: nn.Module, zero_stage: int | None = None, offload: bool | None = None):
        """A frozen model for inference: a ZeRO-3 inference engine when stage 3 (weights stay partitioned), else
        the plain module on the device in the training dtype."""
        stage = self.cfg.zero_stage if zero_stage is None else zero_stage
        model.requires_grad_(False)
        model.eval()
        self._fuse_kernels(model)
        self._liger(model)
        if stage == 3:
            import deepspeed  # lazy: deepspeed

            self._cast_extra_params(model)
            engine, *_ = deepspeed.initialize(model=model, config=self.ds_config(train=False, zero_stage=3,
                                                                                 offload=offload),
                                              dist_init_required=False)
            engine.eval()
            return engine
        return model.to(device=self.device, dtype=self.torch_dtype)

    def _fuse_kernels(self, model: nn.Module) -> None:
        """CPU fp32: SiLU-gated MLPs and RMSNorms run in one native pass each way where that measured faster
        (models/fused.py; same weights and math). GPUs and bf16 keep the model's own forwards."""
        if self.device.type == "cpu" and self.cfg.dtype == "fp32":
            fuse_cpu_kernels(model)

    def _liger(self, model: nn.Module) -> None:
        """``--use_liger_kernel``: Liger-Kernel's kernels for the model's type (checked when the strategy was made)."""
        if self.cfg.use_liger_kernel:
            cfg = getattr(model, "config", None)
            liger.apply(model, getattr(cfg, "model_type", None) or type(model).__name__)

    def _cast_extra_params(self, model: nn.Module) -> None:
        # Heads created outside zero.Init (value heads) must share the training dtype (ZeRO-3 + bf16 asserts it).
        if self.cfg.dtype == "fp32":
            return
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != self.torch_dtype:
                p.data = p.data.to(self.torch_dtype)

    def backward(self, loss: torch.Tensor, engine) -> None:
        engine.backward(loss)

    def step(self, engine) -> bool:
        """Optimizer + scheduler step at the accumulation boundary; returns True when the weights changed."""
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        return bool(boundary)

    def get_lr(self, engine) -> list[float]:
        return [g["lr"] for g in engine.optimizer.param_groups]

    # ---- saving ------------------------------------------------------------------------------------------
    def full_state_dict(self, engine_or_module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on CPU on rank 0 (None elsewhere): ZeRO-3 gathered one parameter at a time,
        LoRA merged into the base weights (keys as the plain model names them). Every rank must call it."""
        module = unwrap(engine_or_module)
        if has_lora(module):
            with self.gathered_params(module):
                return merged_state_dict(module) if self.is_rank0 else None
        if not self.is_zero3(module):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.is_rank0 else None
        import deepspeed  # lazy: deepspeed

        out: dict[str, torch.Tensor] = {}
        for n, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if self.is_rank0:
                    out[n] = p.detach().cpu().clone()
        if self.is_rank0:
            for n, b in module.named_buffers():
                if n in module.state_dict():
                    out[n] = b.detach().cpu().clone()
        return out if self.is_rank0 else None

    def save_hf(self, engine_or_module, tokenizer, out_dir: str | os.PathLike, extra_config: dict | None = None,
                save_lora_adapter: bool = False) -> Path:
        """Rank 0 writes a Hugging Face dir (safetensors, config, tokenizer, generation_config,
        chatrlhf_config.json) atomically. RewardModel bodies are written with their value head."""
        out = Path(out_dir)
        module = unwrap(engine_or_module)
        sd = self.full_state_dict(module)
        adapter_sd = None
        if save_lora_adapter and lora.has_lora(module):
            with self.gathered_params(module):
                if self.is_rank0:
                    adapter_sd = lora.adapter_state_dict(module)
            if self.is_rank0 and lora.base_weights_trained(module):
                logging.getLogger("chatrlhf").warning(
                    "%s: the base weights were trained too (no --only_optimize_lora), so the adapter reproduces this "
                    "run only on those trained weights, not on the original base model; use the merged checkpoint",
                    out / "lora_adapter")
        if self.is_rank0:
            with _publish_dir(out) as tmp:
                if isinstance(module, RewardModel):
                    module.save_pretrained(tmp, state_dict=sd)
                else:
                    base = module.get_base_model() if hasattr(module, "get_base_model") else module
                    base.save_pretrained(tmp, state_dict=sd)
                    gen = getattr(base, "generation_config", None)
                    if gen is not None and not (tmp / "generation_config.json").exists():
                        gen.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                if adapter_sd is not None:
                    # the base the adapter applies to: the dir the model was loaded from (peft records it too),
                    # unless the run changed that base's weights as well
                    base_path = getattr(getattr(module, "config", None), "name_or_path", None) or None
                    if base_path and Path(base_path).is_dir():
                        base_path = str(Path(base_path).resolve())
                    lora.save_lora_adapter(module, adapter_sd, tmp / "lora_adapter",
                                           None if lora.base_weights_trained(module) else base_path,
                                           causal_lm=not isinstance(module, RewardModel))
                atomic_write_json(tmp / "chatrlhf_config.json", extra_config or {})
        self.barrier()
        return out

    def save_state(self, engines: dict[str, Any], ckpt_root: str | os.PathLike, step: int,
                   client_state: dict | None = None, keep_last: int = 2) -> Path:
        """Resumable state under ckpt_root/step_N/: one DeepSpeed checkpoint per engine (model, optimizer,
        scheduler) + trainer_state.json (written last: its presence marks a complete checkpoint) + per-rank RNG.
        trainer_state.json also holds the run record registered for ckpt_root (``set_run_record``): what the
        state was trained with, checked when a later run resumes from it."""
        root = Path(ckpt_root)
        sdir = root / f"step_{step}"
        if self.is_rank0 and sdir.exists():
            shutil.rmtree(sdir)
        self.barrier()
        for name, eng in engines.items():
            eng.save_checkpoint(str(sdir), tag=name, save_latest=False)
        atomic_write_json(sdir / f"rng_rank{self.rank}.json", rng_state())
        self.barrier()
        if self.is_rank0:
            record = _RUN_RECORDS.get(os.path.abspath(root))
            atomic_write_json(sdir / "trainer_state.json", {"step": step, "engines": sorted(engines),
                                                            "world_size": self.world_size,
                                                            **({"run": record} if record else {}),
                                                            **(client_state or {})})
            done = sorted(latest_checkpoints(root), key=lambda p: int(p.name.split("_")[1]))
            for old in done[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for torn in set(root.glob("step_*")) - set(done):  # a save killed midway (no trainer_state.json)
                shutil.rmtree(torn, ignore_errors=True)
        self.barrier()
        return sdir

    def load_state(self, engines: dict[str, Any], ckpt_dir: str | os.PathLike) -> dict:
        """Restore engines (+ optimizer/scheduler) and this rank's RNG from a ``step_N`` dir; returns the
        trainer state (step, epoch, batch position, ...). Every .pt file there is checked with torch's weights-only
        unpickler first (``verify_checkpoint_files``): DeepSpeed itself unpickles them in full."""
        sdir = Path(ckpt_dir)
        state = read_trainer_state(sdir)
        if state.get("world_size", self.world_size) != self.world_size and self.cfg.zero_stage >= 1:
            raise UserError(f"{sdir}: saved with {state['world_size']} ranks, resuming with {self.world_size}; "
                            "ZeRO partitioned state needs the same number of ranks (or --resume never)")
        verify_checkpoint_files(sdir)
        for name, eng in engines.items():
            configured = _base_lrs(eng)  # this run's learning rates, before the checkpoint's replace them
            path, _ = eng.load_checkpoint(str(sdir), tag=name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
            if path is None:
                raise UserError(f"{sdir}: no checkpoint for {name!r}")
            _apply_configured_lrs(eng, configured, name)
        rng = sdir / f"rng_rank{self.rank}.json"
        if rng.exists():
            try:
                rng_state = json.loads(rng.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{rng}: unreadable ({e}); the checkpoint is damaged (or use --resume never)") \
                    from None
            set_rng_state(rng_state)
        return state


def _base_lrs(engine) -> list[float] | None:
    sched = getattr(engine, "lr_scheduler", None)
    lrs = getattr(sched, "base_lrs", None)
    return list(lrs) if lrs is not None else None


def _apply_configured_lrs(engine, configured: list[float] | None, name: str) -> None:
    """A checkpoint restores its scheduler's base learning rates; a run resumed with other ones (only possible with
    --resume force, the run record refuses it otherwise) continues the same schedule from the same step at the
    rates it was started with now: each group's current rate is scaled by new base / saved base."""
    saved = _base_lrs(engine)
    if configured is None or saved is None or len(saved) != len(configured) or saved == configured:
        return
    sched, groups = engine.lr_scheduler, engine.optimizer.param_groups
    for g, old, new in zip(groups, saved, configured):
        g["lr"] = g["lr"] * new / old if old else new
        g["initial_lr"] = new
    sched.base_lrs = list(configured)  # what the schedule scales from its next step on
    logging.getLogger("chatrlhf").warning("%s: learning rate %s (checkpoint) -> %s (this run), the schedule "
                                          "continuing from the checkpoint's step", name,
                                          ", ".join(f"{x:g}" for x in saved), ", ".join(f"{x:g}" for x in configured))


# ---- checkpoint safety -------------------------------------------------------------------------------------------
# Run records by checkpoint root: steps register what they train with (steps/common.resolve_resume) and save_state
# writes it into each checkpoint's trainer_state.json, so every step (PPO included) records it without passing it.
_RUN_RECORDS: dict[str, dict] = {}


def set_run_record(ckpt_root: str | os.PathLike, record: dict | None) -> None:
    """``record`` goes into every checkpoint saved under ``ckpt_root`` from now on (None: no record)."""
    key = os.path.abspath(ckpt_root)
    if record is None:
        _RUN_RECORDS.pop(key, None)
    else:
        _RUN_RECORDS[key] = record


def read_trainer_state(sdir: str | os.PathLike) -> dict:
    path = Path(sdir) / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); the checkpoint is damaged (remove it, or --resume never)") \
            from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a trainer state (a JSON object); remove the checkpoint or use --resume never")
    return state


# What DeepSpeed's checkpoint files hold beyond what torch's weights-only unpickler allows by default (tensors,
# dtypes, torch.Size, OrderedDict, set, ...), found by saving real checkpoints at ZeRO 0-3 in fp32 and bf16
# (tests/steps/test_resume_safety.py saves and checks each; ZeRO-0 needs none). Only names: while a file is checked
# they stand for an inert placeholder, so checking imports and runs nothing of DeepSpeed. All are plain records
# (attributes only, no code on construction); keep it that way.
DEEPSPEED_CHECKPOINT_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1-3: the optimizer state's stage (an int enum)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3: the (static) loss scaler object
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1-2: (numel, start) of each parameter's slice
    # fp16 (GPU only, not testable on CPU) with ZeRO 1-3 keeps its dynamic scaler in the same slot (read from
    # DeepSpeed's stage_1_and_2/stage3 state_dict)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


class _Inert:
    """Stands in for an allow-listed global while a file is checked: takes any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def verify_checkpoint_files(sdir: str | os.PathLike) -> None:
    """Every .pt file under a checkpoint dir must unpickle with torch's weights-only loader (tensors, plain
    containers and DEEPSPEED_CHECKPOINT_GLOBALS): DeepSpeed loads them with ``weights_only=False``, where a planted
    pickle would run code. A file that needs anything else is refused, naming the file and the global."""
    allowed = [(_Inert, name) for name in DEEPSPEED_CHECKPOINT_GLOBALS]
    for f in sorted(Path(sdir).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means DeepSpeed must not unpickle this file
            raise UserError(_refusal(f, e)) from None


def _refusal(path: Path, err: Exception) -> str:
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError):
        m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"unrecognized function (\S+)", text) \
            or re.search(r"but got (<class '[^']+'>|\S+)", text)
        if m:
            why = f"unpickling it needs {m.group(1)}, which is not one of the plain types a DeepSpeed checkpoint holds"
        else:
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
            why = f"it is not a plain tensor pickle ({detail[0] if detail else 'unpickling failed'})"
        return (f"{path}: refused to load: {why} (the file could run code). Remove this checkpoint or start fresh "
                "with --resume never")
    detail = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return (f"{path}: not a readable checkpoint file ({detail}); remove this checkpoint or start fresh with "
            "--resume never")


def remove_stale_staging(out_dir: str | os.PathLike) -> list[Path]:
    """Leftovers of a writer killed mid-save in ``out_dir``: ``.staging-*`` (_publish_dir), ``.tmp-*``/``.old-*``
    (utils.atomic_dir) dirs and ``.*.tmp`` files (utils.atomic_write_text). Only one run writes an output dir, so at
    its start (or before its next save) any of them is stale. Returns what was removed."""
    out = Path(out_dir)
    removed: list[Path] = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        n = p.name
        if p.is_dir() and not p.is_symlink() and n.startswith((".staging-", ".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file() and n.startswith(".") and n.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


MODEL_FILE_PREFIXES = ("model", "config.json", "generation_config.json", "tokenizer", "special_tokens_map",
                       "vocab", "merges", "chatrlhf_config.json", "added_tokens", "chat_template")


@contextlib.contextmanager
def _publish_dir(out: Path) -> Iterator[Path]:
    """A fresh dir is written atomically (utils.atomic_dir). An existing dir (a step's output_dir that already holds
    metrics.jsonl and checkpoints/) gets the model files staged then moved in one by one, stale shards removed."""
    if not out.exists() or not any(out.iterdir()):
        with atomic_dir(out) as tmp:
            yield tmp
        return

    for stale in out.glob(".staging-*"):  # a save killed earlier; only rank 0 of one run writes here
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield tmp
        for old in out.iterdir():
            if old.is_file() and old.name.startswith(MODEL_FILE_PREFIXES):
                old.unlink()
        for f in tmp.iterdir():
            dest = out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
