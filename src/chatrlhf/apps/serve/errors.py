"""OpenAI-shaped errors: the ``APIError`` routes raise, the handlers that answer every failure as
``{"error": {"message", "type", "code", "param"}}`` JSON, and the middleware that keeps the connection open after a
500. FastAPI/Starlette are imported inside functions: importing this package must work without them."""

import logging

logger = logging.getLogger("chatrlhf.apps.serve")

_BRANCH_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}  # pydantic's names for union branches


class APIError(Exception):
    """A request the server refuses, with OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def error_response(err: APIError, headers: dict | None = None):
    from fastapi.responses import JSONResponse  # lazy: fastapi stays out of `chatrlhf serve --help`

    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def clip(s: str, n: int = 80) -> str:
    """A client-supplied string, shortened for an error message."""
    return s if len(s) <= n else s[:n] + "..."


def validation_message(e) -> tuple[str, str | None]:
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


# ---- exception handlers: whatever goes wrong, the client gets OpenAI-shaped JSON
async def on_api_error(request, exc: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc, headers)


async def on_validation_error(request, exc):
    msg, param = validation_message(exc)
    return error_response(APIError(400, msg, param=param))


async def on_http_error(request, exc):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, str(exc.detail), code=code))


async def on_unexpected(request, exc):  # last resort behind AnswerUnhandled: still answer in JSON
    logger.exception("internal error on %s", request.url.path)
    return error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))


def add_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError  # lazy: fastapi stays out of `chatrlhf serve --help`
    from starlette.exceptions import HTTPException  # lazy: starlette stays out of `chatrlhf serve --help`

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


class AnswerUnhandled:
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
            await error_response(err)(scope, receive, send)
