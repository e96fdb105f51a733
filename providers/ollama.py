"""`ollama`: an Ollama server root. Its native /api/* for Ollama clients, its /v1/* for OpenAI ones."""

from __future__ import annotations

from typing import Any

from providers.openai_compat import OpenAICompatProvider


class OllamaProvider(OpenAICompatProvider):
    """`base_url` is the server root (`http://localhost:11434`); both APIs hang from it."""

    chat_path = "/v1/chat/completions"
    probe_path = "/api/version"
    models_path = "/api/tags"

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

    @staticmethod
    def model_names(listing: dict) -> list[str]:
        """Model names from Ollama's `/api/tags`: `{"models": [{"name"}]}`."""
        models = listing.get("models")
        return [m["name"] for m in (models if isinstance(models, list) else [])
                if isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"]]
