"""models/fused.py: the native SwiGLU against eager silu(g) * u (values and gradients), which MLPs it takes over,
that a fused model computes what the original does (logits and every parameter's gradient), its switch, and that
the strategy fuses CPU fp32 models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatrlhf.engine import native
from chatrlhf.models import fused
from chatrlhf.models.fused import SwiGLU, fuse_swiglu


def _eager(g, u):
    return F.silu(g) * u


@pytest.mark.parametrize("shape", [(8, 64, 48), (3, 37)], ids=["vector_lanes", "scalar_tail"])
def test_swiglu_matches_eager(shape):
    assert native.load("swiglu") is not None, native.reason("swiglu")
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen) * 6
    g.view(-1)[:4] = torch.tensor([-120.0, 120.0, -88.5, 0.0])  # exp's clamps and the saturated sigmoid
    u = torch.randn(shape, generator=gen)
    dh = torch.randn(shape, generator=gen)
    outs = {}
    for name, fn in (("eager", _eager), ("fused", SwiGLU.apply)):
        gg, uu = g.clone().requires_grad_(), u.clone().requires_grad_()
        h = fn(gg, uu)
        h.backward(dh)
        outs[name] = (h.detach(), gg.grad, uu.grad)
    for a, b in zip(outs["eager"], outs["fused"]):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6)


def test_swiglu_takes_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(32, 20, generator=gen).t().requires_grad_()  # transposed views
    u = torch.randn(32, 20, generator=gen).t().requires_grad_()
    h = SwiGLU.apply(g, u)
    torch.testing.assert_close(h, _eager(g, u), rtol=2e-6, atol=2e-6)
    h.sum().backward()
    assert g.grad.shape == g.shape and u.grad.shape == u.shape


def _llama(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("llama", hidden=64, layers=2, vocab=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fused_model_matches_original(tiny_model_factory):
    model = _llama(tiny_model_factory)
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(2))
    logits0, grads0 = _loss_and_grads(model, ids)
    names = [n for n, _ in model.named_parameters()]

    assert fuse_swiglu(model) == 2  # one MLP a layer
    assert fuse_swiglu(model) == 0  # already fused
    assert all(m.mlp.forward.__func__ is fused._fused_forward for m in model.model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # same weights, same names (checkpoints unchanged)
    logits1, grads1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    for n in names:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_only_standard_silu_mlps_are_fused(tiny_model_factory):
    model = _llama(tiny_model_factory)
    layer0, layer1 = (L.mlp for L in model.model.layers)
    layer0.act_fn = nn.GELU()  # another activation: not SwiGLU

    class Scaled(type(layer1)):  # same layers, a different forward
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    layer1.__class__ = Scaled
    assert fuse_swiglu(model) == 0
    from transformers.models.llama.modeling_llama import LlamaMLP

    assert fused._standard_forward(LlamaMLP.forward) and not fused._standard_forward(Scaled.forward)


def test_switch_off_keeps_eager(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    monkeypatch.setenv("CHATRLHF_NATIVE_SWIGLU", "0")
    model = _llama(tiny_model_factory)
    assert fuse_swiglu(model) == 0
    assert "CHATRLHF_NATIVE_SWIGLU=0" in native.reason("swiglu")
    # non-fp32 inputs never reach the kernel, whatever the switch says
    g = torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(fused.swiglu(g, g), _eager(g, g))


def test_strategy_fuses_cpu_fp32_models(tiny_model_factory):
    from chatrlhf.engine.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(dtype="fp32", zero_stage=0)
    model = strategy.prepare_eval(_llama(tiny_model_factory))
    assert all(m.mlp.forward.__func__ is fused._fused_forward for m in model.model.layers)
