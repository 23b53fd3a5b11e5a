"""Recommend load over several serving replicas, failing over the way a client-side balancer does.

Each call goes to the next replica in turn; a replica that fails (UNAVAILABLE: killed or still
starting) is skipped for that call and the next one is tried. A call counts as an *error* only
when no replica answered it: that is what "serving answered throughout" measures. Per replica
the client keeps the time of its last answer, so the fault driver can tell when a restarted
replica answers again.

With ``rerank_every`` N > 0, every N-th call asks serving's LLM to rerank its top
``rerank_top_n`` (``serve --llm``), with candidates from the catalog's ids (``rerank_items``) and
a longer timeout (``rerank_timeout_s``: the rerank deadline plus the DLRM's time). An answered
rerank call is *reranked* (the LLM reordered its head) or *degraded* (answered in DLRM order:
the LLM was late, failed or had no text); either way it is answered, never an error. What is in
flight (:class:`InFlight`) and how each recent call ended (:meth:`outcome`) let a fault kill a
replica while a rerank is in flight and see who answered that call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["CallOutcome", "FailoverLoadClient", "InFlight"]

_KEPT_OUTCOMES = 256  # recent calls whose outcome is kept (a fault looks one up seconds later)


@dataclass(frozen=True, slots=True)
class InFlight:
    """The call being sent right now: its number, the replica asked, whether it asks a rerank."""

    seq: int
    target: str
    rerank: bool


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How one call ended: the replica that answered ("" = none) and, for a rerank call,
    ``reranked`` (the LLM reordered its head) or ``degraded`` (answered in DLRM order)."""

    answered_by: str
    rerank: bool
    reranked: bool = False
    degraded: bool = False
    degraded_reason: str = ""


class FailoverLoadClient:
    """Sends ``Recommend`` at ``qps`` from one thread across ``targets`` with failover."""

    def __init__(self, targets: list[str], qps: float = 20.0, candidates: int = 50,
                 items: int = 50_000, users: int = 10_000, timeout_s: float = 1.0,
                 seed: int = 0, rerank_every: int = 0, rerank_top_n: int = 10,
                 rerank_items: int | None = None, rerank_timeout_s: float = 2.0) -> None:
        self.targets, self.qps, self.candidates = targets, qps, candidates
        self.items, self.users, self.timeout_s = items, users, timeout_s
        self.rerank_every, self.rerank_top_n = rerank_every, rerank_top_n
        self.rerank_items, self.rerank_timeout_s = rerank_items or items, rerank_timeout_s
        self.rng = np.random.default_rng(seed)
        self.calls = self.answered = self.errors = self.failovers = 0
        self.rerank_asked = self.reranked = self.degraded = 0
        self.degraded_reasons: dict[str, int] = {}
        self.last_ok = {t: 0.0 for t in targets}  # monotonic time of each replica's last answer
        self.last_reranked = {t: 0.0 for t in targets}  # ... and of its last reranked answer
        self.in_flight: InFlight | None = None
        self._outcomes: OrderedDict[int, CallOutcome] = OrderedDict()
        self._outcomes_lock = threading.Lock()  # written by the load thread, read by a fault's
        self._seq = 0
        self.latencies_ms: list[float] = []  # of the plain calls (a rerank call's wait for the LLM is apart)
        self.rerank_latencies_ms: list[float] = []
        self.ready = threading.Event()  # set at the first answered call
        self._counting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def count_from_now(self) -> None:
        """Calls made before this (while serving was still loading its first model) are not counted."""
        self.calls = self.answered = self.errors = self.failovers = 0
        self.rerank_asked = self.reranked = self.degraded = 0
        self.degraded_reasons = {}
        self.latencies_ms.clear()
        self.rerank_latencies_ms.clear()
        self._counting = True

    def outcome(self, seq: int) -> CallOutcome | None:
        """How call ``seq`` ended (None: still in flight, or too long ago)."""
        with self._outcomes_lock:
            return self._outcomes.get(seq)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict:
        lat = self.latencies_ms
        out = {"calls": self.calls, "answered": self.answered, "errors": self.errors,
               "failovers": self.failovers,
               "p99_ms": float(np.percentile(lat, 99)) if lat else None}
        if self.rerank_every > 0:
            out.update(rerank_every=self.rerank_every, rerank_asked=self.rerank_asked,
                       reranked=self.reranked, degraded=self.degraded,
                       degraded_reasons=dict(self.degraded_reasons),
                       rerank_p99_ms=float(np.percentile(self.rerank_latencies_ms, 99))
                       if self.rerank_latencies_ms else None)
        return out

    def request(self, rerank: bool):
        """The next ``RecommendRequest``: a random user and candidates (a rerank call's from the
        catalog's ids, so the LLM has their texts)."""
        from serving.pb import pb2

        items = self.rerank_items if rerank else self.items
        req = pb2.RecommendRequest(user_id=int(self.rng.integers(self.users)),
                                   candidate_item_ids=self.rng.integers(items, size=self.candidates).tolist(),
                                   top_k=10)
        if rerank:
            req.rerank_top_n = self.rerank_top_n
        return req

    def _record(self, seq: int, target: str, rerank: bool, resp) -> None:  # noqa: ANN001
        """Counts one answered call (and its rerank outcome) and remembers how it ended."""
        now = time.monotonic()
        self.last_ok[target] = now
        reranked = degraded = False
        reason = ""
        if rerank:
            reranked, reason = resp.reranked > 0, resp.degraded_reason
            degraded = not reranked
            if reranked:
                self.last_reranked[target] = now
            if self._counting:
                self.reranked += reranked
                self.degraded += degraded
                if degraded:
                    reason = reason or "none"
                    self.degraded_reasons[reason] = self.degraded_reasons.get(reason, 0) + 1
        self._remember(seq, CallOutcome(target, rerank, reranked, degraded, reason))

    def _remember(self, seq: int, outcome: CallOutcome) -> None:
        with self._outcomes_lock:
            self._outcomes[seq] = outcome
            while len(self._outcomes) > _KEPT_OUTCOMES:
                self._outcomes.popitem(last=False)

    def _run(self) -> None:
        import grpc

        from serving.pb import pb2_grpc

        # Reconnect fast: gRPC's default backoff (1 s growing to 120 s) would hide for minutes
        # that a restarted replica is back.
        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]
        channels = [grpc.insecure_channel(t, options=opts) for t in self.targets]
        stubs = [pb2_grpc.RecommenderStub(c) for c in channels]
        period = 1.0 / self.qps
        next_t = time.monotonic()
        turn = 0
        while not self._stop.is_set():
            seq, self._seq = self._seq, self._seq + 1
            rerank = self.rerank_every > 0 and seq % self.rerank_every == 0
            req = self.request(rerank)
            # A rerank may take the LLM's deadline; it is then answered degraded, not failed.
            timeout = self.rerank_timeout_s if rerank else self.timeout_s
            ok = False
            t0 = time.perf_counter()
            for attempt in range(len(stubs)):
                i = (turn + attempt) % len(stubs)
                self.in_flight = InFlight(seq, self.targets[i], rerank)
                try:
                    resp = stubs[i].Recommend(req, timeout=timeout)
                except grpc.RpcError as exc:
                    log.debug("replica %s: %s", self.targets[i], exc.code())
                    continue
                finally:
                    self.in_flight = None
                self._record(seq, self.targets[i], rerank, resp)
                self.failovers += attempt
                ok = True
                break
            if not ok:
                self._remember(seq, CallOutcome("", rerank))
            self.rerank_asked += rerank and self._counting  # answered: reranked + degraded
            turn += 1
            if ok:
                self.ready.set()
                self.answered += 1
                (self.rerank_latencies_ms if rerank else self.latencies_ms).append(
                    (time.perf_counter() - t0) * 1000)
            elif self._counting:
                self.errors += 1
            self.calls += 1
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))
        for c in channels:
            c.close()
