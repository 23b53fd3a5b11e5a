"""A small steady Recommend load for the demo, so serving latency is measured on live traffic."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)


class LoadClient:
    """Sends ``Recommend`` calls at a fixed rate from one thread and records their latency."""

    def __init__(self, target: str, qps: float, candidates: int = 100, items: int = 50_000,
                 users: int = 10_000, seed: int = 0) -> None:
        self.target, self.qps, self.candidates = target, qps, candidates
        self.items, self.users = items, users
        self.rng = np.random.default_rng(seed)
        self.latencies_ms: list[float] = []
        self.calls = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
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
            t0 = time.perf_counter()
            try:
                stub.Recommend(req, timeout=1.0)
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


class LLMLoadClient:
    """Alternates a ``/v1/rank`` call and a short ``/v1/completions`` call every ``period_s``."""

    CONTEXT = "The user loved Dune, The Expanse and Blade Runner. Next they want to watch:"
    CANDIDATES = [" Star Wars", " The Notebook", " Interstellar", " Pride and Prejudice", " Alien"]

    def __init__(self, base_url: str, period_s: float = 2.0) -> None:
        self.base_url, self.period_s = base_url, period_s
        self.calls = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-llm-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=30.0) as client:
            turn = 0
            while not self._stop.wait(self.period_s):
                try:
                    if turn % 2 == 0:
                        r = client.post("/v1/rank", json={"context": self.CONTEXT,
                                                          "candidates": self.CANDIDATES,
                                                          "method": "loglik"})
                    else:
                        r = client.post("/v1/completions", json={
                            "prompt": self.CONTEXT, "max_tokens": 16})
                    if r.status_code == 503:  # still loading the model
                        continue
                    r.raise_for_status()
                    self.calls += 1
                except httpx.ConnectError:  # the server is still starting
                    continue
                except httpx.HTTPError as exc:
                    self.errors += 1
                    log.debug("LLM call failed: %s", exc)
                turn += 1
