"""Per-slot pooling: each slot's bags pool by its own mode (sum or mean), from the log schema's
``pooling`` through the trainer's config to the model that training and serving build."""

import argparse
import json

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig
from headwater.cli import bench as bench_cli
from streams.log_infer import infer_schema
from streams.log_reader import encode_log, log_examples
from streams.log_schema import ColumnSpec, LogSchema
from tests.streams.log_fixtures import write_real_shaped_csv
from training.config import TrainerConfig
from training.learner import Learner
from training.model import Bags, DenseTower, ModelConfig, lookup_slots, score

DIM = 4


def _table_with_rows(slots, ids):
    table = EmbeddingTable([SlotConfig(s, DIM, init_std=0.5) for s in slots], device="cpu", seed=0)
    for s in slots:
        table.lookup(s, torch.tensor(ids, dtype=torch.int64), train=True)  # gives each id a row
    return table


def test_a_mean_slot_and_a_sum_slot_pool_as_the_manual_computation():
    cfg = ModelConfig(slots=("a", "b"), embedding_dim=DIM, hidden=(8,), pooling="sum",
                      slot_pooling=("a=mean",))
    assert cfg.slot_poolings() == ("mean", "sum")
    table = _table_with_rows(cfg.slots, [1, 2, 3])
    lengths = np.array([2, 1, 0])
    sparse = {"a": Bags(np.array([1, 2, 3]), lengths), "b": Bags(np.array([1, 2, 3]), lengths)}
    rows = {s: table.lookup(s, torch.tensor([1, 2, 3])) for s in cfg.slots}
    assert all(r.abs().min() > 0 for r in rows.values())  # real rows, not the default zeros
    want_a = torch.stack([(rows["a"][0] + rows["a"][1]) / 2, rows["a"][2], torch.zeros(DIM)])
    want_b = torch.stack([rows["b"][0] + rows["b"][1], rows["b"][2], torch.zeros(DIM)])

    emb = lookup_slots(table, cfg.slots, sparse, 3, cfg.slot_poolings()).emb
    assert torch.allclose(emb[:, 0], want_a) and torch.allclose(emb[:, 1], want_b)

    torch.manual_seed(0)
    tower = DenseTower(cfg).eval()
    with torch.no_grad():
        want = torch.sigmoid(tower(torch.stack([want_a, want_b], dim=1)))
    assert torch.allclose(score(table, tower, sparse, None, 3), want, atol=1e-6)


def test_a_crossed_slot_pools_as_its_named_part():
    cfg = ModelConfig(slots=("user_id", "genres", "user_id*genres"), crosses=("user_id*genres",),
                      slot_pooling=("genres=mean",))
    assert cfg.slot_poolings() == ("sum", "mean", "mean")
    assert ModelConfig.from_json(cfg.to_json()).slot_poolings() == ("sum", "mean", "mean")
    with pytest.raises(ValueError, match="slot_pooling"):
        ModelConfig(slots=("a",), slot_pooling=("a=max",)).validate()
    with pytest.raises(ValueError, match="does not have"):
        ModelConfig(slots=("a",), slot_pooling=("b=mean",)).validate()


def _schema_file(tmp_path, pooling: str):
    path = write_real_shaped_csv(tmp_path / "ratings.csv", rows=600)
    schema, _ = infer_schema(path)
    assert schema.column("genres").kind == "multi"  # the fixture's multi-valued column
    toml = tmp_path / "schema.toml"
    toml.write_text(schema.to_toml().replace('pooling = "sum"', f'pooling = "{pooling}"'))
    return path, toml


def test_a_schema_toml_with_mean_pooling_reaches_the_model(tmp_path):
    path, toml = _schema_file(tmp_path, "mean")
    schema = LogSchema.from_toml(toml)
    cfg = TrainerConfig(embedding_dim=8, hidden=(16,)).for_log(schema)
    batch = next(log_examples(encode_log(path, schema), "log", 200))
    model = Learner.for_batch(cfg, batch).model_cfg
    assert model.pooling_of("genres") == "mean" and model.pooling_of("user_id*genres") == "mean"


def test_multi_valued_columns_that_pool_differently_get_per_slot_entries():
    schema = LogSchema(columns=(ColumnSpec("genres", "multi", "item", pooling="mean"),
                                ColumnSpec("tags", "multi", "item", pooling="sum"),
                                ColumnSpec("gender", "categorical", "user")))
    cfg = TrainerConfig().for_log(schema)
    assert cfg.crosses == ("user_id*genres", "user_id*tags")
    model = cfg.model_config(("gender", "genres", "item_id", "tags", "user_id", *cfg.crosses), 0)
    assert dict(zip(model.slots, model.slot_poolings())) == {
        "gender": "sum", "genres": "mean", "item_id": "sum", "tags": "sum", "user_id": "sum",
        "user_id*genres": "mean", "user_id*tags": "sum"}
    # One mode for every multi-valued column: it becomes the model's one pooling.
    one = TrainerConfig().for_log(LogSchema(columns=(ColumnSpec("genres", "multi", "item", pooling="mean"),)))
    assert (one.pooling, one.slot_pooling) == ("mean", ())
    # recent_items pools by sum, beside a column that pools by mean.
    recent = TrainerConfig().for_log(LogSchema(recent_items=10, columns=(
        ColumnSpec("genres", "multi", "item", pooling="mean"),)))
    assert dict(e.split("=") for e in recent.slot_pooling) == {"genres": "mean", "recent_items": "sum"}
    assert recent.crosses == ("user_id*genres",)  # a user-side slot: no cross with the user


def test_the_learning_bench_pools_as_the_schema_file_says(tmp_path, capsys):
    path, toml = _schema_file(tmp_path, "mean")
    parser = argparse.ArgumentParser(prog="headwater")
    bench_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "learning", "--json", "--no-vw", "--dataset", str(path),
                              "--schema", str(toml), "--batch-size", "200", "--hidden", "16"])
    assert args.handler(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["pooling"] == "mean" and res["examples"] == 600
