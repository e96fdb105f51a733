"""Provider implementations, looked up by `provider_type` and imported only when used."""

from __future__ import annotations

import importlib
from typing import Any

# provider_type → (module, class); modules import the core, never the other way round.
_REGISTRY = {
    "open_ai_compatible": ("providers.openai_compat", "OpenAICompatProvider"),
    "anthropic": ("providers.anthropic", "AnthropicProvider"),
    "ollama": ("providers.ollama", "OllamaProvider"),
    "claude_code": ("providers.cli", "ClaudeCodeProvider"),
    "codex_cli": ("providers.cli", "CodexCliProvider"),
    "cursor": ("providers.cli", "CursorProvider"),
}
_SUBPROCESS_TYPES = frozenset({"claude_code", "codex_cli", "cursor"})


def provider_class(provider_type: str) -> type:
    module, name = _REGISTRY[provider_type]
    return getattr(importlib.import_module(module), name)


def create(config: Any, pool: Any, environ: Any = None) -> Any:
    """Instantiate the provider for one `ProviderConfig`."""
    cls = provider_class(config.provider_type)
    if config.provider_type in _SUBPROCESS_TYPES:
        return cls(config, environ)
    return cls(config, pool, environ)
