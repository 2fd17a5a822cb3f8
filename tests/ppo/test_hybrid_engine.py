"""The hybrid engine's decoder (engine/hybrid.py) against transformers' generate on the same weights."""

import pytest
import torch

from chatrlhf.engine.hybrid import HybridDecoder, process_scores, sample_categorical, unsupported_reason
from chatrlhf.models.loading import load_causal_lm, load_tokenizer

PROMPTS = ["Human: What is 12 plus 7? Assistant:", "Human: Spell cat backwards. Assistant:", "hi"]
# BLOOM at its default initializer_range (0.02) and this tiny size emits one token over and over whatever the
# positions: its ALiBi could be dropped, or the residual layout changed, without changing a token. With weights of
# std 1 every part of the layer decides the tokens, in bf16 the attention's roundings too.
BLOOM = dict(hidden=64, layers=2, vocab=512, overrides={"initializer_range": 1.0})
# The same holds, less starkly, for tiny OPT, llama and GPT-2 (1-2 distinct tokens per greedy row): their equality
# tests use the same wide init, so positions and attention shape every token compared.
VARIED = {"opt": {"init_std": 1.0}, "llama": {"initializer_range": 1.0}, "gpt2": {"initializer_range": 1.0}}


def _load(model_dir):
    tok = load_tokenizer(str(model_dir), padding_side="left")
    model = load_causal_lm(str(model_dir), tokenizer=tok).eval()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return model, tok, enc["input_ids"], enc["attention_mask"]


def _hf_greedy(model, tok, ids, mask, n, eos, min_new=0):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=min_new or None,
                          do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                          eos_token_id=eos)


def _variant(base, name: str, **changes):
    """A random model with ``base``'s config changed (and its tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base)
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(3)
    out = base.parent.parent / name
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    return out


def _unknown_family_model():
    """A causal LM of a family the decoder does not know (GPT-J), tiny and random."""
    from transformers import AutoModelForCausalLM, GPTJConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPTJConfig(n_embd=32, n_layer=1, n_head=2, rotary_dim=8, vocab_size=64,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module", params=[("opt", 2), ("opt", 350), ("llama", 4), ("llama", 2), ("gpt_neox", 0),
                                        ("gpt_neox", 1), ("gpt2", 0), ("bloom", 0), ("bloom", 1)],
                ids=["opt", "opt-350m-style", "llama", "llama-gqa", "gpt_neox", "gpt_neox-sequential", "gpt2",
                     "bloom", "bloom-normed-residual"])
def family_model(request, tiny_model_factory):
    """Each family the decoder knows, with its layout variants: OPT-350m's post-norm with projected embeddings,
    grouped-query attention, GPT-NeoX's partial rotary with parallel (Pythia) or sequential residuals, GPT-2's
    Conv1D projections and learned positions, BLOOM's ALiBi with residuals from the layer input or (BLOOM's
    apply_residual_connection_post_layernorm) from its normed input."""
    family, kv = request.param
    if family == "bloom":
        base = tiny_model_factory("bloom", **BLOOM)
        return _variant(base, "bloom_normed", apply_residual_connection_post_layernorm=True) if kv else base
    if family == "gpt_neox":
        base = tiny_model_factory("gpt_neox", hidden=64, layers=2, vocab=512)
        return _variant(base, "neox_seq", use_parallel_residual=False) if kv else base
    varied = dict(hidden=64, layers=2, vocab=512, overrides=VARIED[family])
    if family == "opt" and kv == 350:  # OPT-350m's layout: post-norm layers and in/out projections of the embeddings
        return _variant(tiny_model_factory("opt", **varied), "opt350", do_layer_norm_before=False,
                        word_embed_proj_dim=32)
    if family == "llama" and kv != 4:  # 4 query heads share 2 K/V heads
        return _variant(tiny_model_factory("llama", **varied), f"gqa{kv}", num_key_value_heads=kv)
    return tiny_model_factory(family, **varied)


@pytest.mark.parametrize("fuse,native", [(True, None), (True, False), (False, False)],
                         ids=["native", "fused", "in-place"])
@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_greedy_tokens_equal_generate(family_model, fuse, native):
    model, tok, ids, mask = _load(family_model)
    dec = HybridDecoder(model, rows=ids.shape[0], pack=fuse, native=native)
    # llama-likes on CPU fp32 decode in decode.c by default; OPT has no native step
    assert (dec.native is not None) == (native is None and model.config.model_type == "llama")
    ours = dec.generate(ids, mask, 24, tok.pad_token_id, tok.eos_token_id, min_new_tokens=24, do_sample=False)
    ref = _hf_greedy(model, tok, ids, mask, 24, tok.eos_token_id, min_new=24)
    assert ours.shape == ref.shape == (3, ids.shape[1] + 24)
    assert torch.equal(ours, ref)


def test_no_eos_runs_to_max_new_tokens(family_model):
    model, tok, ids, mask = _load(family_model)
    out = HybridDecoder(model, rows=3).generate(ids, mask, 7, tok.pad_token_id, None, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 7)


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_rows_stop_at_eos_and_pad_like_generate(family_model):
    """Pick as EOS a token that row 0 emits early: that row must stop there and be padded, the others go on, and
    generation ends early once every row is done, all exactly as generate() does."""
    model, tok, ids, mask = _load(family_model)
    free = _hf_greedy(model, tok, ids, mask, 12, tok.eos_token_id, min_new=12)
    P = ids.shape[1]
    eos = int(free[0, P + 2])
    dec = HybridDecoder(model, rows=3)
    for min_new in (4, 0):  # with min_new_tokens=4 the early EOS is banned, so row 0 goes on
        ours = dec.generate(ids, mask, 12, tok.pad_token_id, eos, min_new_tokens=min_new, do_sample=False)
        ref = _hf_greedy(model, tok, ids, mask, 12, eos, min_new=min_new)
        assert torch.equal(ours, ref), min_new
    first = (ours[0, P:] == eos).nonzero()[0].item()
    assert first <= 2 and (ours[0, P + first + 1:] == tok.pad_token_id).all()


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_sampling_matches_the_model_distribution(family_model):
    """First sampled token over many rows of one prompt: its frequencies follow softmax(logits / T) after top-k.
    Then seeded sampling over the decode steps, left-padded rows included: the same seed gives the same tokens
    through the packed and the in-place decoder."""
    model, tok, ids, mask = _load(family_model)
    n = 6000
    ids1, mask1 = ids[:1].expand(n, -1).contiguous(), mask[:1].expand(n, -1).contiguous()
    with torch.no_grad():
        logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].float()
    T, k = 0.5, 20
    want = torch.softmax(process_scores(logits[None] / 1.0, 0, 0, torch.tensor([tok.eos_token_id]), True, T, 1.0,
                                        k), -1)[0]
    torch.manual_seed(0)
    seq = HybridDecoder(model, rows=n).generate(ids1, mask1, 1, tok.pad_token_id, tok.eos_token_id,
                                                do_sample=True, temperature=T, top_k=k)
    got = torch.bincount(seq[:, -1], minlength=logits.numel()).float() / n
    assert got[want == 0].sum() == 0  # nothing outside the top-k
    assert 0.5 * (got - want).abs().sum() < 0.05  # total variation distance
    seeded = []
    for pack in (True, False):
        torch.manual_seed(7)
        seeded.append(HybridDecoder(model, rows=3, pack=pack, native=False).generate(
            ids, mask, 12, tok.pad_token_id, tok.eos_token_id, min_new_tokens=12, do_sample=True, temperature=T,
            top_k=k, top_p=0.9))
    assert torch.equal(*seeded) and seeded[0].shape == (3, ids.shape[1] + 12)


def test_processors_equal_transformers():
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    scores = torch.randn(4, 50) * 3
    eos = torch.tensor([7, 9])
    for t, min_new, T, k, p in [(0, 3, 0.7, 10, 0.9), (5, 3, 1.0, 0, 0.5), (1, 0, 1.3, 3, 1.0)]:
        procs = [MinNewTokensLengthLogitsProcessor(2, min_new, eos)] if min_new else []
        procs += [TemperatureLogitsWarper(T)] if T != 1.0 else []
        procs += [TopKLogitsWarper(k)] if k else []
        procs += [TopPLogitsWarper(p)] if p < 1.0 else []
        ids = torch.zeros(4, 2 + t, dtype=torch.long)
        ref = LogitsProcessorList(procs)(ids, scores.clone())
        ours = process_scores(scores.clone(), t, min_new, eos, True, T, p, k)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_sample_categorical_frequencies_and_zero_mass(monkeypatch):
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    idx = sample_categorical(probs, generator=g).view(20000, 2)
    f = torch.bincount(idx[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(f, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)
    assert (idx[:, 1] == 3).all()
    # a uniform that rounds onto the total still lands on the last entry with mass, never past it
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape))
    assert sample_categorical(torch.tensor([[0.25, 0.75, 0.0, 0.0]])).tolist() == [1]


def test_unsupported_models_and_generation_configs(tiny_model_factory):
    gptj = _unknown_family_model()
    assert "gptj" in unsupported_reason(gptj)
    with pytest.raises(ValueError, match="does not support"):
        HybridDecoder(gptj, rows=1)
    bloom = load_causal_lm(str(tiny_model_factory("bloom", **BLOOM)))
    assert unsupported_reason(bloom) is None
    bloom.config.pretraining_tp, bloom.config.slow_but_exact = 2, True  # generate() sums projections in slices
    assert "slow_but_exact" in unsupported_reason(bloom)
    opt = load_causal_lm(str(tiny_model_factory("opt", hidden=64, layers=2, vocab=512)))
    assert unsupported_reason(opt) is None
    opt.generation_config.repetition_penalty = 1.3  # a processor the decoder does not implement
    assert "repetition_penalty" in unsupported_reason(opt)


@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("family", ["opt", "gpt_neox", "gpt2", "bloom"])
@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_generate_answers_hybrid_equals_generate(tiny_model_factory, family, lora):
    """Through the product path (strategy, generation_context with LoRA merged, num_return_sequences): the same
    tokens with and without the hybrid engine."""
    from chatrlhf.engine import DeepSpeedStrategy, StrategyConfig, unwrap
    from chatrlhf.models.lora import apply_lora
    from chatrlhf.trainers.ppo import experience as px

    model_dir = tiny_model_factory(family, **BLOOM) if family == "bloom" else \
        tiny_model_factory(family, hidden=64, layers=2, vocab=512)
    model, tok, ids, mask = _load(model_dir)
    if lora:
        torch.manual_seed(0)
        targets = {"opt": "q_proj,v_proj,fc1", "gpt2": "c_attn,c_fc"}.get(family, "query_key_value")
        model = apply_lora(model, lora, targets)
        for n, p in model.named_parameters():  # non-zero B so the merged weights differ from the base
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    strategy = DeepSpeedStrategy(StrategyConfig(dtype="fp32", per_device_train_batch_size=2))
    strategy.setup_distributed()
    model = strategy.prepare_eval(model)
    assert unsupported_reason(unwrap(model)) is None  # LoRA layers do not hide the family
    outs = []
    for hybrid in (True, False):
        p = px.GenerationParams(max_new_tokens=10, min_new_tokens=3, do_sample=False, num_return_sequences=2,
                                hybrid=hybrid)
        outs.append(px.generate_answers(model, strategy, tok, ids, mask, p))
    (s1, m1), (s0, m0) = outs
    assert s1.shape[0] == 6
    assert torch.equal(s1, s0) and torch.equal(m1, m0)


def test_folded_rms_norm_matches_llama_rms_norm():
    """The fused path's RMSNorm leaves sqrt(H) * weight to the next matmul; the product must be the model's norm,
    including where eps matters (tiny activations, as in a freshly initialised model)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from chatrlhf.engine.hybrid import _Norm

    torch.manual_seed(0)
    mod = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        mod.weight.normal_()
    norm = _Norm(mod, fold=True)
    assert norm.fold
    for scale in (1.0, 1e-3):
        x = torch.randn(8, 3, 64) * scale
        torch.testing.assert_close(norm(x) * norm.fold_scale, mod(x), rtol=1e-5, atol=1e-6)
    assert not _Norm(mod, fold=False).fold


@pytest.mark.parametrize("rows,kv,wide", [(1, 4, False), (11, 2, False), (3, 1, True)],
                         ids=["1-row", "11-rows-gqa", "3-rows-80-wide-heads"])
def test_native_decode_step_equals_torch_step(tiny_model_factory, monkeypatch, rows, kv, wide):
    """decode.c's step against the torch step on the same decoder state, logits compared at every position: one
    row (seven zero rows of padding in its GEMM block), 11 rows (two blocks) with 4 query heads on 2 K/V heads,
    and heads 80 wide (SmolLM2's are 64: the attention's 64-column chunks plus a 16-column tail), 2 on 1 K/V head."""
    from chatrlhf.engine.native import NativeStep

    if wide:
        base = tiny_model_factory("llama", hidden=160, layers=2, heads=2, kv_heads=kv, vocab=512)
    else:
        base = tiny_model_factory("llama", hidden=64, layers=2, vocab=512)
    model, tok, ids, mask = _load(base if kv == 4 or wide else _variant(base, f"gqa{kv}", num_key_value_heads=kv))
    idx = torch.arange(rows) % ids.shape[0]
    ids, mask = ids[idx], mask[idx]
    nat = HybridDecoder(model, rows=rows)
    ref = HybridDecoder(model, rows=rows, native=False)
    assert nat.native is not None and ref.native is None
    seen = {"native": [], "torch": []}

    def recorder(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            seen[name].append(out.clone())
            return out
        return wrapped

    monkeypatch.setattr(NativeStep, "__call__", recorder("native", NativeStep.__call__))
    ref._forward = recorder("torch", ref._forward)
    a = nat.generate(ids, mask, 10, tok.pad_token_id, None, do_sample=False)
    b = ref.generate(ids, mask, 10, tok.pad_token_id, None, do_sample=False)
    assert torch.equal(a, b)
    steps = seen["torch"][1:]  # the first call is the prefill, which both run in torch
    assert len(seen["native"]) == len(steps) == 9
    for x, y in zip(seen["native"], steps):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_next_decoder_reuses_the_dropped_decoders_weight_copies(tiny_model_factory):
    """PPO builds a decoder per rollout: the fused copies (q/k/v and gate/up concatenated, norm scales folded in)
    of the dropped one are reused in place by the next, which still decodes the current weights exactly."""
    import gc

    model, tok, ids, mask = _load(tiny_model_factory("llama", hidden=64, layers=2, vocab=512))
    first = HybridDecoder(model, rows=3)
    ptrs = {t.data_ptr() for t in first._copies}
    assert len(ptrs) == 2 * 2 + 1  # qkv and gate/up per layer, the head with the final norm folded in
    alive = HybridDecoder(model, rows=3)  # built while the first is alive: copies of its own
    last = {t.data_ptr() for t in alive._copies}
    assert len(last) == 5 and not ptrs & last
    del first, alive  # the pool keeps the last one dropped
    gc.collect()
    with torch.no_grad():  # the weights change between rollouts
        for p in model.parameters():
            p.mul_(1.01)
    dec = HybridDecoder(model, rows=3)
    assert {t.data_ptr() for t in dec._copies} == last
    ours = dec.generate(ids, mask, 12, tok.pad_token_id, None, min_new_tokens=12, do_sample=False)
    assert torch.equal(ours, _hf_greedy(model, tok, ids, mask, 12, None, min_new=12))


def test_native_decode_can_be_turned_off(tiny_model_factory, monkeypatch):
    from chatrlhf.engine import native

    model, tok, ids, mask = _load(tiny_model_factory("llama", hidden=64, layers=2, vocab=512))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    monkeypatch.setenv("CHATRLHF_NATIVE_DECODE", "0")
    assert HybridDecoder(model, rows=3).native is None
    assert "CHATRLHF_NATIVE_DECODE=0" in native.reason()


def test_native_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    """A missing compiler leaves the torch path with a reason (and the reason names what failed)."""
    from chatrlhf.engine import native

    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    monkeypatch.setenv("CHATRLHF_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.load() is None
    assert "no-such-cc" in native.reason() or "compiler" in native.reason()
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_decode_path_is_the_measured_fastest(family_model, monkeypatch, tmp_path):
    """generate() chooses among the decoders that can run the model by timing them side by side on this CPU:
    the choice is the fastest measured (recorded with every candidate's time), cached for the next process, and
    every path — chosen, forced or cached — gives generate()'s greedy tokens."""
    from chatrlhf.engine import calibrate, hybrid

    monkeypatch.setenv("CHATRLHF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_decided", {})
    model, tok, ids, mask = _load(family_model)
    llama = model.config.model_type == "llama"
    assert hybrid.candidate_paths(model) == (["native"] if llama else []) + ["packed", "generate"]
    ref = _hf_greedy(model, tok, ids, mask, 12, tok.eos_token_id)

    def run():
        return hybrid.generate(model, ids, mask, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)

    assert torch.equal(run(), ref)
    (d,) = calibrate.decisions()
    assert d["part"] == "decode" and d["how"] == "measured" and d["shape"]["rows"] == 3
    assert set(d["seconds"]) == set(hybrid.candidate_paths(model))
    assert d["choice"] == min(d["seconds"], key=d["seconds"].get)
    monkeypatch.setattr(calibrate, "_decided", {})  # a new process: the cached choice, not a new measurement
    assert torch.equal(run(), ref)
    assert [x["how"] for x in calibrate.decisions()] == ["cached"]
    for path in hybrid.candidate_paths(model):
        monkeypatch.setenv("CHATRLHF_PATH_DECODE", path)
        assert torch.equal(run(), ref), path


def test_unsupported_model_has_only_generate():
    from chatrlhf.engine import hybrid

    assert hybrid.candidate_paths(_unknown_family_model()) == ["generate"]


@pytest.mark.parametrize("n_heads", [1, 3, 4, 6, 12, 16, 20, 112])
def test_alibi_equals_transformers_build_alibi_tensor(n_heads):
    """Slopes for power-of-two and other head counts (BLOOM-176B: 112), and the bias of a left-padded batch at its
    real keys, as transformers builds them: bitwise in fp32 and after the cast to bf16."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

    from chatrlhf.engine.hybrid import alibi_bias, alibi_slopes

    slopes = alibi_slopes(n_heads)
    assert torch.equal(slopes, _get_alibi_slopes(n_heads, torch.device("cpu")))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]])
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # HybridDecoder.generate's positions
    for dtype in (torch.float32, torch.bfloat16):
        ours = alibi_bias(slopes, pos, dtype)  # [B, heads, 1, S]
        ref = build_alibi_tensor(mask, n_heads, dtype).view(3, n_heads, 1, 7)
        real = mask.bool()[:, None, None, :].expand_as(ref)
        assert torch.equal(ours[real], ref[real])


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_bf16_packed_decoder_gives_generate_tokens(family_model, monkeypatch):
    """bf16 on CPU: the projections pre-packed by oneDNN for the batch give generate()'s greedy tokens (a left-padded
    row included), and the packed path is one of the measured candidates (with the native bf16 step for llama-likes:
    tests/ppo/test_native_bf16.py)."""
    from chatrlhf.engine import hybrid

    monkeypatch.setattr(hybrid._Proj, "PACK_MIN_ELEMENTS", 0)  # tiny matrices: pack them all the same
    model, tok, ids, mask = _load(family_model)
    model = model.to(torch.bfloat16)
    llama = model.config.model_type == "llama"
    assert hybrid.candidate_paths(model) == (["native"] if llama else []) + ["packed", "generate"]
    dec = HybridDecoder(model, rows=ids.shape[0], pack=True, native=False)
    # packed by oneDNN where this processor can (AVX512-BF16 class); fused but unpacked elsewhere: the same tokens
    assert dec.native is None and (dec.layers[0]["qkv"].packed is not None) == hybrid._can_pack(dec.embed)
    ours = dec.generate(ids, mask, 16, tok.pad_token_id, tok.eos_token_id, min_new_tokens=16, do_sample=False)
    assert torch.equal(ours, _hf_greedy(model, tok, ids, mask, 16, tok.eos_token_id, min_new=16))


def test_bench_rollout_decode_per_family_row_and_table(tiny_model_factory):
    """`python -m bench --tasks families`: one family's row (hybrid engine and generate() side by side, the path the
    calibration picked) and the table results.md shows, failed families included. Figures only, no speed asserted."""
    from bench import harness as bench

    r = bench.family_decode_row(tiny_model_factory("bloom", **BLOOM), batch=2, prompt_len=6, response_len=4,
                                dtype="fp32", min_time=0.0, trials=1)
    assert r["model_type"] == "bloom" and r["path"] in ("packed", "generate") and r["how"] == "measured"
    assert set(r["candidates_s"]) == {"packed", "generate"}
    assert r["hybrid_step_ms"] > 0 and r["speedup"] == pytest.approx(r["generate_step_ms"] / r["hybrid_step_ms"])
    fam = {"ok": True, "shape": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 512}, "batch": 2, "prompt_len": 6,
           "response_len": 4, "dtype": "fp32", "rows": {"bloom": r, "opt": {"error": "boom"}}}
    md = "\n".join(bench.render_family_decode(fam))
    assert "## Rollout decode per family: hybrid vs generate()" in md and f"**{r['path']}** (measured: " in md
    assert f"| bloom | {r['hybrid_step_ms']:.2f} | {r['generate_step_ms']:.2f} | {r['speedup']:.2f}x |" in md
    assert "| opt | error: boom |" in md
    assert bench.render_family_decode(None) == []
    assert "error: timed out" in "\n".join(bench.render_family_decode({"ok": False, "error": "timed out"}))
