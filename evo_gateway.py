"""evo-gateway core: one address for every LLM client on a machine.

Sections, in dependency order:
    constants · errors · config · key pool · wire (SSE / NDJSON decoders) ·
    upstream client + pool · providers (protocol + registry) · gateway key store ·
    gateway (routes, router, dispatch, error rendering) · server (connections, lifecycle, signals)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Union

__version__ = "0.1.0"

# =============================================================================================
# errors
# =============================================================================================


class GatewayError(Exception):
    """An error with the HTTP status it is answered with.

    `kind` is a dialect-neutral error class (``invalid_request``, ``authentication``,
    ``permission``, ``not_found``, ``rate_limit``, ``timeout``, ``upstream``, ``overloaded``,
    ``unavailable``, ``internal``); each dialect's renderer maps it to its own type names.
    `headers` are extra response headers (``retry-after``, ``www-authenticate``).
    """

    def __init__(self, status: int, message: str, kind: str = "", *, param: str | None = None,
                 code: str | None = None, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or _kind_for_status(status)
        self.param = param
        self.code = code
        self.headers = headers or []


def _kind_for_status(status: int) -> str:
    return {400: "invalid_request", 401: "authentication", 403: "permission", 404: "not_found",
            408: "timeout", 413: "invalid_request", 429: "rate_limit", 502: "upstream",
            503: "unavailable", 504: "timeout", 529: "overloaded"}.get(
                status, "invalid_request" if status < 500 else "internal")


# A chat result from a provider: a chat.completion dict, or (stream) an async iterator of
# chat.completion.chunk dicts that ends when the answer is complete.
ChatResult = Union[dict[str, Any], AsyncIterator[dict[str, Any]]]


# =============================================================================================
# providers: the protocol the core consumes (implementations live in providers/)
# =============================================================================================


class RequestContext:
    """What a provider may know about the client request besides its body.

    `headers` holds the client's request headers, names lower-cased. Providers record what
    the request log line should carry (`usage`, `upstream_status`) through `note()`.
    """

    __slots__ = ("headers", "log", "model", "provider", "request_id", "stream")

    def __init__(self, request_id: str, headers: dict[str, str]) -> None:
        self.request_id = request_id
        self.headers = headers
        self.provider = ""
        self.model = ""
        self.stream = False
        self.log: dict[str, Any] = {}

    def note(self, **fields: Any) -> None:
        """Add fields to this request's log line (never keys or prompts)."""
        self.log.update(fields)


class Provider:
    """One configured upstream. Subclasses set `native_kinds` and override what they serve.

    `chat()` is the hub every provider answers: an OpenAI chat request body (model already
    stripped of its `provider:` prefix) in, a `ChatResult` out. Errors are `GatewayError`s;
    raised from inside a stream iterator they become the stream's final error event.
    `native_kinds` lists the request kinds (``chat``, ``embeddings``, ``responses``,
    ``messages``, ``count_tokens``, ``ollama_chat``, ``ollama_generate``, ``ollama_embed``,
    ``ollama_show``) this provider takes as-is, forwarded by `forward()` with bytes relayed.
    """

    native_kinds: frozenset = frozenset()

    def __init__(self, config: Any) -> None:
        self.config = config
        self.name: str = config.name

    async def chat(self, body: dict[str, Any], ctx: RequestContext) -> ChatResult:
        raise GatewayError(400, f"provider '{self.name}' cannot answer chat requests")

    async def aclose(self) -> None:
        """Release what the provider holds (pooled connections, child processes)."""


# =============================================================================================
# gateway key store (API keys for clients of the gateway)
# =============================================================================================
#
# Theory of operation. Clients of the gateway present a key `evo-` + 48 hex characters; the
# keys file (`auth.json`, the original's layout) holds only its SHA-256 digest, a name, a short
# display prefix and the creation time. The CLI edits the file under an exclusive `flock` on a
# side file (`PATH.lock`), reading, changing and replacing it atomically (temp file in the same
# folder, fsync, `os.replace`), so concurrent CLI calls lose nothing and a reader never sees a
# half-written file. The server holds a `KeyStore`: a periodic task calls `refresh()`, which
# costs one `os.stat` and re-reads the file only when its (mtime, size, inode) changed; a file
# that turns malformed is logged once and the last good keys stay in force.

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone

KEYS_ENV = "EVO_GATEWAY_AUTH_KEYS"
AUTH_ENV = "EVO_GATEWAY_AUTH"
DEFAULT_KEYS_PATH = "auth.json"
KEY_PREFIX = "evo-"
KEY_RANDOM_BYTES = 24          # 48 hex characters, 192 bits
KEY_DISPLAY_CHARS = 16         # `evo-` + 12 hex: what `auth list` shows
KEY_FIELDS = ("name", "key_hash", "prefix", "created_at")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

_log = logging.getLogger("evo_gateway")


def auth_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when `EVO_GATEWAY_AUTH` is `true`, `1` or `yes` (any case, surrounding spaces ignored)."""
    env = os.environ if environ is None else environ
    return env.get(AUTH_ENV, "").strip().lower() in ("true", "1", "yes")


def keys_path(cli_path: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The keys file in use: `--keys PATH`, else `$EVO_GATEWAY_AUTH_KEYS`, else `auth.json`.

    The same rule serves the CLI and the server; an empty value counts as unset.
    """
    env = os.environ if environ is None else environ
    return cli_path or env.get(KEYS_ENV) or DEFAULT_KEYS_PATH


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored for `key` (the whole key, `evo-` included)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    """A fresh gateway key: `evo-` + 48 lowercase hex characters from `secrets`."""
    return KEY_PREFIX + secrets.token_hex(KEY_RANDOM_BYTES)


def utc_timestamp() -> str:
    """Now as UTC ISO 8601 with a `Z`, e.g. `2026-02-24T20:26:51.123456Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KeyFileError(Exception):
    """The keys file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def parse_keys_file(path: str, text: str) -> dict[str, Any]:
    """Parse and check the text of a keys file; return the document (`{"keys": [...]}`).

    Raises `KeyFileError` naming the file, the offending entry and field. Blank text counts as
    an empty store (a file just created with `touch`); entries may carry extra fields, kept
    as they are. Duplicate names, which the original allowed, are accepted.
    """
    if not text.strip():
        return {"keys": []}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise KeyFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise KeyFileError(path, f"expected a JSON object {{\"keys\": [...]}}, found {_json_type(doc)}")
    if "keys" not in doc:
        raise KeyFileError(path, "missing the \"keys\" list")
    keys = doc["keys"]
    if not isinstance(keys, list):
        raise KeyFileError(path, f"\"keys\" must be a list, found {_json_type(keys)}")
    for i, entry in enumerate(keys):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(path, f"{where}: expected an object, found {_json_type(entry)}")
        for field in KEY_FIELDS:
            if field not in entry:
                raise KeyFileError(path, f"{where}: missing field \"{field}\"")
            if not isinstance(entry[field], str):
                raise KeyFileError(path, f"{where}.{field}: expected a string, found {_json_type(entry[field])}")
        if not entry["name"]:
            raise KeyFileError(path, f"{where}.name: empty")
        if not _HEX64.fullmatch(entry["key_hash"]):
            raise KeyFileError(path, f"{where}.key_hash: expected 64 hex characters (a SHA-256 digest)")
    return doc


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def read_keys_file(path: str) -> dict[str, Any]:
    """Read and check the keys file; a missing file is an empty store. Raises `KeyFileError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {"keys": []}
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(path, f"cannot read: {exc}") from None
    return parse_keys_file(path, text)


def write_keys_file(path: str, doc: dict[str, Any]) -> None:
    """Replace the keys file with `doc` atomically, mode 0600, in the original's layout.

    The text goes to a 0600 temp file in the same folder, is fsynced and renamed over the
    file, so a reader sees the old file or the new one, never a mix. A symlinked file is
    replaced at its target. Run as root over an existing file, the owner is kept, so a
    gateway running as another user can still read it. Call it under `locked_keys_file()`.
    """
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    text = json.dumps(doc, indent=2, ensure_ascii=False)  # pretty, no trailing newline, as the original
    tmp = f"{target}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have removed bits, never added them; be explicit
            _keep_owner(fd, target)
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _keep_owner(fd: int, target: str) -> None:
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(target)
        os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass


@contextmanager
def locked_keys_file(path: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `PATH.lock` for a read-modify-write of the keys file.

    The lock file is created 0600 and never removed (removing it would let two writers hold
    locks on different inodes).
    """
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _cli_command() -> str:
    """How the user started this program, for hints: `python3 evo_gateway.pyz` unless known."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    base = os.path.basename(argv0)
    if base.endswith(".pyz") or base == "evo_gateway_cli.py":
        return "python3 " + shlex.quote(argv0)
    if base == "evo-gateway":
        return "evo-gateway"
    return "python3 evo_gateway.pyz"


class KeyStore:
    """The server's view of the keys file: digest → key name, refreshed when the file changes.

    `refresh()` costs one `os.stat` when nothing changed; call it from a periodic task, never
    per request. A missing file means no keys. A malformed file is logged once per change and
    the last good keys stay in force. `authenticate()` compares in constant time against
    every stored digest.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests: list[tuple[bytes, str]] = []   # (digest, name), in file order
        self._signature: tuple[int, int, int] | None = None  # (mtime_ns, size, inode); None: missing
        self._loaded = False
        self.refresh()

    @property
    def is_empty(self) -> bool:
        """True when no key is in force: every request would be refused."""
        return not self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def refresh(self) -> None:
        """Re-read the keys file if its (mtime, size, inode) changed since the last look."""
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            signature = None
        except OSError as exc:
            signature = (-1, -1, -1)
            if self._signature != signature:
                _log.error("gateway keys file %s: cannot stat: %s; keeping the last good keys", self.path, exc)
                self._signature = signature
            return
        if self._loaded and signature == self._signature:
            return
        self._signature = signature
        self._loaded = True
        if signature is None:
            if self._digests:
                _log.warning("gateway keys file %s is gone: no key is accepted now", self.path)
            self._digests = []
            return
        try:
            doc = read_keys_file(self.path)
        except KeyFileError as exc:
            _log.error("gateway keys file %s; keeping the %d key(s) last loaded", exc, len(self._digests))
            return
        self._digests = [(bytes.fromhex(e["key_hash"]), e["name"]) for e in doc["keys"]]
        _log.info("gateway keys file %s: %d key(s) loaded", self.path, len(self._digests))

    def authenticate(self, headers: Mapping[str, str]) -> str | None:
        """The name of the key the request presents, or None.

        `headers` has lower-cased names. The key comes from `authorization: Bearer <key>` (scheme
        in any case, whitespace around the key tolerated) and/or `x-api-key`; either one
        matching a stored key is enough. Every stored digest is compared with
        `hmac.compare_digest`, with no early exit.
        """
        for key in _presented_keys(headers):
            digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
            found = None
            for stored, name in self._digests:
                if hmac.compare_digest(stored, digest) and found is None:
                    found = name
            if found is not None:
                return found
        return None

    def missing_keys_hint(self) -> str:
        """The exact command that creates a key in the file this store reads (its absolute path)."""
        return f"{_cli_command()} auth generate --name NAME --keys {shlex.quote(os.path.abspath(self.path))}"


def _presented_keys(headers: Mapping[str, str]) -> list[str]:
    keys = []
    parts = headers.get("authorization", "").split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        keys.append(parts[1].strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key and api_key not in keys:
        keys.append(api_key)
    return keys
