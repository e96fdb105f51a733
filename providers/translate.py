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

import json
from typing import Any

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


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame: an optional `event:` line, one single-line `data:` line, a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if event is None:
        return b"data: " + payload.encode() + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload.encode() + b"\n\n"


def ndjson(data: Any) -> bytes:
    """One NDJSON line (Ollama's stream framing)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# Anthropic Messages ⇄ Chat
# ---------------------------------------------------------------------------------------------
#
# Facts live in WIRE.md §4 (Anthropic Messages) and §5 (the mapping). Direction names read
# "source_to_target": anthropic_to_chat_request turns a Claude Code request into the hub
# (OpenAI chat) request; chat_to_anthropic_* turn the hub's answers back into Anthropic's.

# Imports stay inside this section so parallel sections append without touching the header.
import hashlib
import math
import re
import time
import uuid

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
    return clean[:55] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def anthropic_tool_name_map(body: dict) -> dict[str, str]:
    """Map each shortened upstream tool name back to the Anthropic name it stands for.

    `anthropic_to_chat_request` renames tools whose names OpenAI would reject; pass this map as
    `tool_names=` to `chat_to_anthropic_response` / `ChatToAnthropicStream` so the client sees its
    own names again. Names that needed no change are not in the map.
    """
    names = set()
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            names.add(tool["name"])
    for msg in body.get("messages") or []:
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
    except ValueError:
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
                if kind == "text" and block.get("text"):
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
                if block.get("text"):
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
    stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str) and s]
    if stops:
        out_body["stop"] = stops

    tools = []
    for tool in body.get("tools") or []:
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
    return {"input_tokens": max(prompt - cached - written, 0), "output_tokens": _ant_int(usage.get("completion_tokens")),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached}


def _ant_stop_reason(finish_reason: Any, has_tool_use: bool) -> str:
    """Anthropic stop_reason that agrees with the blocks actually sent (WIRE §5.6)."""
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
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
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
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
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


def chat_to_anthropic_request(body: dict) -> dict:
    """Translate an OpenAI chat request into an Anthropic Messages request.

    System and developer messages are joined into the top-level `system`; tool messages become
    `tool_result` blocks at the head of a user turn; consecutive same-role turns are merged since
    Anthropic wants user/assistant alternation starting with a user turn. `max_tokens` defaults to
    4096 (Anthropic requires it), temperature is clamped to Anthropic's 0..1, `reasoning_effort`
    becomes a thinking budget, and fields Anthropic lacks (n, logprobs, penalties, seed…) are dropped.
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
            calls = [c for c in msg.get("tool_calls") or [] if isinstance(c, dict)]
            for call in calls:
                fn = call.get("function") if isinstance(call.get("function"), dict) else {}
                blocks.append({"type": "tool_use", "id": _ant_tool_id(call.get("id")), "name": str(fn.get("name") or ""),
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

    tools = []
    for tool in body.get("tools") or []:
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

    budget = _ANT_EFFORT_BUDGET.get(body.get("reasoning_effort"))  # type: ignore[arg-type]
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


def anthropic_to_chat_response(resp: dict, *, created: int | None = None) -> dict:
    """Translate an Anthropic message into a chat.completion.

    Text blocks are joined, tool_use blocks become tool_calls with JSON-text arguments, and
    thinking blocks are dropped (OpenAI clients have no place for them). `created` defaults to
    the current time; tests pass a fixed value.
    """
    texts, calls = [], []
    for block in resp.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            calls.append({"id": str(block.get("id") or ""), "type": "function", "function": {
                "name": str(block.get("name") or ""),
                "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    message["refusal"] = None
    finish = _ANT_TO_CHAT_FINISH.get(resp.get("stop_reason"), "stop")  # type: ignore[arg-type]
    if calls and finish == "stop":
        finish = "tool_calls"
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

    Tool calls are numbered 0,1,… among tool_use blocks only; thinking blocks are dropped; the
    finish chunk comes from `message_delta` and a final usage chunk (`choices: []`) from
    `message_stop`. An `error` event raises `UpstreamStreamError`. `created` defaults to now.
    """

    def __init__(self, model: str, *, created: int | None = None) -> None:
        self.model = model
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
            if block.get("type") == "tool_use" and isinstance(index, int):
                k = len(self._tool_index)
                self._tool_index[index] = k
                if block.get("input"):
                    self._tool_input[index] = block["input"]
                out.append(self._chunk({"tool_calls": [{"index": k, "id": str(block.get("id") or ""), "type": "function",
                                                        "function": {"name": str(block.get("name") or ""),
                                                                     "arguments": ""}}]}))
            elif block.get("type") == "text" and block.get("text"):
                out.append(self._chunk({"content": block["text"]}))
        elif name == "content_block_delta":
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            index = data.get("index")
            if delta.get("type") == "text_delta" and delta.get("text"):
                out.append(self._chunk({"content": delta["text"]}))
            elif delta.get("type") == "input_json_delta" and index in self._tool_index:
                fragment = delta.get("partial_json")
                if isinstance(fragment, str) and fragment:
                    self._tool_streamed.add(index)
                    out.append(self._chunk({"tool_calls": [{"index": self._tool_index[index],
                                                            "function": {"arguments": fragment}}]}))
            # thinking_delta / signature_delta / citations_delta: no chat equivalent
        elif name == "content_block_stop":
            index = data.get("index")
            if index in self._tool_input and index not in self._tool_streamed:
                # Input given whole at block start and never streamed: send it as one fragment.
                out.append(self._chunk({"tool_calls": [{"index": self._tool_index[index], "function": {
                    "arguments": json.dumps(self._tool_input[index], ensure_ascii=False)}}]}))
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
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        for block in [content] if isinstance(content, str) else content if isinstance(content, list) else []:
            c, n = _ant_block_chars(block)
            chars, images = chars + c, images + n
    if body.get("tools"):
        chars += len(json.dumps(body["tools"], ensure_ascii=False))
    return max(1, math.ceil(chars / 4) + images * _ANT_IMAGE_TOKEN_GUESS)


def anthropic_error_type(status: int) -> str:
    """Anthropic's `error.type` for an HTTP status (WIRE §4.5); unknown 4xx → invalid_request_error."""
    known = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
             403: "permission_error", 404: "not_found_error", 413: "request_too_large",
             429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
             504: "timeout_error", 529: "overloaded_error"}
    if status in known:
        return known[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"
