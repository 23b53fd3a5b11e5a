"""Settings of ``headwater llm serve`` (the HTTP front); engine settings live in the engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HttpServerConfig:
    """HTTP server for ranking and OpenAI-compatible generation."""

    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1/*"})
    served_model_name: str | None = field(default=None, metadata={"help": "model id reported by /v1/models"})
    max_pending_requests: int = field(default=256, metadata={"help": "requests in flight before 429"})
    retry_after_s: int = field(default=1, metadata={"help": "Retry-After seconds on 429"})
    max_candidates: int = field(default=1000, metadata={"help": "most candidates per /v1/rank call"})
    max_choices: int = field(default=64, metadata={"help": "most prompts x n per completion call"})
    disconnect_poll_s: float = field(default=0.1, metadata={"help": "how often a waiting call checks its client"})
