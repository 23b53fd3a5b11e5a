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


def test_the_window_is_capacity_times_generations_minus_one():
    assert SeenFilter(capacity=1000, generations=2).window == 1000
    assert SeenFilter(capacity=1000, generations=3).window == 2000


def test_a_copy_within_the_window_is_dropped_however_the_ids_roll_over():
    f = SeenFilter(capacity=1000, generations=2)
    f.filter_new(np.arange(0, 10))
    # Exactly `window` other distinct ids later (in uneven batches), the copies are still caught.
    for start in range(10, 1010, 333):
        f.filter_new(np.arange(start, min(start + 333, 1010)))
    assert not f.filter_new(np.arange(0, 10)).any()
    assert f.dropped == 10 and f.forgotten == 0


def test_a_copy_beyond_the_window_passes_and_the_forgotten_ids_are_counted():
    f = SeenFilter(capacity=100, generations=2)
    f.filter_new(np.arange(0, 100))  # generation 1 full: frozen
    f.filter_new(np.arange(100, 200))  # generation 2 full: generation 1 falls out of the window
    assert f.forgotten == 100
    assert f.filter_new(np.array([0])).all()  # documented: a copy this late is trained again


def test_counters_and_ids_survive_the_state_round_trip():
    f = SeenFilter(capacity=100, generations=2)
    for start in (0, 100, 200):
        f.filter_new(np.arange(start, start + 50 if start == 200 else start + 100))
    f.filter_new(np.array([240, 241, 249, 300, 300]))
    g = SeenFilter(capacity=100, generations=2)
    g.load_state(f.state())
    assert (g.dropped, g.forgotten) == (f.dropped, f.forgotten) == (4, 100)
    assert not g.filter_new(np.array([249, 300])).any()  # the window spans the restart
    np.testing.assert_array_equal(SeenFilter.ids_in_state(f.state()), np.r_[np.arange(100, 250), 300])
    assert SeenFilter.stats_in_state(f.state()) == (4, 100)


def test_a_state_saved_before_the_counters_existed_loads_with_zero_counters():
    f = SeenFilter(capacity=100)
    f.filter_new(np.arange(10))
    old = {k: v for k, v in f.state().items() if k != "dedup.stats"}
    g = SeenFilter(capacity=100)
    g.load_state(old)
    assert (g.dropped, g.forgotten) == (0, 0) and g.seen(np.arange(10)).all()
    assert SeenFilter.stats_in_state(old) == (0, 0)
