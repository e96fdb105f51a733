"""Tests for the Anthropic Messages ⇄ Chat translators in providers/translate.py.

Golden cases live in tests/data/anthropic as `<direction>__<case>.input.json` plus
`<direction>__<case>.expected.json`; the direction prefix picks the translator. Set
REGEN_GOLDEN=1 to rewrite the expected files after a deliberate change (then review the diff).
Stream cases are compared as decoded `[event, data]` pairs (Anthropic side) or chunk dicts
(chat side); the stream checkers below also enforce the protocol invariants on every case.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from providers.translate import (
    AnthropicToChatStream,
    ChatToAnthropicStream,
    InvalidRequest,
    UpstreamStreamError,
    anthropic_to_chat_request,
    anthropic_to_chat_response,
    anthropic_tool_name_map,
    chat_to_anthropic_request,
    chat_to_anthropic_response,
    estimate_anthropic_tokens,
)

DATA = Path(__file__).resolve().parent / "data" / "anthropic"
CREATED = 1700000000
MODEL = "claude-sonnet-4-5"


# ---------------------------------------------------------------------------------------------
# helpers: frame decoding, stream checkers, accumulators
# ---------------------------------------------------------------------------------------------


def decode_frames(frames: list[bytes]) -> list[list]:
    """Decode our SSE frames strictly: exactly `event:` + one `data:` line + blank line each."""
    events = []
    for frame in frames:
        assert isinstance(frame, bytes)
        text = frame.decode()
        assert text.endswith("\n\n"), frame
        lines = text[:-2].split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert data["type"] == name, frame
        events.append([name, data])
    return events


def check_anthropic_stream(events: list[list]) -> dict:
    """Assert Anthropic stream invariants and return the assembled message.

    message_start first with usage; blocks started in order 0,1,2… with one open at a time;
    deltas only to the open block and of its kind; message_delta once, after all blocks, then
    message_stop, then nothing; or an `error` event as the very last event.
    """
    assert events, "empty stream"
    assert events[0][0] == "message_start"
    message = json.loads(json.dumps(events[0][1]["message"]))
    assert message["content"] == [] and message["role"] == "assistant" and message["type"] == "message"
    assert isinstance(message["usage"]["input_tokens"], int) and isinstance(message["usage"]["output_tokens"], int)
    assert message["id"].startswith("msg_")
    open_index = None
    json_bufs: dict[int, str] = {}
    saw_delta = saw_stop = False
    for position, (name, data) in enumerate(events[1:], 1):
        assert not saw_stop, "event after message_stop"
        if name == "error":
            assert position == len(events) - 1, "events after error"
            assert set(data["error"]) == {"type", "message"}
            message["error"] = data["error"]
            return message
        if name == "ping":
            continue
        if name == "content_block_start":
            assert open_index is None, "two open blocks"
            assert not saw_delta
            assert data["index"] == len(message["content"]), "non-contiguous index"
            block = dict(data["content_block"])
            if block["type"] == "tool_use":
                assert block["input"] == {} and block["name"] and block["id"]
                assert all(c.isalnum() or c in "_-" for c in block["id"])
                json_bufs[data["index"]] = ""
            elif block["type"] == "text":
                assert block["text"] == ""
            else:
                assert block["type"] == "thinking"
            message["content"].append(block)
            open_index = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index, "delta for a block that is not open"
            block, delta = message["content"][open_index], data["delta"]
            if delta["type"] == "text_delta":
                assert block["type"] == "text" and delta["text"]
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                assert block["type"] == "tool_use"
                json_bufs[open_index] += delta["partial_json"]
            elif delta["type"] == "thinking_delta":
                assert block["type"] == "thinking"
                block["thinking"] += delta["thinking"]
            else:
                assert delta["type"] == "signature_delta" and block["type"] == "thinking"
                block["signature"] = delta["signature"]
        elif name == "content_block_stop":
            assert data["index"] == open_index, "closing a block that is not open"
            block = message["content"][open_index]
            if block["type"] == "tool_use":
                block["input"] = json_bufs[open_index]  # parsed below unless the answer was cut off
            open_index = None
        elif name == "message_delta":
            assert open_index is None and not saw_delta, "message_delta twice or with an open block"
            saw_delta = True
            assert isinstance(data["usage"]["output_tokens"], int)
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["stop_sequence"] = data["delta"]["stop_sequence"]
            message["usage"].update(data["usage"])
        elif name == "message_stop":
            assert saw_delta, "message_stop without message_delta"
            saw_stop = True
        else:
            raise AssertionError("unexpected event " + name)
    assert saw_stop, "stream did not end with message_stop"
    tools = [b for b in message["content"] if b["type"] == "tool_use"]
    if message["stop_reason"] != "max_tokens":  # a cut-off call's arguments may not parse
        assert (message["stop_reason"] == "tool_use") == bool(tools)
        for block in tools:
            block["input"] = json.loads(block["input"]) if block["input"] else {}
            assert isinstance(block["input"], dict)
    return message


def run_chat_to_anthropic_stream(chunks: list[dict], model: str = MODEL, **kwargs) -> list[list]:
    stream = ChatToAnthropicStream(model, **kwargs)
    frames = []
    for chunk in chunks:
        frames += stream.feed(chunk)
    frames += stream.finish()
    assert stream.feed(chunks[-1] if chunks else {}) == [] and stream.finish() == []
    return decode_frames(frames)


def accumulate_chat_chunks(chunks: list[dict]) -> dict:
    """Assemble chat chunks into a chat.completion, checking chunk-level invariants on the way."""
    content, calls, finish, usage, role, reasoning = None, {}, None, None, None, ""
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            role = role or delta.get("role")
            reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            if delta.get("content") is not None:
                content = (content or "") + delta["content"]
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"id": None, "type": "function",
                                                         "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    assert entry["id"] is None, "tool id sent twice"
                    entry["id"] = call["id"]
                entry["function"]["name"] += call.get("function", {}).get("name") or ""
                entry["function"]["arguments"] += call.get("function", {}).get("arguments") or ""
            if choice["finish_reason"]:
                assert finish is None, "finish_reason twice"
                finish = choice["finish_reason"]
    assert role == "assistant"
    assert sorted(calls) == list(range(len(calls))), "tool indexes must be 0,1,…"
    message = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    message["refusal"] = None
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"id": chunks[0]["id"], "object": "chat.completion", "created": chunks[0]["created"],
            "model": chunks[0]["model"],
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}], "usage": usage}


def run_anthropic_to_chat_stream(events: list[list]) -> list[dict]:
    stream = AnthropicToChatStream(MODEL, created=CREATED)
    chunks = []
    for name, data in events:
        chunks += stream.feed(name, data)
    chunks += stream.finish()
    assert stream.feed("message_stop", {"type": "message_stop"}) == [] and stream.finish() == []
    # invariants: role first, exactly one finish, usage chunk last and alone
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1
    assert len({c["id"] for c in chunks}) == 1
    return chunks


# ---------------------------------------------------------------------------------------------
# golden fixtures
# ---------------------------------------------------------------------------------------------


def _translate(case: str, value):
    direction = case.split("__", 1)[0]
    if direction == "a2c_request":
        return anthropic_to_chat_request(value)
    if direction == "c2a_request":
        return chat_to_anthropic_request(value)
    if direction == "c2a_response":
        return chat_to_anthropic_response(value, MODEL)
    if direction == "a2c_response":
        return anthropic_to_chat_response(value, created=CREATED)
    if direction == "c2a_stream":
        return run_chat_to_anthropic_stream(value)
    if direction == "a2c_stream":
        return run_anthropic_to_chat_stream(value)
    raise AssertionError("unknown fixture direction " + direction)


CASES = sorted(p.name[: -len(".input.json")] for p in DATA.glob("*.input.json"))


def test_fixture_set_covers_every_direction():
    directions = {c.split("__")[0] for c in CASES}
    assert directions == {"a2c_request", "c2a_request", "c2a_response", "a2c_response", "c2a_stream", "a2c_stream"}


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    value = json.loads((DATA / (case + ".input.json")).read_text())
    actual = json.loads(json.dumps(_translate(case, value)))
    expected_path = DATA / (case + ".expected.json")
    if os.environ.get("REGEN_GOLDEN"):
        expected_path.write_text(json.dumps(actual, indent=1, ensure_ascii=False) + "\n")
    assert actual == json.loads(expected_path.read_text())


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("c2a_stream")])
def test_chat_to_anthropic_stream_invariants_and_agreement(case):
    """Every fixture stream obeys the protocol and assembles to what the non-stream path gives."""
    chunks = json.loads((DATA / (case + ".input.json")).read_text())
    message = check_anthropic_stream(run_chat_to_anthropic_stream(chunks))
    whole = chat_to_anthropic_response(accumulate_chat_chunks([c for c in chunks if c["id"]]), MODEL)
    strip = [{k: v for k, v in b.items() if k != "signature"} for b in message["content"]]
    assert strip == [{k: v for k, v in b.items() if k != "signature"} for b in whole["content"]]
    assert message["stop_reason"] == whole["stop_reason"]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("a2c_stream")])
def test_anthropic_to_chat_stream_agrees_with_non_stream(case):
    events = json.loads((DATA / (case + ".input.json")).read_text())
    chunks = run_anthropic_to_chat_stream(events)
    streamed = accumulate_chat_chunks(chunks)
    if events[-1][0] == "message_stop":
        whole = anthropic_to_chat_response(check_anthropic_stream(events), created=CREATED)
        assert streamed == whole


# ---------------------------------------------------------------------------------------------
# Claude Code's real request shape (WIRE §9), beyond the golden file
# ---------------------------------------------------------------------------------------------


def _claude_code_body() -> dict:
    return json.loads((DATA / "a2c_request__claude_code.input.json").read_text())


def test_claude_code_request_shape():
    body = _claude_code_body()
    out = anthropic_to_chat_request(body)
    msgs = out["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool", "user", "assistant", "user"]
    system = msgs[0]["content"]
    assert "You are Claude Code" in system and "Available skills" in system and "Agents available" in system
    assert "cache_control" not in json.dumps(out) and "defer_loading" not in json.dumps(out)
    assert out["max_tokens"] == 128000 and out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert [t["function"]["name"] for t in out["tools"]][:2] == ["Bash", "Read"]
    assert len(out["tools"]) == 3  # web_search server tool dropped
    assert all(len(t["function"]["name"]) <= 64 for t in out["tools"])
    assert "thinking" not in out and "context_management" not in out and "output_config" not in out
    assert "user" not in out  # Claude Code's composite user_id is too long to forward
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_01A", "content": "a.py\nb.py"}
    assert msgs[4]["content"] == "Error: File does not exist."
    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"command": "ls *.py",
                                                                             "description": "List python files"}


def test_long_tool_names_are_mapped_back():
    body = _claude_code_body()
    names = anthropic_tool_name_map(body)
    long_name = body["tools"][2]["name"]
    (short,) = [s for s, original in names.items() if original == long_name]
    assert len(short) == 64 and anthropic_to_chat_request(body)["tools"][2]["function"]["name"] == short
    resp = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": short, "arguments": "{}"}}]}}]}
    assert chat_to_anthropic_response(resp, MODEL, tool_names=names)["content"][0]["name"] == long_name
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": resp["choices"][0]["message"], "finish_reason": "tool_calls"}]}]
    events = run_chat_to_anthropic_stream(chunks, tool_names=names)
    assert check_anthropic_stream(events)["content"][0]["name"] == long_name
    # a tool_use for that tool in history is renamed the same way, so the pair still matches
    body["messages"].append({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_9", "name": long_name,
                                                               "input": {}}]})
    assert anthropic_to_chat_request(body)["messages"][-2]["tool_calls"][0]["function"]["name"] == short


# ---------------------------------------------------------------------------------------------
# request validation and small functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "max_tokens": 10}, "messages"),
    ({"model": "m", "max_tokens": 10, "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": "10", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_anthropic_request_errors(body, param):
    with pytest.raises(InvalidRequest) as info:
        anthropic_to_chat_request(body)
    assert info.value.param == param and str(info.value).startswith(param)


@pytest.mark.parametrize("body", [{"model": "m"}, {"model": "m", "messages": {"role": "user"}},
                                  {"model": "m", "messages": [{"role": "system", "content": "only"}]}])
def test_chat_request_errors(body):
    with pytest.raises(InvalidRequest) as info:
        chat_to_anthropic_request(body)
    assert info.value.param == "messages"


def test_claude_code_system_message_never_fails_and_fields_dropped():
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
         "anything": {"new": True}},
        {"role": "user", "content": "b"}]}
    out = anthropic_to_chat_request(body)
    assert out["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
                               {"role": "user", "content": "b"}]


def test_round_trip_chat_anthropic_chat_keeps_conversation():
    chat = json.loads((DATA / "c2a_request__full.input.json").read_text())
    ant = chat_to_anthropic_request(chat)
    back = anthropic_to_chat_request(ant)
    roles = [m["role"] for m in back["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user"]
    assert back["messages"][0]["content"] == "You are helpful.\n\nPrefer tools."
    assert back["messages"][2]["tool_calls"][1]["id"] == back["messages"][4]["tool_call_id"] == "functions_lookup_1"
    assert back["tool_choice"] == "required" and back["parallel_tool_calls"] is False
    assert back["messages"][1]["content"][1]["image_url"]["url"] == chat["messages"][2]["content"][1]["image_url"]["url"]


def test_estimate_anthropic_tokens():
    assert estimate_anthropic_tokens({"messages": []}) == 1
    assert estimate_anthropic_tokens({"messages": [{"role": "user", "content": "abcde"}]}) == 2
    body = {"system": [{"type": "text", "text": "x" * 40}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40},
                                                      {"type": "image", "source": {"type": "url", "url": "u"}}]},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "ab", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "z" * 8}]}],
            "tools": [{"name": "t"}]}
    # 40 + 40 + (2 + 2) + 8 + len('[{"name": "t"}]') = 107 chars → 27 tokens, plus 1,600 for the image
    assert estimate_anthropic_tokens(body) == 27 + 1600
    assert estimate_anthropic_tokens(_claude_code_body()) > 100


# ---------------------------------------------------------------------------------------------
# chat chunks → Anthropic stream: splits at every boundary
# ---------------------------------------------------------------------------------------------

ARGS = '{"command": "ls -la \\"my dir\\"", "n": [1, 2, {"é": null}], "emoji": "👋"}'
TEXT = "Hello, wörld! 👋 done"


def _chunk(delta=None, finish=None, choices=True, usage=None):
    chunk = {"id": "chatcmpl-split", "object": "chat.completion.chunk", "created": 1, "model": "x",
             "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage:
        chunk["usage"] = usage
    return chunk


def _tool_start(index, call_id, name, args=""):
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": args}}]}


def _tool_args(index, args):
    return {"tool_calls": [{"index": index, "function": {"arguments": args}}]}


USAGE = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}


def _two_tool_stream(parts_a: list[str], parts_b: list[str], text_parts=(TEXT,)) -> list[dict]:
    chunks = [_chunk({"role": "assistant", "content": ""})]
    chunks += [_chunk({"content": t}) for t in text_parts]
    chunks.append(_chunk(_tool_start(0, "call_a", "Bash")))
    chunks += [_chunk(_tool_args(0, p)) for p in parts_a]
    chunks.append(_chunk(_tool_start(1, "call_b", "Read")))
    chunks += [_chunk(_tool_args(1, p)) for p in parts_b]
    chunks += [_chunk({}, "tool_calls"), _chunk(choices=False, usage=USAGE)]
    return chunks


BASELINE = check_anthropic_stream(run_chat_to_anthropic_stream(_two_tool_stream([ARGS], ['{"f": 1}'])))


def test_baseline_shape():
    assert [b["type"] for b in BASELINE["content"]] == ["text", "tool_use", "tool_use"]
    assert BASELINE["content"][1]["input"] == json.loads(ARGS)
    assert BASELINE["stop_reason"] == "tool_use"
    assert BASELINE["usage"]["output_tokens"] == 20 and BASELINE["usage"]["input_tokens"] == 30


@pytest.mark.parametrize("cut", range(len(ARGS) + 1))
def test_tool_arguments_split_at_every_position(cut):
    parts = [ARGS[:cut], ARGS[cut:]]
    assert check_anthropic_stream(run_chat_to_anthropic_stream(_two_tool_stream(parts, ['{"f"', ": 1}"]))) == BASELINE


def test_tool_arguments_one_character_per_chunk_and_text_split_everywhere():
    for cut in range(len(TEXT) + 1):
        text_parts = [TEXT[:cut], TEXT[cut:]]
        got = check_anthropic_stream(run_chat_to_anthropic_stream(_two_tool_stream(list(ARGS), ['{"f": 1}'], text_parts)))
        assert got == BASELINE


@pytest.mark.parametrize("cut", range(len(ARGS) + 1))
def test_empty_name_first_then_name_later(cut):
    """DeepSeek style: the first fragment has an empty name; the block must wait for the name."""
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": TEXT}),
              _chunk(_tool_start(0, "call_a", "", ARGS[:cut])),
              _chunk({"tool_calls": [{"index": 0, "function": {"name": "Bash", "arguments": ARGS[cut:]}}]}),
              _chunk(_tool_start(1, "call_b", "Read", '{"f": 1}')), _chunk({}, "tool_calls"),
              _chunk(choices=False, usage=USAGE)]
    assert check_anthropic_stream(run_chat_to_anthropic_stream(chunks)) == BASELINE


def test_finish_on_last_content_chunk_and_whole_calls_in_one_chunk():
    delta = {"content": TEXT, "tool_calls": [_tool_start(0, "call_a", "Bash", ARGS)["tool_calls"][0],
                                             _tool_start(1, "call_b", "Read", '{"f": 1}')["tool_calls"][0]]}
    chunks = [_chunk(delta, "tool_calls"), _chunk(choices=False, usage=USAGE)]
    assert check_anthropic_stream(run_chat_to_anthropic_stream(chunks)) == BASELINE


def test_message_delta_is_held_until_usage_then_nothing_after_stop():
    stream = ChatToAnthropicStream(MODEL)
    events = decode_frames(stream.feed(_chunk({"role": "assistant", "content": "hi"})))
    assert [e[0] for e in events] == ["message_start", "content_block_start", "content_block_delta"]
    events = decode_frames(stream.feed(_chunk({}, "stop")))
    assert [e[0] for e in events] == ["content_block_stop"]  # message_delta held for usage
    events = decode_frames(stream.feed(_chunk(choices=False, usage=USAGE)))
    assert [e[0] for e in events] == ["message_delta", "message_stop"]
    assert events[0][1]["usage"] == {"input_tokens": 30, "output_tokens": 20, "cache_creation_input_tokens": 0,
                                     "cache_read_input_tokens": 0}
    assert stream.feed(_chunk({"content": "late"})) == [] and stream.finish() == []
    assert stream.fail("boom") == []


def test_finish_without_finish_reason_or_usage_estimates_output():
    stream = ChatToAnthropicStream(MODEL, input_tokens=77)
    frames = stream.feed(_chunk({"content": "12345678"})) + stream.finish()
    message = check_anthropic_stream(decode_frames(frames))
    assert message["stop_reason"] == "end_turn" and message["usage"]["output_tokens"] == 2
    assert message["usage"]["input_tokens"] == 77


def test_finish_with_no_chunks_at_all():
    message = check_anthropic_stream(decode_frames(ChatToAnthropicStream(MODEL).finish()))
    assert message["content"] == [] and message["stop_reason"] == "end_turn"


def test_fail_mid_stream_emits_error_and_nothing_after():
    stream = ChatToAnthropicStream(MODEL)
    frames = stream.feed(_chunk({"content": "partial"})) + stream.fail("upstream died", "overloaded_error")
    events = decode_frames(frames)
    assert events[-1] == ["error", {"type": "error", "error": {"type": "overloaded_error", "message": "upstream died"}}]
    check_anthropic_stream(events)
    assert stream.feed(_chunk({"content": "more"})) == [] and stream.finish() == []


def test_in_band_openai_error_chunk_becomes_error_event():
    stream = ChatToAnthropicStream(MODEL)
    frames = stream.feed(_chunk({"content": "x"})) + stream.feed({"error": {"message": "bad", "type": "server_error"}})
    assert decode_frames(frames)[-1][1]["error"] == {"type": "api_error", "message": "bad"}


def test_empty_deltas_produce_nothing_and_tools_without_index():
    stream = ChatToAnthropicStream(MODEL)
    assert [e[0] for e in decode_frames(stream.feed(_chunk({"content": ""})))] == ["message_start"]
    assert stream.feed(_chunk({"content": "", "reasoning_content": ""})) == []
    # Gemini-compat style: no `index` on tool fragments; a new id means a new call
    frames = stream.feed(_chunk({"tool_calls": [{"id": "c1", "function": {"name": "A", "arguments": "{}"}}]}))
    frames += stream.feed(_chunk({"tool_calls": [{"id": "c2", "function": {"name": "B", "arguments": '{"x"'}}]}))
    frames += stream.feed(_chunk({"tool_calls": [{"function": {"arguments": ": 1}"}}]}))
    frames += stream.feed(_chunk({}, "stop")) + stream.finish()
    events = [["message_start", {"type": "message_start", "message": {
        "id": "msg_x", "type": "message", "role": "assistant", "content": [], "usage": {"input_tokens": 0, "output_tokens": 0}}}]]
    message = check_anthropic_stream(events + decode_frames(frames))
    assert [(b["name"], b["input"]) for b in message["content"]] == [("A", {}), ("B", {"x": 1})]
    assert message["stop_reason"] == "tool_use"  # "stop" with tool calls still means tool_use


def test_a_tool_call_cut_off_by_the_length_limit_is_max_tokens_not_a_call_to_run():
    chunks = [_chunk(_tool_start(0, "call_1", "Write", '{"path": "a.py", "content": "trunc')), _chunk({}, "length")]
    message = check_anthropic_stream(run_chat_to_anthropic_stream(chunks))
    assert message["stop_reason"] == "max_tokens"
    assert [(b["type"], b["input"]) for b in message["content"]] == [("tool_use", '{"path": "a.py", "content": "trunc')]
    whole = chat_to_anthropic_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "Write", "arguments": '{"path": "a.py", "content": "trunc'}}]}}]}, MODEL)
    assert whole["stop_reason"] == "max_tokens" and whole["content"][0]["type"] == "tool_use"


def test_json_mode_with_client_tools_offers_the_answer_tool_without_forcing_it_and_calls_stay_calls():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    request = chat_to_anthropic_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools,
                                         "response_format": {"type": "json_object"}})
    assert [t["name"] for t in request["tools"]] == ["lookup", "json_answer"]
    assert request["tools"][1]["input_schema"] == {"type": "object"} and "tool_choice" not in request
    plain = chat_to_anthropic_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                       "response_format": {"type": "text"}})
    assert "tools" not in plain and "tool_choice" not in plain
    reply = {"id": "msg_1", "model": "m", "stop_reason": "tool_use", "usage": {}, "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": 1}}]}
    choice = anthropic_to_chat_response(reply, json_answer=True)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    reply["content"] = [{"type": "text", "text": "Sure: "}, {"type": "tool_use", "id": "toolu_2", "name": "json_answer",
                                                            "input": {"a": 1}}]
    choice = anthropic_to_chat_response(reply, json_answer=True)["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ('{"a": 1}', "stop")
    assert "tool_calls" not in choice["message"]
    # without json_answer (no response_format asked) a tool of that name is an ordinary call
    assert anthropic_to_chat_response(reply)["choices"][0]["finish_reason"] == "tool_calls"


def test_reused_index_with_new_id_is_a_new_tool():
    chunks = [_chunk(_tool_start(0, "call_1", "A", "{}")), _chunk(_tool_start(0, "call_2", "B", "{}")),
              _chunk({}, "tool_calls")]
    message = check_anthropic_stream(run_chat_to_anthropic_stream(chunks))
    assert [b["id"] for b in message["content"]] == ["call_1", "call_2"]


def test_tool_call_that_never_gets_a_name_is_dropped_and_stop_reason_agrees():
    chunks = [_chunk({"content": "hi"}), _chunk(_tool_start(0, "call_1", "", "{}")), _chunk({}, "tool_calls")]
    message = check_anthropic_stream(run_chat_to_anthropic_stream(chunks))
    assert [b["type"] for b in message["content"]] == ["text"] and message["stop_reason"] == "end_turn"


def test_reasoning_becomes_thinking_block_before_text():
    chunks = [_chunk({"reasoning": "ponder"}), _chunk({"reasoning": " more", "content": "answer"}), _chunk({}, "stop")]
    message = check_anthropic_stream(run_chat_to_anthropic_stream(chunks))
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in message["content"]] == [
        ("thinking", "ponder more"), ("text", "answer")]


# ---------------------------------------------------------------------------------------------
# the official anthropic SDK accepts our stream (offline, through a mock transport)
# ---------------------------------------------------------------------------------------------


def _sdk_final_message(body: bytes) -> dict:
    anthropic = pytest.importorskip("anthropic")
    httpx2 = pytest.importorskip("httpx2")

    def handler(request):
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = anthropic.Anthropic(api_key="test", base_url="http://gateway.invalid", max_retries=0,
                                 http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with client.messages.stream(model="gateway-test-model", max_tokens=16, messages=[{"role": "user", "content": "x"}]) as stream:
        return stream.get_final_message().model_dump(exclude_none=True)


SDK_STREAMS = {
    "two_tools_char_split": _two_tool_stream(list(ARGS), ['{"f": 1}'], list(TEXT)),
    **{case: json.loads((DATA / (case + ".input.json")).read_text()) for case in CASES if case.startswith("c2a_stream")},
}


@pytest.mark.parametrize("name", sorted(SDK_STREAMS))
def test_anthropic_sdk_accumulates_our_stream(name):
    stream = ChatToAnthropicStream(MODEL)
    frames = []
    for chunk in SDK_STREAMS[name]:
        frames += stream.feed(chunk)
    frames += stream.finish()
    body = b"".join(frames)
    ours = check_anthropic_stream(decode_frames(frames))
    sdk = _sdk_final_message(body)
    assert sdk["id"] == ours["id"] and sdk["stop_reason"] == ours["stop_reason"]
    assert sdk["usage"]["output_tokens"] == ours["usage"]["output_tokens"]
    assert sdk["usage"]["input_tokens"] == ours["usage"]["input_tokens"]
    assert sdk["content"] == ours["content"]


def test_anthropic_sdk_raises_on_our_error_event():
    anthropic = pytest.importorskip("anthropic")
    stream = ChatToAnthropicStream(MODEL)
    body = b"".join(stream.feed(_chunk({"content": "x"})) + stream.fail("Overloaded", "overloaded_error"))
    with pytest.raises(anthropic.APIStatusError) as info:
        _sdk_final_message(body)
    assert "overloaded_error" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Anthropic events → chat chunks
# ---------------------------------------------------------------------------------------------


def _ant_events(json_parts: list[str], text_parts: list[str]) -> list[list]:
    def ev(name, **data):
        return [name, dict(type=name, **data)]
    events = [ev("message_start", message={"id": "msg_split", "type": "message", "role": "assistant", "model": MODEL,
                                           "content": [], "stop_reason": None, "stop_sequence": None,
                                           "usage": {"input_tokens": 9, "cache_read_input_tokens": 1, "output_tokens": 1}}),
              ev("content_block_start", index=0, content_block={"type": "text", "text": ""})]
    events += [ev("content_block_delta", index=0, delta={"type": "text_delta", "text": t}) for t in text_parts]
    events += [ev("content_block_stop", index=0),
               ev("content_block_start", index=1, content_block={"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                                                 "input": {}})]
    events += [ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": p})
               for p in json_parts]
    events += [ev("content_block_stop", index=1),
               ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 7}),
               ev("message_stop")]
    return events


A2C_BASELINE = accumulate_chat_chunks(run_anthropic_to_chat_stream(_ant_events([ARGS], [TEXT])))


def test_anthropic_to_chat_baseline():
    message = A2C_BASELINE["choices"][0]["message"]
    assert message["content"] == TEXT and json.loads(message["tool_calls"][0]["function"]["arguments"]) == json.loads(ARGS)
    assert A2C_BASELINE["choices"][0]["finish_reason"] == "tool_calls"
    assert A2C_BASELINE["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17,
                                     "prompt_tokens_details": {"cached_tokens": 1}}
    assert A2C_BASELINE["id"] == "chatcmpl-split"


@pytest.mark.parametrize("cut", range(len(ARGS) + 1))
def test_anthropic_partial_json_split_at_every_position(cut):
    events = _ant_events([ARGS[:cut], ARGS[cut:]], [TEXT[: cut % len(TEXT)], TEXT[cut % len(TEXT):]])
    assert accumulate_chat_chunks(run_anthropic_to_chat_stream(events)) == A2C_BASELINE


def test_anthropic_error_event_raises():
    stream = AnthropicToChatStream(MODEL, created=CREATED)
    stream.feed("message_start", {"type": "message_start", "message": {"id": "msg_e", "usage": {}}})
    assert stream.feed("ping", {"type": "ping"}) == []
    with pytest.raises(UpstreamStreamError) as info:
        stream.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert info.value.error_type == "overloaded_error" and info.value.message == "Overloaded"
    assert stream.feed("message_stop", {"type": "message_stop"}) == []


def test_anthropic_stream_event_name_from_data_type_and_unknown_events():
    stream = AnthropicToChatStream(MODEL, created=CREATED)
    assert stream.feed("ping", {"type": "ping"}) == []  # a ping before message_start must not start the stream
    chunks = stream.feed("", {"type": "message_start", "message": {"id": "msg_n", "usage": {"input_tokens": 3}}})
    assert chunks[0]["id"] == "chatcmpl-n"
    assert stream.feed("some_future_event", {"type": "some_future_event"}) == []


def test_junk_usage_and_arguments_never_crash():
    resp = {"id": "x", "choices": [{"message": {"content": "hi", "tool_calls": [
        {"id": None, "function": {"name": "t", "arguments": "not json"}}]}, "finish_reason": None}],
        "usage": {"prompt_tokens": "12", "completion_tokens": None, "prompt_tokens_details": None}}
    out = chat_to_anthropic_response(resp, MODEL)
    assert out["usage"] == {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0}
    assert out["content"][1]["input"] == {"_raw": "not json"} and out["content"][1]["id"].startswith("toolu_")
    assert out["stop_reason"] == "tool_use"
    assert anthropic_to_chat_response({"content": None, "usage": {"input_tokens": 1.5}}, created=1)["usage"][
        "prompt_tokens"] == 0


def test_empty_stop_sequences_are_not_forwarded():
    out = anthropic_to_chat_request({"model": "m", "max_tokens": 1, "stop_sequences": ["", None],
                                     "messages": [{"role": "user", "content": "x"}]})
    assert "stop" not in out
