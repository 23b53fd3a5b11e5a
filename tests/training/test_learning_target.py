"""The learning target: on the demo's synthetic world the learner closes in on the ground truth.

Prequential (test-then-train) AUC of the learner against the AUC of the world's own click
probabilities on the same examples. The issue's target is a gap under 0.03 within 300k events;
the default suite checks a shorter run against a wider margin so it stays fast, and the slow
suite checks the target itself, in-process and through the real ``headwater demo``.
"""

import threading

import pytest

from streams.generator import GeneratorConfig
from training.config import TrainerConfig
from training.prequential import run_prequential

TARGET_GAP = 0.03  # the target at 300k events


def _run(events: int, seed: int = 0):
    world = GeneratorConfig(seed=seed)  # the demo's default world
    cfg = TrainerConfig(eval_window=10_000, publish=False, torch_threads=1)
    return run_prequential(world, cfg, events)


def test_learner_gets_within_0_05_auc_of_the_truth_in_100k_events():
    res = _run(100_000)
    assert res.events >= 100_000
    assert 0.8 < res.auc_truth_last_window < 0.92  # the world is learnable, not trivial
    assert res.auc_last_window > 0.8  # far above chance: it learned the shared structure
    assert res.auc_gap < 0.05, res.to_dict()
    # Prequential: the first window (an untrained model) was far behind, and the gap closed.
    assert res.window_gaps[0] > res.auc_gap + 0.05, res.window_gaps


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_learner_is_within_0_03_auc_of_the_truth_within_300k_events(seed):
    res = _run(300_000, seed=seed)
    assert res.events <= 310_000
    assert res.auc_gap < TARGET_GAP, res.to_dict()


@pytest.mark.slow
def test_headwater_demo_reaches_the_learning_target_in_300k_events(tmp_path):
    from headwater.demo import DemoConfig, run_demo

    cfg = DemoConfig(data_dir=tmp_path, events=300_000, duration_s=600, llm=False, serve=False,
                     dashboard_port=0)
    summary = run_demo(cfg, threading.Event())
    assert 290_000 <= summary["events_trained"] <= 320_000, summary
    assert summary["auc_truth_last_window"] > 0.8, summary
    assert summary["auc_gap"] < TARGET_GAP, summary
