"""engine/optim.AdamW (global-norm clipping inside the update) against clip_grad_norm_ + torch AdamW; the strategy's
hand-over of clipping from DeepSpeed to it (ZeRO-0 fp32 only); utils.tune_cpu_malloc."""

import copy

import pytest
import torch
import torch.nn as nn

from chatrlhf.engine.optim import AdamW

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
TIGHT = dict(rtol=1e-5, atol=1e-6)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def groups(model):
    """Two groups as create_optimizer builds them: decayed matrices, undecayed biases (own lr to tell them apart)."""
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.ndim == 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "lr": 3e-3}]


def backward(model, i):
    """Fresh gradients of a fixed random regression batch (batch i)."""
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()


def assert_params_close(a, b, **tol):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}", **(tol or TIGHT))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("max_norm,clips", [(0.05, True), (100.0, False)], ids=["clipping", "not_clipping"])
def test_matches_clip_grad_norm_then_adamw(fused, max_norm, clips):
    model = make_model()
    ref = copy.deepcopy(model)
    opt = AdamW(groups(model), **HP, fused=fused, max_grad_norm=max_norm)
    ref_opt = torch.optim.AdamW(groups(ref), **HP)
    for i in range(5):
        backward(model, i)
        backward(ref, i)
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        assert (total > max_norm) == clips, total  # the case is the one named
        opt.step()
        ref_opt.step()
        # Both paths leave the clipped gradients behind, as clip_grad_norm_ does: torch's fused kernel writes
        # grad / grad_scale back into .grad (so gradients ARE rewritten, in the same pass as the update).
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TIGHT)
        assert_params_close(model, ref)
    assert opt.skipped_nonfinite == 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_no_clipping_is_torch_adamw(fused):
    model = make_model()
    ref = copy.deepcopy(model)
    opt = AdamW(groups(model), **HP, fused=fused, max_grad_norm=0)
    ref_opt = torch.optim.AdamW(groups(ref), **HP, fused=fused)
    for i in range(4):
        backward(model, i)
        backward(ref, i)
        opt.step()
        ref_opt.step()
        assert_params_close(model, ref, rtol=0, atol=0)  # bit for bit: the same code path


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_nonfinite_gradient_skips_the_step(fused, bad):
    model = make_model()
    ref = copy.deepcopy(model)
    opt = AdamW(groups(model), **HP, fused=fused, max_grad_norm=0.05)
    ref_opt = torch.optim.AdamW(groups(ref), **HP)
    ps = list(model.parameters())

    def ref_step(i):
        backward(ref, i)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()

    backward(model, 0)
    opt.step()
    ref_step(0)
    params = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]

    backward(model, 1)
    with torch.no_grad():
        ps[0].grad[0, 0] = bad
    opt.step()
    assert opt.skipped_nonfinite == 1
    for p, before, st in zip(ps, params, state):
        assert torch.equal(p, before)
        for k, v in st.items():  # step count and both moments untouched
            assert torch.equal(opt.state[p][k], v), k

    backward(model, 2)  # the next finite step is an ordinary second step
    opt.step()
    ref_step(2)
    assert opt.skipped_nonfinite == 1
    assert int(opt.state[ps[0]]["step"]) == 2
    assert_params_close(model, ref)


# ---- DeepSpeed strategy -------------------------------------------------------------------------------------------
def tiny_lm():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0)
    return OPTForCausalLM(cfg)


def prepared(stage, clip, model=None):
    from chatrlhf.engine import DeepSpeedStrategy

    s = DeepSpeedStrategy(zero_stage=stage, dtype="fp32", gradient_clipping=clip, per_device_train_batch_size=2)
    s.setup_distributed()
    model = tiny_lm() if model is None else model
    opt = s.create_optimizer(model, lr=1e-2, weight_decay=0.1)
    return s, opt, s.prepare(model, opt)


@pytest.mark.parametrize("stage", [0, 1])
def test_prepare_hands_clipping_to_optimizer_only_at_zero0_fp32(stage):
    _, opt, engine = prepared(stage, 0.01)
    assert isinstance(opt, AdamW)
    if stage == 0:
        assert engine.optimizer is opt and opt.max_grad_norm == 0.01
        assert engine.gradient_clipping() == 0  # DeepSpeed must not clip (again) in front of the optimizer
    else:
        assert opt.max_grad_norm == 0
        assert engine.gradient_clipping() == 0.01


@pytest.mark.parametrize("clip", [0.01, 5.0, 0.0])
def test_zero0_engine_step_matches_reference(clip):
    """One real backward/step through the ZeRO-0 fp32 engine equals clip_grad_norm_(clip) + torch AdamW
    (betas 0.9/0.95, decay on matrices only, as create_optimizer builds it). clip 0 means no clipping."""
    from chatrlhf.engine import unwrap

    model = tiny_lm()
    ref = copy.deepcopy(model)
    s, _, engine = prepared(0, clip, model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    scale = 100.0  # a gradient norm well above DeepSpeed's own default clip of 1.0
    s.backward(engine(input_ids=ids, labels=ids).loss * scale, engine)
    assert s.step(engine)

    ps = list(ref.parameters())
    ref_opt = torch.optim.AdamW([{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    (ref(input_ids=ids, labels=ids).loss * scale).backward()
    total = torch.nn.utils.clip_grad_norm_(ps, clip) if clip else None
    assert total is None or total > max(clip, 1.0), total
    ref_opt.step()
    assert_params_close(unwrap(engine), ref)


# ---- global norm ----------------------------------------------------------------------------------------------
def test_global_norm_matches_float64():
    """The fp32-CPU dot path agrees with a float64 reference on large, mixed-size gradients; past fp32 range, and
    on inf/nan, it says so as clip_grad_norm_ does (the optimizer then skips the step)."""
    from chatrlhf.engine.optim import _global_norm

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3072, 768, generator=g) * 1e-3, torch.randn(768, generator=g), torch.randn(5, 7, generator=g).t()]
    ref = torch.sqrt(sum((x.double() ** 2).sum() for x in grads))
    torch.testing.assert_close(_global_norm(grads).double(), ref, rtol=1e-6, atol=0)

    big = [torch.full((1000,), 1e20), torch.ones(10)]
    p = nn.Parameter(torch.zeros(1000))
    p.grad = big[0].clone()
    assert not torch.isfinite(_global_norm(big)) and not torch.isfinite(torch.nn.utils.clip_grad_norm_([p], 1.0))
    assert not torch.isfinite(_global_norm([torch.ones(4), torch.tensor([float("inf")])]))
    assert torch.isnan(_global_norm([torch.ones(4), torch.tensor([float("nan")])]))
    mixed = [torch.ones(4, dtype=torch.bfloat16), torch.ones(9)]  # not all fp32: the grouped path
    torch.testing.assert_close(_global_norm(mixed), torch.tensor(13.0).sqrt())


# ---- malloc tuning ------------------------------------------------------------------------------------------------
def test_tune_cpu_malloc(monkeypatch):
    from chatrlhf import utils

    monkeypatch.setattr(utils, "_MALLOC_TUNED", False)
    monkeypatch.setenv("CHATRLHF_MALLOC_TUNING", "0")
    assert utils.tune_cpu_malloc() is False
    assert utils._MALLOC_TUNED is False
    monkeypatch.delenv("CHATRLHF_MALLOC_TUNING")
    assert utils.tune_cpu_malloc() is True  # glibc Linux
    assert utils.tune_cpu_malloc() is True  # idempotent
    assert utils._MALLOC_TUNED is True



_HEAP_SCRIPT = """
import ctypes, sys
from chatrlhf.utils import tune_cpu_malloc
assert tune_cpu_malloc()
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "masked":  # what mallopt got when a Python int wider than C int was passed: 1 << 40 -> 0
    libc.mallopt(-1, 0)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(24 << 20) for _ in range(8)]  # a step's worth of 24 MiB blocks: under the mmap threshold
before = libc.mallinfo2().arena
for b in reversed(blocks):
    libc.free(b)
print(before, libc.mallinfo2().arena)
"""


def test_tuned_malloc_keeps_freed_heap():
    """Blocks freed at the end of one step stay mapped for the next (no trim of the heap top, so no fresh pages to
    fault in: ~40k faults a step on the mid bench model while the trim threshold was masked to 0 by ctypes)."""
    import subprocess
    import sys

    def heap(mode: str) -> tuple[int, int]:
        r = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        before, after = map(int, r.stdout.split()[-2:])
        return before, after

    before, after = heap("tuned")
    assert before >= 8 * (24 << 20) and after == before, (before, after)
    before, after = heap("masked")
    assert after <= before - (24 << 20), (before, after)  # the probe sees a trim when there is one
