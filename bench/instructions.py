"""CPU instructions per proxied request, evo-gateway against the aiohttp proxy, under callgrind.

    python3 bench/instructions.py [--requests N] [--scenarios json,sse] [--gateway-dir DIR]

Why. req/s on a shared 2-core VM moves ±10% from run to run, which hides any change worth
less than that. valgrind's callgrind counts the instructions a process executes: the same
code, inputs and environment give the same count to within ~0.1%, whatever else the machine
is doing. So this is the figure to compare two versions of the hot path by (A/B, one after
the other); bench.py stays the figure users see (it also counts syscalls and the kernel's
work, which callgrind does not, so the two ratios differ: fewer instructions is faster, but
not in proportion).

How. For each proxy and scenario: start the fast mock upstream (natively) and the proxy under
`valgrind --tool=callgrind`, send N1 then, in a second run, N2 requests over 16 keep-alive
connections, stop the proxy (callgrind writes its total at exit) and take
(total₂ − total₁) / (N2 − N1): start-up, imports and shutdown cancel out. Each run serves
exactly N + 15 requests (the answers in flight when the count is reached still complete).
Under callgrind a proxy runs ~50× slower; the default N (300 and 1,300) takes about half a
minute per proxy and scenario. Needs `valgrind` on PATH; exits 2 without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (the load generator and helpers of the req/s benchmark)

CONNECTIONS = 16


def callgrind_total(out_file: str) -> int:
    with open(out_file) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no summary line in {out_file}: did the proxy exit cleanly?")


async def serve_exactly(port: int, stream: bool, requests: int) -> int:
    """Drive `requests` answers (plus those in flight at the end); return the errors seen."""
    loop = asyncio.get_running_loop()
    run = bench.Run(0.0, float("inf"), requests)  # every answer counts from the first
    dones = []
    for _ in range(CONNECTIONS):
        done = loop.create_future()
        await loop.create_connection(lambda d=done: bench.LoadConnection(run, bench.request_bytes(port, stream), d),
                                     "127.0.0.1", port)
        dones.append(done)
    await asyncio.wait_for(asyncio.gather(*dones), 600)
    if run.errors:
        print(f"  errors: {run.errors}, first: {run.first_error[:200]}", file=sys.stderr)
    return run.errors


def count(proxy: str, stream: bool, requests: int, gateway_dir: str, tmp: str) -> int:
    """Instructions executed by one proxy process that served `requests` (+15) requests."""
    children = bench.Children(tmp)
    out_file = os.path.join(tmp, f"callgrind.{proxy}.{int(stream)}.{requests}")
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
    cpus = sorted(os.sched_getaffinity(0))
    loop = asyncio.new_event_loop()
    try:
        _, mock_port = children.start("mock", [sys.executable, os.path.join(HERE, "fast_upstream.py")], cpus[-1],
                                      read_ready=True)
        if proxy == "evo":
            config_file, port, env = bench.gateway_setup(tmp, mock_port)
            cli = os.path.join(os.path.abspath(gateway_dir), "evo_gateway_cli.py")
            proc, _ = children.start("gateway", valgrind + [sys.executable, cli, "serve", "--config", config_file],
                                     cpus[0], env=env)
            bench.wait_listening(proc, port, "gateway", children, timeout_s=120)
        else:
            proc, port = children.start("aiohttp", valgrind + [
                sys.executable, os.path.join(HERE, "aiohttp_proxy.py"), "--upstream",
                f"http://127.0.0.1:{mock_port}/v1/chat/completions"], cpus[0], read_ready=True, ready_timeout_s=120)
        if loop.run_until_complete(serve_exactly(port, stream, requests)):
            raise RuntimeError(f"{proxy} answered with errors")
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        children.stop_all()
        loop.close()
    return callgrind_total(out_file)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=bench.positive(int), nargs=2, default=[300, 1300], metavar=("N1", "N2"),
                        help="requests in the short and the long run (300 1300)")
    parser.add_argument("--scenarios", default="json,sse", help="comma-separated subset of json,sse (both)")
    parser.add_argument("--gateway-dir", metavar="DIR", default=bench.REPO,
                        help="run evo_gateway_cli.py from this checkout (default: the one holding bench/)")
    args = parser.parse_args(argv)
    n1, n2 = sorted(args.requests)
    if n1 == n2:
        parser.error("--requests: give two different counts")
    scenarios = [s for s in ("json", "sse") if s in args.scenarios.split(",")]
    if not scenarios:
        parser.error("--scenarios: give json, sse or json,sse")
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="evo-instr-")
    try:
        print(f"python {sys.version.split()[0]}; instructions per request = (run of {n2} − run of {n1}) / {n2 - n1}")
        for scenario in scenarios:
            per_request = {}
            for proxy in ("evo", "aiohttp"):
                t0 = time.monotonic()
                totals = [count(proxy, scenario == "sse", n, args.gateway_dir, tmp) for n in (n1, n2)]
                per_request[proxy] = (totals[1] - totals[0]) / (n2 - n1)
                print(f"  {scenario:4} {proxy:8} {per_request[proxy]:12,.0f} instructions/request"
                      f"  ({time.monotonic() - t0:.0f} s)", flush=True)
            print(f"  {scenario:4} evo / aiohttp instructions: {per_request['evo'] / per_request['aiohttp']:.2f}x")
    except RuntimeError as e:
        print(f"instructions failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
