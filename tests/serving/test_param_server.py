"""The serving parameter server against the real broker: bootstrap, tail, serve, warm restart
(sharded fleets: test_ps_fleet.py)."""

import time

import grpc
import numpy as np
import pytest
import torch
from serving_helpers import Trainer, _same_rows, _wait

from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer


def test_replica_bootstraps_tails_serves_and_restarts_warm(kafka_topics, tmp_path):
    trainer = Trainer(kafka_topics)
    trainer.train("item_id", np.arange(50))
    trainer.train("user_id", np.arange(10))
    trainer.pub.publish_snapshot(watermark_ms=1_000)
    # Rows updated before the replica exists must arrive too (a delta after the snapshot).
    trainer.train("item_id", np.arange(40, 60))
    trainer.pub.publish_sparse(watermark_ms=2_000)

    cfg = ParamServerConfig(model_id="ctr", state_dir=str(tmp_path / "ps"), persist_interval_s=0.2,
                            poll_timeout_ms=50)
    ps = ParamServer(cfg, kafka_topics.bootstrap_servers, trainer.topic)
    server = RecommendServer(ServeConfig(port=0), ps)
    server.start()
    ps.start()
    try:
        assert ps.wait_ready(30) and _wait(lambda: ps.state.version == trainer.table.version)
        model = ps.current()
        assert _same_rows(model.table, trainer.table, "item_id", np.arange(60))
        assert ps.state.watermark_ms == 2_000 and ps.freshness_lag_ms() > 0

        stub = pb2_grpc.RecommenderStub(grpc.insecure_channel(server.address))
        first = stub.Recommend(pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(60))))
        assert first.model_version == trainer.table.version
        assert first.freshness_lag_ms >= int(time.time() * 1000) - 2_000 - 5_000

        # A live update: item 7's row and the tower change; serving sees both within seconds.
        trainer.train("item_id", [7], scale=-5.0)
        with torch.no_grad():
            trainer.tower.head.bias.add_(1.0)
        trainer.pub.publish_sparse(watermark_ms=int(time.time() * 1000))
        trainer.pub.publish_dense(watermark_ms=int(time.time() * 1000))
        assert _wait(lambda: ps.state.version == trainer.table.version
                     and torch.equal(ps.state.tower.head.bias, trainer.tower.head.bias))
        second = stub.Recommend(pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(60))))
        assert second.model_version > first.model_version and second.freshness_lag_ms < 10_000
        before = {i.item_id: i.score for i in first.items}
        after = {i.item_id: i.score for i in second.items}
        assert after[7] != pytest.approx(before[7]) and after[30] > before[30]
        assert _wait(lambda: (tmp_path / "ps" / "meta.json").exists())
    finally:
        server.stop(0)
        ps.stop()

    # Restart: the replica is ready from disk before reading any message, then keeps tailing.
    trainer.train("item_id", [1000, 1001])
    trainer.pub.publish_sparse(watermark_ms=int(time.time() * 1000))
    again = ParamServer(cfg, kafka_topics.bootstrap_servers, trainer.topic)
    try:
        assert again.restored and again.ready
        assert _same_rows(again.current().table, trainer.table, "item_id", np.arange(60))
        assert torch.equal(again.current().tower.head.bias, trainer.tower.head.bias)
        again.start()
        assert _wait(lambda: again.state.version == trainer.table.version)
        assert _same_rows(again.current().table, trainer.table, "item_id", [1000, 1001])
    finally:
        again.stop()
        trainer.close()


def test_a_corrupt_state_dir_falls_back_to_bootstrapping_from_the_topic(kafka_topics, tmp_path):
    trainer = Trainer(kafka_topics, seed=2)
    trainer.train("item_id", np.arange(30))
    trainer.pub.publish_snapshot(watermark_ms=9)
    state = tmp_path / "ps"
    cfg = ParamServerConfig(state_dir=str(state), poll_timeout_ms=50)
    ps = ParamServer(cfg, kafka_topics.bootstrap_servers, trainer.topic)
    ps.start()
    try:
        assert ps.wait_ready(30)
    finally:
        ps.stop()
    (state / "tower.safetensors").write_bytes(b"garbage")
    again = ParamServer(cfg, kafka_topics.bootstrap_servers, trainer.topic)
    try:
        assert not again.restored and not again.ready
        again.start()
        assert again.wait_ready(30)
        assert _same_rows(again.current().table, trainer.table, "item_id", np.arange(30))
    finally:
        again.stop()
        trainer.close()
