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
import struct
import time
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
    except ValueError:
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
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
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
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _ollama_details(family),
    }
