"""`anthropic`: the Messages API. Messages requests are forwarded; chat requests are translated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from evo_gateway import (
    ChatResult,
    GatewayError,
    HttpProvider,
    RequestContext,
    parse_upstream_json,
    sse_json_events,
    upstream_error,
)
from providers import translate as tr

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


class AnthropicProvider(HttpProvider):
    """`x-api-key` from the key pool; `anthropic-version` is the client's, else 2023-06-01."""

    native_paths = {"messages": "/messages", "count_tokens": "/messages/count_tokens"}
    models_path = "/models?limit=1000"  # the API pages its list, 20 by default
    forwarded_headers = frozenset({"anthropic-version", "anthropic-beta"})

    def auth_headers(self, key: str | None, ctx: RequestContext) -> list:
        headers = [(b"anthropic-version", ctx.headers.get("anthropic-version", DEFAULT_ANTHROPIC_VERSION).encode())]
        if key:
            headers.append((b"x-api-key", key.encode("latin-1")))
        return headers

    async def chat(self, body: dict[str, Any], ctx: RequestContext) -> ChatResult:
        stream = body.get("stream") is True
        try:
            request = tr.chat_to_anthropic_request(body)
        except tr.InvalidRequest as e:
            raise GatewayError(400, str(e), "invalid_request", param=e.param) from None
        resp = await self.send("/messages", request, ctx, stream)
        if resp.status >= 300:
            raise await upstream_error(resp, self.name)
        json_answer = tr.json_answer_tool(body) is not None
        if not stream:
            return tr.anthropic_to_chat_response(parse_upstream_json(await resp.read(), self.name),
                                                 json_answer=json_answer)
        return self._chunks(resp, body.get("model", ""), json_answer)

    async def _chunks(self, resp: Any, model: str, json_answer: bool) -> AsyncIterator[dict]:
        translator = tr.AnthropicToChatStream(model, json_answer=json_answer)
        try:
            async for event, data in sse_json_events(resp, self.name, _is_message_stop):
                for chunk in translator.feed(data.get("type") or event, data):
                    yield chunk
        except tr.UpstreamStreamError as e:
            raise GatewayError(502, f"{self.name}: {e}", "upstream") from None
        for chunk in translator.finish():
            yield chunk


def _is_message_stop(event: dict) -> bool:
    return event.get("type") == "message_stop"
