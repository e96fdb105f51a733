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
# Responses ⇄ Chat
# ---------------------------------------------------------------------------------------------
#
# Lets a Responses client (Codex CLI, openai-python `client.responses`) talk to an upstream
# that only speaks Chat Completions. The bridge is stateless: every request must carry the
# whole conversation (Codex sends `store: false` and full history), so `previous_response_id`
# and `store: true` are refused rather than silently answered without context.

# Imports live in this section because sections are appended independently by different people.
import hashlib as _hashlib
import re as _re
import time as _time
import uuid as _uuid

_CHAT_TOOL_NAME = _re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NAMESPACE_SEP = "__"


def _rid(prefix: str) -> str:
    return prefix + _uuid.uuid4().hex[:24]


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
    clean = _re.sub(r"[^a-zA-Z0-9_-]", "_", raw) or "tool"
    return clean if len(clean) <= 64 else _hashed_name(clean, name, namespace)


def _hashed_name(base: str, name: str, namespace: str | None) -> str:
    digest = _hashlib.sha1(f"{namespace or ''}\x00{name}".encode()).hexdigest()[:8]
    return base[:55] + "_" + digest


def tool_map_for(body: dict) -> ResponsesToolMap:
    """Build the tool-name map for a Responses request from its `tools`.

    Only tools the bridge can express are registered: flat `function` tools, `custom` tools
    and the function/custom members of `namespace` tools. Built-ins (`web_search`,
    `local_shell`, ...) are left out because they are dropped from the chat request.
    """
    tmap = ResponsesToolMap()
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind in ("function", "custom") and tool.get("name"):
            tmap.add(tool["name"], kind)
        elif kind == "namespace" and tool.get("name"):
            for sub in tool.get("tools") or []:
                if isinstance(sub, dict) and sub.get("type") in ("function", "custom") and sub.get("name"):
                    tmap.add(sub["name"], sub["type"], tool["name"])
    return tmap


def _custom_input_description(tool: dict) -> str:
    fmt = tool.get("format") or {}
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
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        kind = tool.get("type")
        if kind == "function" and tool.get("name"):
            out.append(_function_chat_tool(tmap.chat_name(tool["name"]), tool, None))
        elif kind == "custom" and tool.get("name"):
            out.append(_custom_chat_tool(tmap.chat_name(tool["name"]), tool, None))
        elif kind == "namespace" and tool.get("name"):
            ns = tool["name"]
            for sub in tool.get("tools") or []:
                if not isinstance(sub, dict) or not sub.get("name"):
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


def _parts_text(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        return "" if parts is None else json.dumps(parts, ensure_ascii=False)
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
    return "\n".join(texts)


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
            if call_id not in seen_calls:
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
            call_id = item.get("call_id") or item.get("id") or _rid("call_")
            arguments = item.get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
            add_tool_call(call_id, tmap.chat_name(item.get("name") or "", item.get("namespace")), arguments)
        elif kind == "custom_tool_call":
            flush_images()
            call_id = item.get("call_id") or item.get("id") or _rid("call_")
            text = item.get("input")
            arguments = json.dumps({"input": text if isinstance(text, str) else ""}, ensure_ascii=False)
            add_tool_call(call_id, tmap.chat_name(item.get("name") or "", item.get("namespace")), arguments)
        # reasoning, web_search_call, local_shell_call, compaction, ... carry nothing a chat
        # upstream can use (encrypted reasoning is provider-specific); skip them.
    flush_images()
    # An assistant message that only held skipped parts may be left empty; drop it.
    return [m for m in messages if not (m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"))]


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

    tools = _chat_tools(body.get("tools") or [], tmap)
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
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
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
    except (TypeError, ValueError):
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
    choices = resp.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
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
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        fn = call.get("function") or {}
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
        output.append(_tool_call_item(tmap, None, call.get("id") or _rid("call_"), fn.get("name") or "",
                                      arguments, "completed"))
    created = resp.get("created")
    return _response_object(
        request, _rid("resp_"), created if isinstance(created, int) else int(_time.time()), resp.get("model"),
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
        self._created = int(_time.time())
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
        fn = fragment.get("function") or {}
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
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 cannot be expressed in one Responses output
            delta = choice.get("delta") or {}
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thinking, str) and thinking:
                frames.extend(self._text_delta("reasoning", thinking))
            content = _chat_text(delta.get("content"))
            if content:
                frames.extend(self._text_delta("message", content))
            for fragment in delta.get("tool_calls") or []:
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
