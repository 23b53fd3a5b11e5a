"""``headwater bench learning``: one prequential loop feeds the learner and the baselines the same
examples, from a real log or the generator, and prints the contract fields."""

import argparse
import json

import numpy as np
import pytest

from headwater.cli import bench as bench_cli
from streams.events import ExampleBatch, Ragged
from tests.streams.log_fixtures import without_column, write_real_shaped_csv
from bench import learning as bench_learning
from training.baselines import CountingBaseline
from training.config import TrainerConfig
from training.prequential import metrics_of, run_stream

METRICS = {"auc_overall", "auc_last_window", "logloss", "gauc"}
CONTRACT = {"bench", "dataset", "examples", "auc_overall", "auc_last_window", "logloss",
            "examples_per_s", "baselines", "seconds", "positives_rate"}


def _bench(capsys, *argv: str) -> dict:
    """Runs ``headwater bench learning ARGV --json`` in-process; returns its one JSON line."""
    parser = argparse.ArgumentParser(prog="headwater")
    bench_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "learning", "--json", *argv])
    assert args.handler(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # --json: the JSON line and nothing else on stdout
    return json.loads(out[0])


def _sane(res: dict) -> None:
    assert CONTRACT <= set(res)
    assert set(res["baselines"]) == {"counting", "vw"}
    for m in (res, *res["baselines"].values()):
        assert METRICS <= set(m)
        assert 0.0 <= m["auc_overall"] <= 1.0 and 0.0 <= m["auc_last_window"] <= 1.0
        assert 0.0 < m["logloss"] < 2.0
    for name in ("counting", "vw"):
        assert set(res["baselines"][name]) == METRICS
    assert res["examples_per_s"] > 0 and res["seconds"] > 0


def test_bench_on_a_real_shaped_csv_prints_the_contract(tmp_path, capsys):
    path = write_real_shaped_csv(tmp_path / "ratings.csv", rows=4000, users=150, items=120)
    res = _bench(capsys, "--dataset", str(path), "--batch-size", "256")
    _sane(res)
    assert res["bench"] == "learning" and res["dataset"] == str(path)
    assert res["examples"] == 4000 and res["bad_rows"] == 0
    assert 0.05 < res["positives_rate"] < 0.5
    # Every feature column of the log reached the models.
    assert {"genres", "gender", "occupation", "device"} <= set(res["slots"])
    assert res["dense_width"] == 4  # year and age, each with its missing indicator
    # The fixture's clicks follow per-id base rates and a genre match: all of them learn.
    for m in (res, res["baselines"]["counting"], res["baselines"]["vw"]):
        assert m["auc_overall"] > 0.6, res


def test_bench_on_a_log_of_positives_only_learns_against_sampled_negatives(tmp_path, capsys):
    full = write_real_shaped_csv(tmp_path / "full.csv", rows=3000, users=150, items=120)
    plays = without_column(full, tmp_path / "plays.csv")
    res = _bench(capsys, "--dataset", str(plays), "--batch-size", "256", "--negatives", "2")
    _sane(res)
    # Every row a positive, two sampled negatives each (a few early draws dropped).
    assert 3000 < res["examples"] <= 9000 and abs(res["positives_rate"] - 3000 / res["examples"]) < 1e-4
    assert res["auc_overall"] > 0.6, res


def test_bench_column_flags_name_the_reserved_columns(tmp_path, capsys):
    path = write_real_shaped_csv(tmp_path / "r.csv", rows=600)
    text = path.read_text().replace("user_id,item_id,label,ts", "uid,iid,liked,when", 1)
    path.write_text(text)
    res = _bench(capsys, "--dataset", str(path), "--user-col", "uid", "--item-col", "iid",
                 "--label-col", "liked", "--time-col", "when", "--no-vw")
    assert res["examples"] == 600
    assert set(res["baselines"]) == {"counting"}


def test_a_log_whose_examples_are_all_one_label_is_refused_saying_why(tmp_path, capsys):
    from streams.wire import SchemaError

    path = tmp_path / "clicks.csv"  # a display's rows read with the page as the item: one row each
    path.write_text("user_id,item_id,label,ts\n" + "".join(f"u{k // 3 % 4},page,{int(k % 3 == 0)},{k // 3}\n"
                                                          for k in range(60)))
    with pytest.raises(SchemaError, match=r"every one of its 20 examples is a positive, so there is nothing "
                       r"to rank \(label 'label'\); 40 rows were merged as repeats of one user, item and "
                       r"time: is 'item_id' the item\?"):
        _bench(capsys, "--dataset", str(path), "--no-vw")


def test_vw_args_reach_the_vowpal_wabbit_baseline(tmp_path, capsys):
    path = write_real_shaped_csv(tmp_path / "r.csv", rows=1500)
    plain = _bench(capsys, "--dataset", str(path))
    crossed = _bench(capsys, "--dataset", str(path), "--vw-args", "-q ui")
    assert crossed["vw_args"] == "-q ui" and "vw_args" not in plain
    assert crossed["baselines"]["vw"]["logloss"] != plain["baselines"]["vw"]["logloss"]
    assert crossed["baselines"]["counting"] == plain["baselines"]["counting"]


def test_bench_on_the_generator_reports_truth_baselines_and_runs(capsys):
    res = _bench(capsys, "--events", "12000", "--seeds", "0,1", "--eval-window", "2000")
    _sane(res)
    assert res["dataset"] is None and res["seeds"] == [0, 1]
    assert len(res["runs"]) == 2 and res["examples"] == sum(r["examples"] for r in res["runs"])
    assert 0.75 < res["auc_truth_overall"] < 0.95 and 0.75 < res["auc_truth_last_window"] < 0.95
    gaps = [r["auc_truth_last_window"] - r["auc_last_window"] for r in res["runs"]]
    assert res["max_auc_gap"] == pytest.approx(max(gaps), abs=2e-4)
    for r in res["runs"]:
        assert {"auc_gap_eval_window", "auc_truth_overall", "baselines", "seed"} <= set(r)


def test_learner_flags_reach_the_learner(tmp_path, capsys):
    path = write_real_shaped_csv(tmp_path / "r.csv", rows=600)
    res = _bench(capsys, "--dataset", str(path), "--batch-size", "100", "--no-vw",
                 "--embedding-dim", "4", "--hidden", "16,8")
    assert res["batch_size"] == 100 and res["examples"] == 600
    parser = argparse.ArgumentParser()
    bench_learning.add_arguments(parser)
    cfg = bench_learning.trainer_config(parser.parse_args(
        ["--embedding-dim", "4", "--hidden", "16,8", "--no-use-fm", "--sparse-lr", "0.1"]))
    assert (cfg.embedding_dim, cfg.hidden, cfg.use_fm, cfg.sparse_lr) == (4, (16, 8), False, 0.1)
    assert cfg.batch_size == TrainerConfig().batch_size and not cfg.publish


def _examples(ids, labels) -> ExampleBatch:
    n = len(ids)
    users = np.arange(n, dtype=np.int64) % 5
    items = np.asarray(ids, np.int64) % 7
    ones = np.ones(n, np.int32)
    return ExampleBatch(example_id=np.asarray(ids, np.int64), user_id=users, item_id=items,
                        label=np.asarray(labels, np.float32), sample_rate=np.ones(n, np.float32),
                        event_time_ms=np.arange(n, dtype=np.int64),
                        sparse={"user_id": Ragged(users, ones), "item_id": Ragged(items, ones.copy())},
                        dense=np.zeros((n, 0), np.float32), truth_p=np.full(n, 0.3, np.float32))


def test_one_loop_scores_every_model_on_the_same_deduplicated_rows():
    rng = np.random.default_rng(0)
    first = _examples(np.arange(3000), rng.random(3000) < 0.3)
    again = _examples(np.arange(2500, 3500), rng.random(1000) < 0.3)  # 500 duplicates
    cfg = TrainerConfig(batch_size=256, eval_window=1000, publish=False)
    res = run_stream([first, again], cfg, [CountingBaseline()])
    assert res.examples == 3500
    assert res.evaluator.overall.learner.n == 3500  # the learner saw exactly those rows
    assert res.truth is not None and set(res.baselines) == {"counting"}


def test_last_window_is_the_last_tenth_by_position():
    y = np.array([0, 1] * 50, np.float32)
    logits = np.where(y > 0, -1.0, 1.0)  # perfectly wrong ...
    logits[90:] = np.where(y[90:] > 0, 1.0, -1.0)  # ... except on the last 10 rows
    m = metrics_of(logits, y, np.ones(100))
    assert m.auc_last_window == 1.0
    assert m.auc_overall < 0.2
