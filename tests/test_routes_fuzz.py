"""Every POST route against bodies of any shape, over real sockets: each gets an answer in its
dialect's envelope, never a 500, and the server keeps serving.

Bodies come from the seeded generator of test_translate_fuzz (real field names, roles and part
types; values anything JSON allows), sent to an OpenAI-compatible and an Anthropic mock.
"""

from __future__ import annotations

import json
import random

import httpx
from conftest import provider
from mock_upstream import MockResponse, chat_chunks, chat_completion, sse_body
from test_anthropic_routes import anthropic_upstream
from test_translate_fuzz import request_body

import evo_gateway
from providers import translate

REQUESTS = 800
POST_PATHS = sorted(path for path, (method, _, _) in evo_gateway.ROUTES.items() if method == "POST")
MODELS = ["oa:m", "an:claude", "m", "claude", "nope:m", "oa:", ":x"]


def openai_mock():
    async def handler(req):
        if req.path.endswith("/embeddings"):
            return MockResponse(200, {"object": "list", "model": "m", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
        body = req.json()
        if body.get("stream") is True:
            return MockResponse(200, sse_body(*chat_chunks(["Hel", "lo"], model="m")), content_type="text/event-stream")
        return MockResponse(200, chat_completion("Hello", model="m"))
    return handler


def test_any_body_on_any_post_route_gets_a_dialect_answer_and_never_a_500(harness):
    oa = harness.upstream(openai_mock())
    an = anthropic_upstream(harness)
    url = harness.start([provider("oa", oa.url, models=["m"]),
                         provider("an", an.url, provider_type="anthropic", models=["claude"])])
    rng = random.Random("routes")
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(REQUESTS):
            path = rng.choice(POST_PATHS)
            body = request_body(rng)
            body["model"] = rng.choice(MODELS) if rng.random() < 0.95 else body["model"]
            raw = json.dumps(body).encode()
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            where = f"{path} {raw[:400]!r} → {r.status_code} {r.text[:300]}"
            assert r.status_code < 500, where
            if r.status_code >= 400:
                error = r.json()["error"]
                if path.startswith("/api/"):
                    assert isinstance(error, str) and error, where  # Ollama's envelope
                else:
                    assert isinstance(error, dict) and error["message"], where
        assert client.get("/health").status_code == 200
    assert statuses.get(200, 0) > REQUESTS // 10, statuses  # deep enough to reach the translators


def test_an_upstream_answer_a_translator_cannot_read_is_a_502_naming_the_provider(harness, monkeypatch):
    def cannot_read(*args, **kwargs):
        raise TypeError("an answer of a shape nobody foresaw")

    monkeypatch.setattr(translate, "chat_to_ollama_chat_response", cannot_read)
    oa = harness.upstream(openai_mock())
    url = harness.start([provider("oa", oa.url)])
    r = httpx.post(url + "/api/chat", json={"model": "oa:m", "stream": False,
                                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502
    assert "provider 'oa' sent an answer the gateway cannot translate" in r.json()["error"]
    assert "TypeError" in r.json()["error"]

