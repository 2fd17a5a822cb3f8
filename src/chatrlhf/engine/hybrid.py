"""Hybrid engine: a lean KV-cache decoder for the generation half of RLHF.

DeepSpeed-Chat's ``--enable_hybrid_engine`` swaps the training module for inference kernels while it generates,
because generation dominates a PPO step. DeepSpeed's containers are CUDA-only; this is our portable equivalent. It
reads the weights of a Hugging Face model in place (after ZeRO-3 gathering and LoRA merging, see
``ppo_experience.generation_context``) and runs the same maths as the model's own forward with none of
``generate()``'s per-step machinery:

- a preallocated KV cache (one write per layer and step, no ``torch.cat`` growth);
- q/k/v and gate/up projections fused into one matmul each, RMSNorm scales folded into them (3 ops a norm);
- on CPU, weights packed once per rollout for a small-batch GEMM (fp32: MKL's ``_mkl_reorder_linear_weight``,
  bf16: oneDNN's ``_reorder_linear_weight``): a decode step multiplies ``batch`` rows by every weight matrix, where
  plain ``F.linear`` streams fp32 weights at 5-8 GB/s on a 2-core Xeon and packed MKL at 12-15 GB/s, and bf16
  weights at 4-27 GB/s on an AVX512-BF16 EPYC against 24-72 GB/s packed;
- for llama-style models on CPU in fp32 or bf16, every step after the prefill is one call into decode.c
  (:mod:`chatrlhf.engine.native`: its own panel-packed GEMMs at 18-20 GB/s and no per-op cost), when a C compiler
  is there to build it;
- the processors of ``generate`` in its order (min_new_tokens, temperature, top-k, top-p), then ``argmax`` (greedy:
  the same tokens as ``generate``) or one inverse-CDF draw per row (the same distribution as ``multinomial`` at a
  fraction of its cost); finished rows emit ``pad`` and generation stops when every row has finished, as in
  ``generate``.

Families: llama-style decoders (llama, mistral, qwen2: RMSNorm, RoPE, gated MLP, GQA), OPT (DeepSpeed-Chat's
default actor, pre- or post-norm), GPT-NeoX / Pythia (partial rotary, parallel or sequential residual, per-head
interleaved q/k/v reordered once), GPT-2 (Conv1D projections, learned positions) and BLOOM (ALiBi biases built
once per rollout: in fp32 added to the attention mask, in half precision applied by BLOOM's own attention ops, whose
roundings decide generate()'s tokens; a LayerNorm after the embedding; per-head interleaved q/k/v like GPT-NeoX's;
residuals from the layer input or from its normed input). Anything else, or a generation config with processors
this module does not implement, falls back to ``generate`` with the reason logged once (:func:`unsupported_reason`).
The native C step is llama-style only: BLOOM decodes on packed or plain torch ops.

Which decoder runs is measured, not assumed (:func:`decode_path`): the same native step took 21 ms a token on one
CPU and 311 ms on another where ``generate()`` took 50 ms. The candidates that can run the model (native, packed,
plain torch ops, ``generate``) decode the first batch side by side once per processor, release and shape; the
fastest is cached (engine/calibrate.py) and used from then on.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from chatrlhf.engine import calibrate, native as native_step
from chatrlhf.errors import one_line

logger = logging.getLogger(__name__)

LLAMA_LIKE = ("llama", "mistral", "qwen2")
ROPE_KINDS = LLAMA_LIKE + ("gpt_neox",)  # rotary positions (GPT-NeoX: on the first rotary_ndims of each head)
ALIBI_KINDS = ("bloom",)  # no position embedding: a per-head linear bias on the key's position (ALiBi)
FAMILIES = LLAMA_LIKE + ("opt", "gpt_neox", "gpt2") + ALIBI_KINDS

# generation_config fields whose non-neutral value would change what generate() samples: we fall back then.
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
            "encoder_repetition_penalty": (None, 1.0), "length_penalty": (None, 1.0), "min_p": (None, 0.0),
            "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
            "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "sequence_bias": (None,), "num_beams": (None, 1),
            "penalty_alpha": (None,), "renormalize_logits": (None, False), "min_length": (None, 0)}


def _parts(lin) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an nn.Linear or of a peft LoRA layer whose adapter is merged (generation_context), as
    plain tensors sharing the parameters' storage (no autograd bookkeeping on every decode op)."""
    base = getattr(lin, "base_layer", lin)
    return _plain(base.weight), _plain(base.bias)


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def unsupported_reason(model) -> str | None:
    """Why :class:`HybridDecoder` cannot run ``model`` (``None`` when it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model_type {kind!r} (hybrid decoding knows {', '.join(FAMILIES)})"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    try:
        stack = _stack(model)
        first = _layers(stack)[0]
    except (AttributeError, IndexError, TypeError):
        return f"unexpected module layout for {kind}"
    if kind == "gpt2" and (getattr(cfg, "reorder_and_upcast_attn", False) or getattr(cfg, "add_cross_attention",
                                                                                      False)):
        return "gpt2 variant with upcast attention or cross-attention"
    if kind == "bloom" and getattr(cfg, "pretraining_tp", 1) > 1 and getattr(cfg, "slow_but_exact", False):
        # generate() sums the attention output / MLP projections in pretraining_tp slices: other roundings
        return "bloom with slow_but_exact and pretraining_tp > 1"
    if kind in LLAMA_LIKE:
        attn = first.self_attn
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")) or getattr(cfg, "hidden_act", "silu") not in (
                "silu", "gelu", "gelu_new", "relu"):
            return f"{kind} variant with q/k norms or activation {getattr(cfg, 'hidden_act', None)!r}"
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
                kind == "mistral":
            return "sliding-window attention"
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        for name, neutral in _NEUTRAL.items():
            v = getattr(gc, name, None)
            if v not in neutral:
                return f"generation_config.{name}={v!r}"
    return None


_FALLBACK_LOGGED: set[str] = set()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             pad_token_id: int, eos_token_id, min_new_tokens: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_return_sequences: int = 1,
             hybrid: bool = True) -> torch.Tensor:
    """``model.generate`` for left-padded prompts, through the decoder that is fastest for this model, batch and
    machine (:func:`decode_path`: :class:`HybridDecoder` with the native step, with packed torch ops, or
    transformers' ``generate``) when ``hybrid``; else ``generate``. Returns [B * n, P + new]."""
    if num_return_sequences > 1:  # what generate() does internally: row i's samples are adjacent
        input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0)
    path = decode_path(model, input_ids, attention_mask, max_new_tokens, pad_token_id) if hybrid else "generate"
    return _run_path(path, model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                     pad_token_id=pad_token_id, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens,
                     do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)


def _run_path(path: str, model, input_ids, attention_mask, *, max_new_tokens, pad_token_id, eos_token_id,
              min_new_tokens=0, do_sample=False, temperature=1.0, top_p=1.0, top_k=0) -> torch.Tensor:
    if path != "generate":
        dec = HybridDecoder(model, rows=input_ids.shape[0], pack=path != "torch", native=path == "native")
        return dec.generate(input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id,
                            min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, top_k=top_k)
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else \
        dict(temperature=None, top_p=None, top_k=None)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens or None, do_sample=do_sample, use_cache=True,
                          pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kw)


CALIBRATION_TOKENS = 16  # new tokens per timed candidate when choosing a decode path


def candidate_paths(model) -> list[str]:
    """The decoders that can run ``model`` here, fastest-in-theory first: ``native`` (CPU fp32 or bf16
    llama-style, a C compiler), ``packed`` (CPU fp32 or bf16: fused projections, weights pre-packed by MKL /
    oneDNN where this processor can), ``torch``
    (HybridDecoder on the module's own weights: accelerators, other dtypes), and always ``generate``. Why a model
    has no hybrid path is logged once."""
    reason = unsupported_reason(model)
    if reason is not None:
        if reason not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(reason)
            logger.warning("hybrid engine: %s; generating with transformers' generate", reason)
        return ["generate"]
    embed = _embedding(_stack(model)).weight
    if not _can_fuse(embed):
        return ["torch", "generate"]
    native = embed.dtype in native_step.DTYPES and native_lib(model) is not None
    return (["native"] if native else []) + ["packed", "generate"]


def decode_path(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                pad_token_id: int) -> str:
    """The fastest of :func:`candidate_paths` for this model's shape, this batch size and prompt length (rounded up
    to a power of two) on this machine: each candidate greedily decodes ``CALIBRATION_TOKENS`` tokens of this very
    batch, side by side, once per processor, release and shape (engine/calibrate.py caches it)."""
    paths = candidate_paths(model)
    if len(paths) == 1:
        return paths[0]
    cfg = model.config
    B, P = input_ids.shape
    shape = {"model_type": cfg.model_type, "dtype": str(_embedding(_stack(model)).weight.dtype),
             "device": input_ids.device.type, "rows": B, "prompt": 1 << max(P - 1, 0).bit_length(),
             **{k: getattr(cfg, k, None) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "ffn_dim",
                                                   "vocab_size")}}
    n = min(max_new_tokens, CALIBRATION_TOKENS)
    runs = {p: (lambda p=p: _run_path(p, model, input_ids, attention_mask, max_new_tokens=n,
                                      pad_token_id=pad_token_id, eos_token_id=None, min_new_tokens=n))
            for p in paths}
    return calibrate.choose("decode", shape, runs, reps=2, device=input_ids.device,
                            describe=f"{cfg.model_type} h{cfg.hidden_size} x{cfg.num_hidden_layers}, {B} rows")


def native_lib(model):
    """The native decode step's library when it can run ``model`` (llama-style, SwiGLU, no biases; CPU fp32 or
    bf16 weights, the caller checks), else None; the reason it cannot is logged once."""
    cfg = model.config
    why = None
    if cfg.model_type not in LLAMA_LIKE:
        why = f"model type {cfg.model_type}"
    elif getattr(cfg, "hidden_act", "silu") != "silu":
        why = f"activation {cfg.hidden_act}"
    elif getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False) or cfg.model_type == "qwen2":
        why = "biased projections"
    elif (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) > 512:
        why = "head_dim > 512"
    lib = None if why else native_step.load()
    why = why or (native_step.reason() if lib is None else None)
    if why and why not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(why)
        logger.info("hybrid engine: native decode step off (%s); decoding with torch ops", why)
    return lib


def _stack(model):
    """The decoder stack: ``model.model`` for llama-likes, ``model.model.decoder`` for OPT, ``model.gpt_neox``,
    ``model.transformer`` for GPT-2 and BLOOM."""
    kind = model.config.model_type
    if kind in ("gpt2", "bloom"):
        return model.transformer
    if kind == "gpt_neox":
        return model.gpt_neox
    return model.model.decoder if kind == "opt" else model.model


def _layers(stack):
    return stack.h if hasattr(stack, "h") else stack.layers


def _embedding(stack):
    for name in ("embed_tokens", "embed_in", "wte", "word_embeddings"):
        if hasattr(stack, name):
            return getattr(stack, name)
    raise AttributeError("no token embedding")


def _transposed(lin):
    """GPT-2's Conv1D (weight [in, out]) as a Linear-like (weight [out, in], a view)."""
    base = getattr(lin, "base_layer", lin)
    return SimpleNamespace(weight=base.weight.detach().t(), bias=_plain(base.bias))


def _per_head_qkv(lin, n_heads: int):
    """GPT-NeoX's and BLOOM's query_key_value, whose output rows are per head [q, k, v], reordered to
    [all q | all k | all v] (the layout the decoder splits); a copy of that one matrix."""
    base = getattr(lin, "base_layer", lin)
    w = base.weight.detach()
    out, d_in = w.shape
    hd = out // (3 * n_heads)
    w = w.view(n_heads, 3, hd, d_in).transpose(0, 1).reshape(out, d_in)
    b = base.bias
    b = None if b is None else b.detach().view(n_heads, 3, hd).transpose(0, 1).reshape(out)
    return SimpleNamespace(weight=w, bias=b)


class _CopyPool:
    """The fused weight copies (concatenated q/k/v and gate/up, norm scales folded in) of the last dropped decoder,
    for the next decoder of the same shapes: PPO builds one per rollout. Fresh copies came as new pages every
    rollout (~400 MB, ~100k page faults for SmolLM2-135M in fp32): glibc does not hand a freed block back to
    torch's 64-byte-aligned request of the same size. Kept only while they are under an eighth of the machine's
    memory (:func:`native.spare_fits`)."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple, like: torch.Tensor) -> torch.Tensor | None:
        spare = self.free.get((tuple(shape), like.dtype, like.device))
        return spare.pop() if spare else None

    def give(self, tensors: list[torch.Tensor]) -> None:
        self.free.clear()
        if tensors and native_step.spare_fits(sum(t.numel() * t.element_size() for t in tensors)):
            for t in tensors:
                self.free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)


_COPIES = _CopyPool()


class _Proj:
    """One or several linear maps applied to the same input (fused q/k/v, gate/up).

    ``fuse`` (CPU, fp32): the weights are concatenated into one matrix, one GEMM per call, and large ones are packed
    once for MKL's GEMM at exactly ``rows`` input rows (the prefill's other row count uses the plain matrix);
    ``in_scale`` multiplies the input features (a folded norm scale, see :class:`_Norm`).
    Otherwise (accelerators, half precision) the module's own weights are used in place, one ``F.linear`` each: no
    copy of a model that may fill the device."""

    PACK_MIN_ELEMENTS = 1 << 16  # below this, packing does not pay for itself

    def __init__(self, linears, rows: int, fuse: bool, in_scale: torch.Tensor | None = None,
                 mkl_pack: bool = True, copies: list[torch.Tensor] | None = None):
        parts = [_parts(m) for m in linears]
        self.sizes = [w.shape[0] for w, _ in parts]
        self.fused = fuse
        self.packed = None
        if fuse:
            w0 = parts[0][0]
            shape = (sum(self.sizes), w0.shape[1])
            if len(parts) > 1 or in_scale is not None:  # a copy (``copies``: the decoder's, reused by the next)
                out = _COPIES.take(shape, w0) if copies is not None else None
                if len(parts) > 1:
                    self.weight = torch.cat([w for w, _ in parts], out=out)
                    if in_scale is not None:  # W @ diag(s): a preceding norm's scale folded in
                        self.weight.mul_(in_scale)
                else:
                    self.weight = torch.mul(w0, in_scale, out=out)
                if copies is not None:
                    copies.append(self.weight)
            else:
                self.weight = w0
            self.bias = None
            if any(b is not None for _, b in parts):
                self.bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
            self.rows = rows
            if mkl_pack and self.weight.numel() >= self.PACK_MIN_ELEMENTS and _can_pack(self.weight):
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows) \
                    if self.weight.dtype == torch.float32 else \
                    torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
        else:
            self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, sum of outs], the projections side by side."""
        if not self.fused:
            ys = [F.linear(x, w, b) for w, b in self.parts]
            return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
        if self.packed is not None and x.shape[0] == self.rows:
            if x.dtype == torch.float32:
                return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class _Norm:
    """LayerNorm (OPT) or RMSNorm (llama-likes) with its tensors and epsilon read once: looking them up on the
    module every call (``nn.Module.__getattr__``) costs more than the norm itself at decode sizes.

    ``fold`` (RMSNorm in fp32, feeding fused projections): returns x / sqrt(|x|^2 + H eps) and leaves the scale
    sqrt(H) * weight to the next matmul (``fold_scale`` -> ``_Proj(in_scale=...)``). That is RMSNorm's
    x / sqrt(mean(x^2) + eps) * weight with the mean's 1/H moved out, in 3 ops instead of the ~7 that
    ``F.rms_norm`` runs on a CPU (2.4x faster at decode sizes; equal to ~1e-7 relative)."""

    def __init__(self, mod, fold: bool = False):
        self.weight, self.bias = _plain(mod.weight), _plain(getattr(mod, "bias", None))
        self.layer_norm = isinstance(mod, torch.nn.LayerNorm)
        self.fold = fold and not self.layer_norm and self.weight.dtype == torch.float32
        if self.layer_norm:
            self.shape, self.eps = tuple(mod.normalized_shape), mod.eps
        else:
            eps = getattr(mod, "variance_epsilon", None)
            self.eps = eps if eps is not None else getattr(mod, "eps", 1e-6)
        if self.fold:
            h = self.weight.shape[0]
            self.fold_scale = self.weight * h ** 0.5
            self.floor = torch.tensor((h * self.eps) ** 0.5, dtype=self.weight.dtype, device=self.weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold:
            return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).hypot_(self.floor)
        if self.layer_norm:
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        # LlamaRMSNorm: normalise in fp32, cast back, then scale (one fused op when already fp32)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _scale(norm: _Norm | None) -> torch.Tensor | None:
    return norm.fold_scale if norm is not None and norm.fold else None


def _can_fuse(weight: torch.Tensor) -> bool:
    """CPU fp32/bf16 weights: the projections are concatenated (and packed where :func:`_can_pack`)."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)


def _can_pack(weight: torch.Tensor) -> bool:
    """CPU weights that torch can pre-pack for a fixed small batch: fp32 through MKL, bf16 through oneDNN (2-6x
    faster than plain ``F.linear`` at 8 rows on an AVX512-BF16 EPYC, bitwise the same result). Both are torch's
    own ops for that (``torch.ops.mkl`` / ``torch.ops.mkldnn``); where a build lacks them the path is not offered."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.float32:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    return weight.dtype == torch.bfloat16 and _onednn_bf16_packs()


@functools.cache
def _onednn_bf16_packs() -> bool:
    """Whether this build *and processor* can pre-pack bf16 weights through oneDNN: the op exists in every build
    but refuses CPUs without AVX512-BF16-class instructions (seen on an AVX2 EPYC: "bf16 path needs the cpu
    support avx_ne_convert or avx512bw, avx512vl and avx512dq"). Asked once, by packing a small matrix."""
    if not (torch.backends.mkldnn.is_available()
            and all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))):
        return False
    try:
        w = torch.zeros(32, 32, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(w[:2], torch.ops.mkldnn._reorder_linear_weight(w, 2), None, "none",
                                           [], "")
    except RuntimeError as e:
        logger.info("bf16 weight packing (oneDNN) unavailable on this CPU: %s", one_line(e))
        return False
    return True


class HybridDecoder:
    """Batched sampling/greedy decoding of a supported causal LM; see the module docstring.

    Build it inside ``generation_context`` (full, merged weights) and use it there: unpacked projections refer to
    the module's parameters, which ZeRO-3 releases on leaving the context. ``rows``: the batch it will decode
    (packing is specific to it); ``pack``: fuse and pack projections (default: where possible, CPU fp32)."""

    def __init__(self, model, rows: int, pack: bool | None = None, native: bool | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"hybrid decoding does not support this model: {reason}")
        cfg = model.config
        self.kind = cfg.model_type
        stack = _stack(model)
        self.stack = stack
        self.embed = _plain(_embedding(stack).weight)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.hidden = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.n_heads
        self.dtype = self.embed.dtype
        pack = _can_fuse(self.embed) if pack is None else (pack and _can_fuse(self.embed))
        lib = native_lib(model) if pack and native is not False and self.dtype in native_step.DTYPES else None
        mkl = lib is None  # the native step has its own weight layout; the prefill uses the plain fused matrices
        self.rotary_ndims = self.head_dim
        self._copies: list[torch.Tensor] = []  # fused weight copies, handed to the next decoder when this one goes
        weakref.finalize(self, _COPIES.give, self._copies)
        self.layers = [self._build_layer(layer, rows, pack, mkl) for layer in _layers(stack)]
        self._family_ends(model, stack, pack)
        self.head = _Proj([model.get_output_embeddings()], rows, pack, _scale(self.final_norm), mkl, self._copies)
        self.native = native_step.NativeStep(lib, self, rows) if lib is not None else None

    def _build_layer(self, layer, rows: int, pack: bool, mkl: bool) -> dict:
        """One decoder layer's projections (fused and packed where ``pack``), norms and attention settings."""
        if self.kind == "gpt2":
            a = layer.attn
            return dict(
                qkv=_Proj([_transposed(a.c_attn)], rows, pack, mkl_pack=mkl),
                o=_Proj([_transposed(a.c_proj)], rows, pack, mkl_pack=mkl),
                up=_Proj([_transposed(layer.mlp.c_fc)], rows, pack, mkl_pack=mkl),
                down=_Proj([_transposed(layer.mlp.c_proj)], rows, pack, mkl_pack=mkl),
                ln1=_Norm(layer.ln_1), ln2=_Norm(layer.ln_2), scaling=a.scaling, pre_norm=True, parallel=False)
        if self.kind in ("gpt_neox", "bloom"):  # the same module names and per-head interleaved q/k/v
            neox = self.kind == "gpt_neox"
            a = layer.attention if neox else layer.self_attention
            if neox:
                self.rotary_ndims = a.rotary_ndims
            return dict(
                qkv=_Proj([_per_head_qkv(a.query_key_value, self.n_heads)], rows, pack, mkl_pack=mkl),
                o=_Proj([a.dense], rows, pack, mkl_pack=mkl),
                up=_Proj([layer.mlp.dense_h_to_4h], rows, pack, mkl_pack=mkl),
                down=_Proj([layer.mlp.dense_4h_to_h], rows, pack, mkl_pack=mkl),
                ln1=_Norm(layer.input_layernorm), ln2=_Norm(layer.post_attention_layernorm),
                scaling=a.scaling if neox else a.inv_norm_factor, pre_norm=True,
                parallel=neox and layer.use_parallel_residual,
                normed_residual=not neox and layer.apply_residual_connection_post_layernorm)
        a = layer.self_attn
        if self.kind == "opt":
            return dict(
                qkv=_Proj([a.q_proj, a.k_proj, a.v_proj], rows, pack, copies=self._copies),
                o=_Proj([a.out_proj], rows, pack),
                up=_Proj([layer.fc1], rows, pack), down=_Proj([layer.fc2], rows, pack),
                ln1=_Norm(layer.self_attn_layer_norm), ln2=_Norm(layer.final_layer_norm), scaling=a.scaling,
                pre_norm=layer.do_layer_norm_before, parallel=False)
        ln1, ln2 = _Norm(layer.input_layernorm, fold=pack), _Norm(layer.post_attention_layernorm, fold=pack)
        return dict(
            qkv=_Proj([a.q_proj, a.k_proj, a.v_proj], rows, pack, _scale(ln1), mkl, self._copies),
            o=_Proj([a.o_proj], rows, pack, mkl_pack=mkl),
            up=_Proj([layer.mlp.gate_proj, layer.mlp.up_proj], rows, pack, _scale(ln2), mkl, self._copies),
            down=_Proj([layer.mlp.down_proj], rows, pack, mkl_pack=mkl), ln1=ln1, ln2=ln2,
            scaling=a.scaling, pre_norm=True, parallel=False)

    def _family_ends(self, model, stack, pack: bool) -> None:
        """What sits around the layers, per family: activation, final norm, positions, projections in/out."""
        from transformers.activations import ACT2FN  # lazy: transformers

        cfg = model.config
        self.project_in = self.project_out = self.embed_norm = self.alibi_slopes = self.alibi = None
        if self.kind == "opt":
            self.act = ACT2FN[cfg.activation_function]
            fn = getattr(stack, "final_layer_norm", None)
            self.final_norm = _Norm(fn) if fn is not None else None
            self.project_in, self.project_out = stack.project_in, stack.project_out
            self.positions = _plain(stack.embed_positions.weight)
        elif self.kind == "gpt2":
            self.act = ACT2FN[cfg.activation_function]
            self.final_norm = _Norm(stack.ln_f)
            self.positions = _plain(stack.wpe.weight)
        elif self.kind == "gpt_neox":
            self.act = ACT2FN[cfg.hidden_act]
            self.final_norm = _Norm(stack.final_layer_norm)
        elif self.kind == "bloom":
            self.act = _bloom_gelu
            self.final_norm = _Norm(stack.ln_f)
            self.embed_norm = _Norm(stack.word_embeddings_layernorm)
            self.alibi_slopes = alibi_slopes(self.n_heads, self.embed.device)
        else:
            self.act = F.silu if cfg.hidden_act == "silu" else ACT2FN[cfg.hidden_act]
            self.final_norm = _Norm(stack.norm, fold=pack)

    # ------------------------------------------------------------------------------------------------ pieces
    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """q*cos + rotate_half(q)*sin with rotate_half's sign folded into ``sin_signed`` (4 ops, not 6)."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        if self.kind == "opt":
            if self.project_in is not None:
                x = F.linear(x, *_parts(self.project_in))
            x = x + F.embedding(pos + self.stack.embed_positions.offset, self.positions)
        elif self.kind == "gpt2":
            x = x + F.embedding(pos, self.positions)
        elif self.embed_norm is not None:  # BLOOM: a LayerNorm on the embeddings, no positions (ALiBi)
            x = self.embed_norm(x)
        return x

    def _layer(self, i: int, x: torch.Tensor, p0: int, mask: torch.Tensor, rope) -> torch.Tensor:
        """One decoder layer over the T new positions [p0, p0+T) of x [B, T, H]; writes their K/V to the cache.
        Kept to few ops (each costs ~5-50 us on a CPU, as much as a small matmul): one fused projection, RoPE on
        q and k together, views instead of copies (for T = 1 every reshape below is free)."""
        L = self.layers[i]
        B, T, H = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        pre = L["pre_norm"]
        h = L["ln1"](x) if pre else x
        y = L["qkv"](h.reshape(B * T, H)).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # [B, heads, T, hd]
        if self.kind == "opt":
            q, k, scale = y[:, :nh] * L["scaling"], y[:, nh:nh + nkv], 1.0  # OPT scales q before the product
        elif self.kind in ROPE_KINDS:
            cos, sin = rope
            qk, rd = y[:, :nh + nkv], self.rotary_ndims
            if rd == hd:
                qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
            else:  # partial rotary (GPT-NeoX): the first rd dims of each head turn, the rest pass through
                r = qk[..., :rd]
                qk = torch.cat([r * cos + r.roll(rd // 2, dims=-1) * sin, qk[..., rd:]], dim=-1)
            q, k, scale = qk[:, :nh], qk[:, nh:], L["scaling"]
        else:
            q, k, scale = y[:, :nh], y[:, nh:nh + nkv], L["scaling"]
        kc, vc = self.cache[i]
        kc[:, :, p0:p0 + T] = k
        vc[:, :, p0:p0 + T] = y[:, nh + nkv:]
        S = p0 + T
        if self.alibi is not None:
            a = self._alibi_attention(q, kc[:, :, :S], vc[:, :, :S], mask, scale)
        else:
            a = F.scaled_dot_product_attention(q, kc[:, :, :S], vc[:, :, :S], attn_mask=mask, scale=scale,
                                               enable_gqa=nkv != nh)
        attn = L["o"](a.transpose(1, 2).reshape(B * T, nh * hd)).view(B, T, H)
        # GPT-NeoX's parallel residual: attention and MLP both read the layer's input; BLOOM's
        # apply_residual_connection_post_layernorm: each residual is the sublayer's normed input
        normed = L.get("normed_residual", False)
        x_in, x = x, (h if normed else x) + attn
        if not pre:
            x = L["ln1"](x)
        h = (L["ln2"](x_in if L["parallel"] else x) if pre else x).reshape(B * T, H)
        if self.kind in LLAMA_LIKE:
            g, u = L["up"](h).chunk(2, dim=-1)
            m = self.act(g) * u
        else:
            m = self.act(L["up"](h))
        x = (h.view(B, T, H) if normed else x) + L["down"](m).view(B, T, H)
        if not pre:
            x = L["ln2"](x)
        return x

    def _alibi_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """BLOOM's own attention, op by op, for half precision (where SDPA's fp32 scores would give other tokens
        than the model's bf16/fp16 ones): ALiBi + scale * q k^T in the model's dtype, + mask, softmax in fp32 cast
        back, times v. q [B, heads, T, hd], k/v [B, heads, S, hd] -> [B, heads, T, hd]."""
        B, nh, T, hd = q.shape
        S = k.shape[2]
        scores = torch.baddbmm(self.alibi[..., :S].reshape(B * nh, 1, S), q.reshape(B * nh, T, hd),
                               k.reshape(B * nh, S, hd).transpose(1, 2), alpha=scale)
        probs = F.softmax(scores.view(B, nh, T, S) + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (fp32) of the last position of x [B, T, H]."""
        h = x[:, -1]
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = F.linear(h, *_parts(self.project_out))
        return self.head(h).float()

    def _forward(self, ids: torch.Tensor, p0: int, pos: torch.Tensor, mask: torch.Tensor, rope) -> torch.Tensor:
        x = self._embed(ids, pos)
        for i in range(len(self.layers)):
            x = self._layer(i, x, p0, mask, rope)
        return self._logits(x)

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_token_id: int, eos_token_id, min_new_tokens: int = 0, do_sample: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """Like ``model.generate(input_ids, attention_mask, ...)`` for left-padded prompts: returns
        [B, P + n] with n <= max_new_tokens (shorter when every row has finished)."""
        B, P = input_ids.shape
        dev = input_ids.device
        min_new_tokens = min_new_tokens or 0
        S_max = P + max_new_tokens
        eos_ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else \
            ([] if eos_token_id is None else [eos_token_id])  # no EOS: every row runs to max_new_tokens
        eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
        self.cache = [(torch.empty(B, self.n_kv, S_max, self.head_dim, dtype=self.dtype, device=dev),
                       torch.empty(B, self.n_kv, S_max, self.head_dim, dtype=self.dtype, device=dev))
                      for _ in self.layers]
        keys = torch.cat([attention_mask.bool(), torch.ones(B, max_new_tokens, dtype=torch.bool, device=dev)], 1)
        # positions count real tokens (left padding); pads get a harmless 1, as in generate()
        pos = (keys.long().cumsum(1) - 1).masked_fill(~keys, 1)
        if self.native is not None:
            self.native.bind(self.cache, S_max)
        rope = None
        if self.kind in ROPE_KINDS:
            cos, sin = self.stack.rotary_emb(self.embed[:1].unsqueeze(0), pos)
            rd = cos.shape[-1]  # the rotated dims of each head (all of them but for GPT-NeoX's partial rotary)
            half = rd // 2
            sign = torch.cat([-torch.ones(half, device=dev), torch.ones(rd - half, device=dev)])
            rope = (cos.unsqueeze(1).to(self.dtype), (sin * sign).unsqueeze(1).to(self.dtype))  # [B, 1, S_max, hd]
        # prefill: causal over real keys; every query also sees itself so fully padded rows stay finite
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(P, dtype=torch.bool, device=dev)
        mask = self._additive((causal & keys[:, None, None, :P]) | eye)
        keys = self._additive(keys[:, None, None, :])  # additive masks: SDPA's fastest form on CPU
        self.alibi = None
        if self.alibi_slopes is not None:
            alibi = alibi_bias(self.alibi_slopes, pos, self.dtype)  # [B, heads, 1, S_max]
            if self.dtype == torch.float32:  # the position bias joins the masks (one add per rollout) for SDPA
                mask, keys = mask + alibi[..., :P], keys + alibi
            else:  # half precision: the model's own attention ops (_alibi_attention)
                self.alibi = alibi
        logits = self._forward(input_ids, 0, pos[:, :P], mask,
                               None if rope is None else (rope[0][:, :, :P], rope[1][:, :, :P]))
        out = torch.full((B, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=dev)
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        n = 0
        for t in range(max_new_tokens):
            nxt = self._choose(logits, t, min_new_tokens, eos, do_sample, temperature, top_p, top_k)
            n = t + 1
            if t < min_new_tokens:  # EOS is banned: no row can finish yet, skip the bookkeeping
                out[:, t] = nxt
            else:
                nxt = nxt.masked_fill(~unfinished, pad_token_id)
                out[:, t] = nxt
                unfinished &= ~torch.isin(nxt, eos)
                if not bool(unfinished.any()):
                    break
            if n == max_new_tokens:
                break
            p = P + t
            if self.native is not None:  # rope: [B, 1, S_max, hd]; keys: [B, 1, 1, S_max]
                logits = self.native(nxt, p, rope[0], rope[1], keys)
                continue
            logits = self._forward(nxt[:, None], p, pos[:, p:p + 1], keys[..., :p + 1],
                                   None if rope is None else (rope[0][:, :, p:p + 1], rope[1][:, :, p:p + 1]))
        self.cache, self.alibi = [], None
        return torch.cat([input_ids, out[:, :n]], dim=1)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    @staticmethod
    def _choose(logits: torch.Tensor, t: int, min_new: int, eos: torch.Tensor, do_sample: bool,
                temperature: float, top_p: float, top_k: int) -> torch.Tensor:
        """argmax, or one draw by :func:`sample_categorical` from the processed distribution."""
        scores = process_scores(logits, t, min_new, eos, do_sample, temperature, top_p, top_k)
        return scores.argmax(-1) if not do_sample else sample_categorical(F.softmax(scores, dim=-1))


def alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """ALiBi's per-head slopes (fp32), as transformers' BLOOM computes them: for the largest power of two
    n <= n_heads, 2^(-8i/n) for i = 1..n; the remaining heads take the odd powers of the next power of two's
    base, 2^(-8i/2n) for i = 1, 3, 5, ...; each a power of the base in fp32, rounded as transformers rounds it."""
    def powers(n: int, count: int, step: int) -> torch.Tensor:
        base = torch.full((), 2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32, device=device)
        return torch.pow(base, torch.arange(1, 1 + step * count, step, dtype=torch.int32, device=device))

    n = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(n, n, 1)
    if n != n_heads:
        slopes = torch.cat([slopes, powers(2 * n, min(n, n_heads - n), 2)])
    return slopes


def alibi_bias(slopes: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ALiBi bias [B, heads, 1, S] of keys at positions ``pos`` [B, S] (long: the attention mask's cumulative
    count minus one, as transformers counts them under left padding), as transformers' ``build_alibi_tensor``:
    slope x position in fp32, then cast to the model's dtype. It depends on the key only: softmax is invariant to a
    per-query shift, so this is the relative bias -slope x (query - key). Masked keys' values do not matter."""
    return (slopes[:, None] * pos[:, None, :]).to(dtype).unsqueeze(2)


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh-approximated GELU: in fp32 torch's one fused op (within 1 ulp of the model's formula); in
    half precision the model's own op-by-op formula, whose intermediate roundings decide generate()'s tokens."""
    if x.dtype == torch.float32:
        return F.gelu(x, approximate="tanh")
    from transformers.models.bloom.modeling_bloom import bloom_gelu_forward  # lazy: transformers

    return bloom_gelu_forward(x)


def process_scores(scores: torch.Tensor, t: int, min_new: int, eos: torch.Tensor, do_sample: bool,
                   temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """transformers' logits processors in generate()'s order: MinNewTokensLength (EOS banned before ``min_new``
    new tokens), then when sampling Temperature, TopK, TopP (keeping at least one token)."""
    if t < min_new:
        scores = scores.index_fill(-1, eos, float("-inf"))
    if not do_sample:
        return scores
    if temperature not in (None, 1.0):
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [B, V] (rows sum to ~1), P(i) = probs[i]: the first i whose cumulative
    probability exceeds u * total, u ~ U[0, 1). Zero-probability entries are never chosen: their CDF step is empty,
    and u * total is kept strictly below the total (a product that rounds onto it would pick past the last entry
    with mass), so some CDF value always exceeds it."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, device=probs.device, generator=generator) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)
