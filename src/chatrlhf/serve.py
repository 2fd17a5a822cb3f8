"""``chatrlhf serve --path DIR``: an OpenAI-compatible HTTP server for a trained actor (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream": true`` as server-sent
events ``data: {...}`` ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Any OpenAI client works:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")

Chat messages become DeepSpeed-Chat's multi-round prompt (or the tokenizer's chat template) and replies are cut at
the next ``Human:`` turn. Robustness: every client mistake (malformed JSON, wrong field types, unknown model,
over-long prompt, too many tokens asked, empty messages, oversized body, bad key) is a 4xx with an OpenAI-style
``{"error": {"message", "type", "code", "param"}}`` body, never a 500. Generation runs in worker threads behind a
bounded admission queue (``--max_concurrency`` running, ``--max_queue`` waiting, more -> 429), so the event loop
keeps answering (health checks, /v1/models, 429s) while the model works.
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

from chatrlhf.config import parse_config
from chatrlhf.errors import UserError

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
    log_level: str = field(default="info", metadata={"help": "uvicorn log level: debug, info, warning, error."})

    def validate(self) -> None:
        if not self.path:
            raise UserError("--path is required (a trained actor checkpoint dir)")
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise UserError("--max_concurrency must be >= 1 and --max_queue >= 0")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be in 1..65535, got {self.port}")
        if self.default_max_tokens < 1 or self.max_tokens_limit < self.default_max_tokens:
            raise UserError("need 1 <= --default_max_tokens <= --max_tokens_limit")


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
def _schemas():
    """Pydantic request models (built lazily so importing this module stays light)."""
    from pydantic import BaseModel, ConfigDict, Field

    class _Base(BaseModel):
        model_config = ConfigDict(extra="ignore")  # unknown OpenAI options (logit_bias, user, ...) are accepted

    class TextPart(_Base):
        type: Literal["text"]
        text: str

    class Message(_Base):
        role: Literal["system", "user", "assistant", "developer"]
        content: Union[str, list[TextPart], None] = None

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
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = None

    class ChatRequest(Sampling):
        messages: list[Message]
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    class CompletionRequest(Sampling):
        prompt: Union[str, list[str]]
        max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions

    return ChatRequest, CompletionRequest


def _validation_message(e) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return (f"invalid value for '{loc}': {err.get('msg')}" if loc else str(err.get("msg"))), (loc or None)


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


# ------------------------------------------------------------------------------------------------------- app
def create_app(cfg: ServeConfig, model, tokenizer):
    """The FastAPI app serving ``model``/``tokenizer`` (already loaded, e.g. by ``load_for_inference``)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from chatrlhf.generation import (HUMAN_MARKER, SamplingParams, StreamResult, context_length,
                                     generate, messages_to_prompt, stream_generate)

    ChatRequest, CompletionRequest = _schemas()
    model_name = cfg.model_name or Path(cfg.path or "model").resolve().name
    ctx_len = context_length(model, tokenizer)
    admission = Admission(cfg.max_concurrency, cfg.max_queue)
    created = int(time.time())
    app = FastAPI(title="chatrlhf", version="1", docs_url=None, redoc_url=None)
    app.state.admission = admission
    app.state.model_name = model_name

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
    async def _unexpected(request, exc):  # a bug, not a client error: log it, still answer in JSON
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

    async def read_json(request: Request, schema):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body larger than {cfg.max_body_bytes} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body larger than {cfg.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise APIError(400, msg, param=param, code="invalid_value") from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                           code="model_not_found", param="model")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        return req

    def stops(req) -> tuple[str, ...]:
        s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(s) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return tuple(x for x in s if x)

    def plan(prompt: str, req, requested: int | None, stop: tuple[str, ...]) -> tuple[SamplingParams, int]:
        n_prompt = len(tokenizer(prompt)["input_ids"])
        if n_prompt >= ctx_len:
            raise APIError(400, f"this model's maximum context length is {ctx_len} tokens; the prompt has "
                                f"{n_prompt}", param="messages", code="context_length_exceeded")
        if requested is not None:
            if requested > cfg.max_tokens_limit:
                raise APIError(400, f"max_tokens is {requested}; this server allows at most {cfg.max_tokens_limit}",
                               param="max_tokens", code="invalid_value")
            if n_prompt + requested > ctx_len:
                raise APIError(400, f"this model's maximum context length is {ctx_len} tokens; you requested "
                                    f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} for the "
                                    "completion)", param="max_tokens", code="context_length_exceeded")
            max_new = requested
        else:
            max_new = min(cfg.default_max_tokens, ctx_len - n_prompt)
        greedy = req.temperature == 0
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

    def streaming(prompt: str, params: SamplingParams, strip: bool, chunk, include_usage: bool):
        """SSE response for a reply generated in a worker thread. ``chunk(text | None, finish_reason)`` builds
        one event; the admission slot is held until the stream ends or the client goes away."""
        admission.reserve()  # 429 before any bytes are sent
        cancel = threading.Event()
        result = StreamResult()
        it = stream_generate(model, tokenizer, prompt, params, cut=True, strip=strip, result=result, cancel=cancel)
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
            prompt = messages_to_prompt(msgs, tokenizer)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        params, n_prompt = plan(prompt, req, req.max_completion_tokens or req.max_tokens, (HUMAN_MARKER,) + stops(req))
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
                             bool(req.stream_options and req.stream_options.include_usage))
        g = await run_blocking(generate, model, tokenizer, prompt, params)
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
        params, n_prompt = plan(prompt, req, req.max_tokens, stops(req))
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

    from chatrlhf.generation import load_for_inference

    model, tok = load_for_inference(cfg.path, dtype=cfg.dtype)
    app = create_app(cfg, model, tok)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logger.warning("serving on %s without --api_key: anyone who can reach this port can use the model", cfg.host)
    print(f"chatrlhf serve: model '{app.state.model_name}' at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
