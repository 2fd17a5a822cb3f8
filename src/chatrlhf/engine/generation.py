"""Shared inference helpers for chat, serve and eval.

- ``load_for_inference(path)``: model + tokenizer from one local checkpoint dir (never the hub, never the config's
  ``_name_or_path``), on the accelerator torch/DeepSpeed reports (CPU otherwise), in eval mode, tokenizer left-padded.
- ``format_for_checkpoint(path, tokenizer, choice)``: the ``ChatFormat`` (chatrlhf.data.template) a checkpoint was trained
  with, from its ``chatrlhf_config.json`` record (``--template`` overrides it), so chat, serve and eval render
  conversations -- and tokenize them -- exactly as training did.
- ``build_prompt(history, user_msg, tokenizer, fmt=...)`` / ``messages_to_prompt``: a conversation rendered by that
  format (DeepSpeed-Chat's multi-round text, or the tokenizer's chat template).
- ``ReplyCutter`` / ``cut_reply``: cut a reply at the format's stop markers (``Human:`` for DeepSpeed-Chat text; EOS
  ends a reply in every format). Streaming and non-streaming use the same cutter, so a streamed answer concatenates
  to exactly the non-streamed one.
- ``generate`` / ``generate_batch`` / ``stream_generate``: greedy, sampling, beam and contrastive search (the last is
  implemented here because transformers 5 moved it to the Hub, which offline runs cannot reach).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from chatrlhf.data.template import DSCHAT, HUMAN_MARKER, TEMPLATE_CHOICES, ChatFormat, has_chat_template, resolve_format
from chatrlhf.errors import ModelError, UserError
from chatrlhf.models.loading import check_remote_code, load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)

# Chatting in the exact format the model was trained on matters for small models (DeepSpeed-Chat's chat used
# "\n Assistant: ", a mismatch with its own data): every prompt is rendered by the checkpoint's ChatFormat.
RUN_CONFIG = "chatrlhf_config.json"  # written next to every trained checkpoint; its "chat_format" is the record

# Roles accepted in a message list (OpenAI style).
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------------- devices/loading
def inference_device(device: str | None = None, dtype=None):
    """The device to run inference on: ``device`` if given, else the accelerator DeepSpeed's detection picks (the
    same choice as training: DS_ACCELERATOR when set, else XPU, NPU, ..., CUDA, else CPU). Never hard-codes
    "cuda". Prints the device/dtype line (``dtype`` as resolve_dtype will resolve it) once per process."""
    import torch  # lazy: torch

    from chatrlhf.engine.device import accelerator_info, announce_device, inference_dtype  # lazy: torch

    if device:
        dev = torch.device(device)
        info = {"name": dev.type, "count": 0, "how": "--device"}
    else:
        info = accelerator_info()
        dev = torch.device("cpu" if info["name"] == "cpu" else info["name"])
    td = inference_dtype(dtype, dev)
    shown = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(td, str(td))
    auto = dtype in (None, "", "auto")
    announce_device(shown, f"auto: {'fp32 on CPU' if dev.type == 'cpu' else shown + ' on ' + dev.type}" if auto
                    else "--dtype", info)
    return dev


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
    return load_tokenizer(str(path), padding_side="left", trust_remote_code=trust_remote_code)


def _load_model(path: Path, dtype, tokenizer, trust_remote_code: bool = False):
    # Passing the tokenizer makes the model's pad/eos ids agree with it (pad = eos confusion, problem 10).
    return load_causal_lm(str(path), dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)


def load_for_inference(path: str | os.PathLike, dtype=None, device: str | None = None,
                       trust_remote_code: bool = False):
    """Load (model, tokenizer) from a local checkpoint dir for generation. The tokenizer comes from the same dir.
    A custom family (its code in the folder) needs ``trust_remote_code``: refused in one line otherwise."""
    from chatrlhf.engine.device import inference_dtype  # lazy: torch

    ckpt = resolve_checkpoint_dir(path)
    check_remote_code(ckpt, trust_remote_code)  # first: the refusal names the model's class, not the tokenizer's
    dev = inference_device(device, dtype)
    torch_dtype = inference_dtype(dtype, dev)
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
def recorded_format(path: str | os.PathLike) -> dict | None:
    """The ``chat_format`` record (``{"name": "chat"|"dschat", "sha256": ...}``) of the checkpoint at ``path``, or
    None when there is none (a model this project did not train, or one trained before the record existed)."""
    try:
        f = resolve_checkpoint_dir(path) / RUN_CONFIG
    except ModelError:
        return None
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8")).get("chat_format")
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("%s: unreadable (%s); the chat format is chosen as for an unrecorded model", f, e)
        return None
    if not isinstance(rec, dict) or rec.get("name") not in ("chat", "dschat"):
        if rec is not None:
            logger.warning("%s: chat_format %r is not a record this version knows; ignored", f, rec)
        return None
    return rec


def checkpoint_format(path: str | os.PathLike, tokenizer, choice: str = "auto") -> tuple[ChatFormat, str]:
    """(format, why): how conversations are rendered for the checkpoint at ``path`` (see ``format_for_checkpoint``);
    ``why`` says where the choice came from (``from checkpoint record``, ``--template``, ``auto: ...``)."""
    choice = (choice or "auto").strip().lower()
    if choice not in TEMPLATE_CHOICES:
        raise UserError(f"--template {choice!r}: choose one of {', '.join(TEMPLATE_CHOICES)}")
    rec = recorded_format(path)
    trained = rec["name"] if rec else None
    if choice != "auto":
        try:
            fmt = resolve_format(choice, tokenizer)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        why = "--template"
        if trained and trained != fmt.name:
            logger.warning("--template %s overrides the checkpoint's record: %s was trained with the %s format",
                           fmt.name, path, trained)
    elif trained == "chat":
        if not has_chat_template(tokenizer):
            raise UserError(f"{path} was trained with its tokenizer's chat template, but the tokenizer there has "
                            "none now; restore it, or pass --template dschat to render DeepSpeed-Chat text anyway")
        fmt, why = resolve_format("chat", tokenizer), "from checkpoint record"
    elif trained == "dschat":
        fmt, why = DSCHAT, "from checkpoint record"
    else:
        fmt = resolve_format("auto", tokenizer)
        why = "auto: " + ("the tokenizer has a chat template" if fmt.name == "chat" else "no chat template")
    want = (rec or {}).get("sha256")
    have = fmt.record().get("sha256")
    if fmt.name == "chat" and trained == "chat" and want and want != have:
        logger.warning("%s was trained with a chat template of sha256 %s, but its tokenizer's template is %s now; "
                       "rendering with the current one", path, want, have)
    return fmt, why


def format_for_checkpoint(path: str | os.PathLike, tokenizer, choice: str = "auto", *, label: str | None = None,
                          announce: bool = True) -> ChatFormat:
    """The ChatFormat to render conversations for the checkpoint at ``path``.

    The checkpoint's ``chatrlhf_config.json`` records the format it was trained with (``chat_format``): ``auto``
    follows it (a model trained on DeepSpeed-Chat text renders that text even when its tokenizer has a chat template),
    and with no record picks as training's ``--template auto`` does (the chat template when the tokenizer has one).
    An explicit ``chat``/``dschat`` overrides the record, with a one-line warning when they differ; a recorded
    template hash that differs from the tokenizer's current template is warned about too. ``announce`` prints the
    ``template: NAME (why)`` line to stderr (beside the device/dtype line); ``label`` names the model in it."""
    fmt, why = checkpoint_format(path, tokenizer, choice)
    if announce and os.environ.get("RANK", "0") in ("0", ""):
        print(f"template{f' [{label}]' if label else ''}: {fmt.name} ({why})", file=sys.stderr, flush=True)
    return fmt


def history_to_messages(history: Sequence[tuple[str, str]], user_msg: str | None = None,
                        system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    if user_msg is not None:
        msgs.append({"role": "user", "content": user_msg})
    return msgs


def _fmt(fmt: ChatFormat | None, tokenizer) -> ChatFormat:
    """``fmt``, or (none given) what training's ``--template auto`` picks for ``tokenizer``."""
    return fmt if fmt is not None else resolve_format("auto", tokenizer)


def build_prompt(history: Sequence[tuple[str, str]], user_msg: str, tokenizer=None, system: str | None = None,
                 fmt: ChatFormat | None = None) -> str:
    """The prompt for the next reply, with the whole conversation as context, rendered by ``fmt``
    (``ChatFormat.conversation_prompt``; by default what ``--template auto`` picks for ``tokenizer``).

    ``dschat``: DeepSpeed-Chat's ``" Human: u1 Assistant: r1 Human: u2 Assistant:"`` (the training text); a system
    text goes first on its own line. ``chat``: the tokenizer's chat template with the generation prompt.
    """
    return _fmt(fmt, tokenizer).conversation_prompt(history_to_messages(history, user_msg, system), tokenizer)


def messages_to_prompt(messages: Sequence[dict], tokenizer=None, fmt: ChatFormat | None = None) -> str:
    """OpenAI-style messages -> prompt, rendered by ``fmt`` as ``build_prompt`` does. Raises ValueError (a client
    error) for an unusable list."""
    if not messages:
        raise ValueError("messages must be a non-empty list")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last non-system message must have role 'user'")
    return _fmt(fmt, tokenizer).conversation_prompt(list(messages), tokenizer)


def prompt_token_ids(tokenizer, prompt: str, fmt: ChatFormat | None = None) -> list[int]:
    """The ids generation continues from: ``prompt`` tokenized as training tokenized prompts of ``fmt`` (a chat
    template writes its own BOS and turn markers, so no automatic special tokens then). ``fmt=None``: raw text, with
    the tokenizer's own special tokens (DeepSpeed-Chat text, a raw completion)."""
    return list(tokenizer(prompt, add_special_tokens=_adds_special(fmt))["input_ids"])


def _adds_special(fmt: ChatFormat | None) -> bool:
    return True if fmt is None else fmt.add_special_tokens


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
    stop: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Strings that end a reply (None: the chat format's stop markers, ``Human:`` for DeepSpeed-Chat text; "
                "EOS always ends one)."})
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
    import torch  # lazy: torch
    from transformers import StoppingCriteria, StoppingCriteriaList  # lazy: transformers

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


def _encode(tokenizer, prompts: Sequence[str], device, fmt: ChatFormat | None = None):
    # Prompts carry their own turn markers. DeepSpeed-Chat text (and raw text, fmt None) gets the BOS the tokenizer
    # adds by default (OPT adds </s>), as in training; a chat template writes its own, so nothing is added then.
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=_adds_special(fmt))
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _with_stops(params: SamplingParams, fmt: ChatFormat | None) -> SamplingParams:
    """``params`` with ``stop`` resolved: unset means the format's stop markers (fmt None: DeepSpeed-Chat's)."""

    if params.stop is not None:
        return params
    return dataclasses.replace(params, stop=tuple((fmt or DSCHAT).stop_markers))


def generate_batch(model, tokenizer, prompts: Sequence[str], params: SamplingParams | None = None,
                   cut: bool = True, strip: bool = True, fmt: ChatFormat | None = None) -> list[Generation]:
    """Generate one reply per prompt in one left-padded batch. ``fmt``: the ChatFormat the prompts were rendered
    with (how they are tokenized, and the default stop markers); None: raw text with the tokenizer's own special
    tokens and DeepSpeed-Chat's ``Human:`` marker. ``cut``: cut each reply at the first of ``params.stop`` (and
    strip whitespace unless ``strip=False``); otherwise return the raw text. EOS ends every reply."""
    import torch  # lazy: torch

    params = _with_stops(params or SamplingParams(), fmt)
    params.validate()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    enc = _encode(tokenizer, prompts, device, fmt)
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
             strip: bool = True, fmt: ChatFormat | None = None, **overrides) -> Generation:
    """One reply. ``fmt`` as in ``generate_batch``; ``overrides`` are SamplingParams fields (``max_new_tokens=32,
    method="sample"``)."""
    params = _with(params, overrides)
    return generate_batch(model, tokenizer, [prompt], params, cut, strip, fmt)[0]


def _with(params: SamplingParams | None, overrides: dict) -> SamplingParams:
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
                    fmt: ChatFormat | None = None, **overrides) -> Iterator[str]:
    """Yield reply text pieces as tokens are generated (TextIteratorStreamer; generation runs in a thread).

    ``fmt`` as in ``generate_batch``. The pieces concatenate to ``generate(...).text`` for the same params (greedy:
    the same tokens). Closing the generator early (a client disconnect) stops generation at the next token."""
    import torch  # lazy: torch
    from transformers import TextIteratorStreamer  # lazy: transformers

    params = _with_stops(_with(params, overrides), fmt)
    params.validate()
    if params.method in ("beam", "contrastive"):  # no token-by-token view of these: generate, then yield once
        g = generate(model, tokenizer, prompt, params, cut, strip, fmt)
        if result is not None:
            result.prompt_tokens, result.completion_tokens, result.finish_reason, result.text = (
                g.prompt_tokens, g.completion_tokens, g.finish_reason, g.text)
        if g.text:
            yield g.text
        return
    if params.seed is not None:
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    enc = _encode(tokenizer, [prompt], device, fmt)
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
    import torch  # lazy: torch

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
