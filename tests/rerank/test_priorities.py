"""Priority classes on the one runtime: DLRM scoring holds LLM steps back; rerank goes before generation."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from serving.http.backend import GenerateParams
from serving.pb import pb2


async def _generate(backend, rid: str, tokens: int) -> float:
    """Runs one generation to the end; returns when it finished (perf_counter)."""
    got = 0
    async for event in backend.generate(rid, [5, 6, 7, 8], GenerateParams(max_tokens=tokens, temperature=0.0,
                                                                          ignore_eos=True)):
        got += len(event.token_ids)
    assert got == tokens
    return time.perf_counter()


def test_dlrm_calls_hold_llm_steps_and_generation_still_finishes(runtime, serve_with):
    """A generation flood runs while Recommend calls (DLRM only) keep coming: every call answers,
    the LLM's steps waited their turn behind DLRM work in flight (the arbiter held them), and
    every generation still completes (the bounded wait cannot starve it)."""
    rt = runtime(rerank_top_n=0)
    rt.arbiter.aging_s = 0.02  # a generation step waits at most 3 ageing steps
    stub = serve_with(rt)
    done = threading.Event()
    results: list[float] = []

    def flood() -> None:
        async def all_of_them():
            return await asyncio.gather(*(_generate(rt.backend, f"g{k}", 48) for k in range(6)))
        results.extend(asyncio.run(all_of_them()))
        done.set()

    t = threading.Thread(target=flood)
    t.start()
    ok = 0
    rng = np.random.default_rng(0)
    while not done.is_set():
        resp = stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=rng.integers(200, size=200).tolist(),
                                                   top_k=10), timeout=30)
        ok += len(resp.items) == 10
    t.join(60)
    assert ok > 0 and len(results) == 6
    assert rt.arbiter.holds > 0  # LLM steps waited their turn behind in-flight DLRM scoring


def test_a_rerank_is_scheduled_before_queued_generation(runtime, serve_with):
    """With every sequence slot taken by generation and more generation queued, a Recommend's
    rerank (class RERANK) takes the next free slots ahead of the queued generation (class
    GENERATE) that arrived before it: it answers once the first wave ends, not after the queue."""
    from llm_engine import EngineConfig

    rt = runtime(engine=EngineConfig(max_num_seqs=4), rerank_top_n=6)
    for k in range(10):
        rt.history.add(3, k, "click", k)
    stub = serve_with(rt)

    async def scenario():
        flood = [asyncio.create_task(_generate(rt.backend, f"f{k}", 64)) for k in range(12)]
        await asyncio.sleep(0.2)  # 4 running, 8 queued
        loop = asyncio.get_running_loop()
        resp = await loop.run_in_executor(None, lambda: stub.Recommend(
            pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(50)), top_k=6), timeout=120))
        answered = time.perf_counter()
        ends = await asyncio.gather(*flood)
        return resp, answered, sorted(ends)

    resp, answered, ends = asyncio.run(scenario())
    assert resp.reranked == 6 and not resp.degraded
    # Three waves of 4 generations. First come first served would put the rerank's context
    # behind all 8 queued generations and its candidates behind the third wave (after the 12th
    # end); its class puts it into the second wave, answered before the third wave ends.
    assert answered < ends[8], (answered - ends[0], [e - ends[0] for e in ends])
