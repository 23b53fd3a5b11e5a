"""The compiled read (probe and gather in one pass, ``EmbeddingTable.lookup``) returns exactly the
vectors of a reference read: a dict of the slot's live ids (from the row metadata, not the index)
and a plain gather, with the default row for every id without a row."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_store import EmbeddingTable, SlotConfig
from embedding_store.split_batch import _SPLIT_MIN

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
EXTREMES = np.array([0, -1, 1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**62, -(2**62)], dtype=np.int64)


def reference_read(t: EmbeddingTable, slot: str, keys: np.ndarray) -> torch.Tensor:
    s = t._stores[slot]
    live = np.flatnonzero(s.live)
    row_of = dict(zip(s.ids[live].tolist(), live.tolist()))
    rows = torch.tensor([row_of.get(k, 0) for k in keys.tolist()], dtype=torch.int64)  # 0: the default row
    return s.values.index_select(0, rows)


def assert_reads_match(t: EmbeddingTable, slot: str, keys: np.ndarray) -> None:
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    got = t.lookup(slot, torch.from_numpy(keys))
    assert torch.equal(got, reference_read(t, slot, keys))
    # The serving read (TorchScript, the other copy of the probe) walks the same table to the same rows.
    assert torch.equal(t.lookup_many([(slot, keys, None)])[0], got)


def displaced(t: EmbeddingTable, slot: str) -> int:
    """Live keys that do not sit in their home bucket (their probe walks past its cache line)."""
    tab = t._stores[slot].index._tab
    bits = tab.shape[0].bit_length() - 1 - 2  # four slots per bucket
    pos = np.flatnonzero(tab[:, 1] >= 0)
    u = tab[pos, 0].view(np.uint64)
    home = (((u >> np.uint64(32)) ^ u) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)
    return int((home.astype(np.int64) != pos // 4).sum())


def trained_table(n: int = 5000, dim: int = 8, **cfg) -> tuple[EmbeddingTable, np.ndarray]:
    t = EmbeddingTable([SlotConfig("a", dim, init_std=1.0, default_value=0.5, **cfg)])
    keys = np.unique(np.concatenate([
        np.random.default_rng(0).integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True), EXTREMES[:5]]))
    t.lookup("a", torch.from_numpy(keys), train=True)
    return t, keys


def test_hits_and_misses_read_their_rows_and_the_default():
    t, keys = trained_table()
    fresh = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, 500, dtype=np.int64)
    batch = np.concatenate([keys[::2], fresh, keys[1::2]])
    assert_reads_match(t, "a", batch)
    got = t.lookup("a", torch.from_numpy(fresh))
    assert (got == 0.5).all()  # never seen: the default vector


def test_keys_displaced_from_their_home_slot_are_found():
    t, keys = trained_table(20_000)
    assert displaced(t, "a") > 200  # the walk past the home line is exercised, not only home hits
    assert_reads_match(t, "a", keys)


def test_duplicates_within_a_batch_read_the_same_row():
    t, keys = trained_table()
    batch = np.concatenate([keys[:50], keys[:50], np.full(20, keys[7]), np.full(5, 12345678901)])
    assert_reads_match(t, "a", batch)
    got = t.lookup("a", torch.from_numpy(batch))
    assert torch.equal(got[:50], got[50:100])


def test_an_empty_batch_reads_no_rows():
    t, _ = trained_table(100)
    got = t.lookup("a", torch.zeros(0, dtype=torch.int64))
    assert got.shape == (0, 8) and got.dtype == torch.float32
    empty = EmbeddingTable([SlotConfig("b", 4)])
    assert empty.lookup("b", torch.zeros(0, dtype=torch.int64)).shape == (0, 4)


def test_int64_extremes_are_ordinary_keys():
    t = EmbeddingTable([SlotConfig("a", 4, init_std=1.0)])
    assert_reads_match(t, "a", EXTREMES)  # an empty table: all default
    t.lookup("a", torch.from_numpy(EXTREMES[:4]), train=True)
    assert_reads_match(t, "a", np.concatenate([EXTREMES, EXTREMES[::-1]]))
    got = t.lookup("a", torch.from_numpy(EXTREMES))
    assert torch.unique(got[:4], dim=0).shape[0] == 4 and (got[4:] == 0).all()


def test_expired_rows_read_the_default_and_reused_rows_their_new_id():
    t = EmbeddingTable([SlotConfig("a", 4, init_std=1.0, ttl_s=10.0, default_value=-2.0)])
    old = np.arange(-300, 300, dtype=np.int64) * 7919
    t.lookup("a", torch.from_numpy(old), train=True, now=0.0)
    t.apply_gradients("a", torch.from_numpy(old[:100]), torch.ones(100, 4), now=8.0)
    assert t.expire(now=15.0) == 500
    assert_reads_match(t, "a", old)
    assert (t.lookup("a", torch.from_numpy(old[100:])) == -2.0).all()
    new = np.arange(1, 501, dtype=np.int64) << 40
    t.lookup("a", torch.from_numpy(new), train=True, now=16.0)  # takes the freed rows
    assert t.stats()["a"]["free_rows"] == 0
    assert_reads_match(t, "a", np.concatenate([old, new]))


def test_ids_read_the_default_until_admitted():
    t = EmbeddingTable([SlotConfig("a", 4, init_std=1.0, admit_threshold=2, default_value=9.0, sketch_width=1 << 16)])
    batch = np.array([5, 6, 7, 5], dtype=np.int64)
    t.lookup("a", torch.from_numpy(batch[:2]), train=True)
    assert (t.lookup("a", torch.from_numpy(batch)) == 9.0).all()
    t.lookup("a", torch.from_numpy(batch[:1]), train=True)  # 5 seen twice: admitted
    assert_reads_match(t, "a", batch)
    got = t.lookup("a", torch.from_numpy(batch))
    assert not (got[0] == 9.0).all() and (got[1:3] == 9.0).all() and torch.equal(got[0], got[3])


def test_a_batch_split_over_two_threads_reads_what_one_thread_reads():
    t, keys = trained_table(30_000)
    rng = np.random.default_rng(2)
    fresh = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    batch = np.concatenate([rng.choice(keys, _SPLIT_MIN + 1001), fresh])
    rng.shuffle(batch)
    whole = t.lookup("a", torch.from_numpy(batch))
    parts = torch.cat([t.lookup("a", torch.from_numpy(batch[i:i + 4096])) for i in range(0, batch.size, 4096)])
    assert torch.equal(whole, parts)
    assert torch.equal(whole, reference_read(t, "a", batch))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["train", "expire", "grad"]), st.lists(INT64, max_size=80)), max_size=12),
       st.lists(INT64, max_size=40))
def test_any_history_of_admissions_updates_and_expiry_reads_like_the_reference(ops, probes):
    t = EmbeddingTable([SlotConfig("a", 4, init_std=1.0, ttl_s=5.0, default_value=0.25)])
    now, seen = 0.0, []
    for op, keys in ops:
        k = np.array(keys, dtype=np.int64)
        now += 1.0
        if op == "train":
            t.lookup("a", torch.from_numpy(k), train=True, now=now)
        elif op == "grad":
            t.apply_gradients("a", torch.from_numpy(k), torch.ones(k.size, 4), now=now)
        else:
            t.expire(now=now + 5.0)
        seen.extend(keys)
        assert_reads_match(t, "a", np.array(seen + probes, dtype=np.int64))
