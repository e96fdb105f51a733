"""The Ollama API surface over real sockets: the official `ollama` client → gateway → mock upstreams.

Two kinds of upstream stand behind the gateway: an Ollama-native mock (provider_type `ollama`,
base_url = the server root; /api/* bytes are relayed as they come) and an OpenAI-compatible
mock (the gateway translates Ollama ⇄ OpenAI chat). The `openai` client is used for the
`/v1/*` side of an `ollama` provider.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading

import httpx
import ollama
import openai
import pytest
from conftest import provider
from mock_upstream import MockResponse, chat_chunks, chat_completion, sse_body

import evo_gateway

NATIVE_MODEL = "llama3:8b"
MISSING = "model \"nosuch\" not found, try pulling it first"


def ndjson_lines(objs: list[dict]) -> list[bytes]:
    # json.dumps' default ", " / ": " spacing differs from the gateway's compact output, so a
    # byte-equal body proves the lines were relayed, not re-serialized.
    return [json.dumps(o).encode() + b"\n" for o in objs]


def native_chat_lines(model: str, pieces: list[str]) -> list[bytes]:
    objs = [{"model": model, "created_at": "2025-10-26T17:15:24.097767Z",
             "message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
    objs.append({"model": model, "created_at": "2025-10-26T17:15:25.1Z", "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": "stop", "total_duration": 4883583458, "load_duration": 1334875,
                 "prompt_eval_count": 26, "prompt_eval_duration": 342546000, "eval_count": len(pieces),
                 "eval_duration": 4535599000})
    return ndjson_lines(objs)


def native_generate_lines(model: str, pieces: list[str]) -> list[bytes]:
    objs = [{"model": model, "created_at": "2025-10-26T17:15:24.097767Z", "response": p, "done": False}
            for p in pieces]
    objs.append({"model": model, "created_at": "2025-10-26T17:15:25.1Z", "response": "", "done": True,
                 "done_reason": "stop", "context": [1, 2, 3], "total_duration": 10, "eval_count": len(pieces)})
    return ndjson_lines(objs)


async def lines_body(lines: list[bytes]):
    for line in lines:
        yield line


NATIVE_SHOW = {"modelfile": "FROM llama3:8b\n", "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
               "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                           "parameter_size": "8.0B", "quantization_level": "Q4_K_M"},
               "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
               "capabilities": ["completion", "tools"], "modified_at": "2025-10-01T10:00:00.123456Z"}


def embeddings_answer(model: str, n: int = 1) -> dict:
    return {"object": "list", "model": model, "usage": {"prompt_tokens": 3, "total_tokens": 3},
            "data": [{"object": "embedding", "index": i, "embedding": [0.5 + i, -0.25, 1.0]} for i in range(n)]}


def native_handler(seen: list):
    """An Ollama server: /api/* natively and its own OpenAI-compatible /v1/*."""
    async def handler(req):
        body = req.json()
        seen.append((req.path, req.headers, body))
        model = body.get("model")
        if model == "nosuch":
            return MockResponse(404, {"error": MISSING})
        if req.path == "/api/chat":
            lines = native_chat_lines(model, ["Hel", "lo", "!"])
            if body.get("stream") is False:
                return MockResponse(200, lines[-1].replace(b'"content": ""', b'"content": "Hello!"'),
                                    content_type="application/json; charset=utf-8")
            return MockResponse(200, lines_body(lines), content_type="application/x-ndjson")
        if req.path == "/api/generate":
            lines = native_generate_lines(model, ["Once", " upon"])
            if body.get("stream") is False:
                return MockResponse(200, lines[-1].replace(b'"response": ""', b'"response": "Once upon"'),
                                    content_type="application/json; charset=utf-8")
            return MockResponse(200, lines_body(lines), content_type="application/x-ndjson")
        if req.path == "/api/show":
            return MockResponse(200, NATIVE_SHOW)
        if req.path == "/api/embed":
            return MockResponse(200, {"model": model, "embeddings": [[0.1, 0.2, 0.3]], "total_duration": 5,
                                      "load_duration": 1, "prompt_eval_count": 2})
        if req.path == "/api/embeddings":
            return MockResponse(200, {"embedding": [0.7, 0.8]})
        if req.path == "/v1/embeddings":
            return MockResponse(200, embeddings_answer(model))
        if req.path == "/v1/chat/completions":
            if body.get("stream"):
                return MockResponse(200, sse_body(*chat_chunks(["Hi", " there"], model=model)),
                                    content_type="text/event-stream")
            return MockResponse(200, chat_completion("Hi there", model=model))
        return MockResponse(404, b"404 page not found", content_type="text/plain")
    return handler


def openai_handler(seen: list):
    """An OpenAI-compatible server (vLLM-like) under /v1."""
    async def handler(req):
        body = req.json()
        seen.append((req.path, req.headers, body))
        if body.get("model") == "nosuch":
            return MockResponse(404, {"error": {"message": "The model `nosuch` does not exist.",
                                                "type": "NotFoundError", "param": None, "code": 404}})
        if req.path == "/v1/embeddings":
            n = len(body["input"]) if isinstance(body["input"], list) else 1
            return MockResponse(200, embeddings_answer(body["model"], n))
        if body.get("stream"):
            return MockResponse(200, sse_body(*chat_chunks(["Hel", "lo", "!"], model=body["model"])),
                                content_type="text/event-stream")
        return MockResponse(200, chat_completion("Hello!", model=body["model"]))
    return handler


def start_both(harness, native=None, compat=None):
    """A gateway with `local` (ollama, native mock) and `vllm` (OpenAI-compatible mock)."""
    native_seen: list = []
    compat_seen: list = []
    up_native = harness.upstream(native or native_handler(native_seen))
    up_compat = harness.upstream(compat or openai_handler(compat_seen))
    url = harness.start([
        provider("local", up_native.url, provider_type="ollama", models=[NATIVE_MODEL]),
        provider("vllm", up_compat.url + "/v1", models=["qwen2.5-7b", "bge-m3"]),
    ])
    return url, native_seen, compat_seen


def oclient(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=20)


USER = [{"role": "user", "content": "hi"}]


# -- chat and generate through the ollama client ----------------------------------------------


def test_ollama_chat_stream_to_native_provider_relays_ndjson_bytes_unchanged(harness):
    url, seen, _ = start_both(harness)
    parts = list(oclient(url).chat(model="local:llama3:8b", messages=USER, stream=True))
    assert [p.message.content for p in parts] == ["Hel", "lo", "!", ""]
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 3
    path, headers, body = seen[0]
    assert path == "/api/chat" and body["model"] == NATIVE_MODEL and body["messages"] == USER
    assert headers["accept-encoding"] == "identity"

    payload = {"model": "local:llama3:8b", "messages": USER}  # no "stream": Ollama's default is to stream
    with httpx.stream("POST", url + "/api/chat", json=payload, headers={"accept-encoding": "gzip, br"},
                      timeout=20) as r:
        raw = b"".join(r.iter_raw())
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        assert "content-encoding" not in r.headers
    assert raw == b"".join(native_chat_lines(NATIVE_MODEL, ["Hel", "lo", "!"]))
    assert "stream" not in seen[1][2]  # forwarded as sent: the upstream applies the same default


def test_ollama_chat_non_stream_to_native_provider_is_one_json_object(harness):
    url, seen, _ = start_both(harness)
    r = oclient(url).chat(model="local:llama3:8b", messages=USER, stream=False)
    assert r.message.content == "Hello!" and r.done and r.model == NATIVE_MODEL
    assert seen[0][0] == "/api/chat" and seen[0][2]["stream"] is False


def test_ollama_generate_to_native_provider_stream_and_not(harness):
    url, seen, _ = start_both(harness)
    c = oclient(url)
    parts = list(c.generate(model="local:llama3:8b", prompt="tell me", stream=True))
    assert [p.response for p in parts] == ["Once", " upon", ""]
    assert parts[-1].context == [1, 2, 3]  # native answers keep what only Ollama has
    r = c.generate(model="local:llama3:8b", prompt="tell me", stream=False)
    assert r.response == "Once upon" and r.done
    assert [(s[0], s[2]["model"], s[2]["prompt"]) for s in seen] == [("/api/generate", NATIVE_MODEL, "tell me")] * 2


def test_ollama_chat_stream_to_openai_provider_is_translated_with_counts(harness):
    url, _, seen = start_both(harness)
    parts = list(oclient(url).chat(model="vllm:qwen2.5-7b", messages=USER, stream=True,
                                         options={"temperature": 0.2, "num_predict": 64}))
    assert "".join(p.message.content for p in parts) == "Hello!"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    assert final.model == "vllm:qwen2.5-7b" and final.done_reason == "stop"
    assert (final.prompt_eval_count, final.eval_count) == (5, 3)
    assert final.total_duration > 0  # measured by the gateway, in ns
    path, _, body = seen[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "qwen2.5-7b" and body["messages"] == USER
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64

    with httpx.stream("POST", url + "/api/chat", json={"model": "vllm:qwen2.5-7b", "messages": USER},
                      headers={"accept-encoding": "gzip"}, timeout=20) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
        assert r.headers["content-type"] == "application/x-ndjson"
        assert "content-encoding" not in r.headers
    assert lines[-1]["done"] is True and all(line["done"] is False for line in lines[:-1])


def test_ollama_chat_non_stream_to_openai_provider_is_translated(harness):
    url, _, seen = start_both(harness)
    r = oclient(url).chat(model="vllm:qwen2.5-7b", messages=USER, stream=False)
    assert r.message.role == "assistant" and r.message.content == "Hello!"
    assert r.done and r.done_reason == "stop" and r.eval_count == 2 and r.prompt_eval_count == 5
    assert r.total_duration > 0
    assert seen[0][2]["stream"] is False


def test_ollama_generate_to_openai_provider_stream_and_not(harness):
    url, _, seen = start_both(harness)
    c = oclient(url)
    parts = list(c.generate(model="vllm:qwen2.5-7b", prompt="tell me", system="be brief", stream=True))
    assert "".join(p.response for p in parts) == "Hello!" and parts[-1].done
    r = c.generate(model="vllm:qwen2.5-7b", prompt="tell me", stream=False)
    assert r.response == "Hello!" and r.done and r.eval_count == 2
    assert seen[0][2]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me"}]
    assert [s[2]["stream"] for s in seen] == [True, False]


def test_ollama_load_and_unload_calls_to_openai_provider_are_answered_by_the_gateway(harness):
    url, _, seen = start_both(harness)
    c = oclient(url)
    loaded = c.chat(model="vllm:qwen2.5-7b", messages=[])  # what `ollama run` sends first
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    streamed = list(c.chat(model="vllm:qwen2.5-7b", messages=[], stream=True))
    assert [p.done_reason for p in streamed] == ["load"]
    assert c.generate(model="vllm:qwen2.5-7b").done_reason == "load"
    assert c.generate(model="vllm:qwen2.5-7b", keep_alive=0).done_reason == "unload"
    assert seen == []  # an OpenAI-compatible server has nothing to load: never asked


def test_ollama_chat_image_reaches_openai_provider_as_data_url(harness):
    url, _, seen = start_both(harness)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
    r = oclient(url).chat(model="vllm:qwen2.5-7b", stream=False,
                          messages=[{"role": "user", "content": "what is this?", "images": [png]}])
    assert r.message.content == "Hello!"
    (msg,) = seen[0][2]["messages"]
    assert msg["content"][0] == {"type": "text", "text": "what is this?"}
    image_url = msg["content"][1]["image_url"]["url"]
    assert image_url == "data:image/png;base64," + base64.b64encode(png).decode()


# -- list, show, embed, version ---------------------------------------------------------------


def test_ollama_list_shows_configured_models_as_provider_model(harness):
    url, _, _ = start_both(harness)
    models = oclient(url).list().models
    assert [m.model for m in models] == ["local:llama3:8b", "vllm:qwen2.5-7b", "vllm:bge-m3"]
    assert all(m.modified_at is not None and m.details is not None for m in models)


def test_ollama_show_relays_native_answer_and_synthesizes_for_openai_provider(harness):
    url, seen, compat_seen = start_both(harness)
    c = oclient(url)
    native = c.show("local:llama3:8b")
    assert native.modelinfo == NATIVE_SHOW["model_info"] and native.details.quantization_level == "Q4_K_M"
    assert seen[0][0] == "/api/show" and seen[0][2]["model"] == NATIVE_MODEL
    bridged = c.show("vllm:qwen2.5-7b")
    assert bridged.modelinfo == {}  # an object, never null: some clients crash on null
    assert "tools" in bridged.capabilities and "completion" in bridged.capabilities
    assert compat_seen == []  # synthesized, nothing asked upstream


def test_ollama_embed_native_and_translated_through_v1_embeddings(harness):
    url, seen, compat_seen = start_both(harness)
    c = oclient(url)
    native = c.embed(model="local:llama3:8b", input="hello")
    assert native.embeddings == [[0.1, 0.2, 0.3]]
    assert seen[0][0] == "/api/embed" and seen[0][2] == {"model": NATIVE_MODEL, "input": "hello"}
    bridged = c.embed(model="vllm:bge-m3", input=["a", "b"])
    assert bridged.embeddings == [[0.5, -0.25, 1.0], [1.5, -0.25, 1.0]]
    assert bridged.model == "vllm:bge-m3" and bridged.prompt_eval_count == 3
    path, _, body = compat_seen[0]
    assert path == "/v1/embeddings"
    assert body == {"model": "bge-m3", "input": ["a", "b"], "encoding_format": "float"}


def test_ollama_legacy_embeddings_native_and_translated(harness):
    url, seen, compat_seen = start_both(harness)
    c = oclient(url)
    assert list(c.embeddings(model="local:llama3:8b", prompt="hello").embedding) == [0.7, 0.8]
    assert seen[0][0] == "/api/embeddings"
    assert list(c.embeddings(model="vllm:bge-m3", prompt="hello").embedding) == [0.5, -0.25, 1.0]
    assert compat_seen[0][0] == "/v1/embeddings" and compat_seen[0][2]["input"] == "hello"


def test_api_version_is_numeric_semver_that_clients_parse(harness):
    url, _, _ = start_both(harness)
    r = httpx.get(url + "/api/version", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    version = r.json()["version"]
    # Open WebUI strips a leading "v" and any "-suffix", then compares integer tuples.
    parts = tuple(int(x) for x in re.sub(r"^v|-.*", "", version).split("."))
    assert len(parts) == 3 and parts >= (0, 6, 4)  # new enough for clients that gate on tools/embed support
    assert httpx.head(url + "/api/version", timeout=10).status_code == 200


def test_root_liveness_and_ps_answer_like_ollama_and_only_health_needs_no_key(harness, tmp_path):
    keys = tmp_path / "auth.json"
    url, _, _ = start_both(harness)
    r = httpx.get(url + "/", timeout=10)
    assert r.status_code == 200 and r.text == "Ollama is running\n"
    assert httpx.head(url + "/", timeout=10).status_code == 200
    assert httpx.get(url + "/api/ps", timeout=10).json() == {"models": []}
    assert httpx.post(url + "/", json={}, timeout=10).status_code == 405
    harness.stop()
    harness.server = None
    url = harness.start([], environ={"EVO_GATEWAY_AUTH": "true", "EVO_GATEWAY_AUTH_KEYS": str(keys)})
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert httpx.get(url + "/", timeout=10).status_code == 401  # SPEC §9: every route but /health
    assert httpx.get(url + "/api/ps", timeout=10).status_code == 401


# -- tool calls -------------------------------------------------------------------------------


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_call_handler(seen: list):
    """First turn: a streamed tool call in fragments; once a tool result is in: a text answer."""
    async def handler(req):
        body = req.json()
        seen.append(body)
        if any(m["role"] == "tool" for m in body["messages"]):
            return MockResponse(200, chat_completion("Sunny in Tokyo.", model=body["model"]))
        base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        frags = [{"index": 0, "id": "call_abc", "type": "function",
                  "function": {"name": "get_weather", "arguments": ""}},
                 {"index": 0, "function": {"arguments": "{\"city\": "}},
                 {"index": 0, "function": {"arguments": "\"Tokyo\"}"}}]
        chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": None,
                                                             "tool_calls": [f]}, "finish_reason": None}])
                  for f in frags]
        chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
        chunks.append(dict(base, choices=[], usage={"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}))
        return MockResponse(200, sse_body(*chunks), content_type="text/event-stream")
    return handler


def test_ollama_tool_call_round_trip_through_openai_provider(harness):
    seen: list = []
    url, _, _ = start_both(harness, compat=tool_call_handler(seen))
    c = oclient(url)
    messages = [{"role": "user", "content": "Weather in Tokyo?"}]
    parts = list(c.chat(model="vllm:qwen2.5-7b", messages=messages, tools=[WEATHER_TOOL], stream=True))
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    assert len(calls) == 1  # emitted whole, once, not as fragments
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Tokyo"}  # an object, as Ollama clients expect
    assert parts[-1].done and parts[-1].done_reason == "stop"  # Ollama reports tool turns as "stop"
    assert seen[0]["tools"] == [WEATHER_TOOL]

    assistant = next(p.message for p in parts if p.message.tool_calls)
    messages += [assistant, {"role": "tool", "content": "sunny, 24C", "tool_name": "get_weather"}]
    final = c.chat(model="vllm:qwen2.5-7b", messages=messages, tools=[WEATHER_TOOL], stream=False)
    assert final.message.content == "Sunny in Tokyo."
    sent = seen[1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    (call,) = sent[1]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Tokyo"}  # a JSON string again upstream
    assert isinstance(call["id"], str) and call["id"]
    assert sent[2] == {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24C"}


# -- the OpenAI side of an ollama provider ----------------------------------------------------


def test_openai_client_reaches_ollama_provider_v1_with_colon_model(harness):
    url, seen, _ = start_both(harness)
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    r = c.chat.completions.create(model="local:llama3:8b", messages=USER)
    assert r.choices[0].message.content == "Hi there"
    pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(
        model="local:llama3:8b", messages=USER, stream=True) if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == "Hi there"
    e = c.embeddings.create(model="local:llama3:8b", input="hello", encoding_format="float")
    assert e.data[0].embedding == [0.5, -0.25, 1.0]
    assert [(s[0], s[2]["model"]) for s in seen] == [("/v1/chat/completions", NATIVE_MODEL)] * 2 + [
        ("/v1/embeddings", NATIVE_MODEL)]


# -- streaming is unbuffered ------------------------------------------------------------------


def test_api_chat_native_relay_is_unbuffered(harness):
    gate = harness.gate()
    lines = native_chat_lines(NATIVE_MODEL, ["first", "second"])

    async def handler(req):
        async def body():
            yield lines[0]
            await gate.wait(10)  # held until the test has seen "first" arrive at the client
            for line in lines[1:]:
                yield line
        return MockResponse(200, body(), content_type="application/x-ndjson")
    url, _, _ = start_both(harness, native=handler)
    got = []
    for part in oclient(url).chat(model="local:llama3:8b", messages=USER, stream=True):
        got.append(part.message.content)
        if got == ["first"]:
            gate.set()
    assert got == ["first", "second", ""]


def test_api_chat_translated_stream_is_unbuffered(harness):
    gate = harness.gate()
    chunks = chat_chunks(["first", "second"])

    async def handler(req):
        async def body():
            for c in chunks[:2]:
                yield b"data: " + json.dumps(c).encode() + b"\n\n"
            await gate.wait(10)
            for c in chunks[2:]:
                yield b"data: " + json.dumps(c).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        return MockResponse(200, body(), content_type="text/event-stream")
    url, _, _ = start_both(harness, compat=handler)
    got = []
    for part in oclient(url).chat(model="vllm:qwen2.5-7b", messages=USER, stream=True):
        if part.message.content:
            got.append(part.message.content)
            if got == ["first"]:
                gate.set()
    assert got == ["first", "second"]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["local:nosuch", "vllm:nosuch"])
def test_api_chat_upstream_404_passes_through_as_ollama_error(harness, model):
    url, _, _ = start_both(harness)
    for stream in (True, False):
        with pytest.raises(ollama.ResponseError) as e:
            r = oclient(url).chat(model=model, messages=USER, stream=stream)
            list(r) if stream else None
        assert e.value.status_code == 404
        assert "nosuch" in e.value.error
    r = httpx.post(url + "/api/chat", json={"model": model, "messages": USER}, timeout=10)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_api_malformed_json_and_unknown_path_get_ollama_errors(harness):
    url, seen, compat_seen = start_both(harness)
    r = httpx.post(url + "/api/chat", content=b'{"model": "local:llama3:8b", "messages": [', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"} and "JSON" in r.json()["error"]
    r = httpx.post(url + "/api/chat", json=["not", "an", "object"], timeout=10)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(url + "/api/generate", json={"prompt": "no model"}, timeout=10)
    assert r.status_code == 400 and "model" in r.json()["error"]
    r = httpx.post(url + "/api/chat", content=b'{"model": "vllm:qwen2.5-7b", "messages": []}', timeout=10,
                   headers={"content-type": "application/x-www-form-urlencoded"})  # what bare `curl -d` sends
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    r = httpx.post(url + "/api/pull", json={"model": "x"}, timeout=10)
    assert r.status_code == 404 and set(r.json()) == {"error"} and "/api/pull" in r.json()["error"]
    r = httpx.get(url + "/api/chat", timeout=10)
    assert r.status_code == 405 and set(r.json()) == {"error"} and r.headers["allow"] == "POST"
    assert oclient(url).ps().models == []  # a gateway has no loaded models to list
    assert seen == [] and compat_seen == []


def test_api_chat_bad_messages_to_openai_provider_is_400_before_upstream(harness):
    url, _, compat_seen = start_both(harness)
    r = httpx.post(url + "/api/chat", json={"model": "vllm:qwen2.5-7b", "messages": "hi"}, timeout=10)
    assert r.status_code == 400 and "messages" in r.json()["error"]
    assert compat_seen == []


def test_api_chat_native_mid_stream_failure_ends_with_error_line(harness):
    lines = native_chat_lines(NATIVE_MODEL, ["partial", "never"])

    async def handler(req):
        async def body():
            yield lines[0]
            yield lines[1][:15]  # half a line, then the connection dies
            raise ConnectionResetError("upstream died")
        return MockResponse(200, body(), content_type="application/x-ndjson")
    url, _, _ = start_both(harness, native=handler)
    got = []
    with pytest.raises(ollama.ResponseError) as e:
        for part in oclient(url).chat(model="local:llama3:8b", messages=USER, stream=True):
            got.append(part.message.content)
    assert got == ["partial"]
    assert "local" in e.value.error

    with httpx.stream("POST", url + "/api/chat", json={"model": "local:llama3:8b", "messages": USER},
                      timeout=20) as r:
        raw = b"".join(r.iter_raw())
    assert raw.startswith(lines[0]) and raw.endswith(b"\n")
    out = [json.loads(line) for line in raw.splitlines()]  # every line parses: no half line was left
    assert len(out) == 2 and set(out[-1]) == {"error"}


def test_api_chat_translated_mid_stream_failure_ends_with_error_line(harness):
    async def handler(req):
        async def body():
            yield b"data: " + json.dumps(chat_chunks(["partial"])[1]).encode() + b"\n\n"
            raise ConnectionResetError("upstream died")
        return MockResponse(200, body(), content_type="text/event-stream")
    url, _, _ = start_both(harness, compat=handler)
    got = []
    with pytest.raises(ollama.ResponseError) as e:
        for part in oclient(url).generate(model="vllm:qwen2.5-7b", prompt="x", stream=True):
            got.append(part.response)
    assert got == ["partial"]
    assert "vllm" in e.value.error


def test_api_chat_client_disconnect_cancels_native_upstream(harness):
    gate = harness.gate()
    closed = threading.Event()

    async def handler(req):
        async def body():
            try:
                yield native_chat_lines(NATIVE_MODEL, ["a"])[0]
                await gate.wait(60)  # never released: only the disconnect can end this
            finally:
                closed.set()
        return MockResponse(200, body(), content_type="application/x-ndjson")
    url, _, _ = start_both(harness, native=handler)
    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps({"model": "local:llama3:8b", "messages": USER}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        data = b""
        while b'"a"' not in data and len(data) < 65536:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        assert b'"a"' in data
    assert closed.wait(5), "the upstream stream was not cancelled after the client left"


def test_ollama_client_with_gateway_key_in_headers_passes_auth_and_without_gets_401(harness, tmp_path):
    key = "evo-" + "c3" * 24
    path = tmp_path / "auth.json"
    evo_gateway.write_keys_file(str(path), {"keys": [{"name": "webui", "key_hash": hashlib.sha256(key.encode()).hexdigest(),
                                                      "prefix": key[:16], "created_at": "2026-01-01T00:00:00.000000Z"}]})
    url, _, seen = start_both(harness)
    harness.gateway.auth = evo_gateway.KeyStore(str(path))
    with pytest.raises(ollama.ResponseError) as e:
        oclient(url).chat(model="vllm:qwen2.5-7b", messages=USER)
    assert e.value.status_code == 401 and "gateway API key" in e.value.error  # Ollama's {"error": "..."}
    c = ollama.Client(host=url, timeout=20, headers={"Authorization": f"Bearer {key}"})
    assert c.chat(model="vllm:qwen2.5-7b", messages=USER).message.content == "Hello!"
    assert [m.model for m in c.list().models][0] == "local:llama3:8b"
    assert "authorization" not in seen[0][1]  # the gateway key never goes upstream


def test_ollama_list_asks_an_ollama_upstream_configured_without_models_and_caches_the_answer(harness):
    tags_calls = []
    native = native_handler([])

    async def server_with_models(req):
        if req.method == "GET" and req.path == "/api/tags":
            tags_calls.append(req)
            return MockResponse(200, {"models": [{"name": "llama3:8b", "model": "llama3:8b"},
                                                 {"name": "qwen2.5:7b", "model": "qwen2.5:7b"}, {"name": 3}]})
        return await native(req)
    up = harness.upstream(server_with_models)
    compat = harness.upstream(openai_handler([]))
    url = harness.start([provider("ol", up.url, provider_type="ollama"),
                         provider("vllm", compat.url + "/v1", models=["qwen2.5-7b"])])
    for _ in range(2):
        assert [m.model for m in oclient(url).list().models] == ["ol:llama3:8b", "ol:qwen2.5:7b", "vllm:qwen2.5-7b"]
    assert len(tags_calls) == 1  # one upstream round answers for MODEL_LIST_CACHE_S
    ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert ids == ["ol:llama3:8b", "ol:qwen2.5:7b", "vllm:qwen2.5-7b"]
    assert len(tags_calls) == 1
    r = oclient(url).chat(model="ol:llama3:8b", messages=USER, stream=False)  # what the list offers routes
    assert r.message.content == "Hello!"
