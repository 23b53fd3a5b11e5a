"""``headwater serve``'s typed configuration (the CLI turns each field into a flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    """How the gRPC recommender listens, batches, retrieves and calibrates."""

    role: str = field(default="all", metadata={"help": "all (replica + API in one process), ps (one parameter-server shard, --shard i/N) or recommender (API over --ps shards)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind (loopback unless told otherwise)"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    processes: int = field(default=1, metadata={"help": "serving processes sharing the port (SO_REUSEPORT, Linux): one Python process tops out near one core, so use about one per core; each holds its own replica (role all) or is a front end over the --ps fleet (role recommender)"})
    reuse_port: bool = field(default=False, metadata={"help": "let other processes bind the same port (set for the processes --processes starts)"})
    auth_token: str = field(default="", metadata={"help": "require 'authorization: Bearer TOKEN' metadata (empty = no auth)"})
    workers: int = field(default=64, metadata={"help": "gRPC handler threads"})
    max_concurrent_rpcs: int = field(default=1024, metadata={"help": "calls in flight beyond this get RESOURCE_EXHAUSTED"})
    batching: bool = field(default=True, metadata={"help": "micro-batch concurrent Recommend calls into one forward"})
    max_batch_rows: int = field(default=8192, metadata={"help": "row (candidate) budget of one model forward"})
    max_wait_ms: float = field(default=0.5, metadata={"help": "longest a call may wait for others to share its forward (it waits only while fewer calls are queued than the previous batch had)"})
    max_queue: int = field(default=256, metadata={"help": "calls waiting for a forward; beyond: RESOURCE_EXHAUSTED"})
    negative_sample_rate: float = field(default=1.0, metadata={"help": "negative downsampling rate the model was fitted on UNWEIGHTED (log-odds shift log(r)); 1 = none (the trainer's weighted loss)"})
    user_slot: str = field(default="user_id", metadata={"help": "slot that receives the request's user_id"})
    item_slot: str = field(default="item_id", metadata={"help": "slot of candidate items (and retrieval)"})
    retrieve_k: int = field(default=200, metadata={"help": "items retrieved by dot product before ranking when no candidates are given (a call may ask for up to 1000: retrieve_k)"})
    retrieval: str = field(default="auto", metadata={"help": "how Recommend without candidates finds them: ann (an HNSW index fed from the replica's deltas, saved with the replica's state), exact (a scan of every item row), or auto (ann once the item slot holds ann_min_items rows, exact below)"})
    ann_index: str = field(default="ivf_sq8", metadata={"help": "the ANN index of retrieval ann/auto: ivf_sq8 (faiss inverted lists of 8-bit codes, rescored exactly; 1M dim-64 items build in ~35 s, recall@100 0.97 at ~2 ms) or hnsw (usearch graph; ~25 min to build 1M on 2 cores)"})
    ann_min_items: int = field(default=250_000, metadata={"help": "retrieval auto: item rows from which the ANN index is built and used; below, an exact scan is as fast (200k dim-64 items: scan p50 4.1 ms, index 5.1 ms at ef 768 on 2 cores) and exact"})
    default_top_k: int = field(default=10, metadata={"help": "items returned after retrieval when top_k is 0"})
    precision: str = field(default="auto", metadata={"help": "tower matmuls: float32, bfloat16, or auto (bfloat16 where the CPU has native bf16)"})
    torch_threads: int = field(default=1, metadata={"help": "torch intra-op threads (0 = torch's default); 1 by default: idle OpenMP workers spin and starve the gRPC threads on small boxes"})
    stale_after_s: float = field(default=30.0, metadata={"help": "report degraded (hw_serve_degraded=1; gRPC health stays SERVING with the stale model) when no hw.params update arrived for this long"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0 = off)"})
    items: bool = field(default=True, metadata={"help": "follow hw.items (item-side features per item) so Recommend fills each candidate's item-side slots and dense tail from it"})
    recent_items: int = field(default=0, metadata={"help": "for a model with a recent_items slot (a log's schema recent_items = N; give the same N): a Recommend call that does not send the slot gets the user's last N interactions from a live history of hw.actions (0 = off: callers send it)"})
    max_catalog_items: int = field(default=1_000_000, metadata={"help": "items the hw.items catalog holds; beyond, the least recently used are evicted (hw_serve_item_catalog_evictions_total)"})

    def validate(self) -> None:
        if self.role not in ("all", "ps", "recommender"):
            raise ValueError(f"role must be all, ps or recommender, got {self.role!r}")
        if not 0 < self.negative_sample_rate <= 1:
            raise ValueError("negative_sample_rate must be in (0, 1]")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be auto, float32 or bfloat16, got {self.precision!r}")
        if self.max_batch_rows <= 0 or self.max_queue <= 0 or self.workers <= 0:
            raise ValueError("max_batch_rows, max_queue and workers must be positive")
        if self.retrieval not in ("auto", "ann", "exact"):
            raise ValueError(f"retrieval must be auto, ann or exact, got {self.retrieval!r}")
        if self.ann_index not in ("ivf_sq8", "hnsw"):
            raise ValueError(f"ann_index must be ivf_sq8 or hnsw, got {self.ann_index!r}")
        if self.retrieve_k <= 0 or self.ann_min_items < 0:
            raise ValueError("retrieve_k must be positive and ann_min_items not negative")
        if not 0 <= self.recent_items <= 64:
            raise ValueError(f"recent_items must be in [0, 64] (the live history keeps 64 per user), got {self.recent_items}")
        if self.max_catalog_items <= 0:
            raise ValueError(f"max_catalog_items must be positive, got {self.max_catalog_items}")
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if self.processes > 1 and self.role == "ps":
            raise ValueError("--role ps serves one shard per process; run more shards instead of --processes")
