"""The rerank stage of Recommend over a real gRPC server and a real LLM engine in one process."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from serving.pb import pb2
from serving.rerank import blend, history_window
from tests.rerank.rerank_helpers import item_text


def test_blend_is_the_documented_weighted_sum_of_standardised_scores():
    p = np.array([0.9, 0.5, 0.2, 0.6])
    llm = np.array([-3.0, -1.0, np.nan, -2.0])
    got = blend(p, llm, 0.25)
    logit = np.log(p / (1 - p))
    zd = (logit - logit.mean()) / logit.std()
    known = llm[[0, 1, 3]]
    zl = np.zeros(4)
    zl[[0, 1, 3]] = (known - known.mean()) / known.std()
    np.testing.assert_allclose(got, 0.75 * zd + 0.25 * zl)
    assert np.all(blend(p, llm, 0.0).argsort() == logit.argsort())  # weight 0: the DLRM order
    assert np.all(np.isfinite(blend(np.array([0.5, 0.5]), np.array([1.0, 1.0]), 0.5)))  # ties: zeros


def test_the_shown_history_window_moves_in_whole_chunks():
    # 50 shown at most, chunk 8: the start is the first multiple of 8 at or after total - 50.
    starts = [history_window(0, n, 50, 8) for n in range(1, 80)]
    assert starts[:50] == [0] * 50
    for n in range(51, 80):
        start = history_window(0, n, 50, 8)
        assert start % 8 == 0 and n - 50 <= start < n - 50 + 8
    # the start changes once every 8 interactions, not at every one
    assert len(set(starts)) == len({-(-(n - 50) // 8) for n in range(1, 80) if n > 50}) + 1
    # with the oldest interactions gone from memory (first > 0), the window still aligns absolutely
    assert history_window(40, 30, 50, 8) == 0  # total 70: start 24 is before 40 -> the first kept
    assert history_window(40, 60, 50, 8) == 56 - 40


def _recommend(stub, **kw):
    kw.setdefault("candidate_item_ids", list(range(200)))
    return stub.Recommend(pb2.RecommendRequest(user_id=kw.pop("user_id", 7), **kw))


def test_recommend_reranks_the_dlrm_top_n_and_returns_both_scores(runtime, serve_with):
    rt = runtime(rerank_top_n=12, rerank_weight=0.5)
    for k in range(20):
        rt.history.add(7, 3 * k, "click", 1000 + k)
    stub = serve_with(rt)
    plain = _recommend(stub, top_k=0, rerank_top_n=0)  # the DLRM order of all 200
    assert plain.reranked == 0 and not plain.degraded and not plain.items[0].HasField("llm_score")
    got = _recommend(stub, top_k=15)
    assert got.reranked == 12 and not got.degraded and got.rerank_ms > 0
    dlrm_top = [it.item_id for it in plain.items[:12]]
    head = got.items[:12]
    assert sorted(it.item_id for it in head) == sorted(dlrm_top)  # the same 12, reordered
    assert [it.item_id for it in got.items[12:15]] == [it.item_id for it in plain.items[12:15]]
    blended = [it.blended_score for it in head]
    assert blended == sorted(blended, reverse=True)
    # both scores per reranked item; score stays the DLRM probability
    by_id = {it.item_id: it.score for it in plain.items}
    for it in head:
        assert it.HasField("llm_score") and math.isfinite(it.llm_score)
        assert it.score == pytest.approx(by_id[it.item_id])
    # the blend as documented, recomputed from the two scores
    want = blend(np.array([it.score for it in head]), np.array([it.llm_score for it in head]), 0.5)
    np.testing.assert_allclose(blended, want, rtol=1e-4, atol=1e-4)


def test_cached_scores_equal_uncached_scores(runtime, serve_with, llm_dir):
    """The rerank's LLM scores (prefix-cached, across calls) equal one forward per candidate with
    prefix caching off."""
    from llm_engine import EngineConfig
    from llm_engine.scoring import plan_loglik
    from serving.http.engine_backend import EngineBackend

    rt = runtime(rerank_top_n=16)
    for k in range(40):
        rt.history.add(7, k, "click", 1000 + k)
    stub = serve_with(rt)
    _recommend(stub, top_k=16)  # warms the cache with this user's history
    rt.history.add(7, 111, "click", 5000)  # a new interaction: extends the cached prefix
    got = _recommend(stub, top_k=16)
    assert got.reranked == 16
    ids = [it.item_id for it in got.items[:16]]
    context = rt.stage.context_ids(7)
    items = plan_loglik(context, [rt.stage._tokens(" " + item_text(i)) for i in ids])
    plain = EngineBackend.from_model_dir(llm_dir, config=EngineConfig(enable_prefix_caching=False))
    try:
        ref = asyncio.run(plain.score_items("ref", items, rt.stage.options))
    finally:
        plain.close()
    diff = max(abs(it.llm_score - r) for it, r in zip(got.items[:16], ref.scores))
    assert diff <= 1e-4, diff
    assert rt.stage.context_cached > 0  # the second call found the history in the cache


def test_a_returning_user_s_history_is_a_prefix_cache_hit(runtime, serve_with):
    rt = runtime(rerank_top_n=8, rerank_history=50, rerank_history_chunk=8)
    for k in range(30):
        rt.history.add(9, k, "click", 1000 + k)
    stub = serve_with(rt)
    _recommend(stub, user_id=9, top_k=8)
    before_tokens, before_cached = rt.stage.context_tokens, rt.stage.context_cached
    for k in range(3):  # new interactions between calls, as a live user makes them
        rt.history.add(9, 100 + k, "click", 2000 + k)
        _recommend(stub, user_id=9, top_k=8)
    tokens = rt.stage.context_tokens - before_tokens
    cached = rt.stage.context_cached - before_cached
    assert cached / tokens >= 0.8, (cached, tokens)


def test_a_slow_or_absent_llm_degrades_the_order_never_the_call(runtime, serve_with):
    rt = runtime(rerank_top_n=10, rerank_deadline_ms=1.0)
    stub = serve_with(rt)
    plain = _recommend(stub, top_k=10, rerank_top_n=0)
    got = _recommend(stub, top_k=10)  # 1 ms is too short for any LLM call
    assert got.degraded and got.degraded_reason == "deadline" and got.reranked == 0
    assert [it.item_id for it in got.items] == [it.item_id for it in plain.items]
    rt.stage.cfg.rerank_deadline_ms = 2000.0
    rt.backend.close()  # the LLM is gone: its driver thread has stopped
    got = _recommend(stub, top_k=10)
    assert got.degraded and [it.item_id for it in got.items] == [it.item_id for it in plain.items]


def test_items_without_text_are_skipped_not_failed(runtime, serve_with):
    from serving import metrics as m

    rt = runtime(rerank_top_n=10)
    rt.history.add(7, 5000, "click", 1)  # an item with no text in the history
    stub = serve_with(rt)
    before = m.RERANK_SKIPPED.labels("candidate")._value.get()
    ids = list(range(190, 200)) + list(range(1000, 1010))  # half without text
    got = stub.Recommend(pb2.RecommendRequest(user_id=7, candidate_item_ids=ids, top_k=0, rerank_top_n=20))
    assert not got.degraded and got.reranked == 20
    assert {it.item_id for it in got.items if it.HasField("llm_score")} == set(range(190, 200))
    assert m.RERANK_SKIPPED.labels("candidate")._value.get() - before == 10
    # every candidate unknown: DLRM order, degraded with its reason
    got = stub.Recommend(pb2.RecommendRequest(user_id=7, candidate_item_ids=list(range(1000, 1010)), top_k=0))
    assert got.degraded and got.degraded_reason == "no_text"


def test_a_rerank_too_big_for_the_kv_pool_is_served_degraded(runtime, serve_with):
    from llm_engine import EngineConfig

    rt = runtime(engine=EngineConfig(num_kv_blocks=8, block_size=16), rerank_top_n=50)
    stub = serve_with(rt)
    got = _recommend(stub, top_k=5)
    assert got.degraded and got.degraded_reason == "too_long" and len(got.items) == 5


def test_bad_rerank_overrides_are_invalid_argument(runtime, serve_with):
    import grpc

    stub = serve_with(runtime())
    with pytest.raises(grpc.RpcError) as err:
        _recommend(stub, top_k=5, rerank_weight=1.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rerank_weight" in err.value.details()


def test_without_an_llm_the_rerank_fields_are_ignored(start_server_plain):
    stub = start_server_plain()
    got = stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(50)), top_k=5,
                                              rerank_top_n=20))
    assert len(got.items) == 5 and got.reranked == 0 and not got.degraded


@pytest.fixture
def start_server_plain():
    import grpc

    from serving.config import ServeConfig
    from serving.pb import pb2_grpc
    from serving.server import RecommendServer, StaticModelSource
    from serving.testing import random_model

    started = []

    def start():
        server = RecommendServer(ServeConfig(port=0, precision="float32"), StaticModelSource(random_model())).start()
        channel = grpc.insecure_channel(server.address)
        started.append((server, channel))
        return pb2_grpc.RecommenderStub(channel)

    yield start
    for server, channel in started:
        channel.close()
        server.stop(0)


def test_a_long_history_is_cut_in_chunks_so_appends_keep_the_prefix(runtime):
    from llm_engine import EngineConfig

    rt = runtime(engine=EngineConfig(max_model_len=400), rerank_history=64, rerank_history_chunk=8)
    for k in range(40):
        rt.history.add(4, k, "click", k)
    trailer = len(rt.stage._trailer)
    kept = 0
    for k in range(40, 56):
        before = rt.stage.context_ids(4, fit=True)
        assert len(before) + rt.stage.cfg.rerank_item_tokens <= 400  # fits with any candidate
        rt.history.add(4, k, "click", k)
        after = rt.stage.context_ids(4, fit=True)
        kept += after[:len(before) - trailer] == before[:-trailer]  # the new line only appends
    assert kept >= 12, kept  # the cut moved at most a few times in 16 appends
