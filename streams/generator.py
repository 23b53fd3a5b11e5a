"""Synthetic feedback with a hidden ground-truth preference model, deterministic under a seed.

The world has shared structure, as real traffic does: every user belongs to one of ``segments``
hidden taste groups and every item to one of ``categories``; a user's taste vector is its
segment's vector plus a small personal deviation, an item's vector is its category's vector plus
its own deviation. The true click probability of user u on item i at event time t is

    p = sigmoid(bias + (scale * <u(t), v_i> + b_u + b_i + pop_weight * log(N * popularity_i))
                / temperature)

with ``<u, v>`` normalised to unit variance, ``u(t)`` rotating between two vectors of the
user's segment (interests drift with event time, phase per segment), per-id biases ``b_u``,
``b_i`` and Zipf-law item exposure (a few items are shown very often). Each impression carries
the user's segment and the item's category as sparse features (the groups are observable, the
vectors are not) and ``truth_p`` so a learner's AUC can be compared with the best achievable.
Generation is vectorised per block of requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
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
    items: int = field(default=5_000, metadata={"help": "number of items"})
    dim: int = field(default=8, metadata={"help": "latent dimension of the hidden model"})
    segments: int = field(default=16, metadata={
        "help": "hidden user taste groups, shared by many users (sparse slot 'segment')"})
    categories: int = field(default=32, metadata={
        "help": "item categories, shared taste of many items (sparse slot 'category')"})
    user_noise: float = field(default=0.15, metadata={
        "help": "std of a user's own taste around its segment's (relative; 0 = segment only)"})
    item_noise: float = field(default=0.15, metadata={
        "help": "std of an item's own vector around its category's (relative; 0 = category only)"})
    user_bias_std: float = field(default=0.1, metadata={"help": "std of per-user click propensity (logits)"})
    item_bias_std: float = field(default=0.4, metadata={"help": "std of per-item quality (logits)"})
    items_per_request: int = field(default=20, metadata={"help": "items shown per request"})
    zipf_a: float = field(default=1.1, metadata={"help": "Zipf exponent of item exposure"})
    bias: float = field(default=-3.0, metadata={"help": "base logit (sets the click rate)"})
    scale: float = field(default=2.0, metadata={"help": "logit std of the user-item affinity"})
    pop_weight: float = field(default=0.15, metadata={"help": "weight of log popularity"})
    temperature: float = field(default=1.0, metadata={
        "help": "divides every non-constant logit term: higher = noisier clicks, lower truth AUC"})
    drift_period_s: float = field(default=3600.0, metadata={"help": "event-time period of interest drift"})
    request_interval_ms: float = field(default=5.0, metadata={"help": "event-time gap between requests"})
    start_time_ms: int = field(default=1_700_000_000_000, metadata={
        "help": "event time of the first request (0 = the wall clock when the first is sent: live "
                "event time, so end-to-end freshness does not count the generator's start-up)"})
    history_s: float = field(default=0.0, metadata={
        "help": "live only (start_time_ms 0): first send the last S seconds of event time at full "
                "speed, then go on at the wall clock: the recent log a new deployment learns "
                "before it serves (0 = start now)"})
    max_action_delay_ms: int = field(default=30_000, metadata={"help": "clicks follow within this delay"})
    requests: int = field(default=0, metadata={"help": "requests to produce (0 = until stopped)"})
    events_per_s: float = field(default=0.0, metadata={"help": "rate limit in events/s (0 = max speed)"})
    final_watermark: bool = field(default=True, metadata={"help": "send an end-of-stream watermark"})

    def validate(self) -> None:
        if min(self.users, self.items, self.dim, self.items_per_request, self.segments,
               self.categories) <= 0:
            raise ValueError("users, items, dim, segments, categories and items_per_request "
                             "must be positive")
        if min(self.user_noise, self.item_noise, self.user_bias_std, self.item_bias_std) < 0:
            raise ValueError("noise and bias stds must be >= 0")
        if self.temperature <= 0 or self.drift_period_s <= 0:
            raise ValueError("temperature and drift_period_s must be positive")
        if self.items_per_request > self.items:
            raise ValueError("items_per_request cannot exceed items (items are distinct per request)")
        if self.requests < 0 or self.events_per_s < 0 or self.request_interval_ms <= 0:
            raise ValueError("requests and events_per_s must be >= 0, request_interval_ms > 0")
        if self.history_s < 0 or (self.history_s > 0 and self.start_time_ms != 0):
            raise ValueError("history_s must be >= 0, and is for a live stream (start_time_ms 0)")


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
        # Shared structure: segment taste (two vectors, drifting between them) and category vectors.
        self.segment_a = rng.normal(0, 1 / math.sqrt(d), (cfg.segments, d)).astype(np.float32)
        self.segment_b = rng.normal(0, 1 / math.sqrt(d), (cfg.segments, d)).astype(np.float32)
        self.segment_phase = rng.uniform(0, 2 * math.pi, cfg.segments)
        self.category_v = rng.normal(0, 1, (cfg.categories, d)).astype(np.float32)
        self.segment = rng.integers(0, cfg.segments, cfg.users)
        self.category = rng.integers(0, cfg.categories, cfg.items)
        # Personal deviations and biases on top of the groups.
        self.user_dev = rng.normal(0, cfg.user_noise / math.sqrt(d), (cfg.users, d)).astype(np.float32)
        self.item_v = (self.category_v[self.category]
                       + rng.normal(0, cfg.item_noise, (cfg.items, d))).astype(np.float32)
        self.user_bias = rng.normal(0, cfg.user_bias_std, cfg.users).astype(np.float32)
        self.item_bias = rng.normal(0, cfg.item_bias_std, cfg.items).astype(np.float32)
        # <u, v> has variance (1 + user_noise^2)(1 + item_noise^2); divide so `scale` is its std.
        self._norm = 1.0 / math.sqrt((1 + cfg.user_noise ** 2) * (1 + cfg.item_noise ** 2))
        # Item ids are a random permutation of ranks, so popularity is not the id order.
        weights = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf_a
        self.item_of_rank = rng.permutation(cfg.items)
        self.popularity = np.empty(cfg.items)
        self.popularity[self.item_of_rank] = weights / weights.sum()
        self._cdf = np.cumsum(weights / weights.sum())
        self._rng = np.random.default_rng(cfg.seed + 1)
        self._next = 0

    def user_vectors(self, users: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
        seg = self.segment[users]
        angle = (2 * math.pi * (time_ms - self.cfg.start_time_ms) / (self.cfg.drift_period_s * 1000)
                 + self.segment_phase[seg])[:, None]
        return (np.cos(angle) * self.segment_a[seg] + np.sin(angle) * self.segment_b[seg]
                + self.user_dev[users])

    def truth_p(self, users: np.ndarray, items: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
        """Ground-truth click probability, shape of ``items`` ([R, k]) for users/times [R]."""
        cfg = self.cfg
        u = self.user_vectors(users, time_ms)
        affinity = np.einsum("rd,rkd->rk", u, self.item_v[items]) * self._norm
        varying = (cfg.scale * affinity + self.user_bias[users][:, None] + self.item_bias[items]
                   + cfg.pop_weight * np.log(self.popularity[items] * cfg.items))
        logit = cfg.bias + varying / cfg.temperature
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
        """("impressions" | "actions", msgpack bytes) per request, impressions first."""
        for topic, _, value in self.keyed_messages(block):
            yield topic, value

    def keyed_messages(self, block: Block) -> Iterator[tuple[str, bytes, bytes]]:
        """("impressions" | "actions", key, msgpack bytes) per request, impressions first; the
        key is the request id, so a request's actions share its impression's partition.

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
        segments = self.segment[block.user_id].tolist()
        pack = msgpack.Packer(use_bin_type=True).pack
        for r, ridx in enumerate(block.request_index.tolist()):
            rid = f"g{seed}-{ridx}"
            key = rid.encode()
            yield "impressions", key, pack({
                "v": SCHEMA_VERSION, "t": "imp", "request_id": rid, "user_id": users[r],
                "event_time_ms": times[r], "items": items[r],
                "item_sparse": {"category": [[c] for c in cats[r]]},
                "user_sparse": {"segment": [segments[r]]}, "dense": None, "truth_p": truth[r]})
            hit = np.flatnonzero(block.clicked[r])
            if hit.size:
                n = int(hit.size)
                yield "actions", key, pack({
                    "v": SCHEMA_VERSION, "t": "act", "request_id": [rid] * n,
                    "user_id": [users[r]] * n, "item_id": block.items[r, hit].tolist(),
                    "kind": ["click"] * n, "value": [1.0] * n,
                    "event_time_ms": block.click_time_ms[r, hit].tolist()})

    def examples(self, block: Block):
        """The block as the joiner would emit it (every click joined, no downsampling).

        Same example ids, slots and labels as ``hw.examples`` carries for this block, without a
        broker or a join window: the fast path for learning experiments and tests.
        """
        from streams.events import ExampleBatch, Ragged
        from streams.ids import request_hash, row_example_ids

        r, k = block.items.shape
        n = r * k
        req_hash = np.fromiter((request_hash(f"g{self.cfg.seed}-{i}") for i in block.request_index.tolist()),
                               np.uint64, r)
        items = block.items.reshape(-1)
        example_id = row_example_ids(items, np.repeat(req_hash, k))
        users = np.repeat(block.user_id, k)
        ones = np.ones(n, np.int32)
        sparse = {"user_id": Ragged(users.copy(), ones), "item_id": Ragged(items.copy(), ones.copy()),
                  "segment": Ragged(self.segment[users].astype(np.int64), ones.copy()),
                  "category": Ragged(self.category[items].astype(np.int64), ones.copy())}
        return ExampleBatch(example_id=example_id, user_id=users, item_id=items.copy(),
                            label=block.clicked.reshape(-1).astype(np.float32),
                            sample_rate=np.ones(n, np.float32),
                            event_time_ms=np.repeat(block.event_time_ms, k), sparse=sparse,
                            dense=np.zeros((n, 0), np.float32),
                            truth_p=block.truth_p.reshape(-1).astype(np.float32))

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

    now_ms, history_s = int(time.time() * 1000), cfg.history_s
    if cfg.start_time_ms == 0:  # live: the clock starts now, after imports and connecting
        cfg = replace(cfg, start_time_ms=now_ms - int(history_s * 1000), history_s=0.0)
    # Paced, a block goes out in slices of ~100 ms of event time, not all at its first request's
    # time (the blocks themselves stay as drawn: the stream does not depend on the pacing).
    step = max(1, int(100 / cfg.request_interval_ms)) if cfg.events_per_s > 0 else block_requests
    world = SyntheticStream(cfg)
    events = requests = 0
    last_t = 0
    pacer = Pacer(cfg.events_per_s / max(1, cfg.items_per_request) * cfg.request_interval_ms / 1000
                  if cfg.events_per_s > 0 else 0.0)
    if history_s > 0:  # the history is due already: it goes out unpaced
        pacer.anchor(now_ms)
    for block in world.blocks(cfg.requests, block_requests):
        if stop is not None and stop.is_set():
            break
        r = len(block.request_index)
        for lo in range(0, r, step):
            part = Block(*(getattr(block, f.name)[lo:lo + step] for f in fields(Block)))
            pacer.wait_for(int(part.event_time_ms[0]), stop)
            for topic, key, value in world.keyed_messages(part):
                producer.send(getattr(topics, topic), value, key=key)
        n = world.count_events(block)
        metrics.PRODUCED.labels("generator").inc(n)  # live, so a watcher sees the rate
        events += n
        requests += r
        last_t = max(last_t, int(block.click_time_ms.max()))
        if on_progress is not None:
            on_progress(events)
    if cfg.final_watermark and cfg.requests and events:
        send_final_watermark(producer, topics, last_t)
    producer.flush()
    return events, requests
