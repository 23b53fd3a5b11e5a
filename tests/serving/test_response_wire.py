"""The vectorised RecommendResponse encoder writes exactly what protobuf writes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.pb import pb2
from serving.response_wire import encode_recommend_response, scored_items_wire


def _reference(ids, scores, **scalars) -> bytes:
    items = [pb2.ScoredItem(item_id=i, score=s) for i, s in zip(ids.tolist(), scores.tolist())]
    return pb2.RecommendResponse(items=items, **scalars).SerializeToString()


def test_edge_values_encode_byte_for_byte_like_protobuf():
    ids = np.array([0, 1, 127, 128, 2**63 - 1, -1, -(2**63), 300, 5, 6], np.int64)
    scores = np.array([0.0, -0.0, 0.5, 1.0, np.inf, 1e-45, -2.5, 0.0, np.nan, 3.0], np.float32)
    scalars = dict(model_version=12, model_id="m1", freshness_lag_ms=345)
    got = encode_recommend_response(ids, scores, **scalars)
    assert got == _reference(ids, scores, **scalars)
    assert scored_items_wire(ids, scores) + pb2.RecommendResponse(**scalars).SerializeToString() == got
    back = pb2.RecommendResponse.FromString(got)
    assert [i.item_id for i in back.items] == ids.tolist()
    assert back.model_version == 12 and back.model_id == "m1" and back.freshness_lag_ms == 345


def test_no_items_is_just_the_scalars():
    empty = np.zeros(0, np.int64)
    assert scored_items_wire(empty, np.zeros(0, np.float32)) == b""
    assert encode_recommend_response(empty, np.zeros(0, np.float32), model_version=0, model_id="",
                                     freshness_lag_ms=0) == b""


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 item ids but 2 scores"):
        scored_items_wire(np.arange(3), np.zeros(2, np.float32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1),
                          st.floats(width=32, allow_nan=False)), max_size=120),
       st.integers(-(2**63), 2**63 - 1), st.text(max_size=8))
def test_random_responses_match_protobuf(pairs, version, model_id):
    ids = np.array([p[0] for p in pairs], np.int64)
    scores = np.array([p[1] for p in pairs], np.float32)
    scalars = dict(model_version=version, model_id=model_id, freshness_lag_ms=7)
    assert encode_recommend_response(ids, scores, **scalars) == _reference(ids, scores, **scalars)
