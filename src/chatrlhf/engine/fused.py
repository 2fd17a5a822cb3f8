"""Fused CPU training kernels for llama-style models: SwiGLU MLPs and RMSNorms, one native pass each way.

transformers' llama-style models (llama, mistral, qwen2, ...) run ``silu(gate(x)) * up(x)`` as two eager
elementwise ops forward and three backward, and each RMSNorm as ~6 ops forward and ~12 backward, every one a pass
over the activations. :func:`fuse_cpu_kernels` gives such modules a forward that calls :class:`SwiGLU` /
:class:`RMSNorm` (engine/fused.c via native.py) instead; weights, their names, LoRA wrappers and ZeRO hooks are
untouched (the projections are still called as modules), so checkpoints are the same.

Two checks decide, per module, and neither reads any library's code:
- *it computes the same*: a module with ``gate_proj``/``up_proj``/``down_proj`` and an ``act_fn`` (MLP), or a 1-D
  ``weight`` and an epsilon (norm), is fused only when the fused forward reproduces its own forward on a probe input
  (so GELU MLPs, Gemma's ``(1 + w)`` norms or any other variant keep their own);
- *it is faster here*: engine/calibrate.py times the kernel against the eager ops at that width on this processor
  (once, cached); where eager wins, eager stays.
Inputs that are not fp32 on the CPU, a missing compiler, or ``CHATRLHF_FUSED_KERNELS=0`` take the eager formula.
Every module left as it was is named once in the log with the reason.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from chatrlhf.engine import calibrate, native

logger = logging.getLogger(__name__)

_said: set[tuple[str, str]] = set()  # (module class, reason) already logged
CALIBRATION_ROWS = 1024  # tokens per timed kernel call when choosing fused vs eager


def _lib():
    return native.load("fused")


def _fp32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"{what}: the native kernel could not allocate its per-thread buffers")


class SwiGLU(torch.autograd.Function):
    """silu(g) * u for fp32 CPU tensors; saves only g and u (eager autograd also keeps silu(g))."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        _lib().chatrlhf_swiglu_fwd(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel())
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _lib().chatrlhf_swiglu_bwd(dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel())
        return dg, du


class RMSNorm(torch.autograd.Function):
    """w * (x * rsqrt(mean(x^2, -1) + eps)) for fp32 CPU tensors; saves x, w and the per-row scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        h = x.shape[-1]
        rows = x.numel() // h
        y, r = torch.empty_like(x), torch.empty(rows, dtype=torch.float32)
        _lib().chatrlhf_rmsnorm_fwd(x.data_ptr(), w.data_ptr(), y.data_ptr(), r.data_ptr(), rows, h, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, r = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        _check(_lib().chatrlhf_rmsnorm_bwd(dy.data_ptr(), x.data_ptr(), w.data_ptr(), r.data_ptr(), dx.data_ptr(),
                                           dw.data_ptr(), r.numel(), x.shape[-1]), "RMSNorm backward")
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u: fused where it can be (fp32 CPU, same shapes, kernels built), the eager formula elsewhere."""
    if _fp32_cpu(g, u) and g.shape == u.shape and _lib() is not None:
        return SwiGLU.apply(g, u)
    return F.silu(g) * u


def _fused_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _fused_norm_forward(self, hidden_states):
    w = self.weight
    if (_fp32_cpu(hidden_states, w) and hidden_states.numel() and w.shape == hidden_states.shape[-1:]
            and _lib() is not None):
        return RMSNorm.apply(hidden_states, w, _eps(self))
    return type(self).forward(self, hidden_states)


def _eps(m: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        v = getattr(m, name, None)
        if isinstance(v, float):
            return v
    return None


def _kind(m: nn.Module) -> str | None:
    """``mlp`` / ``norm`` when ``m`` has the parts of a gated MLP / an RMSNorm (what it computes is probed later)."""
    if all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")) and \
            callable(getattr(m, "act_fn", None)):
        return "mlp"
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 1 and _eps(m) is not None and not any(True for _ in m.children()):
        return "norm"
    return None


def _widths(m: nn.Module, kind: str) -> tuple[int, int] | None:
    """(input width, kernel width): hidden and intermediate for an MLP, hidden twice for a norm."""
    if kind == "norm":
        return (m.weight.shape[0],) * 2
    gate = getattr(m.gate_proj, "base_layer", m.gate_proj)  # a peft LoRA layer wraps the Linear
    w = getattr(gate, "weight", None)
    return tuple(w.shape[::-1]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


def _fused_call(m: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "mlp":
        return m.down_proj(SwiGLU.apply(m.gate_proj(x), m.up_proj(x)))
    return RMSNorm.apply(x, m.weight, _eps(m))


def _computes_the_same(m: nn.Module, kind: str, width: int) -> bool:
    """The fused forward gives the module's own output on a probe input (eval mode, no grad)."""
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)) * 2
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            ref, out = m(x), _fused_call(m, kind, x)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        return False
    finally:
        m.train(was)
    return isinstance(ref, torch.Tensor) and ref.shape == out.shape and bool(
        torch.allclose(out, ref, rtol=1e-4, atol=1e-5))


def _eager_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _faster(kind: str, width: int) -> bool:
    """Whether the fused kernel beats the eager ops (forward + backward) at ``width`` on this machine."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(CALIBRATION_ROWS, width, generator=gen).requires_grad_()
    if kind == "mlp":
        b = torch.randn(CALIBRATION_ROWS, width, generator=gen).requires_grad_()
        fns = {"fused": lambda: SwiGLU.apply(a, b), "eager": lambda: F.silu(a) * b}
    else:
        w = torch.randn(width, generator=gen).requires_grad_()
        fns = {"fused": lambda: RMSNorm.apply(a, w, 1e-6), "eager": lambda: _eager_norm(a, w, 1e-6)}
    dy = torch.randn(CALIBRATION_ROWS, width, generator=gen)
    runs = {name: (lambda fn=fn: fn().backward(dy)) for name, fn in fns.items()}
    shape = {"width": width, "rows": CALIBRATION_ROWS}
    return calibrate.choose(f"fused_{kind}", shape, runs, reps=5, describe=f"width {width}") == "fused"


def _say(m: nn.Module, why: str) -> None:
    key = (type(m).__name__, why)
    if key not in _said:
        _said.add(key)
        logger.info("fused CPU kernels: %s keeps its own forward (%s)", type(m).__name__, why)


def _why_not(m: nn.Module, kind: str) -> str | None:
    """None when ``m`` should take the fused forward, else the reason it keeps its own."""
    widths = _widths(m, kind)
    params = [p for p in m.parameters()]
    if widths is None or not params or not _fp32_cpu(*params):
        return "not an fp32 CPU module"
    if any(p.numel() == 0 for p in params):
        return "parameters not materialised (ZeRO-3 partitioned)"
    if not _computes_the_same(m, kind, widths[0]):
        return "the fused kernel does not reproduce its output"
    if not _faster(kind, widths[1]):
        return f"the eager ops measured faster at width {widths[1]} on this processor"
    return None


def fuse_cpu_kernels(model: nn.Module) -> dict[str, int]:
    """Give every gated SiLU MLP and RMSNorm of ``model`` that the fused kernel reproduces, and where it measured
    faster, the fused forward; returns how many of each were changed (none when the kernels cannot be built, with
    the reason logged once)."""
    todo = {"mlp": [], "norm": []}
    for m in model.modules():
        kind = _kind(m)
        if kind is not None and not _is_fused(m):
            todo[kind].append(m)
    done = {kind: 0 for kind in todo}
    if not any(todo.values()):
        return done
    if _lib() is None:
        if not getattr(fuse_cpu_kernels, "_warned", False):
            logger.info("fused CPU kernels off: %s", native.reason("fused"))
            fuse_cpu_kernels._warned = True
        return done
    for kind, fwd in (("mlp", _fused_mlp_forward), ("norm", _fused_norm_forward)):
        for m in todo[kind]:
            why = _why_not(m, kind)
            if why:
                _say(m, why)
                continue
            m.forward = types.MethodType(fwd, m)
            done[kind] += 1
    return done


def _is_fused(m: nn.Module) -> bool:
    f = getattr(m.forward, "__func__", None)
    return f is _fused_mlp_forward or f is _fused_norm_forward
