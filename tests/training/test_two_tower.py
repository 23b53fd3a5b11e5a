"""The two-tower retrieval model: vector shape, history without look-ahead, logQ, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streams.example_batch import ExampleBatch, Ragged
from training.two_tower import TwoTowerConfig, TwoTowerLearner
from training.two_tower.state import CountEstimator, FrequencyEstimator

@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy small machine parallel regions wait on each other's slices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(dim=16, embedding_dim=16, hidden=32, buckets=1 << 12, freq_buckets=1 << 12)


def clicks(users, items, times, label=None, extra: dict[str, np.ndarray] | None = None,
           first_id: int = 0) -> ExampleBatch:
    """A batch of single-valued rows (clicks unless ``label`` says otherwise)."""
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    n = len(users)
    ones = np.ones(n, np.int32)
    sparse = {"user_id": Ragged(users, ones), "item_id": Ragged(items, ones.copy())}
    for slot, values in (extra or {}).items():
        sparse[slot] = Ragged(np.asarray(values, np.int64), ones.copy())
    return ExampleBatch(example_id=np.arange(first_id, first_id + n, dtype=np.int64), user_id=users,
                        item_id=items, label=np.ones(n, np.float32) if label is None else
                        np.asarray(label, np.float32), sample_rate=np.ones(n, np.float32),
                        event_time_ms=np.asarray(times, np.int64), sparse=sparse,
                        dense=np.zeros((n, 0), np.float32), truth_p=np.full(n, np.nan, np.float32))


def test_vectors_have_the_configured_dim_and_unit_norm():
    tt = TwoTowerLearner(TwoTowerConfig(item_slots=("cat",), **SMALL, positives_per_step=4))
    tt.step(clicks([1, 2, 3, 4], [10, 11, 12, 13], [1, 2, 3, 4], extra={"cat": [0, 1, 0, 1]}))
    users = tt.user_vectors(np.array([1, 2, 99]), np.array([10, 10, 10]))
    items = tt.item_vectors(tt.items_seen())
    assert users.shape == (3, 16) and items.shape == (4, 16)
    for v in (users, items):
        assert torch.allclose(v.norm(dim=1), torch.ones(len(v)), atol=1e-5)


def test_history_holds_only_clicks_strictly_before_the_row():
    tt = TwoTowerLearner(TwoTowerConfig(**SMALL, history_length=3))
    tt.step(clicks([1, 1, 2], [10, 11, 20], [100, 300, 150]))
    items, mask = tt.history.lookup(np.array([1, 1, 1, 2]), np.array([100, 200, 301, 150]))
    assert [set(items[r][mask[r]].tolist()) for r in range(4)] == [set(), {10}, {10, 11}, set()]


def test_history_keeps_the_newest_clicks_by_event_time_even_when_late():
    tt = TwoTowerLearner(TwoTowerConfig(**SMALL, history_length=2))
    tt.step(clicks([1, 1], [10, 12], [100, 300]))
    tt.step(clicks([1], [11], [200], first_id=10))  # arrives late, belongs in the middle
    items, mask = tt.history.lookup(np.array([1]), np.array([1000]))
    assert items[0][mask[0]].tolist() == [11, 12]


def test_a_batch_trains_each_click_with_only_the_clicks_before_it():
    tt = TwoTowerLearner(TwoTowerConfig(**SMALL, history_length=5, positives_per_step=3))
    seen: list[np.ndarray] = []
    user_tower = tt.model.user

    def spy(x):
        seen.append(x.history)
        return user_tower(x)

    tt.model.user = spy  # type: ignore[method-assign]
    # user 1 clicks three times in one batch, the rows out of time order: each row's history is
    # the clicks before its event time, never its own or a later one.
    assert tt.step(clicks([1, 1, 1], [12, 10, 11], [300, 100, 200])) == 3
    items, mask = seen[0]
    assert [sorted(items[r][mask[r]].tolist()) for r in range(3)] == [[10, 11], [], [10]]


def test_non_clicks_feed_the_catalog_but_are_not_positives():
    tt = TwoTowerLearner(TwoTowerConfig(**SMALL, positives_per_step=1))
    trained = tt.step(clicks([1, 1, 1], [10, 11, 12], [5, 5, 5], label=[0, 1, 0]))
    assert trained == 1 and sorted(tt.items_seen().tolist()) == [10, 11, 12]
    items, mask = tt.history.lookup(np.array([1]), np.array([6]))
    assert items[0][mask[0]].tolist() == [11]


@pytest.mark.parametrize("estimator", [FrequencyEstimator(1 << 10, 0.2), CountEstimator(1 << 10, 0.97)],
                         ids=["gap", "count"])
def test_frequency_estimate_orders_items_by_how_often_they_are_trained(estimator):
    rng = np.random.default_rng(0)
    for step in range(300):
        estimator.update(np.concatenate([[1], [2] if step % 5 == 0 else [],
                                         rng.integers(100, 200, 3)]), step)
    q = estimator.probability(np.array([1, 2, 150]))
    assert q[0] > 2 * q[1] > 0 and q[1] > q[2]


def _popularity_world(seed: int = 0):
    """64 users and 64 items in 4 taste groups; item exposure is Zipf, independent of taste."""
    rng = np.random.default_rng(seed)
    n, groups = 64, 4
    user_group, item_group = np.arange(n) % groups, rng.permutation(np.arange(n) % groups)
    log_pop = -1.2 * np.log(1 + rng.permutation(n))
    log_p = log_pop[None, :] + 2.0 * (user_group[:, None] == item_group[None, :])
    log_p -= np.logaddexp.reduce(log_p, axis=1, keepdims=True)  # log p(item | user)
    return rng, log_p, log_pop


def _train_on_world(log_p, rng, logq: bool, clicks_n: int, **cfg) -> TwoTowerLearner:
    n = log_p.shape[0]
    users = rng.integers(0, n, clicks_n)
    cum = np.cumsum(np.exp(log_p), axis=1)
    items = np.minimum((cum[users] < rng.random(clicks_n)[:, None]).sum(1), n - 1)
    tt = TwoTowerLearner(TwoTowerConfig(**{**SMALL, "history_length": 0, "positives_per_step": 128,
                                           "temperature": 0.1, "logq": logq, **cfg}))
    for lo in range(0, clicks_n, 1024):
        sl = slice(lo, lo + 1024)
        tt.step(clicks(users[sl], items[sl], np.arange(clicks_n)[sl], first_id=lo))
    return tt


def _popularity_slope(tt: TwoTowerLearner, log_p: np.ndarray, log_pop: np.ndarray) -> float:
    """Slope of (score - true log p(item | user)), centred per user, on the item's log popularity:
    0 when the scores follow the true preference, negative when popular items are under-scored."""
    n = log_p.shape[0]
    ids = np.arange(n)
    scores = (tt.user_vectors(ids, np.zeros(n, np.int64)) @ tt.item_vectors(ids).T).numpy()
    resid = scores / tt.cfg.temperature - log_p
    resid -= resid.mean(1, keepdims=True)
    x = np.broadcast_to(log_pop - log_pop.mean(), resid.shape)
    return float((resid * x).sum() / (x * x).sum())


@pytest.fixture(scope="module")
def popularity_world():
    rng, log_p, log_pop = _popularity_world()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    uncorrected = _popularity_slope(_train_on_world(log_p, np.random.default_rng(1), False, 24_000),
                                    log_p, log_pop)
    torch.set_num_threads(threads)
    return log_p, log_pop, uncorrected


def test_without_logq_in_batch_negatives_push_popular_items_down(popularity_world):
    # Negatives are drawn by popularity: the scores learn log p(item | user) - log q(item).
    assert popularity_world[2] < -0.5


@pytest.mark.parametrize("estimator, margin", [("count", 0.4), ("gap", 0.15)])
def test_logq_correction_lowers_the_popularity_bias_of_the_scores(popularity_world, estimator, margin):
    log_p, log_pop, uncorrected = popularity_world
    tt = _train_on_world(log_p, np.random.default_rng(1), True, 24_000, freq_estimator=estimator)
    # gap (Yi et al.'s per-batch presence, at most 1) corrects less: the most popular items are
    # in every batch, so their q saturates; count's share keeps growing with popularity.
    assert abs(_popularity_slope(tt, log_p, log_pop)) < abs(uncorrected) - margin


def test_learner_recalls_planted_groups_far_better_than_random():
    rng = np.random.default_rng(3)
    users_n, items_n, groups = 200, 400, 8
    user_group, item_group = rng.integers(0, groups, users_n), np.arange(items_n) % groups
    by_group = [np.flatnonzero(item_group == g) for g in range(groups)]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        users = rng.integers(0, users_n, n)
        pick = rng.integers(0, items_n // groups, n)
        return users, np.array([by_group[user_group[u]][k] for u, k in zip(users, pick)])

    tt = TwoTowerLearner(TwoTowerConfig(item_slots=("cat",), **SMALL, positives_per_step=128))
    users, items = draw(30_000)
    for lo in range(0, len(users), 1024):
        sl = slice(lo, lo + 1024)
        tt.step(clicks(users[sl], items[sl], np.arange(len(users))[sl],
                       extra={"cat": item_group[items[sl]]}, first_id=lo))
    users, items = draw(500)
    catalog = tt.items_seen()
    scores = tt.user_vectors(users, np.full(len(users), 10**9)) @ tt.item_vectors(catalog).T
    top = catalog[torch.topk(scores, 20, dim=1).indices.numpy()]
    recall = float((top == items[:, None]).any(1).mean())
    assert recall > 4 * 20 / items_n  # random: 0.05; the group alone allows 20 / 50 = 0.4


def test_retrieval_quality_bench_reports_each_retrievers_recall():
    from bench import retrieval_quality
    from headwater.cli import build_parser

    args = build_parser().parse_args(["bench", "retrieval-quality", "--json", "--events", "20000",
                                      "--users", "500", "--items", "300", "--eval-fraction", "0.5"])
    out = retrieval_quality.run(args)
    assert out["clicks_evaluated"] > 100 and out["examples"] > 15_000
    for name in ("two_tower", "ranker_embeddings", "popular"):
        assert 0.0 <= out[f"recall_at_100_{name}"] <= 1.0
    assert out["recall_at_100_two_tower"] > 100 / 300  # a third of the catalog retrieved at random
