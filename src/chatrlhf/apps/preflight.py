"""Preflight: everything ``chatrlhf train`` can check before a step trains, every problem reported at once.

DeepSpeed-Chat users found out about a wrong tokenizer, a bad data row or an out-of-memory model an hour into a run
(after step 1 finished). This module checks, in seconds:

- the actor and reward models and their tokenizers load (small models fully; big ones as config + weight files +
  a meta-device skeleton, so a 66B check does not need 66B of memory);
- the actor and reward tokenizers are compatible (PPO scores actor text with the reward model);
- max_seq_len (steps 1/2) and max_prompt_seq_len + max_answer_seq_len (step 3) fit the models' positions;
- every data path resolves and its first rows map through the data layer's adapter;
- the output dir is writable;
- per-rank memory for each pending step (weights + gradients + Adam states for the chosen ZeRO stage, dtype and
  world size, plus activations; actor + reference + critic + reward (+ EMA) for PPO) fits the memory available,
  with advice (ZeRO stage, offload, LoRA, gradient checkpointing, batch) when it does not.

``run_preflight`` raises one ``UserError`` listing every problem, or returns the estimate and a printable text.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Optional

from chatrlhf.engine.memory import dtype_bytes, static_memory
from chatrlhf.errors import DataError, ModelError, UserError, one_line
from chatrlhf.models.loading import (check_remote_code, check_tokenizers_compatible, load_causal_lm, load_tokenizer,
                                     max_positions)
from chatrlhf.models.registry import resolve_model_path

logger = logging.getLogger(__name__)

GB = 1024 ** 3
# Models whose weight files are smaller than this are really loaded; larger ones are checked without weights.
FULL_LOAD_LIMIT = 2 * GB
# The estimate ignores allocator fragmentation, framework buffers and communication buckets: keep headroom.
HEADROOM = 1.15
DATA_ROWS_CHECKED = 8


@dataclass
class ModelInfo:
    """What the memory estimate needs to know about a model, read from its config."""

    path: str
    n_params: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    max_positions: Optional[int]  # None: no learned position limit (ALiBi / rotary models without a cap)


# ------------------------------------------------------------------------------------------------ models
def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))


def inspect_model(path: str, trust_remote_code: bool = False) -> ModelInfo:
    """Shape and parameter count from the config, via a meta-device skeleton (no weight memory)."""
    import torch  # lazy: torch
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: transformers

    # trust_remote_code always explicit: transformers' default (None) asks on stdin
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    text = getattr(config, "get_text_config", lambda: config)()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(text, trust_remote_code=trust_remote_code)
    n_params = sum(p.numel() for p in skeleton.parameters())

    def first(*names, default=None):
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        return default

    positions = max_positions(text)  # None for RoPE / ALiBi models: no hard limit
    return ModelInfo(path=str(path), n_params=int(n_params), hidden=int(first("hidden_size", "n_embd", "d_model")),
                     layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
                     heads=int(first("num_attention_heads", "n_head", default=1)),
                     vocab=int(first("vocab_size")), max_positions=positions)


def check_model(role: str, path: Optional[str], problems: list[str],
                trust_remote_code: bool = False) -> tuple[Optional[ModelInfo], Any]:
    """-> (ModelInfo, tokenizer), appending to ``problems`` what fails. Reward-model dirs from step 2 (a body
    plus value head) are inspected as their body. A custom family (its code in the folder) without
    ``trust_remote_code`` stops the preflight at once with one ModelError naming the folder, its auto_map class and
    --trust_remote_code: nothing else about such a model can be checked without running its code."""
    if not path:
        return None, None

    path = resolve_model_path(path, f"{role} model")
    p = Path(path)
    if not p.is_dir():
        problems.append(f"{role} model {path}: directory not found (local Hugging Face model dirs only)")
        return None, None
    if not (p / "config.json").is_file():
        problems.append(f"{role} model {path}: not a Hugging Face model dir (no config.json)")
        return None, None

    try:
        check_remote_code(p, trust_remote_code)
    except ModelError as e:
        raise ModelError(f"{role} model {e}") from None
    info, tok = None, None
    try:
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # ModelError or whatever the tokenizer files raise: report, keep checking
        problems.append(f"{role} tokenizer {path}: {one_line(e)}")
    try:
        info = inspect_model(path, trust_remote_code)
        weights = _weights_bytes(p)
        if weights == 0:
            problems.append(f"{role} model {path}: no weight files (*.safetensors / *.bin)")
        elif weights <= FULL_LOAD_LIMIT and not _is_reward_dir(p):
            # small enough to really load: catches broken weight files
            load_causal_lm(path, trust_remote_code=trust_remote_code)  # loaded, then dropped
    except Exception as e:
        problems.append(f"{role} model {path}: does not load: {one_line(e)}")
    return info, tok


def _is_reward_dir(p: Path) -> bool:
    try:
        from chatrlhf.models.reward_model import is_reward_dir  # lazy: torch
    except ImportError:
        return False
    return bool(is_reward_dir(p))


def check_tokenizers(actor_tok, reward_tok, actor_path: str, reward_path: str, problems: list[str]) -> None:
    """PPO feeds the actor's token ids to the reward model and critic: both must tokenize text the same way."""
    if actor_tok is None or reward_tok is None:
        return

    try:
        check_tokenizers_compatible(actor_tok, reward_tok)
    except UserError as e:
        problems.append(f"actor {actor_path} and reward {reward_path} tokenizers are incompatible: {one_line(e)}")


# ------------------------------------------------------------------------------------------------ data
def check_data(entries: list[str], tokenizer, skip_bad_rows: bool, problems: list[str]) -> dict[str, int]:
    """Open every data_path entry and map (and tokenize) its first rows through the data layer's adapter, as the
    steps will; -> {entry: number of train rows}. Bad rows are problems unless --skip_bad_rows."""
    from chatrlhf.data.adapters import FieldError  # lazy: numpy
    from chatrlhf.data.sources import open_source  # lazy: numpy

    out: dict[str, int] = {}
    for entry in entries:
        try:
            src = open_source(entry)
            train, _ = src.pick_splits()
            for i in range(min(DATA_ROWS_CHECKED, len(train))):
                try:
                    row = src.adapter.map(train.rows[i])
                except FieldError as e:
                    if skip_bad_rows:
                        continue
                    file, rowno = train.origin(i)
                    raise DataError(f"{e.message} (dataset {src.adapter.name}; --skip_bad_rows skips such rows)",
                                    file=file, row=rowno, field=e.field or None) from None
                if tokenizer is not None:
                    tokenizer(row.prompt + (row.chosen or ""))
            out[entry] = len(train)
        except Exception as e:
            problems.append(f"data {entry}: {one_line(e)}")
    return out


def check_writable(path: Path, problems: list[str]) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".preflight-"):
            pass
    except OSError as e:
        problems.append(f"output dir {path}: not writable ({e.strerror or e})")


# ------------------------------------------------------------------------------------------------ memory
def resolve_train_dtype(dtype: str) -> str:
    """The dtype a step will train in, as the strategy resolves it."""
    if dtype != "auto":
        return dtype
    from chatrlhf.engine.device import resolve_dtype  # lazy: torch

    return resolve_dtype("auto")


def activation_memory(info: ModelInfo, batch: int, seq: int, dtype: str, grad_ckpt: bool, lm_head: bool,
                      train: bool = True) -> int:
    """Bytes of activations for one micro-batch. Per layer s*b*h*(34 + 5*a*s/h) half-precision bytes
    (Korthikanti et al.); with gradient checkpointing each layer keeps only its input plus one layer in flight.
    The LM head adds fp32 logits (+ log-softmax and its gradient in training)."""
    w = dtype_bytes(dtype)
    s, b, h, a = seq, batch, info.hidden, info.heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * w / 2
    if not train:
        body = per_layer  # inference keeps one layer's activations alive at a time
    elif grad_ckpt:
        body = info.layers * s * b * h * w + per_layer
    else:
        body = info.layers * per_layer
    logits = b * s * info.vocab * 4 * (3 if train else 1) if lm_head else 0
    return int(body + logits)


def kv_cache_memory(info: ModelInfo, batch: int, seq: int, dtype: str) -> int:
    return int(2 * info.layers * batch * seq * info.hidden * dtype_bytes(dtype))


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def _lora_trainable(info: ModelInfo, lora_dim: int, only_lora: bool) -> Optional[int]:
    if not lora_dim or not only_lora:
        return None
    return int(info.layers * 4 * 2 * info.hidden * lora_dim)  # rank-r A and B on ~4 projections per layer


def estimate_step_memory(step: str, cfg: dict, actor: Optional[ModelInfo], reward: Optional[ModelInfo],
                         world_size: int, on_cpu: bool) -> dict[str, Any]:
    """Per-rank estimate for one step -> {"total": bytes, "parts": {name: bytes}, "hints": [...]}.

    ``cfg`` is the step's resolved config as a dict; ``actor``/``reward`` the model shapes it trains.
    """
    dtype = resolve_train_dtype(str(_get(cfg, "dtype", default="fp32")))
    parts: dict[str, int] = {}
    hints: list[str] = []

    def trained(prefix: str, info: ModelInfo, stage: int, offload: bool, batch: int, seq: int, ckpt: bool,
                lm_head: bool, lora: Optional[int]) -> None:
        st = static_memory(info.n_params, stage, dtype, world_size, offload, on_cpu, trainable=lora)
        for k, v in st.items():
            parts[f"{prefix} {k}"] = v
        parts[f"{prefix} activations"] = activation_memory(info, batch, seq, dtype, ckpt, lm_head)
        if not ckpt:
            hints.append(f"{prefix}: gradient checkpointing")

    def frozen(prefix: str, info: ModelInfo, stage: int, offload: bool) -> None:
        st = static_memory(info.n_params, stage, dtype, world_size, offload, on_cpu, frozen=True)
        parts[f"{prefix} weights"] = st["weights"]

    if step == "sft" and actor:
        lora = _lora_trainable(actor, _get(cfg, "lora_dim", default=0), _get(cfg, "only_optimize_lora", default=False))
        trained("actor", actor, int(_get(cfg, "zero_stage", default=0)), bool(_get(cfg, "offload", default=False)),
                int(_get(cfg, "per_device_train_batch_size", default=16)), int(_get(cfg, "max_seq_len", default=512)),
                bool(_get(cfg, "gradient_checkpointing", default=False)), True, lora)
    elif step == "reward" and reward:
        lora = _lora_trainable(reward, _get(cfg, "lora_dim", default=0), _get(cfg, "only_optimize_lora", default=False))
        # chosen and rejected of every pair go through the model together: twice the micro-batch
        trained("reward", reward, int(_get(cfg, "zero_stage", default=0)), bool(_get(cfg, "offload", default=False)),
                2 * int(_get(cfg, "per_device_train_batch_size", default=16)), int(_get(cfg, "max_seq_len", default=512)),
                bool(_get(cfg, "gradient_checkpointing", default=False)), False, lora)
    elif step == "dpo" and actor:
        lora = _lora_trainable(actor, _get(cfg, "lora_dim", default=0), _get(cfg, "only_optimize_lora", default=False))
        # chosen and rejected go through the policy together (twice the micro-batch), and a frozen reference copy
        trained("policy", actor, int(_get(cfg, "zero_stage", default=0)), bool(_get(cfg, "offload", default=False)),
                2 * int(_get(cfg, "per_device_train_batch_size", default=16)), int(_get(cfg, "max_seq_len", default=512)),
                bool(_get(cfg, "gradient_checkpointing", default=False)), True, lora)
        frozen("reference", actor, int(_get(cfg, "zero_stage", default=0)),
               bool(_get(cfg, "offload_reference_model", default=False)))
    elif step == "ppo" and actor and reward:
        seq = int(_get(cfg, "max_prompt_seq_len", default=256)) + int(_get(cfg, "max_answer_seq_len", default=256))
        a_stage = int(_get(cfg, "actor_zero_stage", "zero_stage", default=0))
        c_stage = int(_get(cfg, "critic_zero_stage", "zero_stage", default=0))
        train_b = int(_get(cfg, "per_device_training_batch_size", "per_device_train_batch_size", default=16))
        gen_b = int(_get(cfg, "per_device_generation_batch_size", default=train_b))
        a_lora = _lora_trainable(actor, _get(cfg, "actor_lora_dim", default=0), _get(cfg, "only_optimize_lora", default=False))
        c_lora = _lora_trainable(reward, _get(cfg, "critic_lora_dim", default=0), _get(cfg, "only_optimize_lora", default=False))
        trained("actor", actor, a_stage, bool(_get(cfg, "offload", default=False)), train_b, seq,
                bool(_get(cfg, "actor_gradient_checkpointing", default=False)), True, a_lora)
        frozen("reference", actor, a_stage, bool(_get(cfg, "offload_reference_model", default=False)))
        if _get(cfg, "enable_ema", default=False):
            frozen("ema", actor, a_stage, False)
        trained("critic", reward, c_stage, bool(_get(cfg, "offload", default=False)), train_b, seq,
                bool(_get(cfg, "critic_gradient_checkpointing", default=False)), False, c_lora)
        frozen("reward", reward, c_stage, bool(_get(cfg, "offload_reward_model", default=False)))
        parts["generation kv cache"] = kv_cache_memory(actor, gen_b, seq, dtype)
        if not on_cpu:  # parameter offload of the frozen models is ZeRO-3's (refused at other stages)
            if not _get(cfg, "offload_reference_model", default=False):
                hints.append("--actor_zero_stage 3 --offload_reference_model (reference weights in host memory)")
            if not _get(cfg, "offload_reward_model", default=False):
                hints.append("--critic_zero_stage 3 --offload_reward_model (reward-model weights in host memory)")
    return {"total": int(sum(parts.values()) * HEADROOM), "parts": parts, "hints": hints, "dtype": dtype}


def _cgroup_limit() -> Optional[int]:
    """Memory left under this container's cgroup limit (v2, then v1), if any."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_f).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            return int(raw) - int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def available_memory(procs_per_node: int, on_cpu: bool) -> tuple[int, str]:
    """-> (bytes per rank, where the figure comes from). CPU: free RAM (and the cgroup limit) shared by the node's
    ranks; GPU: one device's total memory."""
    if not on_cpu:
        from chatrlhf.engine.device import total_memory  # lazy: torch

        return total_memory(), "accelerator memory per device"
    avail = None
    try:
        import psutil  # lazy: psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    cg = _cgroup_limit()
    if cg is not None:
        avail = min(avail, cg) if avail else cg
    n = max(1, procs_per_node)
    return int((avail or 0) / n), f"available RAM / {n} rank(s) on this node"


def memory_advice(step: str, cfg: dict, est: dict, world_size: int, on_cpu: bool) -> str:
    """What to change, biggest lever first."""
    tips = []
    stage_keys = ("actor_zero_stage", "critic_zero_stage") if step == "ppo" else ("zero_stage",)
    stages = [int(_get(cfg, k, default=0)) for k in stage_keys]
    if min(stages) < 3:
        if world_size > 1:
            tips.append(f"a higher ZeRO stage (--{'/--'.join(stage_keys)} 3 shards weights, gradients and "
                        f"optimizer state over the {world_size} ranks)")
        else:
            tips.append("more ranks with ZeRO-2/3 (--deployment_type single_node / multi_node)")
    if not on_cpu and not _get(cfg, "offload", default=False):
        # offload moves ZeRO's partitioned optimizer state: it needs stage 1-3 on every trained model
        need = [k for k, s in zip(stage_keys, stages) if s == 0]
        tips.append("--offload (optimizer state in host memory)" if not need else
                    f"--offload with --{' 2 --'.join(need)} 2 (optimizer state in host memory; offload needs ZeRO 1-3)")
    lora_key = "actor_lora_dim" if step == "ppo" else "lora_dim"
    if not _get(cfg, lora_key, default=0):
        tips.append(f"LoRA (--{lora_key} 8 --only_optimize_lora: no gradients/optimizer state for base weights)")
    tips += est["hints"]
    if est["dtype"] == "fp32":
        tips.append("--dtype bf16")
    tips.append("a smaller per-device batch or sequence length")
    return "; ".join(dict.fromkeys(tips))


def _fmt_gb(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.01 * GB else f"{b / (1024 ** 2):.1f} MB"


# ------------------------------------------------------------------------------------------------ the check
def _model_paths(pipeline_cfg, cfgs: dict[str, dict]) -> tuple[Optional[str], Optional[str]]:
    """(actor, reward model) to check: the base models of the steps that train them; PPO's inputs when steps 1/2 are
    not run here (their dirs do not exist yet when steps 1/2 are pending, so shapes come from the base models)."""
    actor_path = _get(cfgs.get("sft", {}), "model_name_or_path") or pipeline_cfg.actor_model
    reward_path = _get(cfgs.get("reward", {}), "model_name_or_path") or pipeline_cfg.reward_model
    if getattr(pipeline_cfg, "recipe", "ppo") == "dpo":  # no reward model; DPO trains step 1's actor
        reward_path = None
        d = cfgs.get("dpo", {}).get("model_name_or_path")
        if d and "sft" not in cfgs and Path(d).is_dir():
            actor_path = d
    if "ppo" in cfgs:
        ppo = cfgs["ppo"]
        a, c = ppo.get("actor_model_name_or_path"), ppo.get("critic_model_name_or_path")
        if a and "sft" not in cfgs and Path(a).is_dir():
            actor_path = a
        if c and "reward" not in cfgs and Path(c).is_dir():
            reward_path = c
    return actor_path, reward_path


def check_seq_lens(cfgs: dict[str, dict], actor_info, reward_info, problems: list[str]) -> None:
    """Sequence lengths against the models' position limits."""
    for step, cfg in cfgs.items():
        if step == "ppo":
            need = int(_get(cfg, "max_prompt_seq_len", default=0)) + int(_get(cfg, "max_answer_seq_len", default=0))
            what, infos = "max_prompt_seq_len + max_answer_seq_len", [actor_info, reward_info]
        else:
            need = int(_get(cfg, "max_seq_len", default=0))
            what, infos = "max_seq_len", [actor_info if step in ("sft", "dpo") else reward_info]
        for info in infos:
            if info and info.max_positions and need > info.max_positions:
                problems.append(f"{step}: {what} = {need} exceeds {info.path}'s {info.max_positions} positions")


def run_preflight(pipeline_cfg, step_cfgs: dict[str, Any], world_size: int = 1, procs_per_node: int = 1,
                  deployment_type: str = "cpu") -> dict[str, Any]:
    """Check the pending steps of a ``chatrlhf train`` run; raise one UserError listing every problem.

    ``step_cfgs`` maps step name (sft/reward/ppo) to its resolved config (dataclass or dict).
    Returns {"memory": {step: estimate}, "available": bytes, "data": {entry: rows}, "text": printable summary}.
    """
    cfgs = {k: (asdict(v) if is_dataclass(v) else dict(v)) for k, v in step_cfgs.items()}
    problems: list[str] = []
    if deployment_type == "cpu":
        on_cpu = True
    else:  # DeepSpeed's detection, as the steps will see it
        from chatrlhf.engine.device import accelerator_info  # lazy: torch

        on_cpu = accelerator_info()["name"] == "cpu"

    actor_path, reward_path = _model_paths(pipeline_cfg, cfgs)
    # --trust_remote_code of `chatrlhf train` (passed to every step), or set in a step's own section
    trust = bool(getattr(pipeline_cfg, "trust_remote_code", False)) or any(
        bool(c.get("trust_remote_code")) for c in cfgs.values())
    actor_info, actor_tok = check_model("actor", actor_path, problems, trust)
    reward_info, reward_tok = check_model("reward", reward_path, problems, trust)
    if actor_path and reward_path:
        check_tokenizers(actor_tok, reward_tok, actor_path, reward_path, problems)

    check_seq_lens(cfgs, actor_info, reward_info, problems)

    # Data: every entry of every pending step, once.
    entries: list[str] = []
    for cfg in cfgs.values():
        for key in ("data_path", "sft_only_data_path"):
            for e in cfg.get(key) or []:
                if e not in entries:
                    entries.append(e)
    skip_bad = any(cfg.get("skip_bad_rows") for cfg in cfgs.values())
    data_rows = check_data(entries, actor_tok, skip_bad, problems)

    check_writable(Path(pipeline_cfg.output_dir), problems)

    # Memory per rank, per pending step, against what is available.
    if pipeline_cfg.memory_budget_gb is not None:
        avail, source = int(pipeline_cfg.memory_budget_gb * GB), "--memory_budget_gb"
    else:
        avail, source = available_memory(procs_per_node, on_cpu)
    estimates = {}
    for step, cfg in cfgs.items():
        est = estimate_step_memory(step, cfg, actor_info, reward_info, world_size, on_cpu)
        if not est["parts"]:
            continue
        estimates[step] = est
        if est["total"] > avail:
            problems.append(
                f"{step}: needs about {_fmt_gb(est['total'])} per rank ({_parts_line(est)}) but {_fmt_gb(avail)} "
                f"is available ({source}); try {memory_advice(step, cfg, est, world_size, on_cpu)}")

    if problems:
        raise UserError(f"preflight found {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    lines = [f"[preflight] ok: models, tokenizers, data ({', '.join(f'{k}: {v} rows' for k, v in data_rows.items())}), "
             f"output dir; {world_size} rank(s), {_fmt_gb(avail)} per rank ({source})"]
    for step, est in estimates.items():
        lines.append(f"[preflight] {step}: ~{_fmt_gb(est['total'])} per rank ({_parts_line(est)}, {est['dtype']})")
    return {"memory": estimates, "available": avail, "available_source": source, "data": data_rows,
            "text": "\n".join(lines)}


def _parts_line(est: dict) -> str:
    return ", ".join(f"{k} {_fmt_gb(v)}" for k, v in est["parts"].items() if v)


__all__ = ["ModelInfo", "inspect_model", "static_memory", "activation_memory", "estimate_step_memory",
           "available_memory", "run_preflight"]
