"""``headwater bench rerank --json``: Recommend with the LLM rerank stage, in one serving process.

Workload: a gRPC recommender (random DLRM over the synthetic world's items) with the LLM in the
same process (``serve --llm``'s runtime), item texts from the world's catalog
(:mod:`streams.generator_catalog`), and users with 20-50 interactions of history. Every round,
each user makes one or two new interactions and then one Recommend call (200 candidates,
rerank top 20), from ``--clients`` concurrent clients: ``qps``, ``p50_ms``, ``p99_ms``.

- ``prefix_hit_rate``: share of the rerank contexts' tokens the LLM's prefix cache already held,
  over returning users' calls (the first round is excluded). What it misses: the new history
  lines, the previous context's last partial block, and the whole context of a call whose shown
  window moved (``history_moves`` of them: a history that outgrew the model's context or
  ``rerank_history`` is cut, by ``history_step`` lines at once; see :mod:`serving.rerank`).
  The previous context's last partial block is a hit with ``--partial-block-reuse`` (the
  default; the engine's ``enable_partial_block_reuse``), a miss with ``--no-partial-block-reuse``.
  ``history_lines_mean``: history lines those calls showed the LLM (the price of a larger step).
- ``speedup_vs_uncached`` and ``max_abs_score_diff``: the same reranks (same prompts) on an
  engine with prefix caching off, one scoring call per candidate, vs the stage's LLM time.
- ``dlrm_p99_ms_alone`` and ``dlrm_p99_ms_under_rerank_load``: DLRM-only Recommend calls
  (``rerank_top_n = 0``) sent open-loop at ``--dlrm-qps``, alone and while rerank traffic runs.
- ``ndcg_at_10_dlrm`` / ``ndcg_at_10_blended`` (and ``auc_*``): offline, on the world's stream.
  A DLRM learns prequentially (predict, then learn) over ``--train-requests`` requests; on the
  held-out last ``--eval-requests`` (scored before it learned them), each request's shown items
  are ordered by the DLRM and by the blend with the LLM (history: the user's earlier clicks).
- ``ndcg_at_10_tuned``: the same held-out requests ordered by the blend at ``tuned_weight``, the
  weight the online tuner (:mod:`serving.rerank_tuning`) picked from ``tuning_outcomes`` clicks on
  the last ``--tune-requests`` training requests, fed to it as serving's live history would.

Ceiling (``ceiling_ms_per_call``, a floor against the LLM ms of a returning user's rerank): the
model body over only the tokens such a call must compute (the candidates and the new history
lines) plus the head at the scored positions, same weights and threads (``bench.rank``'s floor).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.harness import Ceiling, add_common, add_threads, median, with_ceiling
from bench.rerank_quality import ndcg_at as _ndcg_at, prequential, tuned_ndcg

log = logging.getLogger(__name__)

BENCH_LLM = dict(layers=4, hidden=256, heads=8, kv_heads=4, intermediate=768)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="LLM folder (default: a random ~4M-param Llama)")
    parser.add_argument("--users", type=int, default=16, help="users making calls")
    parser.add_argument("--rounds", type=int, default=4, help="calls per user (new interactions between)")
    parser.add_argument("--candidates", type=int, default=200, help="candidates per Recommend")
    parser.add_argument("--top-n", type=int, default=20, help="candidates the LLM reranks")
    parser.add_argument("--clients", type=int, default=4, help="concurrent rerank clients")
    parser.add_argument("--dlrm-qps", type=float, default=200.0, help="open-loop rate of the DLRM-only calls")
    parser.add_argument("--dlrm-seconds", type=float, default=3.0, help="length of each DLRM-only run")
    parser.add_argument("--history-low-mark", type=float, default=None,
                        help="rerank_history_low_mark (default: the serving default)")
    parser.add_argument("--partial-block-reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="the prefix cache also reuses a cached block's leading tokens (token-granular)")
    parser.add_argument("--train-requests", type=int, default=6000, help="NDCG: requests the DLRM learns from")
    parser.add_argument("--eval-requests", type=int, default=150, help="NDCG: held-out requests reranked")
    parser.add_argument("--tune-requests", type=int, default=300,
                        help="NDCG: last training requests whose clicks tune the blend weight (ndcg_at_10_tuned)")
    add_threads(parser)
    add_common(parser, repeats=1, repeats_help="unused (one timed pass; the latency figures are percentiles)",
               seed_help="seed of the world, the users and the random LLM")


def _percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000.0, q)), 2) if seconds else float("nan")


class _World:
    """The synthetic world, its catalog texts and each user's history of clicks."""

    def __init__(self, seed: int, items: int = 2000) -> None:
        from streams.generator import GeneratorConfig, SyntheticStream
        from streams.generator_catalog import catalog_texts

        self.cfg = GeneratorConfig(seed=seed, users=400, items=items, items_per_request=20)
        self.stream = SyntheticStream(self.cfg)
        self.texts = catalog_texts(self.stream)


def _runtime(model_dir: str, top_n: int, deadline_ms: float, prefix_caching: bool = True,
             low_mark: float | None = None, partial_reuse: bool = True):
    from llm_engine import EngineConfig
    from serving.item_text import ItemTextConfig
    from serving.llm_runtime import LlmRuntime, LlmRuntimeConfig
    from serving.rerank import RerankConfig
    from serving.user_history import HistoryConfig

    return LlmRuntime(LlmRuntimeConfig(llm=model_dir, llm_port=-1),
                      EngineConfig(enable_prefix_caching=prefix_caching, enable_partial_block_reuse=partial_reuse,
                                   max_num_seqs=64, max_model_len=2048),
                      RerankConfig(rerank_top_n=top_n, rerank_deadline_ms=deadline_ms,
                                   **({} if low_mark is None else {"rerank_history_low_mark": low_mark})),
                      ItemTextConfig(), HistoryConfig()).start()


def _latency_run(stub, pb2, world: _World, rt, args, rng) -> dict:
    """Rounds of (new interactions, Recommend with rerank) per user, from concurrent clients."""
    users = list(range(args.users))
    for u in users:  # 20-50 interactions of history each
        for k, item in enumerate(rng.choice(world.cfg.items, int(rng.integers(20, 51)), replace=False)):
            rt.history.add(u, int(item), "click", k)
    lat: list[float] = []
    returning_tokens = returning_cached = returning_lines = returning_calls = moves = 0
    shown: dict[int, list[int]] = {}  # each user's last context: a returning call extends it, or moved
    reranked = degraded = 0
    t_start = time.perf_counter()

    def call(u: int) -> tuple[float, object]:
        cands = rng.choice(world.cfg.items, args.candidates, replace=False).tolist()
        t0 = time.perf_counter()
        resp = stub.Recommend(pb2.RecommendRequest(user_id=u, candidate_item_ids=cands, top_k=10))
        return time.perf_counter() - t0, resp

    with ThreadPoolExecutor(args.clients) as pool:
        for r in range(args.rounds):
            for u in users:
                for _ in range(int(rng.integers(1, 3))):
                    rt.history.add(u, int(rng.integers(world.cfg.items)), "click", 100 + r)
            st = rt.stage
            before = (st.context_tokens, st.context_cached, st.context_lines, st.contexts)
            for dt, resp in pool.map(call, users):
                lat.append(dt)
                reranked += resp.reranked > 0
                degraded += resp.degraded
            if r > 0:
                returning_tokens += st.context_tokens - before[0]
                returning_cached += st.context_cached - before[1]
                returning_lines += st.context_lines - before[2]
                returning_calls += st.contexts - before[3]
            for u in users:  # the history is unchanged since the calls: the contexts they scored
                ctx = st.context_ids(u, fit=True)
                moves += r > 0 and ctx[:len(shown[u])] != shown[u]
                shown[u] = ctx
    wall = time.perf_counter() - t_start
    return {"calls": len(lat), "qps": round(len(lat) / wall, 2), "p50_ms": _percentile_ms(lat, 50),
            "p99_ms": _percentile_ms(lat, 99), "reranked_calls": reranked, "degraded_calls": degraded,
            "prefix_hit_rate": round(returning_cached / returning_tokens, 4) if returning_tokens else None,
            "history_lines_mean": round(returning_lines / returning_calls, 2) if returning_calls else None,
            "history_moves": moves, "history_step": rt.stage.history_step,
            "history_low_mark": rt.stage.cfg.rerank_history_low_mark}


def _dlrm_p99(stub, pb2, items: int, qps: float, seconds: float, rng) -> float:
    """p99 of DLRM-only Recommend calls sent open-loop at ``qps`` (latency from the intended send time)."""
    lat: list[float] = []
    lock = threading.Lock()
    n = max(1, int(qps * seconds))
    start = time.perf_counter() + 0.05

    def one(k: int) -> None:
        due = start + k / qps
        time.sleep(max(0.0, due - time.perf_counter()))
        cands = rng.choice(items, 200, replace=False).tolist()
        stub.Recommend(pb2.RecommendRequest(user_id=k % 100, candidate_item_ids=cands, top_k=10, rerank_top_n=0))
        with lock:
            lat.append(time.perf_counter() - due)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(n)))
    return _percentile_ms(lat, 99)


def _uncached_comparison(rt, model_dir: str, users: list[int], cand_sets: list[np.ndarray]) -> dict:
    """The same reranks: the stage (prefix cache, one call) vs no cache and one call per candidate."""
    from llm_engine import EngineConfig
    from llm_engine.scoring import plan_loglik
    from serving.http.engine_backend import EngineBackend

    plain = EngineBackend.from_model_dir(model_dir, config=EngineConfig(enable_prefix_caching=False,
                                                                        max_model_len=2048))
    cached_s, uncached_s, diffs = [], [], []
    try:
        for u, cands in zip(users, cand_sets):
            texts = rt.texts.get(cands.tolist())
            toks = [rt.stage.candidate_tokens(t) for t in texts]
            items = plan_loglik(rt.stage.context_ids(u, fit=True), toks)

            async def both():
                t0 = time.perf_counter()
                fast = await rt.backend.score_items(f"bench-c-{u}", items, rt.stage.options)
                t1 = time.perf_counter()
                slow = [await plain.score_items(f"bench-u-{u}-{j}", [it], rt.stage.options)
                        for j, it in enumerate(items)]
                return fast, t1 - t0, slow, time.perf_counter() - t1

            asyncio.run(rt.backend.score_items(f"bench-w-{u}", items, rt.stage.options))  # the returning user
            fast, fs, slow, ss = asyncio.run(both())
            cached_s.append(fs)
            uncached_s.append(ss)
            diffs.append(max(abs(a - b.scores[0]) for a, b in zip(fast.scores, slow)))
    finally:
        plain.close()
    return {"llm_ms_cached": round(median(cached_s) * 1000, 2), "llm_ms_uncached": round(median(uncached_s) * 1000, 2),
            "speedup_vs_uncached": round(median(uncached_s) / median(cached_s), 2),
            "max_abs_score_diff": float(max(diffs))}


def _floor_ms(model_dir: str, rt, user: int, cands: np.ndarray) -> float:
    """bench.rank's floor on a returning user's call: the new history line plus the candidates."""
    from bench.rank import every_token_once
    from llm_engine.reference import ReferenceRunner

    model = ReferenceRunner(model_dir).model
    texts = rt.texts.get(cands.tolist())
    toks = [list(rt.stage.candidate_tokens(t)) for t in texts]
    new_line = list(rt.stage.line_tokens(texts[0], "click"))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        every_token_once(model, new_line, toks)
        times.append(time.perf_counter() - t0)
    return median(times) * 1000


def _ndcg(world: _World, rt, args) -> dict:
    """Offline: NDCG@10 and AUC of the DLRM order vs the blend on held-out requests."""
    from training.prequential import metrics_of

    total = args.train_requests + args.eval_requests
    res, users, items, clicked, logits = prequential(world, total)
    k = items.shape[1]
    history: dict[int, list[int]] = {}
    ndcg_d, ndcg_b, auc_rows = [], [], []
    weight = rt.stage.cfg.rerank_weight
    for r in range(total):
        u = int(users[r])
        if r >= args.train_requests and clicked[r].any():
            rt.history._users.pop(u, None)
            for j, item in enumerate(history.get(u, [])[-50:]):
                rt.history.add(u, item, "click", j)
            p = 1.0 / (1.0 + np.exp(-logits[r].astype(np.float64)))
            order = np.lexsort((items[r], -p))
            top = order[: rt.stage.cfg.rerank_top_n]
            out = asyncio.run(rt.stage.rerank(u, items[r][top], p[top], weight))
            blended_order = order if isinstance(out, str) else np.concatenate([top[out.order], order[len(top):]])
            ndcg_d.append(_ndcg_at(clicked[r][order].astype(float)))
            ndcg_b.append(_ndcg_at(clicked[r][blended_order].astype(float)))
            rank_score = np.empty(k)
            rank_score[blended_order] = np.arange(k, 0, -1)
            auc_rows.append((p, rank_score, clicked[r]))
        history.setdefault(u, []).extend(int(i) for i in items[r][clicked[r]])
    y = np.concatenate([c for _, _, c in auc_rows]).astype(np.float32)
    w = np.ones_like(y)
    # AUC pooled over requests for the DLRM; per-request ranks for the blend (its scores are
    # only comparable within a request), so both are also given per request.
    auc_d = np.nanmean([_auc(p, c) for p, _, c in auc_rows])
    auc_b = np.nanmean([_auc(s, c) for _, s, c in auc_rows])
    pooled = metrics_of(np.log(np.concatenate([p for p, _, _ in auc_rows])) -
                        np.log1p(-np.concatenate([p for p, _, _ in auc_rows])), y, w)
    return {"ndcg_at_10_dlrm": round(float(np.nanmean(ndcg_d)), 4),
            "ndcg_at_10_blended": round(float(np.nanmean(ndcg_b)), 4),
            "auc_per_request_dlrm": round(float(auc_d), 4), "auc_per_request_blended": round(float(auc_b), 4),
            "auc_pooled_dlrm": round(pooled.auc_overall, 4), "ndcg_requests": len(ndcg_d),
            "dlrm_prequential_auc": round(res.learner.auc_overall, 4)}


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    pos, neg = score[label], score[~label]
    if not pos.size or not neg.size:
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (pos.size * neg.size))


def run(args: argparse.Namespace) -> dict:
    import grpc

    from llm_engine.random_model import build_random_llama
    from serving.config import ServeConfig
    from serving.pb import pb2, pb2_grpc
    from serving.server import RecommendServer, StaticModelSource, steady_gc
    from serving.testing import random_model

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hw-bench-rerank-")
        model_dir = str(build_random_llama(Path(tmp.name), seed=args.seed, max_positions=2048, **BENCH_LLM))
    world = _World(args.seed)
    rt = _runtime(model_dir, args.top_n, deadline_ms=5000.0, low_mark=args.history_low_mark,
                  partial_reuse=args.partial_block_reuse)
    rt.texts.update(world.texts.items())
    server = RecommendServer(ServeConfig(port=0, precision="float32"),
                             StaticModelSource(random_model(items=world.cfg.items, users=args.users)), rerank=rt).start()
    channel = grpc.insecure_channel(server.address)
    stub = pb2_grpc.RecommenderStub(channel)
    try:
        stub.Recommend(pb2.RecommendRequest(user_id=0, candidate_item_ids=list(range(200)), top_k=10))  # warm-up
        # as `headwater serve` does once loaded: without it a full collection over the world, the
        # catalog and the LLM stalled every thread for ~0.4 s mid-run (DLRM p99 under load 483 ms)
        steady_gc()
        dlrm_alone = _dlrm_p99(stub, pb2, world.cfg.items, args.dlrm_qps, args.dlrm_seconds, rng)
        lat = _latency_run(stub, pb2, world, rt, args, rng)
        # DLRM-only calls while rerank traffic runs (the rerank load keeps going on other threads)
        stop = threading.Event()

        def rerank_load() -> None:
            while not stop.is_set():
                u = int(rng.integers(args.users))
                cands = rng.choice(world.cfg.items, args.candidates, replace=False).tolist()
                stub.Recommend(pb2.RecommendRequest(user_id=u, candidate_item_ids=cands, top_k=10))

        loaders = [threading.Thread(target=rerank_load, daemon=True) for _ in range(args.clients)]
        for t in loaders:
            t.start()
        try:
            dlrm_loaded = _dlrm_p99(stub, pb2, world.cfg.items, args.dlrm_qps, args.dlrm_seconds, rng)
        finally:
            stop.set()
            for t in loaders:
                t.join(30)
        users = list(range(min(args.users, 6)))
        cand_sets = [rng.choice(world.cfg.items, args.top_n, replace=False) for _ in users]
        cmp = _uncached_comparison(rt, model_dir, users, cand_sets)
        floor = _floor_ms(model_dir, rt, users[0], cand_sets[0])
        quality = _ndcg(world, rt, args)
        tuned = tuned_ndcg(world, rt, args)
        result = {
            "bench": "rerank", "model": "random" if args.model is None else args.model,
            "candidates": args.candidates, "rerank_top_n": args.top_n, "users": args.users, "rounds": args.rounds,
            "clients": args.clients, "partial_block_reuse": args.partial_block_reuse, **lat, **cmp,
            "dlrm_qps": args.dlrm_qps, "dlrm_p99_ms_alone": dlrm_alone, "dlrm_p99_ms_under_rerank_load": dlrm_loaded,
            "gate_holds": rt.arbiter.holds, "gate_held_s": round(rt.arbiter.held_s, 3),
            **quality, **tuned, "threads": torch.get_num_threads(), "seed": args.seed,
        }
        ceiling = Ceiling(floor, "ms/call", measured=cmp["llm_ms_cached"], lower_is_better=True, note=(
            "a floor (fraction = floor / llm_ms_cached): the model body over only the tokens a returning "
            "user's rerank must compute (one new history line and the candidates), head at scored positions"))
        return with_ceiling(result, ceiling, named="ceiling_ms_per_call", digits=2)
    finally:
        channel.close()
        server.stop(0)
        rt.stop()
        if tmp is not None:
            tmp.cleanup()
