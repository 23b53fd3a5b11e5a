"""gRPC bad input over loopback: missing, oversized and out-of-range fields are INVALID_ARGUMENT
with a message that starts with the field's path; random well-typed requests get OK or that,
never INTERNAL or UNKNOWN."""

from __future__ import annotations

import re

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.config import ServeConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer, StaticModelSource
from serving.testing import random_model
from serving.validation import Limits

SLOTS = ("user_id", "item_id", "f00")
DENSE = 2
LIMITS = Limits()
FIELD = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")


@pytest.fixture(scope="module")
def stub():
    server = RecommendServer(ServeConfig(port=0, precision="float32"),
                             StaticModelSource(random_model(SLOTS, dense_dim=DENSE, hidden=(8,)))).start()
    channel = grpc.insecure_channel(server.address)
    yield pb2_grpc.RecommenderStub(channel)
    channel.close()
    server.stop(0)


def bag(slot: str, ids) -> pb2.SparseFeature:  # noqa: ANN001
    return pb2.SparseFeature(slot=slot, ids=ids)


CASES = [
    # missing
    ("GetEmbeddings", pb2.GetEmbeddingsRequest(ids=[1]), "slot: is required"),
    ("GetEmbeddings", pb2.GetEmbeddingsRequest(slot="item_id"), "ids: at least one"),
    ("Score", pb2.ScoreRequest(), "examples: at least one"),
    ("Score", pb2.ScoreRequest(examples=[pb2.Example(sparse=[bag("", [1])])]), "examples[0].sparse[0].slot: is required"),
    ("Recommend", pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], context=[bag("", [2])]),
     "context[0].slot: is required"),
    # oversized
    ("Recommend", pb2.RecommendRequest(candidate_item_ids=range(LIMITS.max_candidates + 1)), "candidate_item_ids: "),
    ("Recommend", pb2.RecommendRequest(candidate_item_ids=[1], context=[bag("f00", range(LIMITS.max_ids_per_bag + 1))]),
     "context[0].ids: "),
    ("Score", pb2.ScoreRequest(examples=[pb2.Example()] * (LIMITS.max_examples + 1)), "examples: "),
    ("Score", pb2.ScoreRequest(examples=[pb2.Example(sparse=[bag("f00", range(1000))])] * 1001),
     "examples: 1001000 ids in all exceed"),
    ("GetEmbeddings", pb2.GetEmbeddingsRequest(slot="item_id", ids=range(LIMITS.max_candidates + 1)), "ids: "),
    # out of range
    ("Recommend", pb2.RecommendRequest(candidate_item_ids=[1], top_k=LIMITS.max_top_k + 1), "top_k: "),
    ("Recommend", pb2.RecommendRequest(candidate_item_ids=[1], dense=[1.0, float("inf")]), "dense: values must be finite"),
    ("Recommend", pb2.RecommendRequest(candidate_item_ids=[1], dense=[1.0] * 3), "dense: expected 2 values"),
    ("Score", pb2.ScoreRequest(examples=[pb2.Example(dense=[float("nan"), 0.0])]), "examples[0].dense: "),
    ("Recommend", pb2.RecommendRequest(candidate_item_ids=[1], context=[bag("colour", [1])]), "context[0].slot: unknown"),
]


@pytest.mark.parametrize("method, request_, prefix", CASES, ids=[c[2].split(":")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_fields_are_invalid_argument_naming_the_field(stub, method, request_, prefix):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(prefix), err.value.details()


SLOT_NAMES = st.sampled_from(SLOTS + ("", "colour", "ITEM_ID", "f00\x00"))
IDS = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8)
FLOATS = st.lists(st.floats(width=32), max_size=4)
BAGS = st.lists(st.builds(bag, SLOT_NAMES, IDS), max_size=4)
REQUESTS = st.one_of(
    st.tuples(st.just("Recommend"), st.builds(
        pb2.RecommendRequest, user_id=st.integers(-(2**63), 2**63 - 1), context=BAGS, dense=FLOATS,
        candidate_item_ids=IDS, top_k=st.sampled_from([0, 1, 5, LIMITS.max_top_k, LIMITS.max_top_k + 1, 2**32 - 1]))),
    st.tuples(st.just("Score"), st.builds(
        pb2.ScoreRequest, examples=st.lists(st.builds(pb2.Example, sparse=BAGS, dense=FLOATS), max_size=4))),
    st.tuples(st.just("GetEmbeddings"), st.builds(pb2.GetEmbeddingsRequest, slot=SLOT_NAMES, ids=IDS)),
)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=REQUESTS)
def test_random_requests_are_answered_or_invalid_argument_never_internal(stub, call):
    method, request_ = call
    try:
        getattr(stub, method)(request_, timeout=30)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert FIELD.match(err.details()), err.details()
