"""Responses API ⇄ Chat Completions bridge (providers/translate.py, section `Responses ⇄ Chat`).

Golden fixtures live in tests/data/responses/; generated ids and timestamps are normalised
before comparing. Regenerate goldens with UPDATE_GOLDEN=1 (then review the diff).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from providers.translate import (
    ChatToResponsesStream,
    InvalidRequest,
    ResponsesToolMap,
    chat_to_responses_response,
    responses_to_chat_request,
    tool_map_for,
)

DATA = Path(__file__).parent / "data" / "responses"

try:  # the SDK is a test-only dependency; its models are the schema we validate against
    import pydantic
    from openai.types.responses import (
        Response,
        ResponseCompletedEvent,
        ResponseFailedEvent,
        ResponseStreamEvent,
    )

    STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
except ImportError:  # pragma: no cover
    Response = ResponseCompletedEvent = ResponseFailedEvent = STREAM_EVENT = None

needs_sdk = pytest.mark.skipif(Response is None, reason="openai SDK not installed")


# -- helpers ---------------------------------------------------------------------------------

def load(name: str):
    return json.loads((DATA / name).read_text())


def golden(name: str, actual) -> None:
    path = DATA / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n")
    assert actual == json.loads(path.read_text())


_GENERATED = re.compile(r"^(resp|msg|fc|ctc|rs|call)_[0-9a-f]{24}$")


def normalise(obj):
    """Replace generated ids by <prefix-N> in order of first appearance and zero timestamps."""
    seen: dict[str, str] = {}

    def walk(value, key=None):
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if key == "created_at" and isinstance(value, int):
            return 0
        if isinstance(value, str) and _GENERATED.match(value):
            if value not in seen:
                prefix = value.split("_", 1)[0]
                seen[value] = f"<{prefix}-{sum(1 for s in seen.values() if s.startswith('<' + prefix + '-'))}>"
            return seen[value]
        return value

    return walk(obj)


def parse_frames(frames: list[bytes]) -> list[dict]:
    """Decode SSE frames, checking the framing and that `event:` equals the data's `type`."""
    events = []
    for frame in frames:
        assert frame.endswith(b"\n\n")
        lines = frame.decode().rstrip("\n").split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: ")
        data = json.loads(lines[1][len("data: "):])
        assert data["type"] == lines[0][len("event: "):]
        events.append(data)
    return events


def chunk(delta=None, finish=None, usage=None, choices=True):
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1735000001, "model": "m", "usage": usage}
    body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    return body


def run_stream(request: dict, chunks: list[dict]) -> list[dict]:
    translator = ChatToResponsesStream(request)
    frames: list[bytes] = []
    for c in chunks:
        frames.extend(translator.feed(c))
    frames.extend(translator.finish())
    return parse_frames(frames)


def check_stream_invariants(events: list[dict]) -> None:
    seqs = [e["sequence_number"] for e in events]
    assert seqs == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[1]["type"] == "response.in_progress"
    assert events[-1]["type"] in ("response.completed", "response.failed")
    assert sum(e["type"] in ("response.completed", "response.failed") for e in events) == 1
    # One item open at a time: every added item is done before the next is added.
    open_index = None
    for e in events:
        if e["type"] == "response.output_item.added":
            assert open_index is None
            open_index = e["output_index"]
        elif e["type"] == "response.output_item.done":
            assert e["output_index"] == open_index
            open_index = None
        elif "output_index" in e:
            assert e["output_index"] == open_index
    # A failed stream may stop with an item still open; a completed one never does.
    assert open_index is None or events[-1]["type"] == "response.failed"
    if STREAM_EVENT is not None:
        for e in events:
            STREAM_EVENT.validate_python(e)


def codex_request(**overrides) -> dict:
    body = load("codex_request.json")
    body.update(overrides)
    return body


# -- request: Responses → Chat ----------------------------------------------------------------

def test_codex_request_golden():
    golden("codex_chat.json", responses_to_chat_request(load("codex_request.json")))


def test_codex_request_details():
    chat = responses_to_chat_request(load("codex_request.json"))
    roles = [m["role"] for m in chat["messages"]]
    assert roles[0] == "system"  # developer → system, kept first
    assert "developer" not in roles
    names = [t["function"]["name"] for t in chat["tools"]]
    assert names == ["shell_command", "update_plan", "apply_patch", "mcp__unity__read_console",
                     "mcp__unity__refresh_unity"]  # web_search dropped
    for forbidden in ("store", "include", "prompt_cache_key", "client_metadata", "text", "input", "reasoning"):
        assert forbidden not in chat
    patch_call = next(m for m in chat["messages"] if m.get("tool_calls")
                      and m["tool_calls"][0]["function"]["name"] == "apply_patch")
    assert json.loads(patch_call["tool_calls"][0]["function"]["arguments"])["input"].startswith("*** Begin Patch")


def test_string_input_and_instructions():
    chat = responses_to_chat_request({"model": "m", "instructions": "be terse", "input": "hi"})
    assert chat == {"model": "m", "messages": [{"role": "system", "content": "be terse"},
                                               {"role": "user", "content": "hi"}]}


def test_role_only_items_and_parts():
    chat = responses_to_chat_request({"model": "m", "input": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
                                     {"type": "input_image", "file_id": "file-1"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}, {"type": "refusal", "refusal": "no"}]},
        {"type": "mystery_item", "foo": 1},
    ]})
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": "ok\nno"},
    ]


def test_consecutive_calls_merge_and_tool_output_images():
    chat = responses_to_chat_request({"model": "m", "tools": [{"type": "function", "name": "f"}], "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "shot"},
                    {"type": "input_image", "image_url": "data:image/png;base64,BB"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "done"},
        {"type": "function_call_output", "call_id": "ghost", "output": "orphan"},
    ]})
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "shot"},
        {"role": "tool", "tool_call_id": "c2", "content": "done"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,BB"}}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}}}}]


def test_previous_response_id_rejected():
    with pytest.raises(InvalidRequest) as exc:
        responses_to_chat_request(codex_request(previous_response_id="resp_123"))
    assert exc.value.param == "previous_response_id"
    assert "send the full conversation in input" in str(exc.value)
    responses_to_chat_request(codex_request(previous_response_id=None))  # explicit null is fine


def test_store_true_rejected_false_and_absent_pass():
    with pytest.raises(InvalidRequest) as exc:
        responses_to_chat_request(codex_request(store=True))
    assert exc.value.param == "store" and "store: false" in str(exc.value)
    responses_to_chat_request(codex_request(store=False))
    body = codex_request()
    del body["store"]
    responses_to_chat_request(body)


@pytest.mark.parametrize("body", [{"model": "m"}, {"model": "m", "input": None}, {"model": "m", "input": 3},
                                  {"model": "m", "input": ["not an item"]},
                                  {"model": "m", "input": [{"role": "wizard", "content": "x"}]}])
def test_bad_input_rejected(body):
    with pytest.raises(InvalidRequest):
        responses_to_chat_request(body)


def test_knobs():
    chat = responses_to_chat_request({
        "model": "m", "input": "x", "max_output_tokens": 99, "temperature": 0.2, "top_p": 0.9,
        "text": {"format": {"type": "json_schema", "name": "out", "strict": True,
                            "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}},
        "reasoning": {"effort": "low"}, "truncation": "auto", "metadata": {"k": "v"}, "stream": False})
    assert chat["max_tokens"] == 99 and chat["temperature"] == 0.2 and chat["top_p"] == 0.9
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}, "strict": True}}
    assert chat["reasoning_effort"] == "low"
    for key in ("stream", "stream_options", "truncation", "metadata", "tools", "tool_choice", "parallel_tool_calls"):
        assert key not in chat
    assert responses_to_chat_request({"input": "x", "text": {"format": {"type": "json_object"}}})[
        "response_format"] == {"type": "json_object"}
    assert "response_format" not in responses_to_chat_request({"input": "x", "text": {"format": {"type": "text"}}})


def test_tool_choice_mapping():
    base = load("codex_request.json")
    cases = [
        ("required", "required"),
        ("none", "none"),
        ({"type": "function", "name": "shell_command"}, {"type": "function", "function": {"name": "shell_command"}}),
        ({"type": "custom", "name": "apply_patch"}, {"type": "function", "function": {"name": "apply_patch"}}),
        ({"type": "function", "name": "read_console"},
         {"type": "function", "function": {"name": "mcp__unity__read_console"}}),
        ({"type": "allowed_tools", "mode": "required", "tools": []}, "required"),
        ({"type": "web_search"}, None),
        ({"type": "function", "name": "not_there"}, None),
    ]
    for choice, expected in cases:
        chat = responses_to_chat_request(dict(base, tool_choice=choice))
        assert chat.get("tool_choice") == expected, choice


def test_only_builtin_tools_are_dropped_with_choice():
    chat = responses_to_chat_request({"input": "x", "tools": [{"type": "web_search"}, {"type": "local_shell"},
                                                               {"type": "image_generation"},
                                                               {"type": "file_search", "vector_store_ids": []}],
                                      "tool_choice": "auto", "parallel_tool_calls": False})
    assert "tools" not in chat and "tool_choice" not in chat and "parallel_tool_calls" not in chat


def test_custom_text_format_and_namespace_custom_member():
    body = {"input": "x", "tools": [
        {"type": "custom", "name": "note", "format": {"type": "text"}},
        {"type": "namespace", "name": "ns", "description": "d",
         "tools": [{"type": "custom", "name": "raw", "description": "raw tool"}]}]}
    tools = responses_to_chat_request(body)["tools"]
    assert tools[0]["function"]["parameters"] == {
        "type": "object", "properties": {"input": {"type": "string", "description": "Raw free-form input text."}},
        "required": ["input"]}
    assert tools[1]["function"]["name"] == "ns__raw"
    assert tool_map_for(body).lookup("ns__raw") == ("custom", "raw", "ns")


def test_tool_map_sanitises_and_reverses():
    long_ns = "mcp__" + "very_long_server_name_" * 3
    tmap = ResponsesToolMap()
    a = tmap.add("read.file", "function", long_ns)
    b = tmap.add("read_file", "function", long_ns)
    for chat_name in (a, b):
        assert re.match(r"^[a-zA-Z0-9_-]{1,64}$", chat_name)
    assert a != b
    assert tmap.lookup(a) == ("function", "read.file", long_ns)
    assert tmap.lookup(b) == ("function", "read_file", long_ns)
    assert tmap.lookup("unknown") == ("function", "unknown", None)
    assert tmap.chat_name("read.file", long_ns) == a


# -- response: Chat → Responses ---------------------------------------------------------------

def test_chat_response_golden():
    response = chat_to_responses_response(load("chat_response_tools.json"), load("codex_request.json"))
    golden("responses_response_tools.json", normalise(response))


@needs_sdk
def test_chat_response_items_and_sdk_validation():
    response = chat_to_responses_response(load("chat_response_tools.json"), load("codex_request.json"))
    Response.model_validate(response)
    assert response["id"].startswith("resp_") and isinstance(response["created_at"], int)
    types = [item["type"] for item in response["output"]]
    assert types == ["reasoning", "message", "custom_tool_call", "function_call", "function_call"]
    custom, namespaced, plain = response["output"][2:]
    assert custom["name"] == "apply_patch" and custom["call_id"] == "call_a1"
    assert custom["input"].startswith("*** Begin Patch\n") and custom["input"].endswith("*** End Patch\n")
    assert namespaced["name"] == "read_console" and namespaced["namespace"] == "mcp__unity"
    assert "namespace" not in plain and plain["arguments"] == "{\"command\":\"pytest -q\"}"
    assert response["usage"] == {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
                                 "output_tokens": 80, "output_tokens_details": {"reasoning_tokens": 12},
                                 "total_tokens": 1280}


@needs_sdk
def test_chat_response_length_is_incomplete_and_usage_defaults():
    resp = {"id": "x", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "trunc"}}]}
    response = chat_to_responses_response(resp, {"model": "m", "input": "x"})
    Response.model_validate(response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"] == {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                 "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 0}
    assert response["output"][0]["content"][0] == {"type": "output_text", "text": "trunc", "annotations": []}


def test_custom_input_unwrapping_tolerates_bad_json():
    request = {"input": "x", "tools": [{"type": "custom", "name": "apply_patch"}]}
    for args, expected in [("{\"input\":\"P\"}", "P"), ("{\"patch\":\"Q\"}", "Q"), ("*** raw", "*** raw")]:
        resp = {"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                "tool_calls": [{"id": "k", "type": "function",
                                "function": {"name": "apply_patch", "arguments": args}}]}}]}
        item = chat_to_responses_response(resp, request)["output"][0]
        assert item["type"] == "custom_tool_call" and item["input"] == expected


# -- stream: Chat chunks → Responses events ----------------------------------------------------

PATCH_ARGS = json.dumps({"input": "*** Begin Patch\n*** Update File: README.md\n@@\n-teh\n+the\n*** End Patch\n"})
SHELL_ARGS = "{\"command\":\"pytest -q\",\"workdir\":\"/repo\"}"


def tool_chunks(split: int) -> list[dict]:
    """The three tool calls of the fixture, each call's arguments split at `split`."""
    out = []
    for index, (call_id, name, args) in enumerate([("call_a1", "apply_patch", PATCH_ARGS),
                                                    ("call_b2", "mcp__unity__read_console", "{}"),
                                                    ("call_c3", "shell_command", SHELL_ARGS)]):
        k = min(split, len(args))
        out.append(chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        for piece in (args[:k], args[k:]):
            out.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    return out


def fixture_chunks(split: int) -> list[dict]:
    chunks = []
    for c in load("chat_stream_chunks.json"):
        chunks.extend(tool_chunks(split) if c == "TOOL_CALLS" else [c])
    return chunks


def final_response(events: list[dict]) -> dict:
    return normalise(events[-1]["response"])


def test_stream_every_split_point_same_result():
    request = load("codex_request.json")
    reference = None
    for split in range(len(PATCH_ARGS) + 1):
        events = run_stream(request, fixture_chunks(split))
        check_stream_invariants(events)
        final = final_response(events)
        if reference is None:
            reference = final
            golden("stream_completed.json", final)
        assert final == reference, split


@needs_sdk
def test_stream_event_sequence_and_validation():
    events = run_stream(load("codex_request.json"), fixture_chunks(7))
    check_stream_invariants(events)
    ResponseCompletedEvent.model_validate(events[-1])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed"]
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    done_items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert events[-1]["response"]["output"] == done_items
    assert events[-1]["response"]["id"] == created["id"]
    custom_added = events[16]["item"]
    assert custom_added["type"] == "custom_tool_call" and custom_added["input"] == ""
    assert done_items[2]["input"] == json.loads(PATCH_ARGS)["input"]
    assert done_items[3]["namespace"] == "mcp__unity" and done_items[3]["name"] == "read_console"
    text_delta = events[11]
    assert text_delta["delta"] == "Fixing " and text_delta["logprobs"] == [] and text_delta["content_index"] == 0
    assert events[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 1024


@needs_sdk
def test_stream_text_only_shapes():
    events = run_stream({"model": "m", "input": "hi"}, [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Do"}),
        chunk({"content": "ne."}, finish="stop")])  # finish on the last content chunk, no usage chunk
    check_stream_invariants(events)
    done = events[-1]["response"]
    ResponseCompletedEvent.model_validate(events[-1])
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == "Done."
    assert done["usage"] == {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": 0,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}
    text_done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text_done["text"] == "Done." and text_done["item_id"] == done["output"][0]["id"]


@needs_sdk
def test_stream_tolerances():
    request = {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"},
                                                      {"type": "function", "name": "g"}]}
    events = run_stream(request, [
        chunk(choices=False),  # Azure-style empty first chunk
        # the first fragment carries no name yet; it arrives with the second fragment
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "", "arguments": "{\"a\""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ":1}"}}]}),
        # a whole second call in one chunk, with the finish reason on it
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "g", "arguments": "{}"}}]}, finish="tool_calls"),
        chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
    ])
    check_stream_invariants(events)
    ResponseCompletedEvent.model_validate(events[-1])
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["name"], o["arguments"]) for o in output] == [("call_1", "f", "{\"a\":1}"),
                                                                            ("call_2", "g", "{}")]
    assert events[-1]["response"]["usage"]["total_tokens"] == 7


@needs_sdk
def test_stream_text_after_tool_reopens_message_and_missing_index():
    events = run_stream({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}]}, [
        chunk({"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}),
        chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
        chunk({"content": "after"}, finish="stop"),
    ])
    check_stream_invariants(events)
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["function_call", "message"]
    assert output[0]["arguments"] == "{}"


@needs_sdk
def test_stream_length_gives_incomplete_completed():
    events = run_stream({"model": "m", "input": "x"}, [chunk({"content": "cut"}, finish="length")])
    check_stream_invariants(events)
    ResponseCompletedEvent.model_validate(events[-1])
    response = events[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


@needs_sdk
def test_stream_fail_and_terminal_is_final():
    translator = ChatToResponsesStream({"model": "m", "input": "x"})
    frames = translator.feed(chunk({"content": "partial"}))
    frames += translator.fail("upstream died")
    events = parse_frames(frames)
    check_stream_invariants(events)
    ResponseFailedEvent.model_validate(events[-1])
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error", "message": "upstream died"}
    assert translator.feed(chunk({"content": "more"})) == []
    assert translator.finish() == [] and translator.fail("again") == []


@needs_sdk
def test_stream_fail_before_any_chunk_and_error_chunk():
    events = parse_frames(ChatToResponsesStream({"model": "m", "input": "x"}).fail("boom", "rate_limit_exceeded"))
    check_stream_invariants(events)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    translator = ChatToResponsesStream({"model": "m", "input": "x"})
    frames = translator.feed(chunk({"content": "a"}))
    frames += translator.feed({"error": {"message": "too long", "type": "invalid_request_error",
                                         "code": "context_length_exceeded"}})
    events = parse_frames(frames)
    assert events[-1]["response"]["error"] == {"code": "context_length_exceeded", "message": "too long"}
    assert translator.finish() == []


@needs_sdk
def test_stream_empty_upstream_still_completes():
    translator = ChatToResponsesStream({"model": "m", "input": "x"})
    events = parse_frames(translator.finish())
    check_stream_invariants(events)
    assert events[-1]["response"]["output"] == [] and events[-1]["response"]["status"] == "completed"
    assert translator.finish() == []


def test_stream_ignores_other_choices_and_does_not_mutate_inputs():
    request = load("codex_request.json")
    chunks = fixture_chunks(3)
    before = copy.deepcopy((request, chunks))
    events = run_stream(request, chunks + [dict(chunk(), choices=[
        {"index": 1, "delta": {"content": "second choice"}, "finish_reason": None}])])
    assert (request, chunks) == before
    assert "second choice" not in json.dumps(events)


def test_keepalive_opens_the_response_then_repeats_in_progress_with_the_next_sequence_numbers():
    stream = ChatToResponsesStream({"model": "m", "input": "hi"})
    frames = stream.keepalive()  # nothing from the upstream yet: the opening pair
    frames += stream.keepalive()
    frames += stream.feed({"id": "c", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]})
    frames += stream.keepalive()  # mid-message: a snapshot with no finished item yet
    frames += stream.finish()
    events = parse_frames(frames)
    assert [e["type"] for e in events][:3] == ["response.created", "response.in_progress", "response.in_progress"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hi"
    in_progress = [e for e in events if e["type"] == "response.in_progress"]
    assert len(in_progress) == 3 and all(e["response"]["status"] == "in_progress" for e in in_progress)
    assert stream.keepalive() == []  # after the terminal event, nothing more
