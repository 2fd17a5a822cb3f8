"""What every route reads: ``ServeState`` (model, tokenizer, chat format, limits, admission), built once per app."""

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatrlhf.apps.serve.config import ServeConfig
from chatrlhf.apps.serve.errors import APIError
from chatrlhf.data.template import ChatFormat, resolve_format
from chatrlhf.engine.generation import checkpoint_format, context_length


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


def _template_error() -> type[Exception]:
    """What a chat template's ``raise_exception()`` raises (a client error: 400)."""
    try:
        from jinja2 import TemplateError  # lazy: jinja2 (~50 ms) stays out of `chatrlhf serve --help`
    except ImportError:  # no jinja2, no chat templates
        return ValueError
    return TemplateError


@dataclass
class ServeState:
    """Shared by all requests. Routes run on the one event loop, so only ``admission``'s counters change, and
    only there; the model itself runs in worker threads, at most ``cfg.max_concurrency`` at once."""

    cfg: ServeConfig  # the limits: api_key, max_tokens_limit, default_max_tokens, max_body_bytes
    model: Any
    tokenizer: Any
    fmt: ChatFormat  # how chat messages become the prompt (as the model was trained)
    model_name: str  # the one model id served and accepted
    ctx_len: int  # prompt + reply tokens the model takes
    admission: Admission
    created: int  # reported by /v1/models
    template_error: type[Exception] = ValueError

    @classmethod
    def build(cls, cfg: ServeConfig, model, tokenizer, fmt: ChatFormat | None = None) -> "ServeState":
        """``fmt`` defaults to ``--template`` resolved against the checkpoint's record, as
        ``format_for_checkpoint`` does (without announcing it)."""
        if fmt is None:
            fmt = (checkpoint_format(cfg.path, tokenizer, cfg.template)[0] if cfg.path
                   else resolve_format(cfg.template, tokenizer))
        return cls(cfg=cfg, model=model, tokenizer=tokenizer, fmt=fmt,
                   model_name=cfg.model_name or Path(cfg.path or "model").resolve().name,
                   ctx_len=context_length(model, tokenizer), admission=Admission(cfg.max_concurrency, cfg.max_queue),
                   created=int(time.time()), template_error=_template_error())
