"""Serving keeps its last K versions and can pin one: `headwater params pin|rollback|unpin|status`
over the admin endpoint, carried to every replica by a control message on hw.params, under a
steady Recommend load with no failed call (real broker, real DeltaPublisher, gRPC over loopback)."""

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from serving_helpers import Trainer, _free_port, _wait

from embedding_store import EmbeddingTable, SlotConfig, SlotDelta, TableDelta
from headwater.cli import main
from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.params_admin import admin_request
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer
from serving.version_history import VersionHistory

IDS = np.arange(0, 60)


# -- the version history on its own ---------------------------------------------------------------


def _upsert(slot, ids, values, deleted=()):
    return TableDelta(0, 0, {slot: SlotDelta(ids=np.asarray(ids, np.int64),
                                             values=torch.as_tensor(values, dtype=torch.float32),
                                             deleted_ids=np.asarray(deleted, np.int64))})


def test_undo_restores_every_row_of_an_older_version_exactly_including_created_and_deleted_ones():
    table = EmbeddingTable([SlotConfig(name="item_id", dim=4)])
    table.import_delta(_upsert("item_id", [1, 2, 3], torch.ones(3, 4)))
    history = VersionHistory(max_versions=10, max_bytes=1 << 20)
    history.reset(10, 100, "tower-a", next_offset=5)
    before = table.lookup("item_id", torch.tensor([1, 2, 3, 4]))
    steps = [(11, _upsert("item_id", [2, 4], torch.full((2, 4), 7.0))),   # update 2, create 4
             (12, _upsert("item_id", [], torch.zeros(0, 4), deleted=[3])),  # expire 3
             (12, _upsert("item_id", [1], torch.full((1, 4), -1.0)))]      # two messages, one version
    for offset, (version, delta) in enumerate(steps, start=6):
        history.before_rows(version, table, delta)
        table.import_delta(delta)
        history.after_message(version, 200 + version, f"tower-{version}", offset + 1)
    assert history.versions() == [10, 11, 12]
    entry, undone = history.undo_to(table, 10)
    assert (entry.version, entry.tower, entry.next_offset) == (10, "tower-a", 5)
    assert [e.version for e in undone] == [11, 12] and history.versions() == [10]
    assert torch.equal(table.lookup("item_id", torch.tensor([1, 2, 3, 4])), before)
    assert 4 not in set(table.ids("item_id").tolist())  # created after version 10: absent again
    assert history.bytes == 0


def test_the_history_keeps_the_newest_k_versions_and_stays_under_its_byte_bound():
    table = EmbeddingTable([SlotConfig(name="item_id", dim=8)])
    history = VersionHistory(max_versions=4, max_bytes=1 << 20)
    history.reset(0, 0, None, 0)
    for v in range(1, 10):
        delta = _upsert("item_id", np.arange(100), torch.full((100, 8), float(v)))
        history.before_rows(v, table, delta)
        table.import_delta(delta)
        history.after_message(v, v, None, v)
    assert history.versions() == [6, 7, 8, 9] and history.entries[0].undo == []
    assert 0 < history.bytes <= 3 * (100 * 8 * 4 + 100 * 8)
    small = VersionHistory(max_versions=100, max_bytes=5000)
    small.reset(0, 0, None, 0)
    for v in range(1, 10):
        delta = _upsert("item_id", np.arange(100), torch.full((100, 8), float(v)))
        small.before_rows(v, table, delta)
        small.after_message(v, v, None, v)
        assert small.bytes <= 5000
    with pytest.raises(KeyError):
        small.undo_to(table, 3)


# -- pin and rollback against the real broker, under load ------------------------------------------


class _Load:
    """Closed-loop Recommend callers; every answer and every failure is recorded."""

    def __init__(self, address, threads=3):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb2_grpc.RecommenderStub(self.channel)
        self.stop = threading.Event()
        self.versions, self.failures, self.calls = set(), [], 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set():
            try:
                resp = self.stub.Recommend(pb2.RecommendRequest(user_id=3, candidate_item_ids=IDS.tolist()),
                                           timeout=10)
                self.versions.add(resp.model_version)
                self.calls += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)
        self.channel.close()


def _publish(trainer, rows, towers, scale):
    """One trained step, published as a sparse delta (and a tower every other step)."""
    trainer.train("item_id", IDS[::3] + int(scale) % 3, scale=scale)
    if int(scale) % 2:
        # A dense publish first ships the rows not yet published, under their own version with
        # the tower serving already has; the new tower then gets a version of its own.
        v = int(trainer.table.version)
        rows[v] = trainer.table.lookup("item_id", torch.from_numpy(IDS)).clone()
        towers[v] = trainer.tower.head.bias.clone()
        with torch.no_grad():
            trainer.tower.head.bias.add_(0.25)
        trainer.pub.publish_dense(watermark_ms=int(time.time() * 1000))
    trainer.pub.publish_sparse(watermark_ms=int(time.time() * 1000))
    v = int(trainer.table.version)
    rows[v] = trainer.table.lookup("item_id", torch.from_numpy(IDS)).clone()
    towers[v] = trainer.tower.head.bias.clone()
    return v


def _serves(ps, rows, towers, v):
    model = ps.current()
    return (model is not None and model.version == v
            and torch.equal(model.table.lookup("item_id", torch.from_numpy(IDS)), rows[v])
            and torch.equal(model.tower.head.bias, towers[v]))


def test_pin_rollback_and_unpin_reach_every_replica_under_load_with_no_failed_call(kafka_topics, capsys):
    trainer = Trainer(kafka_topics, seed=5)
    trainer.train("item_id", IDS)
    trainer.train("user_id", np.arange(10))
    trainer.pub.publish_snapshot(watermark_ms=int(time.time() * 1000))
    rows, towers = {}, {}
    v0 = int(trainer.table.version)
    rows[v0] = trainer.table.lookup("item_id", torch.from_numpy(IDS)).clone()
    towers[v0] = trainer.tower.head.bias.clone()
    port = _free_port()
    admin = f"127.0.0.1:{port}"
    cfg = ParamServerConfig(poll_timeout_ms=50, history_versions=8, admin_port=port)
    ps = ParamServer(cfg, kafka_topics.bootstrap_servers, trainer.topic)
    other = ParamServer(ParamServerConfig(poll_timeout_ms=50, history_versions=8),
                        kafka_topics.bootstrap_servers, trainer.topic)  # a second replica, no admin
    server = RecommendServer(ServeConfig(port=0, precision="float32", items=False), ps).start()
    ps.start()
    other.start()
    try:
        assert ps.wait_ready(30) and other.wait_ready(30)
        versions = [v0] + [_publish(trainer, rows, towers, s) for s in (1.0, 2.0, 3.0, 4.0)]
        newest = versions[-1]
        assert _wait(lambda: ps.state.version == newest and other.state.version == newest, 30)
        with _Load(server.address) as load:
            code, body = admin_request(admin, "GET", "/admin/params")
            assert code == "OK" and body["status"]["held_versions"][-1] == newest
            assert not body["status"]["pinned"]

            # Pin an older version: both replicas serve exactly its rows and tower.
            target = versions[2]
            t0 = time.monotonic()
            code, body = admin_request(admin, "POST", "/admin/params/pin", {"version": target})
            assert code == "OK", body
            assert body["status"]["pinned_version"] == target and _serves(ps, rows, towers, target)
            assert _wait(lambda: _serves(other, rows, towers, target), 5)
            assert time.monotonic() - t0 < 5.0  # well inside the freshness target plus a poll

            # The trainer keeps publishing; pinned replicas do not move.
            later = [_publish(trainer, rows, towers, s) for s in (5.0, 6.0)]
            time.sleep(0.5)
            assert _serves(ps, rows, towers, target) and _serves(other, rows, towers, target)
            assert _wait(lambda: admin_request(admin, "GET", "/admin/params")[1]["status"]["newest_version"]
                         == later[-1], 10)

            # Rollback: the newest held version before the one served.
            code, body = admin_request(admin, "POST", "/admin/params/rollback")
            assert code == "OK" and body["status"]["version"] == versions[1]
            assert _serves(ps, rows, towers, versions[1])
            assert _wait(lambda: _serves(other, rows, towers, versions[1]), 5)

            # Pinning forward to a version published while pinned reads on to exactly it.
            code, body = admin_request(admin, "POST", "/admin/params/pin", {"version": later[0]})
            assert code == "OK", body
            assert _wait(lambda: _serves(ps, rows, towers, later[0]) and _serves(other, rows, towers, later[0]), 10)

            # Bad input gets clear codes; nothing changes.
            code, body = admin_request(admin, "POST", "/admin/params/pin", {"version": 10**9})
            assert code == "NOT_FOUND" and "not held" in body["message"]
            code, body = admin_request(admin, "POST", "/admin/params/pin", {"version": "latest"})
            assert code == "INVALID_ARGUMENT" and "integer" in body["message"]
            code, body = admin_request(admin, "POST", "/admin/params/pin", {})
            assert code == "INVALID_ARGUMENT"
            code, body = admin_request(admin, "POST", "/admin/params/promote")
            assert code == "NOT_FOUND"
            assert _serves(ps, rows, towers, later[0])

            # The CLI speaks to the same endpoint.
            assert main(["params", "status", "--admin", admin]) == 0
            assert f"pinned to {later[0]}" in capsys.readouterr().out
            assert main(["params", "pin", str(versions[0] - 1), "--admin", admin]) == 1
            assert "NOT_FOUND" in capsys.readouterr().err

            # Unpin: every replica follows the newest again, and keeps following.
            assert main(["params", "unpin", "--admin", admin]) == 0
            assert _wait(lambda: _serves(ps, rows, towers, later[-1]) and _serves(other, rows, towers, later[-1]), 10)
            last = _publish(trainer, rows, towers, 7.0)
            assert _wait(lambda: _serves(ps, rows, towers, last) and _serves(other, rows, towers, last), 10)
            time.sleep(0.3)
        assert load.failures == [] and load.calls > 20
        assert load.versions <= set(rows)  # every answer came from a published version
        assert {target, versions[1], later[0]} <= load.versions
    finally:
        server.stop(0)
        ps.stop()
        other.stop()
        trainer.close()


def test_a_pinned_replica_restarted_warm_is_still_pinned(kafka_topics, tmp_path):
    trainer = Trainer(kafka_topics, seed=6)
    trainer.train("item_id", IDS)
    trainer.pub.publish_snapshot(watermark_ms=1_000)
    rows, towers = {}, {}
    versions = [_publish(trainer, rows, towers, s) for s in (1.0, 2.0, 3.0)]
    port = _free_port()
    cfg = ParamServerConfig(poll_timeout_ms=50, state_dir=str(tmp_path / "ps"), admin_port=port)
    ps = ParamServer(cfg, kafka_topics.bootstrap_servers, trainer.topic)
    ps.start()
    try:
        assert _wait(lambda: ps.state.version == versions[-1], 30)
        code, body = admin_request(f"127.0.0.1:{port}", "POST", "/admin/params/pin", {"version": versions[0]})
        assert code == "OK", body
        _publish(trainer, rows, towers, 4.0)
        time.sleep(0.3)
    finally:
        ps.stop()  # persists the pinned replica
    again = ParamServer(ParamServerConfig(poll_timeout_ms=50, state_dir=str(tmp_path / "ps")),
                        kafka_topics.bootstrap_servers, trainer.topic)
    again.start()
    try:
        time.sleep(1.0)  # it re-reads from the pinned version's end, the pin command among it
        assert _serves(again, rows, towers, versions[0]) and again.pinned_version == versions[0]
    finally:
        again.stop()
        trainer.close()


def test_bad_or_unheld_commands_on_the_topic_are_refused_and_the_replica_keeps_following(kafka_topics, caplog):
    from paramsync import CONTROL, ControlCommand, ParamsMessage, encode_params

    trainer = Trainer(kafka_topics, seed=7)
    trainer.train("item_id", IDS)
    trainer.pub.publish_snapshot(watermark_ms=1_000)
    rows, towers = {}, {}
    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers, trainer.topic)
    ps.start()
    try:
        first = _publish(trainer, rows, towers, 1.0)
        assert _wait(lambda: ps.state.version == first, 30)
        for payload in (b"\xc1 not msgpack", ControlCommand("pin", 10**6, 41).encode()):
            trainer.producer.send(trainer.topic, encode_params(ParamsMessage(
                kind=CONTROL, model_id="ctr", version=1, payload=payload)), partition=0)
        trainer.producer.flush()
        assert _wait(lambda: ps.command_result(41) is not None, 10)
        result = ps.command_result(41)
        assert result.code == "NOT_FOUND" and "not held" in result.message
        second = _publish(trainer, rows, towers, 2.0)
        assert _wait(lambda: _serves(ps, rows, towers, second), 10)  # still following
        assert ps.error is None and ps.pinned_version is None
        assert "bad control message" in caplog.text
    finally:
        ps.stop()
        trainer.close()
