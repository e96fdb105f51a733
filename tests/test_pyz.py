"""The one-file build: `zipapp/build.py` makes a pyz that runs with nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT
from pyz_smoke import smoke

import evo_gateway


def test_built_pyz_starts_in_empty_folder_writes_default_config_and_answers_health(tmp_path):
    pyz = str(tmp_path / "evo_gateway.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "zipapp", "build.py"), "--output", pyz], check=True,
                   capture_output=True, timeout=300)
    result = smoke(sys.executable, pyz)
    assert result["config"] == evo_gateway.default_config_text()
    assert [p["name"] for p in result["health"]["providers"]][:2] == ["openai", "anthropic"]
    assert "listening on http://127.0.0.1:" in result["log"]


def test_committed_gateway_json_is_the_default_the_gateway_writes():
    with open(os.path.join(ROOT, "gateway.json")) as f:
        assert f.read() == evo_gateway.default_config_text()
