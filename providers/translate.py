"""Pure translators between the dialects the gateway speaks; OpenAI Chat Completions is the hub.

Every function here is data in, data out: no sockets, no clock reads that matter to tests
beyond ids and timestamps. Request translators take the client's parsed JSON body and return
the body to send upstream; response translators take the upstream's parsed JSON and return
the client's. Stream translators are small classes fed one upstream event at a time; they
return the wire-ready bytes (SSE frames or NDJSON lines) to send to the client, so the
server writes them as they come.

Sections, in order: shared helpers · Anthropic Messages ⇄ Chat · Ollama ⇄ Chat ·
Responses ⇄ Chat.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import struct
import time
import uuid
from typing import Any

from evo_http import BAD_JSON, json_bytes

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


class InvalidRequest(ValueError):
    """A client body the translator cannot honour; the gateway answers 400 with this message.

    `param` names the offending field when there is one (OpenAI's envelope carries it).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def as_list(value: Any) -> list:
    """`value` when it is a list, else empty: optional lists are read leniently."""
    return value if isinstance(value, list) else []


def as_dict(value: Any) -> dict:
    """`value` when it is an object, else empty: optional objects are read leniently."""
    return value if isinstance(value, dict) else {}


def _require_list(body: dict, field: str) -> None:
    """A top-level field that must be a list when present (a client mistake otherwise)."""
    if body.get(field) is not None and not isinstance(body[field], list):
        raise InvalidRequest(f"{field}: must be a list", param=field)


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame: an optional `event:` line, one single-line `data:` line, a blank line."""
    payload = data.encode() if isinstance(data, str) else json_bytes(data)
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def ndjson(data: Any) -> bytes:
    """One NDJSON line (Ollama's stream framing)."""
    return json_bytes(data) + b"\n"


# ---------------------------------------------------------------------------------------------
# Anthropic Messages ⇄ Chat
# ---------------------------------------------------------------------------------------------
#
# Facts live in WIRE.md §4 (Anthropic Messages) and §5 (the mapping). Direction names read
# "source_to_target": anthropic_to_chat_request turns a Claude Code request into the hub
# (OpenAI chat) request; chat_to_anthropic_* turn the hub's answers back into Anthropic's.


_ANT_TOOL_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")
_ANT_TOOL_NAME_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ANT_DATA_URL = re.compile(r"^data:([^;,]+)?(?:;[^,]*)?;base64,(.*)$", re.DOTALL)

# Anthropic stop_reason → OpenAI finish_reason (WIRE §5.5).
_ANT_TO_CHAT_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}
# OpenAI finish_reason → Anthropic stop_reason (WIRE §5.2).
_CHAT_TO_ANT_STOP = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
    "function_call": "tool_use", "content_filter": "refusal",
}
# reasoning_effort → thinking budget (LiteLLM's buckets, WIRE §5.4).
_ANT_EFFORT_BUDGET = {"low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192}
_ANT_DEFAULT_MAX_TOKENS = 4096
# A flat per-image guess for token estimates: Anthropic bills about w*h/750, ~1,600 at most.
_ANT_IMAGE_TOKEN_GUESS = 1600


class UpstreamStreamError(Exception):
    """An Anthropic upstream reported an error in the middle of a stream (`event: error`).

    `error_type` is Anthropic's error type (``overloaded_error``, ``api_error``…) so the
    gateway can render it in the client's own dialect.
    """

    def __init__(self, message: str, error_type: str = "api_error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


def _ant_text_of(content: Any, sep: str = "\n\n") -> str:
    """Plain text of a string or a list of text-bearing blocks/parts; other parts are ignored."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str) and part.get("type", "text") in (
                "text", "input_text", "output_text"):
            texts.append(part["text"])
    return sep.join(t for t in texts if t)


def _ant_tool_id(raw: Any) -> str:
    """An Anthropic-valid tool id (`^[a-zA-Z0-9_-]+$`) for an upstream id such as `functions.Bash:0`.

    The substitution is deterministic so the id Claude Code sends back in `tool_result` is the
    very one the history's `tool_use` carries; both go upstream unchanged and still pair up.
    """
    if isinstance(raw, str) and raw:
        return _ANT_TOOL_ID_BAD.sub("_", raw)
    return "toolu_" + uuid.uuid4().hex[:24]


def _chat_tool_name(name: str) -> str:
    """An OpenAI-valid function name (`^[a-zA-Z0-9_-]{1,64}$`) for an Anthropic tool name.

    Long MCP names (`mcp__server__tool…`) are cut to a 55-char prefix plus an 8-hex digest of
    the full name, so the result is stable across requests; see `anthropic_tool_name_map`.
    """
    if _ANT_TOOL_NAME_OK.fullmatch(name):
        return name
    # The digest keeps two long names with a common prefix apart (and makes it reversible via the map).
    clean = _ANT_TOOL_ID_BAD.sub("_", name) or "tool"
    # surrogatepass: a lone surrogate (a legal JSON escape) still hashes, to the same digest each time
    return clean[:55] + "_" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def anthropic_tool_name_map(body: dict) -> dict[str, str]:
    """Map each shortened upstream tool name back to the Anthropic name it stands for.

    `anthropic_to_chat_request` renames tools whose names OpenAI would reject; pass this map as
    `tool_names=` to `chat_to_anthropic_response` / `ChatToAnthropicStream` so the client sees its
    own names again. Names that needed no change are not in the map.
    """
    names = set()
    for tool in as_list(body.get("tools")):
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            names.add(tool["name"])
    for msg in as_list(body.get("messages")):
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            for block in msg["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("name"), str):
                    names.add(block["name"])
    return {_chat_tool_name(n): n for n in names if _chat_tool_name(n) != n}


def _ant_parse_arguments(arguments: Any) -> dict:
    """Tool-call arguments (JSON text) as the object Anthropic's `input` must be; never raises.

    Unparseable or non-object arguments are kept verbatim under `_raw` rather than lost, so the
    model sees what it produced when the tool complains.
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except BAD_JSON:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


def _ant_image_to_part(source: Any) -> dict | None:
    """An Anthropic image `source` as an OpenAI `image_url` part (data: URL for base64)."""
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") or "image/png"
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{source['data']}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    return None


def _ant_document_to_part(block: dict) -> dict | None:
    """An Anthropic `document` block as a text part (text source) or an OpenAI `file` part."""
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    if source.get("type") == "content":
        text = _ant_text_of(source.get("content"))
        return {"type": "text", "text": text} if text else None
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") or "application/pdf"
        return {"type": "file", "file": {"filename": block.get("title") or "document.pdf",
                                         "file_data": f"data:{media};base64,{source['data']}"}}
    return None


def _ant_tool_result_text(block: dict) -> tuple[str, list[dict]]:
    """Text for a `role:"tool"` message from a `tool_result` block, plus images it carried.

    Chat tool messages hold text only, so images are returned separately for the user message
    that follows; `is_error` has no slot in chat and is spelled out in the text instead.
    """
    content = block.get("content")
    images = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                img = _ant_image_to_part(part.get("source"))
                if img:
                    images.append(img)
        text = _ant_text_of(content, "\n")
    else:
        text = content if isinstance(content, str) else ""
    if block.get("is_error"):
        text = "Error: " + text if text else "Error"
    return text, images


def _ant_user_content(parts: list[dict]) -> Any:
    """Chat user content: one string when it is all text (the most widely accepted form), else parts."""
    if all(p.get("type") == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _chat_repair_tool_pairs(messages: list[dict]) -> list[dict]:
    """Enforce OpenAI's rule that every tool call is answered by a tool message right after it.

    Claude Code histories can hold an interrupted tool_use with no result or a stray result;
    OpenAI-compatible servers 400 on both, so missing answers get a placeholder and orphaned
    tool messages become user text placed after the answers.
    """
    out: list[dict] = []
    pending: list[str] = []  # tool_call ids of the last assistant turn still unanswered
    orphans: list[dict] = []

    def flush() -> None:
        out.extend({"role": "tool", "tool_call_id": call_id, "content": "(no result)"} for call_id in pending)
        out.extend({"role": "user", "content": f"Tool result ({m.get('tool_call_id')}): {m['content']}"}
                   for m in orphans)
        pending.clear()
        orphans.clear()

    for msg in messages:
        if msg["role"] == "tool":
            if msg.get("tool_call_id") in pending:
                pending.remove(msg["tool_call_id"])
                out.append(msg)
            else:
                orphans.append(msg)
            continue
        flush()
        if msg["role"] == "assistant":
            pending.extend(c["id"] for c in msg.get("tool_calls") or [])
        out.append(msg)
    flush()
    return out


def anthropic_to_chat_request(body: dict) -> dict:
    """Translate an Anthropic Messages request (as Claude Code sends it) into an OpenAI chat request.

    The top-level `system` and any mid-conversation `role:"system"` messages become one leading
    system message (strict chat templates reject system turns elsewhere); `tool_result` blocks
    become `role:"tool"` messages placed before the rest of their user turn; thinking blocks,
    server tools, `top_k`, `cache_control` and other Anthropic-only fields are dropped. Raises
    `InvalidRequest` for a missing `messages` list or `max_tokens` (Anthropic requires both).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: field required (a list of messages)", param="messages")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest("max_tokens: field required (an integer)", param="max_tokens")

    system = body.get("system")
    if isinstance(system, list):
        # Claude Code's first block is billing metadata for Anthropic, not instructions; it would
        # only sit at the head of every upstream prompt (and defeat prefix caching when it varies).
        system = [b for b in system if not (isinstance(b, dict) and str(b.get("text", "")).startswith(
            "x-anthropic-billing-header:"))]
    system_texts = [_ant_text_of(system)]
    chat: list[dict] = []
    seen_results: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages.{i}: must be an object", param="messages")
        role, content = msg.get("role"), msg.get("content")
        if role == "system":
            system_texts.append(_ant_text_of(content))
            continue
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: expected user, assistant or system", param="messages")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise InvalidRequest(f"messages.{i}.content: must be a string or a list of blocks", param="messages")
        if role == "assistant":
            texts, calls = [], []
            for block in blocks:
                if not isinstance(block, dict):
                    continue
                kind = block.get("type")
                if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
                    texts.append(block["text"])
                elif kind == "tool_use":
                    calls.append({"id": str(block.get("id") or ""), "type": "function", "function": {
                        "name": _chat_tool_name(str(block.get("name") or "")),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
                # thinking / redacted_thinking / server tool blocks have no chat equivalent
            if not texts and not calls:
                continue
            out: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
            if calls:
                out["tool_calls"] = calls
            chat.append(out)
            continue
        parts: list[dict] = []
        for block in blocks:
            if isinstance(block, str):
                block = {"type": "text", "text": block}
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "tool_result":
                call_id = str(block.get("tool_use_id") or "")
                text, images = _ant_tool_result_text(block)
                parts.extend(images)
                if call_id in seen_results:  # a duplicate answer would 400 upstream
                    continue
                seen_results.add(call_id)
                chat.append({"role": "tool", "tool_call_id": call_id, "content": text})
            elif kind == "text":
                if isinstance(block.get("text"), str) and block["text"]:
                    parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                img = _ant_image_to_part(block.get("source"))
                if img:
                    parts.append(img)
            elif kind == "document":
                doc = _ant_document_to_part(block)
                if doc:
                    parts.append(doc)
            elif isinstance(block.get("text"), str) and block["text"]:
                parts.append({"type": "text", "text": block["text"]})
        if parts:
            chat.append({"role": "user", "content": _ant_user_content(parts)})

    chat = _chat_repair_tool_pairs(chat)
    system = "\n\n".join(t for t in system_texts if t)
    if system:
        chat.insert(0, {"role": "system", "content": system})

    out_body: dict[str, Any] = {}
    if "model" in body:
        out_body["model"] = body["model"]
    out_body["messages"] = chat
    out_body["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool):
            out_body[key] = body[key]
    stops = [s for s in as_list(body.get("stop_sequences")) if isinstance(s, str) and s]
    if stops:
        out_body["stop"] = stops

    _require_list(body, "tools")
    tools = []
    for tool in as_list(body.get("tools")):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            continue
        schema = tool.get("input_schema")
        # Server tools (web_search_20250305, bash_…) carry a versioned type and no schema: they
        # run on Anthropic's side and cannot be offered to another model.
        if not isinstance(schema, dict):
            if tool.get("type") not in (None, "custom"):
                continue
            schema = {"type": "object", "properties": {}}
        fn: dict[str, Any] = {"name": _chat_tool_name(tool["name"])}
        if isinstance(tool.get("description"), str) and tool["description"]:
            fn["description"] = tool["description"]
        fn["parameters"] = schema
        tools.append({"type": "function", "function": fn})
    if tools:
        out_body["tools"] = tools
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "auto":
                out_body["tool_choice"] = "auto"
            elif kind == "any":
                out_body["tool_choice"] = "required"
            elif kind == "none":
                out_body["tool_choice"] = "none"
            elif kind == "tool" and isinstance(choice.get("name"), str):
                out_body["tool_choice"] = {"type": "function", "function": {"name": _chat_tool_name(choice["name"])}}
            if choice.get("disable_parallel_tool_use") is True:
                out_body["parallel_tool_calls"] = False

    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    # Claude Code's user_id is a long composite string that length-checking servers may refuse
    # as `user`; only a short id is forwarded (it is an optional abuse-tracking hint anyway).
    if isinstance(user_id, str) and 0 < len(user_id) <= 64:
        out_body["user"] = user_id
    if body.get("stream"):
        out_body["stream"] = True
        out_body["stream_options"] = {"include_usage": True}
    return out_body


def _ant_int(value: Any) -> int:
    """A token count from upstream JSON; junk (null, strings, floats) counts as 0 rather than crashing."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _ant_usage_from_chat(usage: Any) -> dict[str, int]:
    """Anthropic usage from chat usage: Anthropic's input_tokens excludes cache reads and writes."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    prompt = _ant_int(usage.get("prompt_tokens"))
    cached = _ant_int(details.get("cached_tokens"))
    # Not standard OpenAI, but some OpenAI-compatible servers report cache writes here.
    written = _ant_int(details.get("cache_creation_tokens")) or _ant_int(details.get("cache_write_tokens"))
    return {"input_tokens": max(prompt - cached - written, 0),
            "output_tokens": _ant_int(usage.get("completion_tokens")),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}


def _ant_stop_reason(finish_reason: Any, has_tool_use: bool) -> str:
    """Anthropic stop_reason that agrees with the blocks actually sent (WIRE §5.6)."""
    if finish_reason == "length":
        return "max_tokens"  # a tool call cut off mid-arguments must not be run as if whole
    if has_tool_use:
        return "tool_use"  # Ollama-style servers say "stop" while returning tool calls
    reason = _CHAT_TO_ANT_STOP.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"
    return "end_turn" if reason == "tool_use" else reason


def _ant_message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        stem = chat_id.removeprefix("chatcmpl-")
        return "msg_" + (_ANT_TOOL_ID_BAD.sub("_", stem) or uuid.uuid4().hex[:24])
    return "msg_" + uuid.uuid4().hex[:24]


def _ant_reasoning_of(obj: dict) -> str:
    """Reasoning text from a chat message or delta, or "" when there is none.

    DeepSeek and older vLLM call it `reasoning_content`, newer vLLM and OpenRouter `reasoning`;
    only one is read because servers in transition send the same text under both names.
    """
    for key in ("reasoning_content", "reasoning"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def chat_to_anthropic_response(resp: dict, model: str, *, tool_names: dict[str, str] | None = None) -> dict:
    """Translate a chat.completion into an Anthropic message for the client asking for `model`.

    Blocks come in Anthropic's order (thinking, text, tool_use); empty text is omitted since
    Anthropic rejects empty text blocks when the history comes back. `usage` is always present
    (Claude Code crashes without it). `tool_names` maps shortened tool names back (see
    `anthropic_tool_name_map`).
    """
    choices = resp.get("choices") if isinstance(resp.get("choices"), list) else []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    names = tool_names or {}
    content: list[dict] = []
    reasoning = _ant_reasoning_of(message)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _ant_text_of(message.get("content"), "")
    if text:
        content.append({"type": "text", "text": text})
    calls = [c for c in as_list(message.get("tool_calls")) if isinstance(c, dict)]
    if isinstance(message.get("function_call"), dict):  # legacy single-call shape
        calls.append({"function": message["function_call"]})
    for call in calls:
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        name = fn.get("name") if isinstance(fn.get("name"), str) else ""
        content.append({"type": "tool_use", "id": _ant_tool_id(call.get("id")), "name": names.get(name, name),
                        "input": _ant_parse_arguments(fn.get("arguments"))})
    return {
        "id": _ant_message_id(resp.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _ant_stop_reason(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": _ant_usage_from_chat(resp.get("usage")),
    }


class _AntToolState:
    """One upstream tool call being streamed, keyed by its chat `index`."""

    __slots__ = ("block", "buffered", "call_id", "closed", "name")

    def __init__(self) -> None:
        self.call_id = ""
        self.name = ""
        self.buffered = ""  # argument text received before the block could start
        self.block: int | None = None  # Anthropic content index once started
        self.closed = False


class ChatToAnthropicStream:
    """Turn a stream of chat.completion.chunk dicts into Anthropic SSE frames (WIRE §4.4, §5.3).

    Blocks are strictly sequential with contiguous indexes; a tool block starts only once its
    name is known; `message_delta` is held until upstream usage arrives (it usually follows the
    finish chunk) or `finish()` is called; nothing is emitted after `message_stop` or `error`.
    `input_tokens` seeds message_start's usage (e.g. an estimate); `tool_names` maps shortened
    tool names back (see `anthropic_tool_name_map`).
    """

    def __init__(self, model: str, *, input_tokens: int = 0, tool_names: dict[str, str] | None = None) -> None:
        self.model = model
        self._input_tokens = input_tokens
        self._names = tool_names or {}
        self._started = False
        self._done = False
        self._next_index = 0
        self._open: tuple[str, int] | None = None  # (kind, content index) of the open block
        self._open_tool: _AntToolState | None = None
        self._tools: dict[Any, _AntToolState] = {}
        self._tool_order: list[_AntToolState] = []
        self._last_key: Any = None
        self._finish_reason: str | None = None
        self._finished = False
        self._usage: dict | None = None
        self._emitted_chars = 0  # for an output-token estimate when upstream sends no usage
        self._tool_blocks = 0

    # -- frame helpers ---------------------------------------------------------------------

    def _start(self, chunk: dict | None) -> list[bytes]:
        if self._started:
            return []
        if chunk is not None and not chunk.get("id") and not chunk.get("choices"):
            return []  # Azure's anonymous filter-results chunk: wait for one that names the message
        self._started = True
        usage = {"input_tokens": self._input_tokens, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if chunk and isinstance(chunk.get("usage"), dict) and chunk["usage"].get("prompt_tokens"):
            usage.update(_ant_usage_from_chat(chunk["usage"]), output_tokens=0)
        message = {"id": _ant_message_id(chunk.get("id") if chunk else None), "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [sse({"type": "message_start", "message": message}, event="message_start")]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index = self._open[1]
        if self._open_tool is not None:
            self._open_tool.closed = True
        self._open, self._open_tool = None, None
        return [sse({"type": "content_block_stop", "index": index}, event="content_block_stop")]

    def _open_block(self, kind: str, block: dict) -> list[bytes]:
        frames = self._close()
        index = self._next_index
        self._next_index += 1
        self._open = (kind, index)
        frames.append(sse({"type": "content_block_start", "index": index, "content_block": block},
                          event="content_block_start"))
        return frames

    def _delta(self, delta: dict) -> bytes:
        assert self._open is not None
        return sse({"type": "content_block_delta", "index": self._open[1], "delta": delta}, event="content_block_delta")

    def _stream_piece(self, kind: str, text: str) -> list[bytes]:
        """Append thinking or text, opening a block of that kind if another kind is open."""
        frames: list[bytes] = []
        if self._open is None or self._open[0] != kind:
            if kind == "thinking":
                block = {"type": "thinking", "thinking": "", "signature": ""}
            else:
                block = {"type": "text", "text": ""}
            frames += self._open_block(kind, block)
        self._emitted_chars += len(text)
        key = "thinking" if kind == "thinking" else "text"
        frames.append(self._delta({"type": key + "_delta", key: text}))
        return frames

    def _start_tool(self, tool: _AntToolState) -> list[bytes]:
        frames = self._open_block("tool_use", {"type": "tool_use", "id": _ant_tool_id(tool.call_id),
                                               "name": self._names.get(tool.name, tool.name), "input": {}})
        tool.block = self._open[1] if self._open else None
        self._open_tool = tool
        self._tool_blocks += 1
        if tool.buffered:
            frames.append(self._delta({"type": "input_json_delta", "partial_json": tool.buffered}))
            self._emitted_chars += len(tool.buffered)
            tool.buffered = ""
        return frames

    def _tool_fragment(self, call: dict) -> list[bytes]:
        key = call.get("index")
        call_id = call.get("id") if isinstance(call.get("id"), str) else ""
        if not isinstance(key, int):
            # Some servers omit `index`: a new id means a new call, otherwise continue the last one.
            if self._tool_order and not (call_id and all(t.call_id != call_id for t in self._tool_order)):
                key = self._last_key
            else:
                key = ("auto", len(self._tool_order))
        tool = self._tools.get(key)
        if tool is not None and call_id and tool.call_id and call_id != tool.call_id:
            # A reused index with a different id is a new call (seen from some Gemini/compat servers).
            key = ("dup", len(self._tool_order))
            tool = None
        if tool is None:
            tool = _AntToolState()
            self._tools[key] = tool
            self._tool_order.append(tool)
        self._last_key = key
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        if call_id and not tool.call_id:
            tool.call_id = call_id
        if isinstance(fn.get("name"), str) and fn["name"] and not tool.name:
            tool.name = fn["name"]
        args = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
        frames: list[bytes] = []
        if tool.closed:
            return frames  # fragment for a finished block: cannot reopen it (never seen from OpenAI)
        if tool.block is None:
            tool.buffered += args
            if tool.name:
                frames += self._start_tool(tool)
            return frames
        if args:  # the block is started and not closed, hence it is the open one
            self._emitted_chars += len(args)
            frames.append(self._delta({"type": "input_json_delta", "partial_json": args}))
        return frames

    def _close_all(self) -> list[bytes]:
        """Close the open block and emit tool calls still waiting for their name (if they got one)."""
        frames = self._close()
        for tool in self._tool_order:
            if tool.block is None and tool.name:
                frames += self._start_tool(tool)
                frames += self._close()
        return frames

    def _stop(self) -> list[bytes]:
        frames = self._close_all()
        usage: dict[str, int] = {}
        if self._usage is not None:
            usage.update(_ant_usage_from_chat(self._usage))
            if not self._usage.get("prompt_tokens"):
                usage.pop("input_tokens")
        if not usage.get("output_tokens"):
            usage["output_tokens"] = math.ceil(self._emitted_chars / 4)
        delta = {"stop_reason": _ant_stop_reason(self._finish_reason, self._tool_blocks > 0), "stop_sequence": None}
        frames.append(sse({"type": "message_delta", "delta": delta, "usage": usage}, event="message_delta"))
        frames.append(sse({"type": "message_stop"}, event="message_stop"))
        self._done = True
        return frames

    # -- public ----------------------------------------------------------------------------

    def feed(self, chunk: dict) -> list[bytes]:
        """Translate one parsed chat.completion.chunk into zero or more Anthropic SSE frames."""
        if self._done or not isinstance(chunk, dict):
            return []
        if isinstance(chunk.get("error"), dict):  # OpenAI-style in-band error
            err = chunk["error"]
            return self.fail(str(err.get("message") or "upstream error"))
        frames = self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices") if isinstance(chunk.get("choices"), list) else []
        for choice in choices[:1]:  # n>1 has no Anthropic equivalent; the first choice wins
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            if not self._finished:
                # Order within one chunk: thinking → text → tools (WIRE §5.3 rule 6).
                reasoning = _ant_reasoning_of(delta)
                if reasoning:
                    frames += self._stream_piece("thinking", reasoning)
                text = delta.get("content")
                if isinstance(text, str) and text:
                    frames += self._stream_piece("text", text)
                calls = delta.get("tool_calls")
                if isinstance(delta.get("function_call"), dict):
                    calls = [{"index": 0, "function": delta["function_call"]}]
                for call in calls if isinstance(calls, list) else []:
                    if isinstance(call, dict):
                        frames += self._tool_fragment(call)
            if choice.get("finish_reason") and not self._finished:
                self._finished = True
                self._finish_reason = choice["finish_reason"]
                frames += self._close_all()
        if self._finished and self._usage is not None:
            frames += self._stop()
        return frames

    def finish(self) -> list[bytes]:
        """The upstream ended normally ([DONE] or EOF): close everything and end the message."""
        if self._done:
            return []
        return self._start(None) + self._stop()

    def fail(self, message: str, error_type: str = "api_error") -> list[bytes]:
        """The upstream failed mid-stream: emit Anthropic's `error` event and end the stream there."""
        if self._done:
            return []
        self._done = True
        return [sse({"type": "error", "error": {"type": error_type, "message": message}}, event="error")]


def _ant_image_from_url(url: Any) -> dict | None:
    """An OpenAI image URL as an Anthropic image block: data: URLs → base64 source, others → url."""
    if not isinstance(url, str) or not url:
        return None
    match = _ANT_DATA_URL.match(url)
    if match:
        return {"type": "image", "source": {"type": "base64", "media_type": match.group(1) or "image/png",
                                            "data": match.group(2)}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _ant_blocks_from_chat_content(content: Any) -> list[dict]:
    """Anthropic content blocks for chat message content (string or parts); empty text is skipped."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict] = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str) and part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            img = _ant_image_from_url(image.get("url") if isinstance(image, dict) else image)
            if img:
                blocks.append(img)
        elif kind == "file" and isinstance(part.get("file"), dict):
            match = _ANT_DATA_URL.match(str(part["file"].get("file_data") or ""))
            if match:
                blocks.append({"type": "document", "source": {"type": "base64",
                                                              "media_type": match.group(1) or "application/pdf",
                                                              "data": match.group(2)}})
    return blocks


# Anthropic has no `response_format`: the JSON the client wants is asked for as the input of a
# tool the model must call, and that call comes back to the client as the message text.
JSON_ANSWER_TOOL = "json_answer"


def json_answer_tool(body: dict) -> dict | None:
    """The Anthropic tool standing for the chat request's `response_format` (json_schema or
    json_object), or None when the request asks for plain text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    spec = as_dict(fmt.get("json_schema"))
    schema = dict(spec["schema"]) if isinstance(spec.get("schema"), dict) else {}
    schema.setdefault("type", "object")  # Anthropic requires an object schema (as OpenAI does for its root)
    description = spec.get("description") if isinstance(spec.get("description"), str) else ""
    return {"name": JSON_ANSWER_TOOL, "description": description or "Give your answer as this JSON object.",
            "input_schema": schema}


def chat_to_anthropic_request(body: dict) -> dict:
    """Translate an OpenAI chat request into an Anthropic Messages request.

    System and developer messages are joined into the top-level `system`; tool messages become
    `tool_result` blocks at the head of a user turn; consecutive same-role turns are merged since
    Anthropic wants user/assistant alternation starting with a user turn. `max_tokens` defaults to
    4096 (Anthropic requires it), temperature is clamped to Anthropic's 0..1, `reasoning_effort`
    becomes a thinking budget, `response_format` a tool the model is told to call
    (`json_answer_tool`), and fields Anthropic lacks (n, logprobs, penalties, seed…) are dropped.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: field required (a list of messages)", param="messages")

    system_texts: list[str] = []
    turns: list[dict] = []  # {"role", "content": [blocks]}, merged as they are appended
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}]: must be an object", param="messages")
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system_texts.append(_ant_text_of(content))
            continue
        if role == "user":
            blocks = _ant_blocks_from_chat_content(content)
        elif role == "assistant":
            blocks = _ant_blocks_from_chat_content(content)
            if msg.get("tool_calls") is not None and not isinstance(msg["tool_calls"], list):
                raise InvalidRequest(f"messages[{i}].tool_calls: must be a list", param="messages")
            calls = [c for c in as_list(msg.get("tool_calls")) if isinstance(c, dict)]
            for call in calls:
                fn = call.get("function") if isinstance(call.get("function"), dict) else {}
                blocks.append({"type": "tool_use", "id": _ant_tool_id(call.get("id")),
                               "name": str(fn.get("name") or ""),
                               "input": _ant_parse_arguments(fn.get("arguments"))})
        elif role in ("tool", "function"):
            role = "user"
            result: dict[str, Any] = {"type": "tool_result",
                                      "tool_use_id": _ant_tool_id(msg.get("tool_call_id") or msg.get("name"))}
            text = _ant_text_of(content, "\n")
            if text:
                result["content"] = text
            blocks = [result]
        else:
            raise InvalidRequest(f"messages[{i}].role: unsupported role {role!r}", param="messages")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        # Anthropic wants a user turn's tool_result blocks before anything else in it.
        turn["content"].sort(key=lambda b: 0 if b.get("type") == "tool_result" else 1)
    if turns and turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": "."}]})
    if not turns:
        raise InvalidRequest("messages: at least one user or assistant message is required", param="messages")

    out: dict[str, Any] = {}
    if "model" in body:
        out["model"] = body["model"]
    out["messages"] = turns
    system = "\n\n".join(t for t in system_texts if t)
    if system:
        out["system"] = system
    max_tokens = body.get("max_completion_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        max_tokens = _ANT_DEFAULT_MAX_TOKENS
    out["max_tokens"] = max_tokens

    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    stops = [s for s in stops if isinstance(s, str) and s.strip()]  # Anthropic rejects blank ones
    if stops:
        out["stop_sequences"] = stops
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        out["temperature"] = min(max(float(temperature), 0.0), 1.0)
    if isinstance(body.get("top_p"), (int, float)) and not isinstance(body.get("top_p"), bool):
        out["top_p"] = body["top_p"]

    _require_list(body, "tools")
    tools = []
    for tool in as_list(body.get("tools")):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            continue  # custom / built-in tools have no Anthropic client-tool form
        schema = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
        schema = dict(schema)
        schema.setdefault("type", "object")  # Anthropic requires an object schema
        entry: dict[str, Any] = {"name": fn["name"]}
        if isinstance(fn.get("description"), str) and fn["description"]:
            entry["description"] = fn["description"]
        entry["input_schema"] = schema
        tools.append(entry)
    choice = body.get("tool_choice")
    if tools:
        out["tools"] = tools
        ant_choice: dict[str, Any] | None = None
        if choice == "none":
            ant_choice = {"type": "none"}
        elif choice == "auto":
            ant_choice = {"type": "auto"}
        elif choice == "required":
            ant_choice = {"type": "any"}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            ant_choice = {"type": "tool", "name": str(choice["function"].get("name") or "")}
        if body.get("parallel_tool_calls") is False:
            ant_choice = ant_choice or {"type": "auto"}
            if ant_choice["type"] != "none":
                ant_choice["disable_parallel_tool_use"] = True
        if ant_choice:
            out["tool_choice"] = ant_choice
    answer_tool = json_answer_tool(body)
    if answer_tool and not any(t["name"] == JSON_ANSWER_TOOL for t in tools):
        out["tools"] = tools + [answer_tool]
        if not tools:  # with tools of its own the model may still need them first
            out["tool_choice"] = {"type": "tool", "name": JSON_ANSWER_TOOL}

    budget = _ANT_EFFORT_BUDGET.get(body.get("reasoning_effort"))  # type: ignore[arg-type]
    last_assistant = next((t for t in reversed(turns) if t["role"] == "assistant"), None)
    if last_assistant and any(b.get("type") == "tool_use" for b in last_assistant["content"]):
        # With thinking on, Anthropic wants the last assistant turn of a tool loop to start with
        # its signed thinking block, which chat history cannot carry: think on the next turn instead.
        budget = None
    if budget:
        # Anthropic: budget < max_tokens, default temperature, no forced tool choice with thinking.
        if out["max_tokens"] <= budget:
            out["max_tokens"] = budget + out["max_tokens"]
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        out.pop("temperature", None)
        out.pop("top_p", None)
        if out.get("tool_choice", {}).get("type") in ("any", "tool"):
            out["tool_choice"] = {"type": "auto"}

    if body.get("stream"):
        out["stream"] = True
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    return out


def _chat_usage_from_ant(usage: Any) -> dict:
    """Chat usage from Anthropic usage: chat's prompt_tokens includes cache reads and writes."""
    usage = usage if isinstance(usage, dict) else {}
    read = _ant_int(usage.get("cache_read_input_tokens"))
    written = _ant_int(usage.get("cache_creation_input_tokens"))
    prompt = _ant_int(usage.get("input_tokens")) + read + written
    completion = _ant_int(usage.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read}}


def _chat_id(message_id: Any) -> str:
    if isinstance(message_id, str) and message_id:
        return "chatcmpl-" + message_id.removeprefix("msg_")
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def anthropic_to_chat_response(resp: dict, *, created: int | None = None, json_answer: bool = False) -> dict:
    """Translate an Anthropic message into a chat.completion.

    Text blocks are joined, tool_use blocks become tool_calls with JSON-text arguments, and
    thinking text becomes `message.reasoning_content` (non-standard, as DeepSeek and vLLM send
    it); redacted thinking is dropped. With `json_answer` (the request had a `response_format`)
    the `JSON_ANSWER_TOOL` call is the answer: its input is the message text. `created`
    defaults to the current time; tests pass a fixed value.
    """
    texts, calls, thinking = [], [], []
    for block in as_list(resp.get("content")):
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif block.get("type") == "tool_use" and json_answer and block.get("name") == JSON_ANSWER_TOOL:
            texts = [json.dumps(block.get("input") or {}, ensure_ascii=False)]  # the answer, not the preamble
        elif block.get("type") == "tool_use":
            calls.append({"id": str(block.get("id") or ""), "type": "function", "function": {
                "name": str(block.get("name") or ""),
                "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    message["refusal"] = None
    if "".join(thinking):
        message["reasoning_content"] = "".join(thinking)
    finish = _ANT_TO_CHAT_FINISH.get(resp.get("stop_reason"), "stop")  # type: ignore[arg-type]
    if calls and finish == "stop":
        finish = "tool_calls"
    elif not calls and finish == "tool_calls":  # only the JSON answer was "called"
        finish = "stop"
    return {
        "id": _chat_id(resp.get("id")),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": resp.get("model") or "",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _chat_usage_from_ant(resp.get("usage")),
    }


class AnthropicToChatStream:
    """Turn Anthropic stream events into chat.completion.chunk dicts (WIRE §5.5).

    Tool calls are numbered 0,1,… among tool_use blocks only; thinking deltas become
    `delta.reasoning_content` (non-standard, read by many chat clients and by the gateway's own
    Responses/Ollama/Anthropic translators); the finish chunk comes from `message_delta` and a
    final usage chunk (`choices: []`) from `message_stop`. An `error` event raises
    `UpstreamStreamError`. `created` defaults to now.
    """

    def __init__(self, model: str, *, created: int | None = None, json_answer: bool = False) -> None:
        self.model = model
        self.json_answer = json_answer  # the JSON_ANSWER_TOOL call streams as the message text
        self._answer_blocks: set[int] = set()
        self.created = int(time.time()) if created is None else created
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self._started = False
        self._done = False
        self._finish_sent = False
        self._usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}  # Anthropic block index → chat tool index
        self._tool_input: dict[int, Any] = {}  # inputs given whole in content_block_start
        self._tool_streamed: set[int] = set()
        self._stop_reason: str | None = None

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def _first(self) -> list[dict]:
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def _finish_chunk(self) -> list[dict]:
        if self._finish_sent:
            return []
        self._finish_sent = True
        reason = _ANT_TO_CHAT_FINISH.get(self._stop_reason or "", "stop")
        if self._tool_index and reason == "stop":
            reason = "tool_calls"
        elif not self._tool_index and reason == "tool_calls":  # only the JSON answer was "called"
            reason = "stop"
        return [self._chunk({}, reason)]

    def _usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": _chat_usage_from_ant(self._usage)}

    def feed(self, event: str, data: dict) -> list[dict]:
        """Translate one Anthropic SSE event (name and parsed data) into chat chunk dicts."""
        if self._done:
            return []
        data = data if isinstance(data, dict) else {}
        name = event or data.get("type") or ""
        if name == "error":
            err = data.get("error") if isinstance(data.get("error"), dict) else {}
            self._done = True
            raise UpstreamStreamError(str(err.get("message") or "upstream stream error"),
                                      str(err.get("type") or "api_error"))
        if name == "message_start":
            message = data.get("message") if isinstance(data.get("message"), dict) else {}
            if isinstance(message.get("id"), str) and message["id"]:
                self.id = _chat_id(message["id"])
            if isinstance(message.get("usage"), dict):
                self._usage.update({k: v for k, v in message["usage"].items() if isinstance(v, int)})
            return self._first()
        if name not in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                        "message_stop"):
            return []  # ping, and event types newer than this code (clients must ignore them)
        out = self._first()
        if name == "content_block_start":
            block = data.get("content_block") if isinstance(data.get("content_block"), dict) else {}
            index = data.get("index")
            if (block.get("type") == "tool_use" and isinstance(index, int) and self.json_answer
                    and block.get("name") == JSON_ANSWER_TOOL):
                self._answer_blocks.add(index)
                if block.get("input"):
                    self._tool_input[index] = block["input"]
            elif block.get("type") == "tool_use" and isinstance(index, int):
                k = len(self._tool_index)
                self._tool_index[index] = k
                if block.get("input"):
                    self._tool_input[index] = block["input"]
                out.append(self._chunk({"tool_calls": [{"index": k, "id": str(block.get("id") or ""),
                                                        "type": "function",
                                                        "function": {"name": str(block.get("name") or ""),
                                                                     "arguments": ""}}]}))
            elif block.get("type") == "text" and block.get("text"):
                out.append(self._chunk({"content": block["text"]}))
        elif name == "content_block_delta":
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            index = data.get("index") if isinstance(data.get("index"), int) else None
            if delta.get("type") == "text_delta" and delta.get("text"):
                out.append(self._chunk({"content": delta["text"]}))
            elif delta.get("type") == "thinking_delta" and isinstance(delta.get("thinking"), str) and delta["thinking"]:
                out.append(self._chunk({"reasoning_content": delta["thinking"]}))
            elif delta.get("type") == "input_json_delta" and index in self._answer_blocks:
                if isinstance(delta.get("partial_json"), str) and delta["partial_json"]:
                    self._tool_streamed.add(index)
                    out.append(self._chunk({"content": delta["partial_json"]}))
            elif delta.get("type") == "input_json_delta" and index in self._tool_index:
                fragment = delta.get("partial_json")
                if isinstance(fragment, str) and fragment:
                    self._tool_streamed.add(index)
                    out.append(self._chunk({"tool_calls": [{"index": self._tool_index[index],
                                                            "function": {"arguments": fragment}}]}))
            # signature_delta / citations_delta: no chat equivalent
        elif name == "content_block_stop":
            index = data.get("index") if isinstance(data.get("index"), int) else None
            if index in self._tool_input and index not in self._tool_streamed:
                # Input given whole at block start and never streamed: send it as one fragment.
                arguments = json.dumps(self._tool_input[index], ensure_ascii=False)
                if index in self._answer_blocks:
                    out.append(self._chunk({"content": arguments}))
                else:
                    out.append(self._chunk({"tool_calls": [{"index": self._tool_index[index],
                                                            "function": {"arguments": arguments}}]}))
        elif name == "message_delta":
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            if isinstance(delta.get("stop_reason"), str):
                self._stop_reason = delta["stop_reason"]
            if isinstance(data.get("usage"), dict):
                self._usage.update({k: v for k, v in data["usage"].items() if isinstance(v, int)})
            out += self._finish_chunk()
        elif name == "message_stop":
            out += self._finish_chunk()
            out.append(self._usage_chunk())
            self._done = True
        return out

    def finish(self) -> list[dict]:
        """The upstream stream ended (EOF): emit the finish chunk and usage if message_stop never came."""
        if self._done:
            return []
        self._done = True
        return self._first() + self._finish_chunk() + [self._usage_chunk()]


def _ant_block_chars(block: Any) -> tuple[int, int]:
    """(characters, images) counted for one Anthropic content block in a token estimate."""
    if isinstance(block, str):
        return len(block), 0
    if not isinstance(block, dict):
        return 0, 0
    kind = block.get("type")
    if kind == "image":
        return 0, 1
    if kind == "tool_use":
        return len(str(block.get("name") or "")) + len(json.dumps(block.get("input") or {})), 0
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            chars = images = 0
            for part in content:
                c, n = _ant_block_chars(part)
                chars, images = chars + c, images + n
            return chars, images
        return len(content) if isinstance(content, str) else 0, 0
    for key in ("text", "thinking"):
        if isinstance(block.get(key), str):
            return len(block[key]), 0
    return 0, 0


def estimate_anthropic_tokens(body: dict) -> int:
    """ESTIMATE the input tokens of an Anthropic request for `/v1/messages/count_tokens`.

    Used for providers that cannot count (anything but Anthropic): characters of the system
    prompt, message text, tool inputs/results and the tools' JSON, divided by 4 and rounded up,
    plus a flat 1,600 per image. It is a rough guide for Claude Code's context meter, not a bill;
    always at least 1.
    """
    chars = len(_ant_text_of(body.get("system")))
    images = 0
    for msg in as_list(body.get("messages")):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        for block in [content] if isinstance(content, str) else content if isinstance(content, list) else []:
            c, n = _ant_block_chars(block)
            chars, images = chars + c, images + n
    if body.get("tools"):
        chars += len(json.dumps(body["tools"], ensure_ascii=False))
    return max(1, math.ceil(chars / 4) + images * _ANT_IMAGE_TOKEN_GUESS)


# ---------------------------------------------------------------------------------------------
# Ollama ⇄ Chat
# ---------------------------------------------------------------------------------------------
#
# Ollama's native API (/api/chat, /api/generate, /api/embed, /api/tags, /api/show) is mapped
# onto OpenAI Chat Completions. The differences that matter: Ollama streams unless told
# `stream: false`; images are bare base64 strings beside the text; tool-call arguments are JSON
# objects, not strings, and carry no ids; tool results name the tool instead of the call id;
# answers stream as NDJSON lines whose last line carries the counts and nanosecond durations.

# Magic bytes → mime type for Ollama's bare base64 images (OpenAI wants a data: URL with a type).
_OLLAMA_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

# Ollama option name → OpenAI chat field, for the options whose meaning is the same on both ends.
_OLLAMA_DIRECT_OPTIONS = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty")


def _ollama_image_mime(b64: str) -> str:
    """Sniff the image type from the first decoded bytes; PNG when unknown or undecodable."""
    head = "".join(b64[:64].split())[:16]  # 16 base64 chars → 12 bytes, enough for RIFF....WEBP
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        return "image/png"
    for magic, mime in _OLLAMA_IMAGE_MAGIC:
        if raw.startswith(magic):
            return mime
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def _ollama_image_part(image: Any, param: str) -> dict:
    """One Ollama image (bare base64, or already a data:/http URL) → an OpenAI image_url part."""
    if not isinstance(image, str) or not image:
        raise InvalidRequest(f"{param}: each image must be a non-empty base64 string", param=param)
    if image.startswith(("data:", "http://", "https://")):
        url = image  # a client that already sends a URL means it; keep its declared type
    else:
        url = f"data:{_ollama_image_mime(image)};base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _ollama_user_content(text: Any, images: Any, param: str) -> Any:
    """Text plus optional images → a plain string, or OpenAI content parts when images exist."""
    if images is None or images == []:
        return "" if text is None else text
    if not isinstance(images, list):
        raise InvalidRequest(f"{param}: must be a list of base64 strings", param=param)
    parts: list[dict] = []
    if isinstance(text, list):
        parts.extend(text)  # already OpenAI parts: keep them ahead of the images
    elif text:
        parts.append({"type": "text", "text": text})
    parts.extend(_ollama_image_part(image, param) for image in images)
    return parts


def _ollama_arguments_to_string(arguments: Any) -> str:
    """Ollama's argument object → OpenAI's JSON string (a string is taken as already encoded)."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _ollama_arguments_to_object(arguments: Any) -> dict:
    """OpenAI's argument string → Ollama's object; anything unparseable or not an object → {}.

    Ollama clients validate `arguments` as a mapping, so a model that produced broken JSON
    must still yield an object rather than crash the client or the gateway.
    """
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except BAD_JSON:
        return {}
    return value if isinstance(value, dict) else {}


def _ollama_messages_to_chat(messages: list) -> list:
    """Ollama chat messages → OpenAI messages, pairing tool results with the calls they answer.

    Ollama tool calls have no ids (newer servers add them, older clients never send them), so
    ids `call_<n>` are generated; a `tool` message takes its `tool_call_id` if given, else the
    first unanswered call of the preceding assistant turn with the same `tool_name`, else the
    first unanswered call in order, which is how Ollama clients append results.
    """
    out: list[dict] = []
    pending: list[tuple[str, str]] = []  # (id, name) of the latest assistant turn's unanswered calls
    generated = 0
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"{param}: must be an object", param="messages")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"{param}.role: required", param="messages")
        content = msg.get("content")
        if role == "user":
            out.append({"role": "user", "content": _ollama_user_content(content, msg.get("images"), f"{param}.images")})
        elif role == "assistant":
            new: dict[str, Any] = {"role": "assistant", "content": "" if content is None else content}
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise InvalidRequest(f"{param}.tool_calls: must be a list", param="messages")
            pending = []
            chat_calls = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidRequest(f"{param}.tool_calls[{j}].function.name: required", param="messages")
                call_id = call.get("id")
                if not isinstance(call_id, str) or not call_id:
                    call_id = f"call_{generated}"
                    generated += 1
                chat_calls.append({"id": call_id, "type": "function",
                                   "function": {"name": fn["name"],
                                                "arguments": _ollama_arguments_to_string(fn.get("arguments"))}})
                pending.append((call_id, fn["name"]))
            if chat_calls:
                new["tool_calls"] = chat_calls
                if not new["content"]:
                    new["content"] = None  # OpenAI's shape for a pure tool-call turn
            # `thinking` is dropped: upstreams reject or ignore reasoning echoed back as input.
            out.append(new)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                name = msg.get("tool_name")
                match = next((p for p in pending if p[1] == name), None) if name else None
                match = match or (pending[0] if pending else None)
                if match is None:
                    # No call to answer: still give it an id so the upstream can say what is wrong.
                    call_id = f"call_{generated}"
                    generated += 1
                else:
                    call_id = match[0]
            pending = [p for p in pending if p[0] != call_id]
            out.append({"role": "tool", "tool_call_id": call_id, "content": "" if content is None else content})
        else:
            # system and anything else (developer…) pass through as text; images only fit user turns.
            out.append({"role": role, "content": "" if content is None else content})
    return out


def _ollama_common_fields(body: dict, out: dict) -> dict:
    """The request fields /api/chat and /api/generate share: stream, options, format, tools."""
    stream = body.get("stream")
    out["stream"] = True if stream is None else bool(stream)  # Ollama streams unless told not to
    if out["stream"]:
        out["stream_options"] = {"include_usage": True}  # the final line needs the token counts
    options = body.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("options: must be an object", param="options")
        for name in _OLLAMA_DIRECT_OPTIONS:
            if options.get(name) is not None:
                out[name] = options[name]
        num_predict = options.get("num_predict")
        # −1 (unlimited) and −2 (fill the context) have no OpenAI spelling, and OpenAI servers
        # reject max_tokens 0: in all those cases leave the limit unset.
        if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict > 0:
            out["max_tokens"] = num_predict
        # top_k, num_ctx, repeat_penalty, num_gpu… are runtime knobs OpenAI servers do not share.
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidRequest('format: must be "json" or a JSON schema object', param="format")
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise InvalidRequest("tools: must be a list", param="tools")
        out["tools"] = [_ollama_tool_to_chat(tool, i) for i, tool in enumerate(tools)]
    # keep_alive and think are Ollama scheduler/runtime controls with no upstream meaning here.
    return out


def _ollama_tool_to_chat(tool: Any, i: int) -> dict:
    """One Ollama tool (already OpenAI-shaped) → a clean OpenAI function tool, nulls dropped."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"tools[{i}].function.name: required", param="tools")
    clean = {k: fn[k] for k in ("name", "description", "parameters", "strict") if fn.get(k) is not None}
    return {"type": "function", "function": clean}


def ollama_chat_to_chat_request(body: dict) -> dict:
    """Translate an Ollama `/api/chat` body into an OpenAI chat completions request.

    Messages keep their roles; images become `image_url` data-URL parts with a sniffed type;
    assistant tool-call argument objects become JSON strings with ids generated where missing
    and tool results are paired to them; `thinking` is dropped. `stream` defaults to true (with
    `include_usage` so the final NDJSON line has counts); options, `format` and `tools` map to
    their OpenAI equivalents, `keep_alive`/`think` and runtime-only options are dropped. Raises
    `InvalidRequest` when `messages` is missing or malformed.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: required, must be a list", param="messages")
    # An empty list is Ollama's "load the model" call; it is forwarded as is for the caller to decide.
    out: dict[str, Any] = {"model": body.get("model"), "messages": _ollama_messages_to_chat(messages)}
    return _ollama_common_fields(body, out)


def ollama_generate_to_chat_request(body: dict) -> dict:
    """Translate an Ollama `/api/generate` body into an OpenAI chat completions request.

    `system` becomes a system message and `prompt` (with any `images`) one user message; a
    missing prompt is an empty user message, as Ollama accepts it. Stream, options, format and
    tools are handled as for `/api/chat`. `raw` and `template` (prompt templating happens
    upstream), `context` (token ids of a previous answer: meaningless to another server) and
    `suffix` (fill-in-the-middle, no chat equivalent) are ignored.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt: must be a string", param="prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRequest("system: must be a string", param="system")
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _ollama_user_content(prompt, body.get("images"), "images")})
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    return _ollama_common_fields(body, out)


def _ollama_timestamp() -> str:
    """Now as RFC 3339 UTC with a `Z`, the `created_at` shape Ollama clients parse."""
    now_ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_ns // 1_000_000_000)) + f".{now_ns % 1_000_000_000:09d}Z"


def _ollama_done_reason(finish_reason: Any) -> str:
    """OpenAI finish_reason → Ollama done_reason: only `length` survives, tool calls read `stop`."""
    return "length" if finish_reason == "length" else "stop"


def _ollama_count(value: Any) -> int:
    """A token count from upstream usage; anything but a non-negative number reads 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
        return int(value)
    return 0


def _ollama_metrics(usage: Any, started_ns: int | None, first_ns: int | None = None) -> dict:
    """Counts from OpenAI usage plus durations in ns measured by the gateway (0 when unknown).

    The time before the first output token counts as prompt evaluation, the rest as
    generation; without a first-token time all of it is generation.
    """
    usage = usage if isinstance(usage, dict) else {}
    total = prompt_ns = 0
    if started_ns is not None:
        now = time.monotonic_ns()
        total = max(0, now - started_ns)
        if first_ns is not None:
            prompt_ns = min(total, max(0, first_ns - started_ns))
    return {
        "total_duration": total,
        "load_duration": 0,  # nothing is loaded by the gateway
        "prompt_eval_count": _ollama_count(usage.get("prompt_tokens")),
        "prompt_eval_duration": prompt_ns,
        "eval_count": _ollama_count(usage.get("completion_tokens")),
        "eval_duration": total - prompt_ns,
    }


def _ollama_tool_calls(calls: Any) -> list:
    """OpenAI tool calls → Ollama's, arguments as objects; the id is kept as newer Ollama does."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        entry: dict[str, Any] = {"function": {"name": fn.get("name") or "",
                                              "arguments": _ollama_arguments_to_object(fn.get("arguments"))}}
        if call.get("id"):
            entry = {"id": call["id"], **entry}
        out.append(entry)
    return out


def _ollama_first_choice(resp: Any) -> tuple[dict, Any]:
    """The first choice's message and finish_reason of a chat.completion, tolerating gaps."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    return (message if isinstance(message, dict) else {}), choice.get("finish_reason")


def _ollama_reasoning(obj: dict) -> Any:
    """Reasoning text under either name OpenAI-compatible servers use for it."""
    return obj.get("reasoning_content") or obj.get("reasoning")


def chat_to_ollama_chat_response(resp: dict, model: str, started_ns: int | None = None) -> dict:
    """Translate a non-stream OpenAI chat.completion into Ollama's `/api/chat` answer.

    The assistant message keeps its text; tool calls get their arguments parsed into objects
    (broken JSON → `{}`), reasoning text becomes `thinking`. The object is marked `done` with a
    `done_reason` (`length` or `stop`), token counts from `usage`, and durations in nanoseconds
    measured from `started_ns` (a `time.monotonic_ns()` reading), or 0 without it.
    """
    message, finish_reason = _ollama_first_choice(resp)
    content = message.get("content")
    out_msg: dict[str, Any] = {"role": "assistant", "content": content if isinstance(content, str) else ""}
    thinking = _ollama_reasoning(message)
    if isinstance(thinking, str) and thinking:
        out_msg["thinking"] = thinking
    calls = _ollama_tool_calls(message.get("tool_calls"))
    if calls:
        out_msg["tool_calls"] = calls
    out: dict[str, Any] = {"model": model, "created_at": _ollama_timestamp(), "message": out_msg,
                           "done": True, "done_reason": _ollama_done_reason(finish_reason)}
    out.update(_ollama_metrics(resp.get("usage") if isinstance(resp, dict) else None, started_ns))
    return out


def chat_to_ollama_generate_response(resp: dict, model: str, started_ns: int | None = None) -> dict:
    """Translate a non-stream OpenAI chat.completion into Ollama's `/api/generate` answer.

    Same as the chat answer but the text is the top-level `response` string (reasoning goes to
    `thinking`); tool calls have no place in this shape and are dropped. No `context` token
    array is returned, since the gateway never sees token ids.
    """
    message, finish_reason = _ollama_first_choice(resp)
    content = message.get("content")
    out: dict[str, Any] = {"model": model, "created_at": _ollama_timestamp(),
                           "response": content if isinstance(content, str) else ""}
    thinking = _ollama_reasoning(message)
    if isinstance(thinking, str) and thinking:
        out["thinking"] = thinking
    out["done"] = True
    out["done_reason"] = _ollama_done_reason(finish_reason)
    out.update(_ollama_metrics(resp.get("usage") if isinstance(resp, dict) else None, started_ns))
    return out


def ollama_load_request(body: dict, generate: bool = False) -> bool:
    """Whether an `/api/chat` or `/api/generate` body is Ollama's "load (or unload) the model" call.

    That is a chat with `messages: []`, or a generate with no prompt, system, template or
    images; `ollama run` sends one before the first prompt. An OpenAI-compatible upstream has
    nothing to load and would refuse an empty conversation, so the gateway answers it itself.
    """
    if not isinstance(body, dict):
        return False
    if not generate:
        return body.get("messages") == []
    return not any(body.get(k) for k in ("prompt", "system", "template", "images"))


def ollama_load_response(body: dict, model: str, generate: bool = False) -> dict:
    """Ollama's answer to a load call: done at once, `done_reason` `load` (`unload` for keep_alive 0)."""
    keep_alive = body.get("keep_alive") if isinstance(body, dict) else None
    unload = keep_alive in (0, "0", "0s", "0m")
    out: dict[str, Any] = {"model": model, "created_at": _ollama_timestamp()}
    if generate:
        out["response"] = ""
    else:
        out["message"] = {"role": "assistant", "content": ""}
    out["done"] = True
    out["done_reason"] = "unload" if unload else "load"
    return out


class ChatToOllamaStream:
    """Turns OpenAI chat.completion.chunk objects into Ollama NDJSON lines, one chunk at a time.

    Text and reasoning deltas go out at once, one line each. Tool-call fragments are gathered by
    index and sent as one line with whole argument objects when the finish_reason arrives (or
    at `finish()`), because Ollama clients expect calls complete. `finish()` writes the final
    `done: true` line with counts from the usage chunk and durations in ns; `fail()` writes an
    `{"error": ...}` line. After either, every call returns `[]`.
    """

    def __init__(self, model: str, generate: bool = False, started_ns: int | None = None) -> None:
        self.model = model
        self.generate = generate
        self.started_ns = started_ns
        self._first_ns: int | None = None
        self._tools: dict[int, dict] = {}  # index → {"id", "name", "args": [fragments]}
        self._usage: dict | None = None
        self._finish_reason: Any = None
        self._closed = False

    def _line(self, content: str = "", thinking: str | None = None, tool_calls: list | None = None) -> bytes:
        """One `done: false` line in the chat or generate shape."""
        if self._first_ns is None and self.started_ns is not None:
            self._first_ns = time.monotonic_ns()
        obj: dict[str, Any] = {"model": self.model, "created_at": _ollama_timestamp()}
        if self.generate:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if tool_calls:
                msg["tool_calls"] = tool_calls
            obj["message"] = msg
        obj["done"] = False
        return ndjson(obj)

    def _flush_tools(self) -> list[bytes]:
        """Emit the gathered tool calls as one line, in index order, and forget them."""
        if not self._tools:
            return []
        calls = [{"id": t["id"], "type": "function", "function": {"name": t["name"], "arguments": "".join(t["args"])}}
                 for _, t in sorted(self._tools.items())]
        self._tools = {}
        if self.generate:
            return []  # /api/generate has no field for tool calls
        return [self._line(tool_calls=_ollama_tool_calls(calls))]

    def _gather_tool_call(self, position: int, frag: Any) -> None:
        """Add one tool-call delta fragment to the call at its index."""
        if not isinstance(frag, dict):
            return
        index = frag.get("index")
        if not isinstance(index, int):
            index = position  # some servers omit index and send each call whole
        slot = self._tools.setdefault(index, {"id": None, "name": "", "args": []})
        if frag.get("id") and not slot["id"]:
            slot["id"] = frag["id"]
        fn = frag.get("function")
        if isinstance(fn, dict):
            if fn.get("name") and not slot["name"]:
                slot["name"] = fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                slot["args"].append(args)
            elif isinstance(args, dict):
                slot["args"].append(json.dumps(args, ensure_ascii=False))

    def feed(self, chunk: dict) -> list[bytes]:
        """Translate one parsed chat.completion.chunk; returns the NDJSON lines to send now."""
        if self._closed or not isinstance(chunk, dict):
            return []
        error = chunk.get("error")
        if error:
            detail = error.get("message") if isinstance(error, dict) else None
            return self.fail(str(detail or error))
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        lines: list[bytes] = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # Ollama has one answer; n > 1 extra choices are not representable
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            thinking = _ollama_reasoning(delta)
            if isinstance(thinking, str) and thinking:
                lines.append(self._line(thinking=thinking))
            content = delta.get("content")
            if isinstance(content, str) and content:
                lines.append(self._line(content=content))
            calls = delta.get("tool_calls")
            for position, frag in enumerate(calls if isinstance(calls, list) else []):
                self._gather_tool_call(position, frag)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                lines.extend(self._flush_tools())
        return lines

    def finish(self) -> list[bytes]:
        """End the stream: any pending tool calls, then the `done: true` line with the metrics."""
        if self._closed:
            return []
        lines = self._flush_tools()
        self._closed = True
        obj: dict[str, Any] = {"model": self.model, "created_at": _ollama_timestamp()}
        if self.generate:
            obj["response"] = ""
        else:
            obj["message"] = {"role": "assistant", "content": ""}
        obj["done"] = True
        obj["done_reason"] = _ollama_done_reason(self._finish_reason)
        obj.update(_ollama_metrics(self._usage, self.started_ns, self._first_ns))
        lines.append(ndjson(obj))
        return lines

    def fail(self, message: str) -> list[bytes]:
        """End the stream with Ollama's mid-stream error line `{"error": message}`."""
        if self._closed:
            return []
        self._closed = True
        return [ndjson({"error": message})]


def ollama_embed_to_embeddings_request(body: dict) -> dict:
    """Translate an Ollama `/api/embed` body (or legacy `/api/embeddings` `prompt`) into OpenAI's.

    `input` (a string or list of strings) is kept, `dimensions` is passed on and floats are
    asked for explicitly. `truncate`, `options` and `keep_alive` have no OpenAI counterpart
    and are dropped (OpenAI-compatible servers truncate or refuse on their own terms).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    text = body.get("input")
    param = "input"
    if text is None and "prompt" in body:
        text, param = body.get("prompt"), "prompt"
    if text is None:
        raise InvalidRequest("input: required", param="input")
    if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
        raise InvalidRequest(f"{param}: must be a string or a list of strings", param=param)
    out: dict[str, Any] = {"model": body.get("model"), "input": text, "encoding_format": "float"}
    dimensions = body.get("dimensions")
    if isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions > 0:
        out["dimensions"] = dimensions
    return out


def _ollama_embedding_vector(embedding: Any) -> list:
    """An OpenAI embedding as floats: a list as is, a base64 string as little-endian float32.

    Undecodable base64 raises `binascii.Error` (a ValueError): a broken upstream answer is the
    caller's 502, not an empty vector that would silently poison a search index.
    """
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4]))
    return list(embedding) if isinstance(embedding, list) else []


def embeddings_to_ollama_embed_response(resp: dict, model: str) -> dict:
    """Translate an OpenAI embeddings response into Ollama's `/api/embed` answer.

    Vectors are ordered by their `index` and decoded from base64 float32 when the upstream sent
    that form; `prompt_eval_count` is the upstream's `usage.prompt_tokens`; the durations are 0
    because the gateway has no model to time.
    """
    data = resp.get("data") if isinstance(resp, dict) else None
    items = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
    items.sort(key=lambda d: d.get("index") if isinstance(d.get("index"), int) else 0)
    usage = resp.get("usage") if isinstance(resp, dict) and isinstance(resp.get("usage"), dict) else {}
    return {
        "model": model,
        "embeddings": [_ollama_embedding_vector(d.get("embedding")) for d in items],
        "total_duration": 0,
        "load_duration": 0,
        "prompt_eval_count": _ollama_count(usage.get("prompt_tokens")),
    }


def embeddings_to_ollama_legacy_response(resp: dict) -> dict:
    """Translate an OpenAI embeddings response into legacy `/api/embeddings`: `{"embedding": [...]}`.

    The legacy endpoint embeds one prompt, so the first vector is returned (empty when none).
    """
    embeddings = embeddings_to_ollama_embed_response(resp, "")["embeddings"]
    return {"embedding": embeddings[0] if embeddings else []}


def _ollama_details(family: str) -> dict:
    """`details` for a model the gateway serves but no Ollama holds: only the family is known.

    Clients display these strings and never branch on them, so "gguf" (what every Ollama
    model reports) is safer than an unfamiliar value; sizes and quantisation stay empty.
    """
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": "", "quantization_level": ""}


def ollama_show_response(model: str, provider_type: str) -> dict:
    """A plausible `/api/show` answer for a model served by a non-Ollama provider.

    Carries every field the official client's `ShowResponse` reads; `model_info` is an empty
    object rather than null (VS Code Copilot fails on null) and `capabilities` includes
    `tools`, without which Copilot hides the model.
    """
    return {
        "modelfile": f"# served by evo-gateway through a {provider_type} provider\nFROM {model}\n",
        "parameters": "",
        "template": "",
        "details": _ollama_details(provider_type),
        "model_info": {},
        "capabilities": ["completion", "tools"],
        "modified_at": _ollama_timestamp(),
    }


def ollama_tags_entry(name: str) -> dict:
    """One `/api/tags` entry for a `provider:model` name, with a digest that is stable per name.

    Size is 0 (nothing is on disk); the family is the provider prefix of the name.
    """
    family = name.split(":", 1)[0] if ":" in name else ""
    return {
        "name": name,
        "model": name,
        "modified_at": _ollama_timestamp(),
        "size": 0,
        "digest": hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest(),
        "details": _ollama_details(family),
    }


# Responses ⇄ Chat
# ---------------------------------------------------------------------------------------------
#
# Lets a Responses client (Codex CLI, openai-python `client.responses`) talk to an upstream
# that only speaks Chat Completions. The bridge is stateless: every request must carry the
# whole conversation (Codex sends `store: false` and full history), so `previous_response_id`
# and `store: true` are refused rather than silently answered without context.

_CHAT_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NAMESPACE_SEP = "__"


def _rid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class ResponsesToolMap:
    """Reversible mapping between Responses tool identities and chat function names.

    Chat only has flat function tools whose names must match ``^[a-zA-Z0-9_-]{1,64}$``;
    Responses also has freeform `custom` tools and `namespace` tools grouping others. Each
    Responses tool (kind ``function`` or ``custom``, name, optional namespace) gets one chat
    name (``<namespace>__<name>`` for namespaced tools, sanitised and shortened with a hash
    suffix when needed). The map is rebuilt from the request with `tool_map_for`, so the
    response side can turn a chat tool call back into a `function_call` (with `namespace`)
    or a `custom_tool_call`. Lookups are table-based, never by splitting on ``__``, because
    Codex namespaces such as ``mcp__server`` already contain the separator.
    """

    def __init__(self) -> None:
        self._by_chat: dict[str, tuple[str, str, str | None]] = {}
        self._by_key: dict[tuple[str | None, str], str] = {}

    def add(self, name: str, kind: str = "function", namespace: str | None = None) -> str:
        """Register one Responses tool and return its chat function name."""
        key = (namespace, name)
        if key in self._by_key:
            return self._by_key[key]
        chat = _chat_name_for(name, namespace)
        if chat in self._by_chat:
            # Two tools sanitised to the same name: disambiguate with a hash of the identity.
            chat = _hashed_name(chat, name, namespace)
        self._by_key[key] = chat
        self._by_chat[chat] = (kind, name, namespace)
        return chat

    def chat_name(self, name: str, namespace: str | None = None) -> str:
        """Chat name for a tool seen in history; unknown tools get the same deterministic form."""
        return self._by_key.get((namespace, name)) or _chat_name_for(name, namespace)

    def find(self, name: str) -> str | None:
        """Chat name for a bare Responses tool name (tool_choice carries no namespace)."""
        if (None, name) in self._by_key:
            return self._by_key[(None, name)]
        hits = [chat for (ns, n), chat in self._by_key.items() if n == name]
        return hits[0] if len(hits) == 1 else None

    def lookup(self, chat_name: str) -> tuple[str, str, str | None]:
        """(kind, name, namespace) for a chat tool name; unknown names are plain functions."""
        return self._by_chat.get(chat_name, ("function", chat_name, None))

    def is_custom(self, chat_name: str) -> bool:
        """Whether the chat function stands for a freeform `custom` tool."""
        return self.lookup(chat_name)[0] == "custom"

    def __len__(self) -> int:
        return len(self._by_chat)


def _chat_name_for(name: str, namespace: str | None) -> str:
    raw = f"{namespace}{_NAMESPACE_SEP}{name}" if namespace else name
    if _CHAT_TOOL_NAME.match(raw):
        return raw
    clean = re.sub(r"[^a-zA-Z0-9_-]", "_", raw) or "tool"
    return clean if len(clean) <= 64 else _hashed_name(clean, name, namespace)


def _hashed_name(base: str, name: str, namespace: str | None) -> str:
    digest = hashlib.sha1(f"{namespace or ''}\x00{name}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return base[:55] + "_" + digest


def tool_map_for(body: dict) -> ResponsesToolMap:
    """Build the tool-name map for a Responses request from its `tools`.

    Only tools the bridge can express are registered: flat `function` tools, `custom` tools
    and the function/custom members of `namespace` tools. Built-ins (`web_search`,
    `local_shell`, ...) are left out because they are dropped from the chat request.
    """
    tmap = ResponsesToolMap()
    for tool in as_list(body.get("tools")):
        if not _is_named(tool):
            continue
        kind = tool.get("type")
        if kind in ("function", "custom"):
            tmap.add(tool["name"], kind)
        elif kind == "namespace":
            for sub in as_list(tool.get("tools")):
                if _is_named(sub) and sub.get("type") in ("function", "custom"):
                    tmap.add(sub["name"], sub["type"], tool["name"])
    return tmap


def _is_named(tool: Any) -> bool:
    """A tool object with a usable name (a non-empty string); others are skipped."""
    return isinstance(tool, dict) and isinstance(tool.get("name"), str) and bool(tool["name"])


def _custom_input_description(tool: dict) -> str:
    fmt = as_dict(tool.get("format"))
    if fmt.get("type") == "grammar":
        grammar = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else fmt
        syntax = grammar.get("syntax") or "lark"
        definition = grammar.get("definition") or ""
        return f"Raw input text. It must match this {syntax} grammar:\n{definition}"
    return "Raw free-form input text."


def _custom_chat_tool(chat_name: str, tool: dict, fallback_description: str | None) -> dict:
    fn: dict[str, Any] = {"name": chat_name}
    description = tool.get("description") or fallback_description
    if description:
        fn["description"] = description
    fn["parameters"] = {
        "type": "object",
        "properties": {"input": {"type": "string", "description": _custom_input_description(tool)}},
        "required": ["input"],
    }
    return {"type": "function", "function": fn}


def _function_chat_tool(chat_name: str, tool: dict, fallback_description: str | None) -> dict:
    fn: dict[str, Any] = {"name": chat_name}
    description = tool.get("description") or fallback_description
    if description:
        fn["description"] = description
    # Several OpenAI-compatible servers reject a function without a parameters schema.
    fn["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


def _chat_tools(tools: list, tmap: ResponsesToolMap) -> list[dict]:
    out: list[dict] = []
    for tool in tools:
        if not _is_named(tool):
            continue
        kind = tool.get("type")
        if kind == "function":
            out.append(_function_chat_tool(tmap.chat_name(tool["name"]), tool, None))
        elif kind == "custom":
            out.append(_custom_chat_tool(tmap.chat_name(tool["name"]), tool, None))
        elif kind == "namespace":
            ns = tool["name"]
            for sub in as_list(tool.get("tools")):
                if not _is_named(sub):
                    continue
                chat_name = tmap.chat_name(sub["name"], ns)
                if sub.get("type") == "function":
                    out.append(_function_chat_tool(chat_name, sub, tool.get("description")))
                elif sub.get("type") == "custom":
                    out.append(_custom_chat_tool(chat_name, sub, tool.get("description")))
        # Anything else (web_search, file_search, local_shell, mcp, image_generation, ...) has
        # no chat equivalent; dropping it keeps the turn working (Codex always sends web_search).
    return out


def _chat_tool_choice(choice: Any, tmap: ResponsesToolMap, chat_tools: list[dict]) -> Any:
    if isinstance(choice, str):
        return choice if choice in ("auto", "none", "required") else None
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind in ("function", "custom") and choice.get("name"):
        chat_name = tmap.find(choice["name"])
        known = {t["function"]["name"] for t in chat_tools}
        # Forcing a tool the upstream was not given would be a 400; fall back to the default.
        return {"type": "function", "function": {"name": chat_name}} if chat_name in known else None
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        # Chat has no allow-list; every expressible tool is offered, keep the mode.
        return choice["mode"]
    return None  # hosted-tool choices (web_search, mcp, ...) refer to dropped tools


def _image_part(part: dict) -> dict | None:
    url = part.get("image_url")
    if isinstance(url, dict):  # tolerate the chat-style nesting some clients send
        url = url.get("url")
    if not isinstance(url, str) or not url:
        return None  # file_id images need the Files API, which a chat upstream does not have
    image: dict[str, Any] = {"url": url}
    if part.get("detail"):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _message_content(role: str, content: Any) -> Any:
    """Chat content for a Responses message: a string, or parts when images are involved."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[dict] = []
    has_image = False
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            continue
        ptype = part.get("type")
        if ptype in ("input_text", "output_text", "text", "summary_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif ptype == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif ptype in ("input_image", "image_url") and role == "user":
            image = _image_part(part)
            if image:
                parts.append(image)
                has_image = True
        # input_file and unknown parts are skipped: chat upstreams rarely accept files.
    if has_image:
        return parts
    # Text-only content goes as one string: the most widely accepted chat form (system
    # messages in particular must be strings for many chat templates).
    return "\n".join(p["text"] for p in parts)


def _output_text_and_images(output: Any) -> tuple[str, list[dict]]:
    if isinstance(output, str):
        return output, []
    if isinstance(output, dict):  # {"content": ..., "success": ...} from older clients
        return _output_text_and_images(output.get("content", ""))
    if not isinstance(output, list):
        return ("" if output is None else json.dumps(output, ensure_ascii=False)), []
    texts: list[str] = []
    images: list[dict] = []
    for part in output:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            if part.get("type") == "input_image":
                image = _image_part(part)
                if image:
                    images.append(image)
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "\n".join(texts), images


def _input_messages(items: list, tmap: ResponsesToolMap) -> list[dict]:
    messages: list[dict] = []
    seen_calls: set[str] = set()
    # Images returned by tools cannot live in a chat `tool` message; they follow the run of
    # tool results as one user message (a user turn in between would break the ordering rule).
    pending_images: list[dict] = []

    def flush_images() -> None:
        if pending_images:
            messages.append({"role": "user", "content": list(pending_images)})
            pending_images.clear()

    def add_tool_call(call_id: str, name: str, arguments: str) -> None:
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        seen_calls.add(call_id)
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)  # merge consecutive calls / text + calls
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})

    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{i}] must be an object", param=f"input[{i}]")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in seen_calls:
                continue  # an orphan tool result makes OpenAI-style upstreams answer 400
            text, images = _output_text_and_images(item.get("output"))
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            pending_images.extend(images)
        elif kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise InvalidRequest(f"input[{i}].role {role!r} is not supported", param=f"input[{i}].role")
            content = _message_content(role, item.get("content"))
            if role != "assistant" and not content:
                continue
            flush_images()
            if role == "assistant":
                messages.append({"role": "assistant", "content": content})
            else:
                # developer is OpenAI's newer name for system; most chat servers only know system.
                messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            flush_images()
            call_id, name, namespace = _call_identity(item, i)
            arguments = item.get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
            add_tool_call(call_id, tmap.chat_name(name, namespace), arguments)
        elif kind == "custom_tool_call":
            flush_images()
            call_id, name, namespace = _call_identity(item, i)
            text = item.get("input")
            arguments = json.dumps({"input": text if isinstance(text, str) else ""}, ensure_ascii=False)
            add_tool_call(call_id, tmap.chat_name(name, namespace), arguments)
        # reasoning, web_search_call, local_shell_call, compaction, ... carry nothing a chat
        # upstream can use (encrypted reasoning is provider-specific); skip them.
    flush_images()
    # An assistant message that only held skipped parts may be left empty; drop it.
    return [m for m in messages if not (m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"))]


def _call_identity(item: dict, i: int) -> tuple[str, str, str | None]:
    """(call_id, name, namespace) of a function/custom tool call input item, each checked."""
    call_id = item.get("call_id") or item.get("id") or _rid("call_")
    name = item.get("name") or ""
    namespace = item.get("namespace")
    if not isinstance(call_id, str):
        raise InvalidRequest(f"input[{i}].call_id must be a string", param=f"input[{i}].call_id")
    if not isinstance(name, str):
        raise InvalidRequest(f"input[{i}].name must be a string", param=f"input[{i}].name")
    if namespace is not None and not isinstance(namespace, str):
        raise InvalidRequest(f"input[{i}].namespace must be a string", param=f"input[{i}].namespace")
    return call_id, name, namespace


def responses_to_chat_request(body: dict) -> dict:
    """Translate a Responses API request body into a Chat Completions request body.

    `instructions` and system/developer input messages become `system` messages, function and
    custom tool calls become assistant `tool_calls` (consecutive calls merged), their outputs
    become `tool` messages, and reasoning or built-in items are skipped. Function, custom and
    namespace tools are flattened to chat function tools through `tool_map_for`; built-in
    tools are dropped. Stateful features the bridge cannot honour (`previous_response_id`,
    `store: true`, `conversation`) raise `InvalidRequest`.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if body.get("previous_response_id") is not None:
        raise InvalidRequest(
            "previous_response_id is not supported when bridging the Responses API to a Chat Completions "
            "upstream; send the full conversation in input",
            param="previous_response_id",
        )
    if body.get("conversation") is not None:
        raise InvalidRequest(
            "conversation is not supported when bridging the Responses API to a Chat Completions upstream; "
            "send the full conversation in input",
            param="conversation",
        )
    if body.get("store") is True:
        raise InvalidRequest(
            "store: true is not supported: this gateway bridges to a Chat Completions upstream and keeps no "
            "responses; send store: false",
            param="store",
        )
    if "input" not in body or body["input"] is None:
        raise InvalidRequest("input is required", param="input")
    raw_input = body["input"]
    if isinstance(raw_input, str):
        items: list = [{"type": "message", "role": "user", "content": raw_input}]
    elif isinstance(raw_input, list):
        items = raw_input
    else:
        raise InvalidRequest("input must be a string or an array of items", param="input")

    _require_list(body, "tools")
    tmap = tool_map_for(body)
    messages: list[dict] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    messages.extend(_input_messages(items, tmap))
    if not messages:
        raise InvalidRequest("input holds no message the upstream can use", param="input")

    chat: dict[str, Any] = {}
    if "model" in body:
        chat["model"] = body["model"]
    chat["messages"] = messages

    tools = _chat_tools(as_list(body.get("tools")), tmap)
    if tools:
        chat["tools"] = tools
        choice = _chat_tool_choice(body.get("tool_choice"), tmap, tools)
        if choice is not None:
            chat["tool_choice"] = choice
        # OpenAI rejects parallel_tool_calls without tools, so it only travels with them.
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]

    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]

    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            schema: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
            if fmt.get("description"):
                schema["description"] = fmt["description"]
            if fmt.get("strict") is not None:
                schema["strict"] = fmt["strict"]
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}

    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]

    if body.get("stream"):
        chat["stream"] = True
        # Usage arrives only in the final chunk and only when asked for; Responses needs it.
        chat["stream_options"] = {"include_usage": True}
    return chat


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _responses_usage(usage: Any) -> dict:
    """Responses usage from chat usage; every field an integer because Codex rejects partial usage."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = as_dict(usage.get("prompt_tokens_details"))
    completion_details = as_dict(usage.get("completion_tokens_details"))
    return {
        "input_tokens": prompt,
        # cache_write_tokens is required by recent openai-python Response models; chat rarely reports it.
        "input_tokens_details": {"cached_tokens": _int(prompt_details.get("cached_tokens")),
                                 "cache_write_tokens": _int(prompt_details.get("cache_write_tokens"))},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _int(completion_details.get("reasoning_tokens"))},
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
    }


def _response_object(request: dict, response_id: str, created_at: int, model: Any, status: str,
                      output: list, usage: dict | None = None, error: dict | None = None,
                      incomplete_details: dict | None = None) -> dict:
    """A Responses `response` object echoing the request fields the SDK's Response model needs."""
    request = request if isinstance(request, dict) else {}
    text = request.get("text") if isinstance(request.get("text"), dict) else {}
    text = dict(text)
    text.setdefault("format", {"type": "text"})
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model if isinstance(model, str) and model else str(request.get("model") or ""),
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "reasoning": reasoning,
        "store": False,
        "temperature": request.get("temperature") if request.get("temperature") is not None else 1.0,
        "text": text,
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p") if request.get("top_p") is not None else 1.0,
        "truncation": request.get("truncation") or "disabled",
        "usage": usage,
        "metadata": request.get("metadata") or {},
    }


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _reasoning_item(item_id: str, text: str) -> dict:
    # The chat upstream's thinking is raw text, shown to Responses clients as a summary part
    # because that is what Codex renders; it is skipped again when the history comes back.
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}


def _custom_input(arguments: str) -> str:
    """The raw text of a custom tool call from the {"input": ...} JSON the chat model produced."""
    try:
        parsed = json.loads(arguments)
    except (TypeError, *BAD_JSON):
        return arguments or ""  # the model skipped the JSON wrapper; the raw text is the input
    if isinstance(parsed, dict):
        if isinstance(parsed.get("input"), str):
            return parsed["input"]
        strings = [v for v in parsed.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]  # a differently named single field still carries the input
    return parsed if isinstance(parsed, str) else arguments


def _tool_call_item(tmap: ResponsesToolMap, item_id: str | None, call_id: str, chat_name: str, arguments: str,
                    status: str) -> dict:
    kind, name, namespace = tmap.lookup(chat_name)
    item_id = item_id or _rid("ctc_" if kind == "custom" else "fc_")
    if kind == "custom":
        item = {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name,
                "input": _custom_input(arguments)}
    else:
        item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
                "arguments": arguments}
    if namespace:
        item["namespace"] = namespace
    return item


def _incomplete_reason(finish_reason: Any) -> str | None:
    if not isinstance(finish_reason, str):
        return None
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)


def _chat_text(content: Any) -> str:
    """Text of chat content; text parts are concatenated as-is (they are pieces of one answer)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def chat_to_responses_response(resp: dict, request: dict) -> dict:
    """Translate a chat.completion into a Responses `response` object for the given request.

    The first choice becomes output items: a reasoning item when the upstream returned thinking
    text, a message item when there is text, then one item per tool call — `function_call`
    (with `namespace` for namespaced tools) or `custom_tool_call` for freeform tools, using the
    request's tool map. `finish_reason: "length"` gives status `incomplete`; usage is mapped
    with integer zeros for anything unknown.
    """
    resp = resp if isinstance(resp, dict) else {}
    tmap = tool_map_for(request if isinstance(request, dict) else {})
    choices = as_list(resp.get("choices"))
    choice = as_dict(choices[0] if choices else None)
    message = as_dict(choice.get("message"))
    reason = _incomplete_reason(choice.get("finish_reason"))
    output: list[dict] = []
    thinking = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(thinking, str) and thinking:
        output.append(_reasoning_item(_rid("rs_"), thinking))
    text = _chat_text(message.get("content"))
    if not text and isinstance(message.get("refusal"), str):
        text = message["refusal"]  # Codex parses only output_text parts, so refusals travel as text
    if text:
        output.append(_message_item(_rid("msg_"), text, "incomplete" if reason else "completed"))
    for call in as_list(message.get("tool_calls")):
        if not isinstance(call, dict):
            continue
        fn = as_dict(call.get("function"))
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
        output.append(_tool_call_item(tmap, None, call.get("id") or _rid("call_"), fn.get("name") or "",
                                      arguments, "completed"))
    created = resp.get("created")
    return _response_object(
        request, _rid("resp_"), created if isinstance(created, int) else int(time.time()), resp.get("model"),
        "incomplete" if reason else "completed", output, usage=_responses_usage(resp.get("usage")),
        incomplete_details={"reason": reason} if reason else None)


# Upstream error codes Codex reacts to specially (§2.4); anything else is reported as server_error.
_PASS_THROUGH_ERROR_CODES = ("context_length_exceeded", "insufficient_quota", "rate_limit_exceeded",
                             "usage_not_included")


class _StreamCall:
    """One chat tool call being assembled from its streamed fragments."""

    __slots__ = ("arguments", "call_id", "closed", "item_id", "name", "output_index")

    def __init__(self, call_id: str) -> None:
        self.item_id = ""  # assigned when announced: fc_ or ctc_ depends on the tool kind
        self.call_id = call_id
        self.name = ""
        self.arguments = ""
        self.output_index: int | None = None  # None until the item is announced (needs a name)
        self.closed = False


class ChatToResponsesStream:
    """Turn a stream of chat.completion.chunk dicts into Responses API SSE frames.

    Feed each parsed upstream chunk to `feed`, then call `finish` at the end of the upstream
    stream (or `fail` on an upstream error); each returns the SSE frames to write, each with an
    `event:` line equal to its `type` and an increasing `sequence_number`. Exactly one output
    item is open at a time: reasoning text, assistant text and each tool call get their own
    item, and an item is closed before the next opens. Tool calls of freeform custom tools are
    reported as `custom_tool_call` items, namespaced tools with their `namespace`. The stream
    always ends with one `response.completed` (status `incomplete` on a length cut-off) or
    `response.failed`; afterwards every method returns [].
    """

    def __init__(self, request: dict) -> None:
        self._request = request if isinstance(request, dict) else {}
        self._tmap = tool_map_for(self._request)
        self._id = _rid("resp_")
        self._created = int(time.time())
        self._model: Any = self._request.get("model") or ""
        self._seq = 0
        self._started = False
        self._done = False
        self._output: list[dict | None] = []  # finished items by output_index (None while open)
        self._open: dict | None = None  # the open message/reasoning item, or {"call": _StreamCall}
        self._calls: dict[Any, _StreamCall] = {}
        self._last_call_key: Any = None
        self._usage: Any = None
        self._finish_reason: Any = None

    # -- framing ------------------------------------------------------------------------------

    def _event(self, etype: str, **fields: Any) -> bytes:
        data = {"type": etype, "sequence_number": self._seq}
        data.update(fields)
        self._seq += 1
        return sse(data, event=etype)

    def _response(self, status: str, **extra: Any) -> dict:
        output = [item for item in self._output if item is not None]
        return _response_object(self._request, self._id, self._created, self._model, status, output, **extra)

    def _start(self, chunk: dict | None) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        if chunk:
            if isinstance(chunk.get("created"), int):
                self._created = chunk["created"]
            if isinstance(chunk.get("model"), str) and chunk["model"]:
                self._model = chunk["model"]
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def keepalive(self) -> list[bytes]:
        """For a quiet upstream: `response.in_progress` once more (the first time, the opening
        pair), a real event where an SSE comment would not reset a client's idle timer."""
        if self._done:
            return []
        if not self._started:
            return self._start(None)
        return [self._event("response.in_progress", response=self._response("in_progress"))]

    # -- items --------------------------------------------------------------------------------

    def _add_item(self, item: dict) -> tuple[int, bytes]:
        index = len(self._output)
        self._output.append(None)
        return index, self._event("response.output_item.added", output_index=index, item=item)

    def _open_text(self, kind: str) -> list[bytes]:
        """Make sure an item of `kind` ("message" or "reasoning") is the open one."""
        if self._open is not None and self._open.get("kind") == kind:
            return []
        frames = self._close_open()
        item_id = _rid("msg_" if kind == "message" else "rs_")
        if kind == "message":
            item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        else:
            item = {"id": item_id, "type": "reasoning", "summary": []}
        index, frame = self._add_item(item)
        frames.append(frame)
        if kind == "message":
            frames.append(self._event("response.content_part.added", item_id=item_id, output_index=index,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        else:
            frames.append(self._event("response.reasoning_summary_part.added", item_id=item_id, output_index=index,
                                      summary_index=0, part={"type": "summary_text", "text": ""}))
        self._open = {"kind": kind, "id": item_id, "index": index, "text": ""}
        return frames

    def _text_delta(self, kind: str, delta: str) -> list[bytes]:
        frames = self._open_text(kind)
        item = self._open
        assert item is not None
        item["text"] += delta
        if kind == "message":
            frames.append(self._event("response.output_text.delta", item_id=item["id"], output_index=item["index"],
                                      content_index=0, delta=delta, logprobs=[]))
        else:
            frames.append(self._event("response.reasoning_summary_text.delta", item_id=item["id"],
                                      output_index=item["index"], summary_index=0, delta=delta))
        return frames

    def _open_call(self, call: _StreamCall) -> list[bytes]:
        frames = self._close_open()
        kind, name, namespace = self._tmap.lookup(call.name)
        call.item_id = _rid("ctc_" if kind == "custom" else "fc_")
        if kind == "custom":
            item: dict[str, Any] = {"id": call.item_id, "type": "custom_tool_call", "call_id": call.call_id,
                                    "name": name, "input": ""}
        else:
            item = {"id": call.item_id, "type": "function_call", "status": "in_progress", "call_id": call.call_id,
                    "name": name, "arguments": ""}
        if namespace:
            item["namespace"] = namespace
        call.output_index, frame = self._add_item(item)
        frames.append(frame)
        self._open = {"kind": "call", "call": call}
        if call.arguments:  # fragments buffered while the name was still unknown
            frames.extend(self._call_delta(call, call.arguments))
        return frames

    def _call_delta(self, call: _StreamCall, delta: str) -> list[bytes]:
        if self._tmap.is_custom(call.name):
            return []  # custom input is JSON-wrapped upstream; it is unwrapped once, at close
        return [self._event("response.function_call_arguments.delta", item_id=call.item_id,
                            output_index=call.output_index, delta=delta)]

    def _close_open(self) -> list[bytes]:
        item = self._open
        if item is None:
            return []
        self._open = None
        status = "incomplete" if _incomplete_reason(self._finish_reason) else "completed"
        frames: list[bytes] = []
        if item["kind"] == "call":
            call: _StreamCall = item["call"]
            call.closed = True
            index = call.output_index
            assert index is not None
            done = _tool_call_item(self._tmap, call.item_id, call.call_id, call.name, call.arguments, status)
            if done["type"] == "custom_tool_call":
                if done["input"]:
                    frames.append(self._event("response.custom_tool_call_input.delta", item_id=call.item_id,
                                              output_index=index, delta=done["input"]))
                frames.append(self._event("response.custom_tool_call_input.done", item_id=call.item_id,
                                          output_index=index, input=done["input"]))
            else:
                frames.append(self._event("response.function_call_arguments.done", item_id=call.item_id,
                                          output_index=index, name=done["name"], arguments=call.arguments))
        elif item["kind"] == "message":
            index, text = item["index"], item["text"]
            part = {"type": "output_text", "text": text, "annotations": []}
            frames.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=text, logprobs=[]))
            frames.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=part))
            done = _message_item(item["id"], text, status)
        else:
            index, text = item["index"], item["text"]
            frames.append(self._event("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                                      summary_index=0, text=text))
            frames.append(self._event("response.reasoning_summary_part.done", item_id=item["id"],
                                      output_index=index, summary_index=0,
                                      part={"type": "summary_text", "text": text}))
            done = _reasoning_item(item["id"], text)
        self._output[index] = done
        frames.append(self._event("response.output_item.done", output_index=index, item=done))
        return frames

    def _tool_fragment(self, fragment: dict) -> list[bytes]:
        key = fragment.get("index")
        if key is None:
            # Some servers omit the index: a new id means a new call, otherwise continue the last.
            frag_id = fragment.get("id")
            last = self._calls.get(self._last_call_key)
            key = len(self._calls) if last is None or (frag_id and frag_id != last.call_id) else self._last_call_key
        self._last_call_key = key
        fn = as_dict(fragment.get("function"))
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _StreamCall(fragment.get("id") or _rid("call_"))
        name = fn.get("name")
        if isinstance(name, str) and name and call.output_index is None:
            call.name = name  # replace, not append: some servers repeat the full name per fragment
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = "" if args is None else json.dumps(args, ensure_ascii=False)
        frames: list[bytes] = []
        if call.output_index is None:
            call.arguments += args
            if call.name:
                frames.extend(self._open_call(call))
            return frames
        call.arguments += args
        if args and not call.closed:
            if self._open is None or self._open.get("call") is not call:
                # A late fragment for a call that is no longer open: keep it for the final item only.
                return frames
            frames.extend(self._call_delta(call, args))
        return frames

    # -- public API -------------------------------------------------------------------------

    def feed(self, chunk: dict) -> list[bytes]:
        """Translate one parsed chat.completion.chunk into zero or more SSE frames."""
        if self._done or not isinstance(chunk, dict):
            return []
        if chunk.get("error"):
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            code = err.get("code") if isinstance(err, dict) else None
            return self.fail(message or "upstream error",
                             code if code in _PASS_THROUGH_ERROR_CODES else "server_error")
        frames = self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in as_list(chunk.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 cannot be expressed in one Responses output
            delta = as_dict(choice.get("delta"))
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thinking, str) and thinking:
                frames.extend(self._text_delta("reasoning", thinking))
            content = _chat_text(delta.get("content"))
            if content:
                frames.extend(self._text_delta("message", content))
            for fragment in as_list(delta.get("tool_calls")):
                if isinstance(fragment, dict):
                    frames.extend(self._tool_fragment(fragment))
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return frames

    def finish(self) -> list[bytes]:
        """Close open items and emit `response.completed` (status incomplete on a length cut-off)."""
        if self._done:
            return []
        frames = self._start(None)
        for call in self._calls.values():
            if call.output_index is None:  # the name never arrived; report the call anyway
                frames.extend(self._open_call(call))
        frames.extend(self._close_open())
        reason = _incomplete_reason(self._finish_reason)
        response = self._response("incomplete" if reason else "completed", usage=_responses_usage(self._usage),
                                  incomplete_details={"reason": reason} if reason else None)
        frames.append(self._event("response.completed", response=response))
        self._done = True
        return frames

    def fail(self, message: str, code: str = "server_error") -> list[bytes]:
        """End the stream with `response.failed` carrying `error: {code, message}`."""
        if self._done:
            return []
        frames = self._start(None)
        usage = _responses_usage(self._usage) if self._usage else None
        response = self._response("failed", usage=usage, error={"code": code, "message": message})
        frames.append(self._event("response.failed", response=response))
        self._done = True
        return frames
