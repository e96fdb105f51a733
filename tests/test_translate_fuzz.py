"""Translators against bodies of any shape: a client's mistake is an InvalidRequest (→ 400), an
upstream's odd answer is read leniently, and nothing else is ever raised.

The bodies are random but seeded (the same on every run) and shaped like the real dialects:
the field names, roles and part types are the real ones, the values anything JSON allows.
"""

from __future__ import annotations

import json
import random

import pytest

from evo_gateway import GatewayError
from providers import cli
from providers import translate as tr

CASES = 2500

ROLES = ["user", "assistant", "system", "developer", "tool", "function", "", None, 3, {"x": 1}, ["user"]]
TYPES = ["text", "image_url", "image", "tool_use", "tool_result", "input_text", "output_text", "input_image",
         "thinking", "document", "function_call", "function_call_output", "custom_tool_call", "message",
         "refusal", "namespace", "function", "custom", "x", None, 1, {"t": 1}]
KEYS = ["text", "type", "content", "image_url", "url", "source", "id", "name", "input", "tool_use_id", "arguments",
        "call_id", "output", "role", "data", "media_type", "tool_calls", "function", "parameters", "is_error",
        "thinking", "images", "namespace", "tools", "index", "delta", "message", "usage", "choices", "finish_reason",
        "prompt_tokens_details", "completion_tokens_details", "reasoning_content", "partial_json", "content_block"]
SCALARS = [None, True, False, 0, -1, 1.5, "", "x", "{", "{}", 10**30, "\ud800", [], {}]


def value(rng: random.Random, depth: int = 0):
    """Any JSON value, biased toward the objects the dialects use."""
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice(SCALARS)
    if r < 0.6:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return obj(rng, depth + 1)


def obj(rng: random.Random, depth: int = 0) -> dict:
    out = {"type": rng.choice(TYPES)} if rng.random() < 0.8 else {}
    for _ in range(rng.randint(0, 4)):
        out[rng.choice(KEYS)] = value(rng, depth + 1)
    return out


def message(rng: random.Random) -> dict:
    msg = obj(rng, 1)
    msg["role"] = rng.choice(ROLES)
    msg["content"] = rng.choice(["hi", [obj(rng, 1) for _ in range(rng.randint(0, 3))], value(rng, 1)])
    return msg


def request_body(rng: random.Random) -> dict:
    body = {"model": rng.choice(["m", value(rng, 2)]),
            "messages": [message(rng) for _ in range(rng.randint(1, 4))] if rng.random() < 0.8 else value(rng)}
    for key in ("stream", "max_tokens", "tools", "tool_choice", "system", "input", "prompt", "stop",
                "stop_sequences", "temperature", "format", "options", "images", "instructions", "reasoning",
                "thinking", "text", "store", "suffix", "raw", "keep_alive"):
        if rng.random() < 0.3:
            body[key] = rng.choice([value(rng), [message(rng), obj(rng)], [obj(rng) for _ in range(2)]])
    return body


def chat_answer(rng: random.Random) -> dict:
    """A chat.completion or chunk with real keys and any values."""
    choice = {"index": rng.choice([0, 1, None, "0"]), "finish_reason": rng.choice(["stop", "tool_calls", None, 3]),
              "message": rng.choice([message(rng), value(rng)]), "delta": rng.choice([obj(rng), value(rng)])}
    answer = {k: value(rng) for k in ("id", "model", "created", "usage") if rng.random() < 0.5}
    answer["choices"] = rng.choice([[choice], value(rng)])
    return answer


def fresh(body):
    return json.loads(json.dumps(body))  # translators get their own copy, as from json.loads


REQUEST_TRANSLATORS = {
    "anthropic_to_chat_request": tr.anthropic_to_chat_request,
    "chat_to_anthropic_request": tr.chat_to_anthropic_request,
    "responses_to_chat_request": tr.responses_to_chat_request,
    "ollama_chat_to_chat_request": tr.ollama_chat_to_chat_request,
    "ollama_generate_to_chat_request": tr.ollama_generate_to_chat_request,
    "ollama_embed_to_embeddings_request": tr.ollama_embed_to_embeddings_request,
    "estimate_anthropic_tokens": tr.estimate_anthropic_tokens,
    "anthropic_tool_name_map": tr.anthropic_tool_name_map,
    "tool_map_for": tr.tool_map_for,
    "ChatToResponsesStream": tr.ChatToResponsesStream,
}


@pytest.mark.parametrize("name", sorted(REQUEST_TRANSLATORS))
def test_request_translators_answer_any_body_or_raise_invalid_request(name):
    translate = REQUEST_TRANSLATORS[name]
    rng = random.Random(name)
    for _ in range(CASES):
        body = request_body(rng)
        try:
            translate(fresh(body))
        except tr.InvalidRequest:
            pass
        except Exception as e:  # pragma: no cover - the failure report
            pytest.fail(f"{name} raised {type(e).__name__}: {e} for {json.dumps(body)[:500]}")


def test_cli_prompt_rendering_answers_any_messages_or_a_400():
    rng = random.Random("render_prompt")
    for _ in range(CASES):
        messages = request_body(rng)["messages"]
        try:
            cli.render_prompt(fresh(messages))
        except GatewayError as e:
            assert e.status == 400
        except Exception as e:  # pragma: no cover
            pytest.fail(f"render_prompt raised {type(e).__name__}: {e} for {json.dumps(messages)[:500]}")


def test_response_translators_read_any_upstream_answer():
    rng = random.Random("responses")
    request = {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}]}
    for _ in range(CASES):
        answer = chat_answer(rng)
        chunks = [chat_answer(rng) for _ in range(rng.randint(1, 4))]
        try:
            tr.chat_to_anthropic_response(fresh(answer), "m", tool_names={})
            tr.chat_to_responses_response(fresh(answer), request)
            tr.chat_to_ollama_chat_response(fresh(answer), "m", 0)
            tr.chat_to_ollama_generate_response(fresh(answer), "m", 0)
            tr.anthropic_to_chat_response(fresh(obj(rng)))
            for stream in (tr.ChatToAnthropicStream("m", input_tokens=1, tool_names={}),
                           tr.ChatToResponsesStream(request), tr.ChatToOllamaStream("m", False, 0)):
                for chunk in chunks:
                    stream.feed(fresh(chunk))
                stream.finish()
            anthropic = tr.AnthropicToChatStream("m")
            for event in [obj(rng) for _ in range(rng.randint(1, 6))]:
                anthropic.feed(event.get("type"), event)
            anthropic.finish()
        except tr.UpstreamStreamError:
            pass  # an Anthropic `error` event: the stream's own failure, reported as such
        except Exception as e:  # pragma: no cover
            pytest.fail(f"{type(e).__name__}: {e} for {json.dumps(answer)[:300]} / {json.dumps(chunks)[:300]}")


@pytest.mark.parametrize("parser", [cli.ClaudeEventParser, cli.CodexEventParser, cli.CursorEventParser])
def test_cli_event_parsers_read_any_json_event(parser):
    rng = random.Random(parser.__name__)
    kinds = ["system", "assistant", "user", "result", "stream_event", "item.started", "item.completed",
             "turn.completed", "turn.failed", "error", "thread.started", "tool_call", "x"]
    for _ in range(CASES):
        events = []
        for _ in range(rng.randint(1, 6)):
            event = obj(rng)
            event["type"] = rng.choice(kinds)
            for key in ("message", "item", "event", "msg", "usage", "result", "subtype", "error"):
                if rng.random() < 0.3:
                    event[key] = value(rng)
            events.append(event)
        p = parser()
        try:
            for event in events:
                p.feed(fresh(event))
        except Exception as e:  # pragma: no cover
            pytest.fail(f"{parser.__name__} raised {type(e).__name__}: {e} for {json.dumps(events)[:500]}")
