"""A model learned with ``recent_items`` (the user's last positive items) is served with the same
bag: a Recommend call that does not send it gets the user's last N clicks from serving's live
history of ``hw.actions``, and scores exactly as the trainer scores that bag. All real: the
replay's clicks on the broker, hw.params, a replica, gRPC over loopback."""

import grpc
import numpy as np
from kafka import KafkaProducer
from serving_helpers import _wait

from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer
from serving.user_history import HistoryFollower, UserHistory
from streams.events import Ragged
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from streams.log_reader import encode_log, log_examples, log_requests
from streams.log_schema import LogSchema
from streams.replay import produce_requests
from training.config import TrainerConfig
from training.learner import Learner
from training.model import score as model_score
from training.model import tower_to_safetensors
from training.sync import DeltaPublisher, SyncConfig

N = 3


def test_recommend_fills_recent_items_from_the_live_history_as_training_made_them(kafka_topics, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "plays.csv"  # interactions only: user, item, time
    path.write_text("user_id,item_id,ts\n" + "".join(
        f"{rng.integers(0, 12)},{rng.integers(100, 160)},{1_700_000_000 + t}\n" for t in range(600)))
    schema = LogSchema(label_col="", negatives=2, recent_items=N)
    log = encode_log(path, schema)
    batches = list(log_examples(log, "plays", batch_rows=200))
    topics = topic_names(kafka_topics.topic_prefix)
    cfg = TrainerConfig(embedding_dim=8, hidden=(16,), dense_precision="fp32").for_log(schema)
    learner = Learner.for_batch(cfg, batches[0])
    assert "recent_items" in learner.model_cfg.slots
    for b in batches:
        learner.train(b)
    params = KafkaProducer(bootstrap_servers=kafka_topics.bootstrap_servers, acks="all", linger_ms=0)
    publisher = DeltaPublisher(params, topics.params, learner.table,
                               lambda: tower_to_safetensors(learner.tower), SyncConfig())
    publisher.publish_snapshot(learner.watermark_ms)
    params.close()
    producer = BatchProducer(kafka_topics)  # the replay: impressions and the log's clicks
    produce_requests(log_requests(log, "plays"), producer, topics)
    producer.flush()
    producer.close()

    history = UserHistory()
    follower = HistoryFollower(history, kafka_topics.bootstrap_servers, topics.actions, ttl_s=10 * 365 * 86400.0)
    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers, topics.params)
    server = RecommendServer(ServeConfig(port=0, precision="float32", recent_items=N, items=False), ps,
                             history=history).start()
    ps.start()
    follower.start()
    channel = grpc.insecure_channel(server.address)
    try:
        assert _wait(lambda: ps.ready and ps.state.version == publisher.published_version, 30)
        assert follower.wait_caught_up(30) and history.applied == int(log.label.sum())
        stub = pb2_grpc.RecommenderStub(channel)
        candidates = np.arange(100, 160, dtype=np.int64)
        for user in np.unique(log.user_id)[:6].tolist():
            mine = (log.user_id == user) & (log.label == 1)
            last = log.item_id[mine][-N:]  # the user's last N clicks: what serving's history holds
            sparse = {"user_id": Ragged(np.full(len(candidates), user), np.ones(len(candidates), np.int32)),
                      "item_id": Ragged(candidates, np.ones(len(candidates), np.int32)),
                      "recent_items": Ragged(np.tile(last, len(candidates)),
                                             np.full(len(candidates), len(last), np.int32))}
            want = model_score(learner.table, learner.tower, sparse, None, len(candidates)).numpy()
            resp = stub.Recommend(pb2.RecommendRequest(user_id=user, candidate_item_ids=candidates.tolist(),
                                                       top_k=len(candidates)))
            got = {it.item_id: it.score for it in resp.items}
            np.testing.assert_allclose([got[int(i)] for i in candidates], want, rtol=0, atol=1e-5)
            # A call that sends the bag itself is scored with it (here: no history at all).
            sent = stub.Recommend(pb2.RecommendRequest(
                user_id=user, candidate_item_ids=candidates.tolist(), top_k=len(candidates),
                context=[pb2.SparseFeature(slot="recent_items", ids=[])]))
            assert {it.item_id: it.score for it in sent.items} != got
    finally:
        channel.close()
        server.stop(0)
        ps.stop()
        follower.stop()
