"""The blend-weight tuner alone: outcomes in, the served weight out (serving.rerank_tuning)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.rerank import blend, standardised
from serving.rerank_tuning import GRID, TuningConfig, WeightTuner, blend_ranks
from serving.user_history import Interaction

N = 20  # reranked items per call


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def _traffic(tuner: WeightTuner, calls: int, llm_signal: float, dlrm_signal: float = 1.0, seed: int = 0) -> None:
    """Reranked calls, each followed by one click: the user picks the item of highest relevance
    plus Gumbel noise; the DLRM's and the LLM's scores are relevance times their signal plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(calls):
        user = c % 37
        items = rng.choice(10_000, N, replace=False)
        rel = rng.normal(size=N)
        zd = _z(dlrm_signal * rel + rng.normal(size=N))
        zl = _z(llm_signal * rel + rng.normal(size=N))
        tuner.record(user, items, zd, zl, tuner.weight)
        clicked = int(np.argmax(rel + rng.gumbel(size=N)))
        tuner.observe([(user, Interaction(int(items[clicked]), "click", tuner.now_ms + 1000))])


def test_the_tuner_ranks_an_item_exactly_as_the_blend_orders_it():
    rng = np.random.default_rng(1)
    for _ in range(50):
        items = rng.choice(1000, N, replace=False)
        p, llm = rng.uniform(0.05, 0.95, N), rng.normal(size=N)
        p[:4] = p[4]  # ties in the DLRM: the item id decides, as in the stage
        llm[:4] = llm[4]
        z = np.stack(standardised(p, llm))
        for w in (0.0, 0.3, 0.5, 1.0):
            order = np.lexsort((items, -blend(p, llm, w)))
            rank = np.empty(N, np.int64)
            rank[order] = np.arange(1, N + 1)
            got = [blend_ranks(z, items, np.array([w]), k)[0] for k in range(N)]
            assert got == rank.tolist()


def test_clicks_the_llm_predicts_drive_the_weight_up():
    tuner = WeightTuner(TuningConfig(default_weight=0.2, min_outcomes=200))
    _traffic(tuner, 1500, llm_signal=2.0, dlrm_signal=0.7)
    gains = tuner.mean_gains()
    assert tuner.outcomes == 1500
    assert tuner.weight >= 0.5, (tuner.weight, gains)
    assert gains[GRID >= 0.5].max() > gains[0]  # the LLM beats the DLRM alone


def test_an_llm_that_is_noise_drives_the_weight_to_zero():
    tuner = WeightTuner(TuningConfig(default_weight=0.5, min_outcomes=200))
    _traffic(tuner, 1500, llm_signal=0.0)
    assert tuner.outcomes == 1500
    assert tuner.weight <= 0.1, (tuner.weight, tuner.mean_gains())


def test_too_few_outcomes_keep_the_configured_weight():
    tuner = WeightTuner(TuningConfig(default_weight=0.5, min_outcomes=200))
    _traffic(tuner, 199, llm_signal=0.0)
    assert tuner.outcomes == 199 and tuner.weight == 0.5
    _traffic(tuner, 1, llm_signal=0.0, seed=1)  # the 200th outcome decides
    assert tuner.outcomes == 200 and tuner.weight <= 0.1


def test_remembered_calls_stay_bounded_and_the_least_recent_users_go_first():
    tuner = WeightTuner(TuningConfig(min_outcomes=0, max_calls=100, calls_per_user=4))
    zs = np.linspace(-1.0, 1.0, N)
    for c in range(1000):  # 250 users, 4 calls each
        tuner.record(c // 4, np.arange(N) + 100 * c, zs, zs[::-1], 0.5)
        assert len(tuner) <= 100
    assert len(tuner) == 100
    tuner.observe([(0, Interaction(5, "click", 1))])  # user 0's call was forgotten: no outcome
    assert tuner.outcomes == 0
    tuner.observe([(249, Interaction(100 * 999 + 5, "click", 1))])  # the newest user's call counts
    assert tuner.outcomes == 1


def test_a_user_s_calls_beyond_calls_per_user_are_forgotten():
    tuner = WeightTuner(TuningConfig(min_outcomes=0, calls_per_user=2))
    zs = np.linspace(-1.0, 1.0, N)
    for c in range(3):
        tuner.record(7, np.arange(N) + 100 * c, zs, zs, 0.5)
    assert len(tuner) == 2
    tuner.observe([(7, Interaction(3, "click", 1))])  # the first call's item
    assert tuner.outcomes == 0
    tuner.observe([(7, Interaction(203, "click", 1))])
    assert tuner.outcomes == 1


def test_calls_expire_after_the_horizon_of_event_time():
    tuner = WeightTuner(TuningConfig(min_outcomes=0, horizon_ms=60_000))
    zs = np.linspace(-1.0, 1.0, N)
    tuner.observe([(1, Interaction(999_999, "view", 1000))])  # the stream's present: t = 1 s
    tuner.record(1, np.arange(N), zs, zs, 0.5)
    tuner.record(2, np.arange(N), zs, zs, 0.5)
    tuner.observe([(1, Interaction(4, "click", 60_000))])  # within the horizon: an outcome
    assert tuner.outcomes == 1 and len(tuner) == 2
    tuner.observe([(3, Interaction(999_999, "view", 62_000))])  # event time moves past both calls
    assert len(tuner) == 0
    tuner.observe([(2, Interaction(4, "click", 62_000))])  # too late: no outcome
    assert tuner.outcomes == 1


def test_only_positive_kinds_count_and_each_clicked_item_once_for_its_newest_call():
    tuner = WeightTuner(TuningConfig(min_outcomes=0, positive_kinds=frozenset({"click", "buy"})))
    zd = np.linspace(1.0, -1.0, N)  # item k is the DLRM's rank k + 1 ...
    tuner.record(1, np.arange(N), zd, np.zeros(N), 0.5)
    tuner.record(1, np.arange(N)[::-1], zd, np.zeros(N), 0.5)  # ... and here rank N - k
    tuner.observe([(1, Interaction(0, "view", 5)), (1, Interaction(0, "click", 6)),
                   (1, Interaction(0, "buy", 7))])
    assert tuner.outcomes == 1  # the view is no outcome; the buy repeats the click
    # credited to the newest call, where item 0 came last
    np.testing.assert_allclose(tuner.mean_gains()[0], 1.0 / np.log2(1.0 + N))


def test_position_bias_weighs_a_click_by_its_inverse_propensity():
    zd = np.linspace(1.0, -1.0, N)
    plain, ips = (WeightTuner(TuningConfig(min_outcomes=0, position_bias=eta)) for eta in (0.0, 1.0))
    for tuner in (plain, ips):
        tuner.record(1, np.arange(N), zd, np.zeros(N), 0.5)  # served: item 2 at rank 3
        tuner.observe([(1, Interaction(2, "click", 1))])
    assert plain.outcomes == ips.outcomes == 1
    np.testing.assert_allclose(ips.mean_gains(), 3.0 * plain.mean_gains())


def test_the_decay_lets_the_weight_follow_a_change_in_the_llm():
    tuner = WeightTuner(TuningConfig(default_weight=0.5, min_outcomes=200, half_life=300))
    _traffic(tuner, 1500, llm_signal=2.0, dlrm_signal=0.7)
    assert tuner.weight >= 0.5
    _traffic(tuner, 2000, llm_signal=0.0, dlrm_signal=0.7, seed=5)  # the LLM went bad
    assert tuner.weight <= 0.1, (tuner.weight, tuner.mean_gains())


@pytest.mark.parametrize("bad", [dict(min_outcomes=-1), dict(horizon_ms=0), dict(max_calls=0),
                                 dict(position_bias=-1.0), dict(positive_kinds=frozenset())])
def test_bad_tuning_settings_are_refused(bad):
    with pytest.raises(ValueError):
        WeightTuner(TuningConfig(**bad))
