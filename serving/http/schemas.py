"""Request and response bodies: OpenAI-compatible completions and chat, and ``/v1/rank``.

Field constraints here are the first line of validation (FastAPI turns a violation into a 400
with the field named); limits that depend on the model (context length, candidate count) are
checked in the routes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 8


class SamplingFields(BaseModel):
    """Sampling parameters shared by completions and chat (OpenAI names plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k must be -1 (off) or >= 1")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: text or token-id prompts (one or a batch)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):  # noqa: ANN001, ANN206 - pydantic hook
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and v and isinstance(v[0], list) and any(len(p) == 0 for p in v):
            raise ValueError("prompt token lists must not be empty")
        return v


class ChatMessage(BaseModel):
    """One chat turn; ``content`` may be a string or OpenAI's list of text parts."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True


class RankRequest(BaseModel):
    """``POST /v1/rank``: score candidates given a shared context and return their order."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    context: str
    candidates: list[str] = Field(min_length=1)
    method: Literal["loglik", "yes_prob"] = "loglik"
    normalize: Literal["sum", "mean", "power"] = "mean"
    length_alpha: float = Field(default=1.0, ge=0.0, le=4.0)
    template: str | None = None
    yes_token: str = " Yes"
    no_token: str | None = " No"

    @field_validator("candidates")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        bad = [i for i, c in enumerate(v) if not c]
        if bad:
            raise ValueError(f"candidates must be non-empty strings (empty at {bad[:5]})")
        return v


class RankUsage(BaseModel):
    prompt_tokens: int
    cached_tokens: int
    total_tokens: int


class RankResponse(BaseModel):
    """Scores aligned with the request's candidates; ``ranking`` lists indices, best first."""

    id: str
    object: Literal["rank"] = "rank"
    model: str
    method: str
    scores: list[float]
    ranking: list[int]
    usage: RankUsage


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every 4xx body (OpenAI's shape): what was wrong and which field to change."""

    error: ErrorDetail


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """``/v1/completions`` without streaming (a streamed chunk has the same shape, no usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """``/v1/chat/completions`` without streaming."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
