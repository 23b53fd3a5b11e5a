"""The id index never maps two distinct keys to one row, whatever the keys look like."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_store.batched_read import find_rows
from embedding_store.id_index import IdIndex

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
