"""Sharded parameter servers against the real broker, gRPC over loopback: a 2-shard fleet and a
recommender over it score exactly like one unsharded server; a dead or slow shard costs only its
ids (default vectors, counted), never the answer."""

import time
import uuid

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from ps_fleet_helpers import Fleet, RecommenderReplica, ShardedTrainer, StaticServer, sharded_topics
from serving_helpers import _wait

from embedding_store.sharding import shard_of
from paramsync import CONTROL_SHARD, decode_params
from serving.param_server import ParamServer, ParamServerConfig, ShardLayoutError
from serving.pb import pb2

N = 2


def _degraded(reason):
    return sum(REGISTRY.get_sample_value("hw_serve_ps_degraded_total", {"shard": str(s), "reason": reason}) or 0
               for s in range(N))


def _recommend(stub, user, items, cities=()):
    req = pb2.RecommendRequest(user_id=user, candidate_item_ids=items)
    if cities:
        req.context.add(slot="city", ids=list(cities))
    resp = stub.Recommend(req, timeout=10)
    return {i.item_id: i.score for i in resp.items}, resp


def _static_answer(model, items, cities=()):
    """The scores an unsharded server over ``model`` gives (the server is stopped afterwards)."""
    ref = StaticServer(model)
    try:
        return _recommend(ref.stub, 3, items, cities)[0]
    finally:
        ref.close()


@pytest.fixture
def world(kafka_broker):
    """A trained, published 2-shard model; its fleet; a recommender replica over the fleet."""
    kafka = sharded_topics(kafka_broker, f"ps{uuid.uuid4().hex[:8]}", N)
    trainer = ShardedTrainer(kafka, N)
    trainer.train("item_id", np.arange(300))
    trainer.train("user_id", np.arange(20))
    trainer.train("city", np.arange(5))
    trainer.pub.publish_snapshot(watermark_ms=1_000)
    trainer.train("item_id", np.arange(250, 320), scale=0.5)  # a live delta after the snapshot
    trainer.pub.publish_sparse(watermark_ms=2_000)
    fleet = Fleet(kafka, trainer.topic, N)
    rec = RecommenderReplica(kafka, trainer.topic, fleet.addresses)
    try:
        assert _wait(lambda: all(ps.ready and ps.state.version == trainer.table.version
                                 for ps, _ in fleet.shards) and rec.control.ready, 30)
        yield kafka, trainer, fleet, rec
    finally:
        rec.close()
        fleet.close()
        trainer.close()


def test_each_shard_tails_only_its_partition_and_holds_only_its_ids(world):
    kafka, trainer, fleet, rec = world
    for i, (ps, _) in enumerate(fleet.shards):
        assert ps.partition == i
        for slot, total in (("item_id", 320), ("user_id", 20)):
            ids = np.arange(total)
            held = np.sort(ps.current().table.ids(slot))
            np.testing.assert_array_equal(held, ids[shard_of(ids, N) == i])
            t = torch.from_numpy(held)
            assert torch.equal(ps.current().table.lookup(slot, t), trainer.table.lookup(slot, t))
    # The recommender's control replica reads the tower and no rows at all.
    assert rec.control.partition == N and rec.control.current().table.ids("item_id").size == 0
    assert torch.equal(rec.control.current().tower.head.bias, trainer.tower.head.bias)


def test_a_two_shard_fleet_scores_exactly_like_one_unsharded_server(world):
    kafka, trainer, fleet, rec = world
    ref = StaticServer(trainer.model())
    try:
        items = list(range(0, 330, 3))  # known and unknown (>= 320) items on both shards
        for user, cities in ((3, (1, 4)), (17, ()), (999, (2,))):
            got, resp = _recommend(rec.stub, user, items, cities)
            want, _ = _recommend(ref.stub, user, items, cities)
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6, atol=1e-7)
        assert resp.model_version == trainer.table.version  # the shards' version, not the tower's
        ex = pb2.Example()
        ex.sparse.add(slot="item_id", ids=[5, 6, 7])
        ex.sparse.add(slot="user_id", ids=[1])
        req = pb2.ScoreRequest(examples=[ex, pb2.Example()])
        np.testing.assert_allclose(rec.stub.Score(req).probabilities, ref.stub.Score(req).probabilities,
                                   rtol=1e-6)
    finally:
        ref.close()


def test_a_killed_shard_degrades_its_ids_to_defaults_and_the_recommender_still_answers(world):
    kafka, trainer, fleet, rec = world
    items = list(range(0, 300, 2))
    before = _degraded("UNAVAILABLE")
    fleet.kill(1)
    got, _ = _recommend(rec.stub, 3, items, (1,))
    assert len(got) == len(items)
    assert _degraded("UNAVAILABLE") > before
    # Exactly the scores of a model that has only shard 0's rows: shard 1's ids read defaults.
    ref = StaticServer(trainer.model(trainer.only_shards([0], N)))
    try:
        want, _ = _recommend(ref.stub, 3, items, (1,))
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6, atol=1e-7)
    finally:
        ref.close()
    full = _static_answer(trainer.model(), items, (1,))
    assert any(abs(full[k] - got[k]) > 1e-4 for k in items)  # the shard's rows did matter


def test_a_slow_shard_hits_the_deadline_and_reads_defaults(world):
    kafka, trainer, fleet, rec = world
    rec.fleet.deadline_s = 0.2
    items = list(range(0, 300, 2))
    before = _degraded("DEADLINE_EXCEEDED")
    ps0, _ = fleet.shards[0]
    with ps0._lock:  # shard 0 is busy (as while it swaps in a big snapshot): its Lookups wait
        t0 = time.monotonic()
        got, _ = _recommend(rec.stub, 3, items)
        took = time.monotonic() - t0
    assert _degraded("DEADLINE_EXCEEDED") > before
    assert took < 5.0  # the deadline, not the lock holder, bounds the call
    ref = StaticServer(trainer.model(trainer.only_shards([1], N)))
    try:
        want, _ = _recommend(ref.stub, 3, items)
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6, atol=1e-7)
    finally:
        ref.close()
    # Once the shard is free again, its rows are back.
    again, _ = _recommend(rec.stub, 3, items)
    want_full = _static_answer(trainer.model(), items)
    np.testing.assert_allclose([again[k] for k in items], [want_full[k] for k in items], rtol=1e-6, atol=1e-7)


def test_live_updates_reach_the_right_shard_and_the_recommender(world):
    kafka, trainer, fleet, rec = world
    trainer.train("item_id", [7, 8], scale=5.0)
    with torch.no_grad():
        trainer.tower.head.bias.add_(1.0)
    trainer.pub.publish_sparse(watermark_ms=3_000)
    trainer.pub.publish_dense(watermark_ms=3_000)
    assert _wait(lambda: all(ps.state.version == trainer.table.version for ps, _ in fleet.shards)
                 and torch.equal(rec.control.current().tower.head.bias, trainer.tower.head.bias))
    ref = StaticServer(trainer.model())
    try:
        got, resp = _recommend(rec.stub, 3, [7, 8, 9])
        want, _ = _recommend(ref.stub, 3, [7, 8, 9])
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6)
        assert resp.model_version == trainer.table.version
    finally:
        ref.close()


def test_a_shard_configured_for_another_layout_refuses_the_partition(world):
    kafka, trainer, fleet, rec = world
    wrong = ParamServer(ParamServerConfig(num_shards=3, shard_index=0, poll_timeout_ms=50),
                        kafka.bootstrap_servers, trainer.topic)
    wrong.start()
    try:
        assert _wait(lambda: wrong.error is not None, 20)
        assert isinstance(wrong.error, ShardLayoutError) and "shard 0 of 2" in str(wrong.error)
        assert not wrong.ready
    finally:
        wrong.stop()


def test_sharded_messages_name_their_shard_and_unsharded_ones_stay_wire_version_1(world):
    from kafka import KafkaConsumer, TopicPartition

    kafka, trainer, fleet, rec = world
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        for p in range(N + 1):
            tp = TopicPartition(trainer.topic, p)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            msgs = [decode_params(m.value) for batch in consumer.poll(timeout_ms=2000).values() for m in batch]
            assert msgs and all(m.num_shards == N for m in msgs)
            assert all(m.shard == (CONTROL_SHARD if p == N else p) for m in msgs)
            if p == N:  # the control partition: the tower, and rowless heartbeats
                assert {m.kind for m in msgs} >= {"dense", "sparse"}
                assert all(m.table_delta().slots[m.slot].ids.size == 0 for m in msgs if m.kind == "sparse")
    finally:
        consumer.close()


def _lookups_ok():
    return REGISTRY.get_sample_value("hw_serve_ps_lookups_total", {"code": "OK"}) or 0


def _on_shard(ids, shard):
    ids = np.asarray(ids, dtype=np.int64)
    return [int(i) for i in ids[shard_of(ids, N) == shard]]


def test_a_scored_batch_costs_one_lookup_per_shard_for_all_its_slots(world):
    kafka, trainer, fleet, rec = world
    items = list(range(0, 330, 3))
    user, cities = _on_shard(range(20), 1)[0], _on_shard(range(5), 0)[:1] + _on_shard(range(5), 1)[:1]
    calls, served = rec.fleet.calls.copy(), _lookups_ok()
    got, _ = _recommend(rec.stub, user, items, cities)  # three slots, ids on both shards
    np.testing.assert_array_equal(rec.fleet.calls - calls, [1, 1])
    assert _lookups_ok() - served == N  # what the shards answered, counted on their side
    ex = pb2.Example()
    ex.sparse.add(slot="item_id", ids=[5, 6, 7])
    ex.sparse.add(slot="city", ids=cities)
    calls = rec.fleet.calls.copy()
    rec.stub.Score(pb2.ScoreRequest(examples=[ex, pb2.Example()]))
    np.testing.assert_array_equal(rec.fleet.calls - calls, [1, 1])
    # The old path (one fan-out per slot, one after another) makes a round trip per slot and
    # scores the same.
    rec.fleet.batch_slots = False
    calls = rec.fleet.calls.copy()
    per_slot, _ = _recommend(rec.stub, user, items, cities)
    assert (rec.fleet.calls - calls).sum() >= 4
    np.testing.assert_allclose([per_slot[k] for k in items], [got[k] for k in items], rtol=1e-6, atol=1e-7)


def test_a_killed_shard_degrades_all_its_slots_in_one_counted_lookup(world):
    kafka, trainer, fleet, rec = world
    items = list(range(0, 300, 2))
    user, cities = _on_shard(range(20), 1)[0], _on_shard(range(5), 1)
    fleet.kill(1)
    before = REGISTRY.get_sample_value("hw_serve_ps_degraded_total", {"shard": "1", "reason": "UNAVAILABLE"}) or 0
    calls = rec.fleet.calls.copy()
    got, _ = _recommend(rec.stub, user, items, cities)
    np.testing.assert_array_equal(rec.fleet.calls - calls, [1, 1])
    after = REGISTRY.get_sample_value("hw_serve_ps_degraded_total", {"shard": "1", "reason": "UNAVAILABLE"})
    assert after - before == 1  # one failed Lookup carried shard 1's ids of all three slots
    ref = StaticServer(trainer.model(trainer.only_shards([0], N)))
    try:  # shard 1's items, user and cities all read their default vectors
        want, _ = _recommend(ref.stub, user, items, cities)
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6, atol=1e-7)
    finally:
        ref.close()


def test_a_prefetched_view_answers_its_ids_without_a_round_trip_and_fetches_others(world):
    kafka, trainer, fleet, rec = world
    remote = rec.source.current().table
    view = remote.prefetch({"item_id": np.array([4, 1, 4, 2]), "city": np.array([3])})
    calls = rec.fleet.calls.copy()
    ids = torch.tensor([2, 1, 2, 4])
    assert torch.equal(view.lookup("item_id", ids), trainer.table.lookup("item_id", ids))
    bags = view.lookup_bags("item_id", ids, torch.tensor([1, 3]), mode="mean")
    torch.testing.assert_close(bags, trainer.table.lookup_bags("item_id", ids, torch.tensor([1, 3]), mode="mean"))
    assert view.lookup("city", torch.zeros(0, dtype=torch.int64)).shape == (0, 8)
    assert (rec.fleet.calls == calls).all()  # all served from the prefetched rows
    other = torch.tensor([1, 7])  # 7 was not prefetched: the view fetches it, still correct
    assert torch.equal(view.lookup("item_id", other), trainer.table.lookup("item_id", other))
    assert (rec.fleet.calls - calls).sum() >= 1
