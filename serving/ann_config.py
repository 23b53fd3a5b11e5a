"""The ANN index's settings (:class:`serving.ann_index.AnnIndex`), one field per knob, each with
the measurement that chose its default."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AnnConfig", "RETRIEVAL_MODES"]

RETRIEVAL_MODES = ("hnsw", "ivf_sq8", "exact")


@dataclass(slots=True)
class AnnConfig:
    """The index's settings; ``retrieval`` is ``hnsw`` (usearch), ``ivf_sq8`` (faiss inverted
    file of 8-bit codes, exact rescoring) or ``exact`` (brute force)."""

    dim: int
    retrieval: str = "hnsw"
    # HNSW's M (links per node, 2M on the base layer): 32, not usearch's 16, because recall@100
    # on 1M clustered dim-64 items was 0.87 at ef 512 with 16 (100k: 0.936 vs 0.985 with 32)
    connectivity: int = 32
    expansion_add: int = 128  # efConstruction of a build
    expansion_add_live: int = 64  # ... of an insert on the hot path (half the cost; a rebuild restores)
    expansion_search: int = 768  # ef: the candidate list of a query, raised to k when k is larger
    max_k: int = 1000
    update_chunk: int = 1  # items per hold of the lock while updating: a query waits for at most
    # one insert, which costs about as much as a query (usearch shares one search context between
    # Python threads, so graph calls cannot overlap)
    writer_yield_s: float = 0.005  # longest an update chunk waits for queries to go first
    max_churn: float = 0.25  # (removed + replaced) since the last build / items then: rebuild
    min_probe_recall: float = 0.9  # recall@k of the probe queries against exact: below it, rebuild
    probe_queries: int = 16
    probe_k: int = 100
    build_threads: int = 1  # a background rebuild leaves the other cores to the queries
    # ivf_sq8: lists (0: the power of two nearest 2 sqrt(items), 2048 at 1M) and lists scanned per
    # query (0: 3/32 of them, or lists holding ivf_min_scan items when that is more; 1M clustered
    # items: recall@100 0.958 at 1/16, 0.973 at 3/32, 0.982 at 1/8; 200k: 0.937 at 1/8, 0.976 at 1/4)
    nlist: int = 0
    nprobe: int = 0
    ivf_min_scan: int = 50_000  # a small catalog's near neighbours spread over more of its lists
    rerank: int = 2  # candidates taken from the 8-bit codes per result, rescored in float32
    ivf_min_items: int = 1000  # fewer items: scan them (too few to train lists on)
    ivf_regrow: float = 2.0  # items / items at the last build at which the lists are rebuilt
    seed: int = 0

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval: must be one of {RETRIEVAL_MODES}, got {self.retrieval!r}")
        if self.dim <= 0 or self.max_k <= 0 or self.update_chunk <= 0 or self.rerank <= 0:
            raise ValueError("dim, max_k, update_chunk and rerank must be positive")
        if self.nlist < 0 or self.nprobe < 0:
            raise ValueError("nlist and nprobe must be >= 0 (0: chosen from the catalog)")
