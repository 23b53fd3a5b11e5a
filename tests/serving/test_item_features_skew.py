"""No train/serve skew for item-side features, end to end over the real broker and gRPC.

A real-shaped log (string, multi-valued, numeric and empty cells; item-side ``genres`` and
``year``) is encoded, a Learner trains on its examples and publishes its parameters on hw.params,
and the log's requests publish their items' features on hw.items, as the replay does. Serving
follows both. Score on the full examples, and Recommend with only the candidate ids (plus the
user-side context and the user-side part of the dense vector), must return the trainer's own
prediction for the same parameter version.
"""

import grpc
import numpy as np
import pytest
from kafka import KafkaProducer
from serving_helpers import _wait

from serving.config import ServeConfig
from serving.item_catalog import ItemCatalog, ItemCatalogConfig, missing_tail
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer
from streams.events import ExampleBatch, Ragged
from streams.item_features import ItemFeaturePublisher
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from streams.log_reader import encode_log, log_examples, log_requests
from streams.log_infer import infer_schema
from tests.streams.log_fixtures import write_real_shaped_csv
from training.config import TrainerConfig
from training.learner import Learner
from training.model import score as model_score
from training.model import tower_to_safetensors
from training.sync import DeltaPublisher, SyncConfig

TOL = 1e-5


def _bag(batch: ExampleBatch, slot: str, row: int) -> list[int]:
    rag = batch.sparse[slot]
    off = rag.offsets
    return rag.values[off[row]:off[row + 1]].tolist()


@pytest.fixture(params=[((), ()), (("user_id*genres",), ()), (("user_id*genres",), ("genres=mean",))],
                ids=["plain", "crossed", "mean-genres"])
def world(kafka_topics, tmp_path, request):
    """Trainer, hw.params, hw.items and a serving replica with its item catalog, all real.
    ``mean-genres``: the multi-valued slot (and its cross) pools by mean, every other by sum, so
    serving must pool slot by slot as the trainer does."""
    crosses, slot_pooling = request.param
    path = write_real_shaped_csv(tmp_path / "log.csv", rows=400, seed=1)
    schema, _ = infer_schema(path)
    assert schema.item_slots() == ("genres",) and schema.item_dense_width() == 2  # what this test is about
    log = encode_log(path, schema)
    batches = list(log_examples(log, "skew", batch_rows=100))
    topics = topic_names(kafka_topics.topic_prefix)

    learner = Learner.for_batch(TrainerConfig(embedding_dim=8, hidden=(32, 16), dense_precision="fp32",
                                                crosses=crosses, slot_pooling=slot_pooling), batches[0])
    params_producer = KafkaProducer(bootstrap_servers=kafka_topics.bootstrap_servers, acks="all", linger_ms=0)
    publisher = DeltaPublisher(params_producer, topics.params, learner.table,
                               lambda: tower_to_safetensors(learner.tower), SyncConfig())
    for b in batches[:2]:
        learner.train(b)
    publisher.publish_snapshot(learner.watermark_ms)
    for b in batches[2:]:  # then live deltas on top of the snapshot, as the online trainer sends them
        learner.train(b)
    publisher.publish_sparse(learner.watermark_ms)
    publisher.publish_dense(learner.watermark_ms)
    params_producer.close()

    items_producer = BatchProducer(kafka_topics)
    items = ItemFeaturePublisher(items_producer, topics.items, schema.item_slots(), schema.item_dense_width())
    for imp, _ in log_requests(log, "skew"):
        items.observe(imp)
    items_producer.flush()
    items_producer.close()

    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers, topics.params)
    catalog = ItemCatalog(ItemCatalogConfig(), kafka_topics.bootstrap_servers, topics.items).start()
    server = RecommendServer(ServeConfig(port=0, precision="float32"), ps, items=catalog).start()
    ps.start()
    channel = grpc.insecure_channel(server.address)
    try:
        assert _wait(lambda: ps.ready and ps.state.version == publisher.published_version, 30)
        assert _wait(lambda: all((a == b).all() for a, b in zip(
            ps.state.tower.state_dict().values(), learner.tower.state_dict().values())), 30)
        assert catalog.wait_caught_up(30) and len(catalog) == len(np.unique(log.item_id))
        assert items.sent < len(log)  # only changes were sent
        yield learner, schema, ExampleBatch.concat(batches), pb2_grpc.RecommenderStub(channel)
    finally:
        channel.close()
        server.stop(0)
        ps.stop()
        catalog.stop()


def test_score_on_full_examples_returns_the_trainers_prediction(world):
    learner, _, full, stub = world
    want = model_score(learner.table, learner.tower, full.sparse, full.dense, len(full)).numpy()
    mc = learner.model_cfg
    slots = [s for s in mc.slots if s not in mc.crosses]  # crossed slots are derived by serving
    examples = [pb2.Example(sparse=[pb2.SparseFeature(slot=s, ids=_bag(full, s, r)) for s in slots],
                            dense=full.dense[r].tolist()) for r in range(len(full))]
    served = np.array(stub.Score(pb2.ScoreRequest(examples=examples)).probabilities)
    np.testing.assert_allclose(served, want, rtol=0, atol=TOL)


def test_recommend_with_only_candidate_ids_returns_the_trainers_prediction(world):
    learner, schema, full, stub = world
    want = model_score(learner.table, learner.tower, full.sparse, full.dense, len(full)).numpy()
    user_width = full.dense.shape[1] - schema.item_dense_width()
    # The catalog holds each item's features as of its last row: the rows to compare on.
    last_row = {int(item): r for r, item in enumerate(full.item_id)}
    # One call per request, for its rows that share one user-side dense part (a request has one).
    requests: dict[tuple, list[int]] = {}
    for r in sorted(last_row.values()):
        key = (int(full.user_id[r]), int(full.event_time_ms[r]), full.dense[r, :user_width].tobytes())
        requests.setdefault(key, []).append(r)
    compared = 0
    for (user, _, _), rows in requests.items():
        first = rows[0]
        resp = stub.Recommend(pb2.RecommendRequest(
            user_id=user, candidate_item_ids=full.item_id[rows].tolist(),
            context=[pb2.SparseFeature(slot=s, ids=_bag(full, s, first)) for s in schema.user_slots()],
            dense=full.dense[first, :user_width].tolist()))
        got = {it.item_id: it.score for it in resp.items}
        np.testing.assert_allclose([got[int(full.item_id[r])] for r in rows], want[rows], rtol=0, atol=TOL)
        compared += len(rows)
    assert compared == len(last_row) > 20
    # Some of these items have an empty year (missing indicator set) and the model uses the tail.
    assert (full.dense[list(last_row.values()), -1] == 1.0).any()


def test_one_recommend_call_ranks_every_item_as_the_trainer_scores_it_for_that_user(world):
    learner, schema, full, stub = world
    user_width = full.dense.shape[1] - schema.item_dense_width()
    last_row = {int(item): r for r, item in enumerate(full.item_id)}
    rows = full.take(np.array(sorted(last_row.values())))  # each item as the catalog holds it
    n, user = len(rows), 5  # ... shown to the user of row 5, in row 5's request context
    one = np.ones(n, np.int32)
    rows.sparse["user_id"] = Ragged(np.full(n, full.user_id[user]), one)
    for s in schema.user_slots():
        bag = _bag(full, s, user)
        rows.sparse[s] = Ragged(np.tile(np.array(bag, np.int64), n), np.full(n, len(bag), np.int32))
    rows.dense[:, :user_width] = full.dense[user, :user_width]
    want = model_score(learner.table, learner.tower, rows.sparse, rows.dense, n).numpy()
    resp = stub.Recommend(pb2.RecommendRequest(
        user_id=int(full.user_id[user]), candidate_item_ids=rows.item_id.tolist(),
        context=[pb2.SparseFeature(slot=s, ids=_bag(full, s, user)) for s in schema.user_slots()],
        dense=full.dense[user, :user_width].tolist()))
    got = {it.item_id: it.score for it in resp.items}
    np.testing.assert_allclose([got[int(i)] for i in rows.item_id], want, rtol=0, atol=TOL)
    assert [it.item_id for it in resp.items] == rows.item_id[np.lexsort((rows.item_id, -want))].tolist()


def test_recommend_for_an_item_the_catalog_does_not_hold_reads_it_as_missing(world):
    learner, schema, full, stub = world
    user_width = full.dense.shape[1] - schema.item_dense_width()
    unknown = int(full.item_id.max()) + 1000
    row = 0
    resp = stub.Recommend(pb2.RecommendRequest(
        user_id=int(full.user_id[row]), candidate_item_ids=[unknown],
        context=[pb2.SparseFeature(slot=s, ids=_bag(full, s, row)) for s in schema.user_slots()],
        dense=full.dense[row, :user_width].tolist()))
    one = np.ones(1, np.int32)
    sparse = {s: Ragged(np.array(_bag(full, s, row), np.int64), np.array([len(_bag(full, s, row))], np.int32))
              for s in schema.user_slots()}
    sparse |= {"user_id": Ragged(full.user_id[:1], one), "item_id": Ragged(np.array([unknown]), one),
               "genres": Ragged.empty(1)}
    dense = np.concatenate([full.dense[row, :user_width], missing_tail(schema.item_dense_width())])[None]
    want = model_score(learner.table, learner.tower, sparse, dense, 1).numpy()
    np.testing.assert_allclose([resp.items[0].score], want, rtol=0, atol=TOL)


def test_a_dense_vector_of_neither_width_is_refused_naming_both(world):
    _, _, full, stub = world
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], dense=[0.0]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 user-side values" in err.value.details() and "all 4" in err.value.details()
