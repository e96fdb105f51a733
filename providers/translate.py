"""Pure translators between the dialects the gateway speaks; OpenAI Chat Completions is the hub.

Every function here is data in, data out: no sockets, no clock reads that matter to tests
beyond ids and timestamps. Request translators take the client's parsed JSON body and return
the body to send upstream; response translators take the upstream's parsed JSON and return
the client's. Stream translators are small classes fed one upstream event at a time; they
return the wire-ready bytes (SSE frames or NDJSON lines) to send to the client, so the
server writes them as they come.

Sections, in order: shared helpers · Anthropic Messages ⇄ Chat · Ollama ⇄ Chat ·
Responses ⇄ Chat.
"""

from __future__ import annotations

import json
from typing import Any

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


class InvalidRequest(ValueError):
    """A client body the translator cannot honour; the gateway answers 400 with this message.

    `param` names the offending field when there is one (OpenAI's envelope carries it).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame: an optional `event:` line, one single-line `data:` line, a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if event is None:
        return b"data: " + payload.encode() + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload.encode() + b"\n\n"


def ndjson(data: Any) -> bytes:
    """One NDJSON line (Ollama's stream framing)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
