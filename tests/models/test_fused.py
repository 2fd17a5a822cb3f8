"""models/fused.py: the native SwiGLU, RMSNorm and rotary embedding against their eager formulas (values and
gradients), which modules they take over, that a fused model computes what the original does (logits, every
parameter's gradient, KV-cached generation), the switch, and that the strategy fuses CPU fp32 models."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatrlhf.engine import native
from chatrlhf.models import fused
from chatrlhf.models.fused import RMSNorm, RoPE, SwiGLU, fuse_cpu_kernels


def _eager(g, u):
    return F.silu(g) * u


@pytest.mark.parametrize("shape", [(8, 64, 48), (3, 37)], ids=["vector_lanes", "scalar_tail"])
def test_swiglu_matches_eager(shape):
    assert native.load("fused") is not None, native.reason("fused")
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


def _eager_rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(4, 16, 768), (5, 37)], ids=["model_width", "odd_width"])
def test_rmsnorm_matches_eager(shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 3
    x[0] = 0.0  # a zero row: the scale is rsqrt(eps)
    w = torch.randn(shape[-1], generator=gen)
    dy = torch.randn(shape, generator=gen)
    outs = {}
    for name, fn in (("eager", _eager_rmsnorm), ("fused", RMSNorm.apply)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, 1e-6)
        y.backward(dy)
        outs[name] = (y.detach(), xx.grad, ww.grad)
    for what, a, b in zip(("y", "dx", "dw"), outs["eager"], outs["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m, what=what: f"{what}: {m}")


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

    # a layer: one MLP, two norms, one attention (its RoPE); and the final norm
    assert fuse_cpu_kernels(model) == {"mlp": 2, "norm": 5, "attn": 2}
    assert fuse_cpu_kernels(model) == {"mlp": 0, "norm": 0, "attn": 0}  # already fused
    assert all(m.mlp.forward.__func__ is fused._fused_mlp_forward for m in model.model.layers)
    assert model.model.norm.forward.__func__ is fused._fused_norm_forward
    assert [n for n, _ in model.named_parameters()] == names  # same weights, same names (checkpoints unchanged)
    logits1, grads1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    for n in names:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_only_standard_silu_mlps_are_fused(tiny_model_factory):
    model = _llama(tiny_model_factory)
    layer0, layer1 = (L.mlp for L in model.model.layers)
    layer0.act_fn = nn.GELU()  # another activation: not SwiGLU
    norm = model.model.norm

    class Gemma(type(norm)):  # Gemma-style (1 + w) scaling: a different forward
        def forward(self, hidden_states):
            v = hidden_states.pow(2).mean(-1, keepdim=True)
            return (1 + self.weight) * (hidden_states * torch.rsqrt(v + self.variance_epsilon))

    norm.__class__ = Gemma

    class Scaled(type(layer1)):  # same layers, a different forward
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    layer1.__class__ = Scaled
    assert fuse_cpu_kernels(model) == {"mlp": 0, "norm": 4, "attn": 2}  # the layers' norms only (and RoPE)
    assert norm.forward.__func__ is not fused._fused_norm_forward
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    assert fused._standard_forward(LlamaMLP.forward) and not fused._standard_forward(Scaled.forward)
    assert fused._standard_forward(LlamaRMSNorm.forward, fused._NORM_FORMS)
    assert not fused._standard_forward(Gemma.forward, fused._NORM_FORMS)


def test_switch_off_keeps_eager(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    monkeypatch.setenv("CHATRLHF_FUSED_KERNELS", "0")
    model = _llama(tiny_model_factory)
    assert fuse_cpu_kernels(model) == {"mlp": 0, "norm": 0, "attn": 0}
    assert "CHATRLHF_FUSED_KERNELS=0" in native.reason("fused")
    # non-fp32 inputs never reach the kernel, whatever the switch says
    g = torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(fused.swiglu(g, g), _eager(g, g))


def test_strategy_fuses_cpu_fp32_models(tiny_model_factory):
    from chatrlhf.engine.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(dtype="fp32", zero_stage=0)
    model = strategy.prepare_eval(_llama(tiny_model_factory))
    assert all(m.mlp.forward.__func__ is fused._fused_mlp_forward for m in model.model.layers)
    assert all(m.input_layernorm.forward.__func__ is fused._fused_norm_forward for m in model.model.layers)
    assert all(m.self_attn.forward.__func__ is fused._attn_forwards[type(m.self_attn)] for m in model.model.layers)


def _eager_rope(x, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, x, cos, sin)[0]


@pytest.mark.parametrize("layout", ["bshd", "contiguous"])
def test_rope_matches_eager(layout):
    """[B, H, S, D] as transformers makes it (a transposed view of the [B, S, H, D] projection) or contiguous; cos /
    sin shared over the batch (batch 1) or per row; values and gradients as eager, and both keep x's layout."""
    gen = torch.Generator().manual_seed(5)
    B, H, S, D = 3, 4, 19, 48
    base = torch.randn(B, S, H, D, generator=gen)
    dy = torch.randn(B, H, S, D, generator=gen)  # contiguous, whatever x is
    for cb in (1, B):
        cos, sin = torch.randn(cb, S, D, generator=gen), torch.randn(cb, S, D, generator=gen)  # any values
        outs = {}
        for name, fn in (("eager", _eager_rope), ("fused", RoPE.apply)):
            leaf = base.clone().requires_grad_()
            x = (leaf * 1).transpose(1, 2)
            x = x.contiguous() if layout == "contiguous" else x
            seen = []
            x.register_hook(seen.append)  # the gradient as the op's backward returns it
            y = fn(x, cos, sin)
            y.backward(dy)
            outs[name] = (y.detach(), seen[0], x.stride())
        for what, a, b in zip(("y", "dx"), outs["eager"][:2], outs["fused"][:2]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
        y, dx, x_stride = outs["fused"]
        assert y.stride() == dx.stride() == x_stride


def _gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=200, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_fused_rope_model_trains_and_generates_as_original():
    """GQA (k has fewer heads than q): same loss and gradients; KV-cached greedy generation gives the same tokens
    (decode steps take the fused RoPE too, at S = 1)."""
    import copy

    model = _gqa_llama()
    twin = copy.deepcopy(model)
    assert fuse_cpu_kernels(twin)["attn"] == 2
    ids = torch.randint(3, 200, (3, 21), generator=torch.Generator().manual_seed(4))
    (l0, g0), (l1, g1) = (_loss_and_grads(m, ids) for m in (model, twin))
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    model.eval(), twin.eval()
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded prompt
    with torch.no_grad():
        outs = [m.generate(input_ids=ids[:, :6], attention_mask=mask, max_new_tokens=10, do_sample=False,
                           pad_token_id=0) for m in (model, twin)]
    assert torch.equal(outs[0], outs[1])


def test_rope_fusion_is_local_to_the_model():
    """The fused forward runs over its own copy of the module globals: transformers' module, and models that were
    not fused, still run the eager RoPE; a forward whose RoPE is not the llama formula is left alone."""
    from transformers.models.llama import modeling_llama

    eager = modeling_llama.apply_rotary_pos_emb
    fused_model, plain = _gqa_llama(), _gqa_llama()
    fuse_cpu_kernels(fused_model)
    assert modeling_llama.apply_rotary_pos_emb is eager
    assert "forward" not in vars(plain.model.layers[0].self_attn)  # the plain model keeps the class forward
    fwd = fused_model.model.layers[0].self_attn.forward.__func__
    assert fwd.__globals__["apply_rotary_pos_emb"] is not eager
    assert fwd.__code__ is modeling_llama.LlamaAttention.forward.__code__  # transformers' own code

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # a different formula (no rotate_half)
        return q * cos.unsqueeze(unsqueeze_dim), k * cos.unsqueeze(unsqueeze_dim)

    glb = dict(modeling_llama.LlamaAttention.forward.__globals__, apply_rotary_pos_emb=apply_rotary_pos_emb)
    other = types.FunctionType(modeling_llama.LlamaAttention.forward.__code__, glb, "forward")
    Other = type("Other", (modeling_llama.LlamaAttention,), {"forward": other})
    assert fused._fused_attention_forward(Other) is None
