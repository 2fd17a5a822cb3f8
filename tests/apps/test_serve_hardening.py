"""``chatrlhf serve`` against hostile input (issue 18, item 5): bodies over the limit however they are framed,
out-of-range numbers, deep nesting, wrong types and content types. Each gets a 4xx OpenAI-style JSON error that
names the field, and the same keep-alive connection then serves a normal request. Plus opt-in CORS.

The real app on a real uvicorn, 127.0.0.1 only, with the tiny session model; every loop here is bounded."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest

from test_serve import KEY, make_app, running_server

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_CT = {"Content-Type": "application/json"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
ALLOWED, OTHER = "http://allowed.example", "http://evil.example"


@pytest.fixture(scope="module")
def server(apps_model_dir, apps_model):
    model, tok = apps_model
    app = make_app(apps_model_dir, model, tok, api_key=KEY, max_tokens_limit=64, default_max_tokens=32)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def cors_server(apps_model_dir, apps_model):
    model, tok = apps_model
    app = make_app(apps_model_dir, model, tok, api_key=KEY, max_tokens_limit=64, default_max_tokens=32,
                   cors_origins=f"{ALLOWED}, https://app.example:8443/")
    with running_server(app) as url:
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn.request(method, path, body=body, headers={**AUTH, **(headers or {})})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def assert_ok_on_same_connection(conn: http.client.HTTPConnection) -> None:
    """A normal chat request on ``conn`` succeeds, over the socket it already had (not a reconnect)."""
    sock = conn.sock
    assert sock is not None, "the server closed the connection after the error"
    status, _, raw = exchange(conn, "POST", CHAT, json.dumps(OK_CHAT).encode(), JSON_CT)
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["role"] == "assistant"
    assert conn.sock is sock


def assert_openai_error(status: int, headers: dict, raw: bytes, expected_status: int, field: str) -> dict:
    assert status == expected_status, raw
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection", "").lower() != "close"
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert field.lower() in err["message"].lower(), err
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    return err


def bad_request_then_ok(url: str, path: str, body: bytes, headers: dict, status: int, field: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=60)
    try:
        err = assert_openai_error(*exchange(conn, "POST", path, body, headers), status, field)
        assert_ok_on_same_connection(conn)
        return err
    finally:
        conn.close()


def chat(**changes) -> bytes:
    """OK_CHAT with fields changed (a value of ... removes the field), as JSON bytes."""
    body = {**OK_CHAT, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def completion(**changes) -> bytes:
    body = {"model": "tiny", "prompt": " Human: hello Assistant:", "max_tokens": 2, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def raw_chat(fragment: str) -> bytes:
    """A chat body with ``fragment`` (raw JSON text, e.g. NaN) spliced in as an extra field."""
    return ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
            + fragment + "}").encode()


# ---------------------------------------------------------------------------------- the cases named in the issue
def test_seed_2_pow_80_is_a_400_naming_seed(server):
    err = bad_request_then_ok(server, CHAT, chat(seed=2**80, temperature=0.7), JSON_CT, 400, "seed")
    assert err["param"] == "seed" and err["code"] == "invalid_value"
    # the edges of the accepted range still generate
    for seed in (2**64 - 1, -(2**63)):
        r = httpx.post(server + CHAT, content=chat(seed=seed, temperature=0.7), headers={**AUTH, **JSON_CT},
                       timeout=60)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("shape", ["array", "object"])
def test_json_nested_10000_deep_is_a_400(server, shape):
    inner = "[" * 10000 + "]" * 10000 if shape == "array" else '{"a": ' * 10000 + "1" + "}" * 10000
    body = ('{"messages": ' + inner + "}").encode()
    err = bad_request_then_ok(server, CHAT, body, JSON_CT, 400, "request body")
    assert "nested too deeply" in err["message"] and err["code"] == "invalid_json"


def test_chunked_body_is_refused_once_past_the_limit_without_waiting_for_its_end(server):
    """1.5 MB of chunks and no terminating chunk: the 413 comes back anyway (the server stopped reading at 1 MB),
    and once the client ends that body, the same connection serves the next request."""
    piece = b"a" * 65536
    frame = b"%x\r\n%s\r\n" % (len(piece), piece)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as s:
        s.sendall(head + frame * 24)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        raw = resp.read()
        err = assert_openai_error(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw, 413, "body")
        assert err["code"] == "request_too_large"
        body = json.dumps(OK_CHAT).encode()
        s.sendall(b"0\r\n\r\n" + (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                  + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 200, resp.read()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_200mb_chunked_body_gets_413_without_the_server_growing(server):
    """The server runs in a thread of this process, so this process's resident memory is the server's; its peak
    is sampled while 200 MB stream in (reading the whole body before refusing it peaked 400 MB higher). Under a
    second on loopback: uvicorn reads and discards the rest of the body after the 413."""
    chunk, sent = b"x" * (1 << 20), [0]
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def body():
        for _ in range(200):
            sent[0] += len(chunk)
            yield chunk

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = httpx.post(server + CHAT, content=body(), headers={**AUTH, **JSON_CT}, timeout=120)
    finally:
        done.set()
        sampler.join(5)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert sent[0] == 200 << 20  # the whole body went out, and was not held
    assert peak[0] - before < 50, f"resident memory {before:.0f} -> peak {peak[0]:.0f} MB"
    assert httpx.post(server + CHAT, json=OK_CHAT, headers=AUTH, timeout=60).status_code == 200


# ------------------------------------------------------------------------------------------ many malformed bodies
BIG_INT = "9" * 5000  # Python's json refuses integers over 4300 digits
MALFORMED = [
    # (id, path, body, extra headers, status, text the message must contain)
    ("seed_minus_2_pow_80", CHAT, chat(seed=-(2**80)), JSON_CT, 400, "seed"),
    ("seed_string", CHAT, chat(seed="abc"), JSON_CT, 400, "seed"),
    ("max_tokens_10_pow_30", CHAT, chat(max_tokens=10**30), JSON_CT, 400, "max_tokens"),
    ("max_tokens_zero", CHAT, chat(max_tokens=0), JSON_CT, 400, "max_tokens"),
    ("max_tokens_negative", CHAT, chat(max_tokens=-5), JSON_CT, 400, "max_tokens"),
    ("max_tokens_fraction", CHAT, chat(max_tokens=2.5), JSON_CT, 400, "max_tokens"),
    ("max_completion_tokens_huge", CHAT, chat(max_completion_tokens=10**9), JSON_CT, 400, "max_completion_tokens"),
    ("temperature_negative", CHAT, chat(temperature=-0.5), JSON_CT, 400, "temperature"),
    ("temperature_nan", CHAT, raw_chat('"temperature": NaN'), JSON_CT, 400, "temperature"),
    ("temperature_infinity", CHAT, raw_chat('"temperature": Infinity'), JSON_CT, 400, "temperature"),
    ("temperature_1e999", CHAT, raw_chat('"temperature": 1e999'), JSON_CT, 400, "temperature"),
    ("temperature_above_2", CHAT, chat(temperature=2.5), JSON_CT, 400, "temperature"),
    ("temperature_string", CHAT, chat(temperature="hot"), JSON_CT, 400, "temperature"),
    ("top_p_zero", CHAT, chat(top_p=0), JSON_CT, 400, "top_p"),
    ("top_p_above_1", CHAT, chat(top_p=1.5), JSON_CT, 400, "top_p"),
    ("top_p_nan", CHAT, raw_chat('"top_p": NaN'), JSON_CT, 400, "top_p"),
    ("n_two", CHAT, chat(n=2), JSON_CT, 400, "n"),
    ("n_zero", CHAT, chat(n=0), JSON_CT, 400, "'n'"),
    ("n_2_pow_80", CHAT, chat(n=2**80), JSON_CT, 400, "n=1"),
    ("stop_five", CHAT, chat(stop=["a", "b", "c", "d", "e"]), JSON_CT, 400, "stop"),
    ("stop_ten_thousand", CHAT, chat(stop=["x"] * 10000), JSON_CT, 400, "stop"),
    ("stop_not_strings", CHAT, chat(stop=[1, 2]), JSON_CT, 400, "stop"),
    ("stop_lone_surrogate", CHAT, chat(stop="\ud800"), JSON_CT, 400, "stop"),
    ("stream_not_bool", CHAT, chat(stream="maybe"), JSON_CT, 400, "stream"),
    ("stream_options_not_object", CHAT, chat(stream=True, stream_options="yes"), JSON_CT, 400, "stream_options"),
    ("streamed_with_bad_temperature", CHAT, chat(stream=True, temperature=-1), JSON_CT, 400, "temperature"),
    ("non_utf8_body", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON_CT, 400, "UTF-8"),
    ("latin1_body", CHAT, '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"), JSON_CT,
     400, "UTF-8"),
    ("content_type_text_plain", CHAT, chat(), {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("content_type_form", CHAT, chat(), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "Content-Type"),
    ("empty_body", CHAT, b"", JSON_CT, 400, "request body is empty"),
    ("whitespace_body", CHAT, b"  \n ", JSON_CT, 400, "request body is empty"),
    ("truncated_json", CHAT, chat()[:-3], JSON_CT, 400, "request body is not valid JSON"),
    ("json_array", CHAT, b"[1, 2]", JSON_CT, 400, "request body must be a JSON object, not an array"),
    ("json_number", CHAT, b"42", JSON_CT, 400, "request body must be a JSON object, not a number"),
    ("json_string", CHAT, b'"hello"', JSON_CT, 400, "request body must be a JSON object, not a string"),
    ("json_null", CHAT, b"null", JSON_CT, 400, "request body must be a JSON object, not null"),
    ("integer_5000_digits", CHAT, raw_chat('"seed": ' + BIG_INT), JSON_CT, 400, "too many digits"),
    ("unknown_model", CHAT, chat(model="gpt-9"), JSON_CT, 404, "model"),
    ("model_id_a_megabyte_long", CHAT, chat(model="m" * 500_000), JSON_CT, 404, "model"),
    ("model_not_string", CHAT, chat(model=5), JSON_CT, 400, "model"),
    ("messages_missing", CHAT, chat(messages=...), JSON_CT, 400, "messages"),
    ("messages_object", CHAT, chat(messages={"role": "user", "content": "hi"}), JSON_CT, 400, "messages"),
    ("messages_strings", CHAT, chat(messages=["hi"]), JSON_CT, 400, "messages.0"),
    ("role_tool", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), JSON_CT, 400, "messages.0.role"),
    ("role_missing", CHAT, chat(messages=[{"content": "x"}]), JSON_CT, 400, "messages.0.role"),
    ("role_number", CHAT, chat(messages=[{"role": 1, "content": "x"}]), JSON_CT, 400, "messages.0.role"),
    ("content_number", CHAT, chat(messages=[{"role": "user", "content": 5}]), JSON_CT, 400, "messages.0.content"),
    ("content_image_part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                                               "image_url": "x"}]}]),
     JSON_CT, 400, "messages.0.content"),
    ("content_lone_surrogate", CHAT, chat(messages=[{"role": "user", "content": "a\ud800b"}]), JSON_CT, 400,
     "messages.0.content"),
    ("last_turn_assistant", CHAT, chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                     "content": "b"}]),
     JSON_CT, 400, "messages"),
    ("prompt_missing", COMPLETIONS, completion(prompt=...), JSON_CT, 400, "prompt"),
    ("prompt_token_ids", COMPLETIONS, completion(prompt=[1, 2, 3]), JSON_CT, 400, "prompt"),
    ("prompt_two", COMPLETIONS, completion(prompt=["a", "b"]), JSON_CT, 400, "prompt"),
    ("prompt_lone_surrogate", COMPLETIONS, completion(prompt="\udfff"), JSON_CT, 400, "prompt"),
    ("completion_max_tokens_huge", COMPLETIONS, completion(max_tokens=2**80), JSON_CT, 400, "max_tokens"),
]


@pytest.mark.parametrize("path,body,headers,status,field", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_request_gets_4xx_naming_the_field_and_the_connection_survives(server, path, body, headers,
                                                                                   status, field):
    err = bad_request_then_ok(server, path, body, headers, status, field)
    assert len(err["message"]) < 400  # one line, not an echo of the input


@pytest.mark.parametrize("changes", [{"temperature": 1e-300}, {"temperature": 1e-40, "stream": True},
                                     {"temperature": 2, "top_p": 1e-300}, {"stop": ["", "x"]},
                                     {"messages": [{"role": "user", "content": None}]}],
                         ids=["temperature_1e-300", "streamed_temperature_1e-40", "top_p_1e-300", "empty_stop",
                              "null_content"])
def test_extreme_but_valid_values_are_served(server, changes):
    """In range, so served: a near-zero temperature is greedy (logits / 1e-300 overflow to inf and used to 500)."""
    r = httpx.post(server + CHAT, content=chat(**changes), headers={**AUTH, **JSON_CT}, timeout=60)
    assert r.status_code == 200, r.text
    if changes.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text


def test_no_content_type_is_taken_as_json(server):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=60)
    try:
        status, _, raw = exchange(conn, "POST", CHAT, chat())
        assert status == 200, raw
    finally:
        conn.close()


def test_unexpected_error_is_a_json_500_and_the_connection_survives(server, apps_model, monkeypatch):
    """A bug (here: the model raising) is answered in JSON without its details, and the connection is kept;
    Starlette alone would answer and then re-raise, which makes uvicorn drop the connection."""
    model, _ = apps_model

    def broken(*a, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(model, "generate", broken)
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=60)
    try:
        status, headers, raw = exchange(conn, "POST", CHAT, chat(), JSON_CT)
        assert status == 500 and headers["content-type"].startswith("application/json")
        err = json.loads(raw)["error"]
        assert err["code"] == "internal_error" and "secret" not in err["message"]
        monkeypatch.undo()
        assert_ok_on_same_connection(conn)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------- CORS
def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + CHAT, timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_allowed_origin_gets_headers_on_preflight_and_requests(cors_server):
    for origin in (ALLOWED, "https://app.example:8443"):
        r = preflight(cors_server, origin)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(cors_server + CHAT, json=OK_CHAT, headers={**AUTH, "Origin": ALLOWED}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    # errors carry the header too, so the page can read why it was refused
    r = httpx.post(cors_server + CHAT, json=OK_CHAT, headers={"Origin": ALLOWED}, timeout=30)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED


def test_cors_disallowed_origin_gets_no_headers(cors_server):
    r = preflight(cors_server, OTHER)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(cors_server + CHAT, json=OK_CHAT, headers={**AUTH, "Origin": OTHER}, timeout=60)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_no_cors_headers_by_default(server):
    r = preflight(server, ALLOWED)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert not any(k.startswith("access-control-") for k in r.headers)
    r = httpx.post(server + CHAT, json=OK_CHAT, headers={**AUTH, "Origin": ALLOWED}, timeout=60)
    assert r.status_code == 200 and not any(k.startswith("access-control-") for k in r.headers)


def test_cors_origins_flag_is_parsed_and_checked():
    from chatrlhf.config import parse_config
    from chatrlhf.errors import UserError
    from chatrlhf.apps.serve import ServeConfig

    cfg = parse_config(ServeConfig, ["--path", "x", "--cors_origins", "http://a.example, https://b.example:8443/"])
    assert cfg.origins() == ["http://a.example", "https://b.example:8443"]
    assert parse_config(ServeConfig, ["--path", "x"]).origins() == []
    for bad in ("localhost:3000", "http://a.example/app", "ftp://a.example"):
        with pytest.raises(UserError, match="--cors_origins"):
            parse_config(ServeConfig, ["--path", "x", "--cors_origins", bad])
