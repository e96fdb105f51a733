"""The `auth` CLI, run for real in subprocesses against a keys file in a temp folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import evo_gateway
import evo_gateway_cli

CLI = str(Path(__file__).resolve().parent.parent / "evo_gateway_cli.py")
KEY_RE = re.compile(r"^\s*(evo-[0-9a-f]{48})\s*$", re.MULTILINE)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (evo_gateway.KEYS_ENV, evo_gateway.AUTH_ENV)}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLI, *args], check=False, cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=60)


def generate(name: str, cwd: Path, *extra: str) -> str:
    result = run_cli("auth", "generate", "--name", name, *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr
    keys = KEY_RE.findall(result.stdout)
    assert len(keys) == 1, result.stdout
    return keys[0]


def read_doc(path: Path) -> dict:
    return json.loads(path.read_text())


def test_generate_list_revoke_round_trip(tmp_path):
    key = generate("alice", tmp_path)
    path = tmp_path / "auth.json"

    assert re.fullmatch(r"evo-[0-9a-f]{48}", key)
    text = path.read_text()
    assert key not in text
    assert key[4:] not in text
    (entry,) = read_doc(path)["keys"]
    assert entry["name"] == "alice"
    assert entry["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert entry["prefix"] == key[:16]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", entry["created_at"])
    assert set(entry) == {"name", "key_hash", "prefix", "created_at"}
    assert text.startswith('{\n  "keys": [\n    {\n      "name": "alice",')  # the original's layout

    listed = run_cli("auth", "list", cwd=tmp_path)
    assert listed.returncode == 0
    assert "alice" in listed.stdout and key[:16] in listed.stdout
    assert key not in listed.stdout and entry["key_hash"] not in listed.stdout

    revoked = run_cli("auth", "revoke", "--name", "alice", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert read_doc(path) == {"keys": []}
    empty = run_cli("auth", "list", cwd=tmp_path)
    assert empty.returncode == 0
    assert "No keys" in empty.stdout and "auth.json" in empty.stdout


def test_generate_prints_the_key_once_with_a_warning(tmp_path):
    result = run_cli("auth", "generate", "--name", "bob", cwd=tmp_path)
    assert result.returncode == 0
    assert len(KEY_RE.findall(result.stdout)) == 1
    assert "cannot be shown again" in result.stdout


def test_keys_file_is_mode_0600_and_written_by_replace(tmp_path):
    generate("alice", tmp_path)
    path = tmp_path / "auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    generate("bob", tmp_path)
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["auth.json", "auth.json.lock"]  # no temp file left behind


def test_mode_0600_even_when_the_old_file_was_world_readable(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text('{"keys": []}')
    path.chmod(0o644)
    generate("alice", tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_duplicate_name_refused_and_file_unchanged(tmp_path):
    generate("alice", tmp_path)
    path = tmp_path / "auth.json"
    before = path.read_bytes()
    result = run_cli("auth", "generate", "--name", "alice", cwd=tmp_path)
    assert result.returncode == 1
    assert "alice" in result.stderr and "already exists" in result.stderr
    assert KEY_RE.findall(result.stdout) == []
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["", "two words", "tab\there", "new\nline", "bell\x07"])
def test_generate_rejects_a_bad_name_as_usage_error(tmp_path, name):
    result = run_cli("auth", "generate", "--name", name, cwd=tmp_path)
    assert result.returncode == 2
    assert "name" in result.stderr
    assert not (tmp_path / "auth.json").exists()


def test_revoke_unknown_name_names_the_file(tmp_path):
    keys = tmp_path / "sub" / "keys.json"
    keys.parent.mkdir()
    generate("alice", tmp_path, "--keys", str(keys))
    before = keys.read_bytes()
    result = run_cli("auth", "revoke", "--name", "carol", "--keys", str(keys), cwd=tmp_path)
    assert result.returncode == 1
    assert "carol" in result.stderr and str(keys) in result.stderr
    assert keys.read_bytes() == before


def test_revoke_with_no_file_names_the_file_and_creates_nothing(tmp_path):
    result = run_cli("auth", "revoke", "--name", "carol", cwd=tmp_path)
    assert result.returncode == 1
    assert "auth.json" in result.stderr
    assert not (tmp_path / "auth.json").exists()


def test_revoke_removes_only_that_name(tmp_path):
    generate("alice", tmp_path)
    generate("bob", tmp_path)
    assert run_cli("auth", "revoke", "--name", "alice", cwd=tmp_path).returncode == 0
    assert [e["name"] for e in read_doc(tmp_path / "auth.json")["keys"]] == ["bob"]


def test_list_json(tmp_path):
    empty = run_cli("auth", "list", "--json", cwd=tmp_path)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    key = generate("alice", tmp_path)
    generate("bob", tmp_path)
    result = run_cli("auth", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["alice", "bob"]
    assert all(set(r) == {"name", "prefix", "created_at"} for r in rows)
    assert rows[0]["prefix"] == key[:16]


def test_list_shows_created_time_readably(tmp_path):
    (tmp_path / "auth.json").write_text(json.dumps({"keys": [{
        "name": "old", "key_hash": "a" * 64, "prefix": "evo-0123456789ab",
        "created_at": "2026-02-24T20:26:51.123456789Z"}]}, indent=2))  # as the Rust original wrote it
    result = run_cli("auth", "list", cwd=tmp_path)
    assert result.returncode == 0
    assert "2026-02-24 20:26:51 UTC" in result.stdout and "a" * 64 not in result.stdout


def test_env_variable_selects_the_keys_file(tmp_path):
    keys = tmp_path / "from-env.json"
    env = _env(EVO_GATEWAY_AUTH_KEYS=str(keys))
    result = run_cli("auth", "generate", "--name", "alice", cwd=tmp_path, env=env)
    assert result.returncode == 0
    assert [e["name"] for e in read_doc(keys)["keys"]] == ["alice"]
    assert not (tmp_path / "auth.json").exists()
    assert "alice" in run_cli("auth", "list", cwd=tmp_path, env=env).stdout


def test_keys_option_overrides_the_env_variable(tmp_path):
    env = _env(EVO_GATEWAY_AUTH_KEYS=str(tmp_path / "from-env.json"))
    keys = tmp_path / "explicit.json"
    result = run_cli("auth", "generate", "--name", "alice", "--keys", str(keys), cwd=tmp_path, env=env)
    assert result.returncode == 0
    assert keys.exists() and not (tmp_path / "from-env.json").exists()


@pytest.mark.parametrize("position", ["auth", "subcommand"])
def test_keys_option_at_both_positions(tmp_path, position):
    keys = str(tmp_path / "k.json")

    def argv(action: str, *rest: str) -> list[str]:
        if position == "auth":
            return ["auth", "--keys", keys, action, *rest]
        return ["auth", action, *rest, "--keys", keys]

    assert run_cli(*argv("generate", "--name", "alice"), cwd=tmp_path).returncode == 0
    listed = run_cli(*argv("list", "--json"), cwd=tmp_path)
    assert [r["name"] for r in json.loads(listed.stdout)] == ["alice"]
    assert run_cli(*argv("revoke", "--name", "alice"), cwd=tmp_path).returncode == 0
    assert read_doc(tmp_path / "k.json") == {"keys": []}
    assert not (tmp_path / "auth.json").exists()


def test_concurrent_generates_lose_nothing(tmp_path):
    names = [f"user{i}" for i in range(10)]
    procs = [subprocess.Popen([sys.executable, CLI, "auth", "generate", "--name", n], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in names]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, [err for _, err in outputs]
    entries = read_doc(tmp_path / "auth.json")["keys"]
    assert sorted(e["name"] for e in entries) == sorted(names)
    printed = {n: KEY_RE.findall(out)[0] for n, (out, _) in zip(names, outputs)}
    assert {e["name"]: e["key_hash"] for e in entries} == {
        n: hashlib.sha256(k.encode()).hexdigest() for n, k in printed.items()}


MALFORMED = [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"clients": []}', 'missing the "keys" list'),
    ('{"keys": {}}', '"keys" must be a list'),
    ('{"keys": ["alice"]}', "keys[0]: expected an object"),
    ('{"keys": [{"name": "alice", "prefix": "evo-0", "created_at": "x"}]}', 'keys[0]: missing field "key_hash"'),
    ('{"keys": [{"name": "a", "key_hash": "zz", "prefix": "evo-0", "created_at": "x"}]}', "keys[0].key_hash"),
    ('{"keys": [{"name": 7, "key_hash": "%s", "prefix": "evo-0", "created_at": "x"}]}' % ("a" * 64),
     "keys[0].name: expected a string"),
]


@pytest.mark.parametrize("text,problem", MALFORMED)
@pytest.mark.parametrize("action", [["generate", "--name", "zed"], ["list"], ["list", "--json"],
                                    ["revoke", "--name", "alice"]])
def test_malformed_file_is_reported_and_left_untouched(tmp_path, text, problem, action):
    path = tmp_path / "auth.json"
    path.write_text(text)
    path.chmod(0o644)
    before = path.read_bytes()
    result = run_cli("auth", *action, cwd=tmp_path)
    assert result.returncode == 1
    assert "auth.json" in result.stderr and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert KEY_RE.findall(result.stdout) == []
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_blank_file_counts_as_no_keys(tmp_path):
    (tmp_path / "auth.json").write_text("")
    generate("alice", tmp_path)
    assert [e["name"] for e in read_doc(tmp_path / "auth.json")["keys"]] == ["alice"]


def test_file_from_the_original_keeps_working(tmp_path):
    original = {"keys": [{"name": "alice", "key_hash": hashlib.sha256(b"evo-" + b"0" * 48).hexdigest(),
                          "prefix": "evo-000000000000", "created_at": "2026-02-24T20:26:51.123456789Z"}]}
    (tmp_path / "auth.json").write_text(json.dumps(original, indent=2))
    generate("bob", tmp_path)
    doc = read_doc(tmp_path / "auth.json")
    assert doc["keys"][0] == original["keys"][0]
    assert [e["name"] for e in doc["keys"]] == ["alice", "bob"]


def test_usage_errors_exit_2(tmp_path):
    assert run_cli(cwd=tmp_path).returncode == 2
    assert run_cli("auth", cwd=tmp_path).returncode == 2
    assert run_cli("auth", "generate", cwd=tmp_path).returncode == 2
    assert run_cli("auth", "frobnicate", cwd=tmp_path).returncode == 2


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"evo-gateway {evo_gateway.__version__}"


def test_serve_passes_its_options_to_serve_main(monkeypatch):
    calls = []
    monkeypatch.setattr(evo_gateway, "serve_main", lambda *args: calls.append(args) or 0, raising=False)
    assert evo_gateway_cli.main(["serve", "--config", "g.json", "--host", "127.0.0.1", "--port", "9090",
                                 "--workers", "3"]) == 0
    assert evo_gateway_cli.main(["serve"]) == 0
    assert calls == [("g.json", "127.0.0.1", 9090, 3), (None, None, None, None)]


@pytest.mark.parametrize("argv", [["serve", "--port", "http"], ["serve", "--port", "70000"],
                                  ["serve", "--workers", "0"]])
def test_serve_bad_options_are_usage_errors(argv, capsys):
    assert evo_gateway_cli.main(argv) == 2
