"""``headwater bench retrieval --json``: the ANN item index (``serving.ann_index``) on a synthetic
catalog while a stream of updates runs, against the exact brute force serving uses today
(``serving.retrieval.ItemIndex``), in the same run.

Catalog (issue 21, ``--catalog``, named with its parameters in the JSON's ``catalog``): ``--items``
vectors (default 1M, dim 64, float32), each a topic centre (one of ``clusters``, standard normal)
plus its own deviation (``spread`` times standard normal), direction normalised, norm log-normal
(sigma 0.25), as learned item embeddings spread. ``clustered`` (the default, the issue's): 1,024
topics, spread 1, deviations as wide as the centres: an item's nearest neighbours by inner product
are as much other topics' outliers as its own topic, close to the worst case for every index.
``gaussian``: no topics at all (i.i.d. directions), the worst case. ``topics``: 1,024 topics,
spread 0.15, as ``streams.generator`` draws items around their category. Queries are users' taste
vectors drawn the same way (a topic plus a personal deviation), never copies of items. Scores are
inner products.

Index (``--index``): ``ivf_sq8`` (the default: faiss inverted lists of 8-bit codes, a shortlist of
``rerank * k`` rescored from float32; ``--nlist``, ``--nprobe``) or ``hnsw`` (usearch; ``--ef``,
``--connectivity``, ``--expansion-add``). The exact baseline is the best brute force measured in
the same run: one matrix-vector product over the contiguous float32 catalog and a top-k, torch on
one thread, torch on every core, or numpy with argpartition (``baseline_exact_variants_p50_ms``).

Phases: build the index (all cores); static queries (recall@100 against an exact scan of the same
vectors, latency p50/p99 per single query, the exact baseline's latency); then ``--duration-s``
of one thread querying in a closed loop while another applies a stream of updates in batches of
``--update-batch`` (half new items, 40% changed vectors, 10% removals). ``query_p50_ms`` and
``query_p99_ms`` are measured in that second phase, ``updates_per_s`` is the items it applied per
second, and ``insert_to_visible_*`` is, for one new item per batch, the time from the batch's
arrival to a query (the item's own vector) that returns it, the query sent as the upsert returns;
``insert_visible_fraction`` is the share of such probes returned (the rest are approximate misses:
items in their own exact top k that the graph does not reach, a recall figure, not staleness).
Recall is measured again on the final catalog after the updates.

Ceiling (``ceiling_ms_per_query``, next to ``static_query_p50_ms``): usearch's own search on the
same graph, same queries and ef, called directly (no lock, no validation, no conversion): the
least a query through the index can cost. ``exact_scan_floor_ms`` adds the memory-bound time of
reading every vector once, the floor under any exact scan.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time

import numpy as np
import torch

from bench.harness import Ceiling, add_common, add_threads, with_ceiling
from serving.ann_index import AnnConfig, AnnIndex
from serving.ann_vectors import topk_rows
from serving.retrieval import ItemIndex

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "synthetic_vectors"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=1_000_000, help="items in the catalog")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100, help="items per query (recall is recall@k)")
    p.add_argument("--queries", type=int, default=1000, help="timed single queries on the static index")
    p.add_argument("--recall-queries", type=int, default=200, help="queries scored against exact search")
    p.add_argument("--exact-queries", type=int, default=30, help="timed queries of the exact baseline")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds of queries while updates run")
    p.add_argument("--update-batch", type=int, default=64, help="items per update batch")
    p.add_argument("--ef", type=int, default=768, help="HNSW search depth (expansion_search)")
    p.add_argument("--ef-sweep", default="", help="also report recall and latency at these ef, comma list")
    p.add_argument("--connectivity", type=int, default=32, help="HNSW links per node (M)")
    p.add_argument("--expansion-add", type=int, default=128, help="HNSW construction depth")
    p.add_argument("--update-chunk", type=int, default=0,
                   help="items per hold of the index lock (0: 16 for ivf_sq8, whose insert costs ~50 us; 1 for hnsw)")
    p.add_argument("--index", choices=("ivf_sq8", "hnsw"), default="ivf_sq8", help="the ANN index (AnnConfig.retrieval)")
    p.add_argument("--nlist", type=int, default=0, help="ivf_sq8 lists (0: power of two nearest 2 sqrt(items))")
    p.add_argument("--nprobe", type=int, default=0, help="ivf_sq8 lists scanned per query (0: AnnIndex.nprobe)")
    p.add_argument("--rerank", type=int, default=2, help="ivf_sq8 candidates per result rescored in float32")
    p.add_argument("--nprobe-sweep", default="", help="ivf_sq8: also report recall and latency at these nprobe")
    p.add_argument("--catalog", choices=tuple(CATALOGS), default="clustered", help="how items and users are drawn")
    p.add_argument("--clusters", type=int, default=None, help="topics (overrides the catalog's)")
    p.add_argument("--spread", type=float, default=None, help="deviation std around a topic (overrides the catalog's)")
    p.add_argument("--small", action="store_true", help="a seconds-long run for tests: 3,000 items, few queries")
    add_threads(p, help_text="torch threads of the exact baseline (the index queries on one thread)")
    add_common(p, repeats=1, repeats_help="interleaved static passes of index, baseline and ceiling (medians)")


CATALOGS = {"clustered": {"clusters": 1024, "spread": 1.0}, "gaussian": {"clusters": 0, "spread": 1.0},
            "topics": {"clusters": 1024, "spread": 0.15}}


def synthetic_vectors(n: int, dim: int, seed: int, draw: int, clusters: int = 1024, spread: float = 1.0) -> np.ndarray:
    """Learned-embedding-like vectors: a topic centre (one of ``clusters``, fixed by ``seed``;
    none when 0) plus ``spread`` times standard normal noise, normalised, times a log-normal norm;
    ``draw`` picks an independent sample."""
    rng = np.random.default_rng([seed, draw])
    v = rng.standard_normal((n, dim), dtype=np.float32)
    if spread != 1.0:
        v *= np.float32(spread)
    if clusters > 0:
        centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
        v += centres[rng.integers(0, clusters, n)]
    v *= (rng.lognormal(0.0, 0.25, n) / np.linalg.norm(v, axis=1)).astype(np.float32)[:, None]
    return v


def _pcts(times_s: list[float]) -> tuple[float, float]:
    a = np.asarray(times_s) * 1e3
    return (float(np.percentile(a, 50)), float(np.percentile(a, 99))) if a.size else (float("nan"),) * 2


def _recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f, t).size / max(1, t.size) for f, t in zip(found, truth)]))


class _Catalog:
    """The bench's own copy of the catalog as updates change it, for the exact truth at the end."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray, extra: int) -> None:
        n = ids.size
        self.ids = np.concatenate([ids, np.zeros(extra, np.int64)])
        self.vecs = np.concatenate([vecs, np.zeros((extra, vecs.shape[1]), np.float32)])
        self.live = np.concatenate([np.ones(n, bool), np.zeros(extra, bool)])
        self.high = n

    def next_batch(self, rng: np.random.Generator, batch: int, fresh: np.ndarray, next_id: int):
        n_new, n_chg = batch // 2, (batch * 2) // 5
        n_del = batch - n_new - n_chg
        live = np.flatnonzero(self.live[:self.high])
        pick = rng.choice(live, n_chg + n_del, replace=False)
        chg, dele = pick[:n_chg], pick[n_chg:]
        new_rows = np.arange(self.high, self.high + n_new)
        self.high += n_new
        self.ids[new_rows] = next_id + np.arange(n_new)
        self.vecs[new_rows], self.live[new_rows] = fresh[:n_new], True
        self.vecs[chg] = fresh[n_new:n_new + n_chg]
        self.live[dele] = False
        return (self.ids[np.concatenate([new_rows, chg])], self.vecs[np.concatenate([new_rows, chg])],
                self.ids[dele], self.ids[new_rows[0]], self.vecs[new_rows[0]])


def run(args: argparse.Namespace) -> dict:
    if args.small:
        args.items, args.queries, args.recall_queries, args.exact_queries = 3_000, 30, 30, 5
        args.duration_s, args.update_batch = min(args.duration_s, 1.0), min(args.update_batch, 32)
    torch.set_num_threads(os.cpu_count() or 1)  # the truth's scans; the baseline sets its own
    load_before = os.getloadavg()[0]
    catalog = {"name": args.catalog, **CATALOGS[args.catalog], "norm_sigma": 0.25, "queries": "user taste: topic + deviation"}
    if args.clusters is not None:
        catalog["clusters"] = args.clusters
    if args.spread is not None:
        catalog["spread"] = args.spread
    args.draw = lambda n, draw: synthetic_vectors(n, args.dim, args.seed, draw, catalog["clusters"], catalog["spread"])
    vecs = args.draw(args.items, 0)
    ids = np.arange(args.items, dtype=np.int64) * 2 + 1  # arbitrary ids, not row numbers
    queries = args.draw(max(args.queries, args.recall_queries), 1)
    cfg = AnnConfig(dim=args.dim, retrieval=args.index, expansion_search=args.ef, connectivity=args.connectivity,
                    expansion_add=args.expansion_add, max_k=max(1000, args.k),
                    update_chunk=args.update_chunk or (16 if args.index == "ivf_sq8" else 1),
                    nlist=args.nlist, nprobe=args.nprobe, rerank=args.rerank)
    args.update_chunk = cfg.update_chunk
    index = AnnIndex(cfg)
    t0 = time.perf_counter()
    index.install(ids, vecs, graph=None)  # builds on every core
    build_s = time.perf_counter() - t0
    log.info("built %d items in %.1f s", args.items, build_s)

    exact = ItemIndex()
    order = np.argsort(ids)
    exact.ids, exact.vectors = ids[order], torch.from_numpy(vecs[order])
    live = np.ones(args.items, bool)
    truth = topk_rows(ids, vecs, live, queries[:args.recall_queries], args.k)[0]
    graph = index._graph  # noqa: SLF001 - the ceiling calls the library on the very same graph
    ivf = args.index == "ivf_sq8"
    if ivf:
        graph.nprobe = index.nprobe()
    else:
        graph.expansion_search = max(args.ef, args.k)

    def ann_pass() -> list[float]:
        out = []
        for q in queries[:args.queries]:
            t = time.perf_counter()
            index.topk(q, args.k)
            out.append(time.perf_counter() - t)
        return out

    def raw_pass() -> list[float]:
        out = []
        for q in queries[:args.queries]:
            t = time.perf_counter()
            graph.search(q, args.k, threads=1)
            out.append(time.perf_counter() - t)
        return out

    def numpy_topk(q: np.ndarray) -> np.ndarray:
        s = vecs @ q
        top = np.argpartition(-s, args.k)[:args.k]
        return ids[top[np.argsort(-s[top])]]

    cores = args.threads if args.threads > 1 else (os.cpu_count() or 1)
    exact_fns = {"torch_t1": (1, lambda q: exact.topk(torch.from_numpy(q), args.k)),
                 f"torch_t{cores}": (cores, lambda q: exact.topk(torch.from_numpy(q), args.k)),
                 "numpy_argpartition": (cores, numpy_topk)}
    exact_t: dict[str, list[float]] = {name: [] for name in exact_fns}

    def exact_pass() -> list[float]:
        for name, (threads, fn) in exact_fns.items():
            torch.set_num_threads(threads)
            fn(queries[0])  # warm: the first call of a thread count builds its pool
            for q in queries[:args.exact_queries]:
                t = time.perf_counter()
                fn(q)
                exact_t[name].append(time.perf_counter() - t)
        return []

    ann_t, raw_t = [], []
    for r in range(max(1, args.repeats)):  # rotate the order so a neighbour's burst hits all alike
        passes = [(ann_pass, ann_t), (raw_pass, raw_t), (exact_pass, [])]
        for fn, acc in passes[r % 3:] + passes[:r % 3]:
            acc.extend(fn())
    exact_p50s = {name: _pcts(t)[0] for name, t in exact_t.items()}
    best_exact = min(exact_p50s, key=exact_p50s.get)
    recall = _recall([index.topk(q, args.k)[0] for q in queries[:args.recall_queries]], truth)
    sweep = []
    knob = "nprobe" if ivf else "ef"
    for v in [int(e) for e in (args.nprobe_sweep if ivf else args.ef_sweep).split(",") if e]:  # same index
        setattr(cfg, "nprobe" if ivf else "expansion_search", v)
        t_ef, found = [], []
        for q in queries[:args.recall_queries]:
            t = time.perf_counter()
            found.append(index.topk(q, args.k)[0])
            t_ef.append(time.perf_counter() - t)
        sweep.append({knob: v, "recall_at_100": round(_recall(found, truth), 4),
                      **dict(zip(("p50_ms", "p99_ms"), (round(x, 3) for x in _pcts(t_ef))))})
    cfg.expansion_search, cfg.nprobe = args.ef, args.nprobe
    t0 = time.perf_counter()
    float(vecs.sum(dtype=np.float32))
    scan_floor_ms = (time.perf_counter() - t0) * 1e3

    live_phase = _concurrent(args, index, vecs, ids, queries)
    cat = live_phase.pop("catalog")
    final_truth = topk_rows(cat.ids[:cat.high], cat.vecs[:cat.high], cat.live[:cat.high],
                            queries[:args.recall_queries], args.k)[0]
    recall_after = _recall([index.topk(q, args.k)[0] for q in queries[:args.recall_queries]], final_truth)

    static_p50, static_p99 = _pcts(ann_t)
    raw_p50, _ = _pcts(raw_t)
    exact_p50, exact_p99 = _pcts(exact_t[best_exact])
    graph_bytes = int(graph.memory_usage)
    params = ({"nlist": graph.nlist, "nprobe": index.nprobe(), "rerank": args.rerank} if ivf else
              {"ef": args.ef, "connectivity": args.connectivity, "expansion_add": args.expansion_add})
    params["update_chunk"] = cfg.update_chunk
    result = {
        "bench": "retrieval", "items": args.items, "dim": args.dim, "k": args.k,
        "library": "faiss" if ivf else "usearch", "index": args.index, **params, "catalog": catalog,
        "build_s": round(build_s, 1),
        "recall_at_100": round(recall, 4), "recall_at_100_after_updates": round(recall_after, 4),
        **live_phase,
        "static_query_p50_ms": round(static_p50, 3), "static_query_p99_ms": round(static_p99, 3),
        "baseline_exact_p50_ms": round(exact_p50, 2), "baseline_exact_p99_ms": round(exact_p99, 2),
        "baseline_exact": best_exact,
        "baseline_exact_variants_p50_ms": {n: round(v, 2) for n, v in exact_p50s.items()},
        "speedup_vs_exact": round(exact_p50 / static_p50, 1),
        "index_bytes_per_item": round(index.memory_bytes() / len(index), 1),
        "graph_bytes_per_item": round(graph_bytes / len(index), 1),
        "exact_scan_floor_ms": round(scan_floor_ms, 2),
        **({f"{knob}_sweep": sweep} if sweep else {}),
        "threads_exact": exact_fns[best_exact][0], "cpus": os.cpu_count(),
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
    }
    index.stop()
    note = ("faiss's own search on the same lists and queries (nprobe, k alike), called directly without the "
            "index's lock, validation and float32 rescoring" if ivf else
            "usearch's own search on the same static graph and queries (ef, k alike), called directly "
            "without the index's lock, validation and conversion")
    note += (": per-query p50; fraction = ceiling / "
            "static_query_p50_ms. exact_scan_floor_ms: one memory-bound read of every vector, the floor "
            "under any exact scan")
    return with_ceiling(result, Ceiling(raw_p50, "ms per query", note, measured=static_p50, lower_is_better=True),
                        named="ceiling_ms_per_query")


def _concurrent(args: argparse.Namespace, index: AnnIndex, vecs: np.ndarray, ids: np.ndarray,
                queries: np.ndarray) -> dict:
    """Queries in a closed loop on this thread while a thread applies the update stream."""
    rng = np.random.default_rng([args.seed, 7])
    extra = int(max(10_000, 10_000 * args.duration_s))  # room for new items (the stream stops when full)
    cat = _Catalog(ids, vecs, extra)
    stop = threading.Event()
    applied, visible, missed = [0], [], [0]
    next_id = [int(ids.max()) + 2]

    def updates() -> None:
        draw = 2
        while not stop.is_set() and cat.high + args.update_batch < cat.ids.size:
            fresh = args.draw(args.update_batch, draw)
            draw += 1
            t_arrive = time.perf_counter()
            up_ids, up_vecs, del_ids, probe_id, probe_vec = cat.next_batch(rng, args.update_batch, fresh, next_id[0])
            next_id[0] += args.update_batch
            index.upsert(up_ids, up_vecs)
            index.remove(del_ids)
            applied[0] += up_ids.size + del_ids.size
            # visibility: the new item's own vector as the query, right after the upsert returned
            # (it is synchronous; a later query sees the same graph, so polling would not help)
            if probe_id in index.topk(probe_vec, args.k)[0]:
                visible.append(time.perf_counter() - t_arrive)
            elif probe_id in index.exact_topk(probe_vec[None], args.k)[0][0]:
                missed[0] += 1  # an approximate miss (recall), not staleness

    lat: list[float] = []
    th = threading.Thread(target=updates, name="bench-updates", daemon=True)
    t_start = time.perf_counter()
    th.start()
    i = 0
    while time.perf_counter() - t_start < args.duration_s:
        q = queries[i % len(queries)]
        t = time.perf_counter()
        index.topk(q, args.k)
        lat.append(time.perf_counter() - t)
        i += 1
    stop.set()
    th.join()
    elapsed = time.perf_counter() - t_start
    p50, p99 = _pcts(lat)
    v50, v99 = _pcts(visible)
    probes = len(visible) + missed[0]
    return {"query_p50_ms": round(p50, 3), "query_p99_ms": round(p99, 3),
            "queries_per_s_during_updates": round(len(lat) / elapsed, 1),
            "updates_per_s": round(applied[0] / elapsed, 1), "updates_applied": applied[0],
            "insert_to_visible_p50_ms": round(v50, 2), "insert_to_visible_p99_ms": round(v99, 2),
            "insert_visible_fraction": round(len(visible) / probes, 4) if probes else None,
            "catalog": cat}
