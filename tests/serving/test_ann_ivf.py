"""The ``ivf_sq8`` mode of the ANN item index (serving.ann_index over serving.ann_ivf, faiss): the
8-bit codes only choose candidates and the float32 rescoring makes them exact, updates are visible
at once, a catalog too small to train lists on is scanned until it grows, and the mode survives a
save and load (a graph saved under another mode is rebuilt, never misread)."""

import numpy as np
import pytest

from serving.ann_index import AnnConfig, AnnIndex
from serving.ann_ivf import auto_nlist
from serving.ann_persist import load_index, save_index

DIM = 16


def _items(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.arange(n, dtype=np.int64) * 5 + 3, rng.standard_normal((n, DIM)).astype(np.float32)


def _ivf(n=4000, **kw):
    index = AnnIndex(AnnConfig(dim=DIM, retrieval="ivf_sq8", **kw))
    index.install(*_items(n), graph=None)
    return index


@pytest.fixture(scope="module")
def queries():
    return np.random.default_rng(9).standard_normal((20, DIM)).astype(np.float32)


def test_rescoring_a_shortlist_that_covers_the_catalog_returns_the_exact_top_k(queries):
    index = _ivf(nprobe=1_000_000, rerank=8)  # every list scanned, a shortlist of 8k by 8-bit codes
    for q in queries:
        ids, scores = index.topk(q, 20)
        want_ids, want_scores = index.exact_topk(q[None], 20)
        np.testing.assert_array_equal(ids, want_ids[0])
        np.testing.assert_allclose(scores, want_scores[0], rtol=1e-5, atol=1e-5)  # float32, not codes


def test_lists_are_sized_by_the_catalog_and_a_query_scans_3_32nds_of_them_or_a_floor_of_items():
    assert auto_nlist(1_000_000) == 2048 and auto_nlist(200_000) == 1024 and auto_nlist(10) == 1
    index = _ivf(4000, ivf_min_scan=100)
    assert index._graph.nlist == auto_nlist(4000) == 4000 // 39  # noqa: SLF001 - 39 points per centroid
    assert index.nprobe() == 3 * 102 // 32
    assert _ivf(4000, ivf_min_scan=2000).nprobe() == 51  # lists holding 2,000 of 4,000 items
    assert _ivf(4000, nprobe=3).nprobe() == 3


def test_upserts_and_removals_are_visible_to_the_next_query(queries):
    index = _ivf(nprobe=8)
    q = queries[0]
    index.upsert([10**12], (q * 10)[None])  # far the best match of q
    assert index.topk(q, 5)[0][0] == 10**12
    old_best = index.topk(q, 5)[0][1]
    index.upsert([old_best], (-q)[None])  # replaced: now among the worst
    assert old_best not in index.topk(q, 50)[0]
    assert index.remove([10**12]) == 1
    assert 10**12 not in index.topk(q, 50)[0] and len(index) == 4000


def test_a_small_catalog_is_scanned_until_it_has_enough_items_to_train_lists(queries):
    index = AnnIndex(AnnConfig(dim=DIM, retrieval="ivf_sq8", ivf_min_items=1000))
    ids, vecs = _items(1500)
    index.upsert(ids[:500], vecs[:500])
    assert index.drift() is None  # too few to train on
    np.testing.assert_array_equal(index.topk(queries[0], 10)[0], index.exact_topk(queries[:1], 10)[0][0])
    index.upsert(ids[500:], vecs[500:])
    assert index.drift() == "untrained"
    index.rebuild("untrained", wait=True)
    assert index._graph is not None and len(index._graph) == 1500  # noqa: SLF001
    assert index.drift() is None
    more_ids, more_vecs = np.arange(10**9, 10**9 + 1600, dtype=np.int64), _items(1600, seed=1)[1]
    index.upsert(more_ids, more_vecs)
    assert index.drift() == "growth"  # the catalog doubled: lists for today's items


def test_the_mode_and_its_codes_survive_a_save_and_load(tmp_path, queries):
    index = _ivf(nprobe=4)
    path = str(tmp_path / "ann")
    meta = save_index(index, path)
    assert meta["retrieval"] == "ivf_sq8" and "graph.faiss" in meta["sha256"]
    loaded = load_index(path, AnnConfig(dim=DIM, retrieval="ivf_sq8", nprobe=4))
    assert loaded.origin == "loaded" and type(loaded._graph).__name__ == "IvfGraph"  # noqa: SLF001
    assert loaded._graph.index.code_size == 16  # noqa: SLF001 - 8 bits per dimension, as saved
    for q in queries[:5]:
        np.testing.assert_array_equal(loaded.topk(q, 10)[0], index.topk(q, 10)[0])


def test_a_graph_saved_under_another_mode_is_rebuilt_not_misread(tmp_path, queries):
    path = str(tmp_path / "ann")
    save_index(_ivf(), path)
    hnsw = load_index(path, AnnConfig(dim=DIM, retrieval="hnsw"))
    assert hnsw.origin == "rebuilt" and len(hnsw) == 4000
    save_index(hnsw, path)
    ivf = load_index(path, AnnConfig(dim=DIM, retrieval="ivf_sq8"))
    assert ivf.origin == "rebuilt" and type(ivf._graph).__name__ == "IvfGraph"  # noqa: SLF001


def test_a_background_rebuild_keeps_the_items_changed_meanwhile(queries):
    index = _ivf(nprobe=1_000_000, rerank=8)
    thread = index.rebuild("manual")
    new_ids, new_vecs = np.arange(10**10, 10**10 + 50, dtype=np.int64), _items(50, seed=3)[1]
    index.upsert(new_ids, new_vecs)
    index.remove(_items(10)[0])
    if thread is not None:
        thread.join()
    assert len(index._graph) == len(index) == 4040  # noqa: SLF001
    for q in queries[:5]:
        np.testing.assert_array_equal(index.topk(q, 20)[0], index.exact_topk(q[None], 20)[0][0])
