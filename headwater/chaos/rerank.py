"""The ``serving-rerank`` fault of a chaos run (:mod:`headwater.chaos.run`): a serving replica
with the LLM in its process (``headwater serve --llm``) is killed with ``kill -9`` while the load
asks it for reranks, and restarted (issue 18, item 5).

When the run has this fault, :func:`attach_llm` gives both serving replicas the LLM before the
cluster starts: a random Llama-style model (no download; as the demo does without SmolLM2) and
the generator world's item catalog as the texts the rerank reads, the rerank off by default
(``--rerank-top-n 0``) and on for the calls that ask for it: every ``rerank_every``-th call of
the failover load. The LLM can only degrade a call's order, never fail it: a rerank later than
``rerank_deadline_ms`` is answered in DLRM order (``degraded``), and a replica that dies under a
call leaves that call to the other replica, as in the plain ``serving`` fault.

The fault waits until the replica reranks, then until a rerank call is in flight to it, and
kills it then. Survived when that very call was answered (by the other replica: reranked or
degraded, both answers), the restarted replica answers again and reranks again. Per fault the
run reports ``reranked_calls`` and ``degraded_calls`` beside ``failed_calls``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from headwater.chaos.cluster import Cluster
from headwater.chaos.faults import FaultResult, processing
from headwater.chaos.load import CallOutcome, InFlight

log = logging.getLogger(__name__)

__all__ = ["RERANK_FAULT", "attach_llm", "rerank_fault"]

RERANK_FAULT = "serving-rerank"
KV_CACHE_BYTES = 32 << 20  # per replica: a tiny model's rerank needs a few hundred blocks at most
MIN_IN_FLIGHT_S = 0.005  # a call this long in flight has reached the replica (not still connecting)


def attach_llm(cl: Cluster) -> None:
    """Writes the model and the catalog into the run's folder and gives both serving replicas
    the LLM (call before :meth:`Cluster.start`)."""
    from headwater.demo.llm import serve_llm_args
    from llm_engine.random_model import build_random_llama
    from streams.generator_catalog import write_catalog

    if cl.cfg.rerank_every <= 0:
        raise ValueError(f"{RERANK_FAULT} needs a rerank load: rerank_every must be > 0")
    model = cl.root / "llm-random"
    if not (model / "config.json").exists():
        build_random_llama(model, seed=0, max_positions=2048)
    catalog = write_catalog(cl.gen, cl.root / "items.csv")
    args = serve_llm_args(model, -1, catalog)  # -1: no HTTP endpoints, the rerank only
    args[args.index("--rerank-deadline-ms") + 1] = str(cl.cfg.rerank_deadline_ms)
    cl.serving_args = [*args, "--kv-cache-bytes", str(KV_CACHE_BYTES)]
    cl.rerank_every = cl.cfg.rerank_every


def _rerank_in_flight(cl: Cluster, target: str, timeout_s: float) -> InFlight | None:
    """Waits (polling fast: a rerank takes milliseconds) for a rerank call that has been in
    flight to ``target`` for ``MIN_IN_FLIGHT_S``; None when none came within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen: InFlight | None = None
    since = 0.0
    while time.monotonic() < deadline:
        now = cl.load.in_flight
        if now is not None and now.rerank and now.target == target:
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since >= MIN_IN_FLIGHT_S:
                return now
        else:
            seen = None
        time.sleep(0.0005)
    return None


def _outcome(cl: Cluster, seq: int, timeout_s: float) -> CallOutcome | None:
    """How call ``seq`` ended, once it has (its failover may take a timeout)."""
    got: list[CallOutcome] = []

    def ended() -> bool:
        out = cl.load.outcome(seq)
        if out is not None:
            got.append(out)
        return out is not None

    cl.wait(None, ended, timeout_s, every_s=0.05)
    return got[0] if got else None


def rerank_fault(cl: Cluster) -> FaultResult:
    """``kill -9`` serving-a with a rerank call in flight to it, restart it, and check that the
    call was answered and the replica answers and reranks again."""
    res = FaultResult(RERANK_FAULT)
    before = dict(cl.crashes)
    name, target = "serving-a", f"127.0.0.1:{cl.ports['grpc-a']}"
    load, limit = cl.load, cl.cfg.recovery_timeout_s
    if load.rerank_every <= 0:
        raise RuntimeError(f"{RERANK_FAULT} needs the LLM on serving: call attach_llm before the cluster starts")
    t_ready = time.monotonic()
    reranking = cl.wait(f"{name} to rerank", lambda: load.last_reranked[target] > t_ready, limit)
    res.detail["reranking_before_kill"] = reranking
    call = _rerank_in_flight(cl, target, limit) if reranking else None
    t_kill = time.monotonic()
    cl.kill9(name)
    spec = cl.sup.children.pop(name).spec
    res.detail["rerank_in_flight_at_kill"] = call is not None
    ended = _outcome(cl, call.seq, load.rerank_timeout_s * len(load.targets) + 5) if call else None
    replicas = {f"127.0.0.1:{cl.ports['grpc-' + r]}": f"serving-{r}" for r in ("a", "b")}
    res.detail["killed_call"] = None if ended is None else {
        **asdict(ended), "answered_by": replicas.get(ended.answered_by, ended.answered_by)}
    t_restart = time.monotonic()
    cl.sup.start(spec)
    ok = cl.wait(f"{name} to answer", processing(cl, name, t_restart), limit)
    now = time.monotonic()
    res.downtime_s, res.recovery_s = round(now - t_kill, 2), round(now - t_restart, 2)
    again = ok and cl.wait(f"{name} to rerank again", lambda: load.last_reranked[target] > t_restart, limit)
    res.detail["reranked_after_restart_s"] = round(time.monotonic() - t_restart, 2) if again else -1.0
    answered = ended is not None and ended.answered_by != ""
    res.survived = bool(reranking and call is not None and answered and ok and again)
    res.crashes = {k: v - before.get(k, 0) for k, v in cl.crashes.items() if v != before.get(k, 0)}
    return res
