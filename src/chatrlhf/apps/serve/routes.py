"""The routes, as plain functions ``route(state, request)``: ``create_app`` registers them from ``ROUTES``. Each
reads the request, checks it (every client mistake an ``APIError``, so a 4xx), and returns a dict (JSON) or a
streamed reply. Generation runs in worker threads behind ``state.admission``, so the event loop keeps answering.
Starlette and anyio are imported inside functions: importing this package must work without them."""

import json
import logging
import secrets
import threading
import time
import uuid
from functools import partial

from chatrlhf.apps.serve.errors import APIError, clip
from chatrlhf.apps.serve.schemas import parse, request_models
from chatrlhf.apps.serve.state import ServeState
from chatrlhf.engine.generation import (SamplingParams, StreamResult, generate, messages_to_prompt, prompt_token_ids,
                                        stream_generate)

logger = logging.getLogger("chatrlhf.apps.serve")

GREEDY_BELOW = 1e-6  # temperatures this small overflow logits/temperature to inf; they mean greedy anyway
_DONE = object()  # the end of a stream, from next(it, _DONE) in a worker thread


# ---------------------------------------------------------------------------------------------- reading requests
def check_auth(state: ServeState, request) -> None:
    if not state.cfg.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not secrets.compare_digest(token.strip().encode(), state.cfg.api_key.encode()):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")


async def read_body(state: ServeState, request) -> bytes:
    """The body, refused with 413 as soon as it passes the limit. A declared Content-Length is checked up front; a
    chunked body declares nothing, so bytes are counted as they arrive and never more than the limit is held
    (uvicorn pauses the socket while this side is not reading)."""
    from starlette.requests import ClientDisconnect  # lazy: starlette stays out of `chatrlhf serve --help`

    limit = state.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    too_large = f"request body larger than {limit} bytes"
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, too_large, code="request_too_large")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            if len(buf) + len(chunk) > limit:
                raise APIError(413, too_large, code="request_too_large")
            buf += chunk
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body", code="client_disconnected") from None
    return bytes(buf)


def json_object(raw: bytes) -> dict:
    """A request body -> the JSON object it must hold (400 ``invalid_json`` otherwise, saying why)."""
    if not raw.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}",
                       code="invalid_json") from None
    try:
        data = json.loads(text)  # NaN/Infinity parse; the schemas refuse them, naming the field
    except RecursionError:  # the recursive parser hit Python's depth limit (~1000 levels)
        raise APIError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise APIError(400, "request body is not valid JSON: a number has too many digits",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data))
        raise APIError(400, f"request body must be a JSON object, not {kind or 'a number'}", code="invalid_json")
    return data


async def read_json(state: ServeState, request, schema: type):
    """The body as a ``schema`` request for this server's model, with n=1."""
    ctype = request.headers.get("content-type")
    media = (ctype or "").split(";")[0].strip().lower()
    # no Content-Type is taken as JSON (bare clients); anything else, form posts included, is refused
    if ctype is not None and media != "application/json" and not media.endswith("+json"):
        raise APIError(415, f"Content-Type must be application/json, got '{clip(ctype)}'",
                       code="unsupported_media_type", param="Content-Type")
    req = parse(schema, json_object(await read_body(state, request)))
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"the model '{clip(req.model)}' does not exist; this server serves "
                            f"'{state.model_name}'", code="model_not_found", param="model")
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    return req


# ------------------------------------------------------------------------------------------------------ planning
def stops(req) -> tuple[str, ...]:
    s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(s) > 4:
        raise APIError(400, f"stop: at most 4 stop sequences are allowed, got {len(s)}", param="stop",
                       code="invalid_value")
    return tuple(x for x in s if x)


def plan(state: ServeState, prompt: str, req, requested: int | None, stop: tuple[str, ...], prompt_param: str,
         tokens_param: str = "max_tokens", prompt_fmt=None) -> tuple[SamplingParams, int]:
    """How to decode ``prompt`` for ``req``, and its token count; a prompt or reply that does not fit the context
    (or ``--max_tokens_limit``) is a 400 naming ``prompt_param`` / ``tokens_param``."""
    ctx_len, limit = state.ctx_len, state.cfg.max_tokens_limit
    n_prompt = len(prompt_token_ids(state.tokenizer, prompt, prompt_fmt))
    if n_prompt >= ctx_len:
        raise APIError(400, f"this model's maximum context length is {ctx_len} tokens; the prompt has "
                            f"{n_prompt}", param=prompt_param, code="context_length_exceeded")
    if requested is not None:
        if requested > limit:
            raise APIError(400, f"{tokens_param} is {clip(str(requested), 24)}; this server allows at most "
                                f"{limit}", param=tokens_param, code="invalid_value")
        if n_prompt + requested > ctx_len:
            raise APIError(400, f"this model's maximum context length is {ctx_len} tokens; you requested "
                                f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} for the "
                                f"completion: {tokens_param})", param=tokens_param, code="context_length_exceeded")
        max_new = requested
    else:
        max_new = min(state.cfg.default_max_tokens, ctx_len - n_prompt)
    greedy = req.temperature < GREEDY_BELOW
    params = SamplingParams(max_new_tokens=max_new, method="greedy" if greedy else "sample",
                            temperature=req.temperature if not greedy else 1.0, top_p=req.top_p,
                            stop=stop, seed=req.seed)
    return params, n_prompt


def usage(p: int, c: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# ------------------------------------------------------------------------------------------------------- running
async def run_blocking(state: ServeState, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread, once admission gives it a slot (429 when the queue is full)."""
    import anyio  # lazy: anyio comes with the server stack (starlette), kept out of `chatrlhf serve --help`

    state.admission.reserve()
    acquired = False
    try:
        await state.admission.acquire()
        acquired = True
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
    finally:
        state.admission.release(acquired)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEStream:
    """One reply generated in a worker thread, as server-sent events. ``chunk(text | None, finish_reason)`` builds
    one event (``None`` text: the opening event, or no event when it returns None). Its admission place is
    reserved on creation, so a full queue is a 429 before any bytes are sent, and held until the stream ends or
    the client goes away. ``prompt_fmt``: the ChatFormat ``prompt`` was rendered with (None: raw text)."""

    def __init__(self, state: ServeState, prompt: str, params: SamplingParams, strip: bool, chunk,
                 include_usage: bool, prompt_fmt=None):
        self.admission = state.admission
        self.admission.reserve()
        self.cancel = threading.Event()
        self.result = StreamResult()
        self.pieces = stream_generate(state.model, state.tokenizer, prompt, params, cut=True, strip=strip,
                                      result=self.result, cancel=self.cancel, fmt=prompt_fmt)
        self.chunk, self.include_usage = chunk, include_usage
        self.started = False

    async def events(self):
        import anyio  # lazy: anyio comes with the server stack (starlette), kept out of `chatrlhf serve --help`

        self.started = True
        acquired = False
        try:
            await self.admission.acquire()
            acquired = True
            first = self.chunk(None, None)
            if first is not None:
                yield sse(first)
            while (piece := await anyio.to_thread.run_sync(next, self.pieces, _DONE)) is not _DONE:
                yield sse(self.chunk(piece, None))
            yield sse(self.chunk("", self.result.finish_reason))
            if self.include_usage:
                final = self.chunk("", None)
                final["choices"] = []
                final["usage"] = usage(self.result.prompt_tokens, self.result.completion_tokens)
                yield sse(final)
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are already sent: report in-band, as OpenAI does
            logger.exception("generation failed while streaming")
            yield sse(APIError(500, f"generation failed: {e}", type="server_error").body())
        finally:
            self.cancel.set()  # stop generating if the client left mid-stream
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.pieces.close)
            self.admission.release(acquired)

    def release_if_never_started(self) -> None:
        # a client that leaves before the body starts never runs events(): its reserved place is freed here
        if not self.started:
            self.admission.release(False)

    def response(self):
        from starlette.background import BackgroundTask  # lazy: starlette stays out of `chatrlhf serve --help`
        from starlette.responses import StreamingResponse  # lazy: starlette stays out of `chatrlhf serve --help`

        return StreamingResponse(self.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(self.release_if_never_started))


def chat_chunk(rid: str, created: int, model: str, text: str | None, finish: str | None) -> dict:
    if text is None:  # the opening chunk announces the role
        delta = {"role": "assistant", "content": ""}
    else:
        delta = {"content": text} if text else {}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(rid: str, created: int, model: str, text: str | None, finish: str | None) -> dict | None:
    if text is None:  # no opening event for text completions
        return None
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


# -------------------------------------------------------------------------------------------------------- routes
async def health(state: ServeState, request) -> dict:
    """GET /health: no key needed, so a load balancer can probe it."""
    return {"status": "ok", "model": state.model_name, "pending": state.admission.pending}


async def models(state: ServeState, request) -> dict:
    """GET /v1/models"""
    check_auth(state, request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "chatrlhf", "context_length": state.ctx_len}]}


async def model_info(state: ServeState, request) -> dict:
    """GET /v1/models/{model_id}"""
    check_auth(state, request)
    model_id = request.path_params["model_id"]
    if model_id != state.model_name:
        raise APIError(404, f"the model '{model_id}' does not exist", code="model_not_found")
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "chatrlhf"}


def chat_prompt(state: ServeState, req) -> str:
    """The request's messages rendered as the model was trained (``state.fmt``)."""
    if not req.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
    msgs = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        return messages_to_prompt(msgs, state.tokenizer, fmt=state.fmt)
    except (ValueError, state.template_error) as e:  # our checks, or a chat template's raise_exception()
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None


async def chat_completions(state: ServeState, request):
    """POST /v1/chat/completions: the reply is cut at the next turn (the format's stop markers) and stripped."""
    check_auth(state, request)
    req = await read_json(state, request, request_models().chat)
    prompt, fmt = chat_prompt(state, req), state.fmt
    tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params, _ = plan(state, prompt, req, req.max_completion_tokens or req.max_tokens,
                     tuple(fmt.stop_markers) + stops(req), "messages", tokens_param, prompt_fmt=fmt)
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        chunk = partial(chat_chunk, rid, now, state.model_name)
        return SSEStream(state, prompt, params, True, chunk, include_usage(req), prompt_fmt=fmt).response()
    g = await run_blocking(state, generate, state.model, state.tokenizer, prompt, params, fmt=fmt)
    return {"id": rid, "object": "chat.completion", "created": now, "model": state.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                         "finish_reason": g.finish_reason}],
            "usage": usage(g.prompt_tokens, g.completion_tokens)}


async def completions(state: ServeState, request):
    """POST /v1/completions: a raw completion continues the text as is (no turn cutting, no stripping, only the
    client's stops)."""
    check_auth(state, request)
    req = await read_json(state, request, request_models().completion)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if len(prompts) != 1:
        raise APIError(400, "send one prompt per request", param="prompt", code="unsupported_value")
    prompt = prompts[0]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    params, _ = plan(state, prompt, req, req.max_tokens, stops(req), "prompt")
    rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        chunk = partial(completion_chunk, rid, now, state.model_name)
        return SSEStream(state, prompt, params, False, chunk, include_usage(req)).response()
    g = await run_blocking(state, generate, state.model, state.tokenizer, prompt, params, True, False)
    return {"id": rid, "object": "text_completion", "created": now, "model": state.model_name,
            "choices": [{"index": 0, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}],
            "usage": usage(g.prompt_tokens, g.completion_tokens)}


# (method, path, route), in matching order
ROUTES = (
    ("GET", "/health", health),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{model_id}", model_info),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
)
