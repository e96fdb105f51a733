"""Ollama ⇄ Chat translators: golden fixtures, stream split invariance, official client models."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import struct
import time
from pathlib import Path

import pytest

from providers.translate import (
    ChatToOllamaStream,
    InvalidRequest,
    chat_to_ollama_chat_response,
    chat_to_ollama_generate_response,
    embeddings_to_ollama_embed_response,
    embeddings_to_ollama_legacy_response,
    ollama_chat_to_chat_request,
    ollama_embed_to_embeddings_request,
    ollama_generate_to_chat_request,
    ollama_load_request,
    ollama_load_response,
    ollama_show_response,
    ollama_tags_entry,
)

DATA = Path(__file__).parent / "data" / "ollama"
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def normalise(obj: dict) -> dict:
    """Replace the clock-dependent fields by placeholders after checking their shape."""
    out = dict(obj)
    if "created_at" in out:
        assert RFC3339_Z.match(out["created_at"]), out["created_at"]
        out["created_at"] = "<ts>"
    for key in DURATIONS:
        if key in out:
            assert isinstance(out[key], int) and out[key] >= 0, (key, out[key])
            out[key] = "<ns>"
    return out


def parse_lines(lines: list) -> list:
    for line in lines:
        assert isinstance(line, bytes) and line.endswith(b"\n") and line.count(b"\n") == 1
    return [json.loads(line) for line in lines]


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat_request_full.json", "chat_request_schema.json"])
def test_chat_request_matches_golden(name):
    case = load(name)
    assert ollama_chat_to_chat_request(case["input"]) == case["expected"]


def test_generate_request_matches_golden_and_ignores_raw_context_suffix():
    case = load("generate_request.json")
    assert ollama_generate_to_chat_request(case["input"]) == case["expected"]


def test_generate_request_without_prompt_is_an_empty_user_message_and_streams():
    out = ollama_generate_to_chat_request({"model": "m"})
    assert out == {"model": "m", "messages": [{"role": "user", "content": ""}], "stream": True,
                   "stream_options": {"include_usage": True}}


def test_generate_request_image_only_prompt_has_no_text_part():
    out = ollama_generate_to_chat_request({"model": "m", "images": ["R0lGODlhAAAAAAAAAAAAAAAAAAAAAAAAAAA="]})
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlhAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}]}]


def test_chat_request_stream_null_means_true_and_false_means_no_stream_options():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ollama_chat_to_chat_request({**base, "stream": None})["stream"] is True
    out = ollama_chat_to_chat_request({**base, "stream": False})
    assert out["stream"] is False and "stream_options" not in out


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_chat_request_unlimited_num_predict_leaves_max_tokens_unset(num_predict):
    out = ollama_chat_to_chat_request({"model": "m", "messages": [], "options": {"num_predict": num_predict}})
    assert "max_tokens" not in out
    assert out["messages"] == []  # the "load the model" call is forwarded as is


def test_chat_request_keeps_data_urls_and_drops_images_on_non_user_turns():
    url = "data:image/jpeg;base64,/9j/4AAAAAAAAAAA"
    out = ollama_chat_to_chat_request({"model": "m", "messages": [
        {"role": "user", "content": "", "images": [url]},
        {"role": "system", "content": "s", "images": ["iVBORw0KGgo="]}]})
    assert out["messages"] == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                               {"role": "system", "content": "s"}]


def test_chat_request_image_sniffing_survives_garbage_base64():
    out = ollama_chat_to_chat_request({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["!!!"]}]})
    assert out["messages"][0]["content"][1]["image_url"]["url"] == "data:image/png;base64,!!!"


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages"),
    ({"model": "m", "messages": [{"content": "no role"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "images": [3]}]}, "messages[0].images"),
    ({"model": "m", "messages": [], "format": "yaml"}, "format"),
    ({"model": "m", "messages": [], "options": [1]}, "options"),
    ({"model": "m", "messages": [], "tools": [{"type": "function"}]}, "tools"),
])
def test_chat_request_rejects_malformed_bodies(body, param):
    with pytest.raises(InvalidRequest) as err:
        ollama_chat_to_chat_request(body)
    assert err.value.param == param


def test_generate_request_rejects_non_string_prompt():
    with pytest.raises(InvalidRequest) as err:
        ollama_generate_to_chat_request({"model": "m", "prompt": ["x"]})
    assert err.value.param == "prompt"


def test_tool_result_without_matching_call_still_gets_an_id():
    out = ollama_chat_to_chat_request({"model": "m", "messages": [{"role": "tool", "tool_name": "f", "content": "x"}]})
    assert out["messages"] == [{"role": "tool", "tool_call_id": "call_0", "content": "x"}]


# --- non-stream responses -------------------------------------------------------------------


@pytest.mark.parametrize("name, model", [("chat_response_tool_calls.json", "vllm:qwen3"),
                                         ("chat_response_length.json", "m")])
def test_chat_response_matches_golden(name, model):
    case = load(name)
    assert normalise(chat_to_ollama_chat_response(case["input"], model)) == case["expected"]


def test_generate_response_matches_golden():
    case = load("generate_response.json")
    assert normalise(chat_to_ollama_generate_response(case["input"], "openai:gpt-4o-mini")) == case["expected"]


def test_response_durations_are_zero_without_start_and_measured_with_it():
    resp = load("generate_response.json")["input"]
    out = chat_to_ollama_chat_response(resp, "m")
    assert [out[k] for k in DURATIONS] == [0, 0, 0, 0]
    started = time.monotonic_ns() - 5_000_000
    out = chat_to_ollama_generate_response(resp, "m", started_ns=started)
    assert out["total_duration"] >= 5_000_000
    assert out["total_duration"] == out["load_duration"] + out["prompt_eval_duration"] + out["eval_duration"]


def test_response_survives_empty_or_odd_upstream_objects():
    for resp in ({}, {"choices": []}, {"choices": [None]}, {"choices": [{"message": None}], "usage": None}):
        out = chat_to_ollama_chat_response(resp, "m")
        assert out["message"] == {"role": "assistant", "content": ""} and out["done"] is True
        assert chat_to_ollama_generate_response(resp, "m")["response"] == ""


def test_tool_arguments_round_trip_object_to_string_to_object():
    args = {"city": "Zürich", "days": [1, 2], "opts": {"metric": True}}
    req = ollama_chat_to_chat_request({"model": "m", "messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": args}}]}]})
    call = req["messages"][0]["tool_calls"][0]
    assert isinstance(call["function"]["arguments"], str)
    resp = {"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [call]}}]}
    out = chat_to_ollama_chat_response(resp, "m")
    assert out["message"]["tool_calls"] == [{"id": "call_0", "function": {"name": "w", "arguments": args}}]


# --- stream ---------------------------------------------------------------------------------


def run_stream(chunks: list, model: str = "ollama:qwen3", generate: bool = False, started_ns=None) -> list:
    stream = ChatToOllamaStream(model, generate=generate, started_ns=started_ns)
    lines = []
    for chunk in chunks:
        lines.extend(stream.feed(chunk))
    lines.extend(stream.finish())
    assert stream.feed(chunks[0]) == [] and stream.finish() == [] and stream.fail("late") == []
    return parse_lines(lines)


def assemble(objs: list) -> dict:
    """What a client reconstructs: text, thinking, tool calls, and the normalised final line."""
    assert all(o["done"] is False for o in objs[:-1]) and objs[-1]["done"] is True
    msgs = [o["message"] for o in objs]
    return {
        "content": "".join(m["content"] for m in msgs),
        "thinking": "".join(m.get("thinking", "") for m in msgs),
        "tool_calls": [c for m in msgs for c in m.get("tool_calls", [])],
        "final": normalise(objs[-1]),
    }


def test_stream_matches_golden_lines():
    case = load("stream_chat.json")
    assert [normalise(o) for o in run_stream(case["chunks"])] == case["expected_lines"]


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices,
            "usage": usage}


TEXT = "First line.\nSecond line, longer.\n\nFourth after a blank.\n"
ARGS0 = '{"city": "Tokyo", "q": "a \\"quoted\\" {brace}"}'
ARGS1 = '{"tz":"UTC"}'


def stream_chunks(text_pieces: list, args0_pieces: list) -> list:
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in text_pieces]
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    chunks.append(chunk({"tool_calls": [first]}))
    chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in args0_pieces]
    chunks.append(chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                         "function": {"name": "get_time", "arguments": ARGS1}}]}))
    chunks.append(chunk({}, finish="tool_calls"))
    chunks.append(chunk(usage={"prompt_tokens": 31, "completion_tokens": 17, "total_tokens": 48}))
    return chunks


EXPECTED_ASSEMBLED = {
    "content": TEXT,
    "thinking": "",
    "tool_calls": [{"id": "call_1", "function": {"name": "get_weather",
                                                 "arguments": {"city": "Tokyo", "q": 'a "quoted" {brace}'}}},
                   {"id": "call_2", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}],
    "final": {"model": "ollama:qwen3", "created_at": "<ts>", "message": {"role": "assistant", "content": ""},
              "done": True, "done_reason": "stop", "total_duration": "<ns>", "load_duration": "<ns>",
              "prompt_eval_count": 31, "prompt_eval_duration": "<ns>", "eval_count": 17, "eval_duration": "<ns>"},
}


def text_splits() -> list:
    """The text cut at every subset of its line boundaries."""
    bounds = [i + 1 for i, ch in enumerate(TEXT) if ch == "\n" and i + 1 < len(TEXT)]
    out = []
    for r in range(len(bounds) + 1):
        for cuts in itertools.combinations(bounds, r):
            edges = [0, *cuts, len(TEXT)]
            out.append([TEXT[edges[k]:edges[k + 1]] for k in range(len(edges) - 1)])
    return out


def test_stream_text_split_at_every_line_boundary_assembles_identically():
    splits = text_splits()
    assert len(splits) == 8  # three inner line boundaries
    for pieces in splits:
        objs = run_stream(stream_chunks(pieces, [ARGS0]))
        assert assemble(objs) == EXPECTED_ASSEMBLED
        assert len(objs) == len(pieces) + 2  # one line per text delta, one tool-call line, the final line


def test_stream_tool_arguments_split_at_every_position_assemble_identically():
    for cut in range(len(ARGS0) + 1):
        objs = run_stream(stream_chunks([TEXT], [ARGS0[:cut], ARGS0[cut:]]))
        assert assemble(objs) == EXPECTED_ASSEMBLED, cut
    # and character by character: the calls still arrive whole, in one line
    objs = run_stream(stream_chunks([TEXT], list(ARGS0)))
    assert assemble(objs) == EXPECTED_ASSEMBLED
    assert sum("tool_calls" in o["message"] for o in objs) == 1


def test_stream_one_fake_chunk_with_everything_and_usage_on_finish_chunk():
    everything = {"choices": [{"index": 0, "finish_reason": "length", "delta": {
        "role": "assistant", "content": "all at once",
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    objs = run_stream([everything])
    assert [o["message"] for o in objs[:2]] == [
        {"role": "assistant", "content": "all at once"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": {"a": 1}}}]}]
    assert (objs[2]["done_reason"], objs[2]["prompt_eval_count"], objs[2]["eval_count"]) == ("length", 3, 4)


def test_stream_without_finish_reason_flushes_tool_calls_at_finish_and_counts_zero():
    objs = run_stream([chunk({"tool_calls": [{"index": 0, "id": "x", "function": {"name": "f", "arguments": "{bad"}}]})])
    assert objs[0]["message"]["tool_calls"] == [{"id": "x", "function": {"name": "f", "arguments": {}}}]
    assert (objs[1]["done_reason"], objs[1]["prompt_eval_count"], objs[1]["eval_count"]) == ("stop", 0, 0)


def test_stream_reasoning_under_either_name_becomes_thinking():
    objs = run_stream([chunk({"reasoning": "a"}), chunk({"reasoning_content": "b"}), chunk({"content": "c"})])
    assert assemble(objs)["thinking"] == "ab" and assemble(objs)["content"] == "c"


def test_stream_generate_mode_uses_response_field():
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
              chunk({}, finish="stop"), chunk(usage={"prompt_tokens": 2, "completion_tokens": 2})]
    objs = run_stream(chunks, model="m", generate=True)
    assert [normalise(o) for o in objs] == [
        {"model": "m", "created_at": "<ts>", "response": "Hel", "done": False},
        {"model": "m", "created_at": "<ts>", "response": "lo", "done": False},
        {"model": "m", "created_at": "<ts>", "response": "", "done": True, "done_reason": "stop",
         "total_duration": "<ns>", "load_duration": "<ns>", "prompt_eval_count": 2, "prompt_eval_duration": "<ns>",
         "eval_count": 2, "eval_duration": "<ns>"}]


def test_stream_durations_measured_from_start():
    started = time.monotonic_ns() - 3_000_000
    final = run_stream([chunk({"content": "x"})], started_ns=started)[-1]
    assert final["total_duration"] >= 3_000_000
    assert final["prompt_eval_duration"] >= 3_000_000  # time to first token counts as prompt evaluation
    assert final["total_duration"] == final["prompt_eval_duration"] + final["eval_duration"]


def test_stream_fail_emits_one_error_line_then_nothing():
    stream = ChatToOllamaStream("m")
    assert parse_lines(stream.feed(chunk({"content": "partial"})))[0]["message"]["content"] == "partial"
    assert parse_lines(stream.fail("upstream died")) == [{"error": "upstream died"}]
    assert stream.fail("again") == [] and stream.finish() == [] and stream.feed(chunk({"content": "x"})) == []


def test_stream_upstream_error_chunk_becomes_error_line():
    stream = ChatToOllamaStream("m")
    err = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert parse_lines(stream.feed(err)) == [{"error": "boom"}]
    assert stream.finish() == []


def test_stream_tolerates_usage_only_and_empty_choice_chunks():
    stream = ChatToOllamaStream("m")
    assert stream.feed({"choices": []}) == []
    assert stream.feed({"choices": [{"index": 0, "delta": {}}]}) == []
    assert stream.feed({"choices": [{"index": 1, "delta": {"content": "second choice"}}]}) == []


# --- embeddings, tags, show -------------------------------------------------------------------


def test_embed_request_and_legacy_prompt_match_golden():
    case = load("embed.json")
    assert ollama_embed_to_embeddings_request(case["request"]) == case["expected_request"]
    assert ollama_embed_to_embeddings_request(case["legacy_request"]) == case["expected_legacy_request"]


@pytest.mark.parametrize("body, param", [({"model": "e"}, "input"), ({"model": "e", "input": [1, 2]}, "input"),
                                         ({"model": "e", "prompt": 5}, "prompt")])
def test_embed_request_rejects_missing_or_non_text_input(body, param):
    with pytest.raises(InvalidRequest) as err:
        ollama_embed_to_embeddings_request(body)
    assert err.value.param == param


def test_embed_response_orders_by_index_and_decodes_base64():
    case = load("embed.json")
    out = embeddings_to_ollama_embed_response(case["response"], "openai:text-embedding-3-small")
    assert out == case["expected_response"]
    assert embeddings_to_ollama_legacy_response(case["response"]) == {"embedding": [0.25, -0.125]}
    assert embeddings_to_ollama_legacy_response({"data": []}) == {"embedding": []}


def test_embed_response_base64_decodes_little_endian_float32():
    vec = [0.1, -2.5, 3.75]
    b64 = base64.b64encode(struct.pack("<3f", *vec)).decode()
    out = embeddings_to_ollama_embed_response({"data": [{"index": 0, "embedding": b64}]}, "e")
    assert out["embeddings"][0] == pytest.approx(vec, rel=1e-6)
    assert out["prompt_eval_count"] == 0


def test_tags_entry_has_stable_digest_and_ollama_fields():
    entry = ollama_tags_entry("openai:gpt-4o")
    assert entry["name"] == entry["model"] == "openai:gpt-4o" and entry["size"] == 0
    assert entry["digest"] == hashlib.sha256(b"openai:gpt-4o").hexdigest() == ollama_tags_entry("openai:gpt-4o")["digest"]
    assert RFC3339_Z.match(entry["modified_at"])
    assert set(entry["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                     "quantization_level"}
    assert entry["details"]["family"] == "openai"


def test_show_response_has_non_null_model_info_and_tools_capability():
    show = ollama_show_response("openai:gpt-4o", "open_ai_compatible")
    assert show["model_info"] == {} and show["template"] == "" and "tools" in show["capabilities"]
    assert {"modelfile", "parameters", "template", "details", "model_info", "capabilities"} <= set(show)
    assert show["details"]["parameter_size"] == "" and show["details"]["quantization_level"] == ""


# --- the official ollama client's models accept what we produce -------------------------------


def test_official_ollama_client_models_accept_our_objects():
    ollama = pytest.importorskip("ollama")
    chat = chat_to_ollama_chat_response(load("chat_response_tool_calls.json")["input"], "m", time.monotonic_ns())
    parsed = ollama.ChatResponse.model_validate(chat)
    assert parsed.message.tool_calls[0].function.arguments == {"city": "Tokyo", "days": [1, 2]}
    assert parsed.message.thinking == "need weather" and parsed.done_reason == "stop"

    gen = chat_to_ollama_generate_response(load("generate_response.json")["input"], "m")
    assert ollama.GenerateResponse.model_validate(gen).response == '{"ok": true}'

    stream = ChatToOllamaStream("m")
    lines = [line for c in load("stream_chat.json")["chunks"] for line in stream.feed(c)] + stream.finish()
    for obj in parse_lines(lines):
        ollama.ChatResponse.model_validate(obj)
    gstream = ChatToOllamaStream("m", generate=True)
    for obj in parse_lines(gstream.feed(chunk({"content": "x"})) + gstream.finish()):
        ollama.GenerateResponse.model_validate(obj)

    embed = embeddings_to_ollama_embed_response(load("embed.json")["response"], "e")
    assert ollama.EmbedResponse.model_validate(embed).embeddings[1] == [0.5, -1.0]
    legacy = embeddings_to_ollama_legacy_response(load("embed.json")["response"])
    assert ollama.EmbeddingsResponse.model_validate(legacy).embedding == [0.25, -0.125]

    tags = ollama.ListResponse.model_validate({"models": [ollama_tags_entry("openai:gpt-4o"),
                                                          ollama_tags_entry("plain-model")]})
    assert tags.models[0].model == "openai:gpt-4o" and tags.models[0].size == 0
    assert tags.models[0].modified_at is not None and tags.models[0].details.family == "openai"

    show = ollama.ShowResponse.model_validate(ollama_show_response("openai:gpt-4o", "open_ai_compatible"))
    assert show.modelinfo == {} and show.capabilities == ["completion", "tools"]
    assert show.modified_at is not None and show.details.parameter_size == ""


def test_num_predict_zero_and_odd_usage_values_are_harmless():
    out = ollama_chat_to_chat_request({"model": "m", "messages": [], "options": {"num_predict": 0}})
    assert "max_tokens" not in out
    resp = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "many", "completion_tokens": None}}
    out = chat_to_ollama_chat_response(resp, "m")
    assert (out["prompt_eval_count"], out["eval_count"]) == (0, 0)


@pytest.mark.parametrize("body, generate, expected", [
    ({"model": "m", "messages": []}, False, True),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, False, False),
    ({"model": "m"}, False, False),  # no messages at all is a bad request, not a load
    ({"model": "m"}, True, True),
    ({"model": "m", "prompt": ""}, True, True),
    ({"model": "m", "prompt": "hi"}, True, False),
    ({"model": "m", "system": "be brief"}, True, False),
    ({"model": "m", "images": ["iVBORw0KGgo="]}, True, False),
    ("not a dict", True, False),
])
def test_ollama_load_request_recognises_only_the_load_call(body, generate, expected):
    assert ollama_load_request(body, generate) is expected


def test_ollama_load_response_says_load_or_unload_in_the_right_shape():
    chat = ollama_load_response({"model": "m", "messages": []}, "p:m")
    assert chat["message"] == {"role": "assistant", "content": ""} and "response" not in chat
    assert (chat["model"], chat["done"], chat["done_reason"]) == ("p:m", True, "load")
    assert RFC3339_Z.match(chat["created_at"])
    gen = ollama_load_response({"model": "m", "keep_alive": 0}, "p:m", generate=True)
    assert gen["response"] == "" and "message" not in gen and gen["done_reason"] == "unload"
    assert ollama_load_response({"keep_alive": "5m"}, "p:m")["done_reason"] == "load"
