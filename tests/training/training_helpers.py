"""Small builders of real ``ExampleBatch`` objects for the training tests."""

import numpy as np

from streams.events import ExampleBatch, Ragged


def make_batch(n: int, start: int = 0, slots=("user_id", "item_id"), seed: int = 0,
               dense_dim: int = 0) -> ExampleBatch:
    rng = np.random.default_rng(seed + start)
    ids = np.arange(start, start + n, dtype=np.int64)
    sparse = {s: Ragged(rng.integers(0, 1000, n).astype(np.int64), np.ones(n, np.int32)) for s in slots}
    return ExampleBatch(example_id=ids, user_id=ids % 97, item_id=ids % 13,
                        label=(rng.random(n) < 0.3).astype(np.float32),
                        sample_rate=np.ones(n, np.float32),
                        event_time_ms=1_000 + ids, sparse=sparse,
                        dense=rng.normal(size=(n, dense_dim)).astype(np.float32),
                        truth_p=np.full(n, np.nan, np.float32))


def early_rows(ids, items, labels, t=1_000) -> ExampleBatch:
    """Early-emitted rows: one per (example id, item), user = item, at event time ``t``."""
    from streams.example_batch import EMIT_EARLY

    n = len(ids)
    ids, items = np.asarray(ids, np.int64), np.asarray(items, np.int64)
    ones = np.ones(n, np.int32)
    return ExampleBatch(example_id=ids, user_id=items.copy(), item_id=items,
                        label=np.asarray(labels, np.float32), sample_rate=np.ones(n, np.float32),
                        event_time_ms=np.full(n, t, np.int64),
                        sparse={"user_id": Ragged(items.copy(), ones),
                                "item_id": Ragged(items.copy(), ones.copy())},
                        dense=np.zeros((n, 0), np.float32), truth_p=np.full(n, np.nan, np.float32),
                        emit=np.full(n, EMIT_EARLY, np.uint8))


def positive_copies(batch: ExampleBatch, rows, t) -> ExampleBatch:
    """The positive copies of ``batch``'s rows, as the joiner sends them (same features)."""
    from streams.join_build import positive_copy_ids

    c = batch.take(np.asarray(rows))
    c.example_id = positive_copy_ids(c.example_id)
    c.label = np.ones(len(c), np.float32)
    c.event_time_ms = np.full(len(c), t, np.int64)  # (the joiner's keeps the impression's)
    return c
