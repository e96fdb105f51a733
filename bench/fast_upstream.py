"""A fast, fixed-answer OpenAI-style upstream for the benchmark (not for tests: see tests/mock_upstream.py).

`python3 bench/fast_upstream.py [--port P]` listens on 127.0.0.1, prints one line
``READY <port> <event loop>`` on stdout and serves until SIGTERM/SIGINT.

It answers every `POST /v1/chat/completions` on a keep-alive HTTP/1.1 connection with
pre-encoded bytes: a chat.completion JSON (Content-Length) when the body does not ask for a
stream, else an SSE stream of 10 chat.completion.chunk events plus ``data: [DONE]``, sent
with Transfer-Encoding: chunked, one HTTP chunk per event (so a proxy sees one chunk per
event, as it would from a real model, but with no delay between them).

Why so bare: the upstream must never be the bottleneck of a proxy benchmark. Parsing is
just enough to frame requests (find the head end, read Content-Length, slice the body) and
to spot ``"stream": true`` in the body; there is no JSON decoding and no per-request
encoding. Anything it does not understand (a chunked request body, another path) gets a
canned error and the connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys

# ---- the canned answers, encoded once ---------------------------------------------------------

_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1735000000, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}, separators=(",", ":")).encode()

JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(_COMPLETION)).encode() + b"\r\n\r\n" + _COMPLETION)


def _sse_events() -> list:
    tokens = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?", ""]
    events = []
    for i, tok in enumerate(tokens):
        last = i == len(tokens) - 1
        delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
        chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1735000000, "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None}]}
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(pieces: list) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


SSE_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + _chunked(_sse_events()))

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

_ROUTE = b"POST /v1/chat/completions "
_CL = b"\r\ncontent-length:"


class FastUpstream(asyncio.Protocol):
    """One connection: frame requests out of the byte stream and write a canned answer for each."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        # A loop because a client may pipeline; in practice there is one request per read.
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buf[:head_end].lower()
            if not buf.startswith(_ROUTE):
                self._close_with(out, NOT_FOUND)
                return
            i = head.find(_CL)
            if i < 0 or b"transfer-encoding" in head:
                self._close_with(out, NOT_IMPLEMENTED)  # chunked request bodies: not needed here
                return
            j = head.find(b"\r\n", i + len(_CL))
            length = int(head[i + len(_CL):j if j >= 0 else len(head)])
            end = head_end + 4 + length
            if len(buf) < end:
                break
            body = buf[head_end + 4:end]
            buf = buf[end:]
            # Both `json.dumps` spellings; the load generator, the gateway and aiohttp all use one.
            stream = b'"stream": true' in body or b'"stream":true' in body
            out.append(SSE_RESPONSE if stream else JSON_RESPONSE)
        self.buf = buf
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]

    def _close_with(self, out: list, answer: bytes) -> None:
        out.append(answer)
        self.transport.write(b"".join(out))  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]
        self.buf = b""


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(port: int) -> None:
    loop = asyncio.get_event_loop()
    server = await loop.create_server(FastUpstream, "127.0.0.1", port, backlog=1024)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound} {type(loop).__module__.split('.')[0]}", flush=True)
    await stop
    server.close()


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(args.port))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
