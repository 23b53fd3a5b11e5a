"""Prometheus metrics of the LLM HTTP server (module level, so a second app never re-registers)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("hw_llm_http_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
REJECTED = Counter("hw_llm_http_rejected_total", "requests refused by admission control (429)")
IN_FLIGHT = Gauge("hw_llm_http_in_flight", "requests admitted and not yet answered")
QUEUE_DEPTH = Gauge("hw_llm_queue_depth", "engine requests waiting to be scheduled")
RUNNING = Gauge("hw_llm_running", "engine requests running")
KV_USAGE = Gauge("hw_llm_kv_usage", "fraction of KV blocks in use")
PREFIX_MISMATCHES = Gauge("hw_llm_prefix_cache_mismatches",
                          "prefix-cache digests that matched a block whose tokens or prefix did not "
                          "(treated as misses; nonzero means hash collisions)")
PREFIX_HIT_RATE = Gauge("hw_llm_prefix_cache_hit_rate", "fraction of prompt tokens served from the prefix cache")
SPEC_ACCEPTANCE = Gauge("hw_llm_spec_acceptance_rate", "fraction of draft tokens accepted")
TTFT = Histogram("hw_llm_time_to_first_token_seconds", "request arrival to first output token", buckets=_LATENCY_BUCKETS)
ITL = Histogram("hw_llm_inter_token_latency_seconds", "time between output tokens of one request", buckets=_LATENCY_BUCKETS)
RANK_LATENCY = Histogram("hw_llm_rank_seconds", "time to answer a /v1/rank call", buckets=_LATENCY_BUCKETS)
RANK_CANDIDATES = Counter("hw_llm_rank_candidates_total", "candidates scored by /v1/rank")
PROMPT_TOKENS = Counter("hw_llm_prompt_tokens_total", "prompt tokens processed")
OUTPUT_TOKENS = Counter("hw_llm_output_tokens_total", "output tokens generated")
