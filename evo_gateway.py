"""evo-gateway core: one address for every LLM client on a machine.

Sections, in dependency order:
    constants · errors · config · key pool · providers (protocol, HTTP base, registry) ·
    gateway key store · gateway (routes, router, dispatch, error rendering, probes) ·
    server (connections, lifecycle, signals) · process (logging, workers, serve, check)

The LLM-agnostic HTTP layer (GatewayError, SSE / NDJSON decoders, the upstream client and its
pool) lives in `evo_http`. A request flows one way: socket → `HttpConnection` (head checks,
body) → `Gateway.handle_post` (one `json.loads`, route, provider) → provider → upstream → back
out as a `Reply` whose body is an async iterator written by the same task.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import difflib
import email.utils
import errno
import fcntl
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Union
from urllib.parse import urlsplit

import h11

from evo_http import (
    BAD_JSON,
    END_OF_MESSAGE,
    GatewayError,
    SSEDecoder,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTarget,
    json_bytes,
    ndjson_frame_end,
    set_nodelay,
    sse_frame_end,
    ssl_context_for,
)

__version__ = "0.1.0"

log = logging.getLogger("evo_gateway")

# =============================================================================================
# constants
# =============================================================================================

SSE_KEEPALIVE_S = 15.0
PROBE_TIMEOUT_S = 3.0  # an active /health probe gives up after this
PROBE_CACHE_S = 5.0  # one probe round answers every /health call for this long
MODEL_LIST_CACHE_S = 30.0  # one round of upstream model lists answers /v1/models and /api/tags this long
MAX_LISTED_MODELS = 500  # per provider, from an upstream's list
METRICS_STALE_S = 30.0  # with --workers: a worker snapshot older than this is left out of /metrics
KEY_COOLDOWN_S = 60.0
TICK_S = 0.5
FD_WARNING_EVERY_S = 60.0  # a server near its open-file limit says so at most this often
SHUTDOWN_FINISH_S = 5.0  # after the grace: time for cut requests to write their last event and clean up
# Request headers a client may pass to an upstream; everything else (its gateway key,
# hop-by-hop and framing headers, accept-encoding) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({
    "anthropic-version", "anthropic-beta", "openai-organization", "openai-project", "openai-beta",
})
# Upstream response headers worth relaying to the client.
RELAYED_RESPONSE_HEADERS = frozenset({
    "content-type", "content-encoding", "retry-after", "retry-after-ms", "x-should-retry", "openai-processing-ms",
    "openai-version", "request-id", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
})
RELAYED_RESPONSE_PREFIXES = ("anthropic-ratelimit-",)
# Fields the original evo-gateway writes that we accept (with one warning) but do not use yet.
LEGACY_KEYS = frozenset({"rate_limit", "model_metadata", "reliability", "routing"})
PROVIDER_TYPES = ("open_ai_compatible", "anthropic", "ollama", "claude_code", "codex_cli", "cursor")
CLI_PROVIDER_TYPES = frozenset({"claude_code", "codex_cli", "cursor"})

# =============================================================================================
# errors (GatewayError lives in evo_http, the HTTP layer)
# =============================================================================================


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the field."""


# =============================================================================================
# config
# =============================================================================================

DEFAULT_CONFIG: dict[str, Any] = {
    "server": {
        "host": "0.0.0.0", "port": 8080,
        "max_body_bytes": 33554432, "max_head_bytes": 65536,
        "head_timeout_s": 30, "keep_alive_s": 75, "shutdown_grace_s": 30, "workers": 1,
    },
    "providers": [
        {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key_envs": ["OPENAI_API_KEY"],
         "enabled": True, "provider_type": "open_ai_compatible", "extra_headers": {},
         "models": ["gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "o4-mini", "text-embedding-3-small"],
         "responses_api": True},
        {"name": "anthropic", "base_url": "https://api.anthropic.com/v1", "api_key_envs": ["ANTHROPIC_API_KEY"],
         "enabled": True, "provider_type": "anthropic", "extra_headers": {},
         "models": ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]},
        {"name": "openrouter", "base_url": "https://openrouter.ai/api/v1", "api_key_envs": ["OPENROUTER_API_KEY"],
         "enabled": False, "provider_type": "open_ai_compatible",
         "extra_headers": {"HTTP-Referer": "https://github.com/ai-evo-agents", "X-Title": "evo-gateway"}},
        {"name": "ollama", "base_url": "http://localhost:11434", "api_key_envs": [],
         "enabled": False, "provider_type": "ollama", "extra_headers": {}},
        {"name": "claude-code", "base_url": "", "api_key_envs": [], "enabled": False,
         "provider_type": "claude_code", "extra_headers": {}},
        {"name": "codex-cli", "base_url": "", "api_key_envs": [], "enabled": False,
         "provider_type": "codex_cli", "extra_headers": {}},
        {"name": "cursor", "base_url": "", "api_key_envs": [], "enabled": False,
         "provider_type": "cursor", "extra_headers": {}},
    ],
}


def default_config_text() -> str:
    """The exact text written when no config file exists (and committed as gateway.json)."""
    return json.dumps(DEFAULT_CONFIG, indent=2) + "\n"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 33554432
    max_head_bytes: int = 65536
    head_timeout_s: float = 30.0
    keep_alive_s: float = 75.0
    shutdown_grace_s: float = 30.0
    workers: int = 1


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str
    enabled: bool
    provider_type: str = "open_ai_compatible"
    api_key_envs: tuple = ()
    extra_headers: tuple = ()  # ((name, value), ...)
    models: tuple = ()
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 300.0
    idle_timeout_s: float = 300.0
    ca_file: str | None = None
    verify: bool = True
    responses_api: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig
    providers: tuple  # of ProviderConfig
    path: str = ""
    warnings: tuple = ()


# field → (accepted types, required); a number field accepts int or float but never bool.
_NUM = (int, float)
_SERVER_FIELDS: dict[str, tuple] = {
    "host": (str, True), "port": (int, True), "max_body_bytes": (int, False),
    "max_head_bytes": (int, False), "head_timeout_s": (_NUM, False), "keep_alive_s": (_NUM, False),
    "shutdown_grace_s": (_NUM, False), "workers": (int, False),
}
_PROVIDER_FIELDS: dict[str, tuple] = {
    "name": (str, True), "base_url": (str, True), "api_key_envs": (list, False), "enabled": (bool, True),
    "provider_type": (str, False), "extra_headers": (dict, False), "models": (list, False),
    "connect_timeout_s": (_NUM, False), "first_byte_timeout_s": (_NUM, False), "idle_timeout_s": (_NUM, False),
    "ca_file": ((str, type(None)), False), "verify": (bool, False), "responses_api": (bool, False),
}
_TOP_FIELDS: dict[str, tuple] = {"server": (dict, True), "providers": (list, True)}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}


def _type_name(types: Any) -> str:
    if types is _NUM:
        return "a number"
    if isinstance(types, tuple):
        return " or ".join(_TYPE_NAMES.get(t, "null") for t in types)
    return _TYPE_NAMES[types]


def _is_type(value: Any, types: Any) -> bool:
    if isinstance(value, bool) and types is not bool and not (isinstance(types, tuple) and bool in types):
        return False
    return isinstance(value, types)


def _check_fields(obj: dict, fields: dict, where: str, path: str, legacy: list) -> None:
    for key, value in obj.items():
        if key not in fields:
            if key in LEGACY_KEYS:
                legacy.append(f"{where}{key}")
                continue
            hint = difflib.get_close_matches(key, list(fields), n=1)
            extra = f" (did you mean {hint[0]}?)" if hint else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{path}: {where}{key}: unknown key{extra}")
        types, _ = fields[key]
        if not _is_type(value, types):
            raise ConfigError(f"{path}: {where}{key}: must be {_type_name(types)}, got {json.dumps(value)}")
    for key, (_, required) in fields.items():
        if required and key not in obj:
            raise ConfigError(f"{path}: {where}{key}: missing (required)")


def parse_config(data: Any, path: str) -> Config:
    """Validate parsed JSON against the schema (SPEC §2) and build a `Config`.

    Every problem is a `ConfigError` naming the file, the dotted path and, for an unknown
    key, the closest known one; keys the original gateway wrote become warnings.
    """
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    legacy: list[str] = []
    _check_fields(data, _TOP_FIELDS, "", path, legacy)
    raw_server = data["server"]
    _check_fields(raw_server, _SERVER_FIELDS, "server.", path, legacy)
    server = ServerConfig(**{k: v for k, v in raw_server.items() if k in _SERVER_FIELDS})
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"{path}: server.port: must be 0..65535, got {server.port}")
    for key in ("max_body_bytes", "max_head_bytes", "workers"):
        if getattr(server, key) < 1:
            raise ConfigError(f"{path}: server.{key}: must be at least 1")
    for key in ("head_timeout_s", "keep_alive_s", "shutdown_grace_s"):
        if getattr(server, key) <= 0:
            raise ConfigError(f"{path}: server.{key}: must be greater than 0")
    providers = []
    seen: set[str] = set()
    for i, raw in enumerate(data["providers"]):
        where = f"providers[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: providers[{i}]: must be an object")
        _check_fields(raw, _PROVIDER_FIELDS, where, path, legacy)
        fields = {k: v for k, v in raw.items() if k in _PROVIDER_FIELDS}
        name = fields["name"]
        if not name or ":" in name:
            raise ConfigError(f"{path}: {where}name: must be non-empty and contain no ':', got {name!r}")
        if name in seen:
            raise ConfigError(f"{path}: {where}name: duplicate provider name {name!r}")
        seen.add(name)
        ptype = fields.get("provider_type", "open_ai_compatible")
        if ptype not in PROVIDER_TYPES:
            hint = difflib.get_close_matches(ptype, PROVIDER_TYPES, n=1)
            extra = f" (did you mean {hint[0]}?)" if hint else f" (one of {', '.join(PROVIDER_TYPES)})"
            raise ConfigError(f"{path}: {where}provider_type: unknown type {ptype!r}{extra}")
        for list_key in ("api_key_envs", "models"):
            for j, item in enumerate(fields.get(list_key, [])):
                if not isinstance(item, str) or not item:
                    raise ConfigError(f"{path}: {where}{list_key}[{j}]: must be a non-empty string")
        headers = fields.get("extra_headers", {})
        for hname, hvalue in headers.items():
            if not isinstance(hvalue, str):
                raise ConfigError(f"{path}: {where}extra_headers.{hname}: must be a string")
        base_url = fields["base_url"].rstrip("/")
        if ptype not in CLI_PROVIDER_TYPES:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{path}: {where}base_url: must be an http:// or https:// URL, got {base_url!r}")
        for key in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s"):
            if key in fields and fields[key] <= 0:
                raise ConfigError(f"{path}: {where}{key}: must be greater than 0")
        fields.update(provider_type=ptype, base_url=base_url, api_key_envs=tuple(fields.get("api_key_envs", ())),
                      models=tuple(fields.get("models", ())), extra_headers=tuple(headers.items()))
        providers.append(ProviderConfig(**fields))
    if legacy:
        warnings.append(f"{path}: {', '.join(legacy)}: written by the original evo-gateway; accepted but not used")
    return Config(server=server, providers=tuple(providers), path=path, warnings=tuple(warnings))


def config_path(cli_path: str | None, environ: dict | None = None) -> str:
    """`--config PATH`, else `$GATEWAY_CONFIG`, else `./gateway.json`."""
    environ = os.environ if environ is None else environ
    return cli_path or environ.get("GATEWAY_CONFIG") or "gateway.json"


def load_config(path: str, create: bool = True) -> Config:
    """Read and validate the config at `path`; write the default file first if it is missing."""
    if not os.path.exists(path):
        if not create:
            raise ConfigError(f"{path}: no such file")
        with open(path, "w", encoding="utf-8") as f:
            f.write(default_config_text())
        log.info("wrote default gateway config to %s", path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON: nested too deeply") from None
    return parse_config(data, path)


# =============================================================================================
# key pool: upstream API keys with round-robin rotation and cooldown
# =============================================================================================


class KeyPool:
    """Round-robin over the non-empty env variables named in `api_key_envs`.

    A key answered with 401/403/429 is set aside for `KEY_COOLDOWN_S` while another key is
    usable; with every key cooling down the least recently failed one is used anyway, so a
    single-key provider never stops trying.
    """

    def __init__(self, env_names: Iterable[str], environ: dict | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.keys = [environ[n].strip() for n in env_names if environ.get(n, "").strip()]
        self._next = 0
        self._cooling: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def next_key(self) -> str | None:
        """The key for the next request, or None when the provider has none."""
        if not self.keys:
            return None
        now = time.monotonic()
        for _ in range(len(self.keys)):
            key = self.keys[self._next % len(self.keys)]
            self._next += 1
            until = self._cooling.get(key)
            if until is None or until <= now:
                self._cooling.pop(key, None)
                return key
        return min(self.keys, key=lambda k: self._cooling.get(k, 0.0))

    def report(self, key: str | None, status: int) -> None:
        """Record an upstream answer for `key`; a refusal sets it aside while others exist."""
        if key is not None and status in (401, 403, 429) and len(self.keys) > 1:
            self._cooling[key] = time.monotonic() + KEY_COOLDOWN_S

    def inherit(self, previous: KeyPool) -> None:
        """After a reload: a key still configured stays set aside for what is left of its cooldown."""
        self._cooling = {key: until for key, until in previous._cooling.items() if key in self.keys}

    def cooling_count(self) -> int:
        now = time.monotonic()
        return sum(1 for until in self._cooling.values() if until > now)


# =============================================================================================
# providers: the protocol the core consumes (implementations live in providers/)
# =============================================================================================

# A chat result from a provider: a chat.completion dict, or (stream) an async iterator of
# chat.completion.chunk dicts that ends when the answer is complete.
ChatResult = Union[dict[str, Any], AsyncIterator[dict[str, Any]]]


class RequestContext:
    """What a provider may know about the client request besides its body.

    `headers` holds the client's request headers, names lower-cased. Providers record what
    the request log line should carry (`usage`, `upstream_status`) through `note()`.
    """

    __slots__ = ("request_id", "headers", "provider", "model", "stream", "log", "started")

    def __init__(self, request_id: str, headers: dict[str, str]) -> None:
        self.request_id = request_id
        self.headers = headers
        self.provider = ""
        self.model = ""
        self.stream = False
        self.log: dict[str, Any] = {}
        self.started = time.monotonic()

    def note(self, **fields: Any) -> None:
        """Add fields to this request's log line (never keys or prompts)."""
        self.log.update(fields)


_PROBE_CTX = RequestContext("probe", {})


class Reply:
    """A response ready to write: status, headers, and a body of bytes or an async byte iterator.

    `sse` marks an event stream, which may receive keep-alive comments while it is quiet.
    """

    __slots__ = ("body", "end_mark", "error_frame", "headers", "relayed", "sse", "status")

    def __init__(self, status: int, headers: list, body: bytes | AsyncIterator[bytes], sse: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.sse = sse
        # For a relayed stream: renders a GatewayError raised mid-stream as the final event.
        self.error_frame: Callable[[GatewayError], bytes] | None = None
        # Upstream bytes relayed as they are: their token usage is read on the way for the log.
        self.relayed = False
        # For a relayed stream: what its last piece holds when the upstream finished it; a stream
        # ending without it was cut, and gets `error_frame` rather than passing for a whole answer.
        self.end_mark: re.Pattern | None = None


JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
NDJSON_HEADERS = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]


def json_reply(obj: Any, status: int = 200, headers: list | None = None) -> Reply:
    return Reply(status, JSON_HEADERS + (headers or []), json_bytes(obj))


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
        self.last_result: tuple | None = None  # (ok, status or error, latency_ms, when) from real traffic

    async def chat(self, body: dict[str, Any], ctx: RequestContext) -> ChatResult:
        raise GatewayError(400, f"provider '{self.name}' ({self.config.provider_type}) cannot answer chat requests")

    async def forward(self, kind: str, body: dict[str, Any], ctx: RequestContext) -> Reply:
        raise GatewayError(400, f"provider '{self.name}' ({self.config.provider_type}) does not serve {kind} requests")

    async def request_json(self, kind: str, body: dict[str, Any], ctx: RequestContext) -> dict:
        """A non-stream native call whose JSON answer the gateway translates (e.g. embeddings)."""
        raise GatewayError(400, f"provider '{self.name}' ({self.config.provider_type}) does not serve {kind} requests")

    def key_count(self) -> int:
        return 0

    async def probe(self) -> dict[str, Any]:
        """A cheap active check for /health and `check`, never a generation: {"ok", "detail"}."""
        return {"ok": True, "detail": "no active check for this provider type"}

    async def list_models(self) -> list[str]:
        """The models the upstream says it serves, for a provider configured without `models`."""
        return []

    async def aclose(self) -> None:
        """Release what the provider holds (pooled connections, child processes)."""


# An error answer is read this far at most: its message is what matters, and a misbehaving
# upstream must not make the gateway hold megabytes per request.
ERROR_BODY_LIMIT = 1024 * 1024


async def upstream_error(resp: UpstreamResponse, provider: str, raw: bytes | None = None) -> GatewayError:
    """Read an upstream error answer (unless `raw` has it) and turn it into a GatewayError with the same status.

    The message is taken from whichever dialect's envelope the body is in (OpenAI, Anthropic,
    Ollama), else a short prefix of the text; `retry-after` is kept.
    """
    if raw is None:
        try:
            raw = await resp.read(ERROR_BODY_LIMIT)
        except GatewayError:
            raw = b""
    message = ""
    kind = ""
    code = param = None
    try:
        data = json.loads(raw)
    except BAD_JSON:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or "")
            etype = str(err.get("type") or "")
            if etype == "overloaded_error":
                kind = "overloaded"
            # OpenAI's machine-readable reason (context_length_exceeded, insufficient_quota…):
            # clients such as Codex act on it, so it survives translation of the envelope.
            code = err.get("code") if isinstance(err.get("code"), str) else None
            param = err.get("param") if isinstance(err.get("param"), str) else None
        elif isinstance(err, str):
            message = err
        elif isinstance(data.get("message"), str):
            message = data["message"]
    if not message:
        text = raw.decode("utf-8", "replace").strip()
        message = text[:500] or f"HTTP {resp.status} with an empty body"
    headers = [(n, v) for n, v in ((n, resp.header(n.encode())) for n in ("retry-after", "retry-after-ms"))
               if v is not None]
    return GatewayError(resp.status, f"{provider}: {message}", kind, code=code, param=param, headers=headers)


_ACCEPT_JSON = (b"accept", b"application/json")
# No Accept on POSTs: upstreams decide streaming from the body's `stream` (WIRE.md), and each
# header costs h11 about 1% of a proxied request.
_STATIC_UPSTREAM_HEADERS = ((b"content-type", b"application/json"), (b"accept-encoding", b"identity"))
_RELAYED_NAMES = frozenset(n.encode() for n in RELAYED_RESPONSE_HEADERS)
_RELAYED_PREFIXES = tuple(p.encode() for p in RELAYED_RESPONSE_PREFIXES)


class HttpProvider(Provider):
    """Base for providers reached over HTTP: target, key pool, headers, forward and relay.

    Subclasses map request kinds to upstream paths (`native_paths`) and choose how the key
    is sent (`auth_headers`).
    """

    native_paths: dict[str, str] = {}
    forwarded_headers: frozenset = FORWARDED_REQUEST_HEADERS  # the client headers this upstream may see
    probe_path = "/models"  # GET here answers whether the upstream is up and takes our key
    models_path = "/models"  # GET here lists the upstream's models (`model_names` reads the answer)

    def __init__(self, config: ProviderConfig, pool: UpstreamPool, environ: dict | None = None) -> None:
        super().__init__(config)
        ctx = ssl_context_for(config.ca_file, config.verify) if config.base_url.startswith("https:") else None
        self.target = UpstreamTarget(config.base_url, config.name, ctx, config.connect_timeout_s,
                                     config.first_byte_timeout_s, config.idle_timeout_s)
        self.pool = pool
        self.keys = KeyPool(config.api_key_envs, environ)
        self.extra_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in config.extra_headers]
        self.native_kinds = frozenset(self.native_paths)

    def key_count(self) -> int:
        return len(self.keys)

    def auth_headers(self, key: str | None, ctx: RequestContext) -> list:
        return [(b"authorization", b"Bearer " + key.encode("latin-1"))] if key else []

    async def send(self, path: str, body: dict, ctx: RequestContext, stream: bool) -> UpstreamResponse:
        """POST `body` as JSON to `path`; returns once the response head is in."""
        key = self.keys.next_key()
        headers = [*_STATIC_UPSTREAM_HEADERS, *self.auth_headers(key, ctx)]
        client_headers = ctx.headers
        forwarded = self.forwarded_headers & client_headers.keys()
        if forwarded:  # the few client headers an upstream's API reads; rarely any
            ours = {name for name, _ in headers}
            for name in sorted(forwarded):
                bname = name.encode()
                if bname not in ours:
                    headers.append((bname, client_headers[name].encode("latin-1")))
        headers += self.extra_headers
        t0 = time.monotonic()
        try:
            resp = await self.pool.request(self.target, "POST", path, headers,
                                           json_bytes(body))
        except GatewayError as e:
            self.last_result = (False, e.message, None, time.time())
            raise
        latency_ms = round((time.monotonic() - t0) * 1000, 1)
        if not (200 <= resp.status < 300 or 400 <= resp.status < 600) or resp.status in (204, 205):
            resp.close()  # a redirect, a 304, a 204, a status past 599: nothing a client of ours could use
            location = resp.header(b"location")
            hint = f" (a redirect to {location}: set base_url to where it points)" if location else ""
            self.last_result = (False, resp.status, latency_ms, time.time())
            raise GatewayError(502, f"provider '{self.name}' at {self.target.describe()} answered HTTP "
                                    f"{resp.status}{hint}", "upstream")
        self.keys.report(key, resp.status)
        self.last_result = (resp.status < 500, resp.status, latency_ms, time.time())
        ctx.note(upstream_status=resp.status, ttfb_ms=latency_ms)
        return resp

    async def forward(self, kind: str, body: dict[str, Any], ctx: RequestContext) -> Reply:
        stream = ctx.stream
        resp = await self.send(self.native_paths[kind], body, ctx, stream)
        headers = [(k, v) for k, v in resp.headers
                   if k in _RELAYED_NAMES or k.startswith(_RELAYED_PREFIXES)]
        if resp.status >= 400:
            raw = await resp.read(ERROR_BODY_LIMIT)
            if len(raw) < ERROR_BODY_LIMIT and "json" in (resp.header(b"content-type") or "") \
                    and _is_json_object(raw):
                return Reply(resp.status, headers, raw)  # the upstream's own envelope, as it came
            # A proxy's HTML page, a plain-text 502, "oops" labelled JSON: the client's SDK can
            # only read its own envelope.
            raise await upstream_error(resp, self.name, raw)
        if stream:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            is_sse = (resp.header(b"content-type") or "").startswith("text/event-stream")
            # Relayed in whole frames; a Responses stream is framed by its relay in the gateway.
            frame_end = None if kind == "responses" else self.frame_end_for(kind)
            return Reply(resp.status, headers, resp.aiter_bytes(frame_end), sse=is_sse)
        return Reply(resp.status, headers, await resp.read())

    @staticmethod
    def frame_end_for(kind: str) -> Callable[[bytes], int]:
        return ndjson_frame_end if kind.startswith("ollama_") else sse_frame_end

    async def request_json(self, kind: str, body: dict[str, Any], ctx: RequestContext) -> dict:
        resp = await self.send(self.native_paths[kind], body, ctx, False)
        if resp.status >= 300:
            raise await upstream_error(resp, self.name)
        return parse_upstream_json(await resp.read(), self.name)

    async def probe(self) -> dict[str, Any]:
        """`GET {base_url}{probe_path}` with this provider's key and headers.

        Up means reachable and not refusing us: 2xx, or a 4xx other than 401/403 (a server
        without a model list still answers). 401/403 (the key) and 5xx count as down; transport
        errors are raised as GatewayErrors by the pool.
        """
        key = self.keys.next_key()
        status, _ = await self._get(self.probe_path, key)
        where = f"GET {self.target.base_path}{self.probe_path} on {self.target.describe()}"
        if status in (401, 403):
            why = "no key is configured" if key is None else "the upstream refused the key"
            return {"ok": False, "status": status, "detail": f"HTTP {status} on {where}: {why}"}
        if status >= 500:
            return {"ok": False, "status": status, "detail": f"HTTP {status} on {where}: the upstream is failing"}
        if status >= 400:
            return {"ok": True, "status": status, "detail": f"reachable (HTTP {status} on {where})"}
        return {"ok": True, "status": status, "detail": f"HTTP {status} on {where}"}

    async def list_models(self) -> list[str]:
        status, raw = await self._get(self.models_path, self.keys.next_key())
        if status >= 300:
            raise GatewayError(502, f"HTTP {status} on GET {self.target.base_path}{self.models_path}", "upstream")
        return self.model_names(parse_upstream_json(raw, self.name))[:MAX_LISTED_MODELS]

    @staticmethod
    def model_names(listing: dict) -> list[str]:
        """Model names from a model list: OpenAI's and Anthropic's `{"data": [{"id"}]}`."""
        data = listing.get("data")
        return [m["id"] for m in (data if isinstance(data, list) else [])
                if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]

    async def _get(self, path: str, key: str | None) -> tuple[int, bytes]:
        """`GET {base_url}{path}` with this provider's key and headers: (status, body)."""
        headers = [_ACCEPT_JSON, (b"accept-encoding", b"identity")]
        headers += self.auth_headers(key, _PROBE_CTX) + self.extra_headers
        resp = await self.pool.request(self.target, "GET", path, headers)
        try:
            return resp.status, await resp.read()
        finally:
            resp.close()


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except BAD_JSON:
        return False


def parse_upstream_json(raw: bytes, provider: str) -> dict:
    try:
        data = json.loads(raw)
    except BAD_JSON:
        data = None
    if not isinstance(data, dict):
        raise GatewayError(502, f"provider '{provider}' answered with something that is not a JSON object: "
                                f"{raw[:200].decode('utf-8', 'replace')!r}", "upstream")
    return data


async def sse_json_events(resp: UpstreamResponse, provider: str,
                          is_final: Callable[[dict], bool]) -> AsyncIterator[tuple[str, dict]]:
    """Decode an upstream SSE body into (event name, JSON object) pairs; stops at `[DONE]`.

    A body that ends before `[DONE]` or an event `is_final` accepts was cut off (an upstream
    that closes its connection to end a response looks like one that finished): that raises a
    502 instead of passing for a whole answer. The connection is closed if the consumer stops early.
    """
    decoder = SSEDecoder()
    complete = False
    try:
        async for chunk in resp.aiter_bytes():
            for event, data in decoder.feed(chunk):
                if data == "[DONE]":
                    return
                try:
                    obj = json.loads(data)
                except BAD_JSON:
                    raise GatewayError(502, f"provider '{provider}' sent a stream event that is not JSON: "
                                            f"{data[:200]!r}", "upstream") from None
                if isinstance(obj, dict):
                    complete = complete or is_final(obj)
                    yield event, obj
        if not complete:
            raise GatewayError(502, f"provider '{provider}' ended its stream before the answer was complete "
                                    "(no final event)", "upstream")
    finally:
        resp.close()


def load_providers(config: Config, pool: UpstreamPool, environ: dict | None = None) -> dict[str, Provider]:
    """Build a Provider for every enabled provider in the config (classes loaded lazily)."""
    import providers as registry  # the core loads providers by name; they import the core

    return {p.name: registry.create(p, pool, environ) for p in config.providers if p.enabled}


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


KEYS_ENV = "EVO_GATEWAY_AUTH_KEYS"
AUTH_ENV = "EVO_GATEWAY_AUTH"
DEFAULT_KEYS_PATH = "auth.json"
KEY_PREFIX = "evo-"
KEY_RANDOM_BYTES = 24          # 48 hex characters, 192 bits
KEY_DISPLAY_CHARS = 16         # `evo-` + 12 hex: what `auth list` shows
KEY_FIELDS = ("name", "key_hash", "prefix", "created_at")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")



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
    except RecursionError:  # `[[[[...` deeper than the parser's stack: not a keys file either
        raise KeyFileError(path, "not valid JSON (nested too deeply)") from None
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
        self.problem = ""  # why the file on disk is not in force, while it is not; else ""
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
                log.error("gateway keys file %s: cannot stat: %s; keeping the last good keys", self.path, exc)
                self._signature = signature
            return
        if self._loaded and signature == self._signature:
            return
        self._signature = signature
        self._loaded = True
        if signature is None:
            if self._digests:
                log.warning("gateway keys file %s is gone: no key is accepted now", self.path)
            self._digests = []
            self.problem = ""
            return
        try:
            doc = read_keys_file(self.path)
        except KeyFileError as exc:
            log.error("gateway keys file %s; keeping the %d key(s) last loaded", exc, len(self._digests))
            self.problem = exc.problem
            return
        except Exception as exc:  # never let a surprise stop the ticker that calls us (deadlines, reloads)
            log.exception("gateway keys file %s: cannot load; keeping the %d key(s) last loaded", self.path,
                          len(self._digests))
            self.problem = f"cannot load: {exc!r}"
            return
        self.problem = ""
        self._digests = [(bytes.fromhex(e["key_hash"]), e["name"]) for e in doc["keys"]]
        log.info("gateway keys file %s: %d key(s) loaded", self.path, len(self._digests))

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


def enable_auth(gateway: Any, environ: Mapping[str, str] | None = None) -> KeyStore | None:
    """Give `gateway` a `KeyStore` when `EVO_GATEWAY_AUTH` is on; returns it, or None when auth is off.

    With no usable key, say so loudly with the command that creates one: the gateway still starts
    and answers `/health`, and refuses everything else with the same hint.
    """
    if not auth_enabled(environ):
        return None
    store = KeyStore(keys_path(None, environ))
    gateway.auth = store
    if store.is_empty:
        state = ("does not exist" if not os.path.exists(store.path) else
                 f"is unusable ({store.problem})" if store.problem else "holds no keys")
        log.warning("!!! %s is on but the keys file %s %s: every request except /health is refused (401). "
                    "Create a key with: %s", AUTH_ENV, os.path.abspath(store.path), state, store.missing_keys_hint())
    else:
        log.info("gateway API keys required: %d key(s) in %s", len(store), os.path.abspath(store.path))
    return store


def _presented_keys(headers: Mapping[str, str]) -> list[str]:
    keys = []
    parts = headers.get("authorization", "").split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer":
        keys.append(parts[1].strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key and api_key not in keys:
        keys.append(api_key)
    return keys


# =============================================================================================
# gateway: routes, router, dispatch, error rendering per dialect
# =============================================================================================

# path → (method, kind, dialect). The dialect decides the error envelope and stream framing.
ROUTES: dict[str, tuple[str, str, str]] = {
    "/health": ("GET", "health", "openai"),
    "/metrics": ("GET", "metrics", "openai"),
    "/v1/models": ("GET", "models", "openai"),
    "/v1/chat/completions": ("POST", "chat", "openai"),
    "/v1/embeddings": ("POST", "embeddings", "openai"),
    "/v1/responses": ("POST", "responses", "openai"),
    "/v1/messages": ("POST", "messages", "anthropic"),
    "/v1/messages/count_tokens": ("POST", "count_tokens", "anthropic"),
    "/api/chat": ("POST", "ollama_chat", "ollama"),
    "/api/generate": ("POST", "ollama_generate", "ollama"),
    "/api/embed": ("POST", "ollama_embed", "ollama"),
    "/api/embeddings": ("POST", "ollama_embeddings", "ollama"),
    "/api/show": ("POST", "ollama_show", "ollama"),
    "/api/tags": ("GET", "tags", "ollama"),
    "/api/version": ("GET", "version", "ollama"),
    "/api/ps": ("GET", "running", "ollama"),
    # Ollama's own liveness check (its CLI and several UIs ask `HEAD /` before anything else).
    "/": ("GET", "root", "openai"),
}
# `GET /v1/models/{id}`: one model (what the SDKs' `models.retrieve` asks), or one provider's models.
MODEL_ROUTE_PREFIX = "/v1/models/"
MODEL_ROUTE = ("GET", "model", "openai")
MODEL_KINDS = frozenset({"models", "model"})
# What never needs a gateway key (SPEC §9: /health alone).
OPEN_KINDS = frozenset({"health"})
OLLAMA_KINDS = frozenset({"ollama_chat", "ollama_generate", "ollama_embed", "ollama_embeddings", "ollama_show"})
# Fields each kind cannot do without: checked before anything reaches an upstream.
REQUIRED_FIELDS: dict[str, tuple[tuple[str, type, str], ...]] = {
    "chat": (("messages", list, "a list of messages"),),
    "messages": (("messages", list, "a list of messages"), ("max_tokens", int, "an integer")),
    "count_tokens": (("messages", list, "a list of messages"),),
    "ollama_chat": (),
    "ollama_generate": (),
    "responses": (),
    "embeddings": (),
    "ollama_embed": (),
    "ollama_embeddings": (),
    "ollama_show": (),
}

_OPENAI_TYPES = {"invalid_request": "invalid_request_error", "authentication": "authentication_error",
                 "permission": "permission_error", "not_found": "not_found_error", "rate_limit": "rate_limit_error",
                 "timeout": "timeout_error", "upstream": "upstream_error", "overloaded": "overloaded_error",
                 "unavailable": "service_unavailable", "internal": "server_error", "billing": "insufficient_quota"}
_ANTHROPIC_TYPES = {"invalid_request": "invalid_request_error", "authentication": "authentication_error",
                    "permission": "permission_error", "not_found": "not_found_error",
                    "rate_limit": "rate_limit_error", "timeout": "timeout_error", "upstream": "api_error",
                    "overloaded": "overloaded_error", "unavailable": "api_error", "internal": "api_error",
                    "billing": "billing_error"}


def _openai_model(provider: str, model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": provider}


def _anthropic_model(model_id: str) -> dict:
    return {"type": "model", "id": model_id, "display_name": model_id, "created_at": "2025-01-01T00:00:00Z"}


def percent_decoded(text: str) -> str:
    """`text` (a request path as latin-1) with its %XX escapes decoded, read as UTF-8."""
    if "%" not in text:
        return text
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes((int(m.group(1), 16),)), text.encode("latin-1"))
    return raw.decode("utf-8", "replace")


def dialect_for_path(path: str) -> str:
    """The envelope of an unknown path or a wrong method (SPEC §8): Ollama's under /api/, else OpenAI's."""
    return "ollama" if path.startswith("/api/") else "openai"


def error_body(dialect: str, err: GatewayError) -> dict:
    """The error envelope of `dialect` (SPEC §8) for `err`."""
    if dialect == "anthropic":
        if err.status == 413:
            etype = "request_too_large"
        else:
            etype = _ANTHROPIC_TYPES.get(err.kind, "api_error")
        return {"type": "error", "error": {"type": etype, "message": err.message}}
    if dialect == "ollama":
        return {"error": err.message}
    return {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.kind, "server_error"),
                      "param": err.param, "code": err.code}}


def error_reply(dialect: str, err: GatewayError) -> Reply:
    return json_reply(error_body(dialect, err), err.status, [(n.encode(), v.encode()) for n, v in err.headers])


def stream_error_frame(kind: str, err: GatewayError, relay: ResponsesRelay | None = None) -> bytes:
    """The final in-band error event for a relayed stream of `kind` (after a 200 was sent)."""
    if kind in OLLAMA_KINDS:
        return json.dumps({"error": err.message}).encode() + b"\n"
    if kind in ("messages", "count_tokens"):
        return b"event: error\ndata: " + json_bytes(error_body("anthropic", err)) + b"\n\n"
    if kind == "responses":
        return (relay or ResponsesRelay()).failed_frames(err.message)
    return _openai_error_event(err) + _OPENAI_DONE


_OPENAI_DONE = b"data: [DONE]\n\n"

# The last line of a finished relayed stream, per route: OpenAI's [DONE] (or, from a server
# that leaves it out, the finish or usage chunk), Anthropic's message_stop, Ollama's done line;
# an in-band error is an end too.
_OLLAMA_STREAM_END = re.compile(rb'"done"\s*:\s*true|"error"')
RELAYED_STREAM_END = {
    "chat": re.compile(rb'\[DONE\]|"finish_reason"\s*:\s*"|"usage"\s*:\s*\{|"error"'),
    "messages": re.compile(rb'message_stop|"error"'),
    "ollama_chat": _OLLAMA_STREAM_END,
    "ollama_generate": _OLLAMA_STREAM_END,
}


def last_line(data: bytes) -> bytes:
    """The last non-empty line of a relayed chunk (where a stream's final event says it is one)."""
    end = len(data)
    while end and data[end - 1] in b"\r\n":
        end -= 1
    return data[max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1:end]


def _openai_error_event(err: GatewayError) -> bytes:
    """An OpenAI stream's in-band error (the SDK raises on a truthy top-level "error")."""
    return b"data: " + json_bytes(error_body("openai", err)) + b"\n\n"


class ChatStream:
    """Chat chunks → OpenAI SSE frames, for OpenAI clients of providers that do not speak OpenAI.

    The gateway always asks the provider for usage (for its log); a client that did not ask
    (`stream_options.include_usage`) does not get the extra usage chunk (WIRE §1.3).
    """

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def feed(self, chunk: dict) -> list[bytes]:
        if not self.include_usage and "usage" in chunk:
            if not chunk.get("choices"):
                return []
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return [b"data: " + json_bytes(chunk) + b"\n\n"]

    def finish(self) -> list[bytes]:
        return [_OPENAI_DONE]

    def fail(self, message: str) -> list[bytes]:
        return [_openai_error_event(GatewayError(502, message, "upstream")), _OPENAI_DONE]


class ResponsesRelay:
    """Watches a relayed Responses SSE stream so that a broken upstream still ends it properly.

    Bytes go out unchanged, but in whole events only: a trailing partial event is held until
    its blank line arrives, because half a JSON line followed by an error frame would break
    the client's parser. It keeps the `response` object of the first lifecycle event, the
    items finished so far and the next `sequence_number`, so `failed_frames` can end the stream
    with a `response.failed` the openai SDK accepts (same response id, next sequence number;
    preceded by `response.created` if none went out) and Codex reads as a failed turn.
    `is_finished` tells whether the upstream's own terminal event went by.
    """

    _TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.is_finished = False
        self._decoder = SSEDecoder()
        self._held = b""
        self._response: dict | None = None
        self._items: dict[int, Any] = {}
        self._next_seq = 0

    def feed(self, chunk: bytes) -> bytes:
        """The bytes that are safe to relay now (whole events); the rest is held."""
        data = self._held + chunk if self._held else chunk
        end = sse_frame_end(data)
        ready, self._held = data[:end], data[end:]
        if ready:
            self._observe(ready)
        return ready

    def held(self) -> bytes:
        """What is still held at a clean end of the upstream body (an unterminated last event)."""
        rest, self._held = self._held, b""
        return rest

    def _observe(self, data: bytes) -> None:
        for _, text in self._decoder.feed(data):
            try:
                event = json.loads(text)
            except BAD_JSON:
                continue
            if not isinstance(event, dict):
                continue
            seq = event.get("sequence_number")
            self._next_seq = seq + 1 if isinstance(seq, int) and seq >= self._next_seq else self._next_seq + 1
            etype = event.get("type")
            if self._response is None and isinstance(event.get("response"), dict):
                self._response = event["response"]
            elif etype == "response.output_item.done" and isinstance(event.get("output_index"), int):
                self._items[event["output_index"]] = event.get("item")
            if etype in self._TERMINAL:
                self.is_finished = True

    def _frame(self, etype: str, **fields: Any) -> bytes:
        data = dict(type=etype, sequence_number=self._next_seq, **fields)
        self._next_seq += 1
        return b"event: " + etype.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"

    def failed_frames(self, message: str) -> bytes:
        """`response.failed` (after a `response.created` if the client has seen none) for `message`."""
        out = b""
        response = self._response
        if response is None:
            response = {"id": "resp_" + secrets.token_hex(12), "object": "response", "created_at": int(time.time()),
                        "status": "in_progress", "error": None, "incomplete_details": None, "instructions": None,
                        "metadata": {}, "model": self.model, "output": [], "parallel_tool_calls": True,
                        "temperature": None, "tool_choice": "auto", "tools": [], "top_p": None, "usage": None}
            out += self._frame("response.created", response=response)
        output = [self._items[i] for i in sorted(self._items)]
        failed = dict(response, status="failed", output=output,
                      error={"code": "server_error", "message": message})
        self.is_finished = True
        return out + self._frame("response.failed", response=failed)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in _INFINITIES:
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_INFINITIES = (float("inf"), float("-inf"))
# Client bodies: Python's json also reads NaN, Infinity and 1e999 (as inf), which would reach
# the upstream re-serialised as NaN/Infinity — not JSON. A 400 here names the token instead.
_REQUEST_JSON = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant).decode


class Router:
    """Resolves a request's `model` to (provider, upstream model) exactly as SPEC §4 says."""

    def __init__(self, config: Config, providers: dict[str, Provider]) -> None:
        self.config_path = config.path
        self.configured = {p.name: p for p in config.providers}
        self.providers = providers
        self.default = next((providers[p.name] for p in config.providers if p.enabled), None)
        self.model_owner: dict[str, Provider] = {}
        for p in config.providers:
            if p.enabled:
                for m in p.models:
                    self.model_owner.setdefault(m, providers[p.name])

    def resolve(self, model: str) -> tuple[Provider, str]:
        prefix, sep, rest = model.partition(":")
        if sep and prefix in self.configured:
            provider = self.providers.get(prefix)
            if provider is None:
                raise GatewayError(503, f"provider '{prefix}' is disabled; set \"enabled\": true for it in "
                                        f"{self.config_path} to use it", "unavailable")
            return provider, rest
        provider = self.model_owner.get(model) or self.default
        if provider is None:
            raise GatewayError(503, f"no provider is enabled; set \"enabled\": true for one in {self.config_path}",
                               "unavailable")
        return provider, model


# What a CLI provider reads from the environment; equal values (and an equal config) let a
# reload keep the provider object, and with it its running processes and concurrency cap.
_CLI_RUN_SETTINGS = ("binary", "max_concurrent", "timeout_s")


class GatewayState:
    """Everything derived from one config: swapped whole on reload, never mutated.

    Built from `previous` on a reload: a CLI provider whose config and environment settings
    are unchanged is carried over as the same object (its runs go on, its cap stays one cap);
    every other provider is built afresh (so key variables are re-read) and inherits the last
    upstream result of its namesake for /health, and, while it reaches the same base URL, the
    cooldowns of the keys it still has.
    """

    def __init__(self, config: Config, pool: UpstreamPool, environ: dict | None = None,
                 previous: GatewayState | None = None) -> None:
        self.config = config
        self.providers = load_providers(config, pool, environ)
        self.kept: list[str] = []
        for name, provider in list(self.providers.items()):
            old = previous.providers.get(name) if previous is not None else None
            if old is None or type(old) is not type(provider):
                continue
            if isinstance(provider, HttpProvider) and provider.config.base_url == old.config.base_url:
                provider.keys.inherit(old.keys)  # the same upstream still refuses those keys
            if old.config != provider.config:
                continue
            if hasattr(provider, "binary_path"):
                if all(getattr(old, a, None) == getattr(provider, a, None) for a in _CLI_RUN_SETTINGS):
                    self.providers[name] = old
                    self.kept.append(name)
            else:
                provider.last_result = old.last_result
        self.router = Router(config, self.providers)

    def http_origins(self) -> set:
        """The pool keys of every origin an HTTP provider of this state reaches."""
        return {p.target.key for p in self.providers.values() if isinstance(p, HttpProvider)}

    def model_ids(self, listed: Mapping[str, list[str]]) -> list[tuple[str, str]]:
        """(provider, provider:model) for every model of every enabled provider, in file order: its
        configured `models`, else what `listed` (the upstreams' own lists) holds for it."""
        return [(p.name, f"{p.name}:{m}") for p in self.config.providers if p.enabled
                for m in (p.models or listed.get(p.name, ()))]


class Metrics:
    """Counters and histograms for /metrics, kept as plain dicts (rendered on demand)."""

    BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list] = {}  # (metric, provider) → [bucket counts…, sum, count]
        self.open_connections = 0
        self.open_streams = 0
        self.reloads = {"ok": 0, "failed": 0}

    def observe(self, route: str, provider: str, status: int, duration_s: float, ttfb_s: float | None) -> None:
        key = (route, provider, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self._hist("request_duration_seconds", provider, duration_s)
        if ttfb_s is not None:
            self._hist("upstream_ttfb_seconds", provider, ttfb_s)

    def _hist(self, name: str, provider: str, value: float) -> None:
        # One bucket count per observation (made cumulative when rendered), then sum and count.
        h = self.latency.get((name, provider))
        if h is None:
            h = self.latency[(name, provider)] = [0] * (len(self.BUCKETS_S) + 3)
        h[bisect.bisect_left(self.BUCKETS_S, value)] += 1
        h[-2] += value
        h[-1] += 1


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Gateway:
    """Routes requests to providers and answers in the client's dialect."""

    def __init__(self, config: Config, environ: dict | None = None) -> None:
        import providers.translate as translate  # pure functions; loaded with the first gateway

        self.tr = translate
        self.environ = os.environ if environ is None else environ
        self.pool = UpstreamPool()
        self.state = GatewayState(config, self.pool, self.environ)
        self.metrics = Metrics()
        self.draining = False
        self.auth: Any = None  # a KeyStore when gateway API keys are on
        self.worker_id = ""
        self.metrics_dir: str | None = None  # with --workers: where each worker leaves its metrics
        self._probes: tuple | None = None  # (state, task, started) of the latest probe round
        self._model_lists: tuple | None = None  # (state, task, started) of the latest model-list round

    def authenticate(self, headers: dict[str, str]) -> str:
        """The name of the gateway key the client presented; 401 in its dialect if there is none."""
        store = self.auth
        name = store.authenticate(headers)
        if name is None:
            if store.is_empty and store.problem:
                message = ("gateway API keys are required (EVO_GATEWAY_AUTH is on) but the keys file is unusable "
                           f"({store.problem}); fix or remove it, then create a key with: {store.missing_keys_hint()}")
            elif store.is_empty:
                message = ("gateway API keys are required (EVO_GATEWAY_AUTH is on) but none exists yet; "
                           f"create one with: {store.missing_keys_hint()}")
            else:
                message = ("missing or invalid gateway API key: send it as 'Authorization: Bearer <key>' "
                           "or 'x-api-key: <key>'")
            raise GatewayError(401, message, "authentication", code="invalid_api_key",
                               headers=[("www-authenticate", "Bearer")])
        return name

    # -- reload ---------------------------------------------------------------------------

    def reload(self, path: str) -> bool:
        """Swap in a new config if it is valid; keep the running one and log why if not.

        The swap is one assignment: requests that already resolved their provider finish on
        it, new ones use the new state. Old providers are not closed — a request in flight
        may still be using one; what they hold is released as those requests end (pooled
        connections to origins no provider uses any more are closed now, busy ones when they
        come back). Key variables are re-read from the environment.
        """
        try:
            config = load_config(path, create=False)
            state = GatewayState(config, self.pool, self.environ, previous=self.state)
        except (ConfigError, OSError) as e:
            self.metrics.reloads["failed"] += 1
            log.error("config reload failed, keeping the running config: %s", e)
            return False
        except Exception as e:  # a provider that fails to build must not take the server down
            self.metrics.reloads["failed"] += 1
            log.exception("config reload failed, keeping the running config: %s: %s", type(e).__name__, e)
            return False
        old, self.state = self.state, state
        self.metrics.reloads["ok"] += 1
        self._probes = self._model_lists = None
        self.pool.retain_origins(state.http_origins())
        for w in config.warnings:
            log.warning("%s", w)
        added = sorted(set(state.providers) - set(old.providers))
        removed = sorted(set(old.providers) - set(state.providers))
        log.info("config reloaded from %s (%d providers enabled%s%s%s)", path, len(state.providers),
                 f"; added: {', '.join(added)}" if added else "", f"; removed: {', '.join(removed)}" if removed else "",
                 f"; kept running: {', '.join(state.kept)}" if state.kept else "")
        return True

    # -- dispatch -------------------------------------------------------------------------

    async def handle_get(self, kind: str, ctx: RequestContext, path: str) -> Reply:
        if kind == "health":
            return await self.health()
        if kind == "models":
            return self.models(ctx, await self.upstream_model_lists())
        if kind == "model":
            return self.model(ctx, percent_decoded(path[len(MODEL_ROUTE_PREFIX):]), await self.upstream_model_lists())
        if kind == "tags":
            ids = self.state.model_ids(await self.upstream_model_lists())
            return json_reply({"models": [self.tr.ollama_tags_entry(mid) for _, mid in ids]})
        if kind == "version":
            return json_reply({"version": "0.12.0"})
        if kind == "running":  # no model is "loaded" in a gateway
            return json_reply({"models": []})
        if kind == "root":
            return Reply(200, [(b"content-type", b"text/plain; charset=utf-8")], b"Ollama is running\n")
        if kind == "metrics":
            return Reply(200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
                         self.render_metrics().encode())
        raise GatewayError(404, "not found", "not_found")

    async def handle_post(self, kind: str, dialect: str, raw: bytes, ctx: RequestContext) -> Reply:
        """Parse, validate, route and answer one POST; errors raised here are rendered by the caller."""
        try:
            body = _REQUEST_JSON(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise GatewayError(400, f"the request body is not UTF-8 ({e.reason} at byte {e.start})",
                               "invalid_request") from None
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than JSON needs
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise GatewayError(400, f"the request body is not valid JSON ({reason})", "invalid_request") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object", "invalid_request")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "'model' is required: a string such as \"provider:model\"", "invalid_request",
                               param="model")
        for field, ftype, what in REQUIRED_FIELDS[kind]:
            value = body.get(field)
            if not isinstance(value, ftype) or isinstance(value, bool):
                state = "missing" if value is None else "invalid"
                raise GatewayError(400, f"'{field}' is {state}: it must be {what}", "invalid_request", param=field)
        provider, upstream_model = self.state.router.resolve(model)
        ctx.provider = provider.name
        ctx.model = upstream_model
        body["model"] = upstream_model
        stream = body.get("stream") is not False if kind in ("ollama_chat", "ollama_generate") \
            else body.get("stream") is True
        ctx.stream = stream
        if kind in provider.native_kinds:
            reply = await provider.forward(kind, body, ctx)
            if isinstance(reply.body, bytes):
                if reply.status < 300 and log.isEnabledFor(logging.INFO):  # only the log line wants it
                    _note_usage(ctx, usage_in(reply.body))
                return reply
            reply.relayed = True
            if kind == "responses" and reply.sse:
                relay = ResponsesRelay(ctx.model)
                reply.body = self._relay_responses(reply.body, relay, ctx)
                reply.error_frame = functools.partial(stream_error_frame, kind, relay=relay)
            else:
                reply.error_frame = functools.partial(stream_error_frame, kind)
                if reply.sse or kind in OLLAMA_KINDS:  # not an upstream answering a stream request with JSON
                    reply.end_mark = RELAYED_STREAM_END.get(kind)
            return reply
        return await self._bridge(kind, provider, body, model, stream, ctx)

    @staticmethod
    async def _relay_responses(chunks: AsyncIterator[bytes], relay: ResponsesRelay,
                               ctx: RequestContext) -> AsyncIterator[bytes]:
        """A relayed Responses stream, in whole events, that never just stops."""
        try:
            async for chunk in chunks:
                ready = relay.feed(chunk)
                if ready:
                    yield ready
            rest = relay.held()
            if rest and relay.is_finished:
                yield rest
            if not relay.is_finished:  # the client is owed a terminal event
                raise GatewayError(502, f"provider '{ctx.provider}' ended the stream before "
                                        "response.completed", "upstream")
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _bridge(self, kind: str, provider: Provider, body: dict, client_model: str, stream: bool,
                      ctx: RequestContext) -> Reply:
        """Answer `kind` through the provider's chat (the hub), translating both ways."""
        tr = self.tr
        started_ns = time.monotonic_ns()  # the Ollama translators time durations on the monotonic clock
        if kind == "count_tokens":
            return json_reply({"input_tokens": tr.estimate_anthropic_tokens(body)})
        if kind == "ollama_show":
            return json_reply(tr.ollama_show_response(client_model, provider.config.provider_type))
        if kind in ("ollama_chat", "ollama_generate") and tr.ollama_load_request(body, kind == "ollama_generate"):
            return json_reply(tr.ollama_load_response(body, client_model, kind == "ollama_generate"))
        if kind in ("embeddings", "ollama_embed", "ollama_embeddings") and "embeddings" not in provider.native_kinds:
            raise GatewayError(400, f"provider '{provider.name}' ({provider.config.provider_type}) has no "
                                    "embeddings endpoint; route this model to an OpenAI-compatible or Ollama provider",
                               "invalid_request")
        if kind in ("ollama_embed", "ollama_embeddings"):
            try:
                request = tr.ollama_embed_to_embeddings_request(body)
            except tr.InvalidRequest as e:
                raise GatewayError(400, str(e), "invalid_request", param=e.param) from None
            result = await provider.request_json("embeddings", request, ctx)
            try:
                if kind == "ollama_embeddings":
                    return json_reply(tr.embeddings_to_ollama_legacy_response(result))
                return json_reply(tr.embeddings_to_ollama_embed_response(result, client_model))
            except (ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as e:
                raise GatewayError(502, f"provider '{provider.name}' sent an embeddings answer the gateway "
                                        f"cannot read ({e})", "upstream") from None
        try:
            if kind == "chat":
                chat_body = body
                if stream:
                    chat_body = dict(body, stream_options={"include_usage": True})
            elif kind == "messages":
                chat_body = tr.anthropic_to_chat_request(body)
            elif kind == "responses":
                chat_body = tr.responses_to_chat_request(body)
            elif kind == "ollama_chat":
                chat_body = tr.ollama_chat_to_chat_request(body)
            else:
                chat_body = tr.ollama_generate_to_chat_request(body)
        except tr.InvalidRequest as e:
            raise GatewayError(400, str(e), "invalid_request", param=e.param) from None
        chat_body["model"] = body["model"]
        chat_body["stream"] = stream
        result = await provider.chat(chat_body, ctx)
        if not stream:
            if not isinstance(result, dict):
                raise GatewayError(502, f"provider '{provider.name}' streamed an answer to a non-stream request")
            _note_usage(ctx, result.get("usage"))
            if kind == "chat":
                return json_reply(result)
            try:
                if kind == "messages":
                    return json_reply(tr.chat_to_anthropic_response(result, client_model,
                                                                    tool_names=tr.anthropic_tool_name_map(body)))
                if kind == "responses":
                    return json_reply(tr.chat_to_responses_response(result, dict(body, model=client_model)))
                if kind == "ollama_chat":
                    return json_reply(tr.chat_to_ollama_chat_response(result, client_model, started_ns))
                return json_reply(tr.chat_to_ollama_generate_response(result, client_model, started_ns))
            except (TypeError, AttributeError, KeyError, IndexError, ValueError, ArithmeticError, RecursionError) as e:
                # The translators read upstream answers leniently; one they still cannot read is
                # the upstream's fault as far as the client can tell (logged in full for us).
                log.exception("translating %s's answer failed", provider.name)
                raise GatewayError(502, f"provider '{provider.name}' sent an answer the gateway cannot translate "
                                        f"({type(e).__name__}: {e})", "upstream") from None
        if isinstance(result, dict):
            result = _completion_as_chunks(result)
        if kind == "chat":
            options = body.get("stream_options")
            translator: Any = ChatStream(isinstance(options, dict) and options.get("include_usage") is True)
            headers = SSE_HEADERS
        elif kind == "messages":
            translator = tr.ChatToAnthropicStream(client_model, input_tokens=tr.estimate_anthropic_tokens(body),
                                                  tool_names=tr.anthropic_tool_name_map(body))
            headers = SSE_HEADERS
        elif kind == "responses":
            translator = tr.ChatToResponsesStream(dict(body, model=client_model))
            headers = SSE_HEADERS
        else:
            translator = tr.ChatToOllamaStream(client_model, kind == "ollama_generate", started_ns)
            headers = NDJSON_HEADERS
        reply = Reply(200, headers, self._translate_stream(result, translator, ctx), sse=headers is SSE_HEADERS)
        # A stream cut by the server (shutdown past its grace) ends with the translator's own error event.
        reply.error_frame = lambda err: b"".join(translator.fail(err.message))
        return reply

    async def _translate_stream(self, chunks: AsyncIterator[dict], translator: Any,
                                ctx: RequestContext) -> AsyncIterator[bytes]:
        # A translator with `keepalive()` answers a quiet upstream with a real event of its
        # dialect: Codex's idle timer is reset by events, not by the SSE comments the server sends.
        keepalive = getattr(translator, "keepalive", None)
        source = chunks if keepalive is None else _with_quiet_marks(chunks, SSE_KEEPALIVE_S)
        try:
            async for chunk in source:
                if chunk is _QUIET:
                    for frame in keepalive():
                        yield frame
                    continue
                if chunk.get("usage"):
                    _note_usage(ctx, chunk["usage"])
                for frame in translator.feed(chunk):
                    yield frame
            for frame in translator.finish():
                yield frame
        except GatewayError as e:
            ctx.note(stream_error=e.message)
            log.warning("upstream failed mid-stream: %s", e.message)
            for frame in translator.fail(e.message):
                yield frame
        except Exception as e:  # a translator bug must end the stream cleanly, not cut it
            if isinstance(e, asyncio.CancelledError):
                raise
            log.exception("stream translation failed")
            for frame in translator.fail(f"gateway error while translating the stream: {type(e).__name__}"):
                yield frame
        finally:
            if source is not chunks:
                await source.aclose()  # first: it may be waiting on `chunks`
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- informational routes ---------------------------------------------------------------

    async def health(self) -> Reply:
        """`{"status": "ok"|"degraded"|"draining", "providers": [...]}`; 503 only while draining.

        Each enabled provider carries its key count (never a key), its last upstream result
        from real traffic and the result of an active probe (shared and cached, see
        `probe_all`); "degraded" means some enabled provider failed its probe.
        """
        state = self.state
        probes = {} if self.draining else await self.probe_all()
        providers = []
        for p in state.config.providers:
            entry: dict[str, Any] = {"name": p.name, "type": p.provider_type, "enabled": p.enabled}
            provider = state.providers.get(p.name)
            if provider is not None:
                entry["keys"] = provider.key_count()
                binary_path = getattr(provider, "binary_path", None)
                if binary_path is not None:  # a CLI provider: is its tool there? (never run for this)
                    entry["binary"] = binary_path()
                    entry["ok"] = entry["binary"] is not None
                if provider.last_result is not None:
                    ok, detail, latency_ms, when = provider.last_result
                    entry["last_upstream"] = {"ok": ok, "result": detail, "latency_ms": latency_ms,
                                              "seconds_ago": round(time.time() - when, 1)}
                if p.name in probes:
                    entry["probe"] = probes[p.name]
            providers.append(entry)
        if self.draining:
            status = "draining"
        else:
            status = "degraded" if any(not r["ok"] for r in probes.values()) else "ok"
        return json_reply({"status": status, "providers": providers}, 503 if self.draining else 200)

    async def probe_all(self) -> dict[str, dict]:
        """Probe every enabled provider concurrently; one round serves every caller for PROBE_CACHE_S.

        Concurrent callers share the round in progress, so /health can never multiply the
        load on an upstream; a caller that goes away does not cancel the round for the others.
        """
        now = time.monotonic()
        cached = self._probes
        if cached is not None and cached[0] is self.state and (
                not cached[1].done() or now - cached[2] < PROBE_CACHE_S):
            task = cached[1]
        else:
            task = asyncio.ensure_future(probe_providers(self.state.providers.values()))
            self._probes = (self.state, task, now)
        return await asyncio.shield(task)

    async def upstream_model_lists(self) -> dict[str, list[str]]:
        """provider → the models its upstream lists, for enabled providers configured without `models`.

        One round asks them all concurrently (each bounded by PROBE_TIMEOUT_S) and answers every
        caller for MODEL_LIST_CACHE_S, like the /health probes; a provider that cannot answer
        lists nothing (logged) and is asked again in the next round.
        """
        state = self.state
        unlisted = [state.providers[p.name] for p in state.config.providers
                    if p.enabled and not p.models and p.name in state.providers]
        if not unlisted:
            return {}
        now = time.monotonic()
        cached = self._model_lists
        if cached is not None and cached[0] is state and (
                not cached[1].done() or now - cached[2] < MODEL_LIST_CACHE_S):
            task = cached[1]
        else:
            task = asyncio.ensure_future(list_upstream_models(unlisted))
            self._model_lists = (state, task, now)
        return await asyncio.shield(task)

    def models(self, ctx: RequestContext, listed: Mapping[str, list[str]]) -> Reply:
        return self._model_list(ctx, self.state.model_ids(listed))

    @staticmethod
    def _model_list(ctx: RequestContext, ids: list[tuple[str, str]]) -> Reply:
        if "anthropic-version" in ctx.headers:
            data = [_anthropic_model(mid) for _, mid in ids]
            return json_reply({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                               "last_id": data[-1]["id"] if data else None})
        return json_reply({"object": "list", "data": [_openai_model(name, mid) for name, mid in ids]})

    def model(self, ctx: RequestContext, wanted: str, listed: Mapping[str, list[str]]) -> Reply:
        """`GET /v1/models/{id}`: the model `provider:model` as one object; a provider's name lists its models."""
        ids = self.state.model_ids(listed)
        for name, mid in ids:
            if mid == wanted:
                return json_reply(_anthropic_model(mid) if "anthropic-version" in ctx.headers
                                  else _openai_model(name, mid))
        config = self.state.config
        provider = next((p for p in config.providers if p.name == wanted), None)
        if provider is not None:
            if not provider.enabled:
                raise GatewayError(503, f"provider '{wanted}' is disabled; set \"enabled\": true for it in "
                                        f"{config.path} to use it", "unavailable")
            return self._model_list(ctx, [(name, mid) for name, mid in ids if name == wanted])
        raise GatewayError(404, f"model '{wanted}' is not in this gateway's model list; GET /v1/models lists "
                                "the models as provider:model", "not_found", code="model_not_found")

    def metrics_snapshot(self) -> dict[str, Any]:
        """This process's metrics as plain JSON data (what `render_metrics_text` renders)."""
        m = self.metrics
        providers = sorted(self.state.providers.items())
        return {
            "worker": self.worker_id, "time": time.time(), "pid": os.getpid(),
            "requests": [[r, p, s, n] for (r, p, s), n in sorted(m.requests.items())],
            "latency": [[name, p, list(h)] for (name, p), h in sorted(m.latency.items())],
            "open_connections": m.open_connections, "open_streams": m.open_streams,
            "pool": [[o, i, a] for o, (i, a) in sorted(self.pool.stats().items())],
            "cooldowns": [[n, p.keys.cooling_count()] for n, p in providers if isinstance(getattr(p, "keys", None),
                                                                                         KeyPool)],
            "cli": [[n, p.running] for n, p in providers if isinstance(getattr(p, "running", None), int)],
            "reloads": dict(m.reloads),
        }

    def write_metrics_snapshot(self) -> None:
        """With --workers: leave this worker's snapshot where the other workers' /metrics read it."""
        if not self.metrics_dir:
            return
        name = os.path.join(self.metrics_dir, f"worker-{self.worker_id}.json")
        tmp = f"{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.metrics_snapshot(), f)
            os.replace(tmp, name)
        except OSError as e:
            log.debug("cannot write the metrics snapshot %s: %s", name, e)

    def _peer_snapshots(self) -> list[dict]:
        if not self.metrics_dir:
            return []
        out = []
        now = time.time()
        try:
            names = sorted(os.listdir(self.metrics_dir))
        except OSError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.metrics_dir, name), encoding="utf-8") as f:
                    snap = json.load(f)
            except (OSError, ValueError):
                continue
            fresh = now - snap.get("time", 0) < METRICS_STALE_S if isinstance(snap, dict) else False
            if fresh and snap.get("pid") != os.getpid():
                out.append(snap)
        return out

    def render_metrics(self) -> str:
        """Prometheus text for this process, plus (with --workers) every other live worker's last snapshot."""
        return render_metrics_text([self.metrics_snapshot()] + self._peer_snapshots())


def render_metrics_text(snapshots: list[dict]) -> str:
    """Prometheus text exposition (0.0.4) of one or more `metrics_snapshot()`s, each family once.

    Series carry a `worker` label when the snapshot comes from a worker of `serve --workers`.
    """
    def wl(snap: dict) -> str:
        return f'worker="{_label(snap["worker"])}",' if snap.get("worker") else ""

    def bare(snap: dict) -> str:
        w = wl(snap)
        return f"{{{w[:-1]}}}" if w else ""

    out = ["# HELP evo_gateway_requests_total Requests answered, by route, provider and status.",
           "# TYPE evo_gateway_requests_total counter"]
    for snap in snapshots:
        for route, provider, status, n in snap["requests"]:
            out.append(f'evo_gateway_requests_total{{{wl(snap)}route="{_label(route)}",'
                       f'provider="{_label(provider)}",status="{status}"}} {n}')
    for name, help_text in (("request_duration_seconds", "Time from request head to the last response byte."),
                            ("upstream_ttfb_seconds", "Time from sending upstream to its response head.")):
        out.append(f"# HELP evo_gateway_{name} {help_text}")
        out.append(f"# TYPE evo_gateway_{name} histogram")
        for snap in snapshots:
            for metric, provider, h in snap["latency"]:
                if metric != name:
                    continue
                lbl = f'{wl(snap)}provider="{_label(provider)}"'
                cumulative = 0
                for bound, count in zip(Metrics.BUCKETS_S, h):
                    cumulative += count
                    out.append(f'evo_gateway_{name}_bucket{{{lbl},le="{bound}"}} {cumulative}')
                out.append(f'evo_gateway_{name}_bucket{{{lbl},le="+Inf"}} {h[-1]}')
                out.append(f"evo_gateway_{name}_sum{{{lbl}}} {h[-2]:.6f}")
                out.append(f"evo_gateway_{name}_count{{{lbl}}} {h[-1]}")
    out += ["# HELP evo_gateway_open_connections Client connections open.",
            "# TYPE evo_gateway_open_connections gauge"]
    out += [f"evo_gateway_open_connections{bare(snap)} {snap['open_connections']}" for snap in snapshots]
    out += ["# HELP evo_gateway_open_streams Streamed responses in progress.",
            "# TYPE evo_gateway_open_streams gauge"]
    out += [f"evo_gateway_open_streams{bare(snap)} {snap['open_streams']}" for snap in snapshots]
    out += ["# HELP evo_gateway_upstream_connections Upstream connections by origin and state.",
            "# TYPE evo_gateway_upstream_connections gauge"]
    for snap in snapshots:
        for origin, idle, active in snap["pool"]:
            out.append(f'evo_gateway_upstream_connections{{{wl(snap)}origin="{_label(origin)}",state="idle"}} {idle}')
            out.append(f'evo_gateway_upstream_connections{{{wl(snap)}origin="{_label(origin)}",state="active"}} '
                       f'{active}')
    out += ["# HELP evo_gateway_key_cooldowns Upstream keys set aside after a refusal.",
            "# TYPE evo_gateway_key_cooldowns gauge"]
    for snap in snapshots:
        for name, n in snap["cooldowns"]:
            out.append(f'evo_gateway_key_cooldowns{{{wl(snap)}provider="{_label(name)}"}} {n}')
    out += ["# HELP evo_gateway_cli_processes CLI tool processes running.",
            "# TYPE evo_gateway_cli_processes gauge"]
    for snap in snapshots:
        for name, n in snap["cli"]:
            out.append(f'evo_gateway_cli_processes{{{wl(snap)}provider="{_label(name)}"}} {n}')
    out += ["# HELP evo_gateway_config_reloads_total Config reloads by result.",
            "# TYPE evo_gateway_config_reloads_total counter"]
    for snap in snapshots:
        for result, n in sorted(snap["reloads"].items()):
            out.append(f'evo_gateway_config_reloads_total{{{wl(snap)}result="{result}"}} {n}')
    return "\n".join(out) + "\n"


async def probe_provider(provider: Provider, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """One active check of one provider, bounded by `timeout_s`; never raises.

    HTTP providers: a GET on their model list (Ollama: /api/version). CLI providers: the
    binary looked up on PATH, never run. The result: {"ok", "detail", "latency_ms"} and, for
    CLI providers, "binary" (its path or null).
    """
    t0 = time.monotonic()
    finder = getattr(provider, "binary_path", None)
    if finder is not None:
        path = finder()
        detail = f"found {path}" if path else (f"binary '{getattr(provider, 'binary', '?')}' not found on PATH"
                                              f" (set {getattr(provider, 'binary_env', 'its _BINARY variable')})")
        return {"ok": path is not None, "detail": detail, "binary": path, "latency_ms": 0.0}
    try:
        result = await asyncio.wait_for(provider.probe(), timeout_s)
    except asyncio.TimeoutError:
        result = {"ok": False, "detail": f"provider '{provider.name}': no answer within {timeout_s:g} s"}
    except GatewayError as e:
        result = {"ok": False, "detail": e.message}
    except Exception as e:
        result = {"ok": False, "detail": f"probe failed: {type(e).__name__}: {e}"}
    result["latency_ms"] = round((time.monotonic() - t0) * 1000, 1)
    return result


async def probe_providers(providers: Iterable[Provider], timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, dict]:
    """`probe_provider` for each, all at once: name → result."""
    providers = list(providers)
    results = await asyncio.gather(*(probe_provider(p, timeout_s) for p in providers))
    return {p.name: r for p, r in zip(providers, results)}


async def list_upstream_models(providers: Iterable[Provider],
                               timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, list[str]]:
    """Each provider's `list_models()`, all at once, each bounded by `timeout_s`; never raises."""
    async def one(provider: Provider) -> list[str]:
        try:
            return await asyncio.wait_for(provider.list_models(), timeout_s)
        except asyncio.TimeoutError:
            why = f"no answer within {timeout_s:g} s"
        except GatewayError as e:
            why = e.message
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        log.warning("provider '%s' has no `models` in the config and its model list could not be read (%s); "
                    "it lists no models", provider.name, why)
        return []
    providers = list(providers)
    lists = await asyncio.gather(*(one(p) for p in providers))
    return {p.name: names for p, names in zip(providers, lists)}


def key_variables(config: ProviderConfig, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(variable, "set" | "empty" | "missing") for each of `api_key_envs`; never the values."""
    environ = os.environ if environ is None else environ
    out = []
    for name in config.api_key_envs:
        value = environ.get(name)
        out.append((name, "missing" if value is None else "set" if value.strip() else "empty"))
    return out


async def check_providers(config: Config, environ: dict | None = None,
                          timeout_s: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]]:
    """What `evo-gateway check` reports: per provider, its key variables, one probe and a verdict.

    `usable` is None for a disabled provider, else whether requests routed to it can work: at
    least one key variable set (when it names any) and the probe passed.
    """
    import providers as registry

    environ = os.environ if environ is None else environ
    pool = UpstreamPool()
    built: dict[str, Provider] = {}
    errors: dict[str, str] = {}
    for pc in config.providers:
        if pc.enabled:
            try:
                built[pc.name] = registry.create(pc, pool, environ)
            except Exception as e:  # e.g. an unreadable ca_file
                errors[pc.name] = f"cannot be set up: {type(e).__name__}: {e}"
    try:
        probes = await probe_providers(built.values(), timeout_s)
    finally:
        pool.close_all()
    rows = []
    for pc in config.providers:
        keys = key_variables(pc, environ)
        row: dict[str, Any] = {"name": pc.name, "type": pc.provider_type, "enabled": pc.enabled, "keys": keys,
                               "probe": probes.get(pc.name)}
        if not pc.enabled:
            row.update(usable=None, verdict="disabled", detail="")
        elif pc.name in errors:
            row.update(usable=False, verdict="UNUSABLE", detail=errors[pc.name])
        elif keys and not any(state == "set" for _, state in keys):
            names = ", ".join(f"{n} is {'not set' if st == 'missing' else 'empty'}" for n, st in keys)
            row.update(usable=False, verdict="NO KEY", detail=f"{names}; probe: {probes[pc.name]['detail']}")
        elif not probes[pc.name]["ok"]:
            row.update(usable=False, verdict="UNUSABLE", detail=probes[pc.name]["detail"])
        else:
            row.update(usable=True, verdict="OK", detail=f"{probes[pc.name]['detail']} "
                                                          f"({probes[pc.name]['latency_ms']:g} ms)")
        rows.append(row)
    return rows


def _note_usage(ctx: RequestContext, usage: Any) -> None:
    """Put token usage on the request's log line: OpenAI chat's counts, or Anthropic's and the
    Responses API's (`input_tokens`/`output_tokens`, which an Anthropic stream gives in two
    events: input in message_start, output in message_delta) as prompt/completion tokens."""
    if not isinstance(usage, dict):
        return
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        ctx.note(usage={k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage})
        return
    noted = dict(ctx.log.get("usage") or {})
    if "input_tokens" in usage:
        noted["prompt_tokens"] = sum(_count(usage.get(k)) for k in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    if "output_tokens" in usage:
        noted["completion_tokens"] = _count(usage["output_tokens"])
    if noted:
        noted["total_tokens"] = noted.get("prompt_tokens", 0) + noted.get("completion_tokens", 0)
        ctx.note(usage=noted)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


_USAGE_KEY = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_RAW_JSON = json.JSONDecoder().raw_decode


# Relayed answers are not parsed (their bytes go out as they came): these find the objects the
# request log wants without parsing the rest.


def usage_in(body: bytes) -> dict | None:
    """The last `"usage": {…}` object in a relayed answer (its only one), or None."""
    at = body.rfind(_USAGE_KEY)
    while at >= 0:
        found = _USAGE_OBJECT.match(body, at)
        if found:
            return _object_at(body, found.end() - 1)
        at = body.rfind(_USAGE_KEY, 0, at)
    return None


def note_stream_usage(ctx: RequestContext, chunk: bytes) -> None:
    """Note every `"usage": {…}` of a relayed stream chunk, in order (an Anthropic stream gives
    input tokens in one event and output tokens in a later one; a burst may hold both). An
    OpenAI chunk's `"usage":null` is skipped; a usage object split across chunks is missed."""
    for found in _USAGE_OBJECT.finditer(chunk):
        _note_usage(ctx, _object_at(chunk, found.end() - 1))


def _object_at(data: bytes, start: int) -> dict | None:
    try:
        obj, _ = _RAW_JSON(data[start:].decode("utf-8", "replace"))
    except BAD_JSON:
        return None
    return obj if isinstance(obj, dict) else None


_QUIET = object()  # what `_with_quiet_marks` yields for a stretch of silence


async def _with_quiet_marks(source: AsyncIterator[Any], every_s: float) -> AsyncIterator[Any]:
    """`source`'s items, and `_QUIET` each time it has given nothing for `every_s` seconds.

    The read in progress is never cut by the wait (a timeout around it would cancel the
    upstream mid-read); it is cancelled, and waited for, only when this iterator is closed early.
    """
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait((pending,), timeout=every_s)
            if not done:
                yield _QUIET
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait((pending,))


async def _completion_as_chunks(resp: dict) -> AsyncIterator[dict]:
    """A whole chat.completion replayed as chunks, for providers that answered a stream at once."""
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    base = {"id": resp.get("id", "chatcmpl-gateway"), "object": "chat.completion.chunk",
            "created": resp.get("created", int(time.time())), "model": resp.get("model", "")}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(message["tool_calls"])]
    yield dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}])
    yield dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}])
    if resp.get("usage"):
        yield dict(base, choices=[], usage=resp["usage"])


# =============================================================================================
# server: one asyncio.Protocol per connection feeding h11, one task pulling its events
# =============================================================================================
#
# Theory of operation. `data_received` feeds bytes into the h11 state machine and wakes the
# connection's task; the task pulls events (`next_event()` until NEED_DATA), reads a request
# head, decides from the head alone what it can (route, method, auth, size), then the body,
# then writes the reply — all bytes h11 produces for a step go out in one `write`. A client
# that disconnects (EOF or a lost connection) while a request is in flight cancels the task,
# and the cancellation closes the upstream connection or kills the CLI process on its way
# out. Deadlines (head, keep-alive idle) and SSE keep-alives are checked by one periodic
# ticker for all connections instead of a timer per request.

_STATUS_PHRASES = {code: phrase.encode() for code, phrase in (
    (100, "Continue"), (200, "OK"), (201, "Created"), (204, "No Content"), (400, "Bad Request"),
    (401, "Unauthorized"), (403, "Forbidden"), (404, "Not Found"), (405, "Method Not Allowed"),
    (408, "Request Timeout"), (409, "Conflict"), (413, "Content Too Large"), (415, "Unsupported Media Type"),
    (422, "Unprocessable Content"), (429, "Too Many Requests"), (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"), (501, "Not Implemented"), (502, "Bad Gateway"), (503, "Service Unavailable"),
    (504, "Gateway Timeout"), (529, "Overloaded"))}


class HttpConnection(asyncio.Protocol):
    """One client connection: h11 in server role, pipelined requests answered in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.gateway = server.gateway
        limits = server.limits
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self._data_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._write_paused = False
        self._read_paused = False
        self.closed = False
        self.handling = False  # a request is in flight (client gone → cancel it)
        self.deadline: float | None = None
        self.requests_served = 0
        self.streaming_sse = False
        self.bytes_in = 0
        self.pending_head = b""
        self.stream_last_write = 0.0
        self.stream_at_boundary = True

    # -- asyncio.Protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        self.server.connections.add(self)
        self.gateway.metrics.open_connections += 1
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            self.conn.receive_data(data)
        except RuntimeError:  # data after EOF: nothing more is read from this connection
            return
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif not self._read_paused and len(self.conn.trailing_data[0]) > self.limits.max_head_bytes:
            # Pipelined bytes pile up while a request is handled: stop reading until needed.
            self._read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        try:
            self.conn.receive_data(b"")
        except RuntimeError:
            pass
        if self.handling and self.task is not None:
            self.task.cancel()  # the client went away mid-request: stop the upstream work now
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.connections.discard(self)
        self.gateway.metrics.open_connections -= 1
        if self.handling and self.task is not None and not self.task.done():
            self.task.cancel()
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- helpers -----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_for_data(self) -> None:
        if self.closed:
            raise ConnectionError("client connection closed")
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._data_waiter = self.loop.create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    async def _wait_for_body_data(self) -> None:
        """Wait for more of a request body; a client silent for head_timeout_s gets a 408 and is dropped."""
        self.deadline = time.monotonic() + self.limits.head_timeout_s
        try:
            await self._wait_for_data()
        except _ClientTooSlow:
            raise _CloseAfter(GatewayError(408, f"the request body stopped arriving for "
                                                f"{self.limits.head_timeout_s:g}s (server.head_timeout_s)")) from None
        finally:
            self.deadline = None

    def on_deadline(self) -> None:
        """The ticker's call once `deadline` has passed: a client that started a request and went
        quiet is told so (408) by the task waiting for it; an idle keep-alive is just closed."""
        self.deadline = None
        waiter = self._data_waiter
        if self.bytes_in and waiter is not None and not waiter.done():
            waiter.set_exception(_ClientTooSlow())
        else:
            self.abort()

    async def _drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise ConnectionError("client connection closed")

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- the connection loop -----------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self.closed:
                request = await self._read_request_head()
                if request is None:
                    break
                self.handling = True
                try:
                    await self._respond(request)
                finally:
                    self.handling = False
                self.requests_served += 1
                if self.server.draining or self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    break
                self.conn.start_next_cycle()
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self.close()

    async def _read_request_head(self) -> h11.Request | None:
        buffered, eof = self.conn.trailing_data
        limits = self.limits
        idle = self.requests_served > 0 and not buffered
        self.deadline = time.monotonic() + (limits.keep_alive_s if idle else limits.head_timeout_s)
        self.bytes_in = len(buffered)  # counts toward this head from here on
        must_wait = not buffered and not eof  # next_event() could only answer NEED_DATA
        try:
            while True:
                if must_wait:
                    if self.server.draining and idle:
                        return None
                    try:
                        await self._wait_for_data()
                    except _ClientTooSlow:
                        await self._send_early_error(408, "the request head did not arrive whole within "
                                                          f"{limits.head_timeout_s:g}s (server.head_timeout_s)",
                                                     "openai")
                        return None
                    if idle and self.bytes_in:
                        idle = False  # the first bytes of a head: its deadline starts now
                        self.deadline = time.monotonic() + limits.head_timeout_s
                try:
                    event = self.conn.next_event()
                except h11.RemoteProtocolError as e:
                    status = e.error_status_hint
                    message = ("the request head is larger than the limit of "
                               f"{limits.max_head_bytes} bytes" if status == 431 else f"malformed request: {e}")
                    await self._send_early_error(status, message, "openai")
                    return None
                must_wait = event is h11.NEED_DATA
                if must_wait:
                    continue
                if type(event) is h11.Request:
                    # h11 enforces the limit only on a head still incomplete; one that arrived
                    # whole is measured here, when enough bytes came in for it to be too big.
                    if self.bytes_in > limits.max_head_bytes and (
                            len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                            > limits.max_head_bytes):
                        await self._send_early_error(431, "the request head is larger than the limit of "
                                                          f"{limits.max_head_bytes} bytes", "openai")
                        return None
                    return event
                return None  # ConnectionClosed, or PAUSED after a close
        finally:
            self.deadline = None

    async def _send_early_error(self, status: int, message: str, dialect: str) -> None:
        """An error answered before the request was understood; the connection closes after it."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reply = error_reply(dialect, GatewayError(status, message))
        reply.headers.append((b"connection", b"close"))
        ctx = RequestContext(next_request_id(), {})
        ctx.note(error=message)
        try:
            await self._send_reply(reply, ctx.request_id, None)
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:  # one line per request (SPEC §11), this one's method and path unknown
            self._log_request(ctx, "-", "-", status, None)

    async def _respond(self, request: h11.Request) -> None:
        gateway = self.gateway
        request_id = next_request_id()
        target = request.target.decode("latin-1")
        if target[:1] != "/" and "://" in target:  # absolute form (RFC 9112 §3.2.2): its path is what routes
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path = target.split("?", 1)[0]
        method = request.method.decode("latin-1")
        headers = request_headers(request.headers.raw_items())  # a plain list: iterating Headers is slow
        ctx = RequestContext(request_id, headers)
        route = ROUTES.get(path)
        if route is None and path.startswith(MODEL_ROUTE_PREFIX):
            route = MODEL_ROUTE
        dialect = route[2] if route else dialect_for_path(path)
        kind = route[1] if route else ""
        if kind in MODEL_KINDS and "anthropic-version" in headers:
            dialect = "anthropic"  # Claude Code asks for models at the OpenAI paths
        reply: Reply | None = None
        status = 0
        key_name = None
        try:
            if "content-length" in headers and "transfer-encoding" in headers:
                raise _CloseAfter(GatewayError(400, "a request must not carry both Content-Length and "
                                                    "Transfer-Encoding"))
            if route is None:
                raise GatewayError(404, f"no route for {path}; see the README for the routes this gateway serves",
                                   "not_found")
            if method != route[0]:
                allow = "GET, HEAD" if route[0] == "GET" else route[0]
                if not (method == "HEAD" and route[0] == "GET"):
                    dialect = dialect_for_path(path)
                    raise GatewayError(405, f"{path} accepts {route[0]} only", "invalid_request",
                                       headers=[("allow", allow)])
            if gateway.auth is not None and kind not in OPEN_KINDS:
                key_name = gateway.authenticate(headers)
            if route[0] == "POST":
                raw = await self._read_body(headers, expect_json=True)
                reply = await gateway.handle_post(kind, dialect, raw, ctx)
            else:
                await self._read_body(headers, expect_json=False)
                reply = await gateway.handle_get(kind, ctx, path)
        except _CloseAfter as e:
            reply = error_reply(dialect, e.error)
            reply.headers.append((b"connection", b"close"))
        except GatewayError as e:
            reply = error_reply(dialect, e)
            # Refused from its head (404, 405, 401): the body is still on the wire. Read past it
            # to keep the connection; if it cannot be (too big, 100-continue), say it closes.
            if self.conn.their_state is h11.SEND_BODY and not await self._discard_body(headers):
                reply.headers.append((b"connection", b"close"))
        except asyncio.CancelledError:
            if not self.server.stopping or self.closed:
                raise
            # Still running when the shutdown grace ran out: answer in the client's dialect.
            reply = error_reply(dialect, _shutdown_error(self.server))
            reply.headers.append((b"connection", b"close"))
        except Exception:
            log.exception("request %s failed", request_id)
            reply = error_reply(dialect, GatewayError(500, f"internal gateway error (request id {request_id})",
                                                      "internal"))
        status = reply.status
        try:
            await self._send_reply(reply, request_id, ctx, head_only=method == "HEAD")
        finally:
            self._log_request(ctx, method, path, status, key_name)

    async def _discard_body(self, headers: dict[str, str]) -> bool:
        """Read and drop the body of a request refused from its head; True when it was read to its end.

        Closing with the body unread would reset the connection and the client would lose the
        reply, and a reply without `Connection: close` on a connection about to close makes
        clients reuse it. Bounded by `max_body_bytes` and `head_timeout_s` (the ticker aborts a
        slow sender); a client waiting for `100 Continue` sends no body and is not waited for.
        """
        conn = self.conn
        if conn.their_state is not h11.SEND_BODY:
            return True
        length = headers.get("content-length", "")
        budget = self.limits.max_body_bytes
        if conn.they_are_waiting_for_100_continue or (length.isdigit() and int(length) > budget):
            return False
        self.deadline = time.monotonic() + self.limits.head_timeout_s
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    await self._wait_for_data()
                elif type(event) is h11.Data:
                    budget -= len(event.data)
                    if budget < 0:
                        return False
                else:
                    return type(event) is h11.EndOfMessage
        except (h11.RemoteProtocolError, ConnectionError, _ClientTooSlow):
            return False
        finally:
            self.deadline = None

    async def _read_body(self, headers: dict[str, str], expect_json: bool) -> bytes:
        limit = self.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _CloseAfter(GatewayError(400, "invalid Content-Length"))
            if int(length) > limit:
                raise _CloseAfter(GatewayError(413, f"the request body is {length} bytes; the limit is {limit} "
                                                    "(server.max_body_bytes)"))
        ctype = headers.get("content-type", "application/json")
        if ctype != "application/json":  # parsed only when not the plain usual value
            ctype = ctype.split(";", 1)[0].strip().lower()
        if expect_json and ctype != "application/json" and not ctype.endswith("+json"):
            raise _CloseAfter(GatewayError(415, f"the request body must be JSON, sent with Content-Type: "
                                                f"application/json (got {ctype or 'none'})"))
        if self.conn.they_are_waiting_for_100_continue:
            self._write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        parts = []
        size = 0
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    await self._wait_for_body_data()
                    continue
                if type(event) is h11.Data:
                    size += len(event.data)
                    if size > limit:
                        raise _CloseAfter(GatewayError(413, f"the request body is over the limit of {limit} "
                                                            "bytes (server.max_body_bytes)"))
                    parts.append(event.data)
                    continue
                if type(event) is h11.EndOfMessage:
                    return b"".join(parts)
                raise _CloseAfter(GatewayError(400, "the request body ended early"))
        except h11.RemoteProtocolError as e:  # a chunk size that is not hex, a chunk longer than it said…
            raise _CloseAfter(GatewayError(400, f"the request body's HTTP framing is invalid ({e})")) from None

    async def _send_reply(self, reply: Reply, request_id: str, ctx: RequestContext | None,
                          head_only: bool = False) -> None:
        # No Server header: optional (RFC 9110), and h11 spends ~1% of a proxied request per header.
        headers = [(b"date", self.server.date_header), (b"x-request-id", request_id.encode())]
        if self.gateway.worker_id:
            headers.append((b"x-evo-worker", self.gateway.worker_id.encode()))
        headers += reply.headers
        reason = _STATUS_PHRASES.get(reply.status, b"")
        body = reply.body
        if isinstance(body, (bytes, bytearray)):
            # A HEAD answer says the length a GET would get (RFC 9110 §8.6) and sends no body.
            headers.append((b"content-length", str(len(body)).encode()))
            data = self.conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
            if body and not head_only:
                data += self.conn.send(h11.Data(data=body))
            data += self.conn.send(END_OF_MESSAGE)
            self._write(data)
            if self._write_paused:  # a client not reading its answers must not have us read (and buffer) more
                await self._drain()
            return
        metrics = self.gateway.metrics
        metrics.open_streams += 1
        self.streaming_sse = reply.sse
        self.stream_at_boundary = True
        try:
            # The head goes out with the first chunk (one write, not two); the ticker sends it
            # alone if the upstream stays quiet.
            self.pending_head = self.conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
            self.stream_last_write = time.monotonic()
            read_usage = reply.relayed and ctx is not None and log.isEnabledFor(logging.INFO)
            last = b""
            try:
                async for chunk in body:
                    if chunk:
                        if read_usage and _USAGE_KEY in chunk:
                            note_stream_usage(ctx, chunk)
                        await self._write_chunk(chunk)
                        last = chunk
                if reply.end_mark is not None and not last.endswith(_OPENAI_DONE) \
                        and not reply.end_mark.search(last_line(last)):
                    raise GatewayError(502, f"provider '{ctx.provider if ctx else '?'}' ended its stream before "
                                            "the answer was complete (no final event)", "upstream")
            except GatewayError as e:
                if reply.error_frame is None:
                    raise
                if ctx is not None:
                    ctx.note(stream_error=e.message)
                log.warning("upstream failed mid-stream: %s", e.message)
                await self._write_chunk(reply.error_frame(e))
            except asyncio.CancelledError:
                if not self.server.stopping or self.closed or reply.error_frame is None:
                    raise
                # Cut by the shutdown after its grace: a final error event, not a silent cut.
                err = _shutdown_error(self.server)
                if ctx is not None:
                    ctx.note(stream_error=err.message)
                await self._write_chunk(reply.error_frame(err))
            self._write(self.pending_head + self.conn.send(END_OF_MESSAGE))
            self.pending_head = b""
        finally:
            self.streaming_sse = False
            self.pending_head = b""
            metrics.open_streams -= 1
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _write_chunk(self, chunk: bytes) -> None:
        data = self.conn.send(h11.Data(data=chunk))
        if self.pending_head:
            data = self.pending_head + data
            self.pending_head = b""
        self._write(data)
        self.stream_last_write = time.monotonic()
        self.stream_at_boundary = chunk.endswith(b"\n\n")
        if self._write_paused:
            await self._drain()
        if self.closed:
            raise ConnectionError("client connection closed")

    def send_keepalive_if_quiet(self, now: float) -> None:
        """Called by the ticker: a quiet stream gets its head out, and SSE a comment so proxies keep it open."""
        if self.pending_head and now - self.stream_last_write >= TICK_S:
            self._write(self.pending_head)
            self.pending_head = b""
        if self.streaming_sse and self.stream_at_boundary and now - self.stream_last_write >= SSE_KEEPALIVE_S:
            try:
                self._write(self.conn.send(h11.Data(data=b": keep-alive\n\n")))
            except h11.LocalProtocolError:
                return
            self.stream_last_write = now

    def _log_request(self, ctx: RequestContext, method: str, path: str, status: int, key_name: str | None) -> None:
        duration = time.monotonic() - ctx.started
        ttfb_ms = ctx.log.get("ttfb_ms")
        self.gateway.metrics.observe(path if path in ROUTES else "other", ctx.provider or "-", status, duration,
                                     ttfb_ms / 1000 if ttfb_ms is not None else None)
        level = logging.INFO if status < 400 else logging.WARNING
        if log.isEnabledFor(level):
            fields = {"request_id": ctx.request_id, "method": method, "path": path, "status": status,
                      "provider": ctx.provider or None, "model": ctx.model or None, "stream": ctx.stream,
                      "duration_ms": round(duration * 1000, 1), "key": key_name}
            fields.update(ctx.log)
            log.log(level, "%s %s %s %s", method, path, status, _summary(fields), extra={"fields": fields})


def request_headers(raw: list) -> dict[str, str]:
    """A request's header fields by lower-cased name; a repeated field's values joined with ", "."""
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}
    if len(headers) < len(raw):  # a repeated name (rare): join its values, as RFC 9110 allows
        headers = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = headers[key] + ", " + text if key in headers else text
    return headers


_request_ids = itertools.count(1)
_request_id_prefix = ""


def _new_request_id_prefix() -> None:
    global _request_id_prefix
    _request_id_prefix = secrets.token_hex(6) + "-"


_new_request_id_prefix()
os.register_at_fork(after_in_child=_new_request_id_prefix)  # each worker draws its own


def next_request_id() -> str:
    """Unique across processes and restarts: a random per-process prefix and a counter."""
    return f"{_request_id_prefix}{next(_request_ids):x}"


def _shutdown_error(server: Server) -> GatewayError:
    return GatewayError(503, f"the gateway is shutting down and ended this request after "
                             f"{server.grace_used_s:g} s (server.shutdown_grace_s); retry it", "unavailable",
                        headers=[("retry-after", "1")])


class _ClientTooSlow(Exception):
    """A client that began a request stopped sending before its head or body was whole."""


class _CloseAfter(Exception):
    """An error answered before the body was read: the connection closes after the reply."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def _summary(fields: dict) -> str:
    skip = ("method", "path", "status")
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k not in skip)


class Server:
    """The listening socket(s), the connection set, the ticker, config reloads and the graceful stop.

    The ticker (every TICK_S) updates the Date header, enforces head and keep-alive deadlines,
    sends SSE keep-alives, refreshes the keys file, polls the config file's stat (a changed
    file is reloaded once its stat has held still for one tick, so a writer caught halfway is
    not reported as broken) and, in a worker of `serve --workers`, writes the metrics
    snapshot and notices a dead parent.
    """

    # Server limits a reload applies (to connections opened after it; the grace to the next stop).
    LIVE_LIMITS = ("max_body_bytes", "max_head_bytes", "head_timeout_s", "keep_alive_s", "shutdown_grace_s")
    RESTART_LIMITS = ("host", "port", "workers")

    def __init__(self, gateway: Gateway, limits: ServerConfig, config_file: str | None = None) -> None:
        self.gateway = gateway
        self.limits = limits
        self.config_file = config_file
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.stopping = False  # the grace ran out: requests still running are being ended
        self.grace_used_s = 0.0
        self.date_header = b""
        self.parent_pid: int | None = None  # a worker: stop when this parent is gone
        self.on_orphaned: Callable[[], None] | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._ticker: asyncio.Task | None = None
        self._config_stat: tuple | None = _stat_key(config_file) if config_file else None
        self._pending_stat: tuple | None = None
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_warned_at = -FD_WARNING_EVERY_S
        self._update_date()

    def _update_date(self) -> None:
        self.date_header = email.utils.formatdate(usegmt=True).encode()

    async def start(self, host: str, port: int, reuse_port: bool = False, sock: socket.socket | None = None) -> list:
        """Listen; returns the bound (host, port) pairs (port 0 picks a free port)."""
        loop = asyncio.get_event_loop()
        if sock is not None:
            srv = await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=1024)
        else:
            srv = await loop.create_server(lambda: HttpConnection(self), host, port, backlog=1024,
                                           reuse_port=reuse_port or None)
        self._servers.append(srv)
        self._ticker = loop.create_task(self._tick())
        return [s.getsockname()[:2] for s in srv.sockets]

    async def _tick(self) -> None:
        last_date = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if now - last_date >= 1.0:
                self._update_date()
                last_date = now
                self.gateway.write_metrics_snapshot()
                self.check_open_files(now)
                if self.parent_pid is not None and os.getppid() != self.parent_pid and self.on_orphaned:
                    log.warning("the supervising process %d is gone: stopping this worker", self.parent_pid)
                    self.parent_pid = None
                    self.on_orphaned()
            for conn in list(self.connections):
                if conn.deadline is not None and now > conn.deadline:
                    conn.on_deadline()  # a slow head or body, or an idle keep-alive past its time
                elif conn.streaming_sse or conn.pending_head:
                    conn.send_keepalive_if_quiet(now)
            auth = self.gateway.auth
            if auth is not None:
                auth.refresh()
            if self.config_file and not self.draining:
                self.check_config_file()

    def check_open_files(self, now: float) -> None:
        """Warn (once a minute at most) when the process nears its open-file limit.

        At the limit the event loop stops accepting without a word and new clients just wait;
        the files are counted only when the connections alone make that plausible.
        """
        limit = self.fd_limit
        if limit == resource.RLIM_INFINITY or len(self.connections) < limit // 2:
            return
        used = open_file_count()
        if used is None or used < 0.9 * limit or now - self._fd_warned_at < FD_WARNING_EVERY_S:
            return
        self._fd_warned_at = now
        log.warning("%d files open of an open-file limit of %d (%d client connections): new connections wait "
                    "until some close; raise the limit (`ulimit -n`, LimitNOFILE= in a systemd unit)",
                    used, limit, len(self.connections))

    def check_config_file(self) -> None:
        """Reload when the config file's (mtime, size, inode) changed and then held still for a tick."""
        current = _stat_key(self.config_file)
        if current == self._config_stat:
            self._pending_stat = None
            return
        if current != self._pending_stat:
            self._pending_stat = current  # changed: look again next tick, the writer may not be done
            return
        self._pending_stat = None
        if current is None:
            self._config_stat = None
            log.warning("config file %s is gone; keeping the running config", self.config_file)
            return
        self.reload()

    def reload(self) -> bool:
        """Re-read the config file (the ticker on a change, SIGHUP at once); see `Gateway.reload`."""
        self._config_stat = _stat_key(self.config_file)
        old = self.gateway.state.config.server
        if not self.gateway.reload(self.config_file):  # type: ignore[arg-type]
            return False
        new = self.gateway.state.config.server
        self.limits = dataclasses.replace(new, **{k: getattr(self.limits, k) for k in self.RESTART_LIMITS})
        live = [f"{k} {getattr(old, k)} → {getattr(new, k)}" for k in self.LIVE_LIMITS
                if getattr(old, k) != getattr(new, k)]
        fixed = [f"{k} {getattr(old, k)} → {getattr(new, k)}" for k in self.RESTART_LIMITS
                 if getattr(old, k) != getattr(new, k)]
        if live:
            log.info("server limits changed (applied to new connections): %s", ", ".join(live))
        if fixed:
            log.warning("server settings changed that only a restart applies (still running with the old "
                        "ones): %s", ", ".join(fixed))
        return True

    def stop_listening(self) -> None:
        for srv in self._servers:
            srv.close()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace_s`, then end the rest.

        Idle keep-alive connections close at once. Requests still running when the grace is
        over are cancelled: a stream gets a final error event in its dialect, a request
        whose answer has not started gets a 503 in its dialect.
        """
        self.draining = True
        self.gateway.draining = True
        self.stop_listening()
        for conn in list(self.connections):
            if not conn.handling:
                conn.close()
        started = time.monotonic()
        deadline = started + grace_s
        while any(c.handling for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        busy = [c.task for c in self.connections if c.handling and c.task is not None and not c.task.done()]
        if busy:
            log.warning("%d requests still running after the %gs grace (server.shutdown_grace_s): ending them "
                        "with an error", len(busy), grace_s)
            self.stopping = True
            self.grace_used_s = round(time.monotonic() - started, 1)
            for task in busy:
                task.cancel()
            await asyncio.wait(busy, timeout=SHUTDOWN_FINISH_S)
        for conn in list(self.connections):
            if conn.task is not None and not conn.task.done():
                conn.task.cancel()
            conn.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for srv in self._servers:
            # Python 3.12+ also waits here for the connections, which were all just closed.
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                log.debug("listener still closing after 1 s; going on")
        for provider in self.gateway.state.providers.values():
            await provider.aclose()
        self.gateway.pool.close_all()


def _stat_key(path: str | None) -> tuple | None:
    try:
        st = os.stat(path)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# =============================================================================================
# process: logging, event loop, serve
# =============================================================================================


class _JsonFormatter(logging.Formatter):
    worker = ""  # set in a worker of `serve --workers`: every JSON line names it

    def format(self, record: logging.LogRecord) -> str:
        entry = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname, "message": record.getMessage()}
        if self.worker:
            entry["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _ConsoleFormatter(logging.Formatter):
    """Human lines for stdout. Text the console cannot encode (a lone surrogate from a client's
    JSON, say) is backslash-escaped: the line is kept, not dropped with a logging error."""

    def __init__(self, encoding: str | None) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(message)s")
        self.encoding = encoding or "utf-8"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        try:
            text.encode(self.encoding)
        except UnicodeEncodeError:
            text = text.encode(self.encoding, "backslashreplace").decode(self.encoding)
        return text


class DailyLogFile(logging.FileHandler):
    """Lines appended to `gateway.log`, which becomes `gateway.log.YYYY-MM-DD` (UTC, the day of its
    last line) when the first line of a later day is written.

    Safe for the workers of `serve --workers`, which all append to the one file: the rename is
    made under an `flock` on `gateway.log.lock`, and only while `gateway.log` is still the file
    this process has open; a process that finds it already renamed by another just reopens.
    (The standard TimedRotatingFileHandler would have the second worker delete the first one's
    rotated file: a day of logs lost.) Unencodable text is backslash-escaped, never dropped.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")
        self.rollover_at = self._next_midnight(time.time())
        if os.fstat(self.stream.fileno()).st_mtime < self.rollover_at - 86400:
            self.rotate()  # left from an earlier day (stopped over midnight): start today afresh

    @staticmethod
    def _next_midnight(now: float) -> float:
        return (now // 86400 + 1) * 86400  # UTC days

    def emit(self, record: logging.LogRecord) -> None:
        if record.created >= self.rollover_at:
            self.rollover_at = self._next_midnight(record.created)
            try:
                self.rotate()
            except OSError:
                self.handleError(record)
        super().emit(record)

    def rotate(self) -> None:
        with open(self.baseFilename + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                on_disk = os.stat(self.baseFilename)
            except FileNotFoundError:
                on_disk = None
            ours = os.fstat(self.stream.fileno())
            if on_disk is not None and on_disk.st_size and (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev,
                                                                                              ours.st_ino):
                dated = f"{self.baseFilename}.{time.strftime('%Y-%m-%d', time.gmtime(on_disk.st_mtime))}"
                target, n = dated, 1
                while os.path.exists(target):  # never over an earlier file (a clock set back, say)
                    target, n = f"{dated}.{n}", n + 1
                os.rename(self.baseFilename, target)
            self.stream.close()
            self.stream = self._open()


_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG, "trace": logging.DEBUG}


def log_level(environ: dict | None = None) -> int:
    """Level from EVO_LOG or RUST_LOG (`debug`, or filter syntax such as `evo_gateway=debug,info`)."""
    environ = os.environ if environ is None else environ
    spec = environ.get("EVO_LOG") or environ.get("RUST_LOG") or "info"
    for part in spec.replace(",", " ").split():
        level = _LEVELS.get(part.rsplit("=", 1)[-1].strip().lower())
        if level is not None:
            return level
    return logging.INFO


def setup_logging(environ: dict | None = None) -> None:
    """Human lines on stdout; JSON lines in $EVO_LOG_DIR/gateway.log rotated daily."""
    environ = os.environ if environ is None else environ
    log.setLevel(log_level(environ))
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_ConsoleFormatter(getattr(sys.stdout, "encoding", None)))
    log.addHandler(console)
    log_dir = environ.get("EVO_LOG_DIR", "./logs")
    try:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = DailyLogFile(os.path.join(log_dir, "gateway.log"))
    except OSError as e:
        log.warning("cannot write logs to %s (%s); logging to stdout only", log_dir, e.strerror)
        return
    file_handler.setFormatter(_JsonFormatter())
    log.addHandler(file_handler)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is importable, else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (every client and upstream connection is an
    open file; 1,024 is a common default); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a platform cap below the hard limit (macOS): keep the soft one
            pass
    return soft


def open_file_count() -> int | None:
    """Files this process has open, where the platform lists them (Linux, macOS)."""
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(fd_dir))
        except OSError as e:
            if e.errno == errno.EMFILE:  # listing takes one file more: every one is in use
                return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None


def serve_main(config_file: str | None = None, host: str | None = None, port: int | None = None,
               workers: int | None = None) -> int:
    """`evo-gateway serve`: load the config, listen, serve until SIGTERM/SIGINT; returns the exit code.

    With more than one worker (`--workers`, else `server.workers`) a supervising parent runs
    that many worker processes on one port (see `Supervisor`).
    """
    setup_logging()
    path = config_path(config_file)
    try:
        config = load_config(path)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    for w in config.warnings:
        log.warning("%s", w)
    limits = config.server
    host = host or limits.host
    port = limits.port if port is None else port
    workers = workers or limits.workers
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        log.warning("--workers %d asked for, but this platform has no SO_REUSEPORT: running one process", workers)
        workers = 1
    log.info("open-file limit: %d", raise_open_file_limit())  # workers inherit it
    if workers > 1:
        return Supervisor(config, path, host, port, workers).run()
    return _run_loop(config, path, host, port, None)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker of `serve --workers` knows about its place: slot, parent, metrics folder."""

    index: int
    parent_pid: int
    metrics_dir: str
    config_stat: tuple | None = None


def _run_loop(config: Config, path: str, host: str, port: int, worker: WorkerSpec | None) -> int:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(config, path, host, port, worker))
    finally:
        loop.close()


async def _serve(config: Config, path: str, host: str, port: int, worker: WorkerSpec | None = None) -> int:
    loop = asyncio.get_event_loop()
    gateway = Gateway(config)
    if worker is not None:
        gateway.worker_id = f"{worker.index}-{os.getpid()}"
        gateway.metrics_dir = worker.metrics_dir
        _label_worker_logs(gateway.worker_id)
    enable_auth(gateway)
    server = Server(gateway, config.server, path)
    if worker is not None:
        server._config_stat = worker.config_stat  # the file the parent's config came from
        server.parent_pid = worker.parent_pid
    try:
        bound = await server.start(host, port, reuse_port=worker is not None)
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", host, port, e.strerror or e)
        return 1
    stop = loop.create_future()
    signals_seen = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            if worker is not None:
                return  # a worker stops once; a second Ctrl-C is the parent's to act on
            log.warning("second signal: exiting now")
            os._exit(1)
        if not stop.done():
            stop.set_result(signum)

    server.on_orphaned = lambda: on_signal(signal.SIGTERM)
    # A worker ignores SIGINT: Ctrl-C reaches the whole process group and the parent passes it on.
    for signum in (signal.SIGTERM,) if worker is not None else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    loop_name = type(loop).__module__.split(".")[0]
    where = ", ".join(f"http://{h}:{p}" for h, p in bound)
    if worker is None:
        log.info("evo-gateway %s listening on %s (event loop: %s, %d providers enabled)", __version__, where,
                 loop_name, len(gateway.state.providers))
    else:
        log.info("listening on %s (event loop: %s)", where, loop_name)
    signum = await stop
    grace_s = gateway.state.config.server.shutdown_grace_s
    log.info("received %s: finishing requests in flight (up to %ss)", signal.Signals(signum).name, grace_s)
    await server.shutdown(grace_s)
    log.info("stopped")
    return 0


def _label_worker_logs(worker_id: str) -> None:
    """In a worker: its id on every log line, so the interleaved output of N workers stays readable."""
    _JsonFormatter.worker = worker_id
    for handler in log.handlers:
        if not isinstance(handler.formatter, _JsonFormatter):
            handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-5s [worker {worker_id}] %(message)s"))


def _flush_logs() -> None:
    for handler in log.handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - a log handler must not stop a process from exiting
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


class Supervisor:
    """The parent of `serve --workers N`: N forked workers on one port, restarted when they die.

    The parent binds the port first (with SO_REUSEPORT, never listening on it) so that port
    0 resolves once and a port in use fails before any fork; each worker binds and listens on
    its own SO_REUSEPORT socket with its own event loop, and the kernel spreads connections
    over them. A worker that dies is logged and started again after a backoff that doubles
    while it keeps dying young. SIGTERM/SIGINT are passed on as SIGTERM (each worker drains
    gracefully); a second one kills the workers and exits 1. SIGHUP is passed on (each worker
    reloads). The parent keeps the last valid config for workers it restarts. Metrics: each
    worker writes a snapshot into a private folder every second and its /metrics renders its
    own live figures plus the others' snapshots, each series labelled `worker`.
    """

    POLL_S = 0.1
    RESTART_DELAY_S = 0.25
    RESTART_DELAY_MAX_S = 30.0
    HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets its backoff

    def __init__(self, config: Config, path: str, host: str, port: int, workers: int) -> None:
        self.config = config
        self.config_stat = _stat_key(path)
        self.path = path
        self.host = host
        self.port = port
        self.workers = workers
        self.children: dict[int, tuple[int, float]] = {}  # pid → (slot, started)
        self.failures = [0] * workers
        self.restart_at: dict[int, float] = {}  # slot → when to start it again
        self.signals: list[int] = []
        self.stopping = False
        self.exit_code = 0
        self.metrics_dir = ""

    def run(self) -> int:
        try:
            reserved = _reserve_port(self.host, self.port)
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", self.host, self.port, e.strerror or e)
            return 1
        self.port = reserved.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="evo-gateway-metrics-")
        self.reserved = reserved
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        log.info("evo-gateway %s: supervising %d workers on http://%s:%d (SO_REUSEPORT, %d providers enabled)",
                 __version__, self.workers, self.host, self.port, sum(p.enabled for p in self.config.providers))
        try:
            for slot in range(self.workers):
                self._spawn(slot)
            while self.children or (self.restart_at and not self.stopping):
                self._handle_signals()
                self._reap()
                self._restart_due()
                self._watch_config()
                time.sleep(self.POLL_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for pid in list(self.children):
                _kill(pid, signal.SIGKILL)
            reserved.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("all workers stopped")
        return self.exit_code

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # acted on by the loop, outside the signal handler

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._load_config()
                for pid in self.children:
                    _kill(pid, signal.SIGHUP)
            elif not self.stopping:
                self.stopping = True
                self.restart_at.clear()
                log.info("received %s: stopping %d workers gracefully", signal.Signals(signum).name,
                         len(self.children))
                for pid in self.children:
                    _kill(pid, signal.SIGTERM)
            else:
                log.warning("second signal: killing the workers now")
                self.exit_code = 1
                for pid in self.children:
                    _kill(pid, signal.SIGKILL)

    def _spawn(self, slot: int) -> None:
        _flush_logs()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                self.reserved.close()
                for s in (signal.SIGTERM, signal.SIGHUP):
                    signal.signal(s, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                spec = WorkerSpec(slot, os.getppid(), self.metrics_dir, self.config_stat)
                code = _run_loop(self.config, self.path, self.host, self.port, spec)
            except BaseException:  # noqa: BLE001 - whatever happens, the worker must not return into the parent's code
                log.exception("worker %d failed", slot)
            finally:
                _flush_logs()
                os._exit(code)
        self.children[pid] = (slot, time.monotonic())
        log.info("worker %d started (pid %d)", slot, pid)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid not in self.children:
                continue
            slot, started = self.children.pop(pid)
            try:
                os.unlink(os.path.join(self.metrics_dir, f"worker-{slot}-{pid}.json"))
            except OSError:
                pass
            if os.WIFSIGNALED(status):
                how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                how = f"exited with code {os.WEXITSTATUS(status)}"
            if self.stopping:
                log.info("worker %d (pid %d) %s", slot, pid, how)
                continue
            lived = time.monotonic() - started
            self.failures[slot] = 1 if lived >= self.HEALTHY_AFTER_S else self.failures[slot] + 1
            delay = min(self.RESTART_DELAY_MAX_S, self.RESTART_DELAY_S * 2 ** (self.failures[slot] - 1))
            log.error("worker %d (pid %d) %s after %.1fs; restarting it in %gs", slot, pid, how, lived, delay)
            self.restart_at[slot] = time.monotonic() + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in sorted(self.restart_at.items()):
            if when <= now and not self.stopping:
                del self.restart_at[slot]
                self._spawn(slot)

    def _watch_config(self) -> None:
        if _stat_key(self.path) != self.config_stat:
            self._load_config()

    def _load_config(self) -> None:
        """Keep the newest valid config for restarted workers (the workers report errors themselves)."""
        stat = _stat_key(self.path)
        try:
            config = load_config(self.path, create=False)
        except ConfigError:
            self.config_stat = stat
            return
        if (config.server.workers, config.server.host, config.server.port) != (
                self.config.server.workers, self.config.server.host, self.config.server.port):
            log.warning("server.workers/host/port changed in %s: a restart applies them", self.path)
        self.config, self.config_stat = config, stat


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket on host:port: fixes port 0, fails early if it is taken."""
    family, type_, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
