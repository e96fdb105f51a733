"""Test harness: an event loop in a background thread hosting the gateway and mock upstreams.

Tests talk to the gateway with real clients (the official SDKs, raw sockets) from the main
thread; the gateway and the mocks run on real sockets on 127.0.0.1 in the loop thread.
Async unit tests use the tiny `run_async` decorator instead of an async test plugin.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import threading
from typing import Any, Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mock_upstream import MockResponse, MockUpstream  # noqa: E402

import evo_gateway  # noqa: E402

TIMEOUT_S = 30


def run_async(fn: Callable) -> Callable:
    """Run an `async def` test in a fresh event loop, bounded in time."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(fn(*args, **kwargs), TIMEOUT_S))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return wrapper


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie left for a PID 1 that does not reap (some containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class LoopThread:
    """An asyncio loop running in a daemon thread; `call()` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_leftovers() -> None:  # mock handlers still parked on a gate, say
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_leftovers(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class Gate:
    """A handshake between the test thread and a mock handler: `set()` from the test, `await wait()` in a mock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        self._thread_event = threading.Event()

    def set(self) -> None:
        self._thread_event.set()
        self._loop.call_soon_threadsafe(self._event.set)

    def is_set(self) -> bool:
        return self._thread_event.is_set()

    async def wait(self, timeout: float = TIMEOUT_S) -> None:
        await asyncio.wait_for(self._event.wait(), timeout)

    def wait_blocking(self, timeout: float = TIMEOUT_S) -> bool:
        return self._thread_event.wait(timeout)


class Harness:
    """Starts mock upstreams and a gateway on 127.0.0.1 port 0; stops everything it started."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.upstreams: list[MockUpstream] = []
        self.server: evo_gateway.Server | None = None
        self.gateway: evo_gateway.Gateway | None = None
        self.url = ""
        self.port = 0

    def gate(self) -> Gate:
        async def make() -> Gate:
            return Gate(asyncio.get_event_loop())
        return self.lt.call(make())

    def upstream(self, handler: Callable, ssl_context: Any = None) -> MockUpstream:
        async def make() -> MockUpstream:
            return await MockUpstream(handler).start(ssl_context)
        up = self.lt.call(make())
        self.upstreams.append(up)
        return up

    def json_upstream(self, obj: Any, status: int = 200) -> MockUpstream:
        async def handler(req: Any) -> MockResponse:
            return MockResponse(status, obj)
        return self.upstream(handler)

    def start(self, providers: list[dict], server: dict | None = None, environ: dict | None = None,
              config_file: str | None = None) -> str:
        data = {"server": dict({"host": "127.0.0.1", "port": 0}, **(server or {})), "providers": providers}
        if config_file:
            with open(config_file, "w") as f:
                json.dump(data, f)
        config = evo_gateway.parse_config(data, config_file or "test-gateway.json")

        async def make() -> list:
            env = environ if environ is not None else {}
            self.gateway = evo_gateway.Gateway(config, env)
            evo_gateway.enable_auth(self.gateway, env)  # EVO_GATEWAY_AUTH{,_KEYS} in `environ` turn keys on
            self.server = evo_gateway.Server(self.gateway, config.server, config_file)
            return await self.server.start("127.0.0.1", 0)

        bound = self.lt.call(make())
        self.port = bound[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.shutdown(0.5)
            for up in self.upstreams:
                await up.stop()
        self.lt.call(stop())


def provider(name: str, url: str, **extra: Any) -> dict:
    """A provider entry for the test config."""
    entry = {"name": name, "base_url": url, "enabled": True, "api_key_envs": [],
             "provider_type": "open_ai_compatible"}
    entry.update(extra)
    return entry


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def harness(loop_thread):
    h = Harness(loop_thread)
    yield h
    h.stop()
