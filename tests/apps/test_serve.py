"""The OpenAI-compatible server, on loopback, driven by the official openai client and by raw httpx."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from apps_helpers import free_port

KEY = "test-key-123"


@contextlib.contextmanager
def running_server(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive()


def make_app(model_dir, model, tok, **kw):
    from chatrlhf.apps.serve import ServeConfig, create_app

    cfg = ServeConfig(path=str(model_dir), model_name="tiny", **kw)
    cfg.validate()
    return create_app(cfg, model, tok)


@pytest.fixture(scope="module")
def server(apps_model_dir, apps_model):
    model, tok = apps_model
    with running_server(make_app(apps_model_dir, model, tok, api_key=KEY, max_tokens_limit=64, default_max_tokens=32)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_chat_completion_match_local_generation(client, apps_model):
    from chatrlhf.engine.generation import build_prompt, generate

    model, tok = apps_model
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       temperature=0, max_tokens=24)
    local = generate(model, tok, build_prompt([], "hello", tok), max_new_tokens=24)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == local.text
    assert "tiny model" in r.choices[0].message.content  # the fixture model memorised this reply
    assert r.usage.prompt_tokens == len(tok(build_prompt([], "hello", tok))["input_ids"])
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_multi_round_messages_become_deepspeed_chat_prompt(client, apps_model):
    from chatrlhf.engine.generation import build_prompt, generate

    model, tok = apps_model
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "tell me a story"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=20)
    prompt = build_prompt([("hello", "hi")], "tell me a story", tok)
    assert prompt == " Human: hello Assistant: hi Human: tell me a story Assistant:"
    assert r.choices[0].message.content == generate(model, tok, prompt, max_new_tokens=20).text
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])


def test_streaming_chat_concatenates_to_the_non_stream_answer(client):
    msgs = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2  # really streamed, token by token
    assert "".join(content) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_text_completion_and_raw_sse_format(client, server, apps_model):
    from chatrlhf.engine.generation import generate

    model, tok = apps_model
    prompt = " Human: hello Assistant:"
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=12)
    local = generate(model, tok, prompt, cut=True, strip=False, max_new_tokens=12, stop=())
    assert r.choices[0].text == local.raw_text == local.text
    assert r.choices[0].text.startswith(" hi")  # raw continuation: leading space kept, nothing stripped
    body = {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = "".join(resp.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads) == r.choices[0].text


@pytest.mark.parametrize("name,kwargs,status,code", [
    ("malformed json", {"content": b'{"model": "tiny", "messages": [', "path": "chat"}, 400, "invalid_json"),
    ("not an object", {"content": b'[1, 2]', "path": "chat"}, 400, "invalid_json"),
    ("wrong type", {"json": {"messages": "hello"}, "path": "chat"}, 400, "invalid_value"),
    ("wrong max_tokens type", {"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
                               "path": "chat"}, 400, "invalid_value"),
    ("empty messages", {"json": {"messages": []}, "path": "chat"}, 400, "invalid_value"),
    ("last turn not user", {"json": {"messages": [{"role": "assistant", "content": "x"}]}, "path": "chat"}, 400,
     "invalid_value"),
    ("unknown model", {"json": {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, "path": "chat"},
     404, "model_not_found"),
    ("prompt longer than context", {"json": {"messages": [{"role": "user", "content": "cat dog " * 200}]},
                                    "path": "chat"}, 400, "context_length_exceeded"),
    ("max_tokens over limit", {"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
                               "path": "chat"}, 400, "invalid_value"),
    ("prompt + max_tokens over context", {"json": {"prompt": "cat dog " * 40, "max_tokens": 60}, "path": "completions"},
     400, "context_length_exceeded"),
    ("empty prompt", {"json": {"prompt": ""}, "path": "completions"}, 400, "invalid_value"),
    ("oversized body", {"content": b'{"prompt": "' + b"a" * 1_100_000 + b'"}', "path": "completions"}, 413,
     "request_too_large"),
])
def test_bad_requests_get_openai_style_4xx(server, name, kwargs, status, code):
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[kwargs.pop("path")]
    r = httpx.post(server + path, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                   timeout=60, **kwargs)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_auth_required_when_key_set(server):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}):
        r = httpx.post(server + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    # unknown route: JSON 404 too
    r = httpx.get(server + "/v1/nope", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_full_queue_gets_429_and_loop_stays_responsive(apps_model_dir, apps_model, monkeypatch):
    """One slot, no queue: while a (deliberately blocked) generation runs, a second request gets 429 at once and
    /health still answers; after it finishes, requests are served again."""
    model, tok = apps_model
    gate, entered = threading.Event(), threading.Event()
    real_generate = model.generate

    def blocked_generate(*a, **kw):
        entered.set()
        assert gate.wait(30)
        return real_generate(*a, **kw)

    monkeypatch.setattr(model, "generate", blocked_generate)
    app = make_app(apps_model_dir, model, tok, max_concurrency=1, max_queue=0)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
    with running_server(app) as url:
        results = {}
        first = threading.Thread(target=lambda: results.update(
            first=httpx.post(url + "/v1/chat/completions", json=body, timeout=60)))
        first.start()
        assert entered.wait(30)
        busy = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["pending"] == 1
        gate.set()
        first.join(60)
        assert results["first"].status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
