"""Dirty tracking: deltas carry exactly the changed rows and expiry deletions, on the wire too."""

import numpy as np
import pytest
import torch

from embedding_store import DeltaFormatError, EmbeddingTable, SlotConfig, decode_delta, encode_delta


def _tables():
    slots = [SlotConfig("u", 4, ttl_s=10.0), SlotConfig("i", 3, optimizer="ftrl")]
    return EmbeddingTable(slots, seed=1), EmbeddingTable(slots, seed=2)


def _assert_same_rows(a: EmbeddingTable, b: EmbeddingTable, slot: str) -> None:
    ka, kb = np.sort(a.ids(slot)), np.sort(b.ids(slot))
    np.testing.assert_array_equal(ka, kb)
    k = torch.from_numpy(ka)
    assert torch.equal(a.lookup(slot, k), b.lookup(slot, k))


def test_export_delta_holds_only_rows_changed_since_the_version():
    src, _ = _tables()
    src.lookup("u", torch.arange(100, dtype=torch.int64), train=True, now=0.0)
    v = src.version
    src.apply_gradients("u", torch.tensor([3, 3, 40]), torch.ones(3, 4), now=1.0)
    d = src.export_delta(v)
    assert sorted(d.slots["u"].ids.tolist()) == [3, 40]
    assert d.slots["i"].ids.size == 0 and d.from_version == v and d.to_version == src.version
    assert src.export_delta(src.version).num_rows == 0


def test_replica_follows_through_deltas_including_expiry_deletions():
    src, dst = _tables()
    src.lookup("u", torch.arange(50, dtype=torch.int64), train=True, now=0.0)
    src.lookup("i", torch.arange(20, dtype=torch.int64), train=True, now=0.0)
    dst.import_delta(src.export_delta(0))
    v = src.version
    src.apply_gradients("u", torch.arange(10, dtype=torch.int64), torch.ones(10, 4), now=5.0)
    src.apply_gradients("i", torch.tensor([1, 1, 2]), torch.ones(3, 3), now=5.0)
    assert src.expire(now=12.0) == 40
    d = src.export_delta(v)
    assert sorted(d.slots["u"].deleted_ids.tolist()) == list(range(10, 50))
    dst.import_delta(d)
    _assert_same_rows(src, dst, "u")
    _assert_same_rows(src, dst, "i")
    assert dst.stats()["u"]["live_rows"] == 10


def test_an_id_expired_and_recreated_travels_as_an_upsert():
    src, dst = _tables()
    src.lookup("u", torch.tensor([7, 8]), train=True, now=0.0)
    dst.import_delta(src.export_delta(0))
    v = src.version
    src.expire(now=100.0)
    src.lookup("u", torch.tensor([7]), train=True, now=100.0)
    d = src.export_delta(v)
    assert d.slots["u"].ids.tolist() == [7] and d.slots["u"].deleted_ids.tolist() == [8]
    dst.import_delta(d)
    _assert_same_rows(src, dst, "u")


def test_delta_with_state_lets_a_replica_continue_training_identically():
    src, dst = _tables()
    keys = torch.arange(30, dtype=torch.int64)
    src.lookup("i", keys, train=True)
    src.apply_gradients("i", keys, torch.randn(30, 3))
    dst.import_delta(src.export_delta(0, with_state=True))
    g = torch.randn(30, 3)
    src.apply_gradients("i", keys, g)
    dst.apply_gradients("i", keys, g)
    assert torch.equal(src.lookup("i", keys), dst.lookup("i", keys))


@pytest.mark.parametrize("with_state", [False, True])
def test_wire_encoding_round_trips_in_chunks(with_state):
    src, dst = _tables()
    src.lookup("u", torch.arange(-500, 500, dtype=torch.int64) << 33, train=True, now=0.0)
    src.lookup("i", torch.arange(10, dtype=torch.int64), train=True, now=0.0)
    src.apply_gradients("i", torch.arange(10, dtype=torch.int64), torch.ones(10, 3))
    d = src.export_delta(0, with_state=with_state)
    chunks = encode_delta(d, max_bytes=8 * 1024)
    assert len(chunks) > 2 and all(len(c) <= 8 * 1024 for c in chunks)
    for c in chunks:
        part = decode_delta(c)
        assert part.to_version == d.to_version
        dst.import_delta(part)
    _assert_same_rows(src, dst, "u")
    _assert_same_rows(src, dst, "i")


def test_fp16_encoding_halves_values_within_tolerance():
    src, dst = _tables()
    src.lookup("u", torch.arange(200, dtype=torch.int64), train=True)
    d = src.export_delta(0, slots=["u"])
    (full,), (half,) = encode_delta(d), encode_delta(d, fp16=True)
    assert len(half) < 0.8 * len(full)
    got = decode_delta(half).slots["u"]
    torch.testing.assert_close(got.values, d.slots["u"].values, atol=1e-4, rtol=1e-3)


def test_corrupted_or_truncated_chunks_are_refused():
    src, _ = _tables()
    src.lookup("u", torch.arange(20, dtype=torch.int64), train=True)
    (chunk,) = encode_delta(src.export_delta(0, slots=["u"]))
    with pytest.raises(DeltaFormatError, match="checksum"):
        decode_delta(chunk[:-9] + chunk[-8:])
    flipped = bytearray(chunk)
    flipped[60] ^= 0xFF
    with pytest.raises(DeltaFormatError, match="checksum"):
        decode_delta(bytes(flipped))
    with pytest.raises(DeltaFormatError, match="too short"):
        decode_delta(b"HWD1")


def test_compacting_the_deletion_log_forgets_only_old_records():
    src, _ = _tables()
    src.lookup("u", torch.tensor([1, 2]), train=True, now=0.0)
    src.expire(now=100.0)
    v = src.version
    src.lookup("u", torch.tensor([3]), train=True, now=100.0)
    src.expire(now=200.0)
    src.compact_deletions(v)
    assert src.export_delta(0).slots["u"].deleted_ids.tolist() == [3]


def test_import_refuses_a_delta_of_the_wrong_dim_and_changes_nothing():
    src = EmbeddingTable([SlotConfig("u", 5)])
    src.lookup("u", torch.tensor([1]), train=True)
    _, dst = _tables()
    v = dst.version
    with pytest.raises(ValueError, match="dim"):
        dst.import_delta(src.export_delta(0))
    assert dst.version == v and dst.stats()["u"]["live_rows"] == 0
