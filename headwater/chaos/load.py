"""Recommend load over several serving replicas, failing over the way a client-side balancer does.

Each call goes to the next replica in turn; a replica that fails (UNAVAILABLE: killed or still
starting) is skipped for that call and the next one is tried. A call counts as an *error* only
when no replica answered it: that is what "serving answered throughout" measures. Per replica
the client keeps the time of its last answer, so the fault driver can tell when a restarted
replica answers again.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["FailoverLoadClient"]


class FailoverLoadClient:
    """Sends ``Recommend`` at ``qps`` from one thread across ``targets`` with failover."""

    def __init__(self, targets: list[str], qps: float = 20.0, candidates: int = 50,
                 items: int = 50_000, users: int = 10_000, timeout_s: float = 1.0,
                 seed: int = 0) -> None:
        self.targets, self.qps, self.candidates = targets, qps, candidates
        self.items, self.users, self.timeout_s = items, users, timeout_s
        self.rng = np.random.default_rng(seed)
        self.calls = self.answered = self.errors = self.failovers = 0
        self.last_ok = {t: 0.0 for t in targets}  # monotonic time of each replica's last answer
        self.latencies_ms: list[float] = []
        self.ready = threading.Event()  # set at the first answered call
        self._counting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def count_from_now(self) -> None:
        """Calls made before this (while serving was still loading its first model) are not counted."""
        self.calls = self.answered = self.errors = self.failovers = 0
        self.latencies_ms.clear()
        self._counting = True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict:
        lat = self.latencies_ms
        return {"calls": self.calls, "answered": self.answered, "errors": self.errors,
                "failovers": self.failovers,
                "p99_ms": float(np.percentile(lat, 99)) if lat else None}

    def _run(self) -> None:
        import grpc

        from serving.pb import pb2, pb2_grpc

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
            req = pb2.RecommendRequest(
                user_id=int(self.rng.integers(self.users)),
                candidate_item_ids=self.rng.integers(self.items, size=self.candidates).tolist(),
                top_k=10)
            ok = False
            t0 = time.perf_counter()
            for attempt in range(len(stubs)):
                i = (turn + attempt) % len(stubs)
                try:
                    stubs[i].Recommend(req, timeout=self.timeout_s)
                except grpc.RpcError as exc:
                    log.debug("replica %s: %s", self.targets[i], exc.code())
                    continue
                self.last_ok[self.targets[i]] = time.monotonic()
                self.failovers += attempt
                ok = True
                break
            turn += 1
            if ok:
                self.ready.set()
                self.answered += 1
                self.latencies_ms.append((time.perf_counter() - t0) * 1000)
            elif self._counting:
                self.errors += 1
            self.calls += 1
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))
        for c in channels:
            c.close()
