"""Chunked lm-head log-probs / cross entropy (chatrlhf.algo.losses, steps/lm_head.py): the same values and gradients as
the plain [B, K, V] logits path, without ever building those logits; and the steps (SFT, DPO, PPO/GRPO log-probs)
give the same results with the chunked path on and off, through real DeepSpeed engines."""

import copy

import pytest
import torch
import torch.nn.functional as F

from chatrlhf.algo.losses import chunked_cross_entropy, chunked_token_logprobs
from chatrlhf.trainers import lm_head

B, K, H, V = 3, 7, 16, 50  # B*K = 21 rows: chunk sizes 4 and 8 do not divide it


def _inputs(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, K, H, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, V, (B, K), generator=g)
    return h, w, b, t


def _ref_logprobs(h, w, t, b=None):
    logp = torch.log_softmax(F.linear(h, w, b).float(), -1)
    return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None], retain_graph=True)


@pytest.mark.parametrize("transposed", [False, True], ids=["h@Wt", "(W@ht)t"])
@pytest.mark.parametrize("chunk", [1, 4, 8, 21, 1000, None])
def test_token_logprobs_and_entropy_equal_the_reference(chunk, transposed):
    h, w, b, t = _inputs()
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    lp, ent = chunked_token_logprobs(h, w, t, chunk=chunk, entropy=True, bias=b, transposed=transposed)
    ref_lp, ref_ent = _ref_logprobs(h, w, t, b)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (B, K)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)
    for name, mine, ref in [("logp", (lp * g_lp).sum(), (ref_lp * g_lp).sum()),
                            ("entropy", (ent * g_ent).sum(), (ref_ent * g_ent).sum()),
                            ("both", (lp * g_lp + ent * g_ent).sum(), (ref_lp * g_lp + ref_ent * g_ent).sum())]:
        for gm, gr, what in zip(_grads(mine, (h, w, b)), _grads(ref, (h, w, b)), ("hidden", "weight", "bias")):
            torch.testing.assert_close(gm, gr, rtol=0, atol=1e-5, msg=f"{name}: d/d {what}")


@pytest.mark.parametrize("transposed", [False, True], ids=["h@Wt", "(W@ht)t"])
@pytest.mark.parametrize("chunk", [4, None])
def test_frozen_head_precomputes_the_row_gradients(chunk, transposed):
    """Only the hidden states need a gradient (frozen / LoRA'd head, bias frozen too): forward keeps d logp/dh and
    d entropy/dh, backward only scales rows; the same gradients. entropy_grad=False: a detached entropy."""
    h, w, b, t = _inputs()
    w.requires_grad_(False)
    b.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    lp, ent = chunked_token_logprobs(h, w, t, chunk=chunk, entropy=True, bias=b, transposed=transposed)
    ref_lp, ref_ent = _ref_logprobs(h, w, t, b)
    for mine, ref in [((lp * g_lp).sum(), (ref_lp * g_lp).sum()), ((ent * g_ent).sum(), (ref_ent * g_ent).sum()),
                      ((lp * g_lp + ent * g_ent).sum(), (ref_lp * g_lp + ref_ent * g_ent).sum())]:
        torch.testing.assert_close(_grads(mine, (h,))[0], _grads(ref, (h,))[0], rtol=0, atol=1e-5)
    lp2, ent2 = chunked_token_logprobs(h, w, t, chunk=chunk, entropy=True, bias=b, entropy_grad=False)
    assert lp2.requires_grad and not ent2.requires_grad
    torch.testing.assert_close(_grads((lp2 * g_lp).sum(), (h,))[0], _grads((ref_lp * g_lp).sum(), (h,))[0],
                               rtol=0, atol=1e-5)


def test_token_logprobs_skip_ignored_rows_and_frozen_weights():
    h, w, b, t = _inputs()
    w.requires_grad_(False)
    t = t.clone()
    t[0, :3] = -100
    t[2, 6] = -100
    ignored = t == -100
    lp, ent = chunked_token_logprobs(h, w, t, chunk=4, entropy=True, bias=b, ignore_index=-100)
    ref_lp, ref_ent = _ref_logprobs(h, w, t.clamp(min=0), b)
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    torch.testing.assert_close(lp[~ignored], ref_lp[~ignored], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[~ignored], ref_ent[~ignored], rtol=0, atol=1e-5)
    gh, gb = _grads((lp + ent).sum(), (h, b))
    rh, rb = _grads(((ref_lp + ref_ent) * ~ignored).sum(), (h, b))
    assert (gh[ignored] == 0).all()
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=0, atol=1e-5)
    # nothing labelled at all: zeros, still differentiable (a zero gradient)
    lp0, _ = chunked_token_logprobs(h, w, torch.full_like(t, -100), ignore_index=-100)
    assert (lp0 == 0).all() and torch.autograd.grad(lp0.sum(), h)[0].abs().sum() == 0
    with torch.no_grad():  # no graph, same values
        lp2, _ = chunked_token_logprobs(h, w, t, chunk=4, bias=b, ignore_index=-100)
    assert not lp2.requires_grad and torch.equal(lp2, lp.detach())


@pytest.mark.parametrize("transposed", [False, True], ids=["h@Wt", "(W@ht)t"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 4, 21, None])
def test_cross_entropy_equals_f_cross_entropy(reduction, chunk, transposed):
    h, w, b, t = _inputs()
    t = t.clone()
    t[0, :3] = -100
    t[1, 5] = -100
    mine = chunked_cross_entropy(h, w, t, reduction=reduction, chunk=chunk, bias=b, transposed=transposed)
    ref = F.cross_entropy(F.linear(h, w, b).float().reshape(-1, V), t.reshape(-1), reduction=reduction)
    ref = ref.view(B, K) if reduction == "none" else ref
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
    up = torch.randn(mine.shape, generator=torch.Generator().manual_seed(2)) if reduction == "none" else 3.0
    for gm, gr in zip(_grads((mine * up).sum(), (h, w, b)), _grads((ref * up).sum(), (h, w, b))):
        torch.testing.assert_close(gm, gr, rtol=0, atol=1e-5)


def test_cross_entropy_without_labels_is_nan_mean_and_zero_sum():
    h, w, _, t = _inputs(bias=False)
    none = torch.full_like(t, -100)
    assert torch.isnan(chunked_cross_entropy(h, w, none)) and torch.isnan(F.cross_entropy(
        F.linear(h, w).reshape(-1, V), none.reshape(-1)))
    s = chunked_cross_entropy(h, w, none, reduction="sum")
    assert float(s.detach()) == 0.0 and torch.autograd.grad(s, h)[0].abs().sum() == 0


def test_bf16_close_to_the_plain_bf16_path():
    """bf16 weights and hidden states: the logits' matmul in bf16, everything after it in fp32 (as the plain path
    with its fp32 upcast); gradients come back in bf16."""
    h, w, b, t = _inputs(torch.bfloat16)
    lp, ent = chunked_token_logprobs(h, w, t, chunk=4, entropy=True, bias=b)
    ref_lp, ref_ent = _ref_logprobs(h, w, t, b)
    # bf16 logits carry ~2^-8 relative rounding, and a matmul over 4 rows may block (and round) differently from
    # one over all rows with 2 threads: log-probs agree to a few hundredths, not to fp32's 1e-4
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=3e-2)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=3e-2)
    for gm, gr in zip(_grads((lp + ent).sum(), (h, w, b)), _grads((ref_lp + ref_ent).sum(), (h, w, b))):
        assert gm.dtype == torch.bfloat16
        torch.testing.assert_close(gm.float(), gr.float(), rtol=2e-2, atol=2e-2)
    ce = chunked_cross_entropy(h, w, t, chunk=4, bias=b)
    ref = F.cross_entropy(F.linear(h, w, b).float().reshape(-1, V), t.reshape(-1))
    torch.testing.assert_close(ce, ref, rtol=0, atol=1e-2)  # a mean: the row roundings partly cancel
    for gm, gr in zip(_grads(ce, (h, w, b)), _grads(ref, (h, w, b))):
        torch.testing.assert_close(gm.float(), gr.float(), rtol=2e-2, atol=2e-3)


# ---- memory: what is kept for backward, and the largest tensor any op makes --------------------------------------
class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest numel of any tensor an aten op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def _saved_and_largest(fn):
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with _LargestTensor() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        loss.backward()
    return max(saved, default=0), mode.largest


def test_peak_tensors_are_chunk_sized():
    """N = 512 rows, V = 1000, H = 32, chunk 64: the plain path saves and creates [N, V] tensors; the chunked one
    saves nothing larger than the weight [V, H] (the cross entropy keeps its forward-computed gradients, [N, H] and
    [V, H], outside autograd's saved tensors) and no op of its forward or backward makes anything larger than
    [chunk, V]."""
    n, v, hd, chunk = 512, 1000, 32, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hd, generator=g, requires_grad=True)
    w = (torch.randn(v, hd, generator=g) * 0.1).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    budget = max(chunk * v, v * hd, n * hd)
    assert budget < n * v

    def plain_lp():
        logp = torch.log_softmax(F.linear(h, w).float(), -1)
        return -(logp.gather(-1, t[:, None]).sum() + (logp.exp() * logp).sum())

    def plain_ce():
        return F.cross_entropy(F.linear(h, w).float(), t)

    def chunked_lp():
        lp, ent = chunked_token_logprobs(h, w, t, chunk=chunk, entropy=True)
        return -(lp.sum() + ent.sum())

    def chunked_ce():
        return chunked_cross_entropy(h, w, t, chunk=chunk)

    for plain, chunked in ((plain_lp, chunked_lp), (plain_ce, chunked_ce)):
        saved, largest = _saved_and_largest(plain)
        assert saved >= n * v and largest >= n * v
        saved, largest = _saved_and_largest(chunked)
        assert saved <= max(v * hd, n * hd), saved
        assert largest <= budget, (largest, budget)


# ---- the models' side: steps/lm_head.py ------------------------------------------------------------------------
@pytest.fixture
def plain_path(monkeypatch):
    """A context manager: the chunked path off inside it (CHATRLHF_CHUNKED_LM_HEAD=0)."""
    import contextlib

    @contextlib.contextmanager
    def off():
        monkeypatch.setenv(lm_head.ENV, "0")
        try:
            yield
        finally:
            monkeypatch.delenv(lm_head.ENV)

    return off


def _load(tiny_model_factory, family):
    from chatrlhf.models.loading import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(str(tiny_model_factory(family, hidden=64, layers=2, vocab=512)))


def _ppo_batch(seed=0):
    """Left-padded prompts (P = 6) + right-padded answers, as make_experience builds them."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(4, 500, (3, 14), generator=g)
    mask = torch.ones_like(seq)
    mask[0, :2] = 0  # left padding of a prompt
    mask[1, 11:] = 0  # an answer that ended early
    return seq, mask, 5  # start = P - 1


@pytest.mark.parametrize("family,frozen_head", [("llama", False), ("opt", False), ("llama", True)])
def test_ppo_answer_logprobs_equal_the_plain_path(tiny_model_factory, family, frozen_head, plain_path):
    """Left-padded prompts with position ids, entropy with and without its gradient, no-grad calls; a trained head
    (backward recomputes the logits) and a frozen one (forward keeps the row gradients)."""
    from chatrlhf.trainers.ppo.experience import answer_logprobs

    model = _load(tiny_model_factory, family)
    seq, mask, start = _ppo_batch()
    assert lm_head.head_reason(model, seq) == ""
    body = [p for n, p in model.named_parameters() if ".layers.0." in n][0]
    head = model.get_output_embeddings().weight
    head.requires_grad_(not frozen_head)
    params = [body] if frozen_head else [head, body]
    g = torch.Generator().manual_seed(3)
    up_lp, up_ent = torch.randn(3, 14 - 1 - start, generator=g), torch.randn(3, 14 - 1 - start, generator=g)

    def run():
        lp, ent = answer_logprobs(model, seq, mask, start, entropy=True, entropy_grad=True)
        grads = torch.autograd.grad((lp * up_lp + ent * up_ent).sum(), params)
        with torch.no_grad():
            lp_ng, ent_ng = answer_logprobs(model, seq, mask, start, entropy=True)
        _, ent_nograd = answer_logprobs(model, seq, mask, start, entropy=True, entropy_grad=False)
        assert not ent_nograd.requires_grad
        return lp.detach(), ent.detach(), grads, lp_ng, ent_ng

    chunked = run()
    with plain_path():
        plain = run()
    for a, b_ in zip(chunked[:2] + chunked[3:], plain[:2] + plain[3:]):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-5)
    for a, b_ in zip(chunked[2], plain[2]):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)


def test_dpo_pair_logps_equal_the_plain_path(tiny_model_factory, plain_path):
    from chatrlhf.trainers.dpo import pair_logps

    model = _load(tiny_model_factory, "opt")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (4, 12), generator=g)
    ids[2:, :5] = ids[:2, :5]  # chosen and rejected share a 5-token prompt
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    w = model.get_output_embeddings().weight

    def run():
        c, r = pair_logps(model, batch)
        return c.detach(), r.detach(), torch.autograd.grad((c - 2 * r).sum(), w)[0]

    chunked = run()
    with plain_path():
        plain = run()
    for a, b_ in zip(chunked, plain):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_fallbacks_are_decided_and_give_the_plain_results(tiny_model_factory, monkeypatch, caplog, plain_path):
    """Soft-capped logits (config), a head that is not a plain Linear (LoRA on lm_head), a ZeRO-3 partitioned
    weight, and a post-processing of the logits that only the probe can see: the plain path runs, the reason is
    logged once."""
    import logging

    from transformers import Gemma2Config, Gemma2ForCausalLM

    from chatrlhf.models.lora import apply_lora
    from chatrlhf.trainers.ppo.experience import answer_logprobs

    seq, mask, start = _ppo_batch()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=5.0))
    assert "soft-capped" in lm_head.head_reason(gemma, seq)
    monkeypatch.setattr(lm_head, "_SOFTCAP_FIELDS", ())  # the probe alone still sees it
    lm_head._decided.clear()
    assert "differ" in lm_head.head_reason(gemma, seq)

    lora = _load(tiny_model_factory, "llama")
    apply_lora(lora, 4, "lm_head")
    assert "not a plain Linear" in lm_head.head_reason(lora, seq)

    z3 = _load(tiny_model_factory, "llama")
    z3.get_output_embeddings().weight.ds_id = 0  # what ZeRO-3's partitioning marks a parameter with
    assert "ZeRO-3" in lm_head.head_reason(z3, seq)

    caplog.set_level(logging.INFO, logger="chatrlhf.trainers.lm_head")
    for _ in range(2):
        lp, _ = answer_logprobs(gemma, seq, mask, start)
    with plain_path():
        ref, _ = answer_logprobs(gemma, seq, mask, start)
    assert torch.equal(lp, ref)
    assert sum("Gemma2ForCausalLM: its logits differ" in r.getMessage() for r in caplog.records) == 1


# ---- through DeepSpeed ------------------------------------------------------------------------------------------
def _sft_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 500, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, :9] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sft_step_through_deepspeed_equals_the_plain_path(tiny_model_factory, plain_path, monkeypatch, stage):
    """One SFT loss + backward + SGD step through a real DeepSpeed engine (ZeRO 0-3, fp32, CPU): the same loss and
    the same weights after the step (so the same gradients, reduced by ZeRO's hooks) with the chunked path on and
    off (ZeRO-3 takes the plain path: its lm head weight is partitioned)."""
    import chatrlhf.trainers.sft as S
    from chatrlhf.engine import DeepSpeedStrategy

    calls = []
    real = S.chunked_cross_entropy
    monkeypatch.setattr(S, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = _load(tiny_model_factory, "llama")
    batch = _sft_batch()

    def step():
        s = DeepSpeedStrategy(zero_stage=stage, dtype="fp32", per_device_train_batch_size=4)
        s.setup_distributed()
        if stage == 3:
            with s.zero3_init_context(train=True):
                model = copy.deepcopy(base)
        else:
            model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # new weights = old - gradient: compares the gradients
        engine = s.prepare(model, opt)
        loss = S.sft_loss(engine, batch)
        s.backward(loss, engine)
        s.step(engine)
        return float(loss.detach()), s.full_state_dict(engine)

    loss_c, w_c = step()
    assert len(calls) == (0 if stage == 3 else 1)
    with plain_path():
        loss_p, w_p = step()
    assert len(calls) == (0 if stage == 3 else 1)
    assert abs(loss_c - loss_p) < 1e-6, (loss_c, loss_p)
    for k in w_p:
        torch.testing.assert_close(w_c[k], w_p[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sft_run_gives_the_same_losses_with_and_without_chunking(base_args, tmp_path, monkeypatch):
    """The whole SFT step (tiny OPT, DeepSpeed on CPU): train and eval losses equal with the chunked path on and
    off."""
    import chatrlhf.trainers.sft as S
    from chatrlhf.config import parse_config
    from chatrlhf.trainers.metrics import read_metrics

    calls = []
    real = S.chunked_cross_entropy
    monkeypatch.setattr(S, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(out):
        res = S.run_sft(parse_config(S.SFTConfig, base_args(out, learning_rate=3e-3, max_steps=4, log_interval=1,
                                                            eval_interval=2)))
        losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
        return res, losses

    on, on_losses = run(tmp_path / "on")
    assert calls
    monkeypatch.setenv(lm_head.ENV, "0")
    n = len(calls)
    off, off_losses = run(tmp_path / "off")
    assert len(calls) == n
    assert len(on_losses) == len(off_losses) == 4
    for a, b_ in zip(on_losses + [on["eval_loss_start"], on["eval_loss"]],
                     off_losses + [off["eval_loss_start"], off["eval_loss"]]):
        assert abs(a - b_) < 1e-5, (on_losses, off_losses, on, off)


def test_logits_layout_is_timed_once_per_shape_and_can_be_forced(monkeypatch, tmp_path):
    """The chunk logits' layout (h W^T or (W h^T)^T) is the faster one on this machine: both timed on first use,
    then remembered; CHATRLHF_PATH_LM_HEAD_LAYOUT forces either."""
    from chatrlhf.engine import calibrate
    from chatrlhf.trainers import lm_head

    monkeypatch.setenv("CHATRLHF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_decided", {})
    monkeypatch.setattr(lm_head, "_layouts", {})
    calls = []
    orig = lm_head.chunk_logits
    monkeypatch.setattr(lm_head, "chunk_logits",
                        lambda *a, **k: calls.append(k.get("transposed", False)) or orig(*a, **k))
    w = torch.randn(300, 16)
    rng = torch.get_rng_state()
    first = lm_head.logits_layout(w, None)
    assert set(calls) == {False, True} and (tmp_path / "calibration.json").is_file()
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's stream untouched: a resumed run repeats the first
    n = len(calls)
    assert lm_head.logits_layout(w, None) is first and len(calls) == n  # decided once
    for forced in ("linear", "transposed"):
        monkeypatch.setattr(lm_head, "_layouts", {})
        monkeypatch.setenv("CHATRLHF_PATH_LM_HEAD_LAYOUT", forced)
        assert lm_head.logits_layout(w, None) is (forced == "transposed") and len(calls) == n
