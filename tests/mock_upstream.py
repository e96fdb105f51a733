"""A scriptable HTTP/1.1 upstream on 127.0.0.1 (real sockets, h11), for tests and the benchmark.

A test gives it a handler `async def handler(req) -> MockResponse`; every request is recorded
(method, path, headers, JSON body) along with the connection it arrived on, so tests can
assert what the gateway forwarded and whether it reused a connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Callable

import h11


class MockRequest:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes, conn_id: int) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.conn_id = conn_id

    def json(self) -> Any:
        return json.loads(self.body)


class MockResponse:
    """status + headers + a body of bytes, or an async iterator of byte chunks (sent as they come)."""

    def __init__(self, status: int = 200, body: bytes | AsyncIterator[bytes] | Any = b"",
                 headers: list[tuple[str, str]] | None = None, content_type: str | None = None) -> None:
        if not isinstance(body, (bytes, str)) and not hasattr(body, "__aiter__"):
            body = json.dumps(body).encode()
            content_type = content_type or "application/json"
        if isinstance(body, str):
            body = body.encode()
        self.status = status
        self.body = body
        self.headers = list(headers or [])
        if content_type:
            self.headers.append(("content-type", content_type))


# A handler returning DROP closes the connection without answering (a keep-alive race).
DROP = MockResponse(0)

Handler = Callable[[MockRequest], Awaitable[MockResponse]]


class MockUpstream:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[MockRequest] = []
        self.connections_opened = 0
        self.connections_closed = 0
        self.closed_event = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set = set()
        self.port = 0

    async def start(self, ssl_context: Any = None) -> MockUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()

    def close_idle_connections(self) -> None:
        for w in list(self._writers):
            w.close()

    async def _stream_until_peer_leaves(self, reader, writer, conn, body) -> bool:
        """Send a streamed body; a peer that closes meanwhile cancels the body generator."""
        async def send() -> None:
            async for chunk in body:
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()

        sender = asyncio.ensure_future(send())
        watcher = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            watcher.cancel()
            try:  # wait until the read is really over, or the next read would find it still pending
                early = await watcher
            except asyncio.CancelledError:
                early = b""
            if early:
                conn.receive_data(early)  # the peer spoke before the body ended: h11 keeps it
            sender.result()
            return True
        sender.cancel()  # the gateway went away mid-stream
        try:
            await sender
        except (asyncio.CancelledError, Exception):
            pass
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_opened += 1
        conn_id = self.connections_opened
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.IDLE:
                        break
                    if not data:
                        break
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    break
                if not isinstance(event, h11.Request):
                    break
                body = b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                        continue
                    if isinstance(ev, h11.Data):
                        body += ev.data
                        continue
                    break
                headers = {k.decode(): v.decode() for k, v in event.headers}
                req = MockRequest(event.method.decode(), event.target.decode(), headers, body, conn_id)
                self.requests.append(req)
                resp = await self.handler(req)
                if resp is DROP:
                    break
                hdrs = [(k, v) for k, v in resp.headers]
                if isinstance(resp.body, bytes):
                    hdrs.append(("content-length", str(len(resp.body))))
                    writer.write(conn.send(h11.Response(status_code=resp.status, headers=hdrs)))
                    writer.write(conn.send(h11.Data(data=resp.body)) if resp.body else b"")
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                else:
                    writer.write(conn.send(h11.Response(status_code=resp.status, headers=hdrs)))
                    await writer.drain()
                    if not await self._stream_until_peer_leaves(reader, writer, conn, resp.body):
                        break
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self.connections_closed += 1
            self.closed_event.set()
            writer.close()


def sse_body(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chat_completion(content: str = "Hello!", model: str = "m", usage: dict | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1735000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def chat_chunks(pieces: list[str], model: str = "m", usage: bool = True) -> list[dict]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1735000000, "model": model}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    out += [dict(base, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in pieces]
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if usage:
        out.append(dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                 "total_tokens": 5 + len(pieces)}))
    return out


class RawUpstream:
    """An upstream that answers with raw bytes, for misbehaviour h11 would not let MockUpstream write.

    `script(n, head)` gets the request's number on its connection (1, 2, …) and its head, and
    returns the bytes to send, or an iterable of (delay_s, bytes) pieces; the connection stays
    open for the next request unless a piece is None (close). Runs in a thread of its own.
    """

    def __init__(self, script: Callable[[int, bytes], Any]) -> None:
        import socket
        import threading

        self.script = script
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        import re
        import time

        buffered = b""
        number = 0
        with conn:
            conn.settimeout(30)
            try:
                while not self._stop.is_set():
                    while b"\r\n\r\n" not in buffered:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    head, buffered = buffered.split(b"\r\n\r\n", 1)
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                    need = int(length.group(1)) if length else 0
                    while len(buffered) < need:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    buffered = buffered[need:]
                    number += 1
                    answer = self.script(number, head)
                    for delay, piece in ([(0, answer)] if isinstance(answer, bytes) else answer):
                        if self._stop.is_set():
                            return
                        time.sleep(delay)
                        if piece is None:
                            return
                        conn.sendall(piece)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def raw_json_response(obj: Any, status: str = "200 OK") -> bytes:
    body = json.dumps(obj).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            .encode() + body)
