"""Many serving replicas tail hw.params on their own and converge on the same model version,
while the trainer keeps publishing (real broker, real DeltaPublisher, gRPC over loopback)."""

import threading
import uuid

import grpc
import numpy as np
from ps_fleet_helpers import Fleet, RecommenderReplica, ShardedTrainer, sharded_topics
from serving_helpers import Trainer, _wait

from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer


def _publish_while(trainer, stop, rounds):
    rng = np.random.default_rng(0)
    for r in range(rounds):
        if stop.is_set():
            break
        trainer.train("item_id", rng.integers(0, 500, 50))
        trainer.pub.publish_sparse(watermark_ms=10_000 + r)


def _answers(stub):
    resp = stub.Recommend(pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(0, 500, 7))), timeout=10)
    return resp.model_version, [(i.item_id, i.score) for i in resp.items]


def test_two_replicas_tailing_one_topic_converge_on_the_same_version_and_scores(kafka_topics):
    trainer = Trainer(kafka_topics, seed=4)
    trainer.train("item_id", np.arange(100))
    trainer.pub.publish_snapshot(watermark_ms=5_000)
    replicas, stubs, channels = [], [], []
    stop = threading.Event()
    publisher = threading.Thread(target=_publish_while, args=(trainer, stop, 15))
    try:
        publisher.start()  # the second replica joins while deltas are flowing
        for _ in range(2):
            ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers, trainer.topic)
            server = RecommendServer(ServeConfig(port=0, precision="float32"), ps).start()
            ps.start()
            replicas.append((ps, server))
            channels.append(grpc.insecure_channel(server.address))
            stubs.append(pb2_grpc.RecommenderStub(channels[-1]))
        publisher.join(60)
        assert _wait(lambda: all(ps.state.version == trainer.table.version for ps, _ in replicas), 30)
        (v1, a1), (v2, a2) = _answers(stubs[0]), _answers(stubs[1])
        assert v1 == v2 == trainer.table.version
        assert a1 == a2  # identical parameters: identical scores, bit for bit
    finally:
        stop.set()
        publisher.join(30)
        for c in channels:
            c.close()
        for ps, server in replicas:
            server.stop(0)
            ps.stop()
        trainer.close()


def test_two_recommender_replicas_over_one_shard_fleet_converge(kafka_broker):
    kafka = sharded_topics(kafka_broker, f"psrep{uuid.uuid4().hex[:8]}", 2)
    trainer = ShardedTrainer(kafka, 2, seed=5)
    trainer.train("item_id", np.arange(100))
    trainer.train("user_id", np.arange(10))
    trainer.pub.publish_snapshot(watermark_ms=5_000)
    fleet = Fleet(kafka, trainer.topic, 2)
    recs = []
    try:
        _publish_while(trainer, threading.Event(), 5)
        recs = [RecommenderReplica(kafka, trainer.topic, fleet.addresses) for _ in range(2)]
        assert _wait(lambda: all(r.control.ready for r in recs)
                     and all(ps.state.version == trainer.table.version for ps, _ in fleet.shards), 30)
        (v1, a1), (v2, a2) = _answers(recs[0].stub), _answers(recs[1].stub)
        assert v1 == v2 == trainer.table.version and a1 == a2
    finally:
        for r in recs:
            r.close()
        fleet.close()
        trainer.close()
