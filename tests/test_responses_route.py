"""`POST /v1/responses` end to end: the official openai client and a Codex-shaped request over
real sockets, through the gateway, to a Chat-only mock (bridged), a Responses-capable mock
(relayed byte for byte) and an Anthropic Messages mock (bridged twice).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pydantic
import pytest
from conftest import provider
from mock_upstream import MockResponse, chat_chunks, chat_completion, sse_body
from openai.types.responses import ResponseStreamEvent

import evo_gateway

# Strict validation of every streamed event against the SDK's own models (the SDK itself
# constructs events leniently, so a malformed frame would only show up later, in user code).
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
TERMINAL = ("response.completed", "response.failed", "response.incomplete")
PATCH = "*** Begin Patch\n*** Add File: README.md\n+# demo\n*** End Patch"


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="gateway-key", max_retries=0, timeout=20, **kw)


def sse_frames(raw: bytes) -> list[tuple[str, dict]]:
    """(event line, data object) for each event of a gateway SSE body (single-line data, LF)."""
    frames = []
    for block in raw.decode().split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        event = next((ln[len("event: "):] for ln in lines if ln.startswith("event: ")), "")
        data = "\n".join(ln[len("data: "):] for ln in lines if ln.startswith("data: "))
        frames.append((event, json.loads(data)))
    return frames


def check_responses_stream(frames: list[tuple[str, dict]]) -> dict:
    """Assert what the SDK and Codex rely on; return the terminal event's data."""
    assert frames, "empty stream"
    types = [data["type"] for _, data in frames]
    assert types[0] == "response.created"
    assert [t for t in types if t in TERMINAL] == [types[-1]], f"exactly one terminal event, last: {types}"
    assert [data["sequence_number"] for _, data in frames] == list(range(len(frames)))
    for event, data in frames:
        assert event == data["type"]
        STREAM_EVENT.validate_python(data)
    ids = {data["response"]["id"] for _, data in frames if "response" in data}
    assert len(ids) == 1, f"the response id changed within the stream: {ids}"
    return frames[-1][1]


def post_stream(url: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, bytes]:
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", url + "/v1/responses", json=body, headers=headers or {}) as r:
            return r, r.read()


def chat_tool_call_chunks(call_id: str, name: str, argument_pieces: list[str], model: str = "m") -> list[dict]:
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1735000000, "model": model}
    first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [first]},
                                "finish_reason": None}])]
    out += [dict(base, choices=[{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]},
                                 "finish_reason": None}]) for p in argument_pieces]
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    out.append(dict(base, choices=[], usage={"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}))
    return out


def recording_chat_mock(seen: list, answer):
    """A Chat-only upstream: records (path, body) and answers with `answer(body)`."""
    async def handler(req):
        body = req.json()
        seen.append((req.path, body, req.headers))
        if not req.path.endswith("/chat/completions"):
            return MockResponse(404, {"error": {"message": f"no route {req.path}", "type": "not_found"}})
        return answer(body)
    return handler


def text_answer(body: dict) -> MockResponse:
    if body.get("stream"):
        return MockResponse(200, sse_body(*chat_chunks(["Hel", "lo", "!"], model=body["model"])),
                            content_type="text/event-stream")
    return MockResponse(200, chat_completion("Hello!", model=body["model"]))


# -- bridged to a Chat-only upstream, through the official client ----------------------------


def test_sdk_responses_create_non_stream_bridged_to_chat_only_upstream(harness):
    seen: list = []
    up = harness.upstream(recording_chat_mock(seen, text_answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    r = client(url).responses.create(model="mock:gpt-test", instructions="Be brief.", input="hi")
    assert r.output_text == "Hello!"
    assert r.status == "completed"
    assert r.id.startswith("resp_")
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 2, 7)
    path, body, _ = seen[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "gpt-test"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert body.get("stream") is not True


def test_sdk_responses_stream_bridged_final_response_has_text_usage_and_id(harness):
    seen: list = []
    up = harness.upstream(recording_chat_mock(seen, text_answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    with client(url).responses.stream(model="mock:gpt-test", input="hi") as s:
        events = list(s)
        final = s.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["Hel", "lo", "!"]
    assert final.output_text == "Hello!"
    assert final.status == "completed"
    assert final.id.startswith("resp_") and final.id == events[0].response.id
    usage = final.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (5, 3, 8)
    assert all(type(v) is int for v in (usage.input_tokens, usage.output_tokens, usage.total_tokens))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    _, body, _ = seen[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_sdk_function_call_turn_then_function_call_output_turn_reach_chat_as_tool_messages(harness):
    seen: list = []

    def answer(body):
        if body["messages"][-1]["role"] == "tool":
            return text_answer(body)
        return MockResponse(200, sse_body(*chat_tool_call_chunks("call_w1", "get_weather",
                                                                  ['{"city":', ' "Paris"}'])),
                            content_type="text/event-stream")
    up = harness.upstream(recording_chat_mock(seen, answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    c = client(url)
    tools = [{"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": False,
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    history: list = [{"role": "user", "content": "Weather in Paris?"}]
    with c.responses.stream(model="mock:gpt-test", input=history, tools=tools) as s:
        first = s.get_final_response()
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_w1", "get_weather", {"city": "Paris"})
    assert first.usage.total_tokens == 49

    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"})
    second = c.responses.create(model="mock:gpt-test", input=history, tools=tools)
    assert second.output_text == "Hello!"

    _, body, _ = seen[1]
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21 C"},
    ]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "strict": False,
        "parameters": tools[0]["parameters"]}}]


# -- previous_response_id / store on the bridge ----------------------------------------------


@pytest.mark.parametrize("extra, param, hint", [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "send the full conversation in input"),
    ({"store": True}, "store", "send store: false"),
], ids=["previous_response_id", "store_true"])
def test_bridge_rejects_stateful_request_with_400_in_openai_envelope(harness, extra, param, hint):
    seen: list = []
    up = harness.upstream(recording_chat_mock(seen, text_answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    with pytest.raises(openai.BadRequestError) as e:
        client(url).responses.create(model="mock:gpt-test", input="hi", **extra)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"].startswith(param) and hint in err["message"]
    assert seen == []  # nothing reached the upstream


def test_bridge_accepts_store_false(harness):
    seen: list = []
    up = harness.upstream(recording_chat_mock(seen, text_answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    r = client(url).responses.create(model="mock:gpt-test", input="hi", store=False)
    assert r.output_text == "Hello!"
    assert "store" not in seen[0][1]


# -- passthrough to a Responses-capable upstream ---------------------------------------------


def responses_events(response_id: str = "resp_up1", text_pieces: tuple = ("Hi", " there")) -> list[dict]:
    """A small but complete upstream Responses stream, as OpenAI sends it."""
    resp = {"id": response_id, "object": "response", "created_at": 1735000000, "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": None, "model": "gpt-4.1",
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": 1.0,
            "top_p": 1.0, "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": None,
            "metadata": {}}
    text = "".join(text_pieces)
    item = {"id": "msg_up1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    done_item = dict(item, status="completed", content=[dict(part, text=text)])
    events = [{"type": "response.created", "response": resp},
              {"type": "response.in_progress", "response": resp},
              {"type": "response.output_item.added", "output_index": 0, "item": item},
              {"type": "response.content_part.added", "item_id": "msg_up1", "output_index": 0,
               "content_index": 0, "part": part}]
    events += [{"type": "response.output_text.delta", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
                "delta": p, "logprobs": []} for p in text_pieces]
    events += [{"type": "response.output_text.done", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
                "text": text, "logprobs": []},
               {"type": "response.content_part.done", "item_id": "msg_up1", "output_index": 0, "content_index": 0,
                "part": dict(part, text=text)},
               {"type": "response.output_item.done", "output_index": 0, "item": done_item},
               {"type": "response.completed", "response": dict(resp, status="completed", output=[done_item], usage={
                   "input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
                   "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13})}]
    return [dict(e, sequence_number=i) for i, e in enumerate(events)]


def responses_sse(events: list[dict]) -> list[bytes]:
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]


def test_passthrough_rewrites_only_model_and_relays_stream_byte_for_byte(harness):
    seen: list = []
    # Odd but valid framing (a comment, an id line, chunks that split events) must survive as-is.
    frames = responses_sse(responses_events())
    upstream_bytes = b": upstream comment\n\n" + b"id: 7\n" + b"".join(frames)
    cuts = [0, 5, 40, 41, 200, len(upstream_bytes) - 3, len(upstream_bytes)]
    pieces = [upstream_bytes[a:b] for a, b in zip(cuts, cuts[1:])]

    async def handler(req):
        seen.append((req.path, req.body))

        async def body():
            for p in pieces:
                yield p
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("oai", up.url + "/v1", responses_api=True)])
    request = {"model": "oai:gpt-4.1", "input": [{"role": "user", "content": "hi"}], "stream": True,
               "previous_response_id": "resp_earlier", "store": True, "include": ["reasoning.encrypted_content"],
               "tools": [{"type": "web_search"}], "metadata": {"k": "v"}}
    r, raw = post_stream(url, request)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert raw == upstream_bytes
    path, sent = seen[0]
    assert path == "/v1/responses"
    assert json.loads(sent) == dict(request, model="gpt-4.1")  # stateful fields pass: the upstream keeps state

    with client(url).responses.stream(model="oai:gpt-4.1", input="hi") as s:
        final = s.get_final_response()
    assert final.output_text == "Hi there"
    assert final.id == "resp_up1" and final.usage.total_tokens == 13


async def _json_answer(obj: dict) -> MockResponse:
    return MockResponse(200, obj)


def test_passthrough_non_stream_relays_upstream_json(harness):
    completed = responses_events()[-1]["response"]
    up = harness.upstream(lambda req: _json_answer(completed))
    url = harness.start([provider("oai", up.url + "/v1", responses_api=True)])
    r = client(url).responses.create(model="oai:gpt-4.1", input="hi")
    assert (r.id, r.output_text, r.usage.total_tokens) == ("resp_up1", "Hi there", 13)
    assert up.requests[0].path == "/v1/responses" and up.requests[0].json()["model"] == "gpt-4.1"


@pytest.mark.parametrize("stream", [False, True], ids=["non_stream", "stream"])
def test_bridge_upstream_429_before_the_stream_is_an_http_429(harness, stream):
    async def handler(req):
        return MockResponse(429, {"error": {"message": "slow down", "type": "rate_limit_error"}},
                            headers=[("retry-after", "3")])
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url + "/v1")])
    with pytest.raises(openai.RateLimitError) as e:
        if stream:
            with client(url).responses.stream(model="mock:m", input="hi") as s:
                list(s)
        else:
            client(url).responses.create(model="mock:m", input="hi")
    assert e.value.response.headers["retry-after"] == "3"
    assert "slow down" in e.value.message


def test_bridge_keeps_the_upstreams_error_code_which_codex_acts_on(harness):
    async def handler(req):
        return MockResponse(400, {"error": {"message": "This model's maximum context length is 8192 tokens.",
                                            "type": "invalid_request_error", "param": "messages",
                                            "code": "context_length_exceeded"}})
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url + "/v1")])
    with pytest.raises(openai.BadRequestError) as e:
        client(url).responses.create(model="mock:m", input="hi")
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")
    assert "maximum context length" in e.value.message


# -- a Codex-shaped request --------------------------------------------------------------------

SHELL_TOOL = {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
              "strict": False, "parameters": {"type": "object", "properties": {
                  "command": {"type": "array", "items": {"type": "string"}},
                  "workdir": {"type": "string"}}, "required": ["command"], "additionalProperties": False}}
APPLY_PATCH_TOOL = {"type": "custom", "name": "apply_patch",
                    "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool.",
                    "format": {"type": "grammar", "syntax": "lark",
                               "definition": 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF'}}
NAMESPACE_TOOL = {"type": "namespace", "name": "mcp__fs", "description": "Tools of the MCP server fs.",
                  "tools": [{"type": "function", "name": "read_file", "description": "Read a file.",
                             "strict": False, "parameters": {"type": "object", "properties": {
                                 "path": {"type": "string"}}, "required": ["path"]}}]}


def codex_body(model: str) -> dict:
    """What Codex 0.169 sends (WIRE §9): no instructions, developer item first, ids on items."""
    return {
        "model": model,
        "input": [
            {"type": "message", "id": "msg_d0", "role": "developer", "content": [
                {"type": "input_text", "text": "<permissions instructions>workspace-write</permissions instructions>"}]},
            {"type": "message", "id": "msg_u0", "role": "user", "content": [
                {"type": "input_text", "text": "<environment_context><cwd>/w</cwd></environment_context>"}]},
            {"type": "message", "id": "msg_u1", "role": "user", "content": [
                {"type": "input_text", "text": "add a README"}]},
            {"type": "reasoning", "id": "rs_0", "summary": [], "encrypted_content": "opaque"},
            {"type": "function_call", "id": "fc_0", "call_id": "call_ls", "name": "shell",
             "arguments": "{\"command\":[\"ls\"]}"},
            {"type": "function_call_output", "id": "fco_0", "call_id": "call_ls", "output": "main.py\n"},
        ],
        "tools": [SHELL_TOOL, APPLY_PATCH_TOOL, NAMESPACE_TOOL, {"type": "web_search", "external_web_access": False}],
        "tool_choice": "auto", "parallel_tool_calls": True, "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False, "stream": True, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
        "text": {"verbosity": "medium"}, "client_metadata": {"x-codex-turn": "1"},
    }


CODEX_HEADERS = {"authorization": "Bearer gateway-key", "accept": "text/event-stream", "originator": "codex_cli_rs",
                 "session-id": "sess-1", "thread-id": "thread-1", "x-codex-turn-metadata": "{}"}


def apply_patch_answer(body: dict) -> MockResponse:
    arguments = json.dumps({"input": PATCH})
    pieces = [arguments[:7], arguments[7:30], arguments[30:]]
    chunks = chat_chunks(["I'll add it."], usage=False)[:-1]  # text, then the tool call
    chunks += chat_tool_call_chunks("call_p1", "apply_patch", pieces)
    return MockResponse(200, sse_body(*chunks), content_type="text/event-stream")


def check_codex_chat_request(body: dict) -> None:
    names = [t["function"]["name"] for t in body["tools"]]
    assert names == ["shell", "apply_patch", "mcp__fs__read_file"]  # web_search dropped
    patch_tool = body["tools"][1]["function"]
    assert patch_tool["parameters"]["properties"]["input"]["type"] == "string"
    assert patch_tool["parameters"]["required"] == ["input"]
    assert "begin_patch" in patch_tool["parameters"]["properties"]["input"]["description"]
    assert body["tools"][2]["function"]["parameters"] == NAMESPACE_TOOL["tools"][0]["parameters"]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert body["reasoning_effort"] == "medium"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "user", "assistant", "tool"]
    assert "workspace-write" in body["messages"][0]["content"]
    assert body["messages"][3]["tool_calls"][0]["id"] == "call_ls"
    assert body["messages"][4] == {"role": "tool", "tool_call_id": "call_ls", "content": "main.py\n"}
    for field in ("store", "include", "prompt_cache_key", "client_metadata", "text", "input", "instructions"):
        assert field not in body


def test_codex_request_over_wire_gets_chat_tools_and_custom_tool_call_item(harness):
    seen: list = []
    up = harness.upstream(recording_chat_mock(seen, apply_patch_answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    r, raw = post_stream(url, codex_body("mock:gpt-5-codex"), CODEX_HEADERS)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    check_codex_chat_request(seen[0][1])
    assert "authorization" not in seen[0][2]  # the client's gateway key stays at the gateway
    frames = sse_frames(raw)
    completed = check_responses_stream(frames)
    assert completed["type"] == "response.completed"
    done_items = [d["item"] for _, d in frames if d["type"] == "response.output_item.done"]
    assert [i["type"] for i in done_items] == ["message", "custom_tool_call"]
    assert done_items[0]["content"][0]["text"] == "I'll add it."
    patch_call = done_items[1]
    assert (patch_call["call_id"], patch_call["name"], patch_call["input"]) == ("call_p1", "apply_patch", PATCH)
    # Codex parses response.completed strictly: an id and integer usage fields.
    usage = completed["response"]["usage"]
    assert completed["response"]["id"].startswith("resp_")
    assert all(type(usage[k]) is int for k in ("input_tokens", "output_tokens", "total_tokens"))
    assert completed["response"]["output"] == done_items


def test_codex_request_custom_tool_call_parsed_by_sdk_stream_accumulator(harness):
    seen: list = []
    up = harness.upstream(recording_chat_mock(seen, apply_patch_answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    body = codex_body("mock:gpt-5-codex")
    del body["stream"]
    extra = {k: body.pop(k) for k in ("client_metadata", "prompt_cache_key")}
    with client(url).responses.stream(**body, extra_body=extra, extra_headers=CODEX_HEADERS) as s:
        events = list(s)
        final = s.get_final_response()
    check_codex_chat_request(seen[0][1])
    assert final.output_text == "I'll add it."
    calls = [item for item in final.output if item.type == "custom_tool_call"]
    assert [(c.call_id, c.name, c.input) for c in calls] == [("call_p1", "apply_patch", PATCH)]
    assert "response.custom_tool_call_input.done" in [e.type for e in events]


def test_namespaced_tool_call_comes_back_with_its_namespace(harness):
    def answer(body):
        chunks = chat_tool_call_chunks("call_r1", "mcp__fs__read_file", ['{"path": "main.py"}'])
        return MockResponse(200, sse_body(*chunks), content_type="text/event-stream")
    up = harness.upstream(recording_chat_mock([], answer))
    url = harness.start([provider("mock", up.url + "/v1")])
    _, raw = post_stream(url, codex_body("mock:gpt-5-codex"), CODEX_HEADERS)
    frames = sse_frames(raw)
    check_responses_stream(frames)
    item = next(d["item"] for _, d in frames if d["type"] == "response.output_item.done")
    assert (item["type"], item["namespace"], item["name"], item["call_id"]) == \
        ("function_call", "mcp__fs", "read_file", "call_r1")


# -- failures mid-stream: the stream always ends with response.completed or response.failed ---


def _chunk_line(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _reset_after_text():
    yield _chunk_line(chat_chunks(["partial"])[0]) + _chunk_line(chat_chunks(["partial"])[1])
    raise ConnectionResetError("upstream died")


async def _not_json_after_text():
    yield _chunk_line(chat_chunks(["partial"])[1])
    yield b"data: {not json\n\n"


async def _error_event_after_text():
    yield _chunk_line(chat_chunks(["partial"])[1])
    yield b'data: {"error": {"message": "model overloaded", "type": "server_error"}}\n\n'


async def _reset_before_any_chunk():
    yield b": opening\n\n"
    raise ConnectionResetError("upstream died")


@pytest.mark.parametrize("body", [_reset_after_text, _not_json_after_text, _error_event_after_text,
                                  _reset_before_any_chunk],
                         ids=["reset_after_text", "event_not_json", "error_event", "reset_before_first_chunk"])
def test_bridge_stream_upstream_failure_ends_with_response_failed(harness, body):
    async def handler(req):
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url + "/v1")])
    r, raw = post_stream(url, {"model": "mock:m", "input": "hi", "stream": True})
    assert r.status_code == 200
    failed = check_responses_stream(sse_frames(raw))
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error" and failed["response"]["error"]["message"]

    with client(url).responses.stream(model="mock:m", input="hi") as s:
        events = list(s)
    assert events[-1].type == "response.failed"
    assert events[-1].response.id == events[0].response.id


def test_bridge_stream_cut_without_finish_or_done_ends_with_response_failed_not_a_whole_answer(harness):
    async def handler(req):
        async def body():
            for c in chat_chunks(["Hel", "lo"])[:3]:  # no finish_reason, no usage, no [DONE]
                yield _chunk_line(c)
        return MockResponse(200, body(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("mock", up.url + "/v1")])
    _, raw = post_stream(url, {"model": "mock:m", "input": "hi", "stream": True})
    failed = check_responses_stream(sse_frames(raw))
    assert failed["type"] == "response.failed", failed  # WIRE §2.5: a disconnect is response.failed
    assert "before the answer was complete" in failed["response"]["error"]["message"]


def _passthrough_died_mid_event():
    frames = responses_sse(responses_events())
    async def body():
        yield b"".join(frames[:5])
        yield frames[5][:25]  # half of the next event, then the connection drops
        raise ConnectionResetError("upstream died")
    return body


def _passthrough_died_at_boundary():
    frames = responses_sse(responses_events())
    async def body():
        yield b"".join(frames[:5])
        raise ConnectionResetError("upstream died")
    return body


def _passthrough_ended_without_terminal():
    frames = responses_sse(responses_events())
    async def body():
        yield b"".join(frames[:-1])  # a clean end of body, but no response.completed
    return body


def _passthrough_died_before_any_event():
    async def body():
        yield b": hello\n\n"
        raise ConnectionResetError("upstream died")
    return body


@pytest.mark.parametrize("make_body", [_passthrough_died_mid_event, _passthrough_died_at_boundary,
                                       _passthrough_ended_without_terminal, _passthrough_died_before_any_event],
                         ids=["mid_event", "at_event_boundary", "clean_end_without_terminal", "before_any_event"])
def test_passthrough_stream_upstream_dies_ends_with_valid_response_failed(harness, make_body):
    async def handler(req):
        return MockResponse(200, make_body()(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("oai", up.url + "/v1", responses_api=True)])
    r, raw = post_stream(url, {"model": "oai:gpt-4.1", "input": "hi", "stream": True})
    assert r.status_code == 200
    frames = sse_frames(raw)
    failed = check_responses_stream(frames)
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["message"]
    if len(frames) > 2:  # the upstream's own response.created came through: its id is kept
        assert failed["response"]["id"] == "resp_up1"

    with client(url).responses.stream(model="oai:gpt-4.1", input="hi") as s:
        events = list(s)
        with pytest.raises(RuntimeError, match="response.completed"):
            s.get_final_response()
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.message == failed["response"]["error"]["message"]


# -- the passthrough watcher on its own --------------------------------------------------------


def test_responses_relay_at_every_split_point_relays_whole_events_unchanged():
    import evo_gateway
    stream = b": c\n\n" + b"".join(responses_sse(responses_events()))
    stream_crlf = stream.replace(b"\n", b"\r\n")
    for data in (stream, stream_crlf):
        sep = b"\r\n\r\n" if data is stream_crlf else b"\n\n"
        for cut in range(1, len(data)):
            relay = evo_gateway.ResponsesRelay("m")
            out = [relay.feed(data[:cut]), relay.feed(data[cut:])]
            assert b"".join(out) + relay.held() == data
            assert all(not piece or piece.endswith(sep) for piece in out)
            assert relay.is_finished
    byte_by_byte = evo_gateway.ResponsesRelay("m")
    assert b"".join(byte_by_byte.feed(stream[i:i + 1]) for i in range(len(stream))) == stream


def test_responses_relay_passes_an_event_nested_past_the_parsers_depth_without_failing():
    import evo_gateway
    relay = evo_gateway.ResponsesRelay("m")
    deep = b"data: " + b"[" * 100000 + b"]" * 100000 + b"\n\n"
    assert relay.feed(deep) == deep and not relay.is_finished  # relayed as it is; the end is still owed


def test_responses_relay_failed_frames_continue_the_relayed_response():
    import evo_gateway
    frames = responses_sse(responses_events())
    relay = evo_gateway.ResponsesRelay("gpt-4.1")
    relayed = relay.feed(b"".join(frames[:-2]) + frames[-2][:10])  # up to output_text.done + a fragment
    assert not relay.is_finished
    tail = relay.failed_frames("upstream died")
    parsed = sse_frames(relayed + tail)
    failed = check_responses_stream(parsed)
    assert failed["response"]["id"] == "resp_up1"
    assert failed["response"]["output"] == []  # no item was finished
    assert failed["sequence_number"] == 8 and failed["response"]["error"]["message"] == "upstream died"

    fresh = evo_gateway.ResponsesRelay("gpt-4.1")
    parsed = sse_frames(fresh.failed_frames("refused"))
    assert [d["type"] for _, d in parsed] == ["response.created", "response.failed"]
    assert check_responses_stream(parsed)["response"]["model"] == "gpt-4.1"


# -- Responses to an Anthropic provider: bridged twice ----------------------------------------


def anthropic_sse(*events: dict) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def anthropic_patch_answer() -> bytes:
    patch_json = json.dumps({"input": PATCH})
    return anthropic_sse(
        {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 120, "output_tokens": 1, "cache_read_input_tokens": 20}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "A README."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "I'll add it."}},
        {"type": "content_block_stop", "index": 1},
        {"type": "ping"},
        {"type": "content_block_start", "index": 2, "content_block": {
            "type": "tool_use", "id": "toolu_01", "name": "apply_patch", "input": {}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta",
                                                              "partial_json": patch_json[:12]}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta",
                                                              "partial_json": patch_json[12:]}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 42}},
        {"type": "message_stop"},
    )


def anthropic_rule_violation(body: dict) -> str | None:
    """The Anthropic check a thinking + tool-use loop trips (a 400 on the real API)."""
    if body.get("thinking", {}).get("type") != "enabled":
        return None
    last = next((m for m in reversed(body["messages"]) if m["role"] == "assistant"), None)
    if last and any(b["type"] == "tool_use" for b in last["content"]) and last["content"][0]["type"] != "thinking":
        return ("messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`. "
                "When `thinking` is enabled, a final `assistant` message must start with a thinking block")
    return None


def test_codex_turns_to_anthropic_provider_bridged_twice(harness):
    seen: list = []

    async def handler(req):
        body = req.json()
        seen.append((req.path, body, req.headers))
        problem = anthropic_rule_violation(body)
        if problem:
            return MockResponse(400, {"type": "error", "error": {"type": "invalid_request_error", "message": problem}})
        return MockResponse(200, anthropic_patch_answer(), content_type="text/event-stream")
    up = harness.upstream(handler)
    url = harness.start([provider("anthropic", up.url + "/v1", provider_type="anthropic",
                                  api_key_envs=["ANTHROPIC_KEY"])], environ={"ANTHROPIC_KEY": "sk-ant-test"})
    first = codex_body("anthropic:claude-x")
    first["input"] = first["input"][:3]  # developer, environment, user: the opening request of a turn
    r, raw = post_stream(url, first, CODEX_HEADERS)
    assert r.status_code == 200

    path, body, headers = seen[0]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == "sk-ant-test" and "authorization" not in headers
    assert body["model"] == "claude-x" and body["stream"] is True
    assert body["thinking"]["type"] == "enabled"  # reasoning.effort medium
    assert body["max_tokens"] > body["thinking"]["budget_tokens"]
    assert "workspace-write" in body["system"]
    assert [t["name"] for t in body["tools"]] == ["shell", "apply_patch", "mcp__fs__read_file"]
    assert body["tools"][1]["input_schema"]["required"] == ["input"]
    assert [m["role"] for m in body["messages"]] == ["user"]

    frames = sse_frames(raw)
    completed = check_responses_stream(frames)
    assert completed["type"] == "response.completed"
    items = completed["response"]["output"]
    assert [i["type"] for i in items] == ["reasoning", "message", "custom_tool_call"]  # thinking shown as reasoning
    assert items[0]["summary"][0]["text"] == "A README."
    assert items[1]["content"][0]["text"] == "I'll add it."
    assert (items[2]["call_id"], items[2]["name"], items[2]["input"]) == ("toolu_01", "apply_patch", PATCH)
    usage = completed["response"]["usage"]
    assert usage["output_tokens"] == 42 and usage["input_tokens"] >= 120
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    # The next request of the tool loop: the call and its output go back, with the Anthropic id.
    follow = dict(first, input=first["input"] + items + [
        {"type": "custom_tool_call_output", "id": "ctco_1", "call_id": "toolu_01", "output": "Done!"}])
    r, raw = post_stream(url, follow, CODEX_HEADERS)
    assert r.status_code == 200, raw
    assert check_responses_stream(sse_frames(raw))["type"] == "response.completed"
    _, body2, _ = seen[1]
    assert "thinking" not in body2  # chat history cannot carry the signed thinking block Anthropic wants
    assert [m["role"] for m in body2["messages"]] == ["user", "assistant", "user"]
    text, tool_use = body2["messages"][1]["content"]
    assert text == {"type": "text", "text": "I'll add it."}
    assert (tool_use["id"], tool_use["name"], tool_use["input"]) == ("toolu_01", "apply_patch", {"input": PATCH})
    assert body2["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "Done!"}]


def test_sdk_responses_create_non_stream_to_anthropic_provider(harness):
    async def handler(req):
        return MockResponse(200, {"id": "msg_02", "type": "message", "role": "assistant", "model": "claude-x",
                                  "content": [{"type": "text", "text": "Bonjour"}], "stop_reason": "end_turn",
                                  "stop_sequence": None, "usage": {"input_tokens": 9, "output_tokens": 3}})
    up = harness.upstream(handler)
    url = harness.start([provider("anthropic", up.url + "/v1", provider_type="anthropic")])
    r = client(url).responses.create(model="anthropic:claude-x", instructions="French only.", input="hello")
    assert r.output_text == "Bonjour"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (9, 3, 12)


def waiting_model(gate, answer: bytes = b""):
    """A chat upstream that says nothing at all until `gate` is set (a model still loading), then `answer`."""
    async def handler(req):
        async def body():
            await gate.wait()
            yield answer
        return MockResponse(200, body(), content_type="text/event-stream")
    return handler


def read_responses_stream(url: str, stop) -> bytes:
    """POST a bridged streaming request and read until `stop(bytes so far)` is true or the stream ends."""
    buffer = b""
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", url + "/v1/responses",
                      json={"model": "mock:m", "input": "hi", "stream": True, "store": False}) as r:
            for piece in r.iter_raw():
                buffer += piece
                if stop(buffer):
                    break
    return buffer


def test_bridged_stream_of_a_quiet_upstream_gets_in_progress_events_codex_idle_timers_count(harness, monkeypatch):
    monkeypatch.setattr(evo_gateway, "SSE_KEEPALIVE_S", 0.2)
    gate = harness.gate()
    up = harness.upstream(waiting_model(gate, sse_body(*chat_chunks(["Hel", "lo!"], model="m"))))
    url = harness.start([provider("mock", up.url + "/v1")])

    def release_after_three_in_progress(buffer: bytes) -> bool:
        if buffer.count(b"event: response.in_progress") >= 3 and not gate.is_set():
            gate.set()  # the opening one and two for the silence
        return False
    frames = sse_frames(read_responses_stream(url, release_after_three_in_progress))
    completed = check_responses_stream(frames)
    types = [data["type"] for _, data in frames]
    assert types[:4] == ["response.created", "response.in_progress", "response.in_progress",
                         "response.in_progress"]
    assert completed["type"] == "response.completed"
    assert completed["response"]["output"][0]["content"][0]["text"] == "Hello!"


def test_client_leaving_a_quiet_bridged_stream_closes_the_upstream_connection_at_once(harness, monkeypatch):
    monkeypatch.setattr(evo_gateway, "SSE_KEEPALIVE_S", 0.2)
    up = harness.upstream(waiting_model(harness.gate()))  # never released
    url = harness.start([provider("mock", up.url + "/v1")])
    read_responses_stream(url, lambda buffer: buffer.count(b"event: response.in_progress") >= 2)  # leave mid-silence
    deadline = time.monotonic() + 5
    while up.connections_closed < up.connections_opened and time.monotonic() < deadline:
        time.sleep(0.02)
    assert up.connections_opened == 1 and up.connections_closed == 1
