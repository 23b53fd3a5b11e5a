"""Example-id de-duplication: exact within its horizon, bounded memory, state round trip."""

import numpy as np

from training.dedup import SeenFilter


def test_first_occurrences_pass_and_repeats_within_and_across_batches_are_dropped():
    f = SeenFilter(capacity=1000)
    keep = f.filter_new(np.array([5, 6, 5, 7]))
    assert keep.tolist() == [True, True, False, True]
    assert f.filter_new(np.array([7, 8, 6])).tolist() == [False, True, False]


def test_many_small_batches_are_deduplicated_exactly():
    rng = np.random.default_rng(0)
    f = SeenFilter(capacity=1 << 20)
    ids = rng.integers(0, 50_000, 200_000)
    kept = np.concatenate([ids[s][f.filter_new(ids[s])] for s in np.array_split(np.arange(len(ids)), 97)])
    assert len(kept) == len(np.unique(ids)) and set(kept.tolist()) == set(ids.tolist())


def test_memory_is_bounded_by_capacity_times_generations():
    f = SeenFilter(capacity=1000, generations=3)
    for start in range(0, 100_000, 500):
        f.filter_new(np.arange(start, start + 500))
    assert len(f) <= 3000
    assert f.seen(np.array([99_999])).all() and not f.seen(np.array([0])).any()


def test_state_round_trip_keeps_what_was_seen():
    f = SeenFilter(capacity=100, generations=2)
    f.filter_new(np.arange(250))
    g = SeenFilter(capacity=100, generations=2)
    g.load_state(f.state())
    np.testing.assert_array_equal(g.seen(np.arange(250)), f.seen(np.arange(250)))
