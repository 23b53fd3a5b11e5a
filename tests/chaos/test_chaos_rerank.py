"""The ``serving-rerank`` chaos fault (issue 18, item 5): a serving replica running the LLM in its
process is killed with ``kill -9`` while a rerank call is in flight to it, and restarted. A
rerank call is answered, reranked or degraded (DLRM order), never failed: the failover load
sends it to the other replica, and the run counts ``reranked_calls`` and ``degraded_calls``."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from headwater.chaos import ChaosConfig, run_chaos
from headwater.chaos.cluster import Cluster
from headwater.chaos.load import FailoverLoadClient
from headwater.chaos.rerank import RERANK_FAULT, attach_llm
from headwater.chaos.run import _OTHER_FAULTS
from serving.pb import pb2, pb2_grpc

SLOW_RERANK_S = 0.3  # the first replica's rerank: long enough to be caught in flight


class _Replica(pb2_grpc.RecommenderServicer):
    """A gRPC Recommender answering as serving does with an LLM: a rerank call is ``reranked``
    (``rerank_top_n`` items reordered) or, when ``late``, ``degraded`` with a reason."""

    def __init__(self, late: bool, rerank_s: float = 0.0) -> None:
        self.late, self.rerank_s = late, rerank_s
        self.rerank_candidates: list[int] = []

    def Recommend(self, request, context):  # noqa: N802 - the gRPC method's name
        items = [pb2.ScoredItem(item_id=i, score=0.5) for i in request.candidate_item_ids[:10]]
        if not request.HasField("rerank_top_n"):
            return pb2.RecommendResponse(items=items)
        self.rerank_candidates.extend(request.candidate_item_ids)
        time.sleep(self.rerank_s)
        if self.late:
            return pb2.RecommendResponse(items=items, degraded=True, degraded_reason="deadline")
        return pb2.RecommendResponse(items=items, reranked=request.rerank_top_n, rerank_ms=1.0)


def _serve(replica: _Replica) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_RecommenderServicer_to_server(replica, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_serving_rerank_is_registered_and_not_in_the_default_run():
    assert _OTHER_FAULTS[RERANK_FAULT].__name__ == "rerank_fault"
    assert RERANK_FAULT not in ChaosConfig().faults.split(",")  # it puts the LLM into the whole run
    with pytest.raises(ValueError, match="rerank_every"):
        run_chaos(ChaosConfig(faults=RERANK_FAULT, rerank_every=0))


def test_attach_llm_gives_both_replicas_an_llm_that_serve_accepts_and_texts_for_every_item(tmp_path):
    from headwater.cli import build_parser
    from headwater.config import load_configs
    from llm_engine import EngineConfig
    from serving.item_text import ItemTextConfig, ItemTexts
    from serving.llm_runtime import LlmRuntimeConfig
    from serving.rerank import RerankConfig

    cl = Cluster(ChaosConfig(faults=RERANK_FAULT, rerank_every=7, rerank_deadline_ms=321.0), tmp_path)
    attach_llm(cl)
    children, _ = cl.specs("127.0.0.1:9")
    serving = [c for c in children if c.name.startswith("serving-")]
    assert len(serving) == 2 and cl.rerank_every == 7
    for child in serving:
        argv = child.argv[child.argv.index("serve"):]
        args = build_parser().parse_args(argv)
        llm, rerank, text, engine = load_configs((LlmRuntimeConfig, RerankConfig, ItemTextConfig, EngineConfig),
                                                 args, section="serve")
        assert llm.llm == str(tmp_path / "llm-random") and llm.llm_port == -1
        assert rerank.rerank_top_n == 0 and rerank.rerank_deadline_ms == 321.0  # only calls that ask
        assert engine.kv_cache_bytes == 32 << 20
    texts = ItemTexts(100_000, 1000)
    texts.load(text.item_text, text)
    # The load's rerank candidates come from the generator's item ids: each has a text.
    assert all(t is not None for t in texts.get(list(range(cl.gen.items))))


def test_a_rerank_in_flight_to_a_stopped_replica_is_answered_by_the_other_and_counted():
    fast, late = _Replica(late=False, rerank_s=SLOW_RERANK_S), _Replica(late=True)
    (server_a, a), (server_b, b) = _serve(fast), _serve(late)
    load = FailoverLoadClient([a, b], qps=50.0, items=50_000, rerank_every=3, rerank_items=100,
                              rerank_timeout_s=2.0)
    try:
        load.start()
        assert load.ready.wait(10)
        load.count_from_now()
        deadline = time.monotonic() + 10
        while load.reranked == 0 and time.monotonic() < deadline:  # the first replica reranks
            time.sleep(0.01)
        while time.monotonic() < deadline:  # a rerank call in flight to the first replica
            now = load.in_flight
            if now is not None and now.rerank and now.target == a:
                break
            time.sleep(0.001)
        else:
            pytest.fail("no rerank call reached the first replica")
        time.sleep(SLOW_RERANK_S / 3)
        server_a.stop(grace=None).wait()  # abort the call in flight, like a kill -9
        t = time.monotonic()
        while load.outcome(now.seq) is None and time.monotonic() - t < 5:
            time.sleep(0.01)
        ended = load.outcome(now.seq)
        time.sleep(0.5)  # more calls, all on the second replica now
    finally:
        load.stop()
        server_b.stop(grace=None)
    assert ended is not None and ended.answered_by == b and ended.rerank and ended.degraded
    assert ended.degraded_reason == "deadline"
    summary = load.summary()
    assert summary["errors"] == 0 and summary["answered"] == summary["calls"] > 10
    assert summary["rerank_every"] == 3 and summary["failovers"] >= 1
    assert summary["rerank_asked"] == summary["reranked"] + summary["degraded"] >= summary["calls"] // 3 - 1
    assert summary["reranked"] >= 1 and summary["degraded"] >= 2
    assert summary["degraded_reasons"] == {"deadline": summary["degraded"]}
    assert max(fast.rerank_candidates + late.rerank_candidates) < 100  # the catalog's ids
    assert load.last_reranked[a] > 0 and load.last_reranked[b] == 0  # a degraded answer is no rerank


@pytest.mark.slow  # the whole chaos cluster with the LLM in both serving replicas: ~45-60 s
def test_the_chaos_run_kills_a_serving_replica_mid_rerank_and_every_call_is_answered(tmp_path):
    report = run_chaos(ChaosConfig(faults=RERANK_FAULT, storage="memory", data_dir=str(tmp_path),
                                   warmup_s=2.0, settle_s=2.0, load_qps=10.0))
    (fault,) = report["faults"]
    assert report["faults_survived"] == 1, fault
    assert fault["detail"]["reranking_before_kill"] and fault["detail"]["rerank_in_flight_at_kill"]
    killed = fault["detail"]["killed_call"]
    assert killed["rerank"] and killed["answered_by"] == "serving-b"  # failover, not a failure
    assert killed["reranked"] or killed["degraded"]
    assert fault["detail"]["reranked_after_restart_s"] > 0
    assert 0 < fault["recovery_s"] <= fault["downtime_s"]
    assert fault["lost"] == 0 and fault["duplicates_trained"] == 0 and fault["failed_calls"] == 0
    assert fault["reranked_calls"] > 0 and fault["degraded_calls"] >= 0
    serving = report["serving"]
    assert serving["errors"] == 0 and serving["rerank_asked"] == serving["reranked"] + serving["degraded"]
    assert report["lost"] == 0 and report["duplicates_trained"] == 0 and report["drained"]
