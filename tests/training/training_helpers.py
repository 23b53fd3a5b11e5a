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
