"""bench/delayed.py: each mode's rows, and an evaluation that scores each impression once."""

from dataclasses import replace

import numpy as np

from streams.example_batch import EMIT_EARLY
from streams.generator import GeneratorConfig
from streams.join_build import positive_copy_ids

from bench.delayed import generator_source, log_source

WORLD = replace(GeneratorConfig(), seed=3, users=200, items=100, max_action_delay_ms=5_000)


def test_the_early_stream_is_every_impression_once_as_a_negative_plus_one_copy_per_click():
    source = generator_source(WORLD, 4_000, window_ms=10_000, hold_ms=1_000)
    window, early = source("window"), source("early")
    first = early.batch.take(early.first)
    assert sorted(first.example_id.tolist()) == sorted(window.batch.example_id.tolist())
    assert (first.label == 0).all() and (first.emit == EMIT_EARLY).all()
    # the true label the evaluation uses is the window's, impression by impression
    truth = dict(zip(window.batch.example_id.tolist(), window.true_label.tolist()))
    assert [truth[i] for i in first.example_id.tolist()] == early.true_label[early.first].tolist()
    copies = early.batch.take(~early.first)
    clicked = window.batch.example_id[window.true_label > 0]
    assert sorted(copies.example_id.tolist()) == sorted(positive_copy_ids(clicked).tolist())
    assert (copies.label == 1).all()
    assert (np.diff(early.times) >= 0).all() and (np.diff(window.times) >= 0).all()


def test_a_log_replays_with_its_clicks_delayed_through_the_same_emission(tmp_path):
    from streams.log_reader import encode_log
    from streams.log_schema import LogSchema

    rows = ["user_id,item_id,label,ts"] + [f"u{i % 7},i{i % 11},{int(i % 3 == 0)},{1000 + i}"
                                          for i in range(300)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    schema = LogSchema(user_col="user_id", item_col="item_id", label_col="label", time_col="ts")
    encoded = encode_log(path, schema)
    source = log_source(encoded, "log", window_ms=10_000, hold_ms=1_000, max_delay_ms=5_000)
    window, early = source("window"), source("early")
    assert len(window.batch) == 300 and window.true_label.sum() == 100
    assert early.first.sum() == 300 and (~early.first).sum() == 100
    copy_times = early.times[~early.first]
    imp_times = early.batch.event_time_ms[~early.first]
    assert (copy_times >= imp_times + 1_000).all() and (copy_times <= imp_times + 5_000).all()
    assert (copy_times > imp_times + 1_000).any()  # some clicks come after the hold


def test_with_the_cold_start_hold_every_impression_is_scored_once_and_the_hold_reported():
    from training.config import TrainerConfig

    from bench.delayed import _score

    source = generator_source(WORLD, 6_000, window_ms=2_000, hold_ms=200)
    early = source("early")
    cfg = TrainerConfig(publish=False, batch_size=128, early_label_wait_s=2.0,
                        early_warmup_examples=1_000)
    out = _score(early, cfg)  # raises if an impression is not scored exactly once
    hold = out["cold_start_hold"]
    assert hold["held"] >= 1_000 and hold["merged"] > 0 and hold["warm_at_ms"] is not None
    assert out["rows_trained"] == len(early.batch) - hold["merged"]  # a merged copy: no row
    assert len(out["auc_by_tenth"]) == 10 and len(out["logloss_by_tenth"]) == 10
    assert _score(early, replace(cfg, early_warmup_examples=0))["cold_start_hold"] is None


def test_the_serving_view_scores_every_arm_on_the_probes_where_all_of_them_serve():
    from training.config import TrainerConfig

    from bench.delayed import _serving, run_arms

    # 6k events span ~2.5 s of event time: a 0.5 s label wait keeps the early learner cold a while
    source = generator_source(WORLD, 6_000, window_ms=500, hold_ms=200)
    cfg = TrainerConfig(publish=False, batch_size=128, early_label_wait_s=0.5, early_warmup_examples=1_000)
    early, window = source("early"), source("window")
    order = np.argsort(window.times - 500, kind="stable")
    p, open_ = _serving(early, early.times, window.batch.take(order), (window.times - 500)[order], cfg)
    # closed while the cold-start hold keeps the learner untrained (it would answer p = 1/2)
    assert not open_[0] and open_[-1] and (np.diff(open_.astype(int)) >= 0).all()
    assert np.allclose(p[~open_][:10], 0.5, atol=0.05)
    out = run_arms(source, cfg, ("window", "early_fnw"), 500)
    half = len(window.batch) - len(window.batch) // 2
    n = out["window"]["serving_probes"]
    assert n == out["early_fnw"]["serving_probes"] == int(open_[len(open_) // 2:].sum()) and 0 < n <= half
    assert out["early_fnw"]["serving_auc_delta_vs_window"] == round(
        out["early_fnw"]["serving_auc"] - out["window"]["serving_auc"], 4)
