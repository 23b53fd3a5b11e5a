"""In-batch counts are causal, and the table's counter columns add instead of optimising."""

import numpy as np
import torch

from embedding_store import EmbeddingTable, SlotConfig
from training.counting import example_increments, prior_counts


def _brute(values, lengths, times, inc, mean=False):
    rows = np.repeat(np.arange(len(lengths)), lengths)
    out = np.zeros((len(lengths), 2))
    for k, (r, i) in enumerate(zip(rows, values)):
        earlier = [(r2) for r2, i2 in zip(rows, values) if i2 == i and times[r2] < times[r]]
        out[r] += inc[earlier].sum(axis=0) if earlier else 0.0
    if mean:
        out /= np.maximum(lengths, 1)[:, None]
    return out


def test_prior_counts_equal_a_per_example_loop_over_earlier_rows():
    rng = np.random.default_rng(0)
    n = 60
    lengths = rng.integers(0, 4, n).astype(np.int32)
    values = rng.integers(0, 6, int(lengths.sum())).astype(np.int64)
    times = np.sort(rng.integers(0, 20, n))  # ties: rows of one time never see each other
    inc = example_increments(rng.integers(0, 2, n).astype(np.float32),
                             rng.choice([1.0, 0.5], n).astype(np.float32))
    for mean in (False, True):
        got = prior_counts(values, lengths, times, inc, mean=mean)
        np.testing.assert_allclose(got, _brute(values, lengths, times, inc, mean), rtol=1e-6)


def test_a_row_never_counts_its_own_or_a_simultaneous_label():
    values = np.array([7, 7, 7], np.int64)
    got = prior_counts(values, np.ones(3, np.int32), np.array([1, 1, 2]),
                       example_increments(np.array([1, 1, 0], np.float32), np.ones(3, np.float32)))
    np.testing.assert_array_equal(got, [[0, 0], [0, 0], [2, 2]])


def test_negatives_kept_at_rate_r_count_as_one_over_r_examples():
    inc = example_increments(np.array([1, 0], np.float32), np.array([1.0, 0.25], np.float32))
    np.testing.assert_array_equal(inc, [[1, 1], [0, 4]])


def test_counter_columns_add_their_input_and_the_optimizer_updates_only_the_weights():
    for opt in ("adagrad", "ftrl", "sgd", "adam"):
        table = EmbeddingTable([SlotConfig("u", dim=4, optimizer=opt, counter_columns=2)])
        ids = torch.tensor([5, 5, 9])
        before = table.lookup("u", ids, train=True)
        assert torch.equal(before[:, 2:], torch.zeros(3, 2)), "counters start at zero"
        grads = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.0, 4.0]])
        table.apply_gradients("u", ids, grads)
        after = table.lookup("u", torch.tensor([5, 9]))
        assert torch.equal(after[:, 2:], torch.tensor([[1.0, 2.0], [0.0, 4.0]])), opt
        assert not torch.equal(after[:, :2], before[[0, 2], :2]), opt


def test_decayed_counts_equal_a_per_example_loop_with_forgetting():
    from training.counting import decayed_counts

    rng = np.random.default_rng(1)
    n, g = 50, 0.9
    lengths = rng.integers(0, 3, n).astype(np.int32)
    values = rng.integers(0, 5, int(lengths.sum())).astype(np.int64)
    times = np.sort(rng.integers(0, 25, n))
    inc = example_increments(rng.integers(0, 2, n).astype(np.float32), np.ones(n, np.float32))
    table = {i: rng.random(2) * 3 for i in range(5)}
    before = np.stack([table[int(i)] for i in values])
    pooled, delta = decayed_counts(values, lengths, times, inc, before, g)
    # Reference: walk the rows in time order; rows of one time are scored, then all applied.
    rows = np.repeat(np.arange(n), lengths)
    state = {i: v.copy() for i, v in table.items()}
    want = np.zeros((n, 2))
    for t in np.unique(times):
        batch_rows = np.flatnonzero(times == t)
        for r in batch_rows:
            for i in values[rows == r]:
                want[r] += state[int(i)]
        for r in batch_rows:
            for i in values[rows == r]:
                state[int(i)] = g * state[int(i)] + inc[r]
    np.testing.assert_allclose(pooled, want, rtol=1e-5)
    got_final = {i: table[i].copy() for i in table}
    for i, d in zip(values, delta):
        got_final[int(i)] += d
    for i in table:
        np.testing.assert_allclose(got_final[i], state[i], rtol=1e-5)
