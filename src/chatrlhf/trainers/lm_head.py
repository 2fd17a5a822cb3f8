"""The last hidden states and the lm head's weight, for the chunked log-prob / cross-entropy functions of
:mod:`chatrlhf.algo.losses` (which never build the [B, K, V] logits; V = 49,152 for SmolLM2).

How the hidden states are obtained: the model (or the DeepSpeed engine around it) is called as usual, with
``output_hidden_states=-1`` (transformers 5 keeps only the last one, ``hidden_states[-1]``, which is
``last_hidden_state``: the input of the lm head) and ``logits_to_keep=1`` (the head then runs on one position).
Calling the model's base (``get_decoder()``/``base_model``) directly would skip the DeepSpeed engine's ``forward``,
which registers the hooks that start ZeRO's backward (gradient-accumulation boundary, reduction): the hidden states
have to be an output of the engine's own forward. The head comes from ``get_output_embeddings()``.

The chunked path is used only when it computes what the model's own forward does (:func:`head_reason`, decided once
per model and logged once when it is not):
- ``CHATRLHF_CHUNKED_LM_HEAD=0`` turns it off (the plain logits path everywhere);
- the head is a plain ``nn.Linear`` (with or without bias; a LoRA-wrapped head is not);
- its weight is not partitioned by ZeRO-3 (there the plain path runs: the engine gathers the weight inside the head's
  own forward only);
- the forward takes ``logits_to_keep`` (else the full logits would be computed anyway);
- the config has no final logit soft-capping or logit scale (Gemma 2/3, Cohere, Granite, ...), and a probe forward
  (one 16-token row, eval mode, no grad) gives logits equal to ``hidden_states[-1] @ W^T + b``: this catches any
  other post-processing of the logits (remote-code models) and models whose ``hidden_states[-1]`` is not the head's
  input.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from chatrlhf.algo.losses import chunk_logits
from chatrlhf.engine import calibrate
from chatrlhf.models.dims import unwrap
from chatrlhf.trainers import common as C

logger = logging.getLogger(__name__)

ENV = "CHATRLHF_CHUNKED_LM_HEAD"
PROBE_TOKENS = 16
# config fields (text config) that change the logits after the head: soft-capping (tanh) and scales
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logit_softcapping")
_SCALE_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "output_logit_scale")

_decided: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_said: set[str] = set()


def enabled() -> bool:
    """The switch: on unless ``CHATRLHF_CHUNKED_LM_HEAD`` is 0/false/off/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass
class HeadInputs:
    hidden: torch.Tensor  # [B, K, H]: the lm head's input at the last K positions
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V] or None
    transposed: bool = False  # logits chunks as (W h^T)^T (:func:`logits_layout`)


LAYOUT_ROWS = 256  # rows of the chunk timed by logits_layout (a PPO step's answer tokens at 8 x 32)
_layouts: dict[tuple, bool] = {}


@torch.no_grad()
def logits_layout(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this head's chunks of logits are computed transposed (:func:`chatrlhf.algo.losses.chunk_logits`):
    the faster of the two products for its shape, dtype and device, timed side by side once on this machine
    (engine/calibrate.py, cached; ``CHATRLHF_PATH_LM_HEAD_LAYOUT=linear|transposed`` forces one). Both give the
    same sums; on a 2-core AVX2 EPYC at SmolLM2's head (V = 49,152, H = 576), the transposed one ran a chunk's
    logits 1.2x faster and SFT's chunked cross-entropy forward + backward 1.1-1.2x. Under torch.distributed every
    rank takes rank 0's choice (ranks calibrating at once could pick differently, and the two round differently:
    a run must not depend on which rank timed what)."""
    V, H = weight.shape
    key = (V, H, weight.dtype, weight.device, bias is not None)
    if key not in _layouts:
        rows = LAYOUT_ROWS
        # its own generator: a draw from the global one would shift dropout's masks, and a resumed run (which
        # decides this later, at its first step) would then not repeat the uninterrupted one bit for bit
        gen = torch.Generator(device=weight.device).manual_seed(0)
        h = torch.randn(rows, H, generator=gen, device=weight.device).to(weight.dtype)
        w, b = weight.detach(), None if bias is None else bias.detach()
        choice = calibrate.choose(
            "lm_head_layout", {"rows": rows, "hidden": H, "vocab": V, "dtype": str(weight.dtype).split(".")[-1],
                               "bias": b is not None, "device": weight.device.type},
            {"linear": lambda: chunk_logits(h, w, b), "transposed": lambda: chunk_logits(h, w, b, transposed=True)},
            device=weight.device, describe=f"{rows} x {H} -> {V}")
        transposed = torch.tensor([float(choice == "transposed")], device=weight.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(transposed, src=0)
        _layouts[key] = bool(transposed.item())
    return _layouts[key]


def _text_config(m):
    cfg = getattr(m, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def _static_reason(m) -> str:
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not nn.Linear:
        return f"its lm head is a {type(head).__name__}, not a plain Linear"
    if hasattr(head.weight, "ds_id"):
        return "ZeRO-3 partitions the lm head's weight (gathered only inside the head's own forward)"
    cfg = _text_config(m)
    for f in _SOFTCAP_FIELDS:
        if getattr(cfg, f, None):
            return f"its logits are soft-capped ({f}={getattr(cfg, f)})"
    for f in _SCALE_FIELDS:
        v = getattr(cfg, f, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != 1:
            return f"its logits are scaled ({f}={v})"
    return ""


@torch.no_grad()
def _probe_reason(m, input_ids: torch.Tensor) -> str:
    head = m.get_output_embeddings()
    ids = input_ids[:1, -PROBE_TOKENS:]
    was = m.training
    m.eval()
    try:
        out = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, output_hidden_states=-1)
        hs = getattr(out, "hidden_states", None)
        if not hs or hs[-1] is None:
            return "its forward returns no hidden states"
        mine = F.linear(hs[-1], head.weight, head.bias).float()
        logits = out.logits.float()
    except Exception as e:  # any model that cannot do this keeps the plain path
        return f"the hidden-state forward failed ({type(e).__name__}: {e})"
    finally:
        m.train(was)
    if mine.shape != logits.shape:
        return f"hidden_states[-1] @ W^T is {tuple(mine.shape)}, its logits {tuple(logits.shape)}"
    scale = max(float(logits.abs().max()), 1e-30)
    err = float((mine - logits).abs().max())
    if not err <= 1e-6 * scale:
        return f"its logits differ from hidden_states[-1] @ W^T + b (max {err:.3g} at logits up to {scale:.3g})"
    return ""


def head_reason(model, input_ids: torch.Tensor) -> str:
    """'' when :func:`head_inputs` can be used for ``model`` (an engine or a module), else why not (cached per
    model: the probe runs once)."""
    if not enabled():
        return f"{ENV}=0"
    m = unwrap(model)
    try:
        return _decided[m]
    except (KeyError, TypeError):
        pass
    why = _static_reason(m)
    if not why and "logits_to_keep" not in C.forward_args(model):
        why = "its forward takes no logits_to_keep (the full logits would be computed anyway)"
    if not why:
        why = _probe_reason(m, input_ids)
    try:
        _decided[m] = why
    except TypeError:
        pass
    return why


def head_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                **forward_kw) -> HeadInputs | None:
    """The lm head's input at the last ``keep`` positions and its weight/bias, from one forward of ``model``
    (engine or module; ``forward_kw`` e.g. position_ids); None when the plain logits path must be used (the reason
    is logged once)."""
    why = head_reason(model, input_ids)
    if why:
        key = f"{type(unwrap(model)).__name__}: {why}"
        if key not in _said:
            _said.add(key)
            logger.info("chunked lm-head log-probs off for %s; the plain logits path runs", key)
        return None
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                output_hidden_states=-1, **forward_kw)
    hidden = out.hidden_states[-1]
    head = unwrap(model).get_output_embeddings()
    return HeadInputs(hidden[:, hidden.shape[1] - keep:], head.weight, head.bias,
                      logits_layout(head.weight, head.bias))


def next_token_targets(labels: torch.Tensor, keep: int, ignore_index: int = -100) -> torch.Tensor:
    """Targets for the last ``keep`` positions: labels shifted left by one, the last position ``ignore_index``."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)[:, labels.shape[1] - keep:]
