"""The serving item catalog and scoring with it: each candidate gets its item-side features."""

import numpy as np
import pytest
import torch
from serving_helpers import _wait

from embedding_store import SlotDelta, TableDelta
from serving.calibration import Calibrator
from serving.item_catalog import ItemCatalog, ItemCatalogConfig, ItemStore, missing_tail
from serving.scoring import RankJob, score_jobs
from serving.testing import random_model
from streams.events import Ragged
from streams.item_features import ItemFeatures
from training.model import score as model_score

SLOTS = ("user_id", "item_id", "genres", "device")


def _catalog(features, max_items=100):
    catalog = ItemCatalog(ItemCatalogConfig(max_items=max_items), "", "unused.items")  # not started
    catalog.apply(features)
    return catalog


def _model(dense_dim=4, seed=3):
    model = random_model(slots=SLOTS, items=50, users=20, dense_dim=dense_dim, hidden=(32,), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows = {s: SlotDelta(ids=np.arange(100, 120, dtype=np.int64), values=torch.randn(20, 16, generator=gen))
            for s in ("genres", "device")}
    model.table.import_delta(TableDelta(from_version=1, to_version=2, slots=rows))
    return model


def _features():
    return [ItemFeatures(1, {"genres": [100, 101]}, [0.5, 0.0], 10),
            ItemFeatures(2, {"genres": [102]}, [0.0, 1.0], 10),
            ItemFeatures(3, {"genres": []}, [-1.5, 0.0], 10)]


def _want(model, user, items, genres, device, dense):
    """The model definition's own score for explicit rows (what the trainer computes)."""
    n = len(items)

    def bags(lists):
        return Ragged(np.array([i for b in lists for i in b], np.int64), np.array([len(b) for b in lists], np.int32))
    sparse = {"user_id": bags([[user]] * n), "item_id": bags([[i] for i in items]), "genres": bags(genres),
              "device": bags([device] * n)}
    return model_score(model.table, model.tower, sparse, np.asarray(dense, np.float32), n).numpy()


# -- the store ---------------------------------------------------------------------------------
def test_store_keeps_the_newest_features_by_event_time_and_forgets_tombstoned_items():
    store = ItemStore()
    store.apply(_features())
    store.apply([ItemFeatures(1, {"genres": [105]}, [0.25, 0.0], 20), ItemFeatures(2, {"genres": [9]}, [9.0, 0.0], 5)])
    store.apply([ItemFeatures(1, {"genres": [106]}, [0.0, 0.0], 15)])  # older than what it holds
    store.apply([ItemFeatures.deleted(3, 11)])
    rows = store.rows(np.array([1, 2, 3, 1]), ["genres"], dense=True)
    ids, lengths = rows.sparse["genres"]
    assert ids.tolist() == [105, 102, 105] and lengths.tolist() == [1, 1, 0, 1]
    np.testing.assert_array_equal(rows.dense, [[0.25, 0], [0, 1], [0, 1], [0.25, 0]])
    assert rows.known.tolist() == [True, True, False, True] and len(store) == 2


def test_unknown_items_read_an_empty_bag_and_a_missing_dense_tail():
    store = ItemStore()
    store.apply([ItemFeatures(1, {"genres": [100]}, [0.5, 0.0, 2.0, 0.0], 1)])
    rows = store.rows(np.array([77, 1]), ["genres", "never_seen"], dense=True)
    assert rows.sparse["genres"][1].tolist() == [0, 1] and rows.sparse["never_seen"][1].tolist() == [0, 0]
    np.testing.assert_array_equal(rows.dense[0], missing_tail(4))
    assert missing_tail(4).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_a_slot_left_out_of_an_update_becomes_an_empty_bag():
    store = ItemStore()
    store.apply([ItemFeatures(1, {"genres": [100], "tags": [5, 6]}, [], 1)])
    store.apply([ItemFeatures(1, {"genres": [101]}, [], 2)])
    rows = store.rows(np.array([1]), ["genres", "tags"], dense=False)
    assert rows.sparse["genres"][0].tolist() == [101] and rows.sparse["tags"][1].tolist() == [0]
    assert rows.dense is None


def test_a_full_store_evicts_the_least_recently_used_items_and_counts_them():
    store = ItemStore(max_items=64)
    store.apply([ItemFeatures(i, {"g": [i]}, [float(i), 0.0], 1) for i in range(64)])
    store.rows(np.array([0]), ["g"], dense=False)  # item 0 was read: recently used
    store.apply([ItemFeatures(1000, {"g": [1]}, [1.0, 0.0], 2)])
    assert len(store) <= 64 and store.evicted >= 1
    known = store.rows(np.array([0, 1, 1000]), ["g"], dense=False).known
    assert known.tolist() == [True, False, True]  # item 1 was the least recently used


def test_rewritten_bags_are_compacted_and_stay_correct():
    store = ItemStore(max_items=10)
    rng = np.random.default_rng(0)
    want = {}
    for t in range(2000):
        item = int(rng.integers(0, 10))
        bag = rng.integers(0, 1000, int(rng.integers(0, 6))).tolist()
        store.apply([ItemFeatures(item, {"g": bag}, [], t)])
        want[item] = bag
    items = np.array(sorted(want))
    ids, lengths = store.rows(items, ["g"], dense=False).sparse["g"]
    assert ids.tolist() == [i for it in items for i in want[int(it)]]
    assert store._bags["g"].values.size < 4096  # garbage was dropped, not kept


def test_the_newest_dense_width_wins_after_a_schema_change():
    store = ItemStore()
    store.apply([ItemFeatures(1, {}, [0.5, 0.0], 1)])
    store.apply([ItemFeatures(2, {}, [1.0, 0.0, 2.0, 0.0], 2)])
    rows = store.rows(np.array([1, 2]), [], dense=True)
    assert store.dense_width == 4
    np.testing.assert_array_equal(rows.dense, [missing_tail(4), [1.0, 0.0, 2.0, 0.0]])


def test_a_bag_over_the_limit_is_refused():
    store = ItemStore(max_ids_per_bag=3)
    assert store.apply([ItemFeatures(1, {"g": [1, 2, 3, 4]}, [], 1)]) == 0 and len(store) == 0


# -- scoring with the catalog ------------------------------------------------------------------
@pytest.mark.parametrize("one_call", [True, False])
def test_candidates_get_their_catalog_features_as_the_trainer_saw_them(one_call):
    model = _model()
    if not one_call:  # a table without read_views: the stepwise path (remote tables, GPUs)
        model = type(model)(model.model_id, _NoViews(model.table), model.tower, model.version, model.watermark_ms)
    catalog = _catalog(_features())
    user_dense = np.array([0.3, 0.0], np.float32)
    jobs = [RankJob(user_id=4, items=np.array([1, 2, 3, 99]), context={"device": np.array([110])}, dense=user_dense),
            RankJob(user_id=5, items=np.array([2]), context={"device": np.array([111])})]
    got = score_jobs(model, jobs, Calibrator(), items=catalog)
    table_model = _model()
    want0 = _want(table_model, 4, [1, 2, 3, 99], [[100, 101], [102], [], []], [110],
                  [[0.3, 0, 0.5, 0], [0.3, 0, 0, 1], [0.3, 0, -1.5, 0], [0.3, 0, 0, 1]])
    want1 = _want(table_model, 5, [2], [[102]], [111], [[0, 0, 0, 1]])
    np.testing.assert_allclose(got[0], want0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], want1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_one_call_forward_with_catalog_features_equals_the_stepwise_path(bf16):
    model, catalog = _model(), _catalog(_features())
    stepwise = type(model)(model.model_id, _NoViews(model.table), model.tower, model.version, model.watermark_ms)
    jobs = [RankJob(user_id=4, items=np.array([1, 2, 3, 99]), context={"device": np.array([110])},
                    dense=np.array([0.3, 0.0], np.float32)),
            RankJob(user_id=5, items=np.array([2, 1]), context={"genres": np.array([101])})]
    cal = Calibrator(0.25)
    for a, b in zip(score_jobs(model, jobs, cal, bf16=bf16, items=catalog),
                    score_jobs(stepwise, jobs, cal, bf16=bf16, items=catalog)):
        assert np.array_equal(a, b)


def test_a_call_that_sends_an_item_side_slot_or_the_whole_dense_vector_keeps_its_own():
    model, catalog = _model(), _catalog(_features())
    whole = np.array([0.1, 0.0, 7.0, 0.0], np.float32)
    jobs = [RankJob(user_id=4, items=np.array([1, 2]), context={"genres": np.array([119]), "device": np.array([110])},
                    dense=whole),
            RankJob(user_id=4, items=np.array([1, 2]), context={"device": np.array([110])})]
    got = score_jobs(model, jobs, Calibrator(), items=catalog)
    np.testing.assert_allclose(got[0], _want(model, 4, [1, 2], [[119], [119]], [110], [whole, whole]), atol=1e-6)
    np.testing.assert_allclose(got[1], _want(model, 4, [1, 2], [[100, 101], [102]], [110],
                                             [[0, 0, 0.5, 0], [0, 0, 0, 1]]), atol=1e-6)
    alone = score_jobs(model, jobs[:1], Calibrator(), items=catalog)[0]
    # The same scores alone as batched with another call, to float rounding: the tower's GEMMs
    # are not bit-invariant to the batch size (a traced plain-FM tower differs in ~1 of 10 draws).
    np.testing.assert_allclose(alone, got[0], rtol=1e-6, atol=1e-7)


def test_a_catalog_holding_nothing_the_model_uses_scores_exactly_as_none():
    model = random_model(slots=("user_id", "item_id", "f00"), items=100, users=10, dense_dim=3, seed=5)
    catalog = _catalog([ItemFeatures(1, {"genres": [5]}, [0.5, 0.0, 1.0, 0.0], 1)])  # dense wider than 3
    jobs = [RankJob(user_id=1, items=np.arange(30), dense=np.ones(3, np.float32)),
            RankJob(user_id=2, items=np.arange(5))]
    for a, b in zip(score_jobs(model, jobs, Calibrator(), items=catalog), score_jobs(model, jobs, Calibrator())):
        assert np.array_equal(a, b)


class _NoViews:
    """The table without ``read_views``, as a remote table: score_jobs takes the stepwise path."""

    def __init__(self, table):
        self._table = table

    def lookup_many(self, queries, mode="sum"):
        return self._table.lookup_many(queries, mode=mode)


# -- following hw.items -------------------------------------------------------------------------
def test_the_catalog_follows_hw_items_from_the_beginning_and_skips_bad_messages(kafka_topics):
    from streams.item_features import encode_item_features, item_key
    from streams.kafka_io import topic_names
    from streams.kafka_producer import BatchProducer

    topic = topic_names(kafka_topics.topic_prefix).items
    producer = BatchProducer(kafka_topics)
    for f in _features():
        producer.send(topic, encode_item_features(f), key=item_key(f.item_id))
    producer.send(topic, b"\x00garbage", key=item_key(9))
    producer.flush()
    catalog = ItemCatalog(ItemCatalogConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers, topic).start()
    try:
        assert catalog.wait_caught_up(30) and len(catalog) == 3 and catalog.bad == 1
        producer.send(topic, encode_item_features(ItemFeatures(2, {"genres": [119]}, [3.0, 0.0], 20)), key=item_key(2))
        producer.send(topic, encode_item_features(ItemFeatures.deleted(3, 20)), key=item_key(3))
        producer.flush()
        assert _wait(lambda: len(catalog) == 2 and catalog.applied == 5, 30)
        rows = catalog.rows(np.array([2, 3]), ["genres"], dense=True)
        assert rows.known.tolist() == [True, False] and rows.sparse["genres"][0].tolist() == [119]
        assert catalog.slots == {"genres"} and catalog.dense_width == 2 and catalog.error is None
    finally:
        catalog.stop()
        producer.close()


def test_serve_follows_hw_items_unless_told_not_to_and_a_ps_shard_never_does(kafka_topics):
    from headwater.cli.serve import _catalog
    from serving.config import ServeConfig

    assert _catalog(ServeConfig(items=False), kafka_topics) is None
    assert _catalog(ServeConfig(role="ps"), kafka_topics) is None
    catalog = _catalog(ServeConfig(max_catalog_items=7), kafka_topics)
    try:
        assert catalog.topic == f"{kafka_topics.topic_prefix}.items" and catalog.store.max_items == 7
        assert catalog.wait_caught_up(30)  # the (empty) topic exists: caught up at once
    finally:
        catalog.stop()
