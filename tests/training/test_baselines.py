"""The online baselines of ``bench learning``: they learn what they claim, and score before learning."""

import numpy as np
import pytest

from streams.events import ExampleBatch, Ragged
from training.baselines import CountingBaseline, IdCounts, VowpalWabbitBaseline
from training.evaluation import auc_exact


def _batch(users, items, labels, times=None, extra=None) -> ExampleBatch:
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    n = len(users)
    ones = np.ones(n, np.int32)
    sparse = {"user_id": Ragged(users.copy(), ones), "item_id": Ragged(items.copy(), ones.copy())}
    sparse.update(extra or {})
    return ExampleBatch(example_id=np.arange(n, dtype=np.int64), user_id=users, item_id=items,
                        label=np.asarray(labels, np.float32), sample_rate=np.ones(n, np.float32),
                        event_time_ms=(np.arange(n, dtype=np.int64) if times is None
                                       else np.asarray(times, np.int64)),
                        sparse=sparse, dense=np.zeros((n, 0), np.float32),
                        truth_p=np.full(n, np.nan, np.float32))


def _base_rate_stream(n=40_000, users=300, items=200, seed=0):
    """Clicks from per-user and per-item base rates only: what counting should find."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 1.0, users), rng.normal(0, 1.0, items)
    u = rng.integers(0, users, n)
    i = rng.integers(0, items, n)
    p = 1 / (1 + np.exp(-(-1.0 + bu[u] + bi[i])))
    y = (rng.random(n) < p).astype(np.float32)
    return u + 1000, i + 5000, y, p, bi


def _feed(model, u, i, y, size=1024):
    return np.concatenate([model.update(_batch(u[s:s + size], i[s:s + size], y[s:s + size],
                                               np.arange(s, min(s + size, len(u)))))
                           for s in range(0, len(u), size)])


def test_id_counts_match_a_dict_across_growth():
    rng = np.random.default_rng(1)
    counts, ref = IdCounts(capacity=4), {}
    for _ in range(30):
        ids = rng.integers(-(2**62), 2**62, 50)
        ids = np.concatenate([ids, rng.choice(ids, 30)])  # duplicates inside a batch
        y = (rng.random(len(ids)) < 0.3).astype(np.float64)
        counts.add(ids, y, np.ones(len(ids)))
        for k, v in zip(ids.tolist(), y.tolist()):
            p, t = ref.get(k, (0.0, 0.0))
            ref[k] = (p + v, t + 1)
    keys = np.array(list(ref), np.int64)
    pos, tot = counts.get(np.concatenate([keys, [7, 8]]))
    assert len(counts) == len(ref)
    np.testing.assert_allclose(pos[:-2], [ref[k][0] for k in keys.tolist()])
    np.testing.assert_allclose(tot[:-2], [ref[k][1] for k in keys.tolist()])
    assert pos[-2:].tolist() == [0.0, 0.0] and tot[-2:].tolist() == [0.0, 0.0]


def test_counting_beats_random_and_nears_the_truth_when_base_rates_are_the_signal():
    u, i, y, p, _ = _base_rate_stream()
    scores = _feed(CountingBaseline(), u, i, y)
    tail = slice(len(y) // 2, None)
    truth = auc_exact(p[tail], y[tail])
    got = auc_exact(scores[tail], y[tail])
    assert got > 0.7  # far above chance (0.5)
    assert got > truth - 0.03, (got, truth)


def test_counting_learns_each_items_base_rate():
    u, i, y, p, bi = _base_rate_stream()
    model = CountingBaseline(prior=10.0)
    _feed(model, u, i, y)
    items = np.arange(200) + 5000
    # A user never seen contributes nothing: the score is the item's smoothed rate alone.
    got = 1 / (1 + np.exp(-model.predict_logits(np.full(200, 999_999), items)))
    rows = np.bincount(i - 5000, minlength=200)
    empirical = np.bincount(i - 5000, weights=y, minlength=200) / rows
    busy = rows >= 150
    assert busy.sum() > 100
    np.testing.assert_allclose(got[busy], empirical[busy], atol=0.03)
    # And the rates are ordered like the hidden item effects.
    assert np.corrcoef(got[busy], bi[busy])[0, 1] > 0.8


def test_vw_learns_a_learnable_stream():
    u, i, y, _, _ = _base_rate_stream(n=20_000)
    scores = _feed(VowpalWabbitBaseline(), u, i, y)
    assert auc_exact(scores[5000:], y[5000:]) > 0.6
    assert np.all((scores >= 0) & (scores <= 1))


def test_vw_uses_every_slot_and_dense_feature():
    genres = Ragged(np.array([7, 8, 9]), np.array([2, 1], np.int32))
    b = _batch([1, 2], [3, 4], [1, 0], extra={"genres": genres})
    b.dense = np.array([[0.5, 0.0], [0.0, -1.25]], np.float32)
    lines = VowpalWabbitBaseline.lines(b)
    assert lines[0] == "1 |genres genres=7 genres=8 |item_id item_id=3 |user_id user_id=1 |dense d0:0.5"
    assert lines[1] == "-1 |genres genres=9 |item_id item_id=4 |user_id user_id=2 |dense d1:-1.25"


@pytest.mark.parametrize("make", [CountingBaseline, VowpalWabbitBaseline], ids=["counting", "vw"])
def test_a_prediction_never_depends_on_its_own_or_a_later_label(make):
    u, i, y, _, _ = _base_rate_stream(n=600)
    y = y.copy()
    y[:3] = [1, 0, 1]
    first = make().update(_batch(u, i, y))
    for j in (0, 1, 250):
        flipped = y.copy()
        flipped[j] = 1 - flipped[j]
        again = make().update(_batch(u, i, flipped))
        np.testing.assert_array_equal(again[:j + 1], first[:j + 1])
        assert not np.array_equal(again[j + 1:], first[j + 1:])  # later rows do learn from it


def test_counting_rows_of_one_moment_do_not_see_each_other():
    # One user, two items shown at the same time: the second row must not use the first's label.
    a = CountingBaseline().update(_batch([1, 1, 1], [10, 11, 12], [1, 0, 0], times=[5, 5, 6]))
    b = CountingBaseline().update(_batch([1, 1, 1], [10, 11, 12], [0, 0, 0], times=[5, 5, 6]))
    assert a[1] == b[1]
    assert a[2] > b[2]  # a later row does


def test_vw_ranks_a_requests_rows_before_it_learns_any_of_them():
    # One display of four ads to user 7 at one time, the first clicked; then one ad alone later.
    vw = VowpalWabbitBaseline(bits=18)
    p = vw.update(_batch([7, 7, 7, 7, 7], [1, 2, 3, 4, 5], [1, 0, 0, 0, 0], times=[5, 5, 5, 5, 9]))
    assert p[0] == p[1] == p[2] == p[3] == 0.5  # nothing learned yet, nor from the request's click
    assert p[4] != 0.5  # a later request is scored with what the first taught
