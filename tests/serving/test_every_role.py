"""Every role answers every call. ``--role all``, ``--role recommender`` over two ``--role ps``
shards, and a ``--role ps`` shard are each driven with every RPC over loopback, against a real
broker and published parameters. A role serves its own calls (the sharded layout gives the
one-process layout's answers, retrieval and ``known`` included) and answers the other role's calls
with UNIMPLEMENTED naming the role that serves them; bytes that are not a protobuf message are
INVALID_ARGUMENT; no call is INTERNAL or UNKNOWN."""

import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ps_fleet_helpers import DIM, Fleet, RecommenderReplica, ShardedTrainer, sharded_topics
from serving_helpers import _wait

from embedding_store.sharding import shard_of
from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2
from serving.server import RecommendServer
from streams.kafka_io import topic_names
from training.model import tower_to_safetensors
from training.sync import DeltaPublisher, SyncConfig

N = 2
ITEMS, USERS, CITIES = 300, 20, 5
ROLES = ("all", "recommender", "ps")
SERVES = {"all": "Recommender", "recommender": "Recommender", "ps": "ParameterServer"}
METHODS = {service: [m.name for m in pb2.DESCRIPTOR.services_by_name[service].methods]
           for service in ("Recommender", "ParameterServer")}
JUNK = b"\xff\xff\xff\xff\x0f"  # a varint that never ends: no protobuf message parses from it


@dataclass
class World:
    kafka: object  # the sharded layout's KafkaConfig
    trainer: ShardedTrainer
    channels: dict
    rec: RecommenderReplica


def _unsharded_publisher(trainer, kafka):
    """A second publisher of the trainer's table and tower, to an unsharded hw.params (--role all)."""
    return DeltaPublisher(trainer.producer, topic_names(kafka.topic_prefix).params, trainer.table,
                          lambda: tower_to_safetensors(trainer.tower), SyncConfig(model_id="ctr"))


@pytest.fixture(scope="module")
def world(kafka_broker):
    tag = uuid.uuid4().hex[:8]
    sharded, single = sharded_topics(kafka_broker, f"roles{tag}", N), sharded_topics(kafka_broker, f"rall{tag}", 1)
    trainer = ShardedTrainer(sharded, N, seed=3)
    trainer.train("item_id", np.arange(ITEMS))
    trainer.train("user_id", np.arange(USERS))
    trainer.train("city", np.arange(CITIES))
    unsharded = _unsharded_publisher(trainer, single)
    trainer.pub.publish_snapshot(watermark_ms=1_000)
    unsharded.publish_snapshot(watermark_ms=1_000)
    fleet = Fleet(sharded, trainer.topic, N)
    rec = RecommenderReplica(sharded, trainer.topic, fleet.addresses)
    one = ParamServer(ParamServerConfig(poll_timeout_ms=50), single.bootstrap_servers, unsharded.topic)
    one.start()
    server = RecommendServer(ServeConfig(port=0, precision="float32"), one).start()
    addresses = {"all": server.address, "recommender": rec.server.address, "ps": fleet.addresses[0]}
    channels = {role: grpc.insecure_channel(a) for role, a in addresses.items()}
    try:
        assert _wait(lambda: rec.control.ready and one.ready and one.state.version == trainer.table.version
                     and all(ps.ready and ps.state.version == trainer.table.version for ps, _ in fleet.shards), 30)
        yield World(sharded, trainer, channels, rec)
    finally:
        for c in channels.values():
            c.close()
        server.stop(0)
        one.stop()
        rec.close()
        fleet.close()
        trainer.close()


def _call(world, role, method, request, timeout=10):
    """Any method of either service on any role, the request as a message or as raw bytes."""
    service = next(s for s, names in METHODS.items() if method in names)
    out = getattr(pb2, pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type.name)
    call = world.channels[role].unary_unary(f"/headwater.v1.{service}/{method}", response_deserializer=out.FromString)
    return call(request if isinstance(request, bytes) else request.SerializeToString(), timeout=timeout)


def _code(world, role, method, request):
    try:
        _call(world, role, method, request)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def _recommend(world, role, **kw):
    req = pb2.RecommendRequest(user_id=kw.pop("user", 3), **kw)
    return _call(world, role, "Recommend", req)


def _on_shard(ids, shard):
    ids = np.asarray(ids, dtype=np.int64)
    return ids[shard_of(ids, N) == shard]


VALID = {
    "Recommend": pb2.RecommendRequest(user_id=3, candidate_item_ids=[1, 2, 3]),
    "Score": pb2.ScoreRequest(examples=[pb2.Example()]),
    "GetEmbeddings": pb2.GetEmbeddingsRequest(slot="item_id", ids=[1]),
    "Lookup": pb2.LookupRequest(slots=[pb2.SparseFeature(slot="item_id", ids=[0])]),
    "Retrieve": pb2.RetrieveRequest(slot="item_id", query=[0.5] * DIM, k=3),
}
assert set(VALID) == {m for names in METHODS.values() for m in names}  # every RPC is driven


# -- what every role shares -----------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_every_role_reports_serving_for_itself_and_its_service(world, role):
    stub = health_pb2_grpc.HealthStub(world.channels[role])
    for name in ("", f"headwater.v1.{SERVES[role]}"):
        # A recommender reports NOT_SERVING while a shard misses its deadline (a loaded box can
        # make one miss); healthy, it reports SERVING within a few polls.
        assert _wait(lambda: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                     == health_pb2.HealthCheckResponse.SERVING, 20), name


@pytest.mark.parametrize("role, method", [(r, m) for r in ROLES for m in METHODS[SERVES[r]]])
def test_every_role_answers_its_own_calls(world, role, method):
    assert _code(world, role, method, VALID[method]) == (grpc.StatusCode.OK, "")


@pytest.mark.parametrize("role, method", [(r, m) for r in ROLES for m in METHODS[SERVES[r]]])
def test_junk_bytes_are_invalid_argument_on_every_method_a_role_serves(world, role, method):
    code, details = _code(world, role, method, JUNK)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith("request: not a valid headwater.v1."), details


WRONG = [(r, m) for r in ROLES for s, names in METHODS.items() if s != SERVES[r] for m in names]


@pytest.mark.parametrize("role, method", WRONG)
@pytest.mark.parametrize("payload", ["valid", "junk"])
def test_a_call_for_the_other_role_is_unimplemented_naming_the_role_that_serves_it(world, role, method, payload):
    code, details = _code(world, role, method, JUNK if payload == "junk" else VALID[method])
    assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)
    assert ("--role recommender or --role all" if role == "ps" else "--role ps shards") in details, details


# -- the sharded layout answers like the one-process layout ---------------------------------------
def test_recommend_with_candidates_scores_alike_in_both_layouts(world):
    items = list(range(0, ITEMS + 30, 3))  # known and unknown items on both shards
    context = [pb2.SparseFeature(slot="city", ids=[1, 4])]
    want = _recommend(world, "all", candidate_item_ids=items, context=context)
    got = _recommend(world, "recommender", candidate_item_ids=items, context=context)
    assert [i.item_id for i in got.items] == [i.item_id for i in want.items]
    np.testing.assert_allclose([i.score for i in got.items], [i.score for i in want.items], rtol=1e-6, atol=1e-7)
    assert got.model_version == want.model_version == world.trainer.table.version


@pytest.mark.parametrize("user, cities, top_k", [(3, (), 0), (17, (1, 4), 25), (999, (2,), 200)])
def test_recommend_without_candidates_retrieves_and_ranks_the_same_items_in_both_layouts(world, user, cities, top_k):
    context = [pb2.SparseFeature(slot="city", ids=list(cities))] if cities else []
    want = _recommend(world, "all", user=user, context=context, top_k=top_k)
    got = _recommend(world, "recommender", user=user, context=context, top_k=top_k)
    assert len(want.items) == (top_k or ServeConfig().default_top_k)
    assert [i.item_id for i in got.items] == [i.item_id for i in want.items]
    np.testing.assert_allclose([i.score for i in got.items], [i.score for i in want.items], rtol=1e-6, atol=1e-7)
    assert got.model_version == world.trainer.table.version


def test_the_remote_table_reports_the_shards_version(world):
    _recommend(world, "recommender", candidate_item_ids=list(range(10)))  # every shard answered once
    assert world.rec.source.current().table.version == world.trainer.table.version


def test_score_gives_the_same_probabilities_in_both_layouts(world):
    ex = pb2.Example()
    ex.sparse.add(slot="item_id", ids=[5, 6, 7, 400])
    ex.sparse.add(slot="user_id", ids=[1])
    req = pb2.ScoreRequest(examples=[ex, pb2.Example()])
    np.testing.assert_allclose(_call(world, "recommender", "Score", req).probabilities,
                               _call(world, "all", "Score", req).probabilities, rtol=1e-6)


@pytest.mark.parametrize("slot, ids", [("item_id", [7, 400, 0, 7, 299, -5, 150]), ("city", [4, 1, 9])])
def test_get_embeddings_gives_the_same_rows_and_known_flags_in_both_layouts(world, slot, ids):
    req = pb2.GetEmbeddingsRequest(slot=slot, ids=ids)
    want, got = _call(world, "all", "GetEmbeddings", req), _call(world, "recommender", "GetEmbeddings", req)
    assert got.dim == want.dim == DIM and got.model_version == want.model_version
    assert [e.id for e in got.embeddings] == ids
    limit = {"item_id": ITEMS, "city": CITIES}[slot]
    assert [e.known for e in got.embeddings] == [e.known for e in want.embeddings] == [0 <= i < limit for i in ids]
    rows = world.trainer.table.lookup(slot, torch.tensor(ids)).numpy()
    np.testing.assert_array_equal([list(e.values) for e in got.embeddings], rows)
    np.testing.assert_array_equal([list(e.values) for e in want.embeddings], rows)


# -- a shard's own calls ----------------------------------------------------------------------------
def test_a_shard_looks_up_its_rows_and_says_which_it_holds(world):
    ids = np.concatenate([_on_shard(np.arange(ITEMS), 0)[:5], _on_shard(np.arange(ITEMS, ITEMS + 50), 0)[:2]])
    req = pb2.LookupRequest(slots=[pb2.SparseFeature(slot="item_id", ids=ids.tolist())], with_known=True)
    resp = _call(world, "ps", "Lookup", req)
    assert (resp.shard_index, resp.num_shards, resp.version) == (0, N, world.trainer.table.version)
    got = resp.slots[0]
    np.testing.assert_array_equal(np.frombuffer(got.values, "<f4").reshape(ids.size, DIM),
                                  world.trainer.table.lookup("item_id", torch.from_numpy(ids)).numpy())
    assert list(got.known) == [1] * 5 + [0] * 2
    req.with_known = False  # the scoring path does not pay for the flags
    assert _call(world, "ps", "Lookup", req).slots[0].known == b""


def test_a_shard_retrieves_the_top_items_among_its_own(world):
    query = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    resp = _call(world, "ps", "Retrieve", pb2.RetrieveRequest(slot="item_id", query=query.tolist(), k=20))
    mine = _on_shard(np.arange(ITEMS), 0)
    dots = (world.trainer.table.lookup("item_id", torch.from_numpy(mine)) @ query).numpy()
    order = np.lexsort((mine, -dots))[:20]
    assert list(resp.ids) == mine[order].tolist()
    np.testing.assert_allclose(resp.scores, dots[order], rtol=1e-5, atol=1e-6)
    assert (resp.shard_index, resp.num_shards) == (0, N)


@pytest.mark.parametrize("request_, prefix", [
    (pb2.RetrieveRequest(slot="colour", query=[0.0] * DIM, k=1), "slot: unknown slot 'colour'"),
    (pb2.RetrieveRequest(slot="item_id", query=[0.0] * (DIM + 1), k=1), "query: expected 8 finite values"),
    (pb2.RetrieveRequest(slot="item_id", query=[float("nan")] * DIM, k=1), "query: expected 8 finite values"),
    (pb2.RetrieveRequest(slot="item_id", query=[0.0] * DIM, k=0), "k: must be in [1, "),
    (pb2.LookupRequest(slots=[pb2.SparseFeature(slot="colour", ids=[1])]), "slots[0]: unknown slot 'colour'"),
])
def test_a_shard_rejects_bad_fields_with_invalid_argument_naming_the_field(world, request_, prefix):
    method = "Retrieve" if isinstance(request_, pb2.RetrieveRequest) else "Lookup"
    code, details = _code(world, "ps", method, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(prefix), (code, details)


# -- shards that do not answer --------------------------------------------------------------------
def test_a_dead_shard_costs_retrieval_its_items_get_embeddings_fails_and_no_shard_is_unavailable(world):
    trainer = world.trainer
    fleet = Fleet(world.kafka, trainer.topic, N)  # a fleet of its own, to kill
    rec = RecommenderReplica(world.kafka, trainer.topic, fleet.addresses)
    try:
        assert _wait(lambda: rec.control.ready and all(ps.ready for ps, _ in fleet.shards), 30)
        fleet.kill(1)
        resp = rec.stub.Recommend(pb2.RecommendRequest(user_id=3, top_k=50), timeout=10)
        ids = np.array([i.item_id for i in resp.items])
        assert ids.size == 50 and (shard_of(ids, N) == 0).all()  # shard 0's items still ranked
        with pytest.raises(grpc.RpcError) as err:
            rec.stub.GetEmbeddings(pb2.GetEmbeddingsRequest(slot="item_id", ids=list(range(10))), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 1" in err.value.details()
        fleet.kill(0)
        with pytest.raises(grpc.RpcError) as err:
            rec.stub.Recommend(pb2.RecommendRequest(user_id=3), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no parameter-server shard" in err.value.details()
        # Candidates given: scoring still degrades to default vectors instead of failing.
        ranked = rec.stub.Recommend(pb2.RecommendRequest(user_id=3, candidate_item_ids=[1, 2]), timeout=10)
        assert len(ranked.items) == 2
    finally:
        rec.close()
        fleet.close()
