"""Draft length per request from measured acceptance and batch cost (SmartSpec's goodput rule).

Speculation pays when the tokens it is expected to add outweigh the extra verification work. With
acceptance rate ``a`` (per draft token, independent), a draft of ``k`` tokens yields on average
``(1 - a**(k+1)) / (1 - a)`` tokens in one step (the accepted drafts plus the target's own
token). A step over ``n`` batched tokens costs ``T(n) = fixed + per_token * n`` (fitted online
from measured step times). The controller picks the draft length ``k`` that maximises the batch's
goodput ``(P + sum_i E_i(k_i)) / T(P + sum_i (1 + k_i))`` (``P``: the step's prefill tokens, useful
work too); the ``j``-th draft token of request ``i`` is worth ``a_i ** j``, so a request whose
drafts keep failing drafts nothing. Under heavy load the per-token cost dominates, a draft token
(worth less than one) no longer pays, and the best ``k`` falls to zero.

A request not drafting has no fresh acceptance evidence, so every ``probe_interval`` steps it
drafts one token to re-measure (a request whose drafts never match pays about one extra
verified token per ``probe_interval`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SpecConfig:
    """Speculative-decoding settings (model-free n-gram drafts)."""

    enabled: bool = field(default=True, metadata={"help": "allow speculation (adaptive; off where it does not pay)"})
    max_draft: int = field(default=8, metadata={"help": "most draft tokens per request per step"})
    min_n: int = field(default=2, metadata={"help": "shortest n-gram the drafter matches"})
    max_n: int = field(default=4, metadata={"help": "longest n-gram the drafter matches"})
    branches: int = field(default=1, metadata={"help": "draft branches per request (tree verification when > 1)"})
    prior_acceptance: float = field(default=0.5, metadata={"help": "acceptance assumed before any evidence"})
    prior_weight: float = field(default=4.0, metadata={"help": "pseudo-count of the prior"})
    ema_decay: float = field(default=0.9, metadata={"help": "per-step decay of acceptance evidence"})
    probe_interval: int = field(default=32, metadata={"help": "steps between one-token probes when not drafting"})
    min_gain: float = field(default=1.02, metadata={"help": "speculate only when goodput beats no-draft by this factor"})


class StepCostModel:
    """``T(n) = fixed + per_token * n`` seconds per step over ``n`` tokens, fitted by decayed
    least squares from measured steps (the defaults are priors until then)."""

    def __init__(self, fixed: float = 0.01, per_token: float = 0.0005, decay: float = 0.95, warmup: int = 2) -> None:
        self.fixed, self.per_token, self.decay = fixed, per_token, decay
        self._skip = warmup  # first steps pay one-off costs (allocation, kernel set-up): not evidence
        self._s = [0.0] * 5  # decayed sums: w, w n, w n^2, w t, w n t

    def observe(self, num_tokens: int, seconds: float) -> None:
        if self._skip > 0:
            self._skip -= 1
            return
        d, n, t = self.decay, float(num_tokens), float(seconds)
        s = [x * d for x in self._s]
        s[0] += 1
        s[1] += n
        s[2] += n * n
        s[3] += t
        s[4] += n * t
        self._s = s
        det = s[0] * s[2] - s[1] * s[1]
        if s[0] >= 3 and det > 1e-9 * max(s[0] * s[2], 1e-12):
            slope = (s[0] * s[4] - s[1] * s[3]) / det
            icpt = (s[3] - slope * s[1]) / s[0]
            if slope > 0 and icpt > 0:
                self.fixed, self.per_token = icpt, slope
                return
        if s[0] > 0:
            # Not enough spread in n to separate the terms: keep the ratio, rescale the level.
            mean_n, mean_t = s[1] / s[0], s[3] / s[0]
            scale = mean_t / max(self.cost(mean_n), 1e-12)
            self.fixed *= scale
            self.per_token *= scale

    def cost(self, num_tokens: float) -> float:
        return self.fixed + self.per_token * num_tokens


@dataclass
class _Acceptance:
    accepted: float = 0.0
    proposed: float = 0.0
    idle_steps: int = 0


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens one step yields with a ``k``-token draft at per-token acceptance ``a``."""
    a = min(max(acceptance, 0.0), 0.999999)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class DraftLengthController:
    """Chooses per-request draft lengths for each step and learns from the verification results."""

    def __init__(self, config: SpecConfig, cost: StepCostModel | None = None) -> None:
        self.config = config
        self.cost = cost or StepCostModel()
        self._acc: dict[str, _Acceptance] = {}
        self.total_proposed = 0
        self.total_accepted = 0

    def acceptance(self, request_id: str) -> float:
        c = self.config
        s = self._acc.get(request_id) or _Acceptance()
        return (s.accepted + c.prior_acceptance * c.prior_weight) / (s.proposed + c.prior_weight)

    def draft_lengths(self, request_ids: list[str], available: list[int], other_tokens: int = 0) -> list[int]:
        """Draft tokens to verify for each decoding request this step.

        ``available[i]`` is how many draft tokens the drafter has for request ``i`` (0 when no
        n-gram matched); ``other_tokens`` counts the step's prefill tokens, which share the cost.

        The ``j``-th draft token of request ``i`` adds ``a_i ** j`` expected tokens, falling in
        ``j``, so the best allocation of ``m`` draft tokens takes the ``m`` largest of those
        marginal gains over all requests; ``m`` is chosen to maximise goodput. Prefill tokens
        count as useful work too: a draft token must beat the token budget's other uses.
        """
        c = self.config
        n = len(request_ids)
        if not c.enabled or n == 0:
            return [0] * n
        if not any(available):
            return [0] * n  # nothing to draft: the common case, kept free of array work
        caps = np.minimum(np.asarray(available, dtype=np.int64), c.max_draft)
        acc = np.array([self.acceptance(r) for r in request_ids])
        j = np.arange(1, c.max_draft + 1)
        gains = acc[:, None] ** j[None, :]  # [n, max_draft]
        valid = j[None, :] <= caps[:, None]
        flat = np.where(valid, gains, -1.0).ravel()
        order = np.argsort(-flat, kind="stable")[: int(valid.sum())]
        base = n + other_tokens
        m = np.arange(0, len(order) + 1)
        goodput = (base + np.concatenate([[0.0], np.cumsum(flat[order])])) / (self.cost.fixed + self.cost.per_token * (base + m))
        best = int(np.argmax(goodput))
        if goodput[best] < goodput[0] * c.min_gain:
            best = 0
        ks = np.bincount(order[:best] // c.max_draft, minlength=n) if best else np.zeros(n, dtype=np.int64)
        out = ks.tolist()
        for i, rid in enumerate(request_ids):
            s = self._acc.setdefault(rid, _Acceptance())
            if out[i] == 0 and caps[i] > 0:
                s.idle_steps += 1
                if s.idle_steps >= c.probe_interval:
                    out[i] = 1  # re-measure a request whose estimate went stale
                    s.idle_steps = 0
        return out

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """Feeds one verification result back (``proposed`` draft tokens, ``accepted`` of them)."""
        if proposed <= 0:
            return
        d = self.config.ema_decay
        s = self._acc.setdefault(request_id, _Acceptance())
        s.accepted = s.accepted * d + accepted
        s.proposed = s.proposed * d + proposed
        s.idle_steps = 0
        self.total_proposed += proposed
        self.total_accepted += accepted

    def forget(self, request_id: str) -> None:
        self._acc.pop(request_id, None)

    @property
    def acceptance_rate(self) -> float:
        return self.total_accepted / self.total_proposed if self.total_proposed else 0.0
