"""Overload: each server first shows its sustainable rate (a closed loop at its admission limit),
then gets 3x that rate for a few seconds from an open loop. Admitted requests keep a p99 within
a bound derived from the limit, the rest are refused at once (429 + Retry-After, or
RESOURCE_EXHAUSTED), nothing else goes wrong, and the server's memory does not grow with the
offered load. No timing is asserted beyond that bound (with 2.5x slack for a shared machine);
``headwater bench overload`` reports the figures beside an unbounded baseline."""

from __future__ import annotations

import grpc
import httpx
import pytest

from serving.config import ServeConfig
from serving.http import HttpServerConfig, create_app
from serving.http.overload import admitted_latency_bound, closed_loop_grpc, open_loop_grpc, rss_bytes, run_http_load
from serving.http.server import RunningServer
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer, StaticModelSource
from serving.testing import random_model

LIMIT = 4
SLACK = 2.5
RSS_GROWTH_MAX = 64 << 20
# Model work must dominate a request (as it does for a real LLM), or the test measures HTTP parsing.
BODY = {"prompt": "hello there", "max_tokens": 160, "ignore_eos": True}


@pytest.fixture(scope="module")
def bounded_llm_server(engine_backend):
    with RunningServer(create_app(engine_backend, HttpServerConfig(max_pending_requests=LIMIT, retry_after_s=2))) as srv:
        yield srv


def test_llm_server_at_3x_its_sustainable_rate_sheds_load_and_keeps_admitted_latency_bounded(bounded_llm_server):
    url = bounded_llm_server.url
    sustainable = run_http_load(url, "/v1/completions", BODY, "closed", LIMIT, 3.0)
    assert sustainable.ok > 0 and sustainable.rejected == 0 and not sustainable.other, sustainable.summary()
    rate = sustainable.achieved_rps
    bound = admitted_latency_bound(LIMIT, rate, sustainable.p(99))

    rss0 = rss_bytes()
    over = run_http_load(url, "/v1/completions", BODY, "open", 3 * rate, 4.0)
    growth = rss_bytes() - rss0
    info = {"sustainable": sustainable.summary(), "3x": over.summary(), "bound_s": bound, "rss_growth": growth}

    assert not over.other, info  # only 200 and 429: no 5xx, no resets, no timeouts
    assert over.ok > 0 and over.rejected >= 0.25 * (over.ok + over.rejected), info
    assert over.rejected_with_retry_after == over.rejected, info
    assert over.p(99) <= SLACK * bound, info
    assert growth < RSS_GROWTH_MAX, info
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["in_flight"] == 0  # every admission slot came back


def test_a_refusal_names_the_limit_and_the_retry_delay(bounded_llm_server):
    over = run_http_load(bounded_llm_server.url, "/v1/completions", BODY, "open", 40, 0.5)
    assert over.rejected > 0
    r = None
    with httpx.Client(base_url=bounded_llm_server.url, timeout=60) as c:
        # Fill the slots with streams held open, then one more request is refused.
        streams = [c.stream("POST", "/v1/completions", json={**BODY, "stream": True}) for _ in range(LIMIT)]
        opened = [s.__enter__() for s in streams]
        try:
            r = c.post("/v1/completions", json=BODY)
        finally:
            for s, o in zip(streams, opened):
                s.__exit__(None, None, None)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and f"{LIMIT} requests in flight" in err["message"]


@pytest.mark.slow  # a timed p99 bound: fails under load (2 of 3 full runs on 2026-12-06)
def test_grpc_server_at_3x_its_sustainable_rate_answers_resource_exhausted_and_stays_bounded():
    limit = 8
    model = random_model(items=2000, hidden=(256, 128, 64))
    req = pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(2000)))
    cfg = ServeConfig(port=0, workers=limit, max_concurrent_rpcs=limit, max_queue=limit, precision="float32")
    server = RecommendServer(cfg, StaticModelSource(model)).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            call = pb2_grpc.RecommenderStub(ch).Recommend
            sustainable = closed_loop_grpc(call, req, limit, 3.0)
            assert sustainable.ok > 0 and not sustainable.other and sustainable.rejected == 0, sustainable.summary()
            rate = sustainable.achieved_rps
            bound = admitted_latency_bound(limit, rate, sustainable.p(99))
            rss0 = rss_bytes()
            over = open_loop_grpc(call, req, 3 * rate, 4.0)
            growth = rss_bytes() - rss0
            info = {"sustainable": sustainable.summary(), "3x": over.summary(), "bound_s": bound, "rss_growth": growth}
            assert not over.other, info  # only OK and RESOURCE_EXHAUSTED
            assert over.ok > 0 and over.rejected >= 0.25 * (over.ok + over.rejected), info
            assert over.p(99) <= SLACK * bound, info
            assert growth < RSS_GROWTH_MAX, info
    finally:
        server.stop(0)
