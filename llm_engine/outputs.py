"""What the engine returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_engine.sequence import FinishReason


@dataclass
class RequestOutput:
    """A request's state so far (``finished`` tells whether it is final)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None  # a str: "stop", "length" or "abort"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)
