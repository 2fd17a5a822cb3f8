"""The serve routes called directly, as ``route(state, request)``: no server, no socket. What HTTP tests cannot
easily pin down: the admission place a stream holds from the moment it is answered until its body ends (or until
the response is dropped unstarted), and the 429 that comes before any byte of a second stream."""

from __future__ import annotations

import asyncio
import json

import pytest

from test_serve import KEY

AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 8}


def request(method: str, path: str, body: dict | None = None, headers: dict | None = None, **path_params):
    """A Starlette request as the server would see it, its body (JSON) sent in one piece."""
    from starlette.requests import Request

    raw = json.dumps(body).encode() if body is not None else b""
    headers = {"content-type": "application/json", **(headers or {})}
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "path_params": path_params,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


def make_state(model_dir, model, tok, **kw):
    from chatrlhf.apps.serve import ServeConfig, ServeState

    cfg = ServeConfig(path=str(model_dir), model_name="tiny", api_key=KEY, max_tokens_limit=64,
                      default_max_tokens=32, **kw)
    cfg.validate()
    return ServeState.build(cfg, model, tok)


@pytest.fixture(scope="module")
def state(apps_model_dir, apps_model):
    return make_state(apps_model_dir, *apps_model)


def test_model_routes_return_dicts_and_raise_api_errors(state):
    from chatrlhf.apps.serve import APIError
    from chatrlhf.apps.serve.routes import health, model_info, models

    listed = asyncio.run(models(state, request("GET", "/v1/models", headers=AUTH)))
    assert [m["id"] for m in listed["data"]] == ["tiny"] and listed["data"][0]["context_length"] == state.ctx_len
    one = asyncio.run(model_info(state, request("GET", "/v1/models/tiny", headers=AUTH, model_id="tiny")))
    assert one["id"] == "tiny"
    with pytest.raises(APIError) as e:
        asyncio.run(model_info(state, request("GET", "/v1/models/gpt-9", headers=AUTH, model_id="gpt-9")))
    assert (e.value.status, e.value.code) == (404, "model_not_found")
    with pytest.raises(APIError) as e:
        asyncio.run(models(state, request("GET", "/v1/models")))
    assert (e.value.status, e.value.code) == (401, "invalid_api_key")
    assert asyncio.run(health(state, request("GET", "/health")))["pending"] == 0  # no key needed


def test_chat_route_returns_the_local_reply_and_refuses_n_2(state, apps_model):
    from chatrlhf.apps.serve import APIError
    from chatrlhf.apps.serve.routes import chat_completions
    from chatrlhf.engine.generation import build_prompt, generate

    model, tok = apps_model
    r = asyncio.run(chat_completions(state, request("POST", "/v1/chat/completions", HELLO, AUTH)))
    assert r["choices"][0]["message"] == {"role": "assistant", "content": generate(
        model, tok, build_prompt([], "hello", tok), max_new_tokens=8).text}
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    with pytest.raises(APIError) as e:
        asyncio.run(chat_completions(state, request("POST", "/v1/chat/completions", {**HELLO, "n": 2}, AUTH)))
    assert (e.value.status, e.value.param, e.value.code) == (400, "n", "unsupported_value")
    assert state.admission.pending == 0


def test_a_stream_holds_its_place_until_its_body_ends_or_is_dropped(apps_model_dir, apps_model):
    """One slot, no queue: an answered (not yet read) stream holds the only place, so a second request is a 429
    before any byte; reading the first to its end frees it, and so does dropping one unread (the response's
    background task, which Starlette runs when the client left before the body)."""
    from chatrlhf.apps.serve import APIError
    from chatrlhf.apps.serve.routes import chat_completions, completions

    state = make_state(apps_model_dir, *apps_model, max_concurrency=1, max_queue=0)
    stream = {**HELLO, "stream": True}

    async def scenario():
        first = await chat_completions(state, request("POST", "/v1/chat/completions", stream, AUTH))
        assert state.admission.pending == 1
        with pytest.raises(APIError) as e:
            await completions(state, request("POST", "/v1/completions", {"prompt": "hi", "stream": True}, AUTH))
        assert (e.value.status, e.value.code) == (429, "queue_full")
        events = [part async for part in first.body_iterator]
        assert events[0].startswith("data: ") and '"role": "assistant"' in events[0]
        assert events[-1] == "data: [DONE]\n\n" and state.admission.pending == 0
        dropped = await chat_completions(state, request("POST", "/v1/chat/completions", stream, AUTH))
        assert state.admission.pending == 1
        await dropped.background()
        assert state.admission.pending == 0

    asyncio.run(scenario())
