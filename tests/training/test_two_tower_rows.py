"""The two-tower model inside the trainer (training.two_tower.rows): which slots describe the item,
the rows it writes into the ranker's table, and a replica taking those rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig, SlotDelta, TableDelta
from paramsync import ITEM_VECTORS, USER_VECTORS, add_retrieval_slots
from streams.generator import GeneratorConfig, SyntheticStream
from training.two_tower.rows import TwoTowerRows, item_side_slots


def _batches(n: int, seed: int = 0):
    stream = SyntheticStream(GeneratorConfig(users=300, items=200, seed=seed))
    return [stream.examples(stream.block(64)) for _ in range(n)]


def test_a_slot_constant_within_each_item_is_item_side():
    batch = _batches(1)[0]
    assert item_side_slots(batch) == ("category",)  # segment is the user's: it varies per item


def test_rows_of_the_batchs_users_and_items_land_in_the_table_at_unit_norm():
    batches = _batches(30)
    table = EmbeddingTable([SlotConfig(name=s, dim=8) for s in ("user_id", "item_id")])
    now = [0.0]
    rows = TwoTowerRows(dim=16, refresh_s=10.0, clock=lambda: now[0])
    for b in batches[:-1]:
        rows.step(b, table)
    last = batches[-1]
    before = int(table.version)
    written = rows.step(last, table)
    assert table.slots[USER_VECTORS].dim == table.slots[ITEM_VECTORS].dim == 16
    delta = table.export_delta(before)  # what the publisher ships next
    assert set(np.unique(last.user_id)) == set(delta.slots[USER_VECTORS].ids)
    assert set(np.unique(last.item_id)) == set(delta.slots[ITEM_VECTORS].ids)
    assert written == len(np.unique(last.user_id)) + len(np.unique(last.item_id))
    norms = delta.slots[ITEM_VECTORS].values.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # The user row is the tower's query at the batch's end: the clicks learned so far included.
    u = int(last.user_id[0])
    want = rows.learner.user_vectors(np.array([u]), np.array([int(last.event_time_ms.max()) + 1]),
                                     {"segment": last.sparse["segment"].take(np.array([0]))})
    got = table.lookup(USER_VECTORS, torch.tensor([u]))
    assert torch.allclose(got, want, atol=1e-6)
    # A refresh writes every item seen so far, not only the batch's.
    now[0] = 11.0
    before = int(table.version)
    rows.step(batches[0], table)
    refreshed = table.export_delta(before).slots[ITEM_VECTORS].ids
    assert rows.refreshes == 1 and set(refreshed) == set(rows.learner.items_seen())
    assert len(refreshed) > len(np.unique(batches[0].item_id))


def test_a_replica_adds_a_retrieval_slot_it_meets_and_refuses_any_other_unknown_slot():
    table = EmbeddingTable([SlotConfig(name="item_id", dim=4)])
    delta = TableDelta(0, 1, {ITEM_VECTORS: SlotDelta(ids=np.array([5]), values=torch.ones(1, 32))})
    add_retrieval_slots(table, delta)
    table.import_delta(delta)
    assert table.slots[ITEM_VECTORS].dim == 32
    assert torch.equal(table.lookup(ITEM_VECTORS, torch.tensor([5])), torch.ones(1, 32))
    stray = TableDelta(1, 2, {"stray": SlotDelta(ids=np.array([1]), values=torch.ones(1, 4))})
    add_retrieval_slots(table, stray)
    with pytest.raises(KeyError, match="unknown slot"):
        table.import_delta(stray)


def test_the_towers_continue_from_their_saved_state_exactly(tmp_path):
    from training.checkpoint import CheckpointStore

    torch.set_num_threads(1)
    batches = _batches(40, seed=1)
    table = EmbeddingTable([SlotConfig(name=s, dim=8) for s in ("user_id", "item_id")])
    rows = TwoTowerRows(dim=16, refresh_s=1e9)
    for b in batches[:30]:
        rows.step(b, table)
    tensors, meta = rows.state()  # trains the gathered positives first
    assert rows.learner._pending_rows == 0
    # Through the trainer's checkpoint files (safetensors + its metadata), as a restart reads them.
    store = CheckpointStore(tmp_path)
    store.load_state(store.write(None, tensors, meta, {}, 0))
    saved, saved_meta = store.load_state(store.latest())
    restored = TwoTowerRows(dim=16, refresh_s=1e9)
    restored.load_state(saved, saved_meta)
    a, b = rows.learner, restored.learner
    assert b.cfg == a.cfg and b.stats == a.stats
    assert np.array_equal(b.items_seen(), a.items_seen())
    # The same batches after the restart: the same vectors (weights, Adam moments, histories,
    # item features, frequency counts and de-dup all came back).
    t_a, t_b = table, EmbeddingTable([SlotConfig(name=s, dim=8) for s in ("user_id", "item_id")])
    for batch in batches[30:]:
        rows.step(batch, t_a)
        restored.step(batch, t_b)
    users = np.unique(np.concatenate([x.user_id for x in batches]))
    at = np.full(len(users), 10**15)
    assert torch.allclose(a.user_vectors(users, at), b.user_vectors(users, at), atol=1e-6)
    assert torch.allclose(a.item_vectors(a.items_seen()), b.item_vectors(b.items_seen()), atol=1e-6)
    assert b.stats.steps == a.stats.steps > 0
    # A batch seen before the checkpoint is not learned again after it.
    before = b.stats.examples
    restored.step(batches[5], t_b)
    assert b.stats.examples == before


def test_a_checkpoint_without_towers_leaves_a_fresh_start():
    rows = TwoTowerRows(dim=16)
    rows.load_state({}, {"model_config": "{}"})
    assert rows.learner is None and rows.state() == ({}, {})
