"""Serving's Prometheus metrics (module level, so two servers in one process share series).

Under ``headwater serve --processes N`` (prometheus_client's multiprocess mode) counters and
histograms are summed over the processes, and each gauge says how its values combine: the
oldest model version, the worst lag and age, the total queue.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["REQUESTS", "LATENCY", "BATCH_ROWS", "BATCH_REQUESTS", "MODEL_VERSION", "FRESHNESS_LAG", "END_TO_END",
           "QUEUE_JOBS", "PARAMS_AGE", "DEGRADED", "RERANK_CALLS", "RERANK_DEGRADED", "RERANK_SECONDS",
           "RERANK_SKIPPED", "RERANK_PREFIX_HIT", "RERANK_TUNED_WEIGHT", "RERANK_TUNING_OUTCOMES", "HISTORY_USERS", "HISTORY_EVENTS", "ITEM_TEXTS",
           "ITEM_TEXT_EVICTIONS", "ITEM_TEXT_REJECTED", "GATE_HELD", "ANN_REBUILDS", "ANN_LOAD_FAILURES",
           "ANN_GRAPH_UPDATES", "ANN_ITEMS", "RETRIEVALS"]

_MS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075,
       0.1, 0.25, 0.5, 1.0, 2.5)
REQUESTS = Counter("hw_serve_requests", "gRPC calls by method and status code", ["method", "code"])
LATENCY = Histogram("hw_serve_latency_seconds", "gRPC call latency in the server", ["method"], buckets=_MS)
BATCH_ROWS = Histogram("hw_serve_batch_rows", "rows (candidates) per model forward",
                       buckets=(1, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800))
BATCH_REQUESTS = Histogram("hw_serve_batch_requests", "calls merged into one model forward",
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128))
MODEL_VERSION = Gauge("hw_serve_model_version", "table version of the served replica",
                      multiprocess_mode="livemin")
FRESHNESS_LAG = Gauge("hw_serve_freshness_lag_seconds", "now minus the watermark of the newest applied update",
                      multiprocess_mode="livemax")
END_TO_END = Gauge("hw_serve_end_to_end_seconds", "end-to-end freshness: p50 / p99 over the last 10 min of "
                   "once-a-second samples of hw_serve_freshness_lag_seconds (serving.end_to_end)",
                   ["quantile"], multiprocess_mode="livemax")
QUEUE_JOBS = Gauge("hw_serve_queue_jobs", "calls waiting for the micro-batcher", multiprocess_mode="livesum")
PARAMS_AGE = Gauge("hw_serve_params_age_seconds", "seconds since the last hw.params update was applied",
                   multiprocess_mode="livemax")
DEGRADED = Gauge("hw_serve_degraded", "1 while the model is stale (no hw.params update within stale_after_s); "
                 "serving goes on with the stale model", multiprocess_mode="livemax")

# -- the LLM rerank stage (serving.rerank) and what it reads ----------------------------------
RERANK_CALLS = Counter("hw_serve_rerank_calls", "Recommend calls whose top candidates the LLM reranked")
RERANK_DEGRADED = Counter("hw_serve_rerank_degraded", "Recommend calls answered in DLRM order because the "
                          "rerank could not finish (reason: deadline, llm_error, too_long, no_text)", ["reason"])
RERANK_SECONDS = Histogram("hw_serve_rerank_seconds", "LLM time of one rerank (submit to scores)",
                           buckets=_MS + (5.0,))
RERANK_SKIPPED = Counter("hw_serve_rerank_skipped_items", "items left out of a rerank prompt for want of "
                         "text (where: history, candidate)", ["where"])
RERANK_PREFIX_HIT = Gauge("hw_serve_rerank_prefix_hit_rate", "share of rerank context tokens found in the "
                          "LLM's prefix cache (since start)", multiprocess_mode="livemin")
RERANK_TUNED_WEIGHT = Gauge("hw_serve_rerank_tuned_weight", "weight of the LLM in the rerank's blend, as "
                            "served to calls that do not set one (serving.rerank_tuning; rerank_weight "
                            "until enough outcomes, or with tuning off)", multiprocess_mode="livemax")
RERANK_TUNING_OUTCOMES = Counter("hw_serve_rerank_tuning_outcomes", "clicks on reranked items within the "
                                 "tuning horizon of their call, each replayed under every blend weight")
HISTORY_USERS = Gauge("hw_serve_history_users", "users with a live interaction history in serving",
                      multiprocess_mode="livesum")
HISTORY_EVENTS = Counter("hw_serve_history_events", "interactions applied to the live user history")
ITEM_TEXTS = Gauge("hw_serve_item_texts", "item texts held for the rerank stage", multiprocess_mode="livemax")
ITEM_TEXT_EVICTIONS = Counter("hw_serve_item_text_evictions", "item texts evicted (least recently used)")
ITEM_TEXT_REJECTED = Counter("hw_serve_item_text_rejected", "item catalog rows refused (no id or no text)")
GATE_HELD = Counter("hw_serve_llm_gate_held_seconds", "time LLM steps waited for DLRM scoring to drain")

# -- the ANN item index (serving.ann_index) ---------------------------------------------------
ANN_REBUILDS = Counter("hw_serve_ann_rebuilds", "background rebuilds of the ANN item index swapped in "
                       "(reason: churn, recall, manual, load)", ["reason"])
ANN_LOAD_FAILURES = Counter("hw_serve_ann_load_failures", "saved ANN indexes that failed to load and were "
                            "rebuilt from the vectors (reason: missing, checksum, format, vectors)", ["reason"])
ANN_GRAPH_UPDATES = Counter("hw_serve_ann_graph_updates", "items added to or replaced in the ANN graph one by "
                            "one from the replica's deltas (builds and loads not counted)")
ANN_ITEMS = Gauge("hw_serve_ann_items", "items in the ANN item index", multiprocess_mode="livemax")
RETRIEVALS = Counter("hw_serve_retrievals", "Recommend calls without candidates by the stage that produced them "
                     "(source: ann, exact)", ["source"])
