"""Picks the ANN library of serving.ann_index by measurement: usearch vs faiss-cpu HNSW.

Run it in a scratch environment that has both (only the winner is a project dependency):

    python3 -m venv /tmp/annlab && /tmp/annlab/bin/pip install numpy usearch==2.26.6 faiss-cpu==1.15.1
    /tmp/annlab/bin/python scripts/ann_compare.py --items 1000000

Same catalog as ``headwater bench retrieval`` (a mixture of clusters with popularity-like norms,
dim 64, float32, inner product), same graph degree (M=16) and construction depth (128) for both,
2 threads to build, 1 thread per query (a serving request). For each library: build seconds,
recall@100 vs exact and single-query p50/p99 at k=100 for a few search depths, the cost of adding,
replacing and removing items on the built index (or why it cannot), resident bytes per item, and
save/load. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def catalog(n: int, dim: int, seed: int, draw: int, clusters: int = 1024) -> np.ndarray:
    """The formula of bench.retrieval.synthetic_vectors: Gaussian clusters (centres fixed by
    ``seed``) plus unit noise, directions normalised, norms log-normal (sigma 0.25, popularity-like);
    ``draw`` picks an independent sample (catalog 0, queries 1, later updates 2, ...)."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng([seed, draw])
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v += centres[rng.integers(0, clusters, n)]
    v *= (rng.lognormal(0.0, 0.25, n) / np.linalg.norm(v, axis=1)).astype(np.float32)[:, None]
    return v


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = []
    for i in range(0, len(q), 64):
        s = q[i:i + 64] @ x.T
        out.append(np.argpartition(-s, k, axis=1)[:, :k])
    return np.concatenate(out)


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f, t).size / t.size for f, t in zip(found, truth)]))


def lat(fn, qs: np.ndarray) -> tuple[float, float, list[np.ndarray]]:
    times, res = [], []
    for q in qs:
        t0 = time.perf_counter()
        res.append(fn(q))
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), res


def bench_usearch(x, keys, qs, truth, efs, k, upd) -> dict:
    from usearch.index import Index

    r0 = rss()
    idx = Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=128)
    t0 = time.perf_counter()
    idx.add(keys, x, threads=2)
    out: dict = {"build_s": round(time.perf_counter() - t0, 1)}
    out["rss_bytes_per_item"] = round((rss() - r0) / len(x), 1)
    out["memory_usage_bytes_per_item"] = round(idx.memory_usage / len(x), 1)
    pts = []
    for ef in efs:
        idx.expansion_search = ef
        p50, p99, res = lat(lambda q: idx.search(q, k, threads=1).keys, qs)
        pts.append({"ef": ef, "recall_at_100": round(recall(res, truth), 4), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)})
    out["search"] = pts
    rng = np.random.default_rng(1)
    new = catalog(upd, x.shape[1], 0, 2)
    new_keys = np.arange(len(x), len(x) + upd, dtype=np.uint64)
    t0 = time.perf_counter()
    idx.add(new_keys, new, threads=1)
    out["add_us_per_item"] = round((time.perf_counter() - t0) / upd * 1e6, 1)
    chg = rng.choice(len(x), upd, replace=False).astype(np.uint64)
    t0 = time.perf_counter()
    idx.remove(chg)
    idx.add(chg, x[chg.astype(np.int64)] * 0.5, threads=1)
    out["replace_us_per_item"] = round((time.perf_counter() - t0) / upd * 1e6, 1)
    t0 = time.perf_counter()
    idx.remove(new_keys)
    out["remove_us_per_item"] = round((time.perf_counter() - t0) / upd * 1e6, 1)
    out["incremental"] = "add, remove (tombstone, slot reused by later adds), replace = remove + add; all in place"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "u.usearch")
        t0 = time.perf_counter()
        idx.save(p)
        out["save_s"] = round(time.perf_counter() - t0, 2)
        out["file_bytes_per_item"] = round(os.path.getsize(p) / len(idx), 1)
        t0 = time.perf_counter()
        Index.restore(p)
        out["load_s"] = round(time.perf_counter() - t0, 2)
    return out


def bench_faiss(x, keys, qs, truth, efs, k, upd) -> dict:
    import faiss

    faiss.omp_set_num_threads(2)
    r0 = rss()
    base = faiss.IndexHNSWFlat(x.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    base.hnsw.efConstruction = 128
    idx = faiss.IndexIDMap2(base)
    t0 = time.perf_counter()
    idx.add_with_ids(x, keys.astype(np.int64))
    out: dict = {"build_s": round(time.perf_counter() - t0, 1)}
    out["rss_bytes_per_item"] = round((rss() - r0) / len(x), 1)
    faiss.omp_set_num_threads(1)
    pts = []
    for ef in efs:
        base.hnsw.efSearch = ef
        p50, p99, res = lat(lambda q: idx.search(q[None], k)[1][0], qs)
        pts.append({"ef": ef, "recall_at_100": round(recall(res, truth), 4), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)})
    out["search"] = pts
    new = catalog(upd, x.shape[1], 0, 2)
    t0 = time.perf_counter()
    idx.add_with_ids(new, np.arange(len(x), len(x) + upd, dtype=np.int64))
    out["add_us_per_item"] = round((time.perf_counter() - t0) / upd * 1e6, 1)
    try:
        idx.remove_ids(np.arange(len(x), len(x) + upd, dtype=np.int64))
        out["remove"] = "ok"
    except RuntimeError as e:
        out["remove"] = f"unsupported: {str(e).splitlines()[-1][:120]}"
    out["incremental"] = ("add only; HNSW cannot remove or replace: a deleted/changed item stays in the graph "
                          "(search-time IDSelector to hide it, re-add under a new internal id), so the graph "
                          "only grows until a rebuild")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.faiss")
        t0 = time.perf_counter()
        faiss.write_index(idx, p)
        out["save_s"] = round(time.perf_counter() - t0, 2)
        out["file_bytes_per_item"] = round(os.path.getsize(p) / idx.ntotal, 1)
        t0 = time.perf_counter()
        faiss.read_index(p)
        out["load_s"] = round(time.perf_counter() - t0, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--updates", type=int, default=10_000)
    p.add_argument("--efs", default="128,256,512,1024")
    p.add_argument("--only", default="usearch,faiss")
    a = p.parse_args()
    k = 100
    x = catalog(a.items, a.dim, 0, 0)
    keys = np.arange(a.items, dtype=np.uint64)
    qs = catalog(a.queries, a.dim, 0, 1)  # held-out draws of the same distribution
    t0 = time.perf_counter()
    truth = exact_topk(x, qs, k)
    exact_ms = (time.perf_counter() - t0) / a.queries * 1e3
    efs = [int(e) for e in a.efs.split(",")]
    res: dict = {"items": a.items, "dim": a.dim, "k": k, "exact_numpy_ms_per_query_batched64": round(exact_ms, 2)}
    for name in a.only.split(","):
        res[name] = (bench_usearch if name == "usearch" else bench_faiss)(x, keys, qs, truth, efs, k, a.updates)
        print(json.dumps({name: res[name]}), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
