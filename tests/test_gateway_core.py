"""The core over real sockets: the official openai client → gateway → mock upstream, and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time

import httpx
import openai
import pytest
from conftest import provider
from mock_upstream import DROP, MockResponse, RawUpstream, chat_chunks, chat_completion, raw_json_response, sse_body

import evo_gateway


def chat_handler(record: list | None = None):
    async def handler(req):
        if req.method == "GET":  # the /health probe
            return MockResponse(200, {"object": "list", "data": []})
        body = req.json()
        if record is not None:
            record.append((req.path, req.headers, body))
        if req.path.endswith("/embeddings"):
            return MockResponse(200, {"object": "list", "model": body["model"], "usage": {
                "prompt_tokens": 2, "total_tokens": 2}, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1.0]}]})
        if body.get("stream"):
            return MockResponse(200, sse_body(*chat_chunks(["Hel", "lo", "!"], model=body["model"])),
                                content_type="text/event-stream")
        return MockResponse(200, chat_completion("Hello!", model=body["model"]))
    return handler


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20, **kw)


def raw_request(port: int, data: bytes, timeout: float = 10, until_close: bool = False) -> bytes:
    """Send raw bytes; read until the server closes or one whole response with a Content-Length is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
                if not until_close and sep and length and b"connection: close" not in head.lower() \
                        and len(body) >= int(length[0].split(b":")[1]):
                    break
        except socket.timeout:
            pass
        return out


def recv_until(s: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def post_head(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


# -- answers through the official client ------------------------------------------------------


def test_openai_client_non_stream_through_prefix_and_default_provider(harness):
    seen: list = []
    up = harness.upstream(chat_handler(seen))
    url = harness.start([provider("mock", up.url + "/v1", extra_headers={"X-Extra": "yes"})])
    c = client(url)
    r = c.chat.completions.create(model="mock:gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello!"
    assert r.usage.total_tokens == 7
    r2 = c.chat.completions.create(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
    assert r2.model == "llama3:8b"  # colon-safe: no provider named llama3, so the whole string is the model
    assert [s[2]["model"] for s in seen] == ["gpt-test", "llama3:8b"]
    path, headers, _ = seen[0]
    assert path == "/v1/chat/completions"
    assert headers["x-extra"] == "yes"
    assert "authorization" not in headers  # the client's key is never forwarded; this provider has none
    assert headers["accept-encoding"] == "identity"


def test_openai_client_stream_accumulates_every_chunk(harness):
    up = harness.upstream(chat_handler())
    url = harness.start([provider("mock", up.url + "/v1")])
    c = client(url)
    pieces = []
    with c.chat.completions.stream(model="mock:gpt", messages=[{"role": "user", "content": "hi"}]) as s:
        for event in s:
            if event.type == "content.delta" and event.delta:
                pieces.append(event.delta)
        final = s.get_final_completion()
    assert pieces == ["Hel", "lo", "!"]
    assert final.choices[0].message.content == "Hello!"


def test_embeddings_float_and_base64(harness):
    up = harness.upstream(chat_handler())
    url = harness.start([provider("mock", up.url + "/v1")])
    c = client(url)
    r = c.embeddings.create(model="mock:emb", input="hello", encoding_format="float")
    assert r.data[0].embedding == [0.5, -0.25, 1.0]
    r = c.embeddings.create(model="mock:emb", input="hello")
    assert r.data[0].embedding == [0.5, -0.25, 1.0]


def test_models_lists_provider_model_ids(harness):
    up = harness.upstream(chat_handler())
    url = harness.start([provider("mock", up.url + "/v1", models=["a", "b:7b"]),
                         provider("off", up.url, enabled=False, models=["x"])])
    ids = [m.id for m in client(url).models.list()]
    assert ids == ["mock:a", "mock:b:7b"]


def test_one_model_is_retrieved_by_its_id_and_a_provider_name_lists_that_providers_models(harness):
    up = harness.upstream(chat_handler())
    url = harness.start([provider("mock", up.url + "/v1", models=["a", "b:7b", "org/x"]),
                         provider("off", up.url, enabled=False, models=["x"])])
    c = client(url)
    m = c.models.retrieve("mock:b:7b")
    assert (m.id, m.owned_by) == ("mock:b:7b", "mock")
    assert c.models.retrieve("mock:org/x").id == "mock:org/x"  # OpenRouter-style ids keep their slash
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("mock:nosuch")
    assert "GET /v1/models" in info.value.message
    assert httpx.get(url + "/v1/models/mock%3Aorg%2Fx").json()["id"] == "mock:org/x"
    listed = httpx.get(url + "/v1/models/mock").json()
    assert [d["id"] for d in listed["data"]] == ["mock:a", "mock:b:7b", "mock:org/x"]
    off = httpx.get(url + "/v1/models/off")
    assert off.status_code == 503 and '"enabled": true' in off.json()["error"]["message"]
    # Claude Code asks with `anthropic-version`: the Anthropic shapes, errors included
    anthropic = {"anthropic-version": "2023-06-01"}
    one = httpx.get(url + "/v1/models/mock:a", headers=anthropic).json()
    assert one == {"type": "model", "id": "mock:a", "display_name": "mock:a", "created_at": "2025-01-01T00:00:00Z"}
    missing = httpx.get(url + "/v1/models/nosuch", headers=anthropic)
    assert missing.status_code == 404 and missing.json()["type"] == "error"
    assert missing.json()["error"]["type"] == "not_found_error"
    assert httpx.head(url + "/v1/models/mock:a").status_code == 200
    assert httpx.post(url + "/v1/models/mock:a").status_code == 405


def test_models_of_a_provider_configured_without_models_come_from_its_upstream(harness, caplog):
    listed: list = []

    async def handler(req):
        if req.method == "GET" and req.path == "/v1/models":
            listed.append(req.headers.get("authorization"))
            return MockResponse(200, {"object": "list", "data": [{"id": "x-large", "object": "model"},
                                                                 {"id": "x-small", "object": "model"}, {"id": 7}]})
        return MockResponse(404, {"error": {"message": "no"}})
    up = harness.upstream(handler)
    configured = harness.upstream(chat_handler())
    down = socket.socket()
    down.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    try:
        url = harness.start([provider("up", up.url + "/v1", api_key_envs=["UP_KEY"]),
                             provider("conf", configured.url + "/v1", models=["a"]),
                             provider("gone", f"http://127.0.0.1:{down.getsockname()[1]}/v1")],
                            environ={"UP_KEY": "sk-up"})
        ids = [m.id for m in client(url).models.list()]
    finally:
        down.close()
    assert ids == ["up:x-large", "up:x-small", "conf:a"]  # the unreachable one lists nothing
    assert listed == ["Bearer sk-up"]
    assert configured.requests == []  # a provider with `models` is not asked
    assert any("provider 'gone'" in r.getMessage() and "model list could not be read" in r.getMessage()
               for r in caplog.records)


def test_bare_model_goes_to_provider_listing_it(harness):
    seen_a: list = []
    seen_b: list = []
    a = harness.upstream(chat_handler(seen_a))
    b = harness.upstream(chat_handler(seen_b))
    url = harness.start([provider("a", a.url), provider("b", b.url, models=["special"])])
    client(url).chat.completions.create(model="special", messages=[{"role": "user", "content": "x"}])
    client(url).chat.completions.create(model="nosuch:x", messages=[{"role": "user", "content": "x"}])
    assert [s[2]["model"] for s in seen_b] == ["special"]
    assert [s[2]["model"] for s in seen_a] == ["nosuch:x"]


def test_disabled_provider_prefix_is_503_naming_it(harness):
    up = harness.upstream(chat_handler())
    url = harness.start([provider("on", up.url), provider("off", up.url, enabled=False)])
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model="off:m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    assert "'off' is disabled" in e.value.body["message"]


def test_key_rotation_round_robin_and_cooldown(harness):
    seen: list = []

    async def handler(req):
        key = req.headers.get("authorization")
        seen.append(key)
        if key == "Bearer k1":
            return MockResponse(429, {"error": {"message": "slow down"}}, headers=[("retry-after", "3")])
        return MockResponse(200, chat_completion())
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url, api_key_envs=["K1", "K_EMPTY", "K2"])],
                        environ={"K1": "k1", "K2": "k2", "K_EMPTY": ""})
    c = client(url)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    for _ in range(3):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert seen == ["Bearer k1", "Bearer k2", "Bearer k2", "Bearer k2"]  # k1 cooling down after its 429


# -- streaming behaviour ----------------------------------------------------------------------


def test_stream_is_relayed_unbuffered(harness):
    gate = harness.gate()
    chunks = chat_chunks(["first", "second"])

    async def handler(req):
        async def body():
            for c in chunks[:2]:
                yield b"data: " + json.dumps(c).encode() + b"\n\n"
            await gate.wait()  # held until the test has seen "first" arrive at the client
            for c in chunks[2:]:
                yield b"data: " + json.dumps(c).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url)])
    stream = client(url).chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "x"}])
    got = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got.append(chunk.choices[0].delta.content)
            if got == ["first"]:
                gate.set()
    assert got == ["first", "second"]


def test_client_disconnect_mid_stream_closes_upstream(harness):
    gate = harness.gate()
    closed = threading.Event()

    async def handler(req):
        async def body():
            try:
                yield b"data: " + json.dumps(chat_chunks(["a"])[1]).encode() + b"\n\n"
                await gate.wait(60)  # never released: only the disconnect can end this
            finally:
                closed.set()
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    harness.start([provider("mock", up.url)])
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    s = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    s.sendall(post_head("/v1/chat/completions", body))
    assert b"data:" in recv_until(s, b"data:")
    t0 = time.monotonic()
    s.close()
    assert closed.wait(5), "the upstream stream was not cancelled after the client left"
    assert time.monotonic() - t0 < 5


def test_mid_stream_upstream_failure_ends_with_error_event(harness):
    async def handler(req):
        async def body():
            yield b"data: " + json.dumps(chat_chunks(["partial"])[1]).encode() + b"\n\n"
            raise ConnectionResetError("upstream died")
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url)])
    stream = client(url).chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "x"}])
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["partial"]
    assert "mock" in str(e.value.message)


def test_quiet_stream_gets_keepalive_comment(harness, monkeypatch):
    import evo_gateway
    monkeypatch.setattr(evo_gateway, "SSE_KEEPALIVE_S", 0.3)
    gate = harness.gate()

    async def handler(req):
        async def body():
            yield b"data: " + json.dumps(chat_chunks(["a"])[1]).encode() + b"\n\n"
            await gate.wait()
            yield b"data: [DONE]\n\n"
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    harness.start([provider("mock", up.url)])
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        s.sendall(post_head("/v1/chat/completions", body))
        seen = b""
        deadline = time.monotonic() + 10
        while b": keep-alive" not in seen and time.monotonic() < deadline:
            seen += s.recv(65536)
        gate.set()
    head = seen.split(b"\r\n\r\n", 1)[0].lower()
    assert b": keep-alive\n\n" in seen
    assert b"cache-control: no-cache" in head and b"x-accel-buffering: no" in head
    assert b"content-length" not in head


# -- upstream errors --------------------------------------------------------------------------


def test_upstream_429_and_400_pass_through_with_body_and_retry_after(harness):
    async def handler(req):
        if req.json()["model"] == "busy":
            return MockResponse(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                                headers=[("retry-after", "7")])
        if req.json()["model"] == "locked":
            return MockResponse(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                "code": "invalid_api_key"}})
        return MockResponse(400, {"error": {"message": "bad thing", "type": "invalid_request_error",
                                            "param": "messages", "code": None}})
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url)])
    with pytest.raises(openai.RateLimitError) as e:
        client(url).chat.completions.create(model="busy", messages=[{"role": "user", "content": "x"}])
    assert e.value.response.headers["retry-after"] == "7"
    assert e.value.body["message"] == "rate limited"
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.AuthenticationError) as e:
        client(url).chat.completions.create(model="locked", messages=[{"role": "user", "content": "x"}])
    # the upstream's key was refused, not the client's: no challenge to send the gateway one
    assert "www-authenticate" not in e.value.response.headers


def test_an_upstream_error_page_that_is_not_json_reaches_the_client_in_its_envelope(harness):
    async def handler(req):
        if req.json()["model"] == "labelled":
            return MockResponse(500, b"oops", content_type="application/json")
        if req.json()["model"] == "huge":
            return MockResponse(500, b"x" * (3 * 1024 * 1024), content_type="text/plain")
        return MockResponse(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html",
                            headers=[("retry-after", "5")])
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url)])
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            client(url).chat.completions.create(model="m", stream=stream,
                                                messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 502 and e.value.response.headers["retry-after"] == "5"
        assert e.value.response.headers["content-type"] == "application/json"
        assert e.value.body["message"].startswith("mock: <html>") and "502 Bad Gateway" in e.value.body["message"]
    for model, start in (("labelled", "mock: oops"), ("huge", "mock: xxx")):
        with pytest.raises(openai.InternalServerError) as e:
            client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert e.value.body["message"].startswith(start) and len(e.value.body["message"]) < 1000
    deadline = time.monotonic() + 5
    while up.connections_closed < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert up.connections_closed >= 1  # the huge body was not read to its end: its connection was closed


@pytest.fixture
def raw_upstreams():
    started: list[RawUpstream] = []
    yield lambda script: started.append(RawUpstream(script)) or started[-1]
    for up in started:
        up.close()


def test_bytes_beyond_an_upstream_answer_never_become_the_next_requests_answer(harness, raw_upstreams):
    """An upstream that writes more than its response (a second response, garbage, a body on a
    304) leaves bytes on the connection: it must be closed, not pooled."""
    answered = []

    def script(n, head):
        answered.append(n)
        if len(answered) == 1:
            return raw_json_response(chat_completion("first")) + raw_json_response(chat_completion("injected"))
        return raw_json_response(chat_completion(f"fresh {n}"))
    up = raw_upstreams(script)
    url = harness.start([provider("raw", up.url)])
    c = client(url)
    answers = [c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
               .choices[0].message.content for _ in range(3)]
    assert answers == ["first", "fresh 1", "fresh 2"]
    assert up.connections == 2  # the dirty connection was replaced, the clean one reused


def test_an_upstream_dripping_informational_heads_still_times_out_at_the_first_byte_limit(harness, raw_upstreams):
    up = raw_upstreams(lambda n, head: [(0.2, b"HTTP/1.1 102 Processing\r\n\r\n")] * 100)
    url = harness.start([provider("drip", up.url, first_byte_timeout_s=1)])
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 504 and "drip" in e.value.message
    assert time.monotonic() - t0 < 10  # not the 20 s the drip lasts


@pytest.mark.parametrize("status", ["304 Not Modified", "302 Found", "204 No Content", "999 Odd"])
def test_an_upstream_status_that_is_neither_success_nor_error_is_a_502_in_the_clients_envelope(
        harness, raw_upstreams, status):
    up = raw_upstreams(lambda n, head: f"HTTP/1.1 {status}\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"
                       .encode())
    url = harness.start([provider("odd", up.url)])
    for path, body in (("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
                       ("/api/chat", {"model": "m", "stream": False, "messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(url + path, json=body, timeout=10)
        assert r.status_code == 502, (path, r.status_code, r.text)
        assert f"HTTP {status.split()[0]}" in r.text and "odd" in r.text


def test_upstream_json_nested_past_the_parsers_depth_or_infinite_counts_is_never_a_500(harness):
    deep = b"[" * 100000 + b"]" * 100000

    async def handler(req):
        model = req.json()["model"]
        if model == "deep":
            return MockResponse(200, deep, content_type="application/json")
        if model == "deep-error":
            return MockResponse(400, b'{"error": ' + deep + b"}", content_type="application/json")
        if model == "deep-stream":
            return MockResponse(200, b"data: " + deep + b"\n\n", content_type="text/event-stream")
        return MockResponse(200, b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, '
                                 b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 1e999, "completion_tokens": 2}}',
                            content_type="application/json")
    up = harness.upstream(handler)
    url = harness.start([provider("up", up.url)])
    ask = [{"role": "user", "content": "x"}]
    r = httpx.post(url + "/api/chat", json={"model": "deep", "stream": False, "messages": ask}, timeout=20)
    assert r.status_code == 502 and "not a JSON object" in r.json()["error"]
    r = httpx.post(url + "/v1/messages", json={"model": "deep-error", "max_tokens": 5, "messages": ask}, timeout=20)
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = httpx.post(url + "/api/chat", json={"model": "deep-stream", "messages": ask}, timeout=20)
    assert r.status_code == 200 and "not JSON" in r.text.splitlines()[-1]  # the stream's in-band error line
    r = httpx.post(url + "/api/chat", json={"model": "inf", "stream": False, "messages": ask}, timeout=20)
    assert r.status_code == 200 and r.json()["message"]["content"] == "hi" and r.json()["prompt_eval_count"] == 0


def test_relayed_streams_cut_before_their_last_event_end_with_an_error_in_their_dialect(harness):
    chat_cut = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chat_chunks(["Hel", "lo"])[:3])
    ant_cut = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message",'
               b'"role":"assistant","content":[],"model":"c","usage":{"input_tokens":1,"output_tokens":1}}}\n\n')
    ollama_cut = b'{"model":"m","message":{"role":"assistant","content":"Hel"},"done":false}\n'

    async def handler(req):
        if req.path.endswith("/messages"):
            return MockResponse(200, sse_stream(ant_cut), content_type="text/event-stream")
        if req.path == "/api/chat":
            return MockResponse(200, sse_stream(ollama_cut), content_type="application/x-ndjson")
        if req.json()["model"] == "mid-event":
            return MockResponse(200, sse_stream(chat_cut + b'data: {"id":"x","cho'), content_type="text/event-stream")
        return MockResponse(200, sse_stream(chat_cut), content_type="text/event-stream")

    async def sse_stream(data):
        yield data  # then the body ends cleanly: a cut only the missing last event shows
    up = harness.upstream(handler)
    url = harness.start([provider("oa", up.url + "/v1"), provider("an", up.url + "/v1", provider_type="anthropic"),
                         provider("ol", up.url, provider_type="ollama")])
    ask = [{"role": "user", "content": "x"}]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "oa:m", "stream": True, "messages": ask}, timeout=10)
    assert r.text.startswith(chat_cut.decode()) and "before the answer was complete" in r.text
    assert r.text.endswith("data: [DONE]\n\n")
    r = httpx.post(url + "/v1/chat/completions", json={"model": "oa:mid-event", "stream": True, "messages": ask},
                   timeout=10)
    # the partial event is ended before the error event, which must not merge into it
    assert '"cho\n\ndata: {"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    r = httpx.post(url + "/v1/messages", json={"model": "an:c", "stream": True, "max_tokens": 5, "messages": ask},
                   timeout=10)
    assert r.text.startswith(ant_cut.decode()) and r.text.split("\n\n")[-2].startswith("event: error")
    r = httpx.post(url + "/api/chat", json={"model": "ol:m", "messages": ask}, timeout=10)
    assert r.text.startswith(ollama_cut.decode()) and "before the answer was complete" in r.text.splitlines()[-1]


def test_upstream_refused_is_502_naming_provider_and_host(harness):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    url = harness.start([provider("gone", f"http://127.0.0.1:{port}")])
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    assert "gone" in e.value.message and f"127.0.0.1:{port}" in e.value.message


def test_upstream_hang_is_504_after_first_byte_timeout(harness):
    gate = harness.gate()

    async def handler(req):
        await gate.wait(60)
        return MockResponse(200, chat_completion())
    up = harness.upstream(handler)
    url = harness.start([provider("slow", up.url, first_byte_timeout_s=0.5)])
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 504
    assert "timed out" in e.value.message
    assert time.monotonic() - t0 < 10
    gate.set()


# -- the upstream pool ------------------------------------------------------------------------


def test_pool_reuses_one_connection_and_replaces_a_closed_one(harness):
    up = harness.upstream(chat_handler())
    url = harness.start([provider("mock", up.url)])
    c = client(url)
    for _ in range(2):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert {r.conn_id for r in up.requests} == {1}
    harness.lt.call(_close_idle(up))
    time.sleep(0.2)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "Hello!"
    assert up.requests[-1].conn_id == 2


async def _close_idle(up):
    up.close_idle_connections()
    await asyncio.sleep(0.05)


def test_pool_retries_once_when_reused_connection_is_stale(harness):
    """The upstream drops a kept-alive connection as the next request arrives: retried on a fresh one."""
    handler = chat_handler()

    async def dropping(req):
        if req.conn_id == 1 and len(up.requests) == 2:
            return DROP
        return await handler(req)
    up = harness.upstream(dropping)
    url = harness.start([provider("mock", up.url)])
    c = client(url)
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "Hello!"
    assert [r.conn_id for r in up.requests] == [1, 1, 2]


def test_pool_does_not_retry_a_fresh_connection(harness):
    async def dropping(req):
        return DROP
    up = harness.upstream(dropping)
    url = harness.start([provider("mock", up.url)])
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    assert len(up.requests) == 1


# -- TLS --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_upstream_with_self_signed_ca_file(harness, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    up = harness.upstream(chat_handler(), ssl_context=ctx)
    url = harness.start([provider("tls", f"https://localhost:{up.port}/v1", ca_file=str(cert)),
                         provider("untrusted", f"https://localhost:{up.port}/v1")])
    r = client(url).chat.completions.create(model="tls:m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "Hello!"
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model="untrusted:m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502 and "TLS" in e.value.message


# -- bad input --------------------------------------------------------------------------------


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    return status, json.loads(body)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_bad_input_gets_4xx_in_openai_envelope_and_server_keeps_serving(harness):
    up = harness.upstream(chat_handler())
    harness.start([provider("mock", up.url)], server={"max_body_bytes": 1000, "max_head_bytes": 2048})
    port = harness.port
    chunked_head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    cases = [
        (post_head("/v1/chat/completions", b"{not json"), 400),
        (post_head("/v1/chat/completions", b"[1, 2]"), 400),
        (post_head("/v1/chat/completions", b'{"messages": []}'), 400),
        (post_head("/v1/chat/completions", b'{"model": "m"}'), 400),
        (post_head("/v1/chat/completions", b'{"model": "m", "messages": []}', "Content-Type: text/plain\r\n"), 415),
        (post_head("/v1/chat/completions", b"x" * 2000), 413),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024
         + b"\r\n0\r\n\r\n", 413),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n", 431),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (chunked_head + b"zz\r\nabc\r\n0\r\n\r\n", 400),  # a chunk size that is not hex
        (chunked_head + b"5\r\nabcdefgh\r\n0\r\n\r\n", 400),  # a chunk longer than it said
        # Python's json reads these; forwarded, they would reach the upstream as NaN/Infinity
        (post_head("/v1/chat/completions", b'{"model": "m", "messages": [], "temperature": NaN}'), 400),
        (post_head("/v1/chat/completions", b'{"model": "m", "messages": [], "top_p": 1e999}'), 400),
    ]
    raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # warm up lazy state
    before = _fd_count()
    for data, status in cases:
        got_status, body = _status_and_json(raw_request(port, data))
        assert got_status == status, (data[:60], got_status, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["message"]
    time.sleep(0.3)
    assert _fd_count() <= before
    r = client(harness.url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "Hello!"
    assert [r.method for r in up.requests].count("POST") == 1  # none of the bad ones reached the upstream


def test_slow_head_is_dropped_while_others_are_served(harness, caplog):
    up = harness.upstream(chat_handler())
    harness.start([provider("mock", up.url)], server={"head_timeout_s": 1})
    slow = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    slow.sendall(b"GET /health HTTP/1.1\r\nHo")
    t0 = time.monotonic()
    r = client(harness.url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "Hello!"
    slow.settimeout(10)
    answer = b""
    while chunk := slow.recv(4096):  # the server answers the dribbling client, then closes
        answer += chunk
    assert time.monotonic() - t0 < 5
    slow.close()
    status, body = _status_and_json(answer)
    assert status == 408 and "server.head_timeout_s" in body["error"]["message"]
    assert b"connection: close" in answer.lower()
    request_id = re.search(rb"x-request-id: (\S+)", answer).group(1).decode()
    (line,) = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert line.startswith("- - 408 ") and "head_timeout_s" in line  # logged like any request (SPEC §11)


def test_a_body_that_stops_arriving_gets_408_in_the_routes_dialect_and_never_reaches_the_upstream(harness):
    up = harness.upstream(chat_handler())
    harness.start([provider("mock", up.url)], server={"head_timeout_s": 1})
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
        t0 = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):  # answered, then closed: not held open
            answer += chunk
        assert time.monotonic() - t0 < 8
    status, body = _status_and_json(answer)
    assert status == 408 and "server.head_timeout_s" in body["error"]  # the Ollama envelope
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as idle:
        assert idle.recv(100) == b""  # a connection that never began a request is closed without a word
    assert [r.method for r in up.requests].count("POST") == 0


def test_a_refused_request_keeps_its_connection_when_its_body_can_be_read_past(harness):
    harness.start([])
    body = b'{"model": "m"}'
    post = (b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
    wrong_method = b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = raw_request(harness.port, post + wrong_method + last, until_close=True)
    assert [int(m) for m in re.findall(rb"HTTP/1.1 (\d{3})", raw)] == [404, 405, 200]  # all three answered
    absolute = raw_request(harness.port, b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert absolute.startswith(b"HTTP/1.1 200")  # RFC 9112 §3.2.2: the absolute form is accepted
    get = httpx.get(harness.url + "/health")
    head = httpx.head(harness.url + "/health")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] != "0"  # RFC 9110 §8.6


def test_a_client_that_pipelines_without_reading_is_not_answered_faster_than_it_reads(harness):
    """Answers wait for the client to read them: reading and answering more would buffer without end."""
    models = [f"model-with-a-long-name-{i:04d}" for i in range(400)]
    harness.start([provider("many", "http://127.0.0.1:9/v1", models=models)])
    count = 400  # 400 model lists of ~30 KiB: far more than the sockets' buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", harness.port))
    try:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" * (count - 1)
                     + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(1.0)
        answered = harness.gateway.metrics.requests.get(("/v1/models", "-", 200), 0)
        assert answered < count / 2, f"{answered} answers written for a client that read none"
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    finally:
        sock.close()
    assert received.count(b"HTTP/1.1 200 OK") == count  # nothing lost once the client reads


def test_pipelined_requests_answered_in_order_and_http10(harness):
    up = harness.upstream(chat_handler())
    harness.start([provider("mock", up.url)])
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = raw_request(harness.port, req + req + last, until_close=True)
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and raw.rindex(b"404 Not Found") > raw.rindex(b"200 OK")
    raw10 = raw_request(harness.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert raw10.startswith(b"HTTP/1.1 200") and json.loads(raw10.split(b"\r\n\r\n", 1)[1])["status"] == "ok"


def test_expect_100_continue(harness):
    up = harness.upstream(chat_handler())
    harness.start([provider("mock", up.url)])
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        s.sendall(post_head("/v1/chat/completions", b"", "Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", f"Content-Length: {len(body)}".encode()))
        assert recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        data = recv_until(s, b"Hello!")
    assert b"HTTP/1.1 200 OK" in data


def test_unknown_path_404_and_wrong_method_405_with_allow(harness):
    harness.start([])
    raw = raw_request(harness.port, b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 405") and b"\r\nallow: post\r\n" in raw.lower()
    raw = raw_request(harness.port, b"GET /api/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, body = _status_and_json(raw)
    assert status == 404 and isinstance(body["error"], str)  # the Ollama envelope under /api/
    for request in (b"GET /v1/messages/nope", b"GET /v1/messages"):  # SPEC §8: OpenAI's elsewhere
        raw = raw_request(harness.port, request + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, body = _status_and_json(raw)
        assert status in (404, 405) and set(body["error"]) == {"message", "type", "param", "code"}
    raw = raw_request(harness.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n"
                      b"Content-Type: application/json\r\nConnection: close\r\n\r\n"
                      b'{"model":"m","messages":[]}   ')
    status, body = _status_and_json(raw)
    assert status == 503 and "no provider is enabled" in body["error"]["message"]


def test_hostile_json_bodies_get_400_not_500(harness):
    seen: list = []
    up = harness.upstream(chat_handler(seen))
    harness.start([provider("mock", up.url)])
    deep = b"[" * 100000 + b"]" * 100000
    for body, words in ((deep, "nested too deeply"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "not UTF-8"),
                        (b'\xff\xfe{"model": "m"}', "not UTF-8")):
        status, err = _status_and_json(raw_request(harness.port, post_head("/v1/chat/completions", body)))
        assert status == 400 and words in err["error"]["message"]
    # A lone surrogate written as a JSON escape is valid JSON: forwarded (escaped), not a crash.
    body = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800 hi"}]}'
    status, reply = _status_and_json(raw_request(harness.port, post_head("/v1/chat/completions", body)))
    assert status == 200 and reply["choices"][0]["message"]["content"] == "Hello!"
    assert seen[-1][2]["messages"][0]["content"] == "\ud800 hi"


def test_upstream_that_compresses_anyway_is_relayed_with_its_content_encoding(harness):
    """The gateway asks for identity; an upstream that gzips regardless must not reach the client garbled."""
    import gzip
    seen: list = []

    async def handler(req):
        seen.append(req.headers.get("accept-encoding"))
        return MockResponse(200, gzip.compress(json.dumps(chat_completion("zipped")).encode()),
                            headers=[("content-encoding", "gzip")], content_type="application/json")
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url)])
    r = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "zipped"
    assert seen == ["identity"]


def test_request_headers_lower_case_names_and_join_a_repeated_field():
    raw = [(b"Host", b"x"), (b"Anthropic-Beta", b"a"), (b"content-type", b"application/json"),
           (b"anthropic-beta", b"b")]
    assert evo_gateway.request_headers(raw) == {"host": "x", "anthropic-beta": "a, b",
                                                "content-type": "application/json"}
    assert evo_gateway.request_headers([(b"X-Caf\xe9", b"\xe9t\xe9")]) == {"x-caf\xe9": "\xe9t\xe9"}
    assert evo_gateway.request_headers([]) == {}
