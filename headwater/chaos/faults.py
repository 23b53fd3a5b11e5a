"""The faults of a chaos run (:mod:`headwater.chaos.run`): ``kill -9`` a process and restart it, or
take the broker down and up; each measures how long the pipeline took to process again."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from headwater.chaos.accounting import TrainedLineage
from headwater.chaos.cluster import Cluster

__all__ = ["PROCESS_FAULTS", "FaultResult", "broker_fault", "count_duplicates", "process_fault"]

PROCESS_FAULTS = ("joiner", "trainer", "serving")


@dataclass
class FaultResult:
    """What one injected fault did and how long the system took to get over it."""

    fault: str
    survived: bool = False
    downtime_s: float = -1.0  # kill -> processing again
    recovery_s: float = -1.0  # restart -> processing again
    crashes: dict[str, int] = field(default_factory=dict)  # other components that died meanwhile
    detail: dict = field(default_factory=dict)
    duplicates_skipped: int = -1  # copies the trainer dropped, kill -> settle (-1: not measured)
    duplicates_trained: int = -1  # examples learned twice, kill -> settle (-1: not measured)


def processing(cl: Cluster, name: str, since: float):
    """The 'processing again' test of a restarted component."""
    if name == "joiner":
        return lambda: (cl.metric("joiner", "hw_stream_events_in_total") or 0) > 0
    if name == "trainer":
        return lambda: (cl.metric("trainer", "hw_train_examples_total") or 0) > 0
    target = f"127.0.0.1:{cl.ports['grpc-' + name[-1]]}"
    return lambda: cl.load.last_ok[target] > since


def process_fault(cl: Cluster, fault: str) -> FaultResult:
    name = "serving-a" if fault == "serving" else fault
    res = FaultResult(fault)
    before = dict(cl.crashes)
    if fault == "trainer":  # the signal must come from the fault, not be on already
        res.detail["serving_degraded_before_kill"] = any(
            (cl.metric(s, "hw_serve_degraded") or 0) > 0 for s in ("serving-a", "serving-b"))
    t_kill = time.monotonic()
    cl.kill9(name)
    spec = cl.sup.children.pop(name).spec
    if fault == "trainer":  # keep it down until serving says its model went stale
        seen = cl.wait("degraded", lambda: any(
            (cl.metric(s, "hw_serve_degraded") or 0) > 0 for s in ("serving-a", "serving-b")),
            cl.cfg.stale_after_s + 20)
        res.detail["serving_degraded_while_down"] = seen
        res.detail["held_down_s"] = round(time.monotonic() - t_kill, 2)
    t_restart = time.monotonic()
    cl.sup.start(spec)
    ok = cl.wait(f"{name} to process", processing(cl, name, t_restart), cl.cfg.recovery_timeout_s)
    now = time.monotonic()
    res.downtime_s, res.recovery_s = round(now - t_kill, 2), round(now - t_restart, 2)
    if fault == "trainer":
        fresh = cl.wait("fresh params", lambda: all(
            cl.metric(s, "hw_serve_degraded") == 0 for s in ("serving-a", "serving-b")),
            cl.cfg.recovery_timeout_s)
        res.detail["serving_fresh_after_recovery"] = fresh
        # (degraded_before_kill is reported, not required: a trainer lagging under load is stale too)
        ok = ok and seen and fresh
    res.survived = ok
    res.crashes = {k: v - before.get(k, 0) for k, v in cl.crashes.items() if v != before.get(k, 0)}
    return res


def broker_fault(cl: Cluster) -> FaultResult:
    res = FaultResult("broker")
    before = dict(cl.crashes)
    t_kill = time.monotonic()
    cl.broker.kill()
    cl.sleep(cl.cfg.broker_down_s)
    t_restart = time.monotonic()
    cl.broker.start()
    base = {n: cl.metric(n, s) or 0 for n, s in (("joiner", "hw_stream_events_in_total"),
                                                 ("trainer", "hw_train_examples_total"))}

    back: dict[str, float] = {}

    def flowing() -> bool:
        for name, sample in (("joiner", "hw_stream_events_in_total"), ("trainer", "hw_train_examples_total")):
            v = cl.metric(name, sample)
            # A component restarted meanwhile starts its counters from zero: any progress counts.
            if name not in back and v and (v > base[name] or cl.crashes.get(name, 0) > before.get(name, 0)):
                back[name] = round(time.monotonic() - t_restart, 2)
        return len(back) == 2

    ok = cl.wait("pipeline after broker restart", flowing, cl.cfg.recovery_timeout_s)
    now = time.monotonic()
    res.downtime_s, res.recovery_s = round(now - t_kill, 2), round(now - t_restart, 2)
    res.survived = ok
    res.detail["down_s"] = round(t_restart - t_kill, 2)
    res.detail["storage"] = cl.broker.cfg.storage
    res.detail["progress_after_restart_s"] = back  # per consumer: restart -> its first progress
    res.crashes = {k: v - before.get(k, 0) for k, v in cl.crashes.items() if v != before.get(k, 0)}
    return res


def count_duplicates(res: FaultResult, before: TrainedLineage | None,
                      after: TrainedLineage | None) -> None:
    """The fault's share of the trainer's duplicate figures (both read from its checkpoints)."""
    if after is None:
        return
    before = before or TrainedLineage()
    res.duplicates_skipped = after.duplicates_skipped - before.duplicates_skipped
    res.duplicates_trained = after.duplicates_trained - before.duplicates_trained
