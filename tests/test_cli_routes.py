"""CLI-subprocess providers (claude_code, codex_cli, cursor) served through the running gateway.

The fake tools of tests/fake_cli/ stand in for the real ones (see tests/fake_cli/_fake.py: the
prompt text picks their behaviour). Each is reached through a wrapper made per test that embeds
the record path, because the provider gives the child only a minimal environment. The gateway
runs on 127.0.0.1 in the harness loop thread; the official openai / anthropic / ollama clients
and raw sockets talk to it from the test thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from conftest import ROOT, is_gone
from pyz_smoke import free_port, http_get

from evo_gateway import ChatStream, Gateway, GatewayError, RequestContext, parse_config

FAKE_DIR = Path(__file__).parent / "fake_cli"
# provider name → (provider_type, fake script, binary env, max-concurrent env, timeout env)
TOOLS = {
    "claude-code": ("claude_code", "claude", "CLAUDE_CODE_BINARY", "CLAUDE_CODE_MAX_CONCURRENT",
                    "CLAUDE_CODE_TIMEOUT_SECS"),
    "codex-cli": ("codex_cli", "codex", "CODEX_CLI_BINARY", "CODEX_CLI_MAX_CONCURRENT", "CODEX_CLI_TIMEOUT_SECS"),
    "cursor": ("cursor", "cursor-agent", "CURSOR_AGENT_BINARY", "CURSOR_MAX_CONCURRENT", "CURSOR_TIMEOUT_SECS"),
}
# what each fake answers to an ordinary prompt (see _fake.py), and its usage
CONTENT = {"claude-code": "Let me check.\n\nThe answer is 42.", "codex-cli": "Let me check.\n\nThe answer is 42.",
           "cursor": "Let me check. The answer is 42."}
TOTAL_TOKENS = {"claude-code": 22, "codex-cli": 109, "cursor": 30}
MODEL_FLAG = {"claude-code": ["--model", "sonnet"], "codex-cli": ["-m", "sonnet"], "cursor": ["--model", "sonnet"]}
FIRST_TEXT = b"Let me"          # every fake prints this before it sleeps or fails
POLL_S = 10.0


def cli_provider(name: str) -> dict:
    return {"name": name, "base_url": "", "provider_type": TOOLS[name][0], "enabled": True, "api_key_envs": []}


class Tools:
    """Wrappers for the three fakes in `tmp_path/bin`, the gateway environ that points at them,
    and what the fakes recorded (argv, stdin, env, cwd, pid, grandchild)."""

    def __init__(self, tmp_path: Path) -> None:
        self.record_path = tmp_path / "record.jsonl"
        self.release_path = tmp_path / "release"
        bindir = tmp_path / "bin"
        bindir.mkdir()
        self.environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
                        "OPENAI_API_KEY": "sk-gateway-secret", "ANTHROPIC_API_KEY": "sk-ant-gateway-secret"}
        for _, script, binary_env, _, _ in TOOLS.values():
            wrapper = bindir / script
            wrapper.write_text(f'#!/bin/sh\nFAKE_CLI_RECORD="{self.record_path}" '
                               f'FAKE_CLI_RELEASE="{self.release_path}" exec "{FAKE_DIR / script}" "$@"\n')
            wrapper.chmod(0o755)
            self.environ[binary_env] = str(wrapper)

    def records(self) -> list[dict]:
        if not self.record_path.exists():
            return []
        return [json.loads(line) for line in self.record_path.read_text().splitlines() if line.strip()]

    def wait_records(self, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + POLL_S
        while len(self.records()) < count:
            assert time.monotonic() < deadline, f"the fake tool never started ({len(self.records())}/{count})"
            time.sleep(0.02)
        return self.records()


@pytest.fixture
def tools(tmp_path):
    t = Tools(tmp_path)
    yield t
    kill_leftovers(t)                   # a failing test must not leave sleeping fakes behind


def start(harness, tools: Tools, names=tuple(TOOLS), **env: str) -> str:
    return harness.start([cli_provider(n) for n in names], environ=dict(tools.environ, **env))


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def ask(prompt: str = "What is the answer?") -> list[dict]:
    return [{"role": "user", "content": prompt}]


def wait_gone(*pids: int, timeout_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(is_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if not is_gone(p)]}"
        time.sleep(0.05)


def wait_until(predicate, what: str, timeout_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def provider_of(harness, name: str):
    return harness.gateway.state.providers[name]


def kill_leftovers(tools: Tools) -> None:
    for rec in tools.records():
        for pid in (rec["pid"], rec.get("grandchild")):
            if pid and not is_gone(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------------------------
# answers through the official clients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_openai_client_non_stream_answer_from_each_cli_tool(harness, tools, name):
    url = start(harness, tools)
    r = openai_client(url).chat.completions.create(model=f"{name}:sonnet", messages=ask())
    assert r.choices[0].message.content == CONTENT[name]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == TOTAL_TOKENS[name]
    (rec,) = tools.records()
    assert rec["tool"] == TOOLS[name][1]
    argv = rec["argv"]
    flag = MODEL_FLAG[name]
    assert any(argv[i:i + 2] == flag for i in range(len(argv))), argv
    assert provider_of(harness, name).running == 0


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_prompt_with_a_lone_surrogate_and_a_nul_still_reaches_each_cli_tool(harness, tools, name):
    url = start(harness, tools)
    # "\ud800" is a legal JSON escape that no UTF-8 argv or stdin can carry; NUL no argv can.
    raw = b'{"model": "%s:sonnet", "messages": [{"role": "user", "content": "What is \\ud800 the\\u0000 answer?"}]}' % (
        name.encode())
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == CONTENT[name]
    (rec,) = tools.records()
    sent = rec["stdin"] if TOOLS[name][1] != "cursor-agent" else rec["argv"][-1]
    assert "What is ? the answer?" in sent


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_openai_client_stream_answer_from_each_cli_tool_in_several_chunks(harness, tools, name):
    url = start(harness, tools)
    pieces = []
    with openai_client(url).chat.completions.stream(model=f"{name}:sonnet", messages=ask(),
                                                    stream_options={"include_usage": True}) as s:
        for event in s:
            if event.type == "content.delta" and event.delta:
                pieces.append(event.delta)
        final = s.get_final_completion()
    assert len(pieces) >= 2
    assert "".join(pieces) == CONTENT[name]
    assert final.choices[0].message.content == CONTENT[name]
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.total_tokens == TOTAL_TOKENS[name]
    assert MODEL_FLAG[name][1] in tools.records()[0]["argv"]


def test_a_stream_whose_client_did_not_ask_for_usage_gets_no_usage_chunk(harness, tools):
    url = start(harness, tools)
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
            "model": "claude-code:sonnet", "stream": True, "messages": ask()}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == CONTENT["claude-code"]
    assert all(c["choices"] and "usage" not in c for c in chunks)  # WIRE §1.3: only with include_usage


def test_anthropic_client_stream_through_claude_code_is_translated(harness, tools):
    url = start(harness, tools)
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)
    texts = []
    with client.messages.stream(model="claude-code:sonnet", max_tokens=256, system="Be brief.",
                                messages=[{"role": "user", "content": "What is the answer?"}]) as s:
        for text in s.text_stream:
            texts.append(text)
        final = s.get_final_message()
    assert "".join(texts) == CONTENT["claude-code"] and len(texts) >= 2
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == CONTENT["claude-code"]
    assert final.usage.output_tokens == 7
    (rec,) = tools.records()
    assert rec["argv"][-2:] == ["--model", "sonnet"]
    assert "Be brief." in rec["stdin"] and "What is the answer?" in rec["stdin"]


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_client_chat_through_codex_cli(harness, tools, stream):
    url = start(harness, tools)
    client = ollama.Client(host=url, timeout=30)
    if stream:
        parts = list(client.chat(model="codex-cli:sonnet", messages=ask(), stream=True))
        assert "".join(p.message.content for p in parts) == CONTENT["codex-cli"]
        assert parts[-1].done and parts[-1].eval_count == 9
    else:
        r = client.chat(model="codex-cli:sonnet", messages=ask(), stream=False)
        assert r.message.content == CONTENT["codex-cli"] and r.done
    assert tools.records()[0]["argv"][:4] == ["exec", "--json", "-m", "sonnet"]


def test_cli_child_sees_no_gateway_api_keys(harness, tools):
    url = start(harness, tools, OPENROUTER_API_KEY="sk-or-secret", UNRELATED_SETTING="x")
    c = openai_client(url)
    for name in sorted(TOOLS):
        c.chat.completions.create(model=f"{name}:sonnet", messages=ask())
    records = tools.records()
    assert sorted(r["tool"] for r in records) == ["claude", "codex", "cursor-agent"]
    for rec in records:
        env = rec["env"]
        for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", "UNRELATED_SETTING"):
            assert name not in env, (rec["tool"], name)
        assert env["HOME"] == tools.environ["HOME"] and "PATH" in env
        assert rec["cwd"] != os.getcwd() and not os.path.exists(rec["cwd"])   # a scratch dir, removed
        assert rec["pgid"] == rec["pid"]                                        # its own process group


# ---------------------------------------------------------------------------------------------
# client disconnect
# ---------------------------------------------------------------------------------------------

# route → (provider, request body): every streamed CLI answer goes through _translate_stream
DISCONNECT_CASES = {
    "/v1/chat/completions": ("claude-code", {"model": "claude-code:sonnet", "stream": True,
                                             "messages": ask("SLEEP after some text")}),
    "/v1/messages": ("claude-code", {"model": "claude-code:sonnet", "stream": True, "max_tokens": 100,
                                     "messages": ask("SLEEP after some text")}),
    "/api/chat": ("codex-cli", {"model": "codex-cli:sonnet", "messages": ask("SLEEP after some text")}),
    "/v1/responses": ("cursor", {"model": "cursor:sonnet", "stream": True, "input": "SLEEP after some text"}),
}


def open_stream(port: int, path: str, body: dict) -> tuple[socket.socket, bytes]:
    """POST `body` on a raw socket and read until the first frame that carries the tool's text."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=POLL_S)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    deadline = time.monotonic() + POLL_S
    while FIRST_TEXT not in got:
        assert time.monotonic() < deadline, got
        chunk = s.recv(65536)
        assert chunk, f"the gateway closed the stream early: {got!r}"
        got += chunk
    return s, got


@pytest.mark.parametrize("path", sorted(DISCONNECT_CASES))
def test_client_disconnect_mid_stream_kills_the_tool_and_its_grandchild(harness, tools, path):
    name, body = DISCONNECT_CASES[path]
    start(harness, tools)
    s, got = open_stream(harness.port, path, body)
    assert got.startswith(b"HTTP/1.1 200")
    (rec,) = tools.records()
    assert not is_gone(rec["pid"]) and not is_gone(rec["grandchild"])    # alive while the client listens
    s.close()
    wait_gone(rec["pid"], rec["grandchild"])
    wait_until(lambda: provider_of(harness, name).running == 0, "the slot to be released")
    wait_until(lambda: not os.path.exists(rec["cwd"]), "the scratch dir to be removed")


# ---------------------------------------------------------------------------------------------
# timeout, concurrency cap and queue
# ---------------------------------------------------------------------------------------------


def test_timeout_is_504_in_each_clients_dialect_and_kills_the_tool(harness, tools):
    url = start(harness, tools, CLAUDE_CODE_TIMEOUT_SECS="1")
    with pytest.raises(openai.APIStatusError) as oi:
        openai_client(url).chat.completions.create(model="claude-code:sonnet", messages=ask("SLEEP"))
    assert oi.value.status_code == 504
    err = oi.value.response.json()["error"]
    assert err["type"] == "timeout_error" and "CLAUDE_CODE_TIMEOUT_SECS" in err["message"]

    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(anthropic.APIStatusError) as ai:
        client.messages.create(model="claude-code:sonnet", max_tokens=100, messages=ask("SLEEP"))
    assert ai.value.status_code == 504
    assert ai.value.response.json()["type"] == "error"
    assert ai.value.response.json()["error"]["type"] == "timeout_error"

    with pytest.raises(ollama.ResponseError) as li:
        ollama.Client(host=url, timeout=30).chat(model="claude-code:sonnet", messages=ask("SLEEP"), stream=False)
    assert li.value.status_code == 504 and "did not finish" in li.value.error

    records = tools.records()
    assert len(records) == 3
    wait_gone(*(pid for r in records for pid in (r["pid"], r["grandchild"])))


def test_cap_one_second_request_waits_then_succeeds_third_gets_429(harness, tools):
    url = start(harness, tools, names=("claude-code",), CLAUDE_CODE_MAX_CONCURRENT="1")
    provider = provider_of(harness, "claude-code")
    c = openai_client(url)

    def chat(prompt: str) -> str:
        return c.chat.completions.create(model="claude-code:sonnet", messages=ask(prompt)).choices[0].message.content

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, "WAITFILE then answer")
        tools.wait_records(1)
        second = pool.submit(chat, "queued question")
        wait_until(lambda: provider.waiting == 1, "the second request to queue")
        assert len(tools.records()) == 1                    # the queued one has not started a process
        with pytest.raises(openai.RateLimitError) as info:
            chat("one too many")
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "5"
        err = info.value.response.json()["error"]
        assert err["type"] == "rate_limit_error" and "CLAUDE_CODE_MAX_CONCURRENT" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
        tools.release_path.touch()
        assert first.result(POLL_S * 2) == CONTENT["claude-code"]
        assert second.result(POLL_S * 2) == CONTENT["claude-code"]
    assert len(tools.records()) == 2
    assert provider.running == 0 and provider.waiting == 0


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOOLS))
@pytest.mark.parametrize("prompt,expected", [("FAIL", "exited with status 1"), ("ISERROR", "reported an error")])
def test_failed_run_non_stream_is_502_in_openai_envelope_without_stderr(harness, tools, name, prompt, expected):
    url = start(harness, tools)
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(url).chat.completions.create(model=f"{name}:sonnet", messages=ask(prompt))
    assert info.value.status_code == 502
    body = info.value.response.text
    assert "SECRET_STDERR_DETAIL" not in body and "log noise" not in body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "upstream_error" and expected in err["message"] and f"'{name}'" in err["message"]


@pytest.mark.parametrize("name", sorted(TOOLS))
@pytest.mark.parametrize("prompt", ["FAIL", "ISERROR"])
def test_failed_run_mid_stream_ends_with_an_error_event_the_sdk_raises(harness, tools, name, prompt):
    url = start(harness, tools)
    stream = openai_client(url).chat.completions.create(model=f"{name}:sonnet", messages=ask(prompt), stream=True)
    pieces = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces).startswith("Let me")
    assert f"'{name}'" in info.value.message and "SECRET_STDERR_DETAIL" not in info.value.message
    assert provider_of(harness, name).running == 0


def test_failed_run_mid_stream_raw_frames_end_with_error_then_done(harness, tools):
    start(harness, tools)
    body = {"model": "codex-cli:sonnet", "stream": True, "messages": ask("FAIL")}
    s, got = open_stream(harness.port, "/v1/chat/completions", body)
    deadline = time.monotonic() + POLL_S
    while not got.endswith(b"0\r\n\r\n"):                   # the chunked body's last chunk
        assert time.monotonic() < deadline, got
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    frames = re.findall(rb"^data: (.*)$", got, re.M)
    assert frames[-1] == b"[DONE]"
    err = json.loads(frames[-2])["error"]
    assert "exited with status 1" in err["message"]
    assert b"SECRET_STDERR_DETAIL" not in got
    assert not any(b'"finish_reason":"stop"' in f for f in frames)


# ---------------------------------------------------------------------------------------------
# shutdown
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("prompt", ["SLEEP forever", "STUBBORN SLEEP forever"])
def test_gateway_shutdown_kills_running_cli_processes_before_it_returns(harness, tools, stream, prompt):
    start(harness, tools)
    provider = provider_of(harness, "cursor")
    body = {"model": "cursor:sonnet", "stream": stream, "messages": ask(prompt)}
    if stream:
        s, _ = open_stream(harness.port, "/v1/chat/completions", body)
    else:
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", harness.port), timeout=POLL_S)
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    (rec,) = tools.wait_records(1)
    try:
        harness.lt.call(harness.server.shutdown(0.2))
        # Nothing may be left for after shutdown: `serve` stops its event loop right then, and a
        # tool that ignores SIGTERM would outlive the gateway.
        assert provider.running == 0 and not provider._runs
        assert not os.path.exists(rec["cwd"])
        wait_gone(rec["pid"], rec["grandchild"], timeout_s=2)
    finally:
        s.close()


def test_serve_process_sigterm_leaves_no_orphan_even_when_the_tool_ignores_sigterm(tools, tmp_path):
    port = free_port()
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps({"server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 0.2},
                                  "providers": [cli_provider("claude-code")]}))
    env = dict(tools.environ, EVO_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "evo_gateway_cli.py"), "serve", "--config",
                             str(config)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    s = None
    try:
        deadline = time.monotonic() + 20
        while s is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            try:
                s, _ = open_stream(port, "/v1/chat/completions", {
                    "model": "claude-code:sonnet", "stream": True, "messages": ask("STUBBORN SLEEP")})
            except ConnectionRefusedError:
                time.sleep(0.1)
        (rec,) = tools.records()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out.decode(errors="replace")
        wait_gone(rec["pid"], rec["grandchild"])
        assert not os.path.exists(rec["cwd"])
    finally:
        if s is not None:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---------------------------------------------------------------------------------------------
# /health
# ---------------------------------------------------------------------------------------------


def test_health_reports_whether_each_cli_binary_is_found_without_running_it(harness, tools, tmp_path):
    harness.start([cli_provider(n) for n in TOOLS] + [dict(cli_provider("codex-cli"), name="off", enabled=False)],
                  environ=dict(tools.environ, CURSOR_AGENT_BINARY=str(tmp_path / "no-such-agent")))
    status, body = http_get(harness.port, "/health")
    assert status == 200
    entries = {p["name"]: p for p in json.loads(body)["providers"]}
    assert entries["claude-code"]["binary"] == tools.environ["CLAUDE_CODE_BINARY"]
    assert entries["claude-code"]["ok"] is True
    assert entries["codex-cli"]["binary"] == tools.environ["CODEX_CLI_BINARY"] and entries["codex-cli"]["ok"]
    assert entries["cursor"]["binary"] is None and entries["cursor"]["ok"] is False
    assert "binary" not in entries["off"]
    assert tools.records() == []                            # no tool was run


# ---------------------------------------------------------------------------------------------
# _translate_stream closes the provider's stream on every exit path
# ---------------------------------------------------------------------------------------------


class _ClosableChunks:
    """An async chunk iterator with `aclose`, like CliChunkStream; `fail` picks how it ends."""

    def __init__(self, fail: BaseException | None = None, wait: asyncio.Event | None = None) -> None:
        self.fail = fail
        self.wait = wait
        self.sent = 0
        self.closed = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self.sent == 0:
            self.sent += 1
            return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
        if self.wait is not None:
            await self.wait.wait()
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed += 1


class _BrokenTranslator(ChatStream):
    def feed(self, chunk: dict) -> list[bytes]:
        raise KeyError("translator bug")


def _gateway() -> Gateway:
    return Gateway(parse_config({"server": {"host": "127.0.0.1", "port": 0}, "providers": []}, "test.json"), {})


@pytest.mark.parametrize("ending", ["finish", "gateway_error", "translator_bug", "consumer_aclose", "cancelled"])
def test_translate_stream_closes_the_chunk_stream_on_every_exit_path(ending):
    async def scenario() -> tuple[_ClosableChunks, list[bytes]]:
        gateway = _gateway()
        chunks = _ClosableChunks(GatewayError(502, "tool died") if ending == "gateway_error" else None,
                                 asyncio.Event() if ending == "cancelled" else None)
        translator = _BrokenTranslator(True) if ending == "translator_bug" else ChatStream(True)
        frames = gateway._translate_stream(chunks, translator, RequestContext("r", {}))
        out = []
        if ending == "consumer_aclose":
            out.append(await frames.__anext__())
            await frames.aclose()
        elif ending == "cancelled":
            out.append(await frames.__anext__())
            task = asyncio.ensure_future(frames.__anext__())
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            out = [frame async for frame in frames]
        return chunks, out

    loop = asyncio.new_event_loop()
    try:
        chunks, out = loop.run_until_complete(asyncio.wait_for(scenario(), 10))
    finally:
        loop.close()
    assert chunks.closed == 1
    if ending == "finish":
        assert out[-1] == b"data: [DONE]\n\n"
    if ending in ("gateway_error", "translator_bug"):
        assert b'"error"' in out[-2] and out[-1] == b"data: [DONE]\n\n"


def test_models_list_offers_each_cli_provider_without_models_its_default_which_runs_without_a_model_flag(
        harness, tools):
    url = start(harness, tools)
    ids = [m.id for m in openai_client(url).models.list()]
    assert ids == [f"{name}:default" for name in TOOLS]
    r = openai_client(url).chat.completions.create(model="claude-code:default", messages=ask())
    assert r.choices[0].message.content == CONTENT["claude-code"]
    assert "--model" not in tools.records()[0]["argv"]
