"""EmbeddingTable behaviour: rows per id, admission, slots, expiry with memory reuse, stats."""

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig


def ids(*xs):
    return torch.tensor(xs, dtype=torch.int64)


def test_each_distinct_id_gets_its_own_row_even_when_low_bits_agree():
    t = EmbeddingTable([SlotConfig("a", 8, init_std=1.0)])
    keys = (torch.arange(-500, 500, dtype=torch.int64) << 40) | 12345
    v = t.lookup("a", keys, train=True)
    assert t.stats()["a"]["live_rows"] == 1000
    assert torch.unique(v, dim=0).shape[0] == 1000  # distinct random vectors, no sharing
    torch.testing.assert_close(t.lookup("a", keys), v, rtol=0, atol=0)


def test_unknown_ids_read_the_default_and_create_nothing_without_train():
    t = EmbeddingTable([SlotConfig("a", 4, default_value=0.5)])
    out = t.lookup("a", ids(1, 2, 3))
    assert torch.equal(out, torch.full((3, 4), 0.5))
    assert t.stats()["a"]["live_rows"] == 0 and t.version == 0


def test_duplicate_ids_in_one_batch_create_one_row():
    t = EmbeddingTable([SlotConfig("a", 4)])
    out = t.lookup("a", ids(9, 9, 9, -9), train=True)
    assert t.stats()["a"]["live_rows"] == 2
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[3])


def test_slots_have_their_own_dims_and_rows():
    t = EmbeddingTable([SlotConfig("user", 8), SlotConfig("item", 3, optimizer="sgd")])
    assert t.lookup("user", ids(1), train=True).shape == (1, 8)
    assert t.lookup("item", ids(1), train=True).shape == (1, 3)
    assert t.stats()["user"]["raw_bytes_per_row"] == 8 * 4 * 2  # value + adagrad accumulator
    assert t.stats()["item"]["raw_bytes_per_row"] == 3 * 4


def test_admission_needs_k_sightings_and_uses_no_row_memory_before():
    t = EmbeddingTable([SlotConfig("a", 4, admit_threshold=3, default_value=-1.0, sketch_width=1 << 16)])
    for _ in range(2):
        out = t.lookup("a", ids(5, 6), train=True)
        assert torch.equal(out, torch.full((2, 4), -1.0))
        assert t.stats()["a"]["live_rows"] == 0
    assert t.apply_gradients("a", ids(5), torch.ones(1, 4)) == 0  # no row: gradient dropped
    out = t.lookup("a", ids(5, 7), train=True)
    assert t.stats()["a"]["live_rows"] == 1
    assert not torch.equal(out[0], torch.full((4,), -1.0)) and torch.equal(out[1], torch.full((4,), -1.0))
    s = t.stats()["a"]
    assert s["admitted"] == 1 and s["rejected"] == 2 + 2 + 1


def test_sightings_within_one_batch_count():
    t = EmbeddingTable([SlotConfig("a", 4, admit_threshold=2, sketch_width=1 << 16)])
    t.lookup("a", ids(5, 5, 6), train=True)
    assert t.ids("a").tolist() == [5]


def test_expiry_reclaims_stale_rows_and_reuses_their_memory():
    t = EmbeddingTable([SlotConfig("a", 4, ttl_s=10.0), SlotConfig("keep", 4)])
    t.lookup("a", torch.arange(100, dtype=torch.int64), train=True, now=0.0)
    t.lookup("keep", torch.arange(10, dtype=torch.int64), train=True, now=0.0)
    t.apply_gradients("a", torch.arange(10, dtype=torch.int64), torch.ones(10, 4), now=8.0)
    cap = t.stats()["a"]["capacity_rows"]
    assert t.expire(now=15.0) == 90
    s = t.stats()["a"]
    assert s["live_rows"] == 10 and s["expired"] == 90 and s["free_rows"] == 90
    assert t.stats()["keep"]["live_rows"] == 10
    assert torch.equal(t.lookup("a", ids(50)), torch.zeros(1, 4))  # gone: reads the default
    t.lookup("a", torch.arange(1000, 1090, dtype=torch.int64), train=True, now=16.0)
    s = t.stats()["a"]
    assert s["live_rows"] == 100 and s["free_rows"] == 0 and s["capacity_rows"] == cap  # rows reused
    assert t.expire(now=17.0) == 0


def test_background_expiry_runs_on_its_own():
    import time

    t = EmbeddingTable([SlotConfig("a", 4, ttl_s=0.05)])
    t.lookup("a", ids(1, 2), train=True)
    t.start_expiry(0.02)
    try:
        deadline = time.time() + 5
        while t.stats()["a"]["live_rows"] and time.time() < deadline:
            time.sleep(0.02)
    finally:
        t.stop_expiry()
    assert t.stats()["a"]["live_rows"] == 0


def test_bytes_are_exact_and_include_index_and_state():
    t = EmbeddingTable([SlotConfig("a", 16)])
    t.lookup("a", torch.arange(5000, dtype=torch.int64), train=True)
    st = t._stores["a"]
    s = t.stats()["a"]
    expect = (st.values.numel() + st.state["accum"].numel()) * 4 + st.index.nbytes + st.capacity * (8 + 1 + 8 + 8)
    assert s["bytes_used"] == expect + st.free.nbytes
    assert s["bytes_per_row"] == s["bytes_used"] / 5000


def test_version_bumps_on_every_mutation_batch_only():
    t = EmbeddingTable([SlotConfig("a", 4)])
    t.lookup("a", ids(1), train=True)
    v = t.version
    t.lookup("a", ids(1), train=True)
    t.lookup("a", ids(2))
    assert t.version == v
    t.apply_gradients("a", ids(1), torch.ones(1, 4))
    assert t.version == v + 1


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="dim"):
        SlotConfig("a", 0)
    with pytest.raises(ValueError, match="optimizer"):
        SlotConfig("a", 4, optimizer="lbfgs")
    t = EmbeddingTable([SlotConfig("a", 4)])
    with pytest.raises(KeyError, match="unknown slot"):
        t.lookup("b", ids(1))
    with pytest.raises(TypeError, match="int64"):
        t.lookup("a", torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="grads must be"):
        t.apply_gradients("a", ids(1, 2), torch.ones(1, 4))
    t.lookup("a", ids(1), train=True)
    before = t.lookup("a", ids(1)).clone()
    with pytest.raises(ValueError, match="NaN"):
        t.apply_gradients("a", ids(1), torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    assert torch.equal(t.lookup("a", ids(1)), before)
    with pytest.raises(ValueError, match="bags cover 3 ids"):
        t.lookup_bags("a", ids(1, 2), torch.tensor([3]))


def test_lookup_bags_pools_sum_and_mean_with_weights():
    t = EmbeddingTable([SlotConfig("a", 4, init_std=1.0)])
    x = ids(1, 2, 3, 4, 5)
    rows = t.lookup("a", x, train=True)
    lengths = torch.tensor([2, 0, 3])
    s = t.lookup_bags("a", x, lengths, mode="sum")
    torch.testing.assert_close(s, torch.stack([rows[:2].sum(0), torch.zeros(4), rows[2:].sum(0)]))
    m = t.lookup_bags("a", x, offsets=torch.tensor([0, 2, 2, 5]), mode="mean")
    torch.testing.assert_close(m, torch.stack([rows[:2].mean(0), torch.zeros(4), rows[2:].mean(0)]))
    w = torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0])
    ws = t.lookup_bags("a", x, lengths, per_sample_weights=w)
    torch.testing.assert_close(ws[2], 0.5 * rows[2] + rows[4])
    assert np.isclose(float(ws[0].sum()), float((rows[0] + 2 * rows[1]).sum()), atol=1e-6)


def test_large_read_batches_split_over_threads_return_the_same_vectors():
    t = EmbeddingTable([SlotConfig("a", 8, init_std=1.0, default_value=3.0)])
    keys = torch.randint(-(2**62), 2**62, (40_000,), generator=torch.Generator().manual_seed(0))
    t.lookup("a", keys[:30_000], train=True)
    got = t.lookup("a", keys)  # 40k ids: the two-thread path; the last 10k are unknown
    st = t._stores["a"]
    rows = torch.from_numpy(st.index.find(keys.numpy(), missing=0))
    assert torch.equal(got, st.values.index_select(0, rows))
    unknown = torch.from_numpy(~np.isin(keys[30_000:].numpy(), keys[:30_000].numpy()))
    assert unknown.sum() > 9_000
    assert (got[30_000:][unknown] == 3.0).all()


def test_lookup_many_reads_what_lookup_and_lookup_bags_read_bit_for_bit():
    t = EmbeddingTable([SlotConfig("item", 8, init_std=1.0), SlotConfig("user", 8, init_std=1.0, default_value=0.25)])
    rng = np.random.default_rng(3)
    known = rng.integers(-(2**62), 2**62, 3000, dtype=np.int64)
    t.lookup("item", torch.from_numpy(known), train=True)
    t.lookup("user", torch.from_numpy(known[:500]), train=True)
    items = np.concatenate([known[::3], rng.integers(-(2**62), 2**62, 100, dtype=np.int64)])  # and unknown ids
    users = np.concatenate([known[:40], [7, 8]]).astype(np.int64)
    lengths = np.array([0, 5, 1, 30, 0, 6], np.int64)  # empty bags too
    for mode in ("sum", "mean"):
        got = t.lookup_many([("item", items, None), ("user", users, lengths), ("item", items[:0], np.zeros(2, np.int64))],
                            mode=mode)
        want = [t.lookup("item", torch.from_numpy(items)),
                t.lookup_bags("user", torch.from_numpy(users), torch.from_numpy(lengths), mode=mode),
                torch.zeros(2, 8)]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match="cover the ids"):
        t.lookup_many([("user", users, np.array([1, 2], np.int64))])
    with pytest.raises(KeyError, match="unknown slot"):
        t.lookup_many([("nope", users, None)])


def test_lookup_many_sees_rows_written_after_the_index_grew():
    t = EmbeddingTable([SlotConfig("a", 4, init_std=1.0)])
    first = np.arange(10, dtype=np.int64)
    before = t.lookup_many([("a", first, None)])[0]
    t.lookup("a", torch.from_numpy(np.arange(20_000, dtype=np.int64)), train=True)  # rebuilds the index
    after = t.lookup_many([("a", first, None)])[0]
    assert not torch.equal(before, after)
    assert torch.equal(after, t.lookup("a", torch.from_numpy(first)))
