"""KeyStore and the auth helpers the server uses: header parsing, refresh, bad files."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest

import evo_gateway
from evo_gateway import KeyStore, auth_enabled, keys_path

ALICE = "evo-" + "a1" * 24
BOB = "evo-" + "b2" * 24


def write_keys(path, **keys: str) -> None:
    """Write a keys file holding `name=key` pairs, the way the CLI does."""
    evo_gateway.write_keys_file(str(path), {"keys": [
        {"name": name, "key_hash": hashlib.sha256(key.encode()).hexdigest(), "prefix": key[:16],
         "created_at": "2026-01-01T00:00:00.000000Z"} for name, key in keys.items()]})


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "auth.json"
    write_keys(path, alice=ALICE, bob=BOB)
    return KeyStore(str(path))


@pytest.mark.parametrize("headers", [
    {"authorization": f"Bearer {ALICE}"},
    {"authorization": f"bearer {ALICE}"},
    {"authorization": f"BEARER {ALICE}"},
    {"authorization": f"  Bearer   {ALICE}  "},
    {"authorization": f"Bearer\t{ALICE}"},
    {"x-api-key": ALICE},
    {"x-api-key": f" {ALICE} "},
    {"authorization": "Bearer evo-wrong", "x-api-key": ALICE},
    {"authorization": f"Bearer {ALICE}", "x-api-key": "sk-ant-something-else"},
])
def test_authenticate_accepts_the_key(store, headers):
    assert store.authenticate(headers) == "alice"


def test_authenticate_returns_the_matching_name(store):
    assert store.authenticate({"x-api-key": BOB}) == "bob"


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": ""},
    {"authorization": "Bearer"},
    {"authorization": "Bearer "},
    {"authorization": f"Basic {ALICE}"},
    {"authorization": ALICE},
    {"authorization": f"Bearer {ALICE}x"},
    {"authorization": f"Bearer {ALICE[:-1]}"},
    {"x-api-key": ""},
    {"x-api-key": "evo-" + "0" * 48},
    {"x-api-key": ALICE.upper()},
    {"x-api-key": hashlib.sha256(ALICE.encode()).hexdigest()},  # the digest is not the key
    {"x-api-key": "évo-ünïcode"},
    {"Authorization": f"Bearer {ALICE}"},  # names must come lower-cased
])
def test_authenticate_refuses(store, headers):
    assert store.authenticate(headers) is None


def test_missing_file_means_no_keys(tmp_path):
    store = KeyStore(str(tmp_path / "nope.json"))
    assert store.is_empty
    assert store.authenticate({"x-api-key": ALICE}) is None


def test_is_empty(tmp_path, store):
    assert not store.is_empty
    path = tmp_path / "empty.json"
    write_keys(path)
    assert KeyStore(str(path)).is_empty


def test_refresh_picks_up_added_and_revoked_keys(tmp_path):
    path = tmp_path / "auth.json"
    write_keys(path, alice=ALICE)
    store = KeyStore(str(path))
    assert store.authenticate({"x-api-key": BOB}) is None
    write_keys(path, alice=ALICE, bob=BOB)
    store.refresh()
    assert store.authenticate({"x-api-key": BOB}) == "bob"
    write_keys(path, bob=BOB)
    store.refresh()
    assert store.authenticate({"x-api-key": ALICE}) is None
    assert store.authenticate({"x-api-key": BOB}) == "bob"


def test_refresh_notices_an_in_place_edit(tmp_path):
    path = tmp_path / "auth.json"
    write_keys(path, alice=ALICE)
    store = KeyStore(str(path))
    text = path.read_text().replace('"alice"', '"alicia"')
    with open(path, "w") as f:  # same inode; the size changes
        f.write(text)
    store.refresh()
    assert store.authenticate({"x-api-key": ALICE}) == "alicia"


def test_refresh_after_file_created_and_removed(tmp_path):
    path = tmp_path / "auth.json"
    store = KeyStore(str(path))
    assert store.is_empty
    write_keys(path, alice=ALICE)
    store.refresh()
    assert store.authenticate({"x-api-key": ALICE}) == "alice"
    os.unlink(path)
    store.refresh()
    assert store.is_empty


def test_refresh_reads_only_when_the_file_changed(tmp_path, monkeypatch):
    path = tmp_path / "auth.json"
    write_keys(path, alice=ALICE)
    store = KeyStore(str(path))
    reads = []
    real_read = evo_gateway.read_keys_file
    monkeypatch.setattr(evo_gateway, "read_keys_file", lambda p: reads.append(p) or real_read(p))
    for _ in range(5):
        store.refresh()
    assert reads == []
    write_keys(path, alice=ALICE, bob=BOB)
    store.refresh()
    store.refresh()
    assert len(reads) == 1


def test_malformed_file_keeps_last_good_keys_and_logs_once(tmp_path, caplog):
    path = tmp_path / "auth.json"
    write_keys(path, alice=ALICE)
    store = KeyStore(str(path))
    caplog.set_level(logging.INFO, logger="evo_gateway")
    path.write_text('{"keys": [{"name": "bob"}]}')
    store.refresh()
    store.refresh()
    store.refresh()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert str(path) in errors[0].getMessage() and 'missing field "key_hash"' in errors[0].getMessage()
    assert store.authenticate({"x-api-key": ALICE}) == "alice"

    path.write_text("{broken json")  # another bad version: logged again
    store.refresh()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2
    assert store.authenticate({"x-api-key": ALICE}) == "alice"

    write_keys(path, bob=BOB)  # fixed: the new keys take over
    store.refresh()
    assert store.authenticate({"x-api-key": BOB}) == "bob"
    assert store.authenticate({"x-api-key": ALICE}) is None


def test_malformed_file_at_start_means_no_keys(tmp_path, caplog):
    path = tmp_path / "auth.json"
    path.write_text("[]")
    with caplog.at_level(logging.ERROR, logger="evo_gateway"):
        store = KeyStore(str(path))
    assert store.is_empty
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_missing_keys_hint_names_the_command_and_the_path(tmp_path):
    path = str(tmp_path / "my keys.json")
    hint = KeyStore(path).missing_keys_hint()
    assert "auth generate --name" in hint
    assert hint.endswith("--keys '" + path + "'")


def test_missing_keys_hint_gives_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert KeyStore("auth.json").missing_keys_hint().endswith(f"--keys {tmp_path / 'auth.json'}")


@pytest.mark.parametrize("value,expected", [
    ("true", True), ("TRUE", True), ("True", True), ("1", True), ("yes", True), ("YES", True), (" yes ", True),
    ("false", False), ("0", False), ("no", False), ("", False), ("on", False), ("2", False), ("truthy", False),
])
def test_auth_enabled(value, expected):
    assert auth_enabled({"EVO_GATEWAY_AUTH": value}) is expected


def test_auth_enabled_unset():
    assert auth_enabled({}) is False


def test_keys_path_order():
    assert keys_path("cli.json", {"EVO_GATEWAY_AUTH_KEYS": "env.json"}) == "cli.json"
    assert keys_path(None, {"EVO_GATEWAY_AUTH_KEYS": "env.json"}) == "env.json"
    assert keys_path(None, {"EVO_GATEWAY_AUTH_KEYS": ""}) == "auth.json"
    assert keys_path(None, {}) == "auth.json"


def test_new_key_format_and_digest():
    key = evo_gateway.new_key()
    assert len(key) == 52 and key.startswith("evo-") and int(key[4:], 16) >= 0 and key == key.lower()
    assert evo_gateway.hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert evo_gateway.new_key() != key


def test_file_nested_too_deep_for_json_is_a_key_file_error_not_a_crash(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text("[" * 200_000)
    with pytest.raises(evo_gateway.KeyFileError, match="nested too deeply"):
        evo_gateway.read_keys_file(str(path))


def test_problem_names_why_the_file_is_not_in_force_and_clears_when_fixed(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text("{bad")
    store = KeyStore(str(path))
    assert store.is_empty and "not valid JSON" in store.problem
    write_keys(path, alice=ALICE)
    store.refresh()
    assert store.problem == "" and store.authenticate({"x-api-key": ALICE}) == "alice"
