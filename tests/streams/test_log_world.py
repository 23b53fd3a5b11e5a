"""The rating-log-shaped generator: deterministic, heavy-tailed, real-shaped columns, known truth."""

from __future__ import annotations

import dataclasses
import gzip
import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from streams.log_reader import encode_log
from streams.log_infer import infer_schema
from streams.log_schema import LogSchema
from streams.log_world import LogWorld, generate_log
from streams.log_world_config import GENRES, OCCUPATIONS, LogWorldConfig
from streams.log_world_writer import log_world_schema, schema_path_for, write_log

SMALL = LogWorldConfig(users=400, items=600, rows=40_000, seed=3)


@pytest.fixture(scope="module")
def small() -> pa.Table:
    return generate_log(SMALL)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    pos = y.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _counting(users: np.ndarray, items: np.ndarray, y: np.ndarray, a: float = 5.0) -> np.ndarray:
    """Prequential smoothed per-user + per-item log-odds (the issue's counting baseline)."""
    u = np.unique(users, return_inverse=True)[1].tolist()
    i = np.unique(items, return_inverse=True)[1].tolist()
    nu, pu, ni, pi = [0] * (max(u) + 1), [0] * (max(u) + 1), [0] * (max(i) + 1), [0] * (max(i) + 1)
    tot = pos = 0
    out = np.empty(len(u))
    for k, (uu, ii, yy) in enumerate(zip(u, i, y.tolist())):
        g = (pos + 1) / (tot + 2)
        ru = (pu[uu] + a * g) / (nu[uu] + a)
        ri = (pi[ii] + a * g) / (ni[ii] + a)
        out[k] = math.log(ru / (1 - ru)) + math.log(ri / (1 - ri)) - math.log(g / (1 - g))
        nu[uu] += 1; pu[uu] += yy; ni[ii] += 1; pi[ii] += yy
        tot += 1; pos += yy
    return out


def test_same_seed_same_log_other_seed_other_log(small):
    assert generate_log(SMALL).equals(small)
    other = generate_log(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(other["label"].to_numpy(), small["label"].to_numpy())


def test_rows_are_in_event_time_order_in_epoch_seconds(small):
    ts = small["ts"].to_numpy()
    assert small.num_rows == SMALL.rows
    assert np.all(np.diff(ts) >= 0)
    assert ts[0] >= SMALL.start_ts and ts[-1] <= SMALL.start_ts + SMALL.span_days * 86_400


def test_item_popularity_is_heavy_tailed(small):
    counts = np.sort(np.unique(small["item_id"].to_numpy(zero_copy_only=False), return_counts=True)[1])[::-1]
    top1 = counts[: SMALL.items // 100].sum() / counts.sum()
    assert top1 > 0.10  # 1% of the catalogue takes over 10% of the rows (MovieLens: 16%)
    assert np.median(counts) < counts.mean() / 1.5


def test_user_activity_is_heavy_tailed(small):
    counts = np.unique(small["user_id"].to_numpy(zero_copy_only=False), return_counts=True)[1]
    q50, q90 = np.quantile(counts, [0.5, 0.9])
    assert q90 / q50 > 2.5  # MovieLens: 4.5
    top10 = np.sort(counts)[::-1][: len(counts) // 10].sum() / counts.sum()
    assert top10 > 0.3  # MovieLens: 0.46
    assert counts.min() >= SMALL.min_user_events


def test_truth_beats_counting_by_the_intended_margin(small):
    y = small["label"].to_numpy()
    truth = _auc(y, small["truth_p"].to_numpy())
    counting = _auc(y, _counting(small["user_id"].to_numpy(zero_copy_only=False),
                                 small["item_id"].to_numpy(zero_copy_only=False), y))
    assert 0.78 <= truth <= 0.88
    assert 0.03 <= truth - counting <= 0.10  # room for a learner that uses taste and attributes
    assert counting > 0.70  # but most of the signal is in the per-id base rates
    assert 0.3 <= y.mean() <= 0.7  # rating-log label rate (label = liked)


def test_labels_are_drawn_from_truth_p(small):
    p = small["truth_p"].to_numpy()
    y = small["label"].to_numpy()
    assert set(np.unique(y)) == {0, 1}
    assert np.all((p > 0) & (p < 1))
    for lo, hi in ((0.0, 0.2), (0.4, 0.6), (0.8, 1.0)):
        band = (p >= lo) & (p < hi)
        assert abs(y[band].mean() - p[band].mean()) < 0.03


def test_ids_are_strings_by_default_and_integers_on_request(small):
    assert small["user_id"].type == pa.string() and small["item_id"].type == pa.string()
    assert small["user_id"][0].as_py().startswith("u") and small["item_id"][0].as_py().startswith("i")
    ints = generate_log(dataclasses.replace(SMALL, rows=2_000, string_ids=False))
    assert ints["user_id"].type == pa.int64() and ints["item_id"].type == pa.int64()


def test_side_columns_have_their_kinds_and_empty_cells(small):
    gender = small["gender"]
    assert gender.type == pa.string() and set(gender.drop_null().to_pylist()) == {"M", "F"}
    assert small["occupation"].type == pa.string()
    assert set(small["occupation"].to_pylist()) <= set(OCCUPATIONS)
    assert small["brand"].type == pa.string() and small["brand"][0].as_py().startswith("brand")
    tags = [g.split("|") for g in small["genres"].drop_null().to_pylist()]
    assert {t for row in tags for t in row} <= set(GENRES)
    assert max(len(row) for row in tags) > 1  # multi-valued
    assert all(len(set(row)) == len(row) for row in tags)  # no tag twice in a cell
    assert pa.types.is_integer(small["age"].type) and pa.types.is_integer(small["year"].type)
    for col in ("gender", "age", "genres", "year"):
        assert small[col].null_count > 0, col
    # Empty cells are per user / per item, at about the configured share.
    items = small["item_id"].to_numpy(zero_copy_only=False)
    year_null = small["year"].is_null().to_numpy(zero_copy_only=False)
    share = np.unique(items[year_null]).size / np.unique(items).size
    assert 0.05 < share < 0.15


def test_side_columns_never_vary_within_their_user_or_item(small):
    for key, cols in (("user_id", ("gender", "age", "occupation")), ("item_id", ("brand", "genres", "year"))):
        grouped = small.select([key, *cols]).group_by(key).aggregate(
            [(c, "count_distinct", pa.compute.CountOptions(mode="all")) for c in cols])
        for c in cols:
            assert max(grouped[f"{c}_count_distinct"].to_pylist()) == 1, c


def test_item_attributes_explain_part_of_the_item_base_rate():
    world = LogWorld(SMALL)
    brand_mean = np.bincount(world.brand, world.item_bias) / np.maximum(np.bincount(world.brand), 1)
    explained = brand_mean[world.brand].var() / world.item_bias.var()
    assert explained > 0.1
    none = LogWorld(dataclasses.replace(SMALL, item_attr_share=0.0))
    brand_mean = np.bincount(none.brand, none.item_bias) / np.maximum(np.bincount(none.brand), 1)
    assert brand_mean[none.brand].var() / none.item_bias.var() < explained / 2


def test_genres_explain_part_of_the_taste():
    world = LogWorld(SMALL)
    tags = world.item_tags
    one = tags.sum(1) == 1
    first = np.argmax(tags, 1)
    v = world.item_vec / np.linalg.norm(world.item_vec, axis=1, keepdims=True)
    same = [(a, b) for a in np.flatnonzero(one)[:200] for b in np.flatnonzero(one)[:200]
            if a < b and first[a] == first[b]]
    diff = [(a, b) for a in np.flatnonzero(one)[:200] for b in np.flatnonzero(one)[:200]
            if a < b and first[a] != first[b]]
    cos_same = np.mean([v[a] @ v[b] for a, b in same])
    cos_diff = np.mean([v[a] @ v[b] for a, b in diff])
    assert cos_same > cos_diff + 0.2


def test_the_truth_drifts_with_event_time_and_stands_still_without_drift():
    world = LogWorld(SMALL)
    users, items = np.arange(50), np.arange(50)
    zero = np.zeros(50)
    half = np.full(50, world.span_s / 2)
    moved = np.abs(world.truth_logit(users, items, half, zero) - world.truth_logit(users, items, zero, zero))
    assert moved.mean() > 0.1
    still = LogWorld(dataclasses.replace(SMALL, item_drift_std=0.0, taste_drift=0.0))
    assert np.allclose(still.truth_logit(users, items, half, zero),
                       still.truth_logit(users, items, zero, zero))


def test_a_users_rate_wanders_along_their_own_events():
    world = LogWorld(SMALL)
    counts = np.full(20, 200)
    w = world.wander(counts).reshape(20, 200)
    assert abs(w.std() - 1.0) < 0.15
    lag1 = np.mean([np.corrcoef(r[1:], r[:-1])[0, 1] for r in w])
    lag60 = np.mean([np.corrcoef(r[60:], r[:-60])[0, 1] for r in w])
    assert lag1 > 0.8 and lag60 < 0.3  # correlated over ~user_drift_events events, then not


def test_no_event_precedes_its_items_release():
    world = LogWorld(SMALL)
    users, items, t, _ = world.sample_rows()
    assert np.all(world.release_s[items] <= t)
    assert (world.release_s > 0).mean() > 0.2  # new items do arrive during the log


def test_users_who_pick_what_they_like_rate_higher():
    picky = generate_log(dataclasses.replace(SMALL, choice_strength=1.0))
    base = generate_log(SMALL)
    assert picky["label"].to_numpy().mean() > base["label"].to_numpy().mean() + 0.05


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz", "log.parquet"])
def test_write_log_writes_the_table_and_its_schema(tmp_path, name):
    cfg = dataclasses.replace(SMALL, rows=3_000)
    path, schema_path = write_log(cfg, tmp_path / name)
    assert schema_path == tmp_path / "log.schema.toml"
    if name.endswith(".parquet"):
        back = pq.read_table(path)
    else:
        if name.endswith(".gz"):
            with gzip.open(path, "rt") as f:
                text = f.read()
        else:
            text = path.read_text()
        assert text.splitlines()[0].replace('"', "") == ",".join(generate_log(cfg).column_names)
        back = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    table = generate_log(cfg)
    assert back.num_rows == table.num_rows
    assert back["user_id"].to_pylist() == table["user_id"].to_pylist()
    assert back["genres"].to_pylist() == table["genres"].to_pylist()  # empty cells come back empty
    assert back["year"].null_count == table["year"].null_count > 0
    schema = LogSchema.from_toml(schema_path)
    assert schema == log_world_schema()
    assert schema.truth_col == "truth_p" and schema.time_col == "ts"
    assert set(schema.user_slots()) == {"gender", "occupation"}
    assert set(schema.item_slots()) == {"brand", "genres"}


def test_the_log_reader_reads_a_written_log_with_its_schema(tmp_path):
    cfg = dataclasses.replace(SMALL, rows=3_000)
    path, schema_path = write_log(cfg, tmp_path / "log.csv.gz")
    encoded = encode_log(path, LogSchema.from_toml(schema_path))
    table = generate_log(cfg)
    assert len(encoded) == table.num_rows and not encoded.bad_rows
    np.testing.assert_allclose(encoded.truth_p, table["truth_p"].to_numpy(), atol=1e-6)
    np.testing.assert_array_equal(encoded.label, table["label"].to_numpy())
    assert set(encoded.sparse) >= {"gender", "occupation", "brand", "genres"}
    assert encoded.dense.shape == (table.num_rows, 4)  # age, year: value and missing flag each


def test_inference_finds_the_schema_the_world_writes(tmp_path):
    path, _ = write_log(dataclasses.replace(SMALL, rows=3_000), tmp_path / "log.parquet")
    inferred, _ = infer_schema(path)
    assert {c.name: (c.kind, c.side) for c in inferred.columns} == {
        c.name: (c.kind, c.side) for c in log_world_schema().columns}


def test_write_log_refuses_an_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        write_log(SMALL, tmp_path / "log.json")
    assert schema_path_for("a/b/log.csv.gz").name == "log.schema.toml"


def test_bad_configs_are_refused():
    for bad in (dict(users=0), dict(year_missing=1.5), dict(taste_std=-1.0), dict(pop_quality_corr=2.0)):
        with pytest.raises(ValueError):
            LogWorld(dataclasses.replace(SMALL, **bad))
