"""``create_app``: the FastAPI app around a ``ServeState``, its routes (``routes.ROUTES``), error handlers and
middleware. FastAPI/Starlette are imported inside functions: importing this package must work without them."""

import inspect
import re

from chatrlhf.apps.serve.config import ServeConfig
from chatrlhf.apps.serve.errors import AnswerUnhandled, add_error_handlers
from chatrlhf.apps.serve.routes import ROUTES
from chatrlhf.apps.serve.state import ServeState


def endpoint_for(route, path: str, state: ServeState):
    """``route(state, request)`` as the endpoint FastAPI calls. FastAPI reads what to pass from the endpoint's
    signature: ``request`` by its annotation (the class, so it is set here, where fastapi is imported) and the
    path's ``{names}`` as strings (declared so /openapi.json lists them; routes read ``request.path_params``)."""
    from fastapi import Request  # lazy: fastapi stays out of `chatrlhf serve --help`

    async def endpoint(request, **path_params):
        return await route(state, request)

    params = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str)
               for name in re.findall(r"{(\w+)}", path)]
    endpoint.__signature__ = inspect.Signature(params)
    endpoint.__name__ = endpoint.__qualname__ = route.__name__
    return endpoint


def create_app(cfg: ServeConfig, model, tokenizer, fmt=None):
    """The FastAPI app serving ``model``/``tokenizer`` (already loaded, e.g. by ``load_for_inference``). ``fmt``:
    the ChatFormat chat messages are rendered with (default: ``--template`` resolved against the checkpoint's
    record, as ``format_for_checkpoint`` does)."""
    from fastapi import FastAPI  # lazy: fastapi stays out of `chatrlhf serve --help`
    from starlette.middleware.cors import CORSMiddleware  # lazy: starlette stays out of `chatrlhf serve --help`

    state = ServeState.build(cfg, model, tokenizer, fmt)
    app = FastAPI(title="chatrlhf", version="1", docs_url=None, redoc_url=None)
    app.state.serve = state
    app.state.admission, app.state.model_name, app.state.chat_format = state.admission, state.model_name, state.fmt
    add_error_handlers(app)
    app.add_middleware(AnswerUnhandled)
    if cfg.origins():  # added last = outermost, so error responses carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cfg.origins(), allow_methods=["GET", "POST"],
                           allow_headers=["*"], allow_credentials=False)
    for method, path, route in ROUTES:
        app.add_api_route(path, endpoint_for(route, path, state), methods=[method])
    return app
