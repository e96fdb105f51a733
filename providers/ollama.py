"""`ollama`: an Ollama server root. Its native /api/* for Ollama clients, its /v1/* for OpenAI ones."""

from __future__ import annotations

from typing import Any

from providers.openai_compat import OpenAICompatProvider


class OllamaProvider(OpenAICompatProvider):
    """`base_url` is the server root (`http://localhost:11434`); both APIs hang from it."""

    chat_path = "/v1/chat/completions"
    probe_path = "/api/version"

    def __init__(self, config: Any, pool: Any, environ: Any = None) -> None:
        super().__init__(config, pool, environ)
        self.native_paths = {
            "chat": "/v1/chat/completions", "embeddings": "/v1/embeddings",
            "ollama_chat": "/api/chat", "ollama_generate": "/api/generate", "ollama_embed": "/api/embed",
            "ollama_embeddings": "/api/embeddings", "ollama_show": "/api/show",
        }
        if config.responses_api:
            self.native_paths["responses"] = "/v1/responses"
        self.native_kinds = frozenset(self.native_paths)
