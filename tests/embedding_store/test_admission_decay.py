"""The admission sketch ages, so an endless tail of new ids does not fill it up."""

import numpy as np

from embedding_store.admission import CountMinSketch


def test_counts_are_halved_after_decay_every_sightings():
    sketch = CountMinSketch(width=1024, depth=4, decay_every=100)
    key = np.array([7], dtype=np.int64)
    for _ in range(8):
        sketch.add(key)
    assert sketch.estimate(key)[0] == 8
    sketch.add(np.arange(1000, 1092, dtype=np.int64))  # the 100th sighting triggers aging
    assert sketch.estimate(key)[0] == 4


def test_a_long_tail_of_new_ids_stops_being_admitted_by_collisions():
    """Without aging, collisions eventually make every new id look seen k times."""
    rng = np.random.default_rng(0)
    aged = CountMinSketch(width=4096, depth=2)
    frozen = CountMinSketch(width=4096, depth=2, decay_every=0)
    for _ in range(40):
        batch = rng.integers(1, 2**62, size=4096, dtype=np.int64)  # never repeats
        aged.add(batch)
        frozen.add(batch)
    fresh = rng.integers(1, 2**62, size=4096, dtype=np.int64)
    # An unseen id's next sighting admits it at k=2 if its estimate already reads >= 1.
    assert (frozen.estimate(fresh) >= 1).mean() > 0.99
    assert (aged.estimate(fresh) >= 2).mean() < 0.05
