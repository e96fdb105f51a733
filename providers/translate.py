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
