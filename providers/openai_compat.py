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
from providers.translate import as_list


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
        if resp.status == 400 and _large_int(body.get("max_tokens")):
            err = await upstream_error(resp, self.name)
            if not any(words in err.message for words in _OUTPUT_LIMIT_WORDS):
                raise err
            # Claude Code asks for up to 128000 output tokens, more than many models allow; it
            # means "as much as the model gives", so ask once more without a limit.
            body = {k: v for k, v in body.items() if k != "max_tokens"}
            resp = await self.send(self.chat_path, body, ctx, stream)
        if resp.status >= 300:
            raise await upstream_error(resp, self.name)
        if not stream:
            return parse_upstream_json(await resp.read(), self.name)
        return self._chunks(resp)

    async def _chunks(self, resp: Any):
        async for _, obj in sse_json_events(resp, self.name, _has_finish_reason):
            err = obj.get("error")
            if err:
                message = err.get("message") if isinstance(err, dict) else str(err)
                raise GatewayError(502, f"{self.name}: {message}", "upstream")
            yield obj


def _has_finish_reason(chunk: dict) -> bool:
    return any(isinstance(c, dict) and c.get("finish_reason") for c in as_list(chunk.get("choices")))


# How upstreams word "max_tokens is more than this model can give": OpenAI and current vLLM name
# the field; older vLLM counts it against the context ("…, 128000 in the completion)").
_OUTPUT_LIMIT_WORDS = ("max_tokens", "max_completion_tokens", "in the completion")


def _large_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 4096
