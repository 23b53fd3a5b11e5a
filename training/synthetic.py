"""Synthetic ``ExampleBatch`` streams with a hidden logistic model (benchmarks and tests).

Each (slot, id) has a hidden weight derived from a hash of the pair, so the truth is
reproducible in any process without storing it; the click probability is
``sigmoid(bias + sum of the weights of the example's ids)`` and is recorded in ``truth_p``.
Ids are Zipf-distributed so the table sees the hot/cold mix of real traffic. This is not the
streams generator (which drives the joiner); it feeds ``hw.examples`` directly so the trainer
can be measured and tested on its own.
"""

from __future__ import annotations

import numpy as np

from hashing import GOLDEN, mix64

__all__ = ["slot_names", "synthetic_examples"]


def _hash_weight(slot: int, ids: np.ndarray, scale: float) -> np.ndarray:
    x = mix64(ids.astype(np.uint64) ^ np.uint64((slot + 1) * int(GOLDEN) & 0xFFFFFFFFFFFFFFFF))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (u - 0.5) * 2.0 * scale


def slot_names(slots: int) -> list[str]:
    return ["user_id", "item_id"] + [f"f{i:02d}" for i in range(slots - 2)]


def synthetic_examples(n: int, rows_per_message: int = 1024, slots: int = 4, vocab: int = 1000,
                       seed: int = 0, first_example: int = 0, weight_scale: float = 1.5,
                       bias: float = -1.5, zipf_a: float = 1.2, event_time_ms: int = 0,
                       id_base: int = 0) -> list:
    """``n`` examples as a list of ExampleBatch messages; labels drawn from the hidden model.

    Ids are ``id_base + zipf % vocab`` (per slot, in disjoint ranges): raise ``id_base`` to
    make a stream of ids never seen before.
    """
    from streams.events import ExampleBatch, Ragged

    rng = np.random.default_rng(seed)
    names = slot_names(slots)
    out, start = [], 0
    while start < n:
        m = min(rows_per_message, n - start)
        sparse, logit = {}, np.full(m, bias)
        for s, name in enumerate(names):
            ids = (rng.zipf(zipf_a, m) % vocab).astype(np.int64) + id_base
            logit += _hash_weight(s, ids, weight_scale / np.sqrt(len(names)) * 2)
            sparse[name] = Ragged(ids + s * 10**15, np.ones(m, np.int32))
        p = 1.0 / (1.0 + np.exp(-logit))
        first = first_example + start
        out.append(ExampleBatch(
            example_id=np.arange(first, first + m, dtype=np.int64),
            user_id=sparse["user_id"].values.copy(), item_id=sparse["item_id"].values.copy(),
            label=(rng.random(m) < p).astype(np.float32), sample_rate=np.ones(m, np.float32),
            event_time_ms=np.full(m, event_time_ms, np.int64) + np.arange(start, start + m),
            sparse=sparse, dense=np.zeros((m, 0), np.float32), truth_p=p.astype(np.float32)))
        start += m
    return out
