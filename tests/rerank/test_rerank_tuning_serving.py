"""The tuned blend weight through the one serving runtime: a real gRPC recommender with the LLM
in-process, clicks fed to the runtime's live history, the weight read back from Recommend's
scores and from /metrics."""

from __future__ import annotations

import numpy as np

from headwater.metrics import scrape
from serving.pb import pb2
from serving.rerank import blend
from streams.broker import free_port

TOP_N = 10


def _recommend(stub, user_id: int, **kw):
    return stub.Recommend(pb2.RecommendRequest(user_id=user_id, candidate_item_ids=list(range(200)), top_k=TOP_N,
                                               **kw))


def _weight_of(resp) -> float:
    """The weight whose blend of the response's two scores gives its blended scores."""
    head = resp.items[:resp.reranked]
    p, llm = np.array([it.score for it in head]), np.array([it.llm_score for it in head])
    got = np.array([it.blended_score for it in head])
    errs = {w: np.abs(blend(p, llm, w) - got).max() for w in np.round(np.linspace(0, 1, 101), 2)}
    return min(errs, key=errs.get)


def _click_what_the_dlrm_ranks_first(rt, stub, calls: int) -> None:
    """Users whose clicks follow the DLRM: each reranked call, then a click on the DLRM's favourite
    of its items, wherever the LLM put it."""
    for c in range(calls):
        user = c % 4
        resp = _recommend(stub, user)
        assert resp.reranked == TOP_N and not resp.degraded
        liked = max(resp.items[:TOP_N], key=lambda it: it.score).item_id
        rt.history.add(user, liked, "click", 1000 * (c + 1))


def test_clicks_the_llm_does_not_predict_lower_the_served_weight(runtime, serve_with):
    from prometheus_client import start_http_server

    tuned = runtime(rerank_top_n=TOP_N, rerank_weight=0.5, rerank_tuning_min_outcomes=20)
    fixed = runtime(rerank_top_n=TOP_N, rerank_weight=0.5, rerank_weight_tuning=False)
    tuned_stub, fixed_stub = serve_with(tuned), serve_with(fixed)
    assert abs(_weight_of(_recommend(tuned_stub, 9)) - 0.5) < 0.02  # before any outcome: the configured one

    _click_what_the_dlrm_ranks_first(fixed, fixed_stub, 24)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1")
    try:
        before = scrape(f"http://127.0.0.1:{port}/metrics").get("hw_serve_rerank_tuning_outcomes_total",
                                                                 [({}, 0.0)])[0][1]
        _click_what_the_dlrm_ranks_first(tuned, tuned_stub, 24)
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
    assert tuned.stage.tuner.outcomes >= 20
    weight = tuned.stage.weight
    assert weight <= 0.1
    # the blend Recommend serves uses it, as its scores show; the untuned runtime's stays at 0.5
    assert abs(_weight_of(_recommend(tuned_stub, 9)) - weight) < 0.02
    assert abs(_weight_of(_recommend(fixed_stub, 9)) - 0.5) < 0.02
    # a call's own weight still wins
    assert abs(_weight_of(_recommend(tuned_stub, 9, rerank_weight=0.8)) - 0.8) < 0.02
    assert metrics["hw_serve_rerank_tuned_weight"][0][1] == weight
    assert metrics["hw_serve_rerank_tuning_outcomes_total"][0][1] - before >= 20
