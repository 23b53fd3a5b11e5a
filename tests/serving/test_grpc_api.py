"""The Recommender API over a loopback socket: ranking, scoring, embeddings, errors, health, auth."""

import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.calibration import Calibrator
from serving.pb import pb2
from serving.scoring import RankJob, score_jobs
from serving.testing import random_model
from streams.events import Ragged
from training.model import score as model_score


def _bag(slot, ids):
    return pb2.SparseFeature(slot=slot, ids=list(ids))


def test_recommend_ranks_candidates_by_the_models_probability(start_server):
    model = random_model(seed=1)
    _, stub = start_server(model)
    cands = np.array([5, 17, 3, 999, 250, 42], np.int64)
    resp = stub.Recommend(pb2.RecommendRequest(user_id=7, candidate_item_ids=cands.tolist(),
                                               context=[_bag("f00", [11, 12])]))
    # The same rows through the model definition's own scoring entry point.
    n = cands.size
    sparse = {"user_id": Ragged(np.full(n, 7, np.int64), np.ones(n, np.int32)),
              "item_id": Ragged(cands, np.ones(n, np.int32)),
              "f00": Ragged(np.tile([11, 12], n).astype(np.int64), np.full(n, 2, np.int32))}
    want = model_score(model.table, model.tower, sparse, None, n).numpy()
    got = {it.item_id: it.score for it in resp.items}
    assert [it.item_id for it in resp.items] == cands[np.argsort(-want, kind="stable")].tolist()
    np.testing.assert_allclose([got[c] for c in cands.tolist()], want, rtol=1e-5)
    assert resp.model_version == model.version and resp.model_id == "ctr"


def test_top_k_truncates_to_the_best_items(start_server):
    _, stub = start_server(random_model())
    full = stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(50))))
    top = stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(50)), top_k=5))
    assert len(full.items) == 50 and len(top.items) == 5
    assert [i.item_id for i in top.items] == [i.item_id for i in full.items[:5]]
    scores = [i.score for i in full.items]
    assert scores == sorted(scores, reverse=True)


def test_without_candidates_recommend_retrieves_by_dot_product_then_ranks(start_server):
    model = random_model(items=500, seed=2)
    _, stub = start_server(model, retrieve_k=20)
    resp = stub.Recommend(pb2.RecommendRequest(user_id=9, top_k=20))
    items = torch.from_numpy(np.arange(500, dtype=np.int64))
    dots = model.table.lookup("item_id", items) @ model.table.lookup("user_id", torch.tensor([9]))[0]
    want = set(torch.topk(dots, 20).indices.tolist())
    assert {it.item_id for it in resp.items} == want
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)


def test_unknown_ids_read_the_default_vector_instead_of_failing(start_server):
    model = random_model(items=100)
    _, stub = start_server(model)
    resp = stub.GetEmbeddings(pb2.GetEmbeddingsRequest(slot="item_id", ids=[3, 10**12]))
    known, unknown = resp.embeddings
    assert known.known and not unknown.known and resp.dim == 16
    np.testing.assert_allclose(known.values, model.table.lookup("item_id", torch.tensor([3]))[0].numpy(), rtol=1e-6)
    default = model.table.lookup("item_id", torch.tensor([10**12 + 1]))[0].numpy()
    np.testing.assert_allclose(unknown.values, default)
    ranked = stub.Recommend(pb2.RecommendRequest(user_id=10**15, candidate_item_ids=[10**12, 1]))
    assert len(ranked.items) == 2


def test_score_returns_one_probability_per_example(start_server):
    model = random_model(seed=3)
    _, stub = start_server(model)
    req = pb2.ScoreRequest(examples=[
        pb2.Example(sparse=[_bag("user_id", [1]), _bag("item_id", [2])]),
        pb2.Example(sparse=[_bag("item_id", [3]), _bag("f00", [4, 5])]),
        pb2.Example(),
    ])
    resp = stub.Score(req)
    sparse = {"user_id": Ragged(np.array([1], np.int64), np.array([1, 0, 0], np.int32)),
              "item_id": Ragged(np.array([2, 3], np.int64), np.array([1, 1, 0], np.int32)),
              "f00": Ragged(np.array([4, 5], np.int64), np.array([0, 2, 0], np.int32))}
    want = model_score(model.table, model.tower, sparse, None, 3).numpy()
    np.testing.assert_allclose(resp.probabilities, want, rtol=1e-5)


@pytest.mark.parametrize("request_, field", [
    (pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], context=[_bag("colour", [1])]), "context[0].slot"),
    (pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], context=[_bag("f00", [1]), _bag("f00", [2])]),
     "context[1].slot"),
    (pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], dense=[1.0, 2.0]), "dense"),
    (pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], top_k=10**6), "top_k"),
    (pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(20_000))), "candidate_item_ids"),
])
def test_malformed_recommend_is_invalid_argument_naming_the_field(start_server, request_, field):
    _, stub = start_server(random_model(dense_dim=3))
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_malformed_score_and_embedding_requests_name_the_field(start_server):
    _, stub = start_server(random_model(dense_dim=2))
    cases = [
        (stub.Score, pb2.ScoreRequest(), "examples:"),
        (stub.Score, pb2.ScoreRequest(examples=[pb2.Example(), pb2.Example(dense=[1.0])]), "examples[1].dense:"),
        (stub.Score, pb2.ScoreRequest(examples=[pb2.Example(dense=[1.0, float("nan")])]), "examples[0].dense:"),
        (stub.GetEmbeddings, pb2.GetEmbeddingsRequest(slot="nope", ids=[1]), "slot:"),
        (stub.GetEmbeddings, pb2.GetEmbeddingsRequest(slot="item_id"), "ids:"),
    ]
    for call, req, prefix in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(prefix), err.value.details()


def test_health_is_not_serving_until_a_model_is_loaded(start_server):
    server, stub = start_server(None)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", "headwater.v1.Recommender"):
        got = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert got == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=[1]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    server.source.set(random_model())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if health.Check(health_pb2.HealthCheckRequest(service="headwater.v1.Recommender")).status \
                == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.02)
    else:
        pytest.fail("health never turned SERVING")
    assert stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=[1])).items


def test_reflection_lists_the_services_and_serves_the_proto(start_server):
    server, _ = start_server(random_model())
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="headwater.v1.Recommender")]
    answers = list(stub.ServerReflectionInfo(iter(reqs)))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"headwater.v1.Recommender", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(answers[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "headwater.v1"
    assert {m.name for m in fd.service[0].method} == {"Recommend", "Score", "GetEmbeddings"}


def test_bearer_token_is_required_when_configured_but_health_stays_open(start_server):
    server, stub = start_server(random_model(), auth_token="s3cret")
    req = pb2.RecommendRequest(user_id=1, candidate_item_ids=[1, 2])
    for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(req, metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(stub.Recommend(req, metadata=[("authorization", "Bearer s3cret")]).items) == 2
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status in (
        health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


def test_binds_loopback_by_default(start_server):
    server, _ = start_server(random_model())
    assert server.address.startswith("127.0.0.1:")


def test_batched_and_unbatched_servers_agree(start_server):
    model = random_model(seed=5)
    _, batched = start_server(model, batching=True)
    _, plain = start_server(model, batching=False)
    req = pb2.RecommendRequest(user_id=4, candidate_item_ids=list(range(30)), context=[_bag("f00", [1])])
    a, b = batched.Recommend(req), plain.Recommend(req)
    assert [(i.item_id, i.score) for i in a.items] == [(i.item_id, i.score) for i in b.items]
    # and score_jobs over several jobs at once equals each job alone
    jobs = [RankJob(user_id=u, items=np.arange(u, u + 7)) for u in range(4)]
    together = score_jobs(model, jobs, Calibrator())
    for job, probs in zip(jobs, together):
        np.testing.assert_allclose(probs, score_jobs(model, [job], Calibrator())[0], rtol=1e-5, atol=1e-7)


def test_served_scores_carry_the_negative_sampling_correction(start_server):
    model = random_model(seed=6)
    _, plain = start_server(model)
    _, shifted = start_server(model, negative_sample_rate=0.25)
    req = pb2.RecommendRequest(user_id=2, candidate_item_ids=list(range(20)))
    p = np.array([i.score for i in plain.Recommend(req).items], np.float64)
    q = np.array([i.score for i in shifted.Recommend(req).items], np.float64)
    # odds shrink by exactly the rate; the ranking is unchanged
    np.testing.assert_allclose(q / (1 - q), 0.25 * p / (1 - p), rtol=1e-4)
    ex = pb2.ScoreRequest(examples=[pb2.Example(sparse=[_bag("item_id", [4])])])
    a, b = plain.Score(ex).probabilities[0], shifted.Score(ex).probabilities[0]
    assert b / (1 - b) == pytest.approx(0.25 * a / (1 - a), rel=1e-4)


def test_bfloat16_serving_stays_within_a_hair_of_float32(start_server):
    model = random_model(seed=8, items=2000)
    with torch.no_grad():  # spread the logits out, like a trained model's
        model.tower.head.weight.mul_(40.0)
    _, exact = start_server(model, precision="float32")
    _, fast = start_server(model, precision="bfloat16")
    req = pb2.RecommendRequest(user_id=5, candidate_item_ids=list(range(0, 2000, 10)))
    a = {i.item_id: i.score for i in exact.Recommend(req).items}
    b = {i.item_id: i.score for i in fast.Recommend(req).items}
    pa, pb_ = np.array([a[k] for k in sorted(a)]), np.array([b[k] for k in sorted(a)])
    assert np.ptp(pa) > 0.2  # the test is not vacuous: scores really differ between items
    assert np.abs(pa - pb_).max() < 0.02
    assert np.corrcoef(pa, pb_)[0, 1] > 0.999
