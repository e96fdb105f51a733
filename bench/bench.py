"""Throughput and latency of evo-gateway against a minimal aiohttp proxy, on one core each.

    python3 bench/bench.py [--seconds N] [--concurrency C] [--requests-max M] [--warmup S]
                           [--gateway-cmd "python3 dist/evo_gateway.pyz" | --gateway-dir DIR] [--profile]

What is measured. Two scenarios, `POST /v1/chat/completions` non-stream (a chat.completion
JSON) and stream (an SSE answer of 10 chunks + [DONE]), each against three targets:

  direct   the fast mock upstream itself (bench/fast_upstream.py): the floor
  evo      evo-gateway (`evo_gateway_cli.py serve`, or --gateway-cmd) relaying to the mock
  aiohttp  a minimal aiohttp reverse proxy doing the same work (bench/aiohttp_proxy.py)

For each: requests per second, p50/p99 latency of the whole response (request written →
last byte read), the p50 added over `direct`, the CPU each process used during the
measured window, and at the end evo/aiohttp req/s and the gateway's peak RSS (VmHWM).

How. Every server is its own process. The gateway and the aiohttp proxy are pinned to the
same single core (never both under load at once); this process, the load generator, is
pinned to another, and the mock goes to a third core if there is one, else shares the load
generator's (it is cheap: canned bytes). So `req/s` for evo and aiohttp is what one core of
proxy does; the `cpu%` columns show whether the proxy core was saturated and the client was
not. The load is closed-loop: C keep-alive connections, each a hand-written HTTP/1.1 client
(asyncio.Protocol, pre-encoded request, framing by Content-Length or by walking chunk
sizes), sending its next request as soon as the previous answer is complete. A scenario
runs `--warmup` seconds unrecorded, then records until `--seconds` have passed or
`--requests-max` answers have been recorded, whichever comes first. Only 127.0.0.1 is used.

Latency under a saturating closed loop is mostly queueing (Little's law: p50 ≈ C / req/s);
run with `--concurrency 1` to see the per-hop cost instead.

`--profile` runs the gateway under cProfile (which slows it: use the profile for where the
time goes, not for the req/s) and prints the top functions. Only processes this script
started are stopped, by pid; it exits 0 unless a target could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pstats
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The client request: a small but realistic chat body; the `mock:` prefix routes it in the
# gateway and is stripped by both proxies (the mock ignores the model).
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."}]


def request_bytes(port: int, stream: bool) -> bytes:
    body = json.dumps({"model": "mock:m", "messages": MESSAGES, "stream": stream, "max_tokens": 64}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"accept: %s\r\nauthorization: Bearer sk-bench\r\ncontent-length: %d\r\n\r\n%s"
            % (port, b"text/event-stream" if stream else b"application/json", len(body), body))


# =============================================================================================
# load generator
# =============================================================================================


class Run:
    """One scenario's shared state: its deadlines, what was recorded, and the errors."""

    def __init__(self, warm_end: float, end: float, max_requests: int, keep_body: bool = False) -> None:
        self.warm_end = warm_end
        self.end = end
        self.max_requests = max_requests
        self.latencies: list = []  # seconds, for requests written after the warm-up only
        self.errors = 0
        self.first_error = ""
        self.last_done = warm_end
        self.keep_body = keep_body
        self.body = b""

    def is_over(self, now: float) -> bool:
        return now >= self.end or len(self.latencies) >= self.max_requests

    def fail(self, what: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = what


class LoadConnection(asyncio.Protocol):
    """A keep-alive client connection that sends the next request as soon as an answer is complete.

    Driven from `data_received` (no task, no future per request) so the client costs little
    per request. Framing: Content-Length, or Transfer-Encoding: chunked walked size line by
    size line (the servers here send no trailers).
    """

    def __init__(self, run: Run, request: bytes, done: asyncio.Future) -> None:
        self.run = run
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.finished = False
        self._reset()

    def _reset(self) -> None:
        self.buf.clear()
        self.body_start = -1  # offset just past the head, once the head is in
        self.need = -1        # total length when framed by Content-Length
        self.chunk_pos = -1   # next chunk-size line when chunked
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        self._reset()
        self.started = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            complete = self._is_complete()
        except ValueError as e:
            self.run.fail(f"unparsable response ({e}): {bytes(self.buf[:200])!r}")
            self._finish()
            return
        if not complete:
            return
        now = time.perf_counter()
        run = self.run
        if self.status != 200:
            run.fail(f"HTTP {self.status}: {bytes(self.buf[:300])!r}")
        elif self.started >= run.warm_end and len(run.latencies) < run.max_requests:
            # (answers still in flight when the cap is reached are not counted)
            run.latencies.append(now - self.started)
            run.last_done = now
        if run.keep_body:
            run.body = bytes(self.buf)
        if run.is_over(now):
            self._finish()
        else:
            self._send()

    def _is_complete(self) -> bool:
        buf = self.buf
        if self.body_start < 0:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return False
            self.body_start = i + 4
            head = bytes(buf[:i]).lower()
            self.status = int(head[9:12])
            j = head.find(b"\r\ncontent-length:")
            if j >= 0:
                k = head.find(b"\r\n", j + 17)
                self.need = self.body_start + int(head[j + 17:k if k >= 0 else len(head)])
            elif b"chunked" in head:
                self.chunk_pos = self.body_start
            else:
                raise ValueError("neither content-length nor chunked")
        if self.need >= 0:
            return len(buf) >= self.need
        pos = self.chunk_pos
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";", 1)[0], 16)
            if size == 0:
                return len(buf) >= nl + 4  # "0\r\n" then the empty line that ends the message
            nxt = nl + 2 + size + 2
            if len(buf) < nxt:
                break
            pos = nxt
        self.chunk_pos = pos
        return False

    def _finish(self) -> None:
        self.finished = True
        self.transport.close()  # type: ignore[union-attr]
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.run.fail(f"connection closed by the server mid-run ({exc or 'EOF'})")
            self.finished = True
        if not self.done.done():
            self.done.set_result(None)


async def drive(port: int, stream: bool, concurrency: int, warmup_s: float, seconds: float, max_requests: int,
                watch: dict) -> dict:
    """Run one scenario against 127.0.0.1:port and return its figures.

    `watch` maps a label to a pid whose CPU use over the measured window is reported.
    """
    loop = asyncio.get_event_loop()
    request = request_bytes(port, stream)
    start = time.perf_counter()
    run = Run(start + warmup_s, start + warmup_s + seconds, max_requests)
    cpu_at_start: dict = {}

    def snapshot_cpu() -> None:
        cpu_at_start.update({label: cpu_seconds(pid) for label, pid in watch.items()})
        cpu_at_start["client"] = sum(os.times()[:2])
        cpu_at_start["t"] = time.perf_counter()

    loop.call_at(loop.time() + warmup_s, snapshot_cpu)
    dones = []
    conns = []
    for _ in range(concurrency):
        done = loop.create_future()
        _, proto = await loop.create_connection(lambda d=done: LoadConnection(run, request, d), "127.0.0.1", port)
        dones.append(done)
        conns.append(proto)
    # A hung target must not hang the benchmark: give up a few seconds after the end.
    await asyncio.wait(dones, timeout=warmup_s + seconds + 10)
    for proto in conns:
        if not proto.finished:
            run.fail("no answer by the end of the run (aborted)")
            proto.finished = True
            proto.transport.abort()  # type: ignore[union-attr]
    t_end = time.perf_counter()
    cpu = {}
    if cpu_at_start:
        window = t_end - cpu_at_start["t"]
        now_cpu = {label: cpu_seconds(pid) for label, pid in watch.items()}
        now_cpu["client"] = sum(os.times()[:2])
        cpu = {label: 100.0 * (now_cpu[label] - cpu_at_start[label]) / window for label in now_cpu}
    lat = sorted(run.latencies)
    elapsed = max(run.last_done - run.warm_end, 1e-9)
    return {"n": len(lat), "rps": len(lat) / elapsed if lat else 0.0, "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "errors": run.errors, "first_error": run.first_error, "cpu": cpu}


async def probe(port: int, stream: bool) -> bytes:
    """One request, to check a target answers correctly before it is measured."""
    loop = asyncio.get_event_loop()
    run = Run(0.0, 0.0, 1, keep_body=True)  # over after the first answer
    done = loop.create_future()
    await loop.create_connection(lambda: LoadConnection(run, request_bytes(port, stream), done), "127.0.0.1", port)
    await asyncio.wait_for(done, 10)
    if run.errors:
        raise RuntimeError(run.first_error)
    return run.body


def percentile(sorted_values: list, pct: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))
    return sorted_values[i]


# =============================================================================================
# processes
# =============================================================================================


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def uses_uvloop(pid: int) -> bool:
    """Whether uvloop's extension is mapped into the process (the gateway imports it only to use it)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "uvloop" in f.read()
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Children:
    """The processes this benchmark started; `stop_all` ends them by pid, gently first."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: list = []

    def start(self, name: str, argv: list, core: int, env: dict | None = None, read_ready: bool = False,
              ready_timeout_s: float = 15):
        """Start `argv` pinned to `core`; with read_ready, wait for its ``READY <port> <loop>`` line."""
        with open(os.path.join(self.tmp, f"{name}.stderr"), "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if read_ready else err, stderr=err,
                # Pinned between fork and exec, so it never runs on another core. preexec_fn
                # is unsafe only with threads, and this process starts none.
                preexec_fn=functools.partial(os.sched_setaffinity, 0, {core}),  # noqa: PLW1509
                start_new_session=True)  # a ^C here reaches us, not it: we stop it by pid
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        if not read_ready:
            return proc, None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout_s)
        line = proc.stdout.readline().decode().split() if ready else []  # type: ignore[union-attr]
        if len(line) != 3 or line[0] != "READY":
            raise RuntimeError(f"{name} did not start: {self.stderr(name)}")
        return proc, int(line[1])

    def stderr(self, name: str) -> str:
        try:
            with open(os.path.join(self.tmp, f"{name}.stderr"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)  # the gateway drains, and under cProfile writes its profile
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def wait_listening(proc: subprocess.Popen, port: int, name: str, children: Children, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {children.stderr(name)}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} is not listening on {port} after {timeout_s}s: {children.stderr(name)}")


def gateway_setup(tmp: str, mock_port: int) -> tuple[str, int, dict]:
    """A config (one provider, the mock; one worker) in `tmp`, the gateway's port and its environment."""
    config_file = os.path.join(tmp, "bench.json")
    port = free_port()
    with open(config_file, "w") as f:
        json.dump({"server": {"host": "127.0.0.1", "port": port, "workers": 1}, "providers": [
            {"name": "mock", "base_url": f"http://127.0.0.1:{mock_port}/v1", "enabled": True,
             "api_key_envs": []}]}, f)
    env = {k: v for k, v in os.environ.items() if k not in ("EVO_GATEWAY_AUTH", "RUST_LOG", "GATEWAY_CONFIG")}
    env.update(EVO_LOG="error", EVO_LOG_DIR=os.path.join(tmp, "logs"), PYTHONDONTWRITEBYTECODE="1")
    return config_file, port, env


def gateway_argv(args: argparse.Namespace, config_file: str, port: int, profile_file: str) -> list:
    serve = ["serve", "--config", config_file, "--host", "127.0.0.1", "--port", str(port)]
    if args.gateway_cmd:
        cmd = args.gateway_cmd
        if "{port}" in cmd:  # a full command line with placeholders
            return shlex.split(cmd.format(config=config_file, port=port, host="127.0.0.1"))
        return shlex.split(cmd) + serve
    cli = os.path.join(os.path.abspath(args.gateway_dir), "evo_gateway_cli.py")
    if args.profile:
        return [sys.executable, "-m", "cProfile", "-o", profile_file, cli] + serve
    return [sys.executable, cli] + serve


# =============================================================================================
# report
# =============================================================================================


def print_table(results: list) -> None:
    cols = ("scenario", "target", "req/s", "p50 ms", "p99 ms", "+p50 ms", "proxy cpu%", "mock cpu%",
            "client cpu%", "requests", "errors")
    rows = []
    direct_p50 = {r["scenario"]: r["p50"] for r in results if r["target"] == "direct"}
    for r in results:
        cpu = r["cpu"]
        added = r["p50"] - direct_p50.get(r["scenario"], float("nan"))
        rows.append((r["scenario"], r["target"], f"{r['rps']:,.0f}", f"{r['p50'] * 1e3:.2f}", f"{r['p99'] * 1e3:.2f}",
                     "-" if r["target"] == "direct" else f"{added * 1e3:+.2f}",
                     f"{cpu.get('proxy', float('nan')):.0f}" if r["target"] != "direct" else "-",
                     f"{cpu.get('mock', float('nan')):.0f}", f"{cpu.get('client', float('nan')):.0f}",
                     str(r["n"]), str(r["errors"])))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def print_profile(profile_file: str) -> None:
    try:
        stats = pstats.Stats(profile_file)
    except (OSError, TypeError, EOFError) as e:
        print(f"\nno profile ({e}); did the gateway exit cleanly on SIGTERM?")
        return
    for order, label in (("cumulative", "cumulative"), ("tottime", "self time")):
        print(f"\n--- gateway profile: top 25 by {label}, functions in evo_gateway.py, evo_http.py and providers/ ---")
        stats.sort_stats(order).print_stats(r"evo_gateway\.py|evo_http\.py|providers", 25)
    print("\n--- gateway profile: top 25 by self time, all code ---")
    stats.sort_stats("tottime").print_stats(25)


# =============================================================================================
# main
# =============================================================================================


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
        return value
    return parse


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive(float), default=5.0, help="measured time per scenario (5)")
    parser.add_argument("--warmup", type=positive(float), default=1.0, help="unrecorded time before it (1)")
    parser.add_argument("--concurrency", type=positive(int), default=32, help="keep-alive connections (32)")
    parser.add_argument("--requests-max", type=positive(int), default=200000,
                        help="stop recording a scenario after this many answers (200000)")
    parser.add_argument("--scenarios", default="json,sse", help="comma-separated subset of json,sse (both)")
    parser.add_argument("--gateway-cmd", metavar="CMD",
                        help="run the gateway with CMD instead of evo_gateway_cli.py, e.g. "
                             "'python3 dist/evo_gateway.pyz'; 'serve --config F --host H --port P' is appended "
                             "unless CMD has {config}/{host}/{port} placeholders")
    parser.add_argument("--gateway-dir", metavar="DIR", default=REPO,
                        help="run evo_gateway_cli.py from this checkout (default: the one holding bench/), e.g. "
                             "a `git archive` snapshot while the working tree is being edited")
    parser.add_argument("--profile", action="store_true",
                        help="run the gateway under cProfile and print its top functions (slows it down)")
    args = parser.parse_args(argv)
    if args.profile and args.gateway_cmd:
        parser.error("--profile works with the default gateway command only")
    scenarios = [s for s in ("json", "sse") if s in args.scenarios.split(",")]
    if not scenarios:
        parser.error("--scenarios: give json, sse or json,sse")

    # Cores: the proxies on the first, this load generator on the second, the mock on a
    # third if there is one (else beside the load generator, never beside the proxy).
    cpus = sorted(os.sched_getaffinity(0))
    proxy_core = cpus[0]
    client_core = cpus[1] if len(cpus) > 1 else cpus[0]
    mock_core = cpus[2] if len(cpus) > 2 else client_core
    if len(cpus) < 2:
        print("warning: one CPU only; the load generator shares the proxy's core, figures are not meaningful")
    os.sched_setaffinity(0, {client_core})

    tmp = tempfile.mkdtemp(prefix="evo-bench-")
    children = Children(tmp)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    profile_file = os.path.join(tmp, "gateway.prof")
    results: list = []
    try:
        mock, mock_port = children.start("mock", [sys.executable, os.path.join(HERE, "fast_upstream.py")],
                                         mock_core, read_ready=True)
        config_file, gw_port, env = gateway_setup(tmp, mock_port)
        gw_cmd = gateway_argv(args, config_file, gw_port, profile_file)
        gateway, _ = children.start("gateway", gw_cmd, proxy_core, env=env)
        wait_listening(gateway, gw_port, "gateway", children)
        ah, ah_port = children.start("aiohttp", [sys.executable, os.path.join(HERE, "aiohttp_proxy.py"), "--upstream",
                                                 f"http://127.0.0.1:{mock_port}/v1/chat/completions"],
                                     proxy_core, read_ready=True)

        print(f"python {sys.version.split()[0]}; cores: proxies on {proxy_core}, load generator on {client_core}, "
              f"mock on {mock_core}")
        print(f"gateway: {' '.join(shlex.quote(a) for a in gw_cmd)}")
        print("uvloop: " + ", ".join(f"{name} {'yes' if uses_uvloop(pid) else 'no'}" for name, pid in (
            ("load generator", os.getpid()), ("mock", mock.pid), ("evo-gateway", gateway.pid),
            ("aiohttp proxy", ah.pid))))
        print(f"load: {args.concurrency} keep-alive connections, {args.warmup:g}s warm-up + {args.seconds:g}s "
              f"or {args.requests_max} answers per scenario\n")

        targets = (("direct", mock_port, None), ("evo", gw_port, gateway.pid), ("aiohttp", ah_port, ah.pid))
        for scenario in scenarios:
            stream = scenario == "sse"
            for target, port, pid in targets:
                body = loop.run_until_complete(probe(port, stream))
                expected = b"data: [DONE]" if stream else b'"chat.completion"'
                if expected not in body:
                    raise RuntimeError(f"{target} answered the {scenario} probe with {body[:300]!r}")
                watch = {"mock": mock.pid}
                if pid is not None:
                    watch["proxy"] = pid
                r = loop.run_until_complete(drive(port, stream, args.concurrency, args.warmup, args.seconds,
                                                  args.requests_max, watch))
                r.update(scenario=scenario, target=target)
                results.append(r)
                print(f"  {scenario:4} {target:8} {r['rps']:9,.0f} req/s  errors {r['errors']}"
                      + (f"  first: {r['first_error'][:200]}" if r["errors"] else ""), flush=True)

        print()
        print_table(results)
        rps = {(r["scenario"], r["target"]): r["rps"] for r in results}
        print("\nevo-gateway / aiohttp req/s: " + ", ".join(
            f"{s} {rps[(s, 'evo')] / rps[(s, 'aiohttp')]:.2f}x" for s in scenarios if rps[(s, "aiohttp")]))
        gw_rss, ah_rss = peak_rss_kib(gateway.pid), peak_rss_kib(ah.pid)
        print(f"peak RSS (VmHWM): evo-gateway {gw_rss / 1024 if gw_rss else float('nan'):.1f} MiB, "
              f"aiohttp proxy {ah_rss / 1024 if ah_rss else float('nan'):.1f} MiB")
    except RuntimeError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        loop.close()
        if args.profile:
            print_profile(profile_file)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
