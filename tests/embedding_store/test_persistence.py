"""RocksDB snapshots: bitwise restore, incremental saves, consistency under load, corruption."""

import glob
import os
import threading

import numpy as np
import pytest
import torch
from rocksdict import Options, Rdict

from embedding_store import EmbeddingTable, SlotConfig
from embedding_store.persistence import SnapshotCorruptError

SLOTS = [
    SlotConfig("u", 8, ttl_s=50.0),
    SlotConfig("i", 4, optimizer="ftrl", admit_threshold=2, sketch_width=1 << 12),
    SlotConfig("a", 3, optimizer="adam"),
]


def _train(t: EmbeddingTable, step: int, now: float = 0.0) -> None:
    g = torch.Generator().manual_seed(step)
    for cfg in SLOTS:
        keys = torch.randint(-(2**40), 2**40, (300,), generator=g) % 5000
        t.lookup(cfg.name, keys, train=True, now=now)
        t.apply_gradients(cfg.name, keys, torch.randn(300, cfg.dim, generator=g), now=now)


def _assert_bitwise_equal(a: EmbeddingTable, b: EmbeddingTable) -> None:
    assert a.version == b.version
    for name in a.slots:
        x, y = a._stores[name], b._stores[name]
        assert torch.equal(x.values, y.values)
        for k in x.state:
            assert torch.equal(x.state[k], y.state[k])
        for attr in ("ids", "live", "touched", "row_version", "free"):
            np.testing.assert_array_equal(getattr(x, attr), getattr(y, attr))
        assert x.high == y.high and x.counters == y.counters
        if x.sketch is not None:
            np.testing.assert_array_equal(x.sketch.counts, y.sketch.counts)
        assert torch.equal(x.generator.get_state(), y.generator.get_state())
        assert len(x.deletions) == len(y.deletions)


def test_full_snapshot_restores_bitwise_and_continues_identically(tmp_path):
    t = EmbeddingTable(SLOTS, seed=5)
    for s in range(4):
        _train(t, s, now=float(s * 20))
    t.expire(now=100.0)
    t.save(tmp_path / "snap", incremental=False)
    r = EmbeddingTable.load(tmp_path / "snap")
    _assert_bitwise_equal(t, r)
    _train(t, 9, now=101.0)
    _train(r, 9, now=101.0)
    _assert_bitwise_equal(t, r)


def test_incremental_snapshot_writes_only_changed_blocks(tmp_path):
    t = EmbeddingTable([SlotConfig("u", 8)], seed=0)
    t.lookup("u", torch.arange(20_000, dtype=torch.int64), train=True)
    first = t.save(tmp_path / "snap")
    assert first["full"]
    t.apply_gradients("u", torch.tensor([5, 6]), torch.ones(2, 8))
    second = t.save(tmp_path / "snap")
    assert not second["full"] and second["bytes"] < first["bytes"] / 3
    _assert_bitwise_equal(t, EmbeddingTable.load(tmp_path / "snap"))


def test_snapshot_taken_while_lookups_continue_is_consistent(tmp_path):
    # Every training batch bumps the version by a known amount; the snapshot must equal a replay
    # of exactly the batches up to its version.
    def batches():
        for s in range(400):
            yield torch.arange(s * 50, s * 50 + 100, dtype=torch.int64)

    t = EmbeddingTable([SlotConfig("u", 8)], seed=0)
    stop = threading.Event()

    def writer():
        for b in batches():
            if stop.is_set():
                return
            t.lookup("u", b, train=True, now=0.0)

    th = threading.Thread(target=writer)
    th.start()
    try:
        for k in range(3):
            t.save(tmp_path / "snap", incremental=k > 0)
    finally:
        stop.set()
        th.join()
    snap = EmbeddingTable.load(tmp_path / "snap")
    replay = EmbeddingTable([SlotConfig("u", 8)], seed=0)
    for b in batches():
        if replay.version == snap.version:
            break
        replay.lookup("u", b, train=True, now=0.0)
    _assert_bitwise_equal(replay, snap)


def _raw(path):
    return Rdict(str(path), Options(raw_mode=True))


def test_corrupted_record_is_refused(tmp_path):
    t = EmbeddingTable(SLOTS)
    _train(t, 0)
    t.save(tmp_path / "snap")
    db = _raw(tmp_path / "snap")
    key = b"s/u/blk/00000000"
    rec = bytearray(db[key])
    rec[100] ^= 0x01
    db[key] = bytes(rec)
    db.close()
    with pytest.raises(SnapshotCorruptError, match="checksum"):
        EmbeddingTable.load(tmp_path / "snap")


def test_missing_record_is_refused(tmp_path):
    t = EmbeddingTable(SLOTS)
    _train(t, 0)
    t.save(tmp_path / "snap")
    db = _raw(tmp_path / "snap")
    del db[b"s/i/sketch"]
    db.close()
    with pytest.raises(SnapshotCorruptError, match="missing"):
        EmbeddingTable.load(tmp_path / "snap")


def test_truncated_files_are_refused(tmp_path):
    t = EmbeddingTable(SLOTS)
    _train(t, 0)
    t.save(tmp_path / "snap")
    files = glob.glob(str(tmp_path / "snap" / "*.sst"))
    assert files
    for f in files:
        os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(SnapshotCorruptError):
        EmbeddingTable.load(tmp_path / "snap")


def test_loading_a_missing_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        EmbeddingTable.load(tmp_path / "nothing")
