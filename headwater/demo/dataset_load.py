"""The demo's Recommend load on a replayed log: users and candidates the served model knows.

The generator's load draws ids from the generator's ranges; a log has ids of its own (integer
cells as they are, other cells hashed, ``streams.log_schema.entity_ids``). :class:`DatasetLoadClient`
draws from the log's users and items in the order the replay first sends them, and only from those
the served model already has rows for: it asks serving (``GetEmbeddings``) about the next ids of
the log every ``refresh_s``, so the calls follow the replay as the model learns it. When it stops
it asks once more about every item it sent, which the summary reports as
``serving_known_item_share``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from headwater.demo.load import LoadClient

log = logging.getLogger(__name__)

__all__ = ["DatasetLoadClient"]

PROBE_IDS = 4096  # ids asked about per slot per refresh (serving takes up to 10k per call)


class DatasetLoadClient(LoadClient):
    """A :class:`LoadClient` whose users and candidates are ids of the log known to serving."""

    def __init__(self, target: str, qps: float, users: np.ndarray, items: np.ndarray,
                 candidates: int = 100, seed: int = 0, user_slot: str = "user_id",
                 item_slot: str = "item_id", refresh_s: float = 0.5) -> None:
        super().__init__(target, qps, candidates=candidates, seed=seed)
        self.slots = {"user": user_slot, "item": item_slot}
        self.log_ids = {"user": np.asarray(users, np.int64), "item": np.asarray(items, np.int64)}
        self.known = {k: np.zeros(0, np.int64) for k in self.slots}
        self._frontier = {k: 0 for k in self.slots}
        self.refresh_s = refresh_s
        self._refreshed = float("-inf")
        self._sent: list[np.ndarray] = []
        self.known_item_share: float | None = None

    def request(self, stub) -> "object | None":
        from serving.pb import pb2

        users, items = self.known["user"], self.known["item"]
        # Asked on every tick until serving knows some ids (a replay can be short), then every
        # refresh_s.
        if not users.size or not items.size or time.monotonic() - self._refreshed >= self.refresh_s:
            self._refreshed = time.monotonic()
            self._discover(stub)
            users, items = self.known["user"], self.known["item"]
        if not users.size or not items.size:
            return None
        candidates = items[self.rng.integers(items.size, size=self.candidates)]
        self._sent.append(candidates)
        return pb2.RecommendRequest(user_id=int(users[self.rng.integers(users.size)]),
                                    candidate_item_ids=candidates.tolist(), top_k=10)

    def _known(self, stub, slot: str, ids: np.ndarray) -> np.ndarray | None:
        """Which of ``ids`` the served model has rows for (None: serving cannot say yet)."""
        import grpc

        from serving.pb import pb2

        try:
            resp = stub.GetEmbeddings(pb2.GetEmbeddingsRequest(slot=slot, ids=ids.tolist()), timeout=2.0)
        except grpc.RpcError as exc:  # no model yet (UNAVAILABLE), or one without the slot
            log.debug("GetEmbeddings(%s) failed: %s", slot, exc.code())
            return None
        return np.fromiter((e.known for e in resp.embeddings), bool, len(resp.embeddings))

    def _discover(self, stub) -> None:
        """Adds the next known ids of the log to the pools; the frontier moves past the last one."""
        for k, slot in self.slots.items():
            lo = self._frontier[k]
            window = self.log_ids[k][lo:lo + PROBE_IDS]
            if not window.size:
                continue
            known = self._known(stub, slot, window)
            if known is None or known.size != window.size or not known.any():
                continue
            self.known[k] = np.concatenate([self.known[k], window[known]])
            self._frontier[k] = lo + int(np.flatnonzero(known)[-1]) + 1

    def settle(self, calls: int = 20, timeout_s: float = 10.0) -> int:
        """Waits until ``calls`` more calls were made (or ``timeout_s``): a replay can end a
        second after serving learned its first items, and the load's figures should include
        calls on the model of the whole log. Returns the calls made meanwhile."""
        start, deadline = self.calls, time.monotonic() + timeout_s
        while self.calls - start < calls and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return self.calls - start

    def stop(self) -> None:
        super().stop()
        self.known_item_share = self._final_check()

    def _final_check(self) -> float | None:
        """The share of the distinct items sent that the served model knows now."""
        import grpc

        from serving.pb import pb2_grpc

        if not self._sent:
            return None
        sent = np.unique(np.concatenate(self._sent))
        if sent.size > PROBE_IDS:
            sent = self.rng.choice(sent, PROBE_IDS, replace=False)
        channel = grpc.insecure_channel(self.target)
        try:
            known = self._known(pb2_grpc.RecommenderStub(channel), self.slots["item"], sent)
        finally:
            channel.close()
        return None if known is None else round(float(known.mean()), 4)

    def summary(self) -> dict:
        """What the demo's summary reports of this load."""
        return {"serving_ids": "dataset", "serving_known_items": int(self.known["item"].size),
                "serving_known_item_share": self.known_item_share}
