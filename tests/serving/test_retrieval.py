"""Exact top-k retrieval stays equal to brute force as the table changes under it."""

import numpy as np
import torch

from embedding_store import EmbeddingTable, SlotConfig, SlotDelta, TableDelta
from serving.retrieval import ItemIndex


def _table(ids, dim=8, seed=0):
    table = EmbeddingTable([SlotConfig(name="item_id", dim=dim)])
    vals = torch.randn(len(ids), dim, generator=torch.Generator().manual_seed(seed))
    table.import_delta(TableDelta(0, 1, {"item_id": SlotDelta(np.asarray(ids, np.int64), vals)}))
    return table


def _brute(table, query, k):
    ids = np.sort(table.ids("item_id"))
    dots = table.lookup("item_id", torch.from_numpy(ids)) @ query
    order = np.lexsort((ids, -dots.numpy()))[:k]
    return ids[order]


def test_topk_equals_brute_force_and_follows_upserts_inserts_and_deletions():
    table = _table(np.arange(0, 2000, 2))
    index = ItemIndex("item_id")
    q = torch.randn(8, generator=torch.Generator().manual_seed(1))
    assert index.sync(table) == 1000
    np.testing.assert_array_equal(index.topk(q, 25)[0], _brute(table, q, 25))

    # The best item gets a much worse vector, new items arrive, some items expire.
    best = int(index.topk(q, 1)[0][0])
    gen = torch.Generator().manual_seed(2)
    table.import_delta(TableDelta(1, 5, {"item_id": SlotDelta(
        ids=np.array([best, 5001, 5003], np.int64),
        values=torch.cat([-q.reshape(1, -1) * 10, torch.randn(2, 8, generator=gen) * 5]),
        deleted_ids=np.array([10, 12, 14], np.int64))}))
    assert index.sync(table) == 6  # only the changed rows were copied
    got = index.topk(q, 25)[0]
    np.testing.assert_array_equal(got, _brute(table, q, 25))
    assert best not in got and len(index) == 1000 + 2 - 3
    assert index.sync(table) == 0  # nothing changed, nothing copied


def test_a_replaced_table_rebuilds_the_index_and_exclusions_work():
    index = ItemIndex("item_id")
    index.sync(_table(np.arange(100)))
    new = _table(np.arange(1000, 1050), seed=3)
    index.sync(new)
    assert len(index) == 50 and index.ids.min() == 1000
    q = torch.ones(8)
    top = index.topk(q, 5)[0]
    again = index.topk(q, 5, exclude=top[:2])[0]
    assert not set(top[:2]) & set(again)
    assert index.topk(q, 500)[0].size == 50
