"""``chatrlhf serve --path DIR``: an OpenAI-compatible HTTP server for a trained actor (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream": true`` as server-sent
events ``data: {...}`` ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Any OpenAI client works:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")

Chat messages are rendered as the model was trained (the checkpoint's recorded format, or ``--template``):
DeepSpeed-Chat's multi-round prompt, with replies cut at the next ``Human:`` turn, or the tokenizer's chat template,
tokenized as training tokenized it (no automatic special tokens); EOS ends a reply. Robustness: every client
mistake (malformed JSON, wrong field types, unknown model, over-long prompt, too many tokens asked, empty messages,
oversized or chunked-oversized body, non-JSON content type, out-of-range numbers, bad key) is a 4xx with an
OpenAI-style ``{"error": {"message", "type", "code", "param"}}`` body, never a 500, and the connection stays usable.
Generation runs in worker threads behind a bounded admission queue (``--max_concurrency`` running, ``--max_queue``
waiting, more -> 429), so the event loop keeps answering (health checks, /v1/models, 429s) while the model works.
Browser clients need ``--cors_origins`` (off by default).

Layout: ``config`` (the flags), ``state`` (``ServeState``: what every route reads, and the admission queue),
``schemas`` (request bodies), ``errors`` (OpenAI-shaped errors), ``routes`` (one plain function per endpoint,
``route(state, request)``), ``app`` (``create_app`` wires them into FastAPI).
"""

import logging

from chatrlhf.apps.serve.app import create_app
from chatrlhf.apps.serve.config import ServeConfig
from chatrlhf.apps.serve.errors import APIError
from chatrlhf.apps.serve.state import Admission, ServeState
from chatrlhf.config import parse_config
from chatrlhf.engine.generation import format_for_checkpoint, load_for_inference

__all__ = ["APIError", "Admission", "ServeConfig", "ServeState", "create_app", "main"]

logger = logging.getLogger("chatrlhf.apps.serve")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, prog="chatrlhf serve", description=__doc__.split("\n")[0])
    import uvicorn  # lazy: uvicorn stays out of `chatrlhf serve --help`

    model, tok = load_for_inference(cfg.path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    fmt = format_for_checkpoint(cfg.path, tok, cfg.template)  # prints "template: NAME (why)"
    app = create_app(cfg, model, tok, fmt)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logger.warning("serving on %s without --api_key: anyone who can reach this port can use the model", cfg.host)
    print(f"chatrlhf serve: model '{app.state.model_name}' at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0
