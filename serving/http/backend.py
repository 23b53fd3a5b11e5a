"""What the HTTP front needs from an engine, as plain data classes and one protocol.

The routes speak only these types, so the OpenAI and ranking wire formats stay independent of
the engine's internals; :mod:`serving.http.engine_backend` adapts :mod:`llm_engine` to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from llm_engine.scoring import ScoreResult, ScoringOptions


@dataclass
class GenerateParams:
    """Sampling settings of one generation request (engine-neutral)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives per sampled token (0 = only the sampled one)
    prompt_logprobs: int | None = None


@dataclass
class TokenEvent:
    """New output of one request since the previous event (a stream is a sequence of these)."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None


@dataclass
class BackendStats:
    """Live engine numbers for ``/metrics`` and admission control."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_mismatches: int = 0  # digest matched, tokens or prefix did not: served as a miss
    spec_acceptance_rate: float = 0.0


class TokenizerDelegate:
    """The tokenizer half of :class:`Backend`, answered by ``self.tok`` (an ``llm_engine`` tokenizer)."""

    tok: Any

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tok.decode(token_ids)

    def token_text(self, token_id: int) -> str:
        return self.tok.token_text(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.tok.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self.tok.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return self.tok.special_tokens


class Backend(Protocol):
    """An engine the server can drive: tokenizer, streaming generation, scoring, stats."""

    model_id: str
    max_model_len: int
    vocab_size: int  # token-id prompts must lie in [0, vocab_size)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def chat_template(self) -> str | None: ...

    def generate(self, request_id: str, prompt_ids: list[int], params: GenerateParams) -> AsyncIterator[TokenEvent]:
        """Streams events until one carries a ``finish_reason``; closing it early cancels."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def rank(self, request_id: str, context: str, candidates: list[str], options: ScoringOptions) -> ScoreResult: ...

    def stats(self) -> BackendStats: ...
