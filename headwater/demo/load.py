"""A small steady Recommend load for the demo, so serving latency is measured on live traffic;
with ``rerank_every``, some of its calls are the LLM's rerank traffic (``serve --llm``); with
``retrieve_every``, some send no candidates, so serving retrieves them (retrieval → ranking)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

RERANK_TOP_N = 10  # candidates a rerank call of the load asks the LLM to rerank


class LoadClient:
    """Sends ``Recommend`` calls at a fixed rate from one thread and records their latency."""

    def __init__(self, target: str, qps: float, candidates: int = 100, items: int = 50_000,
                 users: int = 10_000, seed: int = 0) -> None:
        self.target, self.qps, self.candidates = target, qps, candidates
        self.items, self.users = items, users
        self.rng = np.random.default_rng(seed)
        self.latencies_ms: list[float] = []
        self.calls = self.errors = 0
        # Every rerank_every-th call asks serving's LLM to rerank (serve --llm; 0 = none).
        self.rerank_every = 0
        self.rerank_asked = self.reranked = 0
        self.rerank_reasons: dict[str, int] = {}  # degraded calls by reason
        # Every retrieve_every-th call sends no candidates: serving retrieves them (0 = never).
        self.retrieve_every = 0
        self.retrieval_sources: dict[str, int] = {}  # retrieval calls by candidate_source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (serving may never have opened)
            self._thread.join(timeout=5)

    def p99_ms(self, all_calls: bool = False) -> float:
        """p99 latency of successful calls (the last 500, or all of them)."""
        lat = self.latencies_ms if all_calls else self.latencies_ms[-500:]
        return float(np.percentile(lat, 99)) if lat else float("nan")

    def request(self, stub) -> "object | None":
        """The next ``RecommendRequest`` (None: skip this tick): a random user and candidates
        from the generator's id ranges."""
        from serving.pb import pb2

        return pb2.RecommendRequest(
            user_id=int(self.rng.integers(self.users)),
            candidate_item_ids=self.rng.integers(self.items, size=self.candidates).tolist(),
            top_k=10)

    def _count_rerank(self, resp) -> None:  # noqa: ANN001
        self.rerank_asked += 1
        if resp.reranked:
            self.reranked += 1
        elif resp.degraded:
            self.rerank_reasons[resp.degraded_reason] = self.rerank_reasons.get(resp.degraded_reason, 0) + 1

    def _run(self) -> None:
        import grpc

        from serving.pb import pb2_grpc

        channel = grpc.insecure_channel(self.target)
        stub = pb2_grpc.RecommenderStub(channel)
        period = 1.0 / self.qps
        next_t = time.monotonic()
        while not self._stop.is_set():
            req = self.request(stub)
            if req is None:  # nothing to ask about yet
                next_t = time.monotonic() + period
                self._stop.wait(period)
                continue
            rerank = self.rerank_every > 0 and self.calls % self.rerank_every == 0
            if rerank:
                req.rerank_top_n = RERANK_TOP_N
            retrieve = self.retrieve_every > 0 and (self.calls + 1) % self.retrieve_every == 0
            if retrieve:
                del req.candidate_item_ids[:]
            t0 = time.perf_counter()
            try:
                # A rerank may take the LLM's deadline; it is then answered degraded, not failed.
                resp = stub.Recommend(req, timeout=10.0 if rerank else 1.0)
                if retrieve:
                    src = resp.candidate_source
                    self.retrieval_sources[src] = self.retrieval_sources.get(src, 0) + 1
                if rerank:
                    self._count_rerank(resp)
                else:
                    self.latencies_ms.append((time.perf_counter() - t0) * 1000)
            except grpc.RpcError as exc:
                # UNAVAILABLE until the first snapshot arrives is expected at start.
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    self.errors += 1
                    log.debug("Recommend failed: %s", exc.code())
            self.calls += 1
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))
        channel.close()
