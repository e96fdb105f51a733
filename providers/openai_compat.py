"""`open_ai_compatible`: OpenAI, OpenRouter, vLLM, llama.cpp, LM Studio — the hub dialect itself."""

from __future__ import annotations

from typing import Any

from evo_gateway import (
    FORWARDED_REQUEST_HEADERS,
    ChatResult,
    GatewayError,
    HttpProvider,
    RequestContext,
    parse_upstream_json,
    sse_json_events,
    upstream_error,
)


class OpenAICompatProvider(HttpProvider):
    """Chat and embeddings forwarded as-is; `/responses` too when `responses_api` is set."""

    chat_path = "/chat/completions"
    # Anthropic's version/beta flags describe a Messages request; once translated they mean nothing here.
    forwarded_headers = frozenset(h for h in FORWARDED_REQUEST_HEADERS if not h.startswith("anthropic-"))

    def __init__(self, config: Any, pool: Any, environ: Any = None) -> None:
        paths = {"chat": "/chat/completions", "embeddings": "/embeddings"}
        if config.responses_api:
            paths["responses"] = "/responses"
        self.native_paths = paths
        super().__init__(config, pool, environ)

    async def chat(self, body: dict[str, Any], ctx: RequestContext) -> ChatResult:
        stream = body.get("stream") is True
        resp = await self.send(self.chat_path, body, ctx, stream)
        if resp.status >= 300:
            raise await upstream_error(resp, self.name)
        if not stream:
            return parse_upstream_json(await resp.read(), self.name)
        return self._chunks(resp)

    async def _chunks(self, resp: Any):
        async for _, obj in sse_json_events(resp, self.name):
            err = obj.get("error")
            if err:
                message = err.get("message") if isinstance(err, dict) else str(err)
                raise GatewayError(502, f"{self.name}: {message}", "upstream")
            yield obj
