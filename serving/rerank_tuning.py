"""The rerank's blend weight, learned online from the clicks serving already follows.

The rerank orders the DLRM's top items by ``(1 - w) z_dlrm + w z_llm`` (:mod:`serving.rerank`).
How much the LLM's opinion is worth depends on the LLM, the catalog and the users, so ``w`` is
measured on this process's own traffic instead of being tuned offline:

- Every reranked call is remembered for ``horizon_ms`` (bounded: at most ``max_calls`` calls,
  ``calls_per_user`` per user, the least recently served users first out): the user, the
  reranked items and both models' z-scores (as the blend standardised them), and when. A
  degraded call (DLRM order, no LLM scores) is not: no weight changes what it served.
- The live history (``hw.actions`` through :class:`serving.user_history.UserHistory`) hands the
  tuner every interaction it applies. A positive one (``positive_kinds``) on an item of one of the
  user's remembered calls, within the horizon, is an *outcome* of the newest such call (once per
  call and item).
- The blend under any weight is a function of the two z-scores alone, so each outcome is
  replayed under every weight of :data:`GRID` at no cost (no LLM call, no exploration traffic):
  the clicked item's rank among the call's reranked items gives a DCG gain
  ``1 / log2(1 + rank)`` per weight. This is counterfactual (off-policy) evaluation of rankers on
  logged clicks (Joachims, Swaminathan and Schnabel, WSDM 2017), done online. DCG rather than
  the reciprocal rank because the team reads NDCG@k, and a click at rank 3 vs 2 should not
  matter as much as 2 vs 1 does under RR.
- Per weight, the gains are averaged with an exponential decay (``half_life`` outcomes), so the
  weight follows drift (a new LLM, a changing catalog).
- The served weight is ``default_weight`` until ``min_outcomes`` outcomes, then the *smallest*
  weight whose mean gain is within one standard error of the best weight's. Every outcome scores
  every weight, so the standard error is that of the paired difference (far smaller than that of
  two independent means). This is the one-standard-error rule of model selection (Breiman et al.,
  CART; Hastie, Tibshirani and Friedman, ESL 7.10): among models the data cannot tell apart, the
  simplest, here the one that leans least on the LLM (it costs latency, can fail or drift, and the
  DLRM is what the system already validates). An LLM that adds nothing sinks to weight 0; one
  that helps gets its weight once it has won by more than the noise.

Interleaving (Radlinski, Kurup and Joachims 2008; Chapelle, Joachims, Radlinski and Yue 2012)
would compare rankers without the position bias below, but it changes what is served and compares
two rankers per impression; replay compares all eleven on every click and serves the chosen one.

What the rule assumes (and where it is biased):

- *Only shown items are clicked.* All the reranked top ``rerank_top_n`` are shown, in some order,
  when a call returns at least that many (``top_k >= rerank_top_n``), so every weight's ranking is
  a permutation of shown items and a click says which item the user preferred among them. Items
  below the top ``rerank_top_n`` are ordered by the DLRM under every weight and do not enter. A
  call that returns fewer hides the items the served blend cut: they cannot be clicked, which
  favours the served weight.
- *Position bias.* Users click higher positions more, so clicks lean toward the top of the
  served order, which also favours the served weight: the rule then keeps what it serves unless
  another weight wins clearly (conservative, never worse than the status quo, slower to leave
  it). ``position_bias`` (eta) weights each click by the inverse of its examination propensity
  ``rank_shown ** -eta`` (the inverse-propensity estimator of Joachims et al. 2017): 0 assumes a
  click among the reranked items does not depend on where it was shown (a grid, a short
  carousel; the bench's synthetic world), about 1 suits a vertical list whose attention falls
  as 1 / rank.
- *A click is credited to the newest remembered call that showed the item,* within the horizon:
  a click the user would have made anyway counts too, which adds noise but no bias between
  weights.

Time is the stream's event time, as in :class:`~serving.user_history.UserHistory`: a call is
stamped with the newest event time seen, and calls expire as event time moves past their
horizon. Calls are not remembered while ``live()`` is false (the runtime: until the history has
caught up with ``hw.actions``, whose replayed backlog is not an outcome of this process's calls).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from serving import metrics as m
from serving.user_history import Interaction, UserHistory

__all__ = ["GRID", "TuningConfig", "WeightTuner", "ObservedHistory", "blend_ranks"]

GRID = np.round(np.linspace(0.0, 1.0, 11), 1)  # the weights compared: 0, 0.1, ..., 1


@dataclass(frozen=True)
class TuningConfig:
    """The tuner's knobs (``RerankConfig.tuning()`` builds one from the ``rerank_tuning_*`` flags)."""

    default_weight: float = 0.5
    min_outcomes: int = 200
    horizon_ms: int = 600_000
    half_life: float = 5000.0  # outcomes after which an outcome counts half
    positive_kinds: frozenset[str] = field(default_factory=lambda: frozenset({"click"}))
    max_calls: int = 50_000
    calls_per_user: int = 4
    position_bias: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.default_weight <= 1.0:
            raise ValueError(f"default_weight must be in [0, 1], got {self.default_weight}")
        if self.min_outcomes < 0 or self.horizon_ms <= 0 or self.half_life <= 0:
            raise ValueError("rerank_tuning_min_outcomes must be >= 0, its horizon and half-life positive")
        if self.max_calls <= 0 or self.calls_per_user <= 0 or self.position_bias < 0:
            raise ValueError("rerank_tuning_calls must be positive and rerank_tuning_position_bias >= 0")
        if not self.positive_kinds:
            raise ValueError("rerank_tuning_kinds names no action kind")


def blend_ranks(z: np.ndarray, item_ids: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """1-based rank of item ``k`` under each weight's blend of ``z = [z_dlrm, z_llm]`` (2 x n),
    with the rerank's order: blended score desc, then item id asc."""
    b = (1.0 - weights)[:, None] * z[0][None, :] + weights[:, None] * z[1][None, :]  # as blend()
    own = b[:, k:k + 1]
    return 1 + (b > own).sum(axis=1) + ((b == own) & (item_ids < item_ids[k])[None, :]).sum(axis=1)


@dataclass(slots=True)
class _Call:
    items: np.ndarray  # int64[n], the reranked items
    z: np.ndarray  # float64[2, n]: z(logit p_dlrm), z(llm score)
    weight: float  # the weight it was served with
    time_ms: int
    credited: np.ndarray  # bool[n]: items whose click already counted


class WeightTuner:
    """Remembers reranked calls, turns later clicks on their items into per-weight gains, and
    picks the served weight (see the module doc). Thread-safe: the history follower's thread
    observes while the event loop records and reads ``weight``."""

    def __init__(self, cfg: TuningConfig | None = None) -> None:
        self.cfg = cfg = cfg or TuningConfig()
        cfg.validate()
        self._per_user = min(cfg.calls_per_user, cfg.max_calls)
        self._users: OrderedDict[int, deque[_Call]] = OrderedDict()  # least recently served first
        self._calls = 0
        self._lock = threading.Lock()
        self._decay = 0.5 ** (1.0 / cfg.half_life)
        self._mass = self._mass2 = 0.0  # sum of the outcomes' decayed weights, and of their squares
        self._sum = np.zeros(GRID.size)  # decayed sums of the gains, per weight
        self._outer = np.zeros((GRID.size, GRID.size))  # ... and of their products, per pair of weights
        self.now_ms = 0  # the newest event time observed
        self.outcomes = 0
        self.weight = cfg.default_weight  # the weight served now
        self.live: Callable[[], bool] = lambda: True
        m.RERANK_TUNED_WEIGHT.set(self.weight)

    def __len__(self) -> int:
        """Calls remembered now."""
        return self._calls

    def record(self, user_id: int, item_ids: np.ndarray, z_dlrm: np.ndarray, z_llm: np.ndarray,
               weight: float) -> None:
        """Remember one reranked call: its items and the z-scores the blend weighed."""
        if not self.live():
            return
        items = np.array(item_ids, np.int64)
        call = _Call(items, np.stack([np.asarray(z_dlrm, np.float64), np.asarray(z_llm, np.float64)]),
                     float(weight), self.now_ms, np.zeros(items.size, bool))
        with self._lock:
            calls = self._users.get(user_id)
            if calls is None:
                calls = self._users[user_id] = deque(maxlen=self._per_user)
            else:
                self._users.move_to_end(user_id)
                if len(calls) == calls.maxlen:
                    self._calls -= 1  # the append drops the user's oldest call
            calls.append(call)
            self._calls += 1
            while self._calls > self.cfg.max_calls:
                self._calls -= len(self._users.popitem(last=False)[1])
            self._expire()

    def observe(self, events: Iterable[tuple[int, Interaction]]) -> None:
        """Interactions as the live history applies them: positive ones on a remembered call's
        items are outcomes."""
        cfg = self.cfg
        rows = []
        with self._lock:
            for user_id, it in events:
                self.now_ms = max(self.now_ms, it.time_ms)
                calls = self._users.get(user_id) if it.kind in cfg.positive_kinds else None
                for call in reversed(calls or ()):  # the newest call that showed the item
                    if it.time_ms > call.time_ms + cfg.horizon_ms:
                        break  # older calls are older still
                    hit = np.flatnonzero(call.items == it.item_id)
                    if hit.size:
                        if not call.credited[hit[0]]:
                            call.credited[hit[0]] = True
                            rows.append(self._gains(call, int(hit[0])))
                        break
            if rows:
                self._learn(np.stack(rows))
            self._expire()

    def _gains(self, call: _Call, k: int) -> np.ndarray:
        gain = 1.0 / np.log2(1.0 + blend_ranks(call.z, call.items, GRID, k))
        if self.cfg.position_bias:
            shown = blend_ranks(call.z, call.items, np.array([call.weight]), k)[0]
            gain *= float(shown) ** self.cfg.position_bias  # 1 / propensity of the shown rank
        return gain

    def _learn(self, gains: np.ndarray) -> None:
        n = gains.shape[0]
        age = self._decay ** np.arange(n - 1, -1, -1)  # the last row is the newest
        keep = self._decay ** n
        self._sum = self._sum * keep + age @ gains
        self._outer = self._outer * keep + (gains * age[:, None]).T @ gains
        self._mass = self._mass * keep + float(age.sum())
        self._mass2 = self._mass2 * keep * keep + float((age * age).sum())
        self.outcomes += n
        self.weight = self._choose()
        m.RERANK_TUNING_OUTCOMES.inc(n)
        m.RERANK_TUNED_WEIGHT.set(self.weight)

    def _choose(self) -> float:
        """The smallest weight within one paired standard error of the best (module doc)."""
        if self.outcomes < self.cfg.min_outcomes:
            return self.cfg.default_weight
        mean = self._sum / self._mass
        best = int(np.argmax(mean))
        second = self._outer / self._mass
        gap = mean[best] - mean
        var = second[best, best] + np.diag(second) - 2.0 * second[best] - gap * gap
        n_eff = self._mass * self._mass / self._mass2  # Kish's effective sample size
        se = np.sqrt(np.maximum(var, 0.0) / n_eff)
        return float(GRID[np.flatnonzero(gap <= se)[0]])

    def mean_gains(self) -> np.ndarray:
        """The decayed mean DCG gain of each weight of :data:`GRID` (NaN before any outcome)."""
        with self._lock:
            return self._sum / self._mass if self._mass else np.full(GRID.size, np.nan)

    def _expire(self) -> None:
        """Forget users whose newest call is past the horizon (the front is the oldest)."""
        horizon = self.now_ms - self.cfg.horizon_ms
        while self._users:
            calls = next(iter(self._users.values()))
            if calls[-1].time_ms >= horizon:
                break
            self._calls -= len(self._users.popitem(last=False)[1])


class ObservedHistory(UserHistory):
    """A :class:`UserHistory` that also hands every batch of interactions it applies to
    ``observer`` (the runtime's :meth:`WeightTuner.observe`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.observer: Callable[[list[tuple[int, Interaction]]], None] | None = None

    def extend(self, events: list[tuple[int, Interaction]]) -> None:
        super().extend(events)
        if self.observer is not None:
            self.observer(events)
