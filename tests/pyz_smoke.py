"""Start a built evo_gateway.pyz with `python -I` in an empty folder and check `/health`.

Used by tests/test_pyz.py and by .ci/run for every Python 3.9–3.13 found under pyenv:
    python3 tests/pyz_smoke.py PYTHON PYZ
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def smoke(python: str, pyz: str) -> dict:
    """Run the pyz from an empty folder; returns what it showed. Raises AssertionError on a fault."""
    pyz = os.path.abspath(pyz)
    with tempfile.TemporaryDirectory() as work:
        port = free_port()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EVO_LOG_DIR": os.path.join(work, "logs")}
        proc = subprocess.Popen([python, "-I", pyz, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=work,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            status = body = None
            while time.monotonic() < deadline:
                try:
                    status, body = http_get(port, "/health")
                    break
                except OSError:
                    if proc.poll() is not None:
                        break
                    time.sleep(0.1)
            assert status == 200, f"no /health answer from {python}: {proc.poll()=}"
            health = json.loads(body)
            assert health["status"] in ("ok", "degraded")  # degraded: no network or keys for the defaults
            with open(os.path.join(work, "gateway.json")) as f:
                written = f.read()
            version = subprocess.run([python, "-I", pyz, "--version"], capture_output=True, text=True, timeout=20)
            assert re.match(r"evo-gateway \d", version.stdout), version
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        assert proc.returncode == 0, out.decode(errors="replace")
        return {"health": health, "config": written, "log": out.decode(errors="replace")}


if __name__ == "__main__":
    result = smoke(sys.argv[1], sys.argv[2])
    print(f"{sys.argv[1]}: /health ok, {len(result['health']['providers'])} providers, clean exit")
