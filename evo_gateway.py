"""evo-gateway core: one address for every LLM client on a machine.

Sections, in dependency order:
    constants · errors · config · key pool · wire (SSE / NDJSON decoders) ·
    upstream client + pool · providers (protocol + registry) · gateway key store ·
    gateway (routes, router, dispatch, error rendering) · server (connections, lifecycle, signals)
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Dict, Union

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
ChatResult = Union[Dict[str, Any], AsyncIterator[Dict[str, Any]]]


# =============================================================================================
# providers: the protocol the core consumes (implementations live in providers/)
# =============================================================================================


class RequestContext:
    """What a provider may know about the client request besides its body.

    `headers` holds the client's request headers, names lower-cased. Providers record what
    the request log line should carry (`usage`, `upstream_status`) through `note()`.
    """

    __slots__ = ("request_id", "headers", "provider", "model", "stream", "log")

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
