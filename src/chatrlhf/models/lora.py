"""LoRA through peft, injected in place into any nn.Module (causal LMs and RewardModel bodies alike).

``--lora_module_name`` is checked before anything trains: each comma-separated entry must match a Linear/Conv1D
module by exact name, name suffix or substring (DeepSpeed-Chat used substrings like ``decoder.layers.``); an
entry matching nothing raises UserError naming the candidates (the original failed late with "does not require
grad"). Saving merges LoRA into the base weights without touching the training weights; generation in PPO uses
``merged_lora(model)``, which restores the exact base weights afterwards (no bf16 merge/unmerge drift).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from chatrlhf.errors import UserError

ADAPTER = "default"


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D  # lazy: transformers

        types.append(Conv1D)
    except ImportError:
        pass
    return tuple(types)


def candidate_module_names(model: nn.Module) -> list[str]:
    """Short names (last component) of the Linear/Conv1D modules LoRA could target, e.g. q_proj, fc1."""
    lt = _linear_types()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, lt) and n})


def resolve_lora_targets(model: nn.Module, lora_module_name: str | list[str]) -> list[str]:
    """Full module names selected by the comma-separated entries; UserError when an entry matches nothing."""
    entries = lora_module_name if isinstance(lora_module_name, list) else str(lora_module_name).split(",")
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise UserError("--lora_dim > 0 needs --lora_module_name (candidates: "
                        f"{', '.join(candidate_module_names(model))})")
    lt = _linear_types()
    linear = [n for n, m in model.named_modules() if isinstance(m, lt) and n]
    picked: list[str] = []
    for e in entries:
        hits = [n for n in linear if n == e or n.endswith("." + e) or e in n]
        if not hits:
            raise UserError(f"--lora_module_name {e!r} matches no Linear/Conv1D module of this model; candidates: "
                            f"{', '.join(candidate_module_names(model))} (names, suffixes or substrings such as "
                            "'layers.' are accepted, comma-separated)")
        picked += [h for h in hits if h not in picked]
    # lm_head stays out unless named exactly: a LoRA on the tied output embedding is rarely meant.
    return [p for p in picked if p.rsplit(".", 1)[-1] != "lm_head" or "lm_head" in entries]


def apply_lora(model: nn.Module, lora_dim: int, lora_module_name: str, only_optimize_lora: bool = False,
               lora_alpha: float | None = None, lora_dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters in place (returns the same module). Base weights stay trainable unless
    ``only_optimize_lora`` (DeepSpeed-Chat's default trains both)."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft

    if lora_dim <= 0:
        return model
    targets = resolve_lora_targets(model, lora_module_name)
    cfg = LoraConfig(r=lora_dim, lora_alpha=lora_alpha if lora_alpha is not None else lora_dim,
                     lora_dropout=lora_dropout, target_modules=targets, bias="none")
    model = inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    model._chatrlhf_lora_config = cfg
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or not only_optimize_lora)
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # lazy: peft

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the plain model with LoRA folded in (W + scale * B A), computed out of place.
    Under ZeRO-3 call it inside gathered params."""
    layers = dict(lora_layers(model))
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().cpu().clone()
    for name, layer in layers.items():
        key = f"{name}.weight"
        base_w = layer.get_base_layer().weight
        delta = layer.get_delta_weight(ADAPTER) if ADAPTER in layer.lora_A else None
        if delta is not None:
            out[key] = (base_w.detach().float() + delta.detach().float()).to(base_w.dtype).cpu()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights permanently and remove the adapter modules (for export)."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    return model


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Generation with merged weights (one matmul per layer), then the exact original base weights back."""
    layers = [m for _, m in lora_layers(model)]
    backup = [m.get_base_layer().weight.data.clone() for m in layers]
    for m in layers:
        m.merge()
    try:
        yield model
    finally:
        for m, w in zip(layers, backup):
            m.unmerge()
            m.get_base_layer().weight.data.copy_(w)


# Adapters are injected into the model itself (inject_adapter_in_model), but peft's checkpoints are written from a
# PeftModel, whose LoraModel holds the model as ``base_model.model``: PeftModel.from_pretrained reads keys under that
# prefix (transformers' save_peft_format adds the same prefix to adapters injected by ``add_adapter``). Without it
# every LoRA weight was "missing" and peft silently kept a freshly initialised adapter.
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights as a PeftModel checkpoint names them: peft's own selection (get_peft_model_state_dict,
    adapter name removed) under ``PEFT_PREFIX``. Under ZeRO-3 call it inside gathered params."""
    from peft import get_peft_model_state_dict  # lazy: peft

    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {PEFT_PREFIX + k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


def base_weights_trained(model: nn.Module) -> bool:
    """True when weights besides LoRA's were trained (no --only_optimize_lora): the adapter alone then does not
    reproduce the run on the original base model."""
    return any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def save_lora_adapter(model: nn.Module, adapter_state: dict[str, torch.Tensor], out_dir: str | Path,
                      base_model_name_or_path: str | None = None, causal_lm: bool = True) -> None:
    """adapter_model.safetensors + adapter_config.json as ``PeftModel.save_pretrained`` writes them, so
    ``PeftModel.from_pretrained(base, out_dir)`` (and AutoPeftModelForCausalLM for causal LMs) loads every weight.
    ``adapter_state`` comes from :func:`adapter_state_dict`."""

    from safetensors.torch import save_file  # lazy: safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg = getattr(model, "_chatrlhf_lora_config", None)
    if cfg is not None:
        cfg = copy.deepcopy(cfg)
        cfg.inference_mode = True  # as peft saves it; from_pretrained(is_trainable=True) turns training back on
        cfg.base_model_name_or_path = base_model_name_or_path
        if causal_lm:
            cfg.task_type = "CAUSAL_LM"
        cfg.save_pretrained(str(out))
