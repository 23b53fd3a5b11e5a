"""A log of positives only (no label column): every row a positive, sampled negatives beside it,
drawn among the items seen before, the same in every view of the log and every process."""

import numpy as np
import pytest

from streams.events import SchemaError
from streams.log_infer import infer_schema
from streams.log_reader import encode_log, log_examples, log_requests
from streams.log_schema import LogSchema
from streams.replay import ReplayConfig, log_schema
from tests.streams.log_fixtures import without_column, write_real_shaped_csv


def _positives_only(tmp_path, rows=400):
    full = write_real_shaped_csv(tmp_path / "full.csv", rows=rows, users=40, items=60)
    return without_column(full, tmp_path / "plays.csv")


def _request_starts(log):
    new = np.ones(len(log), bool)
    new[1:] = (log.user_id[1:] != log.user_id[:-1]) | (log.ts_ms[1:] != log.ts_ms[:-1])
    return np.flatnonzero(new)


def test_a_log_without_a_label_column_reads_as_positives_with_sampled_negatives(tmp_path):
    path = _positives_only(tmp_path)
    schema = log_schema(path, ReplayConfig())
    assert schema.implicit and schema.label_col == "" and schema.negatives == 4
    assert schema.negative_sampling == "uniform"
    (tmp_path / "s.toml").write_text(schema.to_toml())
    assert LogSchema.from_toml(tmp_path / "s.toml") == schema  # the TOML round trip

    log = encode_log(path, schema)
    real, neg = log.label == 1, log.label == 0
    assert real.sum() == 400 and 0.8 * 4 * 400 < neg.sum() <= 4 * 400
    assert np.all(np.diff(log.ts_ms) >= 0)  # still in event-time order
    starts = _request_starts(log)
    request = np.searchsorted(starts, np.arange(len(log)), side="right") - 1
    first_real = {}
    for r in np.flatnonzero(real):
        first_real.setdefault(int(log.item_id[r]), r)
    age = list(schema.dense_names()).index("age")
    year = list(schema.dense_names()).index("year")
    for q in range(len(starts)):
        rows = np.flatnonzero(request == q)
        own = set(log.item_id[rows[real[rows]]].tolist())
        drawn = log.item_id[rows[neg[rows]]].tolist()
        assert not own & set(drawn) and len(set(drawn)) == len(drawn)  # not its own, no repeats
        for r in rows[neg[rows]]:
            item = int(log.item_id[r])
            src = first_real[item]
            assert src < rows[0], "a negative's item must have been seen before its request"
            # Item side from the item's own row, user side from the request's.
            np.testing.assert_array_equal(log.sparse["genres"].take(np.array([r])).values,
                                          log.sparse["genres"].take(np.array([src])).values)
            assert log.dense[r, year] == log.dense[src, year]
            assert log.dense[r, age] == log.dense[rows[0], age]
            assert log.sparse["device"].take(np.array([r])).values.tolist() == \
                log.sparse["device"].take(np.array([rows[0]])).values.tolist()
    # Deterministic: another encoding (another process) draws the same negatives.
    again = encode_log(path, schema, chunk_rows=37)
    np.testing.assert_array_equal(again.item_id, log.item_id)
    np.testing.assert_array_equal(again.label, log.label)


def test_requests_and_examples_carry_the_negatives_as_shown_and_not_clicked(tmp_path):
    path = _positives_only(tmp_path)
    log = encode_log(path, log_schema(path, ReplayConfig()))
    shown = clicked = 0
    for imp, clicks in log_requests(log, "plays"):
        shown += len(imp.items)
        clicked += len(clicks)
        assert len(set(imp.items)) == len(imp.items)
        assert {c.item_id for c in clicks} < set(imp.items) or len(imp.items) == len(clicks)
    assert shown == len(log) and clicked == 400
    examples = [b for b in log_examples(log, "plays")]
    ids = np.concatenate([b.example_id for b in examples])
    labels = np.concatenate([b.label for b in examples])
    assert len(np.unique(ids)) == len(log) and labels.sum() == 400


def test_popularity_sampling_draws_items_as_often_as_they_were_seen(tmp_path):
    # Item 1 is in every other row; every other row has an item of its own.
    lines = ["user_id,item_id,ts"]
    for t in range(600):
        lines.append(f"{t % 50},{1 if t % 2 else 1000 + t},{1_600_000_000 + t}")
    path = tmp_path / "skewed.csv"
    path.write_text("\n".join(lines) + "\n")
    share = {}
    for how in ("uniform", "popularity"):
        log = encode_log(path, LogSchema(label_col="", negatives=2, negative_sampling=how))
        drawn = log.item_id[log.label == 0]
        share[how] = float(np.mean(drawn == 1))
    # At most one draw of item 1 per request, and none where it is the positive: about 0.23.
    assert share["popularity"] > 0.15 and share["uniform"] < 0.05, share


def test_a_labelled_log_gets_negatives_for_its_positive_rows_only(tmp_path):
    path = write_real_shaped_csv(tmp_path / "log.csv", rows=300)
    base = encode_log(path, infer_schema(path)[0])
    schema = log_schema(path, ReplayConfig(negatives=2))
    assert not schema.implicit and schema.negatives == 2
    log = encode_log(path, schema)
    positives = int(base.label.sum())
    added = len(log) - len(base)
    assert 0.8 * 2 * positives < added <= 2 * positives
    assert int(log.label.sum()) == positives  # the log's own labels are kept


@pytest.mark.parametrize("mapping, error", [
    ({"label_col": ""}, "needs sampled negatives"),
    ({"label_col": "", "negatives": 2, "positive_threshold": 4.0}, "no positive_values"),
    ({"negatives": -1}, "bad value"),
    ({"negatives": 2, "negative_sampling": "hard"}, "negative_sampling must be one of"),
])
def test_bad_negative_settings_are_errors(mapping, error):
    with pytest.raises(SchemaError, match=error):
        LogSchema.from_mapping(mapping)


def test_a_named_label_column_that_is_missing_stays_an_error(tmp_path):
    path = _positives_only(tmp_path)
    with pytest.raises(SchemaError, match=r"missing columns \['clicked'\]"):
        log_schema(path, ReplayConfig(label_col="clicked"))


def test_recent_items_are_the_users_last_positives_strictly_before_each_request(tmp_path):
    path = write_real_shaped_csv(tmp_path / "log.csv", rows=300)
    schema = log_schema(path, ReplayConfig())
    from dataclasses import replace

    schema = replace(schema, recent_items=3)
    assert schema.user_slots()[-1] == "recent_items"
    (tmp_path / "s.toml").write_text(schema.to_toml())
    assert LogSchema.from_toml(tmp_path / "s.toml") == schema
    log = encode_log(path, schema)
    bags = log.sparse["recent_items"]
    for r in range(len(log)):
        earlier = [(t, i) for t, i, u, y in zip(log.ts_ms[:r + 1].tolist(), log.item_id[:r + 1].tolist(),
                                                log.user_id[:r + 1].tolist(), log.label[:r + 1].tolist())
                   if u == log.user_id[r] and y > 0 and t < log.ts_ms[r]]
        want = [i for _, i in earlier[-3:]]
        got = bags.values[bags.offsets[r]:bags.offsets[r + 1]].tolist()
        assert got == want, r
    # A request's negatives carry its bag, made of the log's own rows (never of sampled negatives).
    plays = _positives_only(tmp_path)
    implicit = encode_log(plays, replace(log_schema(plays, ReplayConfig()), recent_items=5))
    starts = _request_starts(implicit)
    rb = implicit.sparse["recent_items"]
    real = implicit.label == 1
    for s, e in zip(starts, list(starts[1:]) + [len(implicit)]):
        rows = [rb.values[rb.offsets[r]:rb.offsets[r + 1]].tolist() for r in range(s, e)]
        assert all(b == rows[0] for b in rows)
        mine = real[:s] & (implicit.user_id[:s] == implicit.user_id[s]) & (implicit.ts_ms[:s] < implicit.ts_ms[s])
        assert rows[0] == implicit.item_id[:s][mine][-5:].tolist()
    # Every view carries it: the impressions' user side, the examples' slots.
    imp, _ = next(iter(log_requests(implicit, "plays")))
    assert "recent_items" in imp.user_sparse
    assert "recent_items" in next(iter(log_examples(implicit, "plays"))).sparse


def test_a_log_of_random_users_and_items_scores_an_item_first_row_nowhere(tmp_path):
    """An item's first row can only be a positive (negatives are drawn among items seen before):
    scored, "a new item is a positive" reads as learning on a log with nothing to learn."""
    from training.config import TrainerConfig
    from training.prequential import run_log

    rng = np.random.default_rng(5)
    path = tmp_path / "noise.csv"
    path.write_text("user_id,item_id,ts\n" + "".join(
        f"{u},{i},{1_600_000_000 + 60 * t}\n" for t, (u, i) in enumerate(zip(rng.integers(0, 800, 6000),
                                                                            rng.integers(0, 3000, 6000)))))
    log = encode_log(path, infer_schema(path)[0])
    fair = run_log(log, "noise", TrainerConfig())
    assert fair.unscored_first_sightings > 1000 and fair.to_dict()["unscored_first_sightings"] > 1000
    assert abs(fair.learner.gauc - 0.5) < 0.05
    from streams.log_reader import log_examples
    from training.prequential import run_stream

    naive = run_stream(log_examples(log, "noise", 1024), TrainerConfig())  # every row scored
    assert naive.learner.auc_overall > fair.learner.auc_overall + 0.05
