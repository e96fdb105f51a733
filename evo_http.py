"""evo-gateway's HTTP layer: errors with a status, stream decoders, and the upstream client.

The one seam of the gateway that knows nothing of LLMs (STYLE.md: split the core along it
once it grows past ~2,500 lines). `evo_gateway` builds on it; it imports nothing of ours.

Sections, in dependency order: errors · wire (SSE / line decoders, frame ends) ·
upstream client + pool.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, Callable
from urllib.parse import urlsplit

import h11

READ_CHUNK_BYTES = 65536
END_OF_MESSAGE = h11.EndOfMessage()  # h11 events are immutable: one instance serves every message
# Events are matched with `type(event) is h11.X`: h11's events derive from ABC, which makes
# isinstance() take a slow path, and h11 never hands out subclasses.

# =============================================================================================
# errors
# =============================================================================================


class GatewayError(Exception):
    """An error with the HTTP status it is answered with.

    `kind` is a dialect-neutral error class (``invalid_request``, ``authentication``,
    ``permission``, ``not_found``, ``rate_limit``, ``timeout``, ``upstream``, ``overloaded``,
    ``unavailable``, ``internal``, ``billing``); each dialect's renderer maps it to its own type names.
    `headers` are extra response headers (``retry-after``, ``www-authenticate``).
    """

    def __init__(self, status: int, message: str, kind: str = "", *, param: str | None = None,
                 code: str | None = None, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or _kind_for_status(status)
        self.param = param
        self.code = code
        self.headers = headers or []


def _kind_for_status(status: int) -> str:
    return {400: "invalid_request", 401: "authentication", 402: "billing", 403: "permission", 404: "not_found",
            408: "timeout", 413: "invalid_request", 429: "rate_limit", 502: "upstream",
            503: "unavailable", 504: "timeout", 529: "overloaded"}.get(
                status, "invalid_request" if status < 500 else "internal")


# =============================================================================================
# wire: incremental SSE and line decoders (pure feeders)
# =============================================================================================

_LINE_END = re.compile(rb"\r\n|\r|\n")


class LineSplitter:
    """Splits a byte stream into lines on CR, LF or CRLF, even when a CRLF is split across feeds."""

    __slots__ = ("_buf", "_skip_lf")

    def __init__(self) -> None:
        self._buf: list[bytes] = []  # the line still open, in the pieces it came in
        self._skip_lf = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._skip_lf and data[:1] == b"\n":
            data = data[1:]
        self._skip_lf = False
        lines = []
        start = 0
        # Only the new bytes are searched: a line arriving in many reads costs one pass, not one per read.
        for m in _LINE_END.finditer(data):
            line = data[start:m.start()]
            if self._buf:
                line, self._buf = b"".join(self._buf) + line, []
            lines.append(line)
            start = m.end()
        if start == len(data) and data[-1:] == b"\r":
            self._skip_lf = True  # a CR ending this piece may be the first half of a CRLF
        if start < len(data):
            self._buf.append(data[start:])
        return lines

    def flush(self) -> list[bytes]:
        """The unterminated last line, if any (NDJSON streams may omit the final newline)."""
        rest, self._buf = b"".join(self._buf), []
        return [rest] if rest else []


class SSEDecoder:
    """WHATWG event-stream parser fed raw bytes; returns (event type, data) pairs as they complete.

    Comments and unknown fields are ignored; an event without data is not dispatched; an event
    not closed by a blank line at the end of the stream is discarded, as browsers do.
    """

    __slots__ = ("_lines", "_event", "_data", "_started")

    def __init__(self) -> None:
        self._lines = LineSplitter()
        self._event = ""
        self._data: list[str] = []
        self._started = False

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        out = []
        for raw in self._lines.feed(chunk):
            line = raw.decode("utf-8", "replace")
            if not self._started:
                self._started = True
                if line.startswith("\ufeff"):
                    line = line[1:]
            if not line:
                if self._data:
                    out.append((self._event or "message", "\n".join(self._data)))
                self._event = ""
                self._data = []
                continue
            if line[0] == ":":
                continue
            name, sep, value = line.partition(":")
            if sep and value[:1] == " ":
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
        return out


_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # built once, not per call
_COMPACT_ASCII_JSON = json.JSONEncoder(separators=(",", ":")).encode


# What parsing JSON from outside can raise: ValueError, and RecursionError for `[[[[…` nested
# deeper than the parser's stack (legal JSON, tens of bytes per level).
BAD_JSON = (ValueError, RecursionError)


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON. A lone surrogate (a legal JSON escape, not encodable as UTF-8) stays
    an escape instead of failing the request: the object is then written ASCII-escaped."""
    text = _COMPACT_JSON(obj)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _COMPACT_ASCII_JSON(obj).encode()


def sse_frame_end(data: bytes) -> int:
    """Where the last complete SSE event in `data` ends (0 if none): after its blank line."""
    if data.endswith(b"\n\n"):
        return len(data)  # the usual case: the chunk ends on an event boundary
    end = 0
    for blank_line in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = data.rfind(blank_line)
        if i >= 0:
            end = max(end, i + len(blank_line))
    return end


def ndjson_frame_end(data: bytes) -> int:
    """Where the last complete NDJSON line in `data` ends (0 if none)."""
    return data.rfind(b"\n") + 1


# =============================================================================================
# upstream client + pool
# =============================================================================================
#
# Theory of operation. An `UpstreamConnection` is one socket and one h11 client state machine,
# used for one request at a time; its phases are named in wire order (_send_request,
# _read_response_head, read_body_chunk). The `UpstreamPool` keeps idle connections per origin;
# picking or creating one is synchronous, the I/O happens after. The response body iterator
# owns the connection: it goes back to the pool only when the body was read to its end and
# both h11 sides are DONE; any other exit (error, client gone, cancellation) closes it. A
# reused connection that fails before the first response byte is the classic stale
# keep-alive race; only then is the request retried once on a fresh connection.


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small writes (an SSE event, a response head) go out at once, not after Nagle's wait."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _StaleConnection(Exception):
    """A reused connection died before any response byte arrived: safe to retry once."""


class UpstreamTarget:
    """Where and how to reach an upstream origin: host, port, TLS, timeouts, and for errors a name."""

    __slots__ = ("base_path", "connect_timeout_s", "first_byte_timeout_s", "host", "host_header", "idle_timeout_s",
                 "key", "origin", "port", "provider", "scheme", "server_hostname", "ssl")

    def __init__(self, base_url: str, provider: str, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout_s: float = 10.0, first_byte_timeout_s: float = 300.0,
                 idle_timeout_s: float = 300.0) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.ssl = ssl_context if parts.scheme == "https" else None
        self.server_hostname = self.host if self.ssl else None
        self.provider = provider
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.idle_timeout_s = idle_timeout_s
        default_port = 443 if parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default_port else f"{host}:{self.port}").encode()
        self.key = (self.scheme, self.host, self.port, id(self.ssl))
        self.origin = f"{self.host}:{self.port}"

    def describe(self) -> str:
        return self.origin


_ssl_contexts: dict[tuple, ssl.SSLContext] = {}


def ssl_context_for(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """One shared TLS context per (ca_file, verify); the default honours SSL_CERT_FILE."""
    key = (ca_file, verify)
    ctx = _ssl_contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        _ssl_contexts[key] = ctx
    return ctx


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection to an upstream, driven by h11 in client role."""

    __slots__ = ("deadline", "h11", "reader", "reused", "state", "target", "timed_out", "writer")

    def __init__(self, target: UpstreamTarget, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.target = target
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False
        self.state = "ACTIVE"  # ACTIVE → IDLE (pooled) → ACTIVE … → CLOSED
        # Read timeouts are a deadline the pool's watchdog checks a few times a second: it
        # aborts the socket, the pending read returns, and `timed_out` says why. Cheaper than
        # a wait_for (a task and a timer) around every read of every stream chunk.
        self.deadline = 0.0
        self.timed_out = False

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.target.describe()} {self.state} reused={self.reused}>"

    @classmethod
    async def open(cls, target: UpstreamTarget) -> UpstreamConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=target.ssl,
                                    server_hostname=target.server_hostname, limit=READ_CHUNK_BYTES * 4),
            target.connect_timeout_s)
        set_nodelay(writer.transport)
        return cls(target, reader, writer)

    def is_idle_and_usable(self) -> bool:
        """A pooled connection is usable if the peer has not closed or sent anything since."""
        return self.state == "IDLE" and not self.reader.at_eof() and not self.writer.is_closing() \
            and not self.reader._buffer  # noqa: SLF001  (unsolicited bytes mean a broken peer)

    async def send_request(self, method: bytes, target: bytes, headers: list, body: bytes) -> None:
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        data += self.h11.send(h11.Data(data=body)) if body else b""
        data += self.h11.send(END_OF_MESSAGE)
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size():  # only a large body waits for the socket
            await self.writer.drain()

    async def read_response_head(self) -> h11.Response:
        got_bytes = False
        buffered, eof = self.h11.trailing_data
        must_read = not buffered and not eof  # next_event() could only answer NEED_DATA
        # One deadline for the whole head: an upstream dripping it (or `102 Processing` forever)
        # must not hold the request past first_byte_timeout_s.
        deadline = time.monotonic() + self.target.first_byte_timeout_s
        while True:
            if must_read:
                self.deadline = deadline
                data = await self._read()
                if not data and not got_bytes and self.reused:
                    raise _StaleConnection()
                got_bytes = got_bytes or bool(data)
                self.h11.receive_data(data)
            event = self.h11.next_event()
            must_read = event is h11.NEED_DATA
            if must_read:
                continue
            if type(event) is h11.InformationalResponse:
                continue
            if type(event) is h11.Response:
                return event
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before the response head")

    async def read_body_chunk(self) -> tuple[bytes, bool]:
        """All of the body that has arrived (waiting for some if none has), and whether it ended.

        Pieces already received come out joined, so a burst from the upstream is relayed with
        one write instead of one per chunk; nothing waits for more data than is there.
        """
        parts = []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if parts:
                    return b"".join(parts), False
                self.deadline = time.monotonic() + self.target.idle_timeout_s
                self.h11.receive_data(await self._read())
                continue
            if type(event) is h11.Data:
                parts.append(event.data)
                continue
            if type(event) is h11.EndOfMessage:
                return b"".join(parts), True
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in the response body")

    async def _read(self) -> bytes:
        try:
            data = await self.reader.read(READ_CHUNK_BYTES)
        finally:
            self.deadline = 0.0
        if self.timed_out:
            raise asyncio.TimeoutError()
        return data

    def check_deadline(self, now: float) -> None:
        """Called by the pool's watchdog: past its deadline, the connection is cut."""
        if self.deadline and now > self.deadline and not self.timed_out:
            self.timed_out = True
            self.state = "CLOSED"
            self.writer.transport.abort()

    def is_reusable(self) -> bool:
        """The one place that decides keep-or-close: both sides DONE, keep-alive agreed, and no
        byte beyond the response (it would be read as the next request's answer)."""
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE \
            and not self.h11.trailing_data[0]

    def close(self) -> None:
        if self.state != "CLOSED":
            self.state = "CLOSED"
            self.writer.close()


class UpstreamResponse:
    """An upstream answer: status and headers now, the body as it arrives.

    Iterate `aiter_bytes()` (or `await read()`) once. Reading the body to its end returns the
    connection to the pool; `close()` (or leaving the iterator early) discards it.
    """

    __slots__ = ("status", "headers", "_conn", "_pool", "_done")

    def __init__(self, status: int, headers: list, conn: UpstreamConnection, pool: UpstreamPool) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._pool = pool
        self._done = False

    def header(self, name: bytes) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None

    async def aiter_bytes(self, frame_end: Callable[[bytes], int] | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives; with `frame_end`, cut after whole frames (SSE events, NDJSON lines).

        A partial frame is of no use to a client and is held until it completes, so when the
        upstream fails mid-frame the error event that follows starts on a boundary.
        """
        held: list[bytes] = []  # a frame still incomplete, in the pieces it came in
        try:
            while True:
                chunk, ended = await self._next_piece()
                if frame_end is not None and chunk:
                    chunk = self._whole_frames(chunk, held, frame_end)
                if chunk:
                    yield chunk
                if ended:
                    break
            if held:  # the body ended inside a frame: end the frame, so nothing sent after it merges in
                yield b"".join(held) + (b"\n\n" if frame_end is sse_frame_end else b"\n")
        finally:
            self._release()

    @staticmethod
    def _whole_frames(chunk: bytes, held: list[bytes], frame_end: Callable[[bytes], int]) -> bytes:
        """The whole frames that `chunk` completes (with what `held` had); the rest stays in `held`.

        Only the new piece is searched for a boundary (with the held tail a blank line may start
        in), so an event arriving in many reads costs one pass, not one per read.
        """
        if not held:
            end = frame_end(chunk)
            if end < len(chunk):
                held.append(chunk[end:])
            return chunk[:end]
        overlap = b"".join(held[-3:])[-3:]  # the last pieces may be shorter than a blank line
        end = frame_end(overlap + chunk)
        if not end:
            held.append(chunk)
            return b""
        end -= len(overlap)  # a boundary wholly inside the held tail would have been cut before
        whole = b"".join(held) + chunk[:end]
        held[:] = [chunk[end:]] if end < len(chunk) else []
        return whole

    async def read(self, limit: int = 0) -> bytes:
        """The whole body (a plain loop: no async generator for the common non-stream case).

        With `limit`, at most about that many bytes: reading stops there and the connection,
        its body unfinished, is closed instead of pooled.
        """
        parts = []
        size = 0
        try:
            while True:
                chunk, ended = await self._next_piece()
                parts.append(chunk)
                size += len(chunk)
                if ended or (limit and size >= limit):
                    return b"".join(parts)
        finally:
            self._release()

    async def _next_piece(self) -> tuple[bytes, bool]:
        conn = self._conn
        try:
            chunk, ended = await conn.read_body_chunk()
        except BaseException as e:
            raise self._pool.map_error(e, conn.target) from None
        if ended:
            self._done = True
        return chunk, ended

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._pool.release(conn, self._done and conn.is_reusable())

    def close(self) -> None:
        self._release()


class UpstreamPool:
    """Keep-alive connections per origin, and the one boundary that maps transport errors."""

    WATCHDOG_S = 0.25

    def __init__(self, max_idle_per_origin: int = 64) -> None:
        self._idle: dict[tuple, list[UpstreamConnection]] = {}
        self.max_idle_per_origin = max_idle_per_origin
        self._in_use: set[UpstreamConnection] = set()  # taken from the pool or opened, not yet released
        self._watchdog: asyncio.Task | None = None
        self._live_keys: set | None = None  # after a reload: the origins some provider still uses

    async def _watch_deadlines(self) -> None:
        while True:
            await asyncio.sleep(self.WATCHDOG_S)
            now = time.monotonic()
            for conn in list(self._in_use):
                conn.check_deadline(now)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """A request is over: its connection goes back to the pool, or is closed."""
        self._in_use.discard(conn)
        if not reusable:
            conn.close()
            return
        if self._live_keys is not None and conn.target.key not in self._live_keys:
            conn.close()  # its provider was removed by a reload while this request ran
            return
        try:
            conn.h11.start_next_cycle()
        except h11.LocalProtocolError:
            conn.close()
            return
        idle = self._idle.setdefault(conn.target.key, [])
        if len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.state = "IDLE"
        idle.append(conn)

    def _take_idle(self, target: UpstreamTarget) -> UpstreamConnection | None:
        idle = self._idle.get(target.key)
        while idle:
            conn = idle.pop()
            if conn.is_idle_and_usable():
                conn.state = "ACTIVE"
                conn.reused = True
                conn.target = target  # this provider's timeouts, which a reload may have changed
                return conn
            conn.close()
        return None

    def stats(self) -> dict[str, tuple[int, int]]:
        """origin → (idle, active) for metrics."""
        out: dict[str, tuple[int, int]] = {}
        for key, conns in self._idle.items():
            out[f"{key[1]}:{key[2]}"] = (len(conns), 0)
        for conn in self._in_use:
            if conn.state == "ACTIVE":
                idle, active = out.get(conn.target.origin, (0, 0))
                out[conn.target.origin] = (idle, active + 1)
        return out

    def retain_origins(self, keys: set) -> None:
        """After a reload: close idle connections to origins no provider uses any more.

        Connections busy with a request in flight are left alone; they are closed instead of
        pooled when that request ends.
        """
        self._live_keys = set(keys)
        for key in [k for k in self._idle if k not in keys]:
            for conn in self._idle.pop(key):
                conn.close()

    def close_all(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for conn in list(self._in_use):
            conn.close()
        self._in_use.clear()
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def request(self, target: UpstreamTarget, method: str, path: str, headers: list,
                      body: bytes = b"") -> UpstreamResponse:
        """Send one request and return once the response head has arrived."""
        full_path = (target.base_path + path).encode()
        all_headers = [(b"host", target.host_header), *headers]
        if body or method == "POST":
            all_headers.append((b"content-length", str(len(body)).encode()))
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch_deadlines())
        attempt = 0
        while True:
            conn = self._take_idle(target)
            try:
                if conn is None:
                    conn = await UpstreamConnection.open(target)
                self._in_use.add(conn)
                await conn.send_request(method.encode(), full_path, all_headers, body)
                head = await conn.read_response_head()
            except _StaleConnection:
                self.release(conn, False)
                attempt += 1
                if attempt > 1:
                    raise GatewayError(502, f"provider '{target.provider}': {target.describe()} closed the "
                                            "connection without answering", "upstream") from None
                continue
            except BaseException as e:
                if conn is not None:
                    self.release(conn, False)
                stale = conn is not None and conn.reused and attempt == 0 and _is_stale_error(e)
                if stale:
                    attempt += 1
                    continue
                raise self.map_error(e, target) from None
            headers = [(name.lower(), value) for name, value in head.headers.raw_items()]
            return UpstreamResponse(head.status_code, headers, conn, self)

    @staticmethod
    def map_error(e: BaseException, target: UpstreamTarget) -> BaseException:
        """Transport failures → GatewayError naming the provider and the host (502 / 504)."""
        where = f"provider '{target.provider}' at {target.describe()}"
        if isinstance(e, (asyncio.CancelledError, GatewayError, KeyboardInterrupt, SystemExit)):
            return e
        if isinstance(e, asyncio.TimeoutError):
            return GatewayError(504, f"{where}: timed out", "timeout")
        if isinstance(e, ConnectionRefusedError):
            return GatewayError(502, f"{where}: connection refused (is the server running?)", "upstream")
        if isinstance(e, socket.gaierror):
            return GatewayError(502, f"{where}: cannot resolve host name ({e.strerror})", "upstream")
        if isinstance(e, ssl.SSLError):
            reason = getattr(e, "reason", None) or str(e)
            return GatewayError(502, f"{where}: TLS failed ({reason}); set ca_file or verify in the config "
                                     "for a private certificate authority", "upstream")
        if isinstance(e, h11.RemoteProtocolError):
            return GatewayError(502, f"{where}: invalid HTTP response ({e})", "upstream")
        if isinstance(e, OSError):
            return GatewayError(502, f"{where}: connection failed ({e.strerror or e})", "upstream")
        return e


def _is_stale_error(e: BaseException) -> bool:
    # A reset or a broken pipe on a reused connection before any response byte: the peer
    # closed it while it sat idle in our pool.
    return isinstance(e, (ConnectionResetError, BrokenPipeError)) or (
        isinstance(e, h11.RemoteProtocolError) and "without sending" in str(e))
