"""Shared inference helpers for chat, serve and eval.

- ``load_for_inference(path)``: model + tokenizer from one local checkpoint dir (never the hub, never the config's
  ``_name_or_path``), on the accelerator torch/DeepSpeed reports (CPU otherwise), in eval mode, tokenizer left-padded.
- ``build_prompt(history, user_msg, tokenizer)``: DeepSpeed-Chat's multi-round text format, or the tokenizer's chat
  template when it has one.
- ``ReplyCutter`` / ``cut_reply``: cut a reply at the next ``Human:`` turn marker. Streaming and non-streaming use the
  same cutter, so a streamed answer concatenates to exactly the non-streamed one.
- ``generate`` / ``generate_batch`` / ``stream_generate``: greedy, sampling, beam and contrastive search (the last is
  implemented here because transformers 5 moved it to the Hub, which offline runs cannot reach).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from chatrlhf.errors import ModelError, UserError
from chatrlhf.template import HUMAN_MARKER, format_prompt

logger = logging.getLogger("chatrlhf.generation")

# The training template (chatrlhf.template): each round is " Human: x Assistant:" followed by " reply"; the whole
# conversation is the context. Chatting in the exact format the model was trained on matters for small models
# (DeepSpeed-Chat's chat used "\n Assistant: ", a mismatch with its own data).
ROUND_TEMPLATE = format_prompt("{user}")
ROUND_SEPARATOR = ""

# Roles accepted in a message list (OpenAI style).
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------------- devices/loading
def inference_device(device: str | None = None, dtype=None):
    """The device to run inference on: ``device`` if given, else the accelerator DeepSpeed's detection picks (the
    same choice as training: DS_ACCELERATOR when set, else XPU, NPU, ..., CUDA, else CPU). Never hard-codes
    "cuda". Prints the device/dtype line (``dtype`` as resolve_dtype will resolve it) once per process."""
    import torch

    from chatrlhf.utils import accelerator_info, announce_device

    if device:
        dev = torch.device(device)
        info = {"name": dev.type, "count": 0, "how": "--device"}
    else:
        info = accelerator_info()
        dev = torch.device("cpu" if info["name"] == "cpu" else info["name"])
    td = resolve_dtype(dtype, dev)
    shown = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(td, str(td))
    auto = dtype in (None, "", "auto")
    announce_device(shown, f"auto: {'fp32 on CPU' if dev.type == 'cpu' else shown + ' on ' + dev.type}" if auto
                    else "--dtype", info)
    return dev


def resolve_dtype(dtype, device):
    """``None``/"auto": fp32 on CPU (fp16 is ~100x slower there), bf16 on accelerators that support it."""
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if dtype not in names:
        raise UserError(f"--dtype must be one of auto, fp32, bf16, fp16; got {dtype!r}")
    return names[dtype]


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A Hugging Face model dir. A PPO output dir (``actor/`` inside) resolves to its actor."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model path does not exist: {p}")
    if (p / "config.json").is_file():
        return p
    if (p / "actor" / "config.json").is_file():
        logger.info("using the PPO actor in %s", p / "actor")
        return p / "actor"
    raise ModelError(f"{p} is not a model directory (no config.json); pass a checkpoint dir such as "
                     f"OUTPUT/step1_sft or OUTPUT/step3_ppo/actor")


def _load_tokenizer(path: Path, trust_remote_code: bool = False):
    from chatrlhf.models.loading import load_tokenizer

    return load_tokenizer(str(path), padding_side="left", trust_remote_code=trust_remote_code)


def _load_model(path: Path, dtype, tokenizer, trust_remote_code: bool = False):
    from chatrlhf.models.loading import load_causal_lm

    # Passing the tokenizer makes the model's pad/eos ids agree with it (pad = eos confusion, problem 10).
    return load_causal_lm(str(path), dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)


def load_for_inference(path: str | os.PathLike, dtype=None, device: str | None = None,
                       trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local checkpoint dir for generation. The tokenizer comes from the same dir.
    A custom family (its code in the folder) needs ``trust_remote_code``: refused in one line otherwise."""
    from chatrlhf.models.loading import check_remote_code

    ckpt = resolve_checkpoint_dir(path)
    check_remote_code(ckpt, trust_remote_code)  # first: the refusal names the model's class, not the tokenizer's
    dev = inference_device(device, dtype)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = _load_tokenizer(ckpt, trust_remote_code)
    tok.padding_side = "left"  # batched generation needs the prompts flush against the answer
    model = _load_model(ckpt, torch_dtype, tok, trust_remote_code)
    model.to(device=dev, dtype=torch_dtype)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def context_length(model, tokenizer=None) -> int:
    """Longest sequence (prompt + answer) the model can take."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10_000_000:  # tokenizers without a limit report ~1e30
        return v
    return 2048


# ------------------------------------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def history_to_messages(history: Sequence[tuple[str, str]], user_msg: str | None = None,
                        system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    if user_msg is not None:
        msgs.append({"role": "user", "content": user_msg})
    return msgs


def build_prompt(history: Sequence[tuple[str, str]], user_msg: str, tokenizer=None, system: str | None = None) -> str:
    """The prompt for the next reply, with the whole conversation as context.

    Without a chat template (every model this project trains): DeepSpeed-Chat's
    ``" Human: u1 Assistant: r1 Human: u2 Assistant:"`` (the training template); a system text goes first on its
    own line.
    With a chat template: ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
    """
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(history_to_messages(history, user_msg, system), tokenize=False,
                                             add_generation_prompt=True)
    parts = [f"{system}\n"] if system else []
    for u, a in history:
        parts.append(ROUND_TEMPLATE.format(user=u) + " " + a.strip() + ROUND_SEPARATOR)
    parts.append(ROUND_TEMPLATE.format(user=user_msg))
    return "".join(parts)


def messages_to_prompt(messages: Sequence[dict], tokenizer=None) -> str:
    """OpenAI-style messages -> prompt. Raises ValueError (a client error) for an unusable list."""
    if not messages:
        raise ValueError("messages must be a non-empty list")
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last non-system message must have role 'user'")
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    history: list[tuple[str, str]] = []
    pending_user: list[str] = []
    for m in turns[:-1]:
        if m["role"] == "user":
            pending_user.append(m["content"])
        else:  # consecutive messages of one role are joined, an assistant turn without a user turn gets an empty one
            history.append(("\n".join(pending_user), m["content"]))
            pending_user = []
    user = "\n".join(pending_user + [turns[-1]["content"]])
    return build_prompt(history, user, None, system="\n".join(system) or None)


# -------------------------------------------------------------------------------------------------- reply cutting
class ReplyCutter:
    """Incrementally cut generated text at the first stop marker (default ``Human:``) and strip surrounding
    whitespace. ``feed(piece)`` returns the text that is now safe to show; ``finish()`` returns the rest.

    Text that might be the start of a marker (``"Hum"``) or trailing whitespace is held back until the next piece
    decides it, so the concatenated output always equals ``cut_reply(whole_text)``."""

    def __init__(self, markers: Sequence[str] = (HUMAN_MARKER,), strip: bool = True):
        self.markers = [m for m in markers if m]
        self.strip = strip
        self._buf = ""
        self._started = not strip
        self.done = False  # a marker was seen: nothing more will be emitted

    def feed(self, piece: str) -> str:
        if self.done or not piece:
            return ""
        self._buf += piece
        if not self._started:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return ""
            self._started = True
        cut = min((i for i in (self._buf.find(m) for m in self.markers) if i >= 0), default=-1)
        if cut >= 0:
            out = self._buf[:cut]
            self.done = True
            self._buf = ""
            return out.rstrip() if self.strip else out
        hold = max((k for m in self.markers for k in range(1, len(m)) if self._buf.endswith(m[:k])), default=0)
        out, held = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold:]
        if self.strip:  # trailing whitespace may turn out to precede a marker, which would strip it
            stripped = out.rstrip()
            out, held = stripped, out[len(stripped):] + held
        self._buf = held
        return out

    def finish(self) -> str:
        if self.done:
            return ""
        out, self._buf = self._buf, ""
        self.done = True
        return out.rstrip() if self.strip else out


def cut_reply(text: str, markers: Sequence[str] = (HUMAN_MARKER,), strip: bool = True) -> str:
    """The reply up to (not including) the next turn marker, whitespace-stripped unless ``strip=False``."""
    c = ReplyCutter(markers, strip)
    return c.feed(text) + c.finish()


# ------------------------------------------------------------------------------------------------------ generation
@dataclass
class SamplingParams:
    """How to decode. ``method``: greedy | sample | beam | contrastive."""

    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate per reply."})
    method: str = field(default="greedy", metadata={"help": "greedy, sample, beam or contrastive."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (sample only)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (sample only)."})
    top_k: int = field(default=0, metadata={"help": "Top-k for sampling (0 = off) or contrastive search (default 4)."})
    num_beams: int = field(default=4, metadata={"help": "Beams for beam search."})
    penalty_alpha: float = field(default=0.6, metadata={"help": "Degeneration penalty for contrastive search."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "1.0 = off."})
    stop: tuple[str, ...] = field(default=(HUMAN_MARKER,), metadata={"help": "Strings that end a reply."})
    seed: int | None = field(default=None, metadata={"help": "Seed for sampling (None: not reseeded)."})

    def validate(self) -> None:
        if self.method not in ("greedy", "sample", "beam", "contrastive"):
            raise UserError(f"unknown decoding method {self.method!r}; use greedy, sample, beam or contrastive")
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be >= 1")
        if self.method == "sample" and self.temperature <= 0:
            raise UserError("temperature must be > 0 for sampling (use greedy for temperature 0)")

    def generate_kwargs(self) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.method == "sample":
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        elif self.method == "beam":
            kw.update(do_sample=False, num_beams=self.num_beams, early_stopping=True)
        else:
            kw.update(do_sample=False, num_beams=1)
        # Unset sampling knobs the checkpoint's generation_config may carry, so greedy stays greedy without warnings.
        if self.method != "sample":
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


def _stopping_criteria(tokenizer, prompt_len: int, stop: Sequence[str], cancel: threading.Event | None):
    """Stop a sequence once its generated text contains a stop string (the reply is cut there anyway), and stop
    everything when ``cancel`` is set (a streaming client went away)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop = [s for s in stop if s]
    tail = max((len(s) for s in stop), default=0) + 8  # tokens to decode: enough to see any stop string

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if cancel is not None and cancel.is_set():
                return done | True
            if not stop:
                return done
            gen = input_ids[:, prompt_len:]
            for i in range(gen.shape[0]):
                text = tokenizer.decode(gen[i, -tail:], skip_special_tokens=True)
                done[i] = any(s in text for s in stop)
            return done

    return StoppingCriteriaList([_Stop()])


@dataclass
class Generation:
    text: str  # the reply, cut at the first stop string
    raw_text: str  # everything generated (special tokens removed)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


def _encode(tokenizer, prompts: Sequence[str], device):
    # Prompts carry their own turn markers; BOS is whatever the tokenizer adds by default (OPT adds </s>).
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def generate_batch(model, tokenizer, prompts: Sequence[str], params: SamplingParams | None = None,
                   cut: bool = True, strip: bool = True) -> list[Generation]:
    """Generate one reply per prompt in one left-padded batch. ``cut``: cut each reply at the first of
    ``params.stop`` (and strip whitespace unless ``strip=False``); otherwise return the raw text."""
    import torch

    params = params or SamplingParams()
    params.validate()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    enc = _encode(tokenizer, prompts, device)
    plen = enc["input_ids"].shape[1]
    if params.method == "contrastive":  # unbatched: run each prompt without padding
        gen_rows = []
        for i in range(len(prompts)):
            ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].unsqueeze(0)
            gen_rows.append(contrastive_search(model, tokenizer, ids, params)[0, ids.shape[1]:].tolist())
    else:
        with torch.no_grad():
            out = model.generate(**enc, **params.generate_kwargs(), pad_token_id=tokenizer.pad_token_id,
                                 stopping_criteria=_stopping_criteria(tokenizer, plen, params.stop, None))
        gen_rows = out[:, plen:].tolist()
    results = []
    eos = _eos_ids(model, tokenizer)
    for i, ids in enumerate(gen_rows):
        # Trailing pads (after EOS in a batch) are not generated tokens.
        n = len(ids)
        hit_eos = False
        for j, t in enumerate(ids):
            if t in eos:
                n, hit_eos = j + 1, True
                break
        if not hit_eos:  # rows that stopped on a stop string early are padded to the batch's length
            while n > 0 and ids[n - 1] == tokenizer.pad_token_id:
                n -= 1
        raw = tokenizer.decode(ids[:n], skip_special_tokens=True)
        text = cut_reply(raw, params.stop, strip) if cut else raw
        stopped = hit_eos or any(s in raw for s in params.stop)
        results.append(Generation(text=text, raw_text=raw, prompt_tokens=int(enc["attention_mask"][i].sum()),
                                  completion_tokens=n, finish_reason="stop" if stopped or n < params.max_new_tokens else "length"))
    return results


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (gc_eos, tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def generate(model, tokenizer, prompt: str, params: SamplingParams | None = None, cut: bool = True,
             strip: bool = True, **overrides) -> Generation:
    """One reply. ``overrides`` are SamplingParams fields (``max_new_tokens=32, method="sample"``)."""
    params = _with(params, overrides)
    return generate_batch(model, tokenizer, [prompt], params, cut, strip)[0]


def _with(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    import dataclasses

    params = params or SamplingParams()
    return dataclasses.replace(params, **overrides) if overrides else params


class StreamResult:
    """Filled in by ``stream_generate`` once the stream is exhausted: token counts and finish reason."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    text: str = ""


def stream_generate(model, tokenizer, prompt: str, params: SamplingParams | None = None, cut: bool = True,
                    strip: bool = True, result: StreamResult | None = None, cancel: threading.Event | None = None,
                    **overrides) -> Iterator[str]:
    """Yield reply text pieces as tokens are generated (TextIteratorStreamer; generation runs in a thread).

    The pieces concatenate to ``generate(...).text`` for the same params (greedy: the same tokens). Closing the
    generator early (a client disconnect) stops generation at the next token."""
    import torch
    from transformers import TextIteratorStreamer

    params = _with(params, overrides)
    params.validate()
    if params.method in ("beam", "contrastive"):  # no token-by-token view of these: generate, then yield once
        g = generate(model, tokenizer, prompt, params, cut, strip)
        if result is not None:
            result.prompt_tokens, result.completion_tokens, result.finish_reason, result.text = (
                g.prompt_tokens, g.completion_tokens, g.finish_reason, g.text)
        if g.text:
            yield g.text
        return
    if params.seed is not None:
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    enc = _encode(tokenizer, [prompt], device)
    plen = enc["input_ids"].shape[1]
    cancel = cancel or threading.Event()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    box: dict = {}

    def work():
        try:
            with torch.no_grad():
                box["out"] = model.generate(**enc, **params.generate_kwargs(), pad_token_id=tokenizer.pad_token_id,
                                            streamer=streamer,
                                            stopping_criteria=_stopping_criteria(tokenizer, plen, params.stop, cancel))
        except BaseException as e:  # surfaced in the consumer thread below
            box["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, name="chatrlhf-generate", daemon=True)
    thread.start()
    cutter = ReplyCutter(params.stop, strip) if cut else None
    raw_parts: list[str] = []
    emitted: list[str] = []
    try:
        for piece in streamer:
            raw_parts.append(piece)
            out = cutter.feed(piece) if cutter else piece
            if out:
                emitted.append(out)
                yield out
        if "error" in box:
            raise box["error"]
        if cutter:
            out = cutter.finish()
            if out:
                emitted.append(out)
                yield out
    finally:
        cancel.set()  # no-op when generation already ended; stops it when the consumer left early
        thread.join()
    if result is not None and "out" in box:
        ids = box["out"][0, plen:].tolist()
        eos = _eos_ids(model, tokenizer)
        n = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
        raw = "".join(raw_parts)
        result.prompt_tokens, result.completion_tokens = plen, n
        stopped = n < len(ids) or (ids and ids[n - 1] in eos) or any(s in raw for s in params.stop)
        result.finish_reason = "stop" if stopped or n < params.max_new_tokens else "length"
        result.text = "".join(emitted)


# -------------------------------------------------------------------------------------------- contrastive search
def contrastive_search(model, tokenizer, input_ids, params: SamplingParams):
    """Contrastive search (Su et al. 2022): among the top-k next tokens pick the one maximising
    ``(1 - alpha) * p(token) - alpha * max cos-sim(its hidden state, previous hidden states)``.

    Unbatched and without a KV cache (each step re-runs the k candidate sequences): fine for evaluation prompts,
    and it works offline, unlike transformers 5's Hub-hosted implementation."""
    import torch

    k = params.top_k if params.top_k and params.top_k > 1 else 4
    alpha = params.penalty_alpha
    eos = _eos_ids(model, tokenizer)
    ids = input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        logits, ctx = out.logits[:, -1, :], out.hidden_states[-1]  # ctx: [1, T, H]
        for _ in range(params.max_new_tokens):
            probs = torch.softmax(logits.float(), dim=-1)
            top_p, top_i = probs.topk(k, dim=-1)  # [1, k]
            cand = torch.cat([ids.expand(k, -1), top_i.view(k, 1)], dim=1)
            o = model(input_ids=cand, output_hidden_states=True)
            h = o.hidden_states[-1]  # [k, T+1, H]
            last = torch.nn.functional.normalize(h[:, -1, :].float(), dim=-1)
            prev = torch.nn.functional.normalize(ctx[0].float(), dim=-1)
            penalty = (last @ prev.T).max(dim=-1).values  # [k]
            score = (1 - alpha) * top_p[0] - alpha * penalty
            best = int(score.argmax())
            ids = cand[best:best + 1]
            ctx, logits = h[best:best + 1], o.logits[best:best + 1, -1, :]
            if int(ids[0, -1]) in eos:
                break
            if params.stop and any(s in tokenizer.decode(ids[0, input_ids.shape[1]:], skip_special_tokens=True)
                                   for s in params.stop):
                break
    return ids
