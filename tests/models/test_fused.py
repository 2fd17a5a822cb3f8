"""models/fused.py: the native SwiGLU and RMSNorm against their eager formulas (values and gradients), which modules
they take over (by what they compute), that the measured speed decides, that a fused model computes what the
original does (logits, every parameter's gradient, KV-cached generation), the switch, and that the strategy fuses
CPU fp32 models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatrlhf.engine import native
from chatrlhf.engine import fused
from chatrlhf.engine.fused import RMSNorm, SwiGLU, fuse_cpu_kernels


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


@pytest.fixture
def fused_paths(monkeypatch):
    """Force the fused kernels wherever they apply (whichever is faster on this CPU), for tests of what they
    compute; the speed choice itself is tested on its own below."""
    monkeypatch.setenv("CHATRLHF_PATH_FUSED_MLP", "fused")
    monkeypatch.setenv("CHATRLHF_PATH_FUSED_NORM", "fused")


def test_fused_model_matches_original(tiny_model_factory, fused_paths):
    model = _llama(tiny_model_factory)
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(2))
    logits0, grads0 = _loss_and_grads(model, ids)
    names = [n for n, _ in model.named_parameters()]

    # a layer: one MLP, two norms; and the final norm
    assert fuse_cpu_kernels(model) == {"mlp": 2, "norm": 5}
    assert fuse_cpu_kernels(model) == {"mlp": 0, "norm": 0}  # already fused
    assert all(m.mlp.forward.__func__ is fused._fused_mlp_forward for m in model.model.layers)
    assert model.model.norm.forward.__func__ is fused._fused_norm_forward
    assert [n for n, _ in model.named_parameters()] == names  # same weights, same names (checkpoints unchanged)
    logits1, grads1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    for n in names:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_gqa_model_trains_and_generates_as_original(fused_paths):
    """GQA llama: same loss and gradients; KV-cached greedy generation with a left-padded prompt gives the same
    tokens (decode steps run the fused norms and MLPs at one token a row)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
                                         max_position_embeddings=64))
    twin = copy.deepcopy(model)
    assert fuse_cpu_kernels(twin) == {"mlp": 2, "norm": 5}
    ids = torch.randint(3, 200, (3, 21), generator=torch.Generator().manual_seed(4))
    (l0, g0), (l1, g1) = (_loss_and_grads(m, ids) for m in (model, twin))
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    model.eval(), twin.eval()
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        outs = [m.generate(input_ids=ids[:, :6], attention_mask=mask, max_new_tokens=10, do_sample=False,
                           pad_token_id=0) for m in (model, twin)]
    assert torch.equal(outs[0], outs[1])


def test_only_modules_the_kernel_reproduces_are_fused(tiny_model_factory, fused_paths, caplog):
    """Recognised by what they compute on a probe, not by their code: a GELU MLP, a Gemma-style (1 + w) norm and an
    MLP whose forward scales its output keep their own forwards, and each is named once in the log."""
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
    with caplog.at_level("INFO", logger="chatrlhf.engine.fused"):
        assert fuse_cpu_kernels(model) == {"mlp": 0, "norm": 4}  # the layers' norms only
    assert norm.forward.__func__ is not fused._fused_norm_forward
    said = [r.getMessage() for r in caplog.records]
    for name in ("Gemma", "Scaled", "LlamaMLP"):
        assert sum(name + " keeps its own forward (the fused kernel does not reproduce" in m for m in said) == 1, said
    # the unchanged modules still compute what they did
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(norm(x), Gemma.forward(norm, x))


def test_fusion_follows_the_measured_speed(tiny_model_factory, monkeypatch, tmp_path, caplog):
    """Without a forced path the kernel is timed against eager on this CPU: the modules follow what was measured
    (recorded with both times), a forced 'eager' keeps every module's own forward and says why."""
    from chatrlhf.engine import calibrate

    monkeypatch.setenv("CHATRLHF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_decided", {})
    counts = fuse_cpu_kernels(_llama(tiny_model_factory))
    made = {d["part"]: d for d in calibrate.decisions()}
    assert set(made) == {"fused_mlp", "fused_norm"}
    for kind, n in (("mlp", 2), ("norm", 5)):
        d = made[f"fused_{kind}"]
        assert set(d["seconds"]) == {"fused", "eager"} and all(t > 0 for t in d["seconds"].values())
        assert d["choice"] == min(d["seconds"], key=d["seconds"].get)
        assert counts[kind] == (n if d["choice"] == "fused" else 0)
    assert (tmp_path / "calibration.json").exists()

    monkeypatch.setenv("CHATRLHF_PATH_FUSED_MLP", "eager")
    monkeypatch.setenv("CHATRLHF_PATH_FUSED_NORM", "eager")
    monkeypatch.setattr(fused, "_said", set())
    with caplog.at_level("INFO", logger="chatrlhf.engine.fused"):
        assert fuse_cpu_kernels(_llama(tiny_model_factory)) == {"mlp": 0, "norm": 0}
    assert any("LlamaMLP keeps its own forward (the eager ops measured faster at width" in r.getMessage()
               for r in caplog.records)


def test_switch_off_keeps_eager(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    monkeypatch.setenv("CHATRLHF_FUSED_KERNELS", "0")
    model = _llama(tiny_model_factory)
    assert fuse_cpu_kernels(model) == {"mlp": 0, "norm": 0}
    assert "CHATRLHF_FUSED_KERNELS=0" in native.reason("fused")
    # non-fp32 inputs never reach the kernel, whatever the switch says
    g = torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(fused.swiglu(g, g), _eager(g, g))


def test_strategy_fuses_cpu_fp32_models(tiny_model_factory, fused_paths):
    from chatrlhf.engine.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(dtype="fp32", zero_stage=0)
    model = strategy.prepare_eval(_llama(tiny_model_factory))
    assert all(m.mlp.forward.__func__ is fused._fused_mlp_forward for m in model.model.layers)
    assert all(m.input_layernorm.forward.__func__ is fused._fused_norm_forward for m in model.model.layers)
