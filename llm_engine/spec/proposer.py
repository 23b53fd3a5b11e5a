"""The engine's handle on speculation: per-request drafters, draft lengths, and bookkeeping.

The scheduler asks :meth:`SpeculativeProposer.propose` for drafts before a decode step (it knows
the step's other tokens, which the draft-length rule needs), the runner verifies them in the same
forward pass, and :meth:`SpeculativeProposer.accept` feeds each result back to the drafter (the
accepted tokens extend its index) and the controller (acceptance), while
:meth:`observe_step` keeps the step-cost model current.
"""

from __future__ import annotations

from llm_engine.spec.adaptive import DraftLengthController, SpecConfig, StepCostModel
from llm_engine.spec.ngram import NgramDrafter


class SpeculativeProposer:
    """Drafts for a batch of decoding requests, sized by :class:`DraftLengthController`."""

    def __init__(self, config: SpecConfig, cost: StepCostModel | None = None) -> None:
        self.config = config
        self.controller = DraftLengthController(config, cost)
        self._drafters: dict[str, NgramDrafter] = {}

    def add_request(self, request_id: str, token_ids: list[int]) -> None:
        d = NgramDrafter(self.config.min_n, self.config.max_n)
        d.extend(list(token_ids))
        self._drafters[request_id] = d

    def remove_request(self, request_id: str) -> None:
        self._drafters.pop(request_id, None)
        self.controller.forget(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._drafters

    def propose(self, request_ids: list[str], other_tokens: int = 0,
                max_lens: list[int] | None = None) -> list[list[int]]:
        """One draft (possibly empty) per request; ``max_lens`` caps each (tokens left to generate)."""
        if not self.config.enabled:
            return [[] for _ in request_ids]
        k = self.config.max_draft
        caps = max_lens or [k] * len(request_ids)
        drafts = []
        for rid, cap in zip(request_ids, caps):
            d = self._drafters.get(rid)
            got = d.propose(min(k, cap)) if d is not None and cap > 0 else []
            drafts.append(got[0] if got else [])
        lengths = self.controller.draft_lengths(request_ids, [len(d) for d in drafts], other_tokens)
        return [d[:n] for d, n in zip(drafts, lengths)]

    def accept(self, request_id: str, proposed: int, accepted: int, new_tokens: list[int]) -> None:
        """Records a verification: ``proposed`` drafts, ``accepted`` kept, ``new_tokens`` appended."""
        self.controller.record(request_id, proposed, accepted)
        d = self._drafters.get(request_id)
        if d is not None:
            d.extend(new_tokens)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.controller.cost.observe(num_tokens, seconds)

    @property
    def acceptance_rate(self) -> float:
        return self.controller.acceptance_rate
