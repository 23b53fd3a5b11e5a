"""A request's state inside the engine: its tokens, KV blocks and progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from llm_engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # waiting with its KV kept (on host, or in shared blocks): resumes without recompute
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    """Why a request ended; the string values are the OpenAI API's ``finish_reason``."""

    STOP = "stop"  # an EOS token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's max length
    ABORT = "abort"  # cancelled by the caller


class RequestKind(enum.StrEnum):
    """What a sequence is for: generation samples token by token; scoring is prefill only."""

    GENERATE = "generate"
    SCORE = "score"  # log-probs read at chosen positions (see llm_engine.ranking), no token sampled


@dataclass(eq=False)
class Sequence:
    """One request. ``num_computed_tokens`` counts tokens whose K/V are in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first
    arrival: float = field(default_factory=time.monotonic)
    seed: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    kv_row: int = -1  # this sequence's row in the KV manager's block-table array (-1: none)
    swapped: list[tuple[int, int]] = field(default_factory=list)  # (block-table index, host slot) while swapped out
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    text: str = ""
    # Prefix-cache reuse stops at this position (scoring recomputes its first scored position).
    cache_limit: int = 1 << 62
    # Set on prefill-only scoring sequences (see llm_engine.ranking).
    score: Any = None

    @property
    def kind(self) -> RequestKind:
        return RequestKind.GENERATE if self.score is None else RequestKind.SCORE

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``all_token_ids[start:stop]`` without building the whole list (hot path: one token per decode)."""
        plen = len(self.prompt_token_ids)
        if start >= plen:
            return self.output_token_ids[start - plen:stop - plen]
        if stop <= plen:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - plen]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
