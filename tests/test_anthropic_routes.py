"""Anthropic Messages over real sockets: passthrough to an Anthropic upstream, and the two-way
OpenAI ⇄ Anthropic translation, with the official `anthropic` and `openai` clients as clients.
"""

from __future__ import annotations

import hashlib
import json
import logging

import anthropic
import httpx
import openai
import pytest
from conftest import provider
from mock_upstream import MockResponse, chat_chunks, chat_completion, sse_body

import evo_gateway
from providers import translate as tr

ANTH_ENV = {"ANTH_KEY": "sk-test"}
CLIENT_KEY = "client-key-must-not-leak"


# -- helpers ------------------------------------------------------------------------------------


def ant_client(url: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=20, **kw)


def oa_client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20, **kw)


def ant_provider(up) -> dict:
    return provider("anthropic", up.url + "/v1", provider_type="anthropic", api_key_envs=["ANTH_KEY"])


def oa_provider(up) -> dict:
    return provider("oa", up.url + "/v1")


def ant_event(event: dict) -> bytes:
    """One Anthropic SSE event, framed as the real API frames it (an `event:` line and a `data:` line)."""
    return b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event).encode() + b"\n\n"


def ant_stream_events(text: str = "Checking.", tool: bool = True, stop_reason: str | None = None) -> list[dict]:
    """A realistic Messages stream: message_start, ping, a text block, optionally a tool_use block."""
    events = [
        {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 300}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    half = len(text) // 2
    for piece in (text[:half], text[half:]):
        events.append({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
    events.append({"type": "content_block_stop", "index": 0})
    if tool:
        events += [
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_01", "name": "get_time", "input": {}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": "{\"tz\": \"UT"}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "C\"}"}},
            {"type": "content_block_stop", "index": 1},
        ]
    events += [
        {"type": "message_delta", "delta": {"stop_reason": stop_reason or ("tool_use" if tool else "end_turn"),
                                            "stop_sequence": None}, "usage": {"output_tokens": 25}},
        {"type": "message_stop"},
    ]
    return events


def ant_message(text: str = "Checking.", tool: bool = True, stop_reason: str | None = None,
                stop_sequence: str | None = None) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if tool:
        content.append({"type": "tool_use", "id": "toolu_01", "name": "get_time", "input": {"tz": "UTC"}})
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason or ("tool_use" if tool else "end_turn"), "stop_sequence": stop_sequence,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 300,
                      "output_tokens": 25}}


def chunked(*frames: bytes):
    """A streamed body that sends each frame as its own chunk."""
    async def body():
        for frame in frames:
            yield frame
    return body()


def anthropic_upstream(harness, events: list[dict] | None = None, message: dict | None = None):
    """An Anthropic mock: SSE for stream requests, a message otherwise, a count for count_tokens."""
    frames = [ant_event(e) for e in (events or ant_stream_events())]

    async def handler(req):
        if req.path.endswith("/count_tokens"):
            return MockResponse(200, {"input_tokens": 4242})
        if req.json().get("stream"):
            return MockResponse(200, chunked(*frames), content_type="text/event-stream; charset=utf-8",
                                headers=[("request-id", "req_mock_1")])
        return MockResponse(200, message or ant_message(), headers=[("request-id", "req_mock_1")])
    up = harness.upstream(handler)
    up.stream_bytes = b"".join(frames)
    return up


def chat_upstream(harness, answers: list):
    """An OpenAI-compatible mock answering each request with the next entry of `answers`.

    An entry is a MockResponse, or a list of chunks (streamed as SSE), or a chat.completion dict.
    """
    queue = list(answers)

    async def handler(req):
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, MockResponse):
            return answer
        if isinstance(answer, list):
            return MockResponse(200, sse_body(*answer), content_type="text/event-stream")
        return MockResponse(200, answer)
    return harness.upstream(handler)


def tool_call_chunks(call_id: str, name: str, arg_pieces: list[str], text: str = "") -> list[dict]:
    base = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1735000000, "model": "m"}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": text or None},
                                "finish_reason": None}])]
    out.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [{
        "index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]},
        "finish_reason": None}]))
    for piece in arg_pieces:
        out.append(dict(base, choices=[{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "function": {"arguments": piece}}]}, "finish_reason": None}]))
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    out.append(dict(base, choices=[], usage={"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}))
    return out


def tool_call_completion(call_id: str, name: str, arguments: str) -> dict:
    resp = chat_completion("")
    resp["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    resp["choices"][0]["finish_reason"] = "tool_calls"
    return resp


def raw_stream(url: str, body: dict, path: str = "/v1/messages") -> tuple[int, bytes]:
    with httpx.Client(timeout=20) as c, c.stream("POST", url + path, json=body,
                                                   headers={"anthropic-version": "2023-06-01"}) as r:
        return r.status_code, r.read()


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, JSON data) pairs of an SSE body; comments and blank lines skipped."""
    out = []
    for frame in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "", ""
        for line in frame.decode().split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if data:
            out.append((name, json.loads(data)))
    return out


WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


# -- Anthropic client → Anthropic upstream: passthrough -----------------------------------------


def test_anthropic_stream_to_anthropic_upstream_is_relayed_byte_identical_with_headers(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    seen_urls: list[str] = []
    http = anthropic.DefaultHttpxClient(event_hooks={"request": [lambda r: seen_urls.append(str(r.url))]})
    client = ant_client(url, http_client=http, default_headers={"anthropic-version": "2024-10-22"})
    with client.beta.messages.with_streaming_response.create(
            model="anthropic:claude-x", max_tokens=100, stream=True,
            betas=["interleaved-thinking-2025-05-14", "claude-code-20250219"], extra_query={"beta": "true"},
            messages=[{"role": "user", "content": "time?"}]) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        relayed = b"".join(resp.iter_bytes())
    assert seen_urls and seen_urls[0].endswith("/v1/messages?beta=true")
    assert relayed == up.stream_bytes
    req = up.requests[0]
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == "sk-test"
    assert req.headers["anthropic-version"] == "2024-10-22"
    assert req.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14,claude-code-20250219"
    assert "authorization" not in req.headers
    assert CLIENT_KEY not in json.dumps(req.headers)
    assert req.json()["model"] == "claude-x"


def test_anthropic_stream_to_anthropic_upstream_accumulates_in_sdk(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    with ant_client(url).messages.stream(model="anthropic:claude-x", max_tokens=100,
                                         messages=[{"role": "user", "content": "time?"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Checking."
    assert final.content[0].text == "Checking."
    assert final.content[1].type == "tool_use" and final.content[1].input == {"tz": "UTC"}
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 12 and final.usage.output_tokens == 25


def test_relayed_answers_put_their_token_usage_on_the_log_line(harness, caplog):
    caplog.set_level(logging.INFO, logger="evo_gateway")
    ant_up = anthropic_upstream(harness)
    oa_up = chat_upstream(harness, [chat_completion("hi"), chat_chunks(["a", "b"])])
    url = harness.start([ant_provider(ant_up), oa_provider(oa_up)], environ=ANTH_ENV)
    with ant_client(url).messages.stream(model="anthropic:claude-x", max_tokens=100,
                                         messages=[{"role": "user", "content": "time?"}]) as stream:
        stream.get_final_message()
    ant_client(url).messages.create(model="anthropic:claude-x", max_tokens=100,
                                    messages=[{"role": "user", "content": "time?"}])
    oa_client(url).chat.completions.create(model="oa:m", messages=[{"role": "user", "content": "x"}])
    list(oa_client(url).chat.completions.create(model="oa:m", stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "x"}]))
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("path") in ("/v1/messages",
                                                                                  "/v1/chat/completions")]
    usages = [r.fields.get("usage") for r in lines]
    # Anthropic: input (with cache reads) from message_start, output from message_delta
    assert usages[0] == {"prompt_tokens": 312, "completion_tokens": 25, "total_tokens": 337}
    assert usages[1] == {"prompt_tokens": ant_message()["usage"]["input_tokens"]
                         + ant_message()["usage"].get("cache_read_input_tokens", 0)
                         + ant_message()["usage"].get("cache_creation_input_tokens", 0),
                         "completion_tokens": ant_message()["usage"]["output_tokens"],
                         "total_tokens": usages[1]["prompt_tokens"] + usages[1]["completion_tokens"]}
    assert usages[2] == chat_completion("hi")["usage"]
    assert usages[3] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_anthropic_non_stream_to_anthropic_upstream_relays_body_and_headers(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    sent_versions: list[str] = []
    http = anthropic.DefaultHttpxClient(event_hooks={"request": [
        lambda r: sent_versions.append(r.headers["anthropic-version"])]})
    client = anthropic.Anthropic(base_url=url, auth_token=CLIENT_KEY, max_retries=0, timeout=20, http_client=http)
    raw = client.messages.with_raw_response.create(
        model="anthropic:claude-x", max_tokens=100, messages=[{"role": "user", "content": "time?"}])
    assert raw.http_response.content == json.dumps(ant_message()).encode()
    assert raw.headers["request-id"] == "req_mock_1"
    msg = raw.parse()
    assert msg.content[1].input == {"tz": "UTC"} and msg.usage.cache_read_input_tokens == 300
    req = up.requests[0]
    assert req.headers["x-api-key"] == "sk-test"
    assert req.headers["anthropic-version"] == sent_versions[0]  # whatever this SDK version sends
    assert "authorization" not in req.headers and CLIENT_KEY not in json.dumps(req.headers)


def test_anthropic_upstream_without_client_version_gets_default_version(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    status, _ = raw_stream(url, {"model": "anthropic:claude-x", "max_tokens": 5,
                                 "messages": [{"role": "user", "content": "x"}]}, path="/v1/messages?beta=true")
    assert status == 200
    # raw_stream sends 2023-06-01 itself; send one without the header too
    with httpx.Client(timeout=20) as c:
        r = c.post(url + "/v1/messages", json={"model": "anthropic:claude-x", "max_tokens": 5,
                                                "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert up.requests[1].headers["anthropic-version"] == "2023-06-01"


def test_anthropic_upstream_dying_mid_stream_ends_relay_with_error_event(harness):
    frames = [ant_event(e) for e in ant_stream_events(tool=False)[:4]]

    async def handler(req):
        async def body():
            for frame in frames:
                yield frame
            raise ConnectionResetError("upstream died")
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    got = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with ant_client(url).messages.stream(model="anthropic:claude-x", max_tokens=10,
                                             messages=[{"role": "user", "content": "x"}]) as stream:
            for text in stream.text_stream:
                got.append(text)
    assert "".join(got) == "Chec"
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] in ("api_error", "overloaded_error")
    status, raw = raw_stream(url, {"model": "anthropic:claude-x", "max_tokens": 10, "stream": True,
                                   "messages": [{"role": "user", "content": "x"}]})
    assert status == 200
    assert raw.startswith(b"".join(frames))
    assert sse_events(raw)[-1][0] == "error"


def test_anthropic_upstream_529_overloaded_passes_through_in_anthropic_envelope(harness):
    envelope = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
                "request_id": "req_011"}

    async def handler(req):
        return MockResponse(529, envelope, headers=[("x-should-retry", "true")])
    up = harness.upstream(handler)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    for stream in (False, True):
        with pytest.raises(anthropic.APIStatusError) as e:
            ant_client(url).messages.create(model="anthropic:claude-x", max_tokens=10, stream=stream,
                                            messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 529
        assert e.value.body == envelope
        assert e.value.response.headers["x-should-retry"] == "true"


def test_anthropic_upstream_429_keeps_retry_after_and_envelope(harness):
    envelope = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}

    async def handler(req):
        return MockResponse(429, envelope, headers=[("retry-after", "7"),
                                                    ("anthropic-ratelimit-requests-remaining", "0")])
    up = harness.upstream(handler)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    with pytest.raises(anthropic.RateLimitError) as e:
        ant_client(url).messages.create(model="anthropic:claude-x", max_tokens=10,
                                        messages=[{"role": "user", "content": "x"}])
    assert e.value.body == envelope
    assert e.value.response.headers["retry-after"] == "7"
    assert e.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_count_tokens_on_anthropic_provider_is_forwarded(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    count = ant_client(url).messages.count_tokens(model="anthropic:claude-x", extra_query={"beta": "true"},
                                                  messages=[{"role": "user", "content": "hello"}])
    assert count.input_tokens == 4242
    req = up.requests[0]
    assert req.path == "/v1/messages/count_tokens"
    assert req.headers["x-api-key"] == "sk-test"
    assert req.json()["model"] == "claude-x"


def test_count_tokens_on_openai_provider_is_an_estimate_without_upstream_call(harness):
    up = chat_upstream(harness, [chat_completion()])
    url = harness.start([oa_provider(up)])
    client = ant_client(url)
    short = client.messages.count_tokens(model="oa:m", messages=[{"role": "user", "content": "hi"}],
                                         extra_query={"beta": "true"})
    long = client.messages.count_tokens(model="oa:m", system="be brief " * 100, tools=[WEATHER_TOOL],
                                        messages=[{"role": "user", "content": "hello there " * 200}])
    assert 1 <= short.input_tokens < 10
    assert 600 < long.input_tokens < 3000  # ~ chars/4
    assert up.requests == []


# -- Anthropic client → OpenAI-compatible upstream: translation ---------------------------------


def test_anthropic_non_stream_to_openai_upstream_is_translated(harness):
    up = chat_upstream(harness, [chat_completion("Hello!", usage={"prompt_tokens": 30, "completion_tokens": 2,
                                                                  "total_tokens": 32,
                                                                  "prompt_tokens_details": {"cached_tokens": 10}})])
    url = harness.start([oa_provider(up)], environ={})
    msg = ant_client(url).messages.create(model="oa:m", max_tokens=50, system="Be terse.", stop_sequences=["END"],
                                          extra_body={"temperature": 0.2},
                                          messages=[{"role": "user", "content": "hi"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "oa:m"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello!"
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (20, 10, 2)
    req = up.requests[0]
    assert req.path == "/v1/chat/completions"
    assert "x-api-key" not in req.headers and "authorization" not in req.headers
    sent = req.json()
    assert sent["model"] == "m" and sent["max_tokens"] == 50 and sent["stop"] == ["END"]
    assert sent["temperature"] == 0.2
    assert sent["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]


def test_anthropic_stream_to_openai_upstream_accumulates_text_usage_and_stop(harness):
    up = chat_upstream(harness, [chat_chunks(["Hel", "lo", "!"])])
    url = harness.start([oa_provider(up)])
    with ant_client(url).messages.stream(model="oa:m", max_tokens=50,
                                         messages=[{"role": "user", "content": "say hello"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["Hel", "lo", "!"]
    assert final.content[0].text == "Hello!" and len(final.content) == 1
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 5 and final.usage.output_tokens == 3
    sent = up.requests[0].json()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_translated_stream_message_start_carries_estimated_input_tokens(harness):
    up = chat_upstream(harness, [chat_chunks(["ok"])])
    url = harness.start([oa_provider(up)])
    body = {"model": "oa:m", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "count these words please " * 40}]}
    status, raw = raw_stream(url, body)
    assert status == 200
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(n == d["type"] for n, d in events)
    estimate = events[0][1]["message"]["usage"]["input_tokens"]
    assert estimate == tr.estimate_anthropic_tokens(body) and estimate > 100
    assert events[-2][1]["usage"]["input_tokens"] == 5  # the upstream's own count, once known


def test_anthropic_tool_use_round_trip_through_openai_upstream(harness):
    up = chat_upstream(harness, [
        tool_call_chunks("call_abc", "get_weather", ["{\"ci", "ty\": \"Par", "is\"}"], text="Let me check."),
        chat_completion("It is sunny in Paris."),
    ])
    url = harness.start([oa_provider(up)])
    client = ant_client(url)
    history = [{"role": "user", "content": "Weather in Paris?"}]
    with client.messages.stream(model="oa:m", max_tokens=200, tools=[WEATHER_TOOL], messages=history,
                                tool_choice={"type": "auto"}) as stream:
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["text", "tool_use"]
    assert first.content[0].text == "Let me check."
    tool_use = first.content[1]
    assert tool_use.id == "call_abc" and tool_use.name == "get_weather" and tool_use.input == {"city": "Paris"}
    assert first.stop_reason == "tool_use"
    assert first.usage.input_tokens == 40 and first.usage.output_tokens == 9

    history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny, 24C"},
                    {"type": "text", "text": "and be brief"}]}]
    final = client.messages.create(model="oa:m", max_tokens=200, tools=[WEATHER_TOOL], messages=history)
    assert final.content[0].text == "It is sunny in Paris." and final.stop_reason == "end_turn"

    sent_first = up.requests[0].json()
    assert sent_first["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_TOOL["input_schema"]}}]
    assert sent_first["tool_choice"] == "auto"
    sent = up.requests[1].json()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]
    assert sent[1]["content"] == "Let me check."
    assert sent[1]["tool_calls"] == [{"id": "call_abc", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]
    assert sent[2] == {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 24C"}
    assert sent[3]["content"] in ("and be brief", [{"type": "text", "text": "and be brief"}])


@pytest.mark.parametrize("stream", [False, True])
def test_long_mcp_tool_name_round_trips_through_openai_upstream(harness, stream):
    long_name = "mcp__some_very_long_server_name__" + "do_something_rather_specific_" * 3
    assert len(long_name) > 64
    short = tr._chat_tool_name(long_name)
    assert len(short) <= 64
    answer = tool_call_chunks("call_1", short, ["{\"q\": 1}"]) if stream else \
        tool_call_completion("call_1", short, "{\"q\": 1}")
    up = chat_upstream(harness, [answer, chat_completion("done")])
    url = harness.start([oa_provider(up)])
    client = ant_client(url)
    tool = {"name": long_name, "input_schema": {"type": "object", "properties": {"q": {"type": "integer"}}}}
    history = [{"role": "user", "content": "go"}]
    if stream:
        with client.messages.stream(model="oa:m", max_tokens=50, tools=[tool], messages=history) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(model="oa:m", max_tokens=50, tools=[tool], messages=history)
    assert up.requests[0].json()["tools"][0]["function"]["name"] == short
    tool_use = [b for b in msg.content if b.type == "tool_use"]
    assert len(tool_use) == 1 and tool_use[0].name == long_name and tool_use[0].input == {"q": 1}
    # the history goes back with the long name; upstream sees the short one again
    history += [{"role": "assistant", "content": [tool_use[0].model_dump(exclude_none=True)]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "ok"}]}]
    client.messages.create(model="oa:m", max_tokens=50, tools=[tool], messages=history)
    sent = up.requests[1].json()["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == short


def test_claude_code_shaped_request_is_accepted_on_openai_upstream(harness):
    up = chat_upstream(harness, [chat_chunks(["Done", "."])])
    url = harness.start([oa_provider(up)])
    seen_urls: list[str] = []
    http = anthropic.DefaultHttpxClient(event_hooks={"request": [lambda r: seen_urls.append(str(r.url))]})
    client = ant_client(url, http_client=http, default_headers={"x-claude-code-session-id": "s-1", "x-app": "cli"})
    tools = [dict(WEATHER_TOOL, cache_control={"type": "ephemeral"}),
             {"name": "Bash", "description": "Run a command", "defer_loading": True,
              "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}},
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    with client.beta.messages.stream(
            model="oa:m", max_tokens=128000, tools=tools,
            betas=["claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27"],
            extra_query={"beta": "true"},
            system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0"},
                    {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
                                                    "cache_control": {"type": "ephemeral"}}]},
                      {"role": "system", "content": "Skills available: none."},
                      {"role": "assistant", "content": [
                          {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                          {"type": "text", "text": "Hello."}]},
                      {"role": "user", "content": "list files"}],
            thinking={"type": "adaptive"}, metadata={"user_id": "user_abc_account_x_session_" + "f" * 64},
            extra_body={"context_management": {"edits": []}, "output_config": {"effort": "high"}}) as stream:
        final = stream.get_final_message()
    assert seen_urls[0].endswith("/v1/messages?beta=true")
    assert final.content[0].text == "Done." and final.stop_reason == "end_turn"
    sent = up.requests[0].json()
    assert sent["max_tokens"] == 128000 and sent["stream"] is True
    system = sent["messages"][0]
    assert system["role"] == "system"
    assert "You are Claude Code." in system["content"] and "Skills available: none." in system["content"]
    assert "billing-header" not in system["content"]
    assert [m["role"] for m in sent["messages"][1:]] == ["user", "assistant", "user"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "Bash"]
    text = json.dumps(sent)
    for anthropic_only in ("cache_control", "defer_loading", "context_management", "output_config",
                           "thinking", "signature", "web_search_20250305"):
        assert anthropic_only not in text
    assert "anthropic-beta" not in up.requests[0].headers and "anthropic-version" not in up.requests[0].headers


def limited_output_upstream(harness, limit: int = 32768, wording: str = "openai"):
    """An OpenAI-like mock that refuses max_tokens over `limit` with OpenAI's wording or older vLLM's."""
    async def handler(req):
        body = req.json()
        if body.get("max_tokens", 0) > limit:
            asked = body["max_tokens"]
            message = (f"max_tokens is too large: {asked}. This model supports at most {limit} completion tokens, "
                       f"whereas you provided {asked}." if wording == "openai" else
                       f"This model's maximum context length is {limit} tokens. However, you requested {asked + 9} "
                       f"tokens (9 in the messages, {asked} in the completion). Please reduce the length of the "
                       "messages or completion.")
            return MockResponse(400, {"error": {"message": message, "type": "invalid_request_error",
                                                "param": "max_tokens", "code": "invalid_value"}})
        if body.get("stream"):
            return MockResponse(200, sse_body(*chat_chunks(["fine"])), content_type="text/event-stream")
        return MockResponse(200, chat_completion("fine"))
    return harness.upstream(handler)


@pytest.mark.parametrize("wording", ["openai", "older_vllm"])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_beyond_upstream_limit_is_retried_without_limit(harness, stream, wording):
    up = limited_output_upstream(harness, wording=wording)
    url = harness.start([oa_provider(up)])
    body = {"model": "oa:m", "max_tokens": 128000, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    if stream:
        status, raw = raw_stream(url, body)
        events = sse_events(raw)
        assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["fine"]
    else:
        with httpx.Client(timeout=20) as c:
            r = c.post(url + "/v1/messages", json=body)
        status = r.status_code
        assert r.json()["content"][0]["text"] == "fine"
    assert status == 200
    assert [req.json().get("max_tokens") for req in up.requests] == [128000, None]


def test_small_max_tokens_refused_upstream_is_not_retried(harness):
    up = limited_output_upstream(harness, limit=100)
    url = harness.start([oa_provider(up)])
    with pytest.raises(anthropic.BadRequestError) as e:
        ant_client(url).messages.create(model="oa:m", max_tokens=500, messages=[{"role": "user", "content": "x"}])
    assert "max_tokens is too large" in e.value.body["error"]["message"]
    assert len(up.requests) == 1


# -- OpenAI client → Anthropic upstream: translation --------------------------------------------


def test_openai_non_stream_to_anthropic_upstream_translates_system_tools_usage(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Now",
                                               "parameters": {"type": "object", "properties": {
                                                   "tz": {"type": "string"}}}}}]
    resp = oa_client(url, organization="org-1").chat.completions.create(
        model="anthropic:claude-x", tools=tools, stop=["END"], user="u-1",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "time?"}])
    choice = resp.choices[0]
    assert choice.message.content == "Checking."
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_01" and call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"tz": "UTC"}
    assert resp.usage.prompt_tokens == 312 and resp.usage.completion_tokens == 25
    assert resp.usage.total_tokens == 337
    req = up.requests[0]
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == "sk-test" and req.headers["anthropic-version"] == "2023-06-01"
    assert CLIENT_KEY not in json.dumps(req.headers) and "authorization" not in req.headers
    assert "openai-organization" not in req.headers
    sent = req.json()
    assert sent["model"] == "claude-x" and isinstance(sent["max_tokens"], int) and sent["max_tokens"] > 0
    assert sent["system"] == "You are terse."
    assert sent["messages"] in ([{"role": "user", "content": "time?"}],
                                [{"role": "user", "content": [{"type": "text", "text": "time?"}]}])
    assert sent["stop_sequences"] == ["END"] and sent["metadata"] == {"user_id": "u-1"}
    assert sent["tools"][0]["name"] == "get_time" and sent["tools"][0]["input_schema"]["properties"]


def test_structured_output_from_an_anthropic_provider_reaches_the_sdks_parse(harness):
    """Anthropic has no response_format: the schema goes as a tool the model must call, and the
    call's input comes back as the message text, which the openai SDK parses into the model."""
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        population: int

    answer = {"name": "Paris", "population": 2100000}
    message = {"id": "msg_j", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
               "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 11},
               "content": [{"type": "tool_use", "id": "toolu_j", "name": "json_answer", "input": answer}]}
    arguments = json.dumps(answer)
    events = [
        {"type": "message_start", "message": dict(message, content=[], stop_reason=None)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_j",
                                                                      "name": "json_answer", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                                                              "partial_json": arguments[:10]}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                                                              "partial_json": arguments[10:]}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 11}},
        {"type": "message_stop"},
    ]
    up = anthropic_upstream(harness, events=events, message=message)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    ask = [{"role": "user", "content": "The capital of France?"}]
    parsed = oa_client(url).chat.completions.parse(model="anthropic:claude-x", messages=ask, response_format=City)
    assert parsed.choices[0].message.parsed == City(**answer)
    assert parsed.choices[0].finish_reason == "stop" and not parsed.choices[0].message.tool_calls
    with oa_client(url).chat.completions.stream(model="anthropic:claude-x", messages=ask,
                                                response_format=City) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == City(**answer) and final.choices[0].finish_reason == "stop"
    sent = up.requests[0].json()
    (tool,) = sent["tools"]
    assert tool["name"] == "json_answer" and tool["input_schema"]["properties"].keys() == {"name", "population"}
    assert sent["tool_choice"] == {"type": "tool", "name": "json_answer"}


def test_openai_tool_result_turn_reaches_anthropic_as_tool_result_blocks(harness):
    up = anthropic_upstream(harness, message=ant_message("It is noon.", tool=False))
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    resp = oa_client(url).chat.completions.create(model="anthropic:claude-x", max_tokens=99, messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"UTC\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "12:00"}])
    assert resp.choices[0].message.content == "It is noon." and resp.choices[0].finish_reason == "stop"
    sent = up.requests[0].json()
    assert sent["max_tokens"] == 99
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [{"type": "tool_use", "id": "toolu_01", "name": "get_time",
                                               "input": {"tz": "UTC"}}]
    result = sent["messages"][2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_01"
    assert "12:00" in json.dumps(result["content"])


@pytest.mark.parametrize("stop_reason,stop_sequence,finish", [
    ("end_turn", None, "stop"), ("max_tokens", None, "length"), ("stop_sequence", "END", "stop")])
def test_openai_finish_reason_from_anthropic_stop_reason(harness, stop_reason, stop_sequence, finish):
    up = anthropic_upstream(harness, message=ant_message("x", tool=False, stop_reason=stop_reason,
                                                         stop_sequence=stop_sequence))
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    resp = oa_client(url).chat.completions.create(model="anthropic:claude-x",
                                                  messages=[{"role": "user", "content": "x"}])
    assert resp.choices[0].finish_reason == finish


def test_openai_stream_from_anthropic_upstream_accumulates_message(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    with oa_client(url).chat.completions.stream(
            model="anthropic:claude-x", stream_options={"include_usage": True},
            messages=[{"role": "system", "content": "terse"}, {"role": "user", "content": "time?"}]) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == "Checking."
    choice = final.choices[0]
    assert choice.message.content == "Checking." and choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_01" and call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"tz": "UTC"}
    assert final.usage.prompt_tokens == 312 and final.usage.completion_tokens == 25
    sent = up.requests[0].json()
    assert sent["stream"] is True and sent["system"] == "terse"


def test_openai_stream_from_anthropic_upstream_mid_stream_error_event_raises(harness):
    frames = [ant_event(e) for e in ant_stream_events(tool=False)[:4]]
    frames.append(ant_event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    up = harness.upstream(lambda req: _const(MockResponse(200, chunked(*frames), content_type="text/event-stream")))
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    stream = oa_client(url).chat.completions.create(model="anthropic:claude-x", stream=True,
                                                    messages=[{"role": "user", "content": "x"}])
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert "".join(got) == "Chec"
    assert "Overloaded" in str(e.value.message)


def test_openai_client_gets_anthropic_529_as_status_with_openai_envelope(harness):
    async def handler(req):
        return MockResponse(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                            headers=[("retry-after", "3")])
    up = harness.upstream(handler)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            oa_client(url).chat.completions.create(model="anthropic:claude-x", stream=stream,
                                                   messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 529
        assert e.value.body["type"] == "overloaded_error" and "Overloaded" in e.value.body["message"]
        assert e.value.response.headers["retry-after"] == "3"


async def _const(value):
    return value


# -- failures on translated Anthropic streams -------------------------------------------------


def test_translated_anthropic_stream_mid_stream_failure_ends_with_error_event(harness):
    async def handler(req):
        async def body():
            yield b"data: " + json.dumps(chat_chunks(["partial"])[0]).encode() + b"\n\n"
            yield b"data: " + json.dumps(chat_chunks(["partial"])[1]).encode() + b"\n\n"
            raise ConnectionResetError("upstream died")
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([oa_provider(up)])
    got = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with ant_client(url).messages.stream(model="oa:m", max_tokens=10,
                                             messages=[{"role": "user", "content": "x"}]) as stream:
            for text in stream.text_stream:
                got.append(text)
    assert got == ["partial"]
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"
    assert "oa" in e.value.body["error"]["message"]
    # on the wire: the last event is Anthropic's error event, nothing after it
    status, raw = raw_stream(url, {"model": "oa:m", "max_tokens": 10, "stream": True,
                                   "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(raw)
    assert status == 200
    assert events[0][0] == "message_start"
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    assert "message_stop" not in [n for n, _ in events]


def test_translated_streams_whose_upstream_ends_without_a_final_event_end_with_an_error_not_a_whole_answer(harness):
    # Each upstream ends its body cleanly, but before the event that says the answer is whole
    cut_chat = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chat_chunks(["Hel", "lo"])[:3]]
    oa_up = harness.upstream(lambda req: _const(MockResponse(200, chunked(*cut_chat),
                                                             content_type="text/event-stream")))
    cut_ant = [ant_event(e) for e in ant_stream_events(tool=False) if e["type"] != "message_stop"]
    ant_up = harness.upstream(lambda req: _const(MockResponse(200, chunked(*cut_ant),
                                                              content_type="text/event-stream")))
    url = harness.start([oa_provider(oa_up), ant_provider(ant_up)], environ=ANTH_ENV)
    status, raw = raw_stream(url, {"model": "oa:m", "max_tokens": 10, "stream": True,
                                   "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(raw)
    assert status == 200 and events[-1][0] == "error", events[-3:]
    assert "before the answer was complete" in events[-1][1]["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]
    stream = oa_client(url).chat.completions.create(model="anthropic:claude-x", stream=True,
                                                    messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "before the answer was complete" in str(e.value.message)


def test_translated_anthropic_upstream_error_before_stream_keeps_status_and_envelope(harness):
    async def handler(req):
        return MockResponse(429, {"error": {"message": "quota exceeded", "type": "rate_limit_error"}},
                            headers=[("retry-after", "9")])
    up = harness.upstream(handler)
    url = harness.start([oa_provider(up)])
    with pytest.raises(anthropic.RateLimitError) as e:
        with ant_client(url).messages.stream(model="oa:m", max_tokens=10,
                                             messages=[{"role": "user", "content": "x"}]) as stream:
            stream.get_final_message()
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "rate_limit_error"
    assert "quota exceeded" in e.value.body["error"]["message"]
    assert e.value.response.headers["retry-after"] == "9"

    async def server_error(req):
        return MockResponse(500, {"error": {"message": "boom"}})
    up.handler = server_error
    with pytest.raises(anthropic.InternalServerError) as e:
        ant_client(url).messages.create(model="oa:m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 500 and e.value.body["error"]["type"] == "api_error"

    async def out_of_credit(req):  # OpenRouter's answer when the account is empty
        return MockResponse(402, {"error": {"message": "Insufficient credits", "code": 402}})
    up.handler = out_of_credit
    with pytest.raises(anthropic.APIStatusError) as e:
        ant_client(url).messages.create(model="oa:m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 402 and e.value.body["error"]["type"] == "billing_error"  # WIRE §4.5


# -- bad input on /v1/messages ------------------------------------------------------------------


@pytest.mark.parametrize("raw,param", [
    (json.dumps({"model": "oa:m", "messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
    (json.dumps({"model": "oa:m", "max_tokens": 5}), "messages"),
    (json.dumps({"model": "oa:m", "max_tokens": "5", "messages": []}), "max_tokens"),
    (json.dumps({"max_tokens": 5, "messages": []}), "model"),
    ('{"model": "oa:m", "max_tokens": 5, "messages": [', "JSON"),
    ("[1, 2, 3]", "object"),
    ('"just a string"', "object"),
])
def test_bad_messages_request_is_400_in_anthropic_envelope(harness, raw, param):
    up = chat_upstream(harness, [chat_completion()])
    url = harness.start([oa_provider(up)])
    with httpx.Client(timeout=20) as c:
        for path in ("/v1/messages", "/v1/messages?beta=true"):
            r = c.post(url + path, content=raw.encode(), headers={"content-type": "application/json",
                                                                  "anthropic-version": "2023-06-01"})
            assert r.status_code == 400
            body = r.json()
            assert set(body) == {"type", "error"} and body["type"] == "error"
            assert body["error"]["type"] == "invalid_request_error"
            assert param in body["error"]["message"]
    assert up.requests == []


def test_bad_messages_request_via_sdk_raises_bad_request(harness):
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    with pytest.raises(anthropic.BadRequestError) as e:
        ant_client(url).messages.create(model="anthropic:claude-x", max_tokens=10,
                                        messages="not a list")  # type: ignore[arg-type]
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert up.requests == []


# -- gateway keys (Claude Code's ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN) -------------------------


def test_gateway_key_as_x_api_key_or_bearer_is_accepted_and_never_forwarded(harness, tmp_path):
    gateway_key = "evo-" + "ab" * 24
    keys = tmp_path / "auth.json"
    evo_gateway.write_keys_file(str(keys), {"keys": [{
        "name": "claude-code", "key_hash": hashlib.sha256(gateway_key.encode()).hexdigest(),
        "prefix": gateway_key[:12], "created_at": "2026-01-01T00:00:00.000000Z"}]})
    up = anthropic_upstream(harness)
    url = harness.start([ant_provider(up)], environ=ANTH_ENV)
    harness.gateway.auth = evo_gateway.KeyStore(str(keys))
    as_api_key = anthropic.Anthropic(base_url=url, api_key=gateway_key, max_retries=0, timeout=20)
    as_token = anthropic.Anthropic(base_url=url, auth_token=gateway_key, max_retries=0, timeout=20)
    for client in (as_api_key, as_token):
        msg = client.messages.create(model="anthropic:claude-x", max_tokens=10,
                                     messages=[{"role": "user", "content": "x"}])
        assert msg.content[0].text == "Checking."
    assert len(up.requests) == 2
    for req in up.requests:
        assert req.headers["x-api-key"] == "sk-test" and "authorization" not in req.headers
        assert gateway_key not in json.dumps(req.headers)
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=url, api_key="evo-wrong", max_retries=0, timeout=20).messages.create(
            model="anthropic:claude-x", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    assert len(up.requests) == 2


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", {"model": "an:claude", "input": "hi"}),
    ("/api/embed", {"model": "an:claude", "input": "hi"}),
    ("/api/embeddings", {"model": "an:claude", "prompt": "hi"}),
])
def test_embeddings_routed_to_an_anthropic_provider_are_400_naming_it(harness, path, body):
    up = anthropic_upstream(harness)
    url = harness.start([provider("an", up.url, provider_type="anthropic")])
    r = httpx.post(url + path, json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]  # Ollama's envelope is a string
    assert "provider 'an' (anthropic) has no embeddings endpoint" in message
    assert up.requests == []


def thinking_events() -> list[dict]:
    """A stream with a thinking block (two deltas and a signature) before the text."""
    events = ant_stream_events(tool=False)
    thinking = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}},
        {"type": "content_block_stop", "index": 0},
    ]
    for event in events:
        if "index" in event:
            event["index"] += 1
    return events[:1] + thinking + events[1:]


def test_claude_thinking_reaches_chat_clients_as_reasoning_content_and_codex_as_reasoning(harness):
    up = anthropic_upstream(harness, events=thinking_events(),
                            message=dict(ant_message(tool=False), content=[
                                {"type": "thinking", "thinking": "Let me think.", "signature": "c2ln"},
                                {"type": "text", "text": "Checking."}]))
    url = harness.start([provider("an", up.url, provider_type="anthropic")])
    c = oa_client(url)
    chunks = list(c.chat.completions.create(model="an:claude", messages=[{"role": "user", "content": "hi"}],
                                            reasoning_effort="low", stream=True))
    reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for ch in chunks if ch.choices)
    assert reasoning == "Let me think."
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Checking."
    whole = c.chat.completions.create(model="an:claude", messages=[{"role": "user", "content": "hi"}])
    assert whole.choices[0].message.model_extra["reasoning_content"] == "Let me think."
    with c.responses.stream(model="an:claude", input="hi", store=False) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in kinds
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "Let me think."
    assert final.output_text == "Checking."
