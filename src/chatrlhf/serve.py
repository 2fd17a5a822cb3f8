"""``chatrlhf serve --path DIR``: an OpenAI-compatible HTTP server for a trained actor (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream": true`` as server-sent
events ``data: {...}`` ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Any OpenAI client works:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")

Chat messages are rendered as the model was trained (the checkpoint's recorded format, or ``--template``):
DeepSpeed-Chat's multi-round prompt, with replies cut at the next ``Human:`` turn, or the tokenizer's chat template,
tokenized as training tokenized it (no automatic special tokens); EOS ends a reply. Robustness: every client mistake (malformed JSON, wrong field types, unknown model,
over-long prompt, too many tokens asked, empty messages, oversized or chunked-oversized body, non-JSON content
type, out-of-range numbers, bad key) is a 4xx with an OpenAI-style ``{"error": {"message", "type", "code", "param"}}``
body, never a 500, and the connection stays usable. Generation runs in worker threads behind a bounded admission
queue (``--max_concurrency`` running, ``--max_queue`` waiting, more -> 429), so the event loop keeps answering
(health checks, /v1/models, 429s) while the model works. Browser clients need ``--cors_origins`` (off by default).
"""


import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from chatrlhf.config import Check, parse_config
from chatrlhf.errors import UserError
from chatrlhf.template import TEMPLATE_CHOICES

logger = logging.getLogger("chatrlhf.serve")


@dataclass
class ServeConfig:
    path: str = field(default=None, metadata={"help": "Checkpoint dir of the trained actor (e.g. OUTPUT/step3_ppo/actor)."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Interface to bind. The default keeps the server local; use 0.0.0.0 (with --api_key) to expose it."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: str = field(default=None, metadata={
        "help": "If set, requests must send `Authorization: Bearer KEY` (401 otherwise)."})
    model_name: str = field(default=None, metadata={"help": "Model id reported and accepted (default: the dir name)."})
    max_concurrency: int = field(default=1, metadata={"help": "Generations running at once."})
    max_queue: int = field(default=16, metadata={"help": "Requests allowed to wait for a slot; beyond it -> 429."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    default_max_tokens: int = field(default=128, metadata={"help": "max_tokens when a request gives none."})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "Largest request body accepted (413 beyond)."})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on accelerators), fp32, bf16, fp16."})
    template: str = field(default="auto", metadata={
        "help": "How chat messages become text: auto (the format the checkpoint records it was trained with; with "
                "no record, the tokenizer's chat template when it has one, else DeepSpeed-Chat's "
                "' Human: ... Assistant:'), chat (the tokenizer's chat template) or dschat. /v1/completions "
                "continues the client's text as given.",
        "check": Check(choices=TEMPLATE_CHOICES)})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level: debug, info, warning, error."})
    cors_origins: str = field(default="", metadata={
        "help": "Comma-separated origins allowed to call the API from a browser (e.g. http://localhost:3000; * for "
                "any). Empty (default): no CORS headers, so browsers on other origins are refused."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the Python code in the model folder (a custom model family: config.json auto_map naming "
                "classes in its modeling_*.py). It runs with your permissions: only for folders you trust."})

    def origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in (self.cors_origins or "").split(",") if o.strip()]

    def validate(self) -> None:
        if not self.path:
            raise UserError("--path is required (a trained actor checkpoint dir)")
        from chatrlhf.models.registry import resolve_model_path  # smollm2 / x.gguf -> its converted folder

        self.path = resolve_model_path(self.path, "--path")
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise UserError("--max_concurrency must be >= 1 and --max_queue >= 0")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be in 1..65535, got {self.port}")
        if self.default_max_tokens < 1 or self.max_tokens_limit < self.default_max_tokens:
            raise UserError("need 1 <= --default_max_tokens <= --max_tokens_limit")
        if self.max_body_bytes < 1:
            raise UserError(f"--max_body_bytes must be >= 1, got {self.max_body_bytes}")
        for o in self.origins():
            # an origin is scheme://host[:port] with no path; a typo here would silently never match
            scheme, sep, rest = o.partition("://")
            if o != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest):
                raise UserError(f"--cors_origins: {o!r} is not an origin like http://localhost:3000 (or *)")


# ---------------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """A request the server refuses, with OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def _error_response(err: APIError, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# -------------------------------------------------------------------------------------------- request schemas
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.manual_seed accepts
GREEDY_BELOW = 1e-6  # temperatures this small overflow logits/temperature to inf; they mean greedy anyway


def _utf8_text(v: str) -> str:
    # JSON may escape lone surrogates ("\ud800"); they are not text and the tokenizer cannot encode them
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (contains an unpaired surrogate escape)") from None
    return v


def _schemas():
    """Pydantic request models (built lazily so importing this module stays light)."""
    from typing import Annotated

    from pydantic import AfterValidator, BaseModel, ConfigDict, Field

    Text = Annotated[str, AfterValidator(_utf8_text)]

    class _Base(BaseModel):
        # unknown OpenAI options (logit_bias, user, ...) are accepted; inf/NaN never pass as a number
        model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    class TextPart(_Base):
        type: Literal["text"]
        text: Text

    class Message(_Base):
        role: Literal["system", "user", "assistant", "developer"]
        content: Union[Text, list[TextPart], None] = None

    class StreamOptions(_Base):
        include_usage: bool = False

    class Sampling(_Base):
        model: Optional[str] = None
        max_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        n: int = Field(default=1, ge=1)
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        stop: Union[Text, list[Text], None] = None
        seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)

    class ChatRequest(Sampling):
        messages: list[Message]
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    class CompletionRequest(Sampling):
        prompt: Union[Text, list[Text]]
        max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions

    return ChatRequest, CompletionRequest


def _validation_message(e) -> tuple[str, str | None]:
    """One line naming the field, from pydantic's errors. A union field (``content``: text or a list of parts)
    reports one error per branch, under branch labels like ``list[TextPart]``: the labels are dropped, and the
    branch that got furthest (deepest location, then a value error over a type mismatch) is the one reported."""
    def clean(loc) -> tuple:
        return tuple(x for x in loc if isinstance(x, int) or (x.isidentifier() and x not in _BRANCH_LABELS))

    errs = [(clean(x.get("loc", ())), x) for x in e.errors()]
    first = errs[0][0]
    same = [(loc, x) for loc, x in errs if loc[:len(first)] == first]
    depth = max(len(loc) for loc, _ in same)
    deepest = [(loc, x) for loc, x in same if len(loc) == depth]
    loc = deepest[0][0]
    picked = [x for at, x in deepest if at == loc]
    picked = [x for x in picked if not x["type"].endswith("_type")] or picked
    msgs = list(dict.fromkeys(str(x["msg"]).removeprefix("Value error, ") for x in picked))
    msg = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
    name = ".".join(str(x) for x in loc)
    return (f"invalid value for '{name}': {msg}" if name else msg), (name or None)


_BRANCH_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}  # pydantic's names for union branches


def _clip(s: str, n: int = 80) -> str:
    """A client-supplied string, shortened for an error message."""
    return s if len(s) <= n else s[:n] + "..."


# ------------------------------------------------------------------------------------------------- admission
class Admission:
    """At most ``concurrency`` generations run; at most ``queue`` more wait; anything beyond gets 429 at once."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency, self.limit = concurrency, concurrency + queue
        self.pending = 0  # running + waiting
        self._sem: asyncio.Semaphore | None = None

    def reserve(self) -> None:
        if self.pending >= self.limit:
            raise APIError(429, f"server busy: {self.pending} requests running or queued (limit {self.limit}); "
                                "retry later", type="rate_limit_error", code="queue_full")
        self.pending += 1

    async def acquire(self) -> None:
        if self._sem is None:  # created inside the running loop
            self._sem = asyncio.Semaphore(self.concurrency)
        await self._sem.acquire()

    def release(self, acquired: bool) -> None:
        if acquired and self._sem is not None:
            self._sem.release()
        self.pending -= 1


class _AnswerUnhandled:
    """ASGI middleware: an unhandled exception becomes a JSON 500 and the connection stays open. Starlette's
    ServerErrorMiddleware re-raises after answering, and uvicorn then drops the client's keep-alive connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("internal error on %s", scope.get("path"))
            if started:  # half a response is out: nothing valid can follow, so the connection has to end
                raise
            err = APIError(500, "internal server error", type="server_error", code="internal_error")
            await _error_response(err)(scope, receive, send)


# ------------------------------------------------------------------------------------------------------- app
def create_app(cfg: ServeConfig, model, tokenizer, fmt=None):
    """The FastAPI app serving ``model``/``tokenizer`` (already loaded, e.g. by ``load_for_inference``). ``fmt``:
    the ChatFormat chat messages are rendered with (default: ``--template`` resolved against the checkpoint's
    record, as ``format_for_checkpoint`` does)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect

    from chatrlhf.generation import (SamplingParams, StreamResult, checkpoint_format, context_length, generate,
                                     messages_to_prompt, prompt_token_ids, stream_generate)
    from chatrlhf.template import resolve_format

    ChatRequest, CompletionRequest = _schemas()
    try:
        from jinja2 import TemplateError
    except ImportError:  # no jinja2, no chat templates
        TemplateError = ValueError
    model_name = cfg.model_name or Path(cfg.path or "model").resolve().name
    if fmt is None:
        fmt = (checkpoint_format(cfg.path, tokenizer, cfg.template)[0] if cfg.path
               else resolve_format(cfg.template, tokenizer))
    ctx_len = context_length(model, tokenizer)
    admission = Admission(cfg.max_concurrency, cfg.max_queue)
    created = int(time.time())
    app = FastAPI(title="chatrlhf", version="1", docs_url=None, redoc_url=None)
    app.state.admission = admission
    app.state.model_name = model_name
    app.state.chat_format = fmt
    app.add_middleware(_AnswerUnhandled)
    if cfg.origins():  # added last = outermost, so error responses carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cfg.origins(), allow_methods=["GET", "POST"],
                           allow_headers=["*"], allow_credentials=False)

    # ---- errors: always OpenAI-shaped JSON
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        msg, param = _validation_message(exc)
        return _error_response(APIError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):  # last resort behind _AnswerUnhandled: still answer in JSON
        logger.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))

    # ---- helpers
    def check_auth(request: Request) -> None:
        if not cfg.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit. A declared Content-Length is checked up
        front; a chunked body declares nothing, so bytes are counted as they arrive and never more than the limit
        is held (uvicorn pauses the socket while this side is not reading)."""
        limit = cfg.max_body_bytes
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

    async def read_json(request: Request, schema):
        ctype = request.headers.get("content-type")
        media = (ctype or "").split(";")[0].strip().lower()
        # no Content-Type is taken as JSON (bare clients); anything else, form posts included, is refused
        if ctype is not None and media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got '{_clip(ctype)}'",
                           code="unsupported_media_type", param="Content-Type")
        raw = await read_body(request)
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
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise APIError(400, msg, param=param, code="invalid_value") from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model '{_clip(req.model)}' does not exist; this server serves "
                                f"'{model_name}'", code="model_not_found", param="model")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        return req

    def stops(req) -> tuple[str, ...]:
        s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(s) > 4:
            raise APIError(400, f"stop: at most 4 stop sequences are allowed, got {len(s)}", param="stop",
                           code="invalid_value")
        return tuple(x for x in s if x)

    def plan(prompt: str, req, requested: int | None, stop: tuple[str, ...], prompt_param: str,
             tokens_param: str = "max_tokens", prompt_fmt=None) -> tuple[SamplingParams, int]:
        n_prompt = len(prompt_token_ids(tokenizer, prompt, prompt_fmt))
        if n_prompt >= ctx_len:
            raise APIError(400, f"this model's maximum context length is {ctx_len} tokens; the prompt has "
                                f"{n_prompt}", param=prompt_param, code="context_length_exceeded")
        if requested is not None:
            if requested > cfg.max_tokens_limit:
                raise APIError(400, f"{tokens_param} is {_clip(str(requested), 24)}; this server allows at most "
                                    f"{cfg.max_tokens_limit}", param=tokens_param, code="invalid_value")
            if n_prompt + requested > ctx_len:
                raise APIError(400, f"this model's maximum context length is {ctx_len} tokens; you requested "
                                    f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} for the "
                                    f"completion: {tokens_param})", param=tokens_param,
                               code="context_length_exceeded")
            max_new = requested
        else:
            max_new = min(cfg.default_max_tokens, ctx_len - n_prompt)
        greedy = req.temperature < GREEDY_BELOW
        params = SamplingParams(max_new_tokens=max_new, method="greedy" if greedy else "sample",
                                temperature=req.temperature if not greedy else 1.0, top_p=req.top_p,
                                stop=stop, seed=req.seed)
        return params, n_prompt

    def usage(p: int, c: int) -> dict:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run_blocking(fn, *args, **kwargs):
        admission.reserve()
        acquired = False
        try:
            await admission.acquire()
            acquired = True
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        finally:
            admission.release(acquired)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def streaming(prompt: str, params: SamplingParams, strip: bool, chunk, include_usage: bool, prompt_fmt=None):
        """SSE response for a reply generated in a worker thread. ``chunk(text | None, finish_reason)`` builds
        one event; the admission slot is held until the stream ends or the client goes away. ``prompt_fmt``: the
        ChatFormat ``prompt`` was rendered with (None: raw text)."""
        admission.reserve()  # 429 before any bytes are sent
        cancel = threading.Event()
        result = StreamResult()
        it = stream_generate(model, tokenizer, prompt, params, cut=True, strip=strip, result=result, cancel=cancel,
                             fmt=prompt_fmt)
        done = object()
        started = False

        async def events():
            nonlocal started
            started = True
            acquired = False
            try:
                await admission.acquire()
                acquired = True
                first = chunk(None, None)
                if first is not None:
                    yield sse(first)
                while True:
                    piece = await anyio.to_thread.run_sync(next, it, done)
                    if piece is done:
                        break
                    yield sse(chunk(piece, None))
                yield sse(chunk("", result.finish_reason))
                if include_usage:
                    final = chunk("", None)
                    final["choices"] = []
                    final["usage"] = usage(result.prompt_tokens, result.completion_tokens)
                    yield sse(final)
                yield "data: [DONE]\n\n"
            except Exception as e:  # headers are already sent: report in-band, as OpenAI does
                logger.exception("generation failed while streaming")
                yield sse(APIError(500, f"generation failed: {e}", type="server_error").body())
            finally:
                cancel.set()  # stop generating if the client left mid-stream
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(it.close)
                admission.release(acquired)

        def release_if_never_started() -> None:
            # a client that leaves before the body starts never runs events(): its reserved place is freed here
            if not started:
                admission.release(False)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(release_if_never_started))

    # ---- routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pending": admission.pending}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "chatrlhf", "context_length": ctx_len}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str, request: Request):
        check_auth(request)
        if model_id != model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "chatrlhf"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = await read_json(request, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
        msgs = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            prompt = messages_to_prompt(msgs, tokenizer, fmt=fmt)
        except (ValueError, TemplateError) as e:  # our checks, or a chat template's raise_exception()
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params, n_prompt = plan(prompt, req, req.max_completion_tokens or req.max_tokens,
                                tuple(fmt.stop_markers) + stops(req), "messages", tokens_param, prompt_fmt=fmt)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            def chunk(text, finish):
                if text is None:  # the opening chunk announces the role
                    delta = {"role": "assistant", "content": ""}
                else:
                    delta = {"content": text} if text else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            return streaming(prompt, params, True, chunk,
                             bool(req.stream_options and req.stream_options.include_usage), prompt_fmt=fmt)
        g = await run_blocking(generate, model, tokenizer, prompt, params, fmt=fmt)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                         "finish_reason": g.finish_reason}],
            "usage": usage(g.prompt_tokens, g.completion_tokens)})

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = await read_json(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", param="prompt", code="unsupported_value")
        prompt = prompts[0]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        # A raw completion continues the text as is: no turn cutting, no stripping, only the client's stops.
        params, n_prompt = plan(prompt, req, req.max_tokens, stops(req), "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            def chunk(text, finish):
                if text is None:
                    return None
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            return streaming(prompt, params, False, chunk,
                             bool(req.stream_options and req.stream_options.include_usage))
        g = await run_blocking(generate, model, tokenizer, prompt, params, True, False)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}],
            "usage": usage(g.prompt_tokens, g.completion_tokens)})

    return app


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, prog="chatrlhf serve", description=__doc__.split("\n")[0])
    import uvicorn

    from chatrlhf.generation import format_for_checkpoint, load_for_inference

    model, tok = load_for_inference(cfg.path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    fmt = format_for_checkpoint(cfg.path, tok, cfg.template)  # prints "template: NAME (why)"
    app = create_app(cfg, model, tok, fmt)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logger.warning("serving on %s without --api_key: anyone who can reach this port can use the model", cfg.host)
    print(f"chatrlhf serve: model '{app.state.model_name}' at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
