"""Synthetic feedback with a hidden ground-truth preference model, deterministic under a seed.

Users and items have latent vectors; the true click probability of user u on item i at time t is

    p = sigmoid(bias + scale * <u(t), v_i> + pop_weight * log_popularity_i)

where ``u(t)`` rotates between two fixed vectors of the user with a per-user phase (interests
drift with event time) and item exposure follows a Zipf law (a few items are shown very often).
Each impression carries ``truth_p`` so a learner's AUC can be compared with the best achievable.
Generation is vectorised per block of requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import msgpack
import numpy as np

from streams.events import SCHEMA_VERSION


@dataclass
class GeneratorConfig:
    """Configuration of ``headwater generate`` (and the benchmark's source)."""

    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"help": "Kafka bootstrap servers"})
    topic_prefix: str = field(default="hw", metadata={"help": "topic name prefix"})
    seed: int = field(default=0, metadata={"help": "random seed: same seed, same stream"})
    users: int = field(default=10_000, metadata={"help": "number of users"})
    items: int = field(default=50_000, metadata={"help": "number of items"})
    dim: int = field(default=16, metadata={"help": "latent dimension of the hidden model"})
    items_per_request: int = field(default=20, metadata={"help": "items shown per request"})
    zipf_a: float = field(default=1.1, metadata={"help": "Zipf exponent of item exposure"})
    bias: float = field(default=-3.5, metadata={"help": "base logit (sets the click rate)"})
    scale: float = field(default=2.0, metadata={"help": "weight of the user-item affinity"})
    pop_weight: float = field(default=0.15, metadata={"help": "weight of log popularity"})
    drift_period_s: float = field(default=3600.0, metadata={"help": "event-time period of interest drift"})
    request_interval_ms: float = field(default=5.0, metadata={"help": "event-time gap between requests"})
    start_time_ms: int = field(default=1_700_000_000_000, metadata={"help": "event time of the first request"})
    max_action_delay_ms: int = field(default=30_000, metadata={"help": "clicks follow within this delay"})
    categories: int = field(default=64, metadata={"help": "item categories (an item sparse slot)"})
    requests: int = field(default=0, metadata={"help": "requests to produce (0 = until stopped)"})
    events_per_s: float = field(default=0.0, metadata={"help": "rate limit in events/s (0 = max speed)"})
    final_watermark: bool = field(default=True, metadata={"help": "send an end-of-stream watermark"})

    def validate(self) -> None:
        if min(self.users, self.items, self.dim, self.items_per_request) <= 0:
            raise ValueError("users, items, dim and items_per_request must be positive")
        if self.items_per_request > self.items:
            raise ValueError("items_per_request cannot exceed items (items are distinct per request)")
        if self.requests < 0 or self.events_per_s < 0 or self.request_interval_ms <= 0:
            raise ValueError("requests and events_per_s must be >= 0, request_interval_ms > 0")


@dataclass
class Block:
    """One block of requests, columnar: what a producer needs and what tests check."""

    request_index: np.ndarray  # int64[R]
    user_id: np.ndarray  # int64[R]
    event_time_ms: np.ndarray  # int64[R]
    items: np.ndarray  # int64[R, k]
    truth_p: np.ndarray  # float32[R, k]
    clicked: np.ndarray  # bool[R, k]
    click_time_ms: np.ndarray  # int64[R, k]


class SyntheticStream:
    """The hidden world: latent users and items, a popularity law, drifting interests."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        d = cfg.dim
        self.user_a = rng.normal(0, 1 / math.sqrt(d), (cfg.users, d)).astype(np.float32)
        self.user_b = rng.normal(0, 1 / math.sqrt(d), (cfg.users, d)).astype(np.float32)
        self.user_phase = rng.uniform(0, 2 * math.pi, cfg.users)
        self.item_v = rng.normal(0, 1, (cfg.items, d)).astype(np.float32)
        # Item ids are a random permutation of ranks, so popularity is not the id order.
        weights = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf_a
        self.item_of_rank = rng.permutation(cfg.items)
        self.popularity = np.empty(cfg.items)
        self.popularity[self.item_of_rank] = weights / weights.sum()
        self._cdf = np.cumsum(weights / weights.sum())
        self.category = (np.abs(self.item_v[:, :4]).argmax(1) * (cfg.categories // 4 or 1)
                         + np.arange(cfg.items) % max(1, cfg.categories // 4)) % max(1, cfg.categories)
        self._rng = np.random.default_rng(cfg.seed + 1)
        self._next = 0

    def user_vectors(self, users: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
        angle = (2 * math.pi * (time_ms - self.cfg.start_time_ms) / (self.cfg.drift_period_s * 1000)
                 + self.user_phase[users])[:, None]
        return np.cos(angle) * self.user_a[users] + np.sin(angle) * self.user_b[users]

    def truth_p(self, users: np.ndarray, items: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
        """Ground-truth click probability, shape of ``items`` ([R, k]) for users/times [R]."""
        u = self.user_vectors(users, time_ms)
        affinity = np.einsum("rd,rkd->rk", u, self.item_v[items])
        logit = (self.cfg.bias + self.cfg.scale * affinity
                 + self.cfg.pop_weight * np.log(self.popularity[items] * self.cfg.items))
        return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

    def _sample_items(self, r: int, k: int) -> np.ndarray:
        """Zipf-distributed items, distinct within each request."""
        k = min(k, self.cfg.items)
        ranks = np.searchsorted(self._cdf, self._rng.random((r, k)))
        ranks = np.minimum(ranks, self.cfg.items - 1)
        for _ in range(8):  # re-draw duplicates uniformly; converges in a couple of rounds
            ranks.sort(axis=1)
            dup = np.zeros_like(ranks, dtype=bool)
            dup[:, 1:] = ranks[:, 1:] == ranks[:, :-1]
            if not dup.any():
                break
            ranks[dup] = self._rng.integers(0, self.cfg.items, int(dup.sum()))
        else:
            for row in np.flatnonzero((np.diff(np.sort(ranks, 1), axis=1) == 0).any(1)):
                ranks[row] = self._rng.choice(self.cfg.items, k, replace=False)
        items = self.item_of_rank[ranks]
        return self._rng.permuted(items, axis=1)  # shown order is not rank order

    def block(self, r: int) -> Block:
        cfg = self.cfg
        idx = np.arange(self._next, self._next + r, dtype=np.int64)
        self._next += r
        users = self._rng.integers(0, cfg.users, r)
        times = (cfg.start_time_ms + idx * cfg.request_interval_ms).astype(np.int64)
        items = self._sample_items(r, cfg.items_per_request)
        p = self.truth_p(users, items, times)
        clicked = self._rng.random(p.shape) < p
        delay = self._rng.integers(1, max(2, cfg.max_action_delay_ms), p.shape)
        return Block(idx, users.astype(np.int64), times, items.astype(np.int64), p, clicked,
                     times[:, None] + delay)

    def messages(self, block: Block) -> Iterator[tuple[str, bytes]]:
        """("impressions" | "actions", msgpack bytes) per request, impressions first.

        Encoded straight from the columns (the generator's output is valid by construction, so
        the per-field validation of :mod:`streams.events` is skipped here); the wire form is the
        same one :func:`streams.events.decode_event` reads.
        """
        seed = self.cfg.seed
        users = block.user_id.tolist()
        times = block.event_time_ms.tolist()
        items = block.items.tolist()
        truth = np.round(block.truth_p.astype(np.float64), 6).tolist()
        cats = self.category[block.items].tolist()
        segments = (block.user_id % 100).tolist()
        pack = msgpack.Packer(use_bin_type=True).pack
        for r, ridx in enumerate(block.request_index.tolist()):
            rid = f"g{seed}-{ridx}"
            yield "impressions", pack({
                "v": SCHEMA_VERSION, "t": "imp", "request_id": rid, "user_id": users[r],
                "event_time_ms": times[r], "items": items[r],
                "item_sparse": {"category": [[c] for c in cats[r]]},
                "user_sparse": {"segment": [segments[r]]}, "dense": None, "truth_p": truth[r]})
            hit = np.flatnonzero(block.clicked[r])
            if hit.size:
                n = int(hit.size)
                yield "actions", pack({
                    "v": SCHEMA_VERSION, "t": "act", "request_id": [rid] * n,
                    "user_id": [users[r]] * n, "item_id": block.items[r, hit].tolist(),
                    "kind": ["click"] * n, "value": [1.0] * n,
                    "event_time_ms": block.click_time_ms[r, hit].tolist()})

    def blocks(self, requests: int = 0, block_requests: int = 512) -> Iterator[Block]:
        """Blocks of ``block_requests`` until ``requests`` (0 = forever); the stream for a seed
        depends on the block size too, so producers and checkers must use the same one."""
        done = 0
        while not requests or done < requests:
            r = block_requests if not requests else min(block_requests, requests - done)
            yield self.block(r)
            done += r

    @staticmethod
    def count_events(block: Block) -> int:
        """Input events of a block: every shown item plus every action."""
        return int(block.items.size + block.clicked.sum())


def produce_synthetic(cfg: GeneratorConfig, producer, topics, stop=None, on_progress=None,
                      block_requests: int = 512) -> tuple[int, int]:
    """Sends ``cfg.requests`` requests (0 = until ``stop``); returns (events, requests) sent."""
    from streams import metrics
    from streams.replay import Pacer, send_final_watermark

    world = SyntheticStream(cfg)
    events = requests = 0
    last_t = 0
    pacer = Pacer(cfg.events_per_s / max(1, cfg.items_per_request) * cfg.request_interval_ms / 1000
                  if cfg.events_per_s > 0 else 0.0)
    for block in world.blocks(cfg.requests, block_requests):
        if stop is not None and stop.is_set():
            break
        r = len(block.request_index)
        pacer.wait_for(int(block.event_time_ms[0]), stop)
        for topic, value in world.messages(block):
            producer.send(getattr(topics, topic), value)
        events += world.count_events(block)
        requests += r
        last_t = max(last_t, int(block.click_time_ms.max()))
        if on_progress is not None:
            on_progress(events)
    if cfg.final_watermark and cfg.requests and events:
        send_final_watermark(producer, topics, last_t)
    producer.flush()
    metrics.PRODUCED.labels("generator").inc(events)
    return events, requests
