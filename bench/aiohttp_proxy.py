"""The reference point for the benchmark: a minimal aiohttp reverse proxy for chat completions.

`python3 bench/aiohttp_proxy.py --upstream http://127.0.0.1:P/v1/chat/completions [--port Q]`
listens on 127.0.0.1, prints one line ``READY <port> <event loop>`` and serves until SIGTERM.

It does the same work per request as evo-gateway on this route, no more and no less, so the
two req/s figures can be compared: read the body, `json.loads` it, strip the ``mock:`` provider
prefix from `model`, `json.dumps` it, POST it upstream on a pooled keep-alive connection, then
either return the whole upstream body (non-stream) or relay the upstream's HTTP chunks as they
arrive through a `StreamResponse` (``"stream": true``). Access logging is off, as the gateway
runs with EVO_LOG=error. aiohttp is a bench-only dependency: nothing outside bench/ imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

UPSTREAM_HEADERS = {"content-type": "application/json"}


def make_app(upstream_url: str) -> web.Application:
    app = web.Application()
    state: dict = {}

    async def open_session(app: web.Application) -> None:
        # limit=0: no cap on pooled connections, like the gateway's pool (it keeps up to 64 idle).
        state["session"] = ClientSession(connector=TCPConnector(limit=0, keepalive_timeout=75),
                                         timeout=ClientTimeout(total=None, sock_read=300))

    async def close_session(app: web.Application) -> None:
        await state["session"].close()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        model = body.get("model")
        if isinstance(model, str) and model.startswith("mock:"):
            body["model"] = model[len("mock:"):]
        stream = body.get("stream") is True
        data = json.dumps(body).encode()
        async with state["session"].post(upstream_url, data=data, headers=UPSTREAM_HEADERS) as up:
            ctype = up.headers.get("content-type", "application/json")
            if not stream:
                return web.Response(status=up.status, body=await up.read(), headers={"content-type": ctype})
            out = web.StreamResponse(status=up.status, headers={"content-type": ctype, "cache-control": "no-cache"})
            await out.prepare(request)
            # iter_chunks: one write per upstream HTTP chunk, as the gateway relays one h11 Data
            # event per chunk (iter_any would merge whatever is buffered into one write).
            async for chunk, _ in up.content.iter_chunks():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.router.add_post("/v1/chat/completions", chat)
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


async def serve(port: int, upstream_url: str) -> None:
    loop = asyncio.get_event_loop()
    runner = web.AppRunner(make_app(upstream_url), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    print(f"READY {sock.getsockname()[1]} {type(loop).__module__.split('.')[0]}", flush=True)
    await stop
    await runner.cleanup()


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="full URL of the upstream chat completions endpoint")
    args = parser.parse_args(argv)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(args.port, args.upstream))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
