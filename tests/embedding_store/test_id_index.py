"""The id index never maps two distinct keys to one row, whatever the keys look like."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_store.batched_read import find_rows
from embedding_store.id_index import IdIndex, take_rows

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _check_against_dict(index: IdIndex, model: dict[int, int], probe: np.ndarray) -> None:
    rows = index.find(probe)
    expect = np.array([model.get(int(k), -1) for k in probe], dtype=np.int64)
    np.testing.assert_array_equal(rows, expect)
    # The TorchScript probe (the serving read path) walks the same table to the same rows.
    np.testing.assert_array_equal(find_rows(index.table_view(), torch.from_numpy(probe)).numpy(), expect)
    assert len(index) == len(model)


@settings(max_examples=60, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=400, unique=True), st.lists(INT64, max_size=50))
def test_find_returns_exactly_the_inserted_rows(keys, others):
    index = IdIndex(capacity=16)
    k = np.array(keys, dtype=np.int64)
    index.insert(k, np.arange(k.size))
    model = {key: i for i, key in enumerate(keys)}
    _check_against_dict(index, model, np.concatenate([k, np.array(others, dtype=np.int64)]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**20), st.integers(50, 2000))
def test_keys_agreeing_in_low_bits_stay_distinct(shift_bits, low, n):
    # Adversarial: every key has the same low 44+ bits, they differ only high up (or in sign).
    high = np.arange(n, dtype=np.int64) - n // 2
    keys = (high << np.int64(63 - shift_bits)) | np.int64(low)
    keys = np.unique(keys)
    index = IdIndex(capacity=16)
    index.insert(keys, np.arange(keys.size))
    np.testing.assert_array_equal(index.find(keys), np.arange(keys.size))
    assert np.unique(index.find(keys)).size == keys.size
    np.testing.assert_array_equal(find_rows(index.table_view(), torch.from_numpy(keys)).numpy(), np.arange(keys.size))


def test_high_load_factor_and_extreme_keys():
    index = IdIndex(capacity=1 << 12, max_load=0.9)
    rng = np.random.default_rng(0)
    keys = np.unique(np.concatenate([
        rng.integers(-(2**63), 2**63 - 1, size=3600, dtype=np.int64),
        np.array([0, -1, 1, 2**63 - 1, -(2**63)], dtype=np.int64),
        np.arange(0, 64 << 40, 1 << 40, dtype=np.int64),  # zero low bits
    ]))
    index.insert(keys, np.arange(keys.size))
    assert len(index) / index.capacity > 0.85 or index.capacity > 4096
    np.testing.assert_array_equal(index.find(keys), np.arange(keys.size))
    assert (index.find(keys + 1)[~np.isin(keys + 1, keys)] == -1).all()
    for probe in (keys, keys + 1):
        np.testing.assert_array_equal(find_rows(index.table_view(), torch.from_numpy(probe), 0).numpy(),
                                      index.find(probe, missing=0))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ins", "del"]), st.lists(INT64, max_size=60)), max_size=25))
def test_interleaved_inserts_and_removes_match_a_dict(ops):
    index = IdIndex(capacity=16)
    model: dict[int, int] = {}
    next_row = 0
    seen: list[int] = []
    for op, keys in ops:
        uk = np.unique(np.array(keys, dtype=np.int64))
        if op == "ins":
            absent = uk[index.find(uk) < 0]
            rows = np.arange(next_row, next_row + absent.size)
            next_row += absent.size
            index.insert(absent, rows)
            model.update({int(k): int(r) for k, r in zip(absent, rows)})
        else:
            removed = index.remove(uk)
            for k, r in zip(uk, removed):
                assert model.pop(int(k), -1) == r
        seen.extend(keys)
    _check_against_dict(index, model, np.array(seen + [7], dtype=np.int64))


GOLDEN = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def _bucket(key: int, bits: int) -> int:
    """Home bucket of ``key`` among ``2**bits`` buckets (four slots, one cache line, each)."""
    u = key & M64
    return ((((u >> 32) ^ u) * GOLDEN) & M64) >> (64 - bits)


def _keys_with_home(bucket: int, bits: int, n: int, start: int = 1) -> np.ndarray:
    """``n`` distinct keys whose home is ``bucket`` of ``2**bits``: the home hash run backwards
    from ``bucket << (64 - bits) | t``."""
    inv = pow(GOLDEN, -1, 1 << 64)
    out = []
    for t in range(start, start + n):
        x = (((bucket << (64 - bits)) | (t * 7919)) * inv) & M64
        key = x ^ (x >> 32)
        out.append(key - (1 << 64) if key >= 1 << 63 else key)
    keys = np.array(out, dtype=np.int64)
    assert all(_bucket(int(k), bits) == bucket for k in keys)
    return keys


def test_a_long_probe_chain_that_wraps_past_the_table_end_finds_every_key():
    # 40 keys share home bucket 15 of 16 (slots 60..63): they fill it and wrap to slots 0..35,
    # far past the home line and past one window of the torch probe.
    index = IdIndex(capacity=64)
    keys = _keys_with_home(15, 4, 40)
    index.insert(keys, np.arange(40))
    assert index.capacity == 64
    np.testing.assert_array_equal(index.find(keys), np.arange(40))
    np.testing.assert_array_equal(find_rows(index.table_view(), torch.from_numpy(keys)).numpy(), np.arange(40))
    others = _keys_with_home(15, 4, 45)[40:]  # same home, absent: walk the whole chain, then miss
    assert (index.find(others) == -1).all()
    # Remove from the middle of the chain: the keys behind the tombstones stay reachable.
    assert index.remove(keys[10:20]).tolist() == list(range(10, 20))
    expect = np.where((np.arange(40) >= 10) & (np.arange(40) < 20), -1, np.arange(40))
    np.testing.assert_array_equal(index.find(keys), expect)
    np.testing.assert_array_equal(find_rows(index.table_view(), torch.from_numpy(keys)).numpy(), expect)
    # Re-inserted keys reuse the tombstones, and are found again.
    index.insert(keys[10:20], np.arange(100, 110))
    np.testing.assert_array_equal(index.find(keys)[10:20], np.arange(100, 110))


def test_free_slots_hold_keys_whose_home_is_the_next_bucket():
    index = IdIndex(capacity=256)
    keys = np.arange(100, dtype=np.int64) * 1_000_003
    index.insert(keys, np.arange(100))
    index.remove(keys[::3])
    tab = index._tab
    free = np.flatnonzero(tab[:, 1] < 0)
    assert free.size == 256 - 66
    assert all(_bucket(int(tab[p, 0]), 6) == (p // 4 + 1) % 64 for p in free)
    assert (index.find(tab[free, 0]) == -1).all()  # a guard key is never found


def test_every_bucket_is_one_cache_line():
    index = IdIndex(capacity=100)
    assert index.capacity == 128 and index._tab.ctypes.data % 64 == 0
    index.insert(np.arange(1000, dtype=np.int64), np.arange(1000))  # rebuilt larger
    assert index.capacity == 2048 and index._tab.ctypes.data % 64 == 0
    assert IdIndex(capacity=1).capacity == 64  # the smallest table: 16 buckets


def _bucket_lookups(index: IdIndex, keys: np.ndarray, missing: int = -1) -> list[np.ndarray]:
    """Every probe's answer for ``keys``: find, gather (rows as values), torch."""
    values = np.arange(64, dtype=np.float32).reshape(64, 1).repeat(2, axis=1)
    out = np.empty((keys.size, 2), dtype=np.float32)
    index.gather(keys, values, out, missing=max(missing, 0))
    return [index.find(keys, missing=missing), out[:, 0].astype(np.int64),
            find_rows(index.table_view(), torch.from_numpy(keys), missing).numpy()]


def test_a_key_equal_to_a_row_in_its_bucket_is_not_found_there():
    # The line compare sees rows as well as keys; only key lanes may answer.
    absent = 5
    present = _keys_with_home(_bucket(absent, 4), 4, 1)
    index = IdIndex(capacity=64)
    index.insert(present, np.array([absent]))  # its row is the absent key's value
    for got in _bucket_lookups(index, np.array([absent, present[0]], dtype=np.int64), missing=0):
        assert got.tolist() == [0, absent]


def test_a_key_equal_to_the_empty_marker_does_not_end_a_probe():
    # Key -1 equals EMPTY's row value; in a key lane it must not read as an empty slot, or the
    # fifth key of its full home bucket (placed in the next one) would be reported absent.
    b = _bucket(-1, 4)
    keys = np.concatenate([[-1], _keys_with_home(b, 4, 4)])
    index = IdIndex(capacity=64)
    index.insert(keys, np.arange(10, 15))
    for got in _bucket_lookups(index, keys):
        assert got.tolist() == list(range(10, 15))


def test_a_miss_walks_past_a_full_bucket_and_stops_at_an_empty_slot():
    index = IdIndex(capacity=64)
    full = _keys_with_home(7, 4, 4)  # bucket 7 full, nothing spilled
    index.insert(full, np.arange(1, 5))
    spilled = _keys_with_home(8, 4, 6)  # bucket 8 full and two keys in bucket 9
    index.insert(spilled, np.arange(5, 11))
    absent = np.concatenate([_keys_with_home(7, 4, 2, start=50), _keys_with_home(8, 4, 2, start=50)])
    probe = np.concatenate([full, spilled, absent])
    for got in _bucket_lookups(index, probe, missing=0):
        assert got.tolist() == list(range(1, 11)) + [0] * 4


def test_a_key_removed_twice_in_one_batch_hands_its_row_back_once():
    index = IdIndex(capacity=16)
    index.insert(np.array([5, 6], dtype=np.int64), np.array([50, 60]))
    assert index.remove(np.array([5, 5, 7, 6, 5], dtype=np.int64)).tolist() == [50, -1, -1, 60, -1]
    assert len(index) == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(INT64, max_size=300, unique=True), st.lists(INT64, max_size=60), st.integers(0, 2))
def test_gather_copies_the_rows_find_returns(keys, others, missing):
    index = IdIndex(capacity=16)
    k = np.array(keys, dtype=np.int64)
    index.insert(k, np.arange(k.size) + 3)  # rows 0..2 are never named: the "missing" rows
    values = np.random.default_rng(0).standard_normal((k.size + 3, 5)).astype(np.float32)
    probe = np.concatenate([k, np.array(others, dtype=np.int64), k[::-1]])
    out = np.full((probe.size, 5), np.nan, dtype=np.float32)
    index.gather(probe, values, out, missing=missing)
    rows = index.find(probe, missing=missing)
    np.testing.assert_array_equal(out, values.take(rows, axis=0))
    np.testing.assert_array_equal(take_rows(values, rows), out)  # the copy half alone


def test_gather_refuses_a_wrong_output_or_missing_row():
    index = IdIndex()
    values = np.zeros((4, 3), dtype=np.float32)
    keys = np.arange(2, dtype=np.int64)
    with pytest.raises(ValueError, match="out must be"):
        index.gather(keys, values, np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="out must be"):
        index.gather(keys, values, np.zeros((2, 3), dtype=np.float64))
    with pytest.raises(ValueError, match="missing row"):
        index.gather(keys, values, np.zeros((2, 3), dtype=np.float32), missing=4)
    with pytest.raises(ValueError, match="C-contiguous"):
        index.gather(keys, values, np.zeros((3, 2), dtype=np.float32).T)
    with pytest.raises(ValueError, match="out must be"):
        take_rows(values, keys, np.zeros((3, 3), dtype=np.float32))
