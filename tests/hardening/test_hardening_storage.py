"""Storage faults: real files on disk are truncated or bit-flipped; every component notices.

A corrupt checkpoint falls back to the previous good one (log line says so) or, when none is
left, refuses with :class:`CheckpointCorruptError`; a corrupt RocksDB snapshot refuses to load;
the serving replica ignores corrupt warm-restart state and bootstraps from the topic. None of
them ever hands back the damaged bytes.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig
from embedding_store.persistence import SnapshotCorruptError
from streams.kafka_io import KafkaConfig
from training.checkpoint import CheckpointCorruptError, CheckpointStore
from training.config import TrainerConfig

SLOTS = [SlotConfig(name="user_id", dim=8), SlotConfig(name="item_id", dim=8)]


def flip_bytes(path: str, count: int = 16) -> None:
    """XORs ``count`` bytes spread over the middle of the file (the on-disk corruption)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for pos in np.linspace(size // 4, 3 * size // 4, count).astype(int):
            f.seek(int(pos))
            b = f.read(1)
            f.seek(int(pos))
            f.write(bytes([b[0] ^ 0xFF]))


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def trained_table() -> EmbeddingTable:
    t = EmbeddingTable(SLOTS, seed=0)
    for slot in ("user_id", "item_id"):
        ids = torch.arange(500, dtype=torch.int64)
        t.lookup(slot, ids, train=True)
        t.apply_gradients(slot, ids, torch.randn(500, 8, generator=torch.Generator().manual_seed(1)))
    return t


def two_checkpoints(root) -> CheckpointStore:
    store = CheckpointStore(root)
    store.write(None, {"w": torch.full((64,), 1.0)}, {"k": "first"}, {("hw.examples", 0): 10}, table_version=1)
    store.write(None, {"w": torch.full((64,), 2.0)}, {"k": "second"}, {("hw.examples", 0): 20}, table_version=2)
    return store


# -- safetensors checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["bit-flip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_with_a_log_line(tmp_path, caplog, damage):
    store = two_checkpoints(tmp_path)
    assert store.latest().seq == 2
    damage(str(tmp_path / "state-00000002.safetensors"))
    with caplog.at_level(logging.ERROR, logger="training.checkpoint"):
        m = store.latest()
    assert m.seq == 1 and m.offsets_by_partition() == {("hw.examples", 0): 10}
    assert "state-00000002.safetensors fails its sha256" in caplog.text
    assert "falling back to the previous checkpoint 1" in caplog.text
    tensors, meta = store.load_state(m)
    assert torch.equal(tensors["w"], torch.full((64,), 1.0)) and meta == {"k": "first"}


def test_a_write_after_a_fallback_keeps_the_good_checkpoint_as_its_fallback(tmp_path):
    store = two_checkpoints(tmp_path)
    flip_bytes(str(tmp_path / "state-00000002.safetensors"))
    again = CheckpointStore(tmp_path)  # a restarted trainer
    assert again.latest().seq == 1
    again.write(None, {"w": torch.full((64,), 3.0)}, {"k": "third"}, {("hw.examples", 0): 30}, table_version=3)
    newest = again.latest()
    assert newest.seq == 3 and torch.equal(again.load_state(newest)[0]["w"], torch.full((64,), 3.0))
    flip_bytes(str(tmp_path / newest.state_file))
    assert again.latest().seq == 1  # never the corrupt checkpoint 2


def test_every_checkpoint_corrupt_refuses_with_a_clear_error(tmp_path, caplog):
    store = two_checkpoints(tmp_path)
    truncate(str(tmp_path / "state-00000001.safetensors"))
    flip_bytes(str(tmp_path / "state-00000002.safetensors"))
    with caplog.at_level(logging.ERROR, logger="training.checkpoint"), \
            pytest.raises(CheckpointCorruptError, match="no usable checkpoint"):
        store.latest()
    assert "so is the previous one" in caplog.text


def test_load_state_verifies_the_file_it_reads(tmp_path):
    store = two_checkpoints(tmp_path)
    m = store.latest()
    flip_bytes(str(tmp_path / m.state_file), count=1)  # corrupted after latest() chose it
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        store.load_state(m)


def test_a_corrupt_manifest_falls_back_to_the_previous_manifest(tmp_path, caplog):
    store = two_checkpoints(tmp_path)
    truncate(str(tmp_path / "MANIFEST.json"))
    with caplog.at_level(logging.ERROR, logger="training.checkpoint"):
        assert store.latest().seq == 1
    assert "unreadable" in caplog.text


# -- RocksDB embedding snapshots ------------------------------------------------------------------


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["bit-flip", "truncate"])
def test_corrupt_rocksdb_snapshot_files_are_refused_with_a_log_line(tmp_path, caplog, damage):
    t = trained_table()
    t.save(str(tmp_path / "snap"))
    ssts = glob.glob(str(tmp_path / "snap" / "*.sst"))
    assert ssts
    for f in ssts:
        damage(f)
    with caplog.at_level(logging.ERROR, logger="embedding_store.persistence"), pytest.raises(SnapshotCorruptError):
        EmbeddingTable.load(str(tmp_path / "snap"))
    assert "is corrupt, refusing to load it" in caplog.text


def test_trainer_refuses_to_start_on_a_corrupt_table_snapshot(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "ckpt")
    table = trained_table()
    store.write(table, {"w": torch.ones(4)}, {}, {("hw.examples", 0): 5}, table_version=table.version)
    for f in glob.glob(str(store.table_path / "*.sst")):
        flip_bytes(f)
    from training.trainer import OnlineTrainer

    # Refused while resuming, before any Kafka client exists (nothing listens on port 9).
    with caplog.at_level(logging.ERROR), pytest.raises(SnapshotCorruptError):
        OnlineTrainer(TrainerConfig(checkpoint_dir=str(tmp_path / "ckpt")),
                      KafkaConfig(bootstrap_servers="127.0.0.1:9"))
    assert "refusing to load it" in caplog.text


# -- the serving replica's warm-restart state ----------------------------------------------------


def persisted_replica(state_dir):
    from serving.param_server import ParamServer, ParamServerConfig
    from training.model import DenseTower, ModelConfig

    cfg = ParamServerConfig(model_id="ctr", state_dir=str(state_dir))
    ps = ParamServer(cfg, "127.0.0.1:9", "hw.params")  # never started: no broker needed
    ps.state.table = trained_table()
    ps.state.tower = DenseTower(ModelConfig(slots=("user_id", "item_id"), embedding_dim=8, hidden=(16,)))
    ps.state.version, ps.next_offset = 7, 42
    ps.persist()
    return cfg


def test_replica_restores_intact_warm_state(tmp_path):
    from serving.param_server import ParamServer

    cfg = persisted_replica(tmp_path / "ps")
    ps = ParamServer(cfg, "127.0.0.1:9", "hw.params")
    assert ps.restored and ps.next_offset == 42


@pytest.mark.parametrize("target", ["tower", "table"])
def test_replica_with_corrupt_warm_state_bootstraps_from_the_topic_instead(tmp_path, caplog, target):
    from serving.param_server import ParamServer

    cfg = persisted_replica(tmp_path / "ps")
    files = ([str(tmp_path / "ps" / "tower.safetensors")] if target == "tower"
             else glob.glob(str(tmp_path / "ps" / "table" / "*.sst")))
    for f in files:
        flip_bytes(f)
    with caplog.at_level(logging.ERROR):
        ps = ParamServer(cfg, "127.0.0.1:9", "hw.params")
    assert not ps.restored and ps.state.table is None and ps.state.tower is None
    assert ps.next_offset == -1  # bootstrap from the newest snapshot on the topic
    assert "unusable" in caplog.text and "bootstrapping from the topic" in caplog.text
