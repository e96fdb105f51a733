"""Operations: hot reload, graceful stop, --workers, /metrics, /health probes and `check`.

Reload and health tests run the gateway in the harness loop thread; the signal and worker tests
start the real CLI (`python3 evo_gateway_cli.py serve ...`) as a subprocess in front of mock
upstreams served by the harness. Every wait is a bounded poll or a gate, never a bare sleep.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, provider
from mock_upstream import MockResponse, chat_chunks, chat_completion, sse_body
from prometheus_client.parser import text_string_to_metric_families

import evo_gateway
import evo_gateway_cli

FAKE_DIR = Path(__file__).parent / "fake_cli"
SERVER = {"host": "127.0.0.1", "port": 0}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def answering(text: str, probes: list | None = None):
    """A mock OpenAI-compatible upstream: GET (a probe) → a model list, POST → `text` (streamed if asked)."""
    async def handler(req):
        if req.method == "GET":
            if probes is not None:
                probes.append(req)
            return MockResponse(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
        body = req.json()
        if body.get("stream"):
            return MockResponse(200, sse_body(*chat_chunks([text], model=body["model"])),
                                content_type="text/event-stream")
        return MockResponse(200, chat_completion(text, model=body["model"]))
    return handler


def held_stream(gate, first: str = "Hel", rest: str = "lo!"):
    """A streaming upstream that sends `first`, waits for `gate`, then sends `rest` and ends.

    A non-stream request waits for `gate` before its answer."""
    async def handler(req):
        if req.method == "GET":
            return MockResponse(200, {"object": "list", "data": []})
        body = req.json()
        if not body.get("stream"):
            await gate.wait()
            return MockResponse(200, chat_completion(first + rest, model=body["model"]))
        chunks = chat_chunks([first, rest], model=body["model"])

        async def gen():
            yield sse_body(*chunks[:2], done=False)
            await gate.wait()
            yield sse_body(*chunks[2:])
        return MockResponse(200, gen(), content_type="text/event-stream")
    return handler


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)


def ask(url: str, model: str, prompt: str = "hi") -> str:
    resp = client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}])
    return resp.choices[0].message.content


def write_config(path: Path, providers: list, server: dict | None = None) -> None:
    path.write_text(json.dumps({"server": dict(SERVER, **(server or {})), "providers": providers}))


def poll(predicate, timeout_s: float = 3.0, interval_s: float = 0.05):
    """Call `predicate` until it returns something truthy or `timeout_s` passes; returns the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def refused_port() -> int:
    """A port on 127.0.0.1 with nobody listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gateway_log():
    """Records of the `evo_gateway` logger during the test."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("evo_gateway")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def metric_samples(text: str) -> dict:
    """(sample name, frozenset of labels) → value, from Prometheus text parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


class GatewayProcess:
    """`python3 evo_gateway_cli.py serve` in a subprocess; its output is collected line by line."""

    def __init__(self, tmp_path: Path, providers: list, server: dict | None = None, args: tuple = ()) -> None:
        self.config = tmp_path / "gateway.json"
        write_config(self.config, providers, server)
        env = dict(os.environ, EVO_LOG_DIR=str(tmp_path / "logs"), EVO_GATEWAY_AUTH="false", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "evo_gateway_cli.py", "serve", "--config", str(self.config), "--host", "127.0.0.1",
             "--port", "0", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        match = self.wait_line(r"(?:listening on|workers on) http://127\.0\.0\.1:(\d+)", 20)
        assert match, "the gateway did not start:\n" + self.text()
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace"))

    def wait_line(self, pattern: str, timeout_s: float = 10.0):
        """The first line (seen so far or arriving within `timeout_s`) matching `pattern`, else None."""
        regex = re.compile(pattern)
        for line in self.output:
            if regex.search(line):
                return regex.search(line)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.output.append(line)
            if regex.search(line):
                return regex.search(line)
        return None

    def text(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the gateway did not exit:\n" + self.text()) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


@pytest.fixture
def processes():
    started: list[GatewayProcess] = []
    yield started
    for p in started:
        p.kill()


def start_stream(url: str, path: str, body: dict, headers: dict | None = None):
    """Open a streamed POST; returns (client, response, first bytes read)."""
    c = httpx.Client(timeout=httpx.Timeout(20.0))
    req = c.build_request("POST", url + path, json=body, headers=headers or {})
    resp = c.send(req, stream=True)
    assert resp.status_code == 200, resp.read()
    it = resp.iter_raw()
    first = next(it)
    return c, resp, it, first


# ---------------------------------------------------------------------------------------------
# hot reload
# ---------------------------------------------------------------------------------------------


def test_reload_provider_added_to_file_is_routable_within_3s(harness, tmp_path):
    a = harness.upstream(answering("from-a"))
    b = harness.upstream(answering("from-b"))
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("a", a.url)], config_file=str(cfg))
    assert ask(url, "b:x") == "from-a"  # no provider b yet: the whole name is a model of the default
    write_config(cfg, [provider("a", a.url), provider("b", b.url)])
    assert poll(lambda: ask(url, "b:x") == "from-b", 3.0, 0.1), "provider b was not routable within 3 s"
    assert b.requests[-1].json()["model"] == "x"


def test_reload_temp_file_renamed_over_config_is_picked_up(harness, tmp_path):
    a = harness.upstream(answering("from-a"))
    b = harness.upstream(answering("from-b"))
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("a", a.url)], config_file=str(cfg))
    tmp = tmp_path / ".gateway.json.tmp"
    write_config(tmp, [provider("b", b.url)])
    os.replace(tmp, cfg)  # what an orchestrator does: a new inode under the same name
    assert poll(lambda: ask(url, "anything") == "from-b", 3.0, 0.1)
    assert harness.gateway.metrics.reloads == {"ok": 1, "failed": 0}


def test_keys_the_original_gateway_wrote_are_accepted_with_one_warning_naming_them():
    prov = dict(provider("a", "http://127.0.0.1:9/v1"), model_metadata={})
    config = evo_gateway.parse_config({"server": SERVER, "providers": [prov], "rate_limit": {}, "routing": {},
                                       "reliability": {"max_retries": 3}}, "t.json")
    assert config.warnings == ("t.json: rate_limit, routing, reliability, providers[0].model_metadata: written by "
                               "the original evo-gateway; accepted but not used",)
    assert evo_gateway.parse_config({"server": SERVER, "providers": []}, "t.json").warnings == ()


def test_reload_broken_file_keeps_running_config_and_logs_the_exact_error(harness, tmp_path, gateway_log):
    a = harness.upstream(answering("from-a"))
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("a", a.url)], config_file=str(cfg))
    broken = provider("a", a.url)
    broken["provider_typ"] = broken.pop("provider_type")
    write_config(cfg, [broken])

    def failure():
        return [r.getMessage() for r in gateway_log if "config reload failed" in r.getMessage()]
    messages = poll(failure, 3.0)
    assert messages, "no reload error was logged"
    assert f"{cfg}: providers[0].provider_typ: unknown key (did you mean provider_type?)" in messages[0]
    assert ask(url, "a:m") == "from-a"
    assert harness.gateway.metrics.reloads == {"ok": 0, "failed": 1}
    write_config(cfg, [provider("a", a.url, models=["m"])])  # fixed: the next change is taken
    assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 1, 3.0)
    assert len(failure()) == 1  # the broken file was reported once, not every tick


def test_reload_stream_open_across_reload_completes_and_removed_providers_connections_close(harness, tmp_path):
    gate = harness.gate()
    a = harness.upstream(held_stream(gate))
    b = harness.upstream(answering("from-b"))
    c = harness.upstream(answering("from-c"))
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("a", a.url), provider("b", b.url)], config_file=str(cfg))
    assert ask(url, "b:m") == "from-b"  # leaves an idle pooled connection to b
    stream = client(url).chat.completions.create(model="a:m", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True)
    pieces = [next(stream).choices[0].delta.content, next(stream).choices[0].delta.content]
    write_config(cfg, [provider("c", c.url)])  # a (streaming right now) and b are removed
    assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 1, 3.0)
    assert poll(lambda: b.connections_closed == 1, 3.0), "the idle connection to removed provider b stayed open"
    assert a.connections_closed == 0  # the stream in flight is untouched
    gate.set()
    pieces += [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert "".join(p or "" for p in pieces) == "Hello!"
    # Its connection is closed, not pooled, once the stream ends: no provider uses that origin now.
    assert poll(lambda: a.connections_closed == 1, 3.0)
    assert ask(url, "a:m") == "from-c" and c.requests[-1].json()["model"] == "a:m"


def test_reload_rereads_key_variables_from_the_environment(harness, tmp_path):
    seen = []

    async def handler(req):
        seen.append(req.headers.get("authorization"))
        return MockResponse(200, chat_completion("ok"))
    up = harness.upstream(handler)
    environ = {"UP_KEY": "key-one"}
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("up", up.url, api_key_envs=["UP_KEY"])], environ=environ, config_file=str(cfg))
    ask(url, "up:m")
    environ["UP_KEY"] = "key-two"  # what a reload re-reads (os.environ in a real server)
    ask(url, "up:m")
    assert seen == ["Bearer key-one", "Bearer key-one"]
    write_config(cfg, [provider("up", up.url, api_key_envs=["UP_KEY"], models=["m"])])
    assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 1, 3.0)
    ask(url, "up:m")
    assert seen[-1] == "Bearer key-two"


def test_reload_keeps_running_cli_processes_of_kept_and_removed_cli_providers(harness, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    release = tmp_path / "release"
    wrapper = bindir / "claude"
    wrapper.write_text(f'#!/bin/sh\nFAKE_CLI_RELEASE="{release}" exec "{FAKE_DIR / "claude"}" "$@"\n')
    wrapper.chmod(0o755)
    other = harness.upstream(answering("from-other"))
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "CLAUDE_CODE_BINARY": str(wrapper)}
    cc = provider("cc", "", provider_type="claude_code")
    cfg = tmp_path / "gateway.json"
    url = harness.start([cc], environ=environ, config_file=str(cfg))
    old = harness.gateway.state.providers["cc"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, url, "cc:default", "WAITFILE")
        assert poll(lambda: old.running == 1, 10.0), "the CLI run did not start"
        write_config(cfg, [cc, provider("other", other.url)])  # cc unchanged
        assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 1, 3.0)
        assert harness.gateway.state.providers["cc"] is old and old.running == 1
        write_config(cfg, [provider("other", other.url)])  # cc removed while its run goes on
        assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 2, 3.0)
        assert "cc" not in harness.gateway.state.providers and old.running == 1
        release.write_text("go")
        assert "42" in pending.result(20)
    assert old.running == 0


def test_reload_server_limits_apply_to_new_connections_and_log_what_needs_a_restart(harness, tmp_path, gateway_log):
    up = harness.upstream(answering("ok"))
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("up", up.url)], config_file=str(cfg))
    write_config(cfg, [provider("up", up.url)], {"max_body_bytes": 100, "workers": 3})
    assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 1, 3.0)
    resp = httpx.post(url + "/v1/chat/completions", json={"model": "up:m", "messages": [
        {"role": "user", "content": "x" * 200}]})
    assert resp.status_code == 413 and "100" in resp.json()["error"]["message"]
    text = "\n".join(r.getMessage() for r in gateway_log)
    assert "max_body_bytes 33554432 → 100" in text and "workers 1 → 3" in text and "restart" in text


# ---------------------------------------------------------------------------------------------
# graceful stop (a real process and real signals)
# ---------------------------------------------------------------------------------------------


def test_sigterm_lets_open_stream_finish_refuses_new_connections_and_exits_0(harness, tmp_path, processes):
    gate = harness.gate()
    up = harness.upstream(held_stream(gate))
    gw = GatewayProcess(tmp_path, [provider("up", up.url)], {"shutdown_grace_s": 20})
    processes.append(gw)
    c, resp, it, first = start_stream(gw.url, "/v1/chat/completions", {
        "model": "up:m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.wait_line(r"received SIGTERM", 10)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # a connection caught in the backlog as the listener closes is reset: ask again
            return False
        return False
    assert poll(refused, 5.0), "the listener still accepts connections while draining"
    assert gw.proc.poll() is None  # still running: the stream is in flight
    gate.set()
    body = first + b"".join(it)
    c.close()
    assert b'"Hel"' in body and b'"lo!"' in body and body.rstrip().endswith(b"data: [DONE]")
    assert gw.wait_exit() == 0, gw.text()


def test_sigterm_past_the_grace_ends_streams_with_a_final_error_event_in_their_dialect(harness, tmp_path, processes):
    gate = harness.gate()  # never set: the upstream streams stay open
    up = harness.upstream(held_stream(gate))
    gw = GatewayProcess(tmp_path, [provider("up", up.url)], {"shutdown_grace_s": 0.5})
    processes.append(gw)
    messages = [{"role": "user", "content": "hi"}]
    relayed = start_stream(gw.url, "/v1/chat/completions", {"model": "up:m", "stream": True, "messages": messages})
    bridged = start_stream(gw.url, "/v1/messages", {"model": "up:m", "stream": True, "max_tokens": 10,
                                                    "messages": messages}, {"anthropic-version": "2023-06-01"})
    with ThreadPoolExecutor(1) as pool:  # a plain request still waiting for its answer
        waiting = pool.submit(httpx.post, gw.url + "/api/chat", json={"model": "up:m", "stream": False,
                                                                      "messages": messages}, timeout=20)
        assert poll(lambda: len(up.requests) == 3, 5.0)
        gw.proc.send_signal(signal.SIGTERM)
        plain = waiting.result(20)
    assert plain.status_code == 503 and plain.json()["error"].startswith("the gateway is shutting down")
    tails = {}
    for name, (c, _resp, it, first) in (("relayed", relayed), ("bridged", bridged)):
        tails[name] = first + b"".join(it)  # read until the gateway ends the response
        c.close()
    assert gw.wait_exit() == 0, gw.text()
    openai_tail = tails["relayed"].decode()
    assert "shutting down" in openai_tail and openai_tail.rstrip().endswith("data: [DONE]")
    error = json.loads(re.findall(r"data: (\{.*\"error\".*\})", openai_tail)[-1])
    assert error["error"]["type"] == "service_unavailable"
    anthropic_tail = tails["bridged"].decode()
    event = re.search(r"event: error\ndata: (.*)\n", anthropic_tail)
    assert event, anthropic_tail
    assert json.loads(event.group(1))["error"]["message"].startswith("the gateway is shutting down")
    assert "requests still running after the 0.5s grace" in gw.text()


# ---------------------------------------------------------------------------------------------
# --workers
# ---------------------------------------------------------------------------------------------


def _worker_of_one_request(url: str) -> str | None:
    try:
        resp = httpx.get(url + "/v1/models", headers={"connection": "close"}, timeout=5)
    except httpx.TransportError:
        return None
    return resp.headers.get("x-evo-worker")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT on this platform")
def test_workers_both_serve_a_killed_worker_is_restarted_and_sigterm_stops_all(harness, tmp_path, processes):
    up = harness.upstream(answering("ok"))
    gw = GatewayProcess(tmp_path, [provider("up", up.url, models=["m"])], args=("--workers", "2"))
    processes.append(gw)
    seen: set[str] = set()

    def both_seen() -> bool:
        wid = _worker_of_one_request(gw.url)
        if wid:
            seen.add(wid)
        return len({w.split("-")[0] for w in seen}) == 2
    assert poll(both_seen, 15.0, 0.01), f"workers seen: {seen}\n{gw.text()}"
    first_pids = {int(w.split("-")[1]) for w in seen}
    victim = next(w for w in seen if w.startswith("0-"))
    victim_pid = int(victim.split("-")[1])
    os.kill(victim_pid, signal.SIGKILL)
    assert gw.wait_line(rf"worker 0 \(pid {victim_pid}\) was killed by SIGKILL", 10), gw.text()
    started = gw.wait_line(r"worker 0 started \(pid (\d+)\)", 0)  # the first start of slot 0
    restarted = gw.wait_line(rf"worker 0 started \(pid (?!{started.group(1)}\))(\d+)\)", 10)
    assert restarted, gw.text()
    new_pid = int(restarted.group(1))

    def new_worker_serves() -> bool:
        return _worker_of_one_request(gw.url) == f"0-{new_pid}"
    assert poll(new_worker_serves, 15.0, 0.01)

    # /metrics from any worker shows every live worker (its own figures and the others' snapshots).
    live = {f"0-{new_pid}", next(w for w in seen if w.startswith("1-"))}

    def workers_in_metrics() -> set:
        text = httpx.get(gw.url + "/metrics", timeout=5).text
        return {dict(labels).get("worker") for (name, labels) in metric_samples(text)
                if name == "evo_gateway_open_connections"}
    assert poll(lambda: workers_in_metrics() == live, 10.0, 0.2), workers_in_metrics()

    gw.proc.send_signal(signal.SIGTERM)
    assert gw.wait_exit() == 0, gw.text()
    assert poll(lambda: not any(_alive(p) for p in first_pids | {new_pid}), 5.0), "a worker outlived the parent"
    assert "all workers stopped" in gw.text()


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------


def test_metrics_parse_as_prometheus_text_and_counters_move_with_traffic(harness):
    up = harness.upstream(answering("ok"))
    url = harness.start([provider("up", up.url, api_key_envs=["K1", "K2"])], environ={"K1": "a", "K2": "b"})
    for _ in range(3):
        ask(url, "up:m")
    samples = metric_samples(httpx.get(url + "/metrics").text)
    route = frozenset({"route": "/v1/chat/completions", "provider": "up", "status": "200"}.items())
    assert samples[("evo_gateway_requests_total", route)] == 3
    assert samples[("evo_gateway_request_duration_seconds_count", frozenset({"provider": "up"}.items()))] == 3
    assert samples[("evo_gateway_upstream_ttfb_seconds_count", frozenset({"provider": "up"}.items()))] == 3
    origin = f"127.0.0.1:{up.port}"
    assert samples[("evo_gateway_upstream_connections", frozenset({"origin": origin, "state": "idle"}.items()))] == 1
    assert samples[("evo_gateway_key_cooldowns", frozenset({"provider": "up"}.items()))] == 0
    assert samples[("evo_gateway_open_connections", frozenset())] >= 1
    assert samples[("evo_gateway_config_reloads_total", frozenset({"result": "ok"}.items()))] == 0
    for _ in range(2):
        ask(url, "up:m")
    samples = metric_samples(httpx.get(url + "/metrics").text)
    assert samples[("evo_gateway_requests_total", route)] == 5
    metrics_route = frozenset({"route": "/metrics", "provider": "-", "status": "200"}.items())
    assert samples[("evo_gateway_requests_total", metrics_route)] == 1


# ---------------------------------------------------------------------------------------------
# /health
# ---------------------------------------------------------------------------------------------


def test_health_good_provider_ok_and_refused_port_degraded_with_200(harness):
    up = harness.upstream(answering("ok"))
    url = harness.start([provider("good", up.url + "/v1", api_key_envs=["GOOD_KEY"]),
                         provider("down", f"http://127.0.0.1:{refused_port()}/v1"),
                         provider("off", up.url, enabled=False)], environ={"GOOD_KEY": "sk-secret-value"})
    ask(url, "good:m")
    resp = httpx.get(url + "/health", timeout=10)
    assert resp.status_code == 200 and "sk-secret-value" not in resp.text
    health = resp.json()
    assert health["status"] == "degraded"
    good, down, off = health["providers"]
    assert good["probe"]["ok"] is True and good["keys"] == 1
    assert good["last_upstream"]["ok"] is True and good["last_upstream"]["result"] == 200
    assert down["probe"]["ok"] is False and "connection refused" in down["probe"]["detail"]
    assert off == {"name": "off", "type": "open_ai_compatible", "enabled": False}
    assert up.requests[-1].method == "GET" and up.requests[-1].path == "/v1/models"
    assert up.requests[-1].headers["authorization"] == "Bearer sk-secret-value"


def test_health_all_probes_pass_ok(harness):
    up = harness.upstream(answering("ok"))
    url = harness.start([provider("good", up.url)])
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_health_probes_are_shared_and_cached_so_many_calls_make_few_probes(harness):
    probes: list = []
    up = harness.upstream(answering("ok", probes))
    url = harness.start([provider("good", up.url)])
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: httpx.get(url + "/health", timeout=10).json()["status"], range(20)))
    statuses += [httpx.get(url + "/health").json()["status"] for _ in range(10)]
    assert statuses == ["ok"] * 30
    assert 1 <= len(probes) <= 2, f"{len(probes)} probes for 30 /health calls"


def test_health_probe_per_provider_type_anthropic_ollama_and_cli(harness, tmp_path):
    probes: list = []
    up = harness.upstream(answering("ok", probes))
    url = harness.start([provider("ant", up.url + "/v1", provider_type="anthropic", api_key_envs=["ANT_KEY"]),
                         provider("oll", up.url, provider_type="ollama"),
                         provider("cc", "", provider_type="claude_code")],
                        environ={"ANT_KEY": "ant-key", "PATH": str(tmp_path), "CLAUDE_CODE_BINARY": "no-such-claude"})
    health = httpx.get(url + "/health", timeout=10).json()
    by_path = {p.path: p for p in probes}
    assert set(by_path) == {"/v1/models", "/api/version"}
    assert by_path["/v1/models"].headers["x-api-key"] == "ant-key"
    assert by_path["/v1/models"].headers["anthropic-version"] == "2023-06-01"
    ant, oll, cc = health["providers"]
    assert ant["probe"]["ok"] and oll["probe"]["ok"]
    assert cc["binary"] is None and cc["probe"]["ok"] is False and "CLAUDE_CODE_BINARY" in cc["probe"]["detail"]
    assert health["status"] == "degraded"


def test_health_while_draining_is_503_draining(harness):
    up = harness.upstream(answering("ok"))
    url = harness.start([provider("good", up.url)])
    harness.gateway.draining = True
    resp = httpx.get(url + "/health")
    assert resp.status_code == 503 and resp.json()["status"] == "draining"


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------


def test_check_reports_good_missing_key_and_refused_port_and_exits_1(harness, tmp_path, monkeypatch, capsys):
    probes: list = []
    up = harness.upstream(answering("ok", probes))
    monkeypatch.setenv("CHECK_GOOD_KEY", "sk-check-secret")
    monkeypatch.delenv("CHECK_MISSING_KEY", raising=False)
    monkeypatch.setenv("CHECK_EMPTY_KEY", " ")
    cfg = tmp_path / "gateway.json"
    write_config(cfg, [provider("good", up.url, api_key_envs=["CHECK_GOOD_KEY"]),
                       provider("nokey", up.url, api_key_envs=["CHECK_MISSING_KEY", "CHECK_EMPTY_KEY"]),
                       provider("down", f"http://127.0.0.1:{refused_port()}/v1"),
                       provider("off", up.url, enabled=False)])
    code = evo_gateway_cli.main(["check", "--config", str(cfg)])
    out = capsys.readouterr().out
    assert code == 1, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
            ("good", "nokey", "down", "off")}
    assert "CHECK_GOOD_KEY: set" in rows["good"] and " OK " in rows["good"]
    assert "CHECK_MISSING_KEY: missing" in rows["nokey"] and "CHECK_EMPTY_KEY: empty" in rows["nokey"]
    assert "NO KEY" in rows["nokey"]
    assert "UNUSABLE" in rows["down"] and "connection refused" in rows["down"]
    assert "disabled" in rows["off"]
    assert "FAIL: 2 of 3 enabled providers unusable: nokey, down" in out
    assert "sk-check-secret" not in out
    assert any(p.headers.get("authorization") == "Bearer sk-check-secret" for p in probes)


def test_check_all_usable_exits_0_and_invalid_config_exits_2(harness, tmp_path, capsys):
    up = harness.upstream(answering("ok"))
    cfg = tmp_path / "gateway.json"
    write_config(cfg, [provider("good", up.url)])
    assert evo_gateway_cli.main(["check", "--config", str(cfg)]) == 0
    assert "OK: all 1 enabled providers usable" in capsys.readouterr().out
    cfg.write_text('{"server": {"host": "127.0.0.1", "port": 0}, "providers": [], "extra": 1}')
    assert evo_gateway_cli.main(["check", "--config", str(cfg)]) == 2
    assert "extra: unknown key" in capsys.readouterr().err
    assert evo_gateway_cli.main(["check", "--config", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "missing.json").exists()  # check never writes a default config


def test_check_probe_uses_the_same_code_as_health(harness):
    up = harness.upstream(answering("ok"))
    config = evo_gateway.parse_config({"server": SERVER, "providers": [provider("good", up.url + "/v1")]}, "t.json")
    rows = harness.lt.call(evo_gateway.check_providers(config, environ={}))
    assert rows[0]["usable"] is True and rows[0]["probe"]["detail"].startswith("HTTP 200 on GET /v1/models")


def test_metrics_active_upstream_connections_return_to_zero_when_the_upstream_closes_them(harness):
    async def closing(request):
        return MockResponse(200, chat_completion("ok"), headers=[("connection", "close")])

    up = harness.upstream(closing)
    url = harness.start([provider("up", up.url)])
    for _ in range(3):
        ask(url, "up:m")
    samples = metric_samples(httpx.get(url + "/metrics").text)
    origin = f"127.0.0.1:{up.port}"
    assert samples.get(("evo_gateway_upstream_connections", frozenset({"origin": origin, "state": "active"}.items())),
                       0) == 0
    assert samples.get(("evo_gateway_upstream_connections", frozenset({"origin": origin, "state": "idle"}.items())),
                       0) == 0


# ---------------------------------------------------------------------------------------------
# the log file
# ---------------------------------------------------------------------------------------------


def _record(message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord("evo_gateway", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    return record


def test_daily_log_file_shared_by_two_workers_keeps_every_line_across_midnight(tmp_path):
    path = tmp_path / "gateway.log"
    worker_a, worker_b = evo_gateway.DailyLogFile(str(path)), evo_gateway.DailyLogFile(str(path))
    try:
        midnight = worker_a.rollover_at
        worker_a.emit(_record("a before", midnight - 2))
        worker_b.emit(_record("b before", midnight - 1))
        worker_a.emit(_record("a after", midnight + 1))   # a renames the day's file and starts a new one
        worker_b.emit(_record("b after", midnight + 2))   # b finds it renamed: reopens, renames nothing
        worker_b.emit(_record("b after again", midnight + 3))
    finally:
        worker_a.close()
        worker_b.close()
    dated = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("gateway.log."))
    assert dated == ["gateway.log." + time.strftime("%Y-%m-%d", time.gmtime()), "gateway.log.lock"]
    assert (tmp_path / dated[0]).read_text().splitlines() == ["a before", "b before"]
    assert path.read_text().splitlines() == ["a after", "b after", "b after again"]


def test_daily_log_file_left_from_an_earlier_day_is_renamed_when_the_gateway_starts(tmp_path):
    path = tmp_path / "gateway.log"
    path.write_text("old line\n")
    two_days_ago = time.time() - 2 * 86400
    os.utime(path, (two_days_ago, two_days_ago))
    handler = evo_gateway.DailyLogFile(str(path))
    try:
        handler.emit(_record("new line", time.time()))
    finally:
        handler.close()
    assert (tmp_path / ("gateway.log." + time.strftime("%Y-%m-%d", time.gmtime(two_days_ago)))).read_text() == \
        "old line\n"
    assert path.read_text() == "new line\n"


def test_a_lone_surrogate_in_a_request_reaches_both_logs_escaped(tmp_path):
    gw = GatewayProcess(tmp_path, [provider("oa", f"http://127.0.0.1:{refused_port()}/v1")])
    try:
        # "\ud800" is a legal JSON escape that no UTF-8 stream can carry as it is.
        raw = b'{"model": "oa:x\\ud800y", "messages": [{"role": "user", "content": "hi"}]}'
        r = httpx.post(gw.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 502
        assert gw.wait_line(r"POST /v1/chat/completions 502"), gw.text()
    finally:
        gw.proc.send_signal(signal.SIGTERM)
        gw.wait_exit()
    assert "Logging error" not in gw.text(), gw.text()
    assert "model=x\\ud800y" in gw.text()  # backslash-escaped on the console
    entries = [json.loads(line) for line in (tmp_path / "logs" / "gateway.log").read_text().splitlines()]
    assert any(entry.get("model") == "x\ud800y" for entry in entries), entries  # a JSON escape in the file


def test_reload_keeps_a_refused_key_set_aside_for_the_rest_of_its_cooldown(harness, tmp_path):
    seen = []

    async def handler(req):
        key = req.headers.get("authorization")
        seen.append(key)
        if key == "Bearer k1":
            return MockResponse(429, {"error": {"message": "slow down"}})
        return MockResponse(200, chat_completion("ok"))
    up = harness.upstream(handler)
    cfg = tmp_path / "gateway.json"
    url = harness.start([provider("up", up.url, api_key_envs=["K1", "K2"])], environ={"K1": "k1", "K2": "k2"},
                        config_file=str(cfg))
    with pytest.raises(openai.RateLimitError):
        ask(url, "up:m")
    write_config(cfg, [provider("up", up.url, api_key_envs=["K1", "K2"], models=["m", "n"])])  # a model added
    assert poll(lambda: harness.gateway.metrics.reloads["ok"] == 1, 3.0)
    for _ in range(3):
        ask(url, "up:m")
    assert seen == ["Bearer k1", "Bearer k2", "Bearer k2", "Bearer k2"]


# ---------------------------------------------------------------------------------------------
# the open-file limit
# ---------------------------------------------------------------------------------------------


def test_serve_lifts_the_soft_open_file_limit_to_the_hard_one():
    code = "import evo_gateway, resource; print(evo_gateway.raise_open_file_limit(), " \
           "resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    hard = min(512, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(hard), str(hard)]


def test_a_server_near_its_open_file_limit_says_so_once_a_minute(harness, gateway_log):
    url = harness.start([provider("up", "http://127.0.0.1:9/v1", models=["m"])])
    clients = [socket.create_connection(("127.0.0.1", harness.port)) for _ in range(8)]
    try:
        assert poll(lambda: len(harness.server.connections) == 8, 3.0)
        assert evo_gateway.open_file_count() >= 16  # this process: the gateway, its clients, pytest
        harness.server.fd_limit = 16  # so the limit is reached, and 8 connections are half of it

        async def tick(now: float) -> None:
            harness.server.check_open_files(now)
        for now in (1000.0, 1030.0, 1061.0):
            harness.lt.call(tick(now))
    finally:
        for c in clients:
            c.close()
    warnings = [r.getMessage() for r in gateway_log if "open-file limit" in r.getMessage()]
    assert len(warnings) == 2, warnings  # at 1000 and at 1061, not at 1030
    assert "8 client connections" in warnings[0] and "ulimit -n" in warnings[0]
    assert httpx.get(url + "/health").status_code == 200


def test_open_files_are_counted_as_the_whole_limit_when_not_one_more_can_be_opened():
    code = ("import evo_gateway, os\nheld = []\ntry:\n    while True:\n        held.append(os.open(os.devnull, os.O_RDONLY))\n"
            "except OSError:\n    pass\nprint(evo_gateway.open_file_count())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["48"]
