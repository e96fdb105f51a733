"""Build dist/evo_gateway.pyz: the gateway, its providers and h11 in one runnable file.

    python3 zipapp/build.py [--output PATH]

h11 is installed from the package index into a staging folder (never committed); when the
index cannot be reached, an h11 already importable by this Python is copied instead, so a
machine with h11 installed can build offline. The archive runs with nothing installed:
`python3 -I dist/evo_gateway.pyz serve`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H11_REQUIREMENT = "h11>=0.16,<1"
MAIN = "import sys\nimport evo_gateway_cli\nsys.exit(evo_gateway_cli.main())\n"


def stage_h11(stage: str) -> str:
    """Put h11 into `stage`; returns how it got there."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "--no-deps", "--target", stage, H11_REQUIREMENT]
    if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode == 0:
        return "installed from the package index"
    try:
        import h11
    except ImportError:
        sys.exit("build: cannot install h11 from the package index and no h11 is importable here; "
                 f"run: {sys.executable} -m pip install '{H11_REQUIREMENT}'")
    shutil.copytree(os.path.dirname(h11.__file__), os.path.join(stage, "h11"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return f"copied from {os.path.dirname(h11.__file__)} (package index unreachable)"


def build(output: str) -> None:
    with tempfile.TemporaryDirectory(prefix="evo-gateway-build-") as stage:
        how = stage_h11(stage)
        for name in ("evo_gateway.py", "evo_http.py", "evo_gateway_cli.py"):
            shutil.copy2(os.path.join(ROOT, name), stage)
        shutil.copytree(os.path.join(ROOT, "providers"), os.path.join(stage, "providers"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for extra in os.listdir(stage):
            if extra.endswith((".dist-info", ".egg-info")) or extra == "bin":
                shutil.rmtree(os.path.join(stage, extra))
        with open(os.path.join(stage, "__main__.py"), "w", encoding="utf-8") as f:
            f.write(MAIN)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        zipapp.create_archive(stage, output, interpreter="/usr/bin/env python3", compressed=True)
    print(f"built {output} ({os.path.getsize(output) // 1024} KiB; h11 {how})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the one-file evo-gateway zipapp.")
    parser.add_argument("--output", default=os.path.join(ROOT, "dist", "evo_gateway.pyz"))
    build(parser.parse_args(argv).output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
