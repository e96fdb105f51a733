"""CLI-subprocess providers: `claude_code` (claude), `codex_cli` (codex exec), `cursor` (cursor-agent).

Theory of operation. A chat request becomes one run of a coding agent's command-line tool: the
messages are rendered into one plain-text transcript, the tool is spawned in a fresh scratch
directory with a minimal environment and its own process group, the prompt goes in on stdin
(claude, codex) or after `--` (cursor-agent), and the tool's JSON-lines output is read as it
comes. Each tool has a small event parser that turns its lines into text pieces (only text not
emitted before), a usage record and an error, so one loop serves both answers: a
chat.completion built from all the pieces, or a stream of chat.completion.chunk dicts yielded
piece by piece.

What a run promises: stderr is drained concurrently into a small tail buffer that goes to the
log on failure and never into a response; a per-provider gate caps the number of live
processes (a short wait queue, then 429); the run has one deadline (504 when it passes); a
timeout, a cancelled request, an early-closed stream or `aclose()` kills the whole process
group (SIGTERM, then SIGKILL after a short grace), reaps the child and removes the scratch
directory, so nothing the tool started outlives the request.

Sections, in order: settings and helpers · prompt rendering · event parsers (claude, codex,
cursor) · concurrency gate · one run of a tool · the provider base class · the three tools.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from evo_gateway import BAD_JSON, GatewayError, Provider, RequestContext
from providers.translate import as_dict

log = logging.getLogger("evo_gateway")

DEFAULT_MAX_CONCURRENT = 4
DEFAULT_TIMEOUT_S = 300.0
QUEUE_WAIT_S = 30.0                     # longest a request waits for a free slot before 429
KILL_GRACE_S = 2.0                      # SIGTERM → SIGKILL
STDOUT_LINE_LIMIT_BYTES = 16 * 1024 * 1024
STDERR_TAIL_BYTES = 8 * 1024
ERROR_MESSAGE_CHARS = 300               # how much of a tool-reported error reaches the client

# Variables every tool needs to run at all. Anything else is passed only when a tool names it
# in its own `auth_env_vars`; provider API keys (OPENAI_API_KEY, ANTHROPIC_API_KEY, …) never.
BASE_ENV_VARS = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TERM", "TMPDIR", "TZ")


def _env_number(environ: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    """A positive number from the environment; an unparsable or non-positive value → default + warning."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = 0
    if value > 0:
        return value
    log.warning("%s=%r is not a positive %s; using the default %s", name, raw,
                "integer" if integer else "number", default)
    return default


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _grow(texts: dict[str, str], key: str, text: str) -> str:
    """What `text` adds to what was already sent under `key` (tools repeat whole messages as
    they grow, or send one block at a time); records it. A change that neither extends nor
    repeats the sent text cannot be taken back, so only genuinely new blocks are added."""
    seen = texts.get(key, "")
    if text.startswith(seen):
        texts[key] = text
        return text[len(seen):]
    if seen.endswith(text):
        return ""
    texts[key] = seen + text
    return text


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_MESSAGE_CHARS else text[:ERROR_MESSAGE_CHARS - 1] + "…"


# ---------------------------------------------------------------------------------------------
# prompt rendering
# ---------------------------------------------------------------------------------------------

_ROLE_LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def content_text(content: Any) -> str:
    """The text of a message's `content`: a string, or parts flattened (non-text parts noted)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return str(content)
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") or (kind is None and "text" in part):
            pieces.append(str(part.get("text") or ""))
        elif kind == "refusal":
            pieces.append(str(part.get("refusal") or ""))
        elif kind in ("image_url", "input_image", "image"):
            pieces.append("[image omitted]")
        elif kind in ("input_audio", "audio"):
            pieces.append("[audio omitted]")
        elif kind in ("file", "input_file"):
            pieces.append("[file omitted]")
        else:
            pieces.append(f"[{kind} omitted]")
    return "\n".join(p for p in pieces if p)


def _tool_calls_text(tool_calls: Any) -> str:
    lines = []
    for call in tool_calls if isinstance(tool_calls, list) else []:
        if not isinstance(call, dict):
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        lines.append(f"[called tool {function.get('name') or '?'} (id {call.get('id') or '?'}) "
                     f"with arguments: {function.get('arguments') or '{}'}]")
    return "\n".join(lines)


def render_prompt(messages: Any) -> str:
    """One plain-text transcript of an OpenAI `messages` array, for a tool that takes one prompt.

    A lone user message is sent as its bare text. Otherwise every message becomes a labelled
    section in order: "System:" (system and developer), "User:", "Assistant:" (tool calls
    written out as text), "Tool result (call_x):". Raises GatewayError(400) for a missing or
    empty array or a message that is not an object with a known role.
    """
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty array", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise GatewayError(400, f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = message.get("role", "user")
        if not isinstance(role, str) or (role not in _ROLE_LABELS and role not in ("tool", "function")):
            raise GatewayError(400, f"messages[{index}].role: unknown role {role!r}",
                               param=f"messages[{index}].role")
    if len(messages) == 1 and messages[0].get("role", "user") == "user":
        return content_text(messages[0].get("content"))
    sections = []
    for message in messages:
        role = message.get("role", "user")
        text = content_text(message.get("content"))
        if role in ("tool", "function"):
            label = f"Tool result ({message.get('tool_call_id') or message.get('name') or 'unknown'})"
        else:
            label = _ROLE_LABELS[role]
            if role == "assistant":
                calls = _tool_calls_text(message.get("tool_calls"))
                text = "\n".join(t for t in (text, calls) if t)
        sections.append(f"{label}:\n{text}")
    return "\n\n".join(sections)


# ---------------------------------------------------------------------------------------------
# event parsers: one JSON event in → the text pieces not emitted before
# ---------------------------------------------------------------------------------------------


class EventParser:
    """Reads one tool's JSON events. `feed(event)` returns the new text pieces, in order.

    After the last event: `usage` (an OpenAI usage dict, or None when the tool reported none),
    `error` (a tool-reported failure, or None), `finished` (the tool's terminal success/result
    event was seen), `cost_usd` and `model` when the tool reports them.
    """

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.finished = False
        self.cost_usd: float | None = None
        self.model: str | None = None
        self.emitted = False            # any text emitted so far

    def feed(self, event: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def _out(self, pieces: list[str], text: str, *, separate: bool = False) -> None:
        """Queue `text`; `separate` puts a blank line between it and earlier text (a new message)."""
        if not text:
            return
        if separate and self.emitted:
            text = "\n\n" + text
        pieces.append(text)
        self.emitted = True


class ClaudeEventParser(EventParser):
    """`claude -p --output-format stream-json --verbose` lines (WIRE §7.1).

    `assistant` lines carry whole Anthropic messages; several may share one `message.id`, so
    text is aggregated by id and only what is new is emitted. `stream_event` text deltas (with
    `--include-partial-messages`) are emitted as they come, and then the whole-message lines
    add nothing. Sub-agent traffic (`parent_tool_use_id` set) is not part of the answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self._by_id: dict[str, str] = {}
        self._partial = False           # stream_event text deltas seen: they carry the text
        self._new_message = False

    def feed(self, event: dict[str, Any]) -> list[str]:
        pieces: list[str] = []
        kind = event.get("type")
        if event.get("parent_tool_use_id"):
            return pieces
        if kind == "system":
            if event.get("subtype") == "init" and isinstance(event.get("model"), str):
                self.model = event["model"]
            elif event.get("subtype") == "api_retry":
                log.debug("claude: api retry %s/%s", event.get("attempt"), event.get("max_retries"))
        elif kind == "stream_event":
            self._on_stream_event(as_dict(event.get("event")), pieces)
        elif kind == "assistant" and not self._partial:
            self._on_assistant(as_dict(event.get("message")), pieces)
        elif kind == "result":
            self._on_result(event, pieces)
        return pieces

    def _on_stream_event(self, raw: dict[str, Any], pieces: list[str]) -> None:
        if raw.get("type") == "message_start":
            self._new_message = True
        elif raw.get("type") == "content_block_delta":
            delta = as_dict(raw.get("delta"))
            if delta.get("type") == "text_delta" and delta.get("text"):
                self._partial = True
                self._out(pieces, delta["text"], separate=self._new_message)
                self._new_message = False

    def _on_assistant(self, message: dict[str, Any], pieces: list[str]) -> None:
        blocks = message.get("content")
        if isinstance(blocks, str):
            text = blocks
        else:
            text = "".join(str(b.get("text") or "") for b in (blocks if isinstance(blocks, list) else [])
                           if isinstance(b, dict) and b.get("type") == "text")
        message_id = message.get("id")
        if not isinstance(message_id, str) or not message_id:
            message_id = f"anon-{len(self._by_id)}"
        first = not self._by_id.get(message_id)
        self._out(pieces, _grow(self._by_id, message_id, text), separate=first)

    def _on_result(self, event: dict[str, Any], pieces: list[str]) -> None:
        subtype = str(event.get("subtype") or "")
        if event.get("is_error") or subtype.startswith("error"):
            errors = event.get("errors")
            detail = event.get("result") if isinstance(event.get("result"), str) else None
            if not detail and isinstance(errors, list) and errors:
                detail = "; ".join(str(e) for e in errors)
            self.error = detail or subtype or "the run failed"
        else:
            self.finished = True
            if not self.emitted and isinstance(event.get("result"), str):
                self._out(pieces, event["result"])
        usage = event.get("usage")
        if isinstance(usage, dict):
            cached = _int(usage.get("cache_read_input_tokens"))
            prompt = _int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens")) + cached
            self.usage = _usage(prompt, _int(usage.get("output_tokens")), cached)
        cost = event.get("total_cost_usd", event.get("cost_usd"))
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            self.cost_usd = float(cost)


class CodexEventParser(EventParser):
    """`codex exec --json` lines (WIRE §7.2), current and older shapes.

    Current: `item.started|updated|completed` with an `agent_message` item carry that message's
    text so far (only the growth is emitted; `reasoning`, `command_execution` and other items are
    skipped), `turn.completed` the usage, `turn.failed` / `error` a failure. Older:
    `{"id", "msg": {"type": ...}}` protocol events (`agent_message_delta`, `agent_message`,
    `task_complete`, `token_count`, `error`), and the short-lived `assistant_message` item.
    """

    def __init__(self) -> None:
        super().__init__()
        self._items: dict[str, str] = {}
        self._old_streamed = False      # old format: deltas of the current message were emitted

    def feed(self, event: dict[str, Any]) -> list[str]:
        pieces: list[str] = []
        if isinstance(event.get("msg"), dict):
            self._on_old(event["msg"], pieces)
            return pieces
        kind = event.get("type")
        if kind in ("item.started", "item.updated", "item.completed"):
            self._on_item(as_dict(event.get("item")), pieces)
        elif kind == "turn.completed":
            self.finished = True
            self.error = None           # an earlier `error` was a retried hiccup, the turn succeeded
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._add_usage(usage)
        elif kind == "turn.failed":
            error = event.get("error")
            self.error = str(error.get("message") if isinstance(error, dict) else error or "turn failed")
            self.finished = False
        elif kind == "error":
            self.error = str(event.get("message") or "codex reported an error")
        return pieces

    def _on_item(self, item: dict[str, Any], pieces: list[str]) -> None:
        kind = item.get("type") or item.get("item_type")
        if kind == "agent_message":
            text = item.get("text")
        elif kind == "assistant_message":
            text = item.get("text")
            if not isinstance(text, str):
                text = content_text(item.get("content"))
        else:
            return
        if not isinstance(text, str):
            return
        item_id = str(item.get("id") or f"anon-{len(self._items)}")
        first = not self._items.get(item_id)
        self._out(pieces, _grow(self._items, item_id, text), separate=first)

    def _add_usage(self, usage: dict[str, Any]) -> None:
        prompt = _int(usage.get("input_tokens"))
        cached = _int(usage.get("cached_input_tokens"))
        completion = _int(usage.get("output_tokens"))
        if self.usage:                  # several turns: add them up
            prompt += self.usage["prompt_tokens"]
            completion += self.usage["completion_tokens"]
            cached += self.usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        self.usage = _usage(prompt, completion, cached)

    def _on_old(self, msg: dict[str, Any], pieces: list[str]) -> None:
        kind = msg.get("type")
        if kind == "agent_message_delta":
            delta = msg.get("delta")
            if isinstance(delta, str) and delta:
                self._out(pieces, delta, separate=not self._old_streamed)
                self._old_streamed = True
        elif kind == "agent_message":
            if not self._old_streamed and isinstance(msg.get("message"), str):
                self._out(pieces, msg["message"], separate=True)
            self._old_streamed = False
        elif kind == "task_complete":
            self.finished = True
            if not self.emitted and isinstance(msg.get("last_agent_message"), str):
                self._out(pieces, msg["last_agent_message"])
        elif kind == "token_count":
            info = msg.get("info")
            usage = info.get("total_token_usage") if isinstance(info, dict) else msg
            if isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage):
                self.usage = _usage(_int(usage.get("input_tokens")), _int(usage.get("output_tokens")),
                                    _int(usage.get("cached_input_tokens")))
        elif kind == "error":
            self.error = str(msg.get("message") or "codex reported an error")


class CursorEventParser(EventParser):
    """`cursor-agent -p --output-format stream-json --stream-partial-output` lines (WIRE §7.3).

    With partial output, text arrives as `assistant` lines that carry only new text and a
    `timestamp_ms`; each segment of text (the run of text before a tool call, or before the
    end) is then closed by a recap `assistant` line repeating the segment's whole text — it has
    no `timestamp_ms`, or has a `model_call_id`. A recap is emitted only for what the deltas
    did not already send (all of it, when the tool sent no deltas). `result` ends the run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._segment = ""              # text emitted in the current segment
        self._segment_has_deltas = False

    def feed(self, event: dict[str, Any]) -> list[str]:
        pieces: list[str] = []
        kind = event.get("type")
        if kind == "assistant":
            text = content_text(as_dict(event.get("message")).get("content"))
            is_delta = isinstance(event.get("timestamp_ms"), (int, float)) and not event.get("model_call_id")
            if is_delta:
                self._out(pieces, text)
                self._segment += text
                self._segment_has_deltas = True
            else:
                if not self._segment_has_deltas:
                    self._out(pieces, text)
                elif text.startswith(self._segment):
                    self._out(pieces, text[len(self._segment):])
                self._end_segment()
        elif kind == "tool_call":
            self._end_segment()
        elif kind == "result":
            self._end_segment()
            if event.get("is_error") or str(event.get("subtype") or "").startswith("error"):
                result = event.get("result")
                self.error = result if isinstance(result, str) and result else "cursor-agent reported an error"
            else:
                self.finished = True
                if not self.emitted and isinstance(event.get("result"), str):
                    self._out(pieces, event["result"])
            usage = event.get("usage")
            if isinstance(usage, dict):
                cached = _int(usage.get("cacheReadTokens", usage.get("cache_read_input_tokens")))
                written = _int(usage.get("cacheWriteTokens", usage.get("cache_creation_input_tokens")))
                prompt = _int(usage.get("inputTokens", usage.get("input_tokens"))) + cached + written
                self.usage = _usage(prompt, _int(usage.get("outputTokens", usage.get("output_tokens"))), cached)
        elif kind == "system" and isinstance(event.get("model"), str):
            self.model = event["model"]
        return pieces

    def _end_segment(self) -> None:
        self._segment = ""
        self._segment_has_deltas = False


# ---------------------------------------------------------------------------------------------
# concurrency gate
# ---------------------------------------------------------------------------------------------


class _Gate:
    """At most `cap` holders; a bounded FIFO of waiters, each waiting a bounded time.

    Futures are made on the running loop at wait time, so the gate is not tied to the loop that
    existed when the provider was built (asyncio.Semaphore binds one on Python 3.9).
    """

    def __init__(self) -> None:
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self, cap: int, queue_limit: int, wait_s: float, busy: str) -> None:
        if self.active < cap and not self.waiting:
            self.active += 1
            return
        if self.waiting >= queue_limit:
            raise GatewayError(429, f"{busy}; the wait queue is full, retry later", headers=[("retry-after", "5")])
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait([waiter], timeout=wait_s)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()          # the slot was handed to us as we were cancelled: pass it on
            waiter.cancel()
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        if not waiter.done():
            waiter.cancel()
            raise GatewayError(429, f"{busy}; waited {wait_s:g} s for a free slot, retry later",
                               headers=[("retry-after", "5")])
        waiter.result()                 # raises what fail_waiters() set

    def release(self) -> None:
        """Hand the slot to the oldest live waiter (`active` unchanged), else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1

    def fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


# ---------------------------------------------------------------------------------------------
# one run of a tool
# ---------------------------------------------------------------------------------------------


class _Run:
    """One child process of a tool: its scratch dir, stdin feeder, stderr drain and deadline.

    `close()` is idempotent and always leaves nothing behind: the process group signalled
    (SIGTERM, SIGKILL after `kill_grace_s`), the child reaped, the helper tasks cancelled, the
    scratch directory removed and the gate slot released.
    """

    def __init__(self, provider: CliProvider, ctx: RequestContext | None) -> None:
        self.provider = provider
        self.ctx = ctx
        self.proc: asyncio.subprocess.Process | None = None
        self.scratch: str | None = None
        self.stderr_tail = bytearray()
        self.deadline = 0.0
        self.timed_out = False
        self.closed = False
        self._tasks: list[asyncio.Task] = []
        self._deadline_timer: asyncio.TimerHandle | None = None

    async def start(self, argv: list[str], stdin_data: bytes | None, env: dict[str, str]) -> None:
        self.scratch = tempfile.mkdtemp(prefix=f"evo-gw-{self.provider.tool}-")
        loop = asyncio.get_running_loop()
        self.proc = await asyncio.create_subprocess_exec(
            *argv, cwd=self.scratch, env=env, start_new_session=True, limit=STDOUT_LINE_LIMIT_BYTES,
            stdin=asyncio.subprocess.PIPE if stdin_data is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.deadline = loop.time() + self.provider.timeout_s
        # The deadline kills the group, which ends stdout; reads then see EOF and report the
        # timeout. No asyncio.wait_for around reads: on Python 3.9–3.11 it can swallow a
        # cancellation that arrives as a line does, leaving a cancelled request waiting.
        self._deadline_timer = loop.call_at(self.deadline, self._on_deadline)
        self._tasks.append(loop.create_task(self._drain_stderr()))
        if stdin_data is not None:
            self._tasks.append(loop.create_task(self._feed_stdin(stdin_data)))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def _feed_stdin(self, data: bytes) -> None:
        stdin = self.proc.stdin
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("%s closed its stdin before reading the whole prompt", self.provider.tool)
        finally:
            try:
                stdin.close()
            except (BrokenPipeError, ConnectionResetError, RuntimeError):
                pass

    async def _drain_stderr(self) -> None:
        while True:
            data = await self.proc.stderr.read(4096)
            if not data:
                return
            self.stderr_tail += data
            del self.stderr_tail[:-STDERR_TAIL_BYTES]

    def _timeout_error(self) -> GatewayError:
        message = (f"{self.provider.tool} did not finish within {self.provider.timeout_s:g} s "
                   f"(provider '{self.provider.name}', {self.provider.timeout_env})")
        self.log_failure(message, None)
        return GatewayError(504, message)

    def log_failure(self, message: str, status: int | None) -> None:
        """The one place a failed run's stderr tail goes: the log, never a response."""
        log.warning("%s%s (exit status %s); stderr tail: %s",
                    f"[{self.ctx.request_id}] " if self.ctx is not None else "", message, status,
                    self.stderr_text() or "(empty)")

    def _on_deadline(self) -> None:
        self.timed_out = True
        self._signal_group(signal.SIGKILL)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects the tool prints on stdout, until EOF; non-JSON lines are skipped."""
        while True:
            if self.timed_out:
                raise self._timeout_error()
            try:
                line = await self.proc.stdout.readline()
            except ValueError:          # a line over STDOUT_LINE_LIMIT_BYTES
                raise GatewayError(502, f"{self.provider.tool} printed a line longer than "
                                        f"{STDOUT_LINE_LIMIT_BYTES} bytes") from None
            if not line:
                if self.timed_out:
                    raise self._timeout_error()
                return
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                event = json.loads(text)
            except BAD_JSON:
                log.debug("%s: skipped a non-JSON line: %.200s", self.provider.tool, text)
                continue
            if isinstance(event, dict):
                yield event

    async def wait_exit(self) -> int:
        """The exit status, once stdout is at EOF; the deadline still applies (it kills the group)."""
        status = await self.proc.wait()
        if self.timed_out:
            raise self._timeout_error()
        return status

    def stderr_text(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace").strip()

    def _signal_group(self, signum: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signum)    # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.proc is not None and self.proc.returncode is None:
                self._signal_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), self.provider.kill_grace_s)
                except asyncio.TimeoutError:  # noqa: UP041 - not the builtin on Python 3.9, 3.10
                    self._signal_group(signal.SIGKILL)
                    await self.proc.wait()
        finally:
            self._release()

    async def finish_close(self) -> None:
        """Make a close begun elsewhere (a request cancelled a moment ago) complete now: wait up
        to the kill grace for the child, then SIGKILL the group, free everything and reap it."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), self.provider.kill_grace_s)
            except asyncio.TimeoutError:  # noqa: UP041 - not the builtin on Python 3.9, 3.10
                pass
        self._release()
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), self.provider.kill_grace_s)
            except asyncio.TimeoutError:  # noqa: UP041
                log.warning("%s (pid %s) survived SIGKILL", self.provider.tool, proc.pid)

    def _release(self) -> None:
        """The synchronous part of close: kill what is left of the group, free everything else."""
        self.closed = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._signal_group(signal.SIGKILL)      # grandchildren that outlived their parent
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        if self in self.provider._runs:
            self.provider._runs.discard(self)
            self.provider.running -= 1
            self.provider._gate.release()


class CliChunkStream:
    """The async iterator a streaming chat returns. It owns its run: finishing, failing, being
    cancelled or `aclose()` (even before the first `__anext__`) kills and cleans it up."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], run: _Run) -> None:
        self._chunks = chunks
        self._run = run

    def __aiter__(self) -> CliChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self._run.close()
            raise

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            await self._run.close()

    def __del__(self) -> None:
        if not self._run.closed:        # dropped without aclose(): kill synchronously
            try:
                self._run._release()
            except RuntimeError:        # its loop is closed already
                log.debug("%s run released after its event loop closed", self._run.provider.tool)


# ---------------------------------------------------------------------------------------------
# the provider base class
# ---------------------------------------------------------------------------------------------


class CliProvider(Provider):
    """A provider answered by running a coding agent's CLI once per request.

    Subclasses set the tool's name, its env variable names and auth variables, and implement
    `build_argv()` and `new_parser()`. `running` counts live processes (for /metrics);
    `queue_limit` and `queue_wait_s` shape the wait queue in front of the concurrency cap.
    """

    tool = ""                           # the executable's usual name, used in messages
    display = ""                        # a human name for install hints
    binary_env = cap_env = timeout_env = ""
    auth_env_vars: tuple[str, ...] = ()
    prompt_on_stdin = True

    def __init__(self, config: Any, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(config)
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.binary = self.environ.get(self.binary_env, "").strip() or self.tool
        self.max_concurrent = int(_env_number(self.environ, self.cap_env, DEFAULT_MAX_CONCURRENT, integer=True))
        self.timeout_s = _env_number(self.environ, self.timeout_env, DEFAULT_TIMEOUT_S, integer=False)
        self.queue_limit = self.max_concurrent
        self.queue_wait_s = QUEUE_WAIT_S
        self.kill_grace_s = KILL_GRACE_S
        self.running = 0
        self._gate = _Gate()
        self._runs: set[_Run] = set()

    @property
    def waiting(self) -> int:
        """Requests queued for a free slot."""
        return self._gate.waiting

    def binary_path(self) -> str | None:
        """Where the configured binary is, or None; never runs the tool (for /health)."""
        return shutil.which(self.binary, path=self.environ.get("PATH"))

    async def list_models(self) -> list[str]:
        """Without configured `models`, one entry: `default`, the tool's own choice (no model flag)."""
        return ["default"]

    def build_argv(self, binary: str, model: str, prompt: str) -> list[str]:
        raise NotImplementedError

    def new_parser(self) -> EventParser:
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        """The child's environment: the basics plus this tool's own config/auth variables."""
        return {name: value for name, value in self.environ.items()
                if name in BASE_ENV_VARS or name.startswith("LC_") or name in self.auth_env_vars}

    async def chat(self, body: dict[str, Any], ctx: RequestContext) -> dict[str, Any] | CliChunkStream:
        prompt = render_prompt(body.get("messages"))
        model = body.get("model") or ""
        if not isinstance(model, str):
            raise GatewayError(400, "'model' must be a string", param="model")
        if model.startswith("-"):
            raise GatewayError(400, f"invalid model name {model!r}", param="model")
        label = model or self.name
        run = await self._start(model, prompt, ctx)
        parser = self.new_parser()
        if body.get("stream") is True:
            return CliChunkStream(self._stream(run, parser, label, ctx), run)
        try:
            pieces = []
            async for event in run.events():
                pieces.extend(parser.feed(event))
            failure = self._failure(run, parser, await run.wait_exit())
        finally:
            await run.close()
        if failure:
            raise failure
        usage = self._note_usage(parser, ctx)
        return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": label,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage or _usage(0, 0)}

    async def _start(self, model: str, prompt: str, ctx: RequestContext | None) -> _Run:
        """Take a slot (waiting in the queue if need be), then spawn the tool."""
        binary = self.binary_path()
        if binary is None:
            raise GatewayError(503, f"provider '{self.name}': the {self.display} binary '{self.binary}' was not "
                                    f"found; install it or set {self.binary_env} to its path")
        if model == "default":
            model = ""
        model, prompt = _for_process(model), _for_process(prompt)
        argv = self.build_argv(binary, model, prompt)
        busy = (f"provider '{self.name}' is running its maximum of {self.max_concurrent} {self.tool} "
                f"processes ({self.cap_env})")
        await self._gate.acquire(self.max_concurrent, self.queue_limit, self.queue_wait_s, busy)
        run = _Run(self, ctx)
        self._runs.add(run)
        self.running += 1
        try:
            await run.start(argv, prompt.encode() if self.prompt_on_stdin else None, self.child_env())
        except BaseException as exc:
            await run.close()
            if isinstance(exc, OSError):
                raise GatewayError(503, f"provider '{self.name}': could not start {self.display} "
                                        f"('{binary}'): {exc.strerror or exc}; check {self.binary_env}") from None
            raise
        return run

    async def _stream(self, run: _Run, parser: EventParser, label: str,
                      ctx: RequestContext | None) -> AsyncIterator[dict[str, Any]]:
        chunk_id, created = _completion_id(), int(time.time())

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]
            return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": label,
                    "choices": choices, **extra}

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in run.events():
                for text in parser.feed(event):
                    yield chunk({"content": text})
            failure = self._failure(run, parser, await run.wait_exit())
            if failure:
                raise failure
            usage = self._note_usage(parser, ctx)
            yield chunk({}, "stop")
            if usage:
                yield chunk(None, usage=usage)
        finally:
            await run.close()

    def _failure(self, run: _Run, parser: EventParser, status: int) -> GatewayError | None:
        """The error a finished run ends in, or None; the stderr tail goes to the log only."""
        if parser.error is not None:
            message = f"{self.tool} reported an error: {_short(parser.error)}"
        elif status < 0:
            message = f"{self.tool} was killed by signal {-status}"
        elif status > 0:
            message = f"{self.tool} exited with status {status}"
        elif not parser.finished:
            message = f"{self.tool} ended without a final result"
        else:
            return None
        message = f"provider '{self.name}': {message}"
        run.log_failure(message, status)
        return GatewayError(502, message)

    def _note_usage(self, parser: EventParser, ctx: RequestContext | None) -> dict[str, Any] | None:
        if ctx is not None:
            fields: dict[str, Any] = {}
            if parser.usage:
                fields["usage"] = parser.usage
            if parser.cost_usd is not None:
                fields["cost_usd"] = parser.cost_usd
            if fields:
                ctx.note(**fields)
        return parser.usage

    async def aclose(self) -> None:
        """Kill every running child of this provider and turn away the queued requests."""
        self._gate.fail_waiters(GatewayError(503, f"provider '{self.name}' is shutting down"))
        runs = list(self._runs)
        if runs:
            await asyncio.gather(*(run.close() for run in runs), return_exceptions=True)
        # Runs still here were being closed by their cancelled request when close() was called
        # (it returns at once then). Finish them before returning: the caller may stop the event
        # loop next, which would leave a tool that ignores SIGTERM running.
        leftovers = list(self._runs)
        if leftovers:
            await asyncio.gather(*(run.finish_close() for run in leftovers), return_exceptions=True)


def _for_process(text: str) -> str:
    """Text a child process can take: a lone surrogate (a legal JSON escape, not UTF-8) becomes
    "?", and NUL, which no argv can hold, is dropped."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------
# the three tools
# ---------------------------------------------------------------------------------------------


class ClaudeCodeProvider(CliProvider):
    """`claude -p --output-format stream-json --verbose [--model M]`, the prompt on stdin."""

    tool = "claude"
    display = "Claude Code"
    binary_env, cap_env, timeout_env = "CLAUDE_CODE_BINARY", "CLAUDE_CODE_MAX_CONCURRENT", "CLAUDE_CODE_TIMEOUT_SECS"
    auth_env_vars = ("CLAUDE_CONFIG_DIR", "CLAUDE_CODE_OAUTH_TOKEN")

    def build_argv(self, binary: str, model: str, prompt: str) -> list[str]:
        argv = [binary, "-p", "--output-format", "stream-json", "--verbose"]
        return argv + ["--model", model] if model else argv

    def new_parser(self) -> EventParser:
        return ClaudeEventParser()


class CodexCliProvider(CliProvider):
    """`codex exec --json [-m M] --skip-git-repo-check --sandbox read-only -`, the prompt on stdin."""

    tool = "codex"
    display = "Codex CLI"
    binary_env, cap_env, timeout_env = "CODEX_CLI_BINARY", "CODEX_CLI_MAX_CONCURRENT", "CODEX_CLI_TIMEOUT_SECS"
    auth_env_vars = ("CODEX_HOME",)

    def build_argv(self, binary: str, model: str, prompt: str) -> list[str]:
        argv = [binary, "exec", "--json"] + (["-m", model] if model else [])
        return argv + ["--skip-git-repo-check", "--sandbox", "read-only", "-"]

    def new_parser(self) -> EventParser:
        return CodexEventParser()


class CursorProvider(CliProvider):
    """`cursor-agent -p --output-format stream-json --stream-partial-output --trust --mode ask
    [--model M] -- PROMPT`: cursor-agent takes the prompt only as an argument, so it follows `--`.
    `--trust` because every run is in a new scratch directory, which a headless cursor-agent
    otherwise refuses to work in; `--mode ask` keeps it read-only."""

    tool = "cursor-agent"
    display = "Cursor Agent"
    binary_env, cap_env, timeout_env = "CURSOR_AGENT_BINARY", "CURSOR_MAX_CONCURRENT", "CURSOR_TIMEOUT_SECS"
    auth_env_vars = ("CURSOR_API_KEY",)
    prompt_on_stdin = False

    def build_argv(self, binary: str, model: str, prompt: str) -> list[str]:
        argv = [binary, "-p", "--output-format", "stream-json", "--stream-partial-output", "--trust",
                "--mode", "ask"]
        return argv + (["--model", model] if model else []) + ["--", prompt]

    def new_parser(self) -> EventParser:
        return CursorEventParser()
