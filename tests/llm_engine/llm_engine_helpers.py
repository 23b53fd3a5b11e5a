"""Shared by the engine tests: deterministic prompts and running an engine to the end."""

from __future__ import annotations

from llm_engine import LLMEngine


def prompts(n: int, length: int = 20) -> list[list[int]]:
    """``n`` distinct token prompts of growing length (``length``, ``length + 1``, ...)."""
    return [[(7 * i + 3 * j) % 120 + 1 for j in range(length + i)] for i in range(n)]


def drain(eng: LLMEngine) -> dict[str, list[int]]:
    """Steps until every request finished; the output tokens of each, by request id."""
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    return out
