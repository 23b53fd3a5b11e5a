"""The faults of a chaos run (:mod:`headwater.chaos.run`): ``kill -9`` a process and restart it,
kill the trainer in the middle of a checkpoint write, or take the broker down and up; each
measures how long the pipeline took to process again."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field

from headwater.chaos.accounting import TrainedLineage
from headwater.chaos.cluster import Cluster

__all__ = ["PROCESS_FAULTS", "REBALANCE_FAULT", "FaultResult", "rebalance_fault", "broker_fault", "checkpoint_fault", "count_duplicates",
           "process_fault"]

PROCESS_FAULTS = ("joiner", "trainer", "serving")
REBALANCE_FAULT = "joiner-rebalance"


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
    lost: int = -1  # input events lost in the run this fault was part of (its own log's too)
    failed_calls: int = -1  # Recommend calls no replica answered, fault -> settle
    reranked_calls: int = -1  # rerank calls the LLM reordered, fault -> settle (-1: no rerank load)
    degraded_calls: int = -1  # rerank calls answered in DLRM order (answered, not failed), same


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


def rebalance_fault(cl: Cluster) -> FaultResult:
    """kill -9 one of the joiners and keep it down: the group hands its input partitions to the
    others, which rebuild those partitions' pending requests from the input (the run's ledger
    then shows nothing lost, nothing trained twice); then it rejoins and they split again."""
    names = [n for n in cl.joiner_names if n in cl.sup.children]
    if len(names) < 2:
        raise ValueError(f"{REBALANCE_FAULT} needs two joiners or more (--joiners)")
    victim, survivor = names[-1], names[0]
    res = FaultResult(REBALANCE_FAULT)
    before = dict(cl.crashes)
    every = 2 * cl.input_partitions  # impressions and actions
    rebuilds = cl.metric(survivor, "hw_stream_joiner_rebuilds_total") or 0
    res.detail["victim_partitions"] = cl.metric(victim, "hw_stream_assigned_partitions")
    t_kill = time.monotonic()
    cl.kill9(victim)
    spec = cl.sup.children.pop(victim).spec
    took = cl.wait("the other joiners to own every input partition", lambda: (
        (cl.metric(survivor, "hw_stream_joiner_rebuilds_total") or 0) > rebuilds
        and cl.joiners_metric("hw_stream_assigned_partitions") == every), cl.cfg.recovery_timeout_s)
    res.detail["taken_over_s"] = round(time.monotonic() - t_kill, 2)
    res.detail["survivors_partitions"] = cl.joiners_metric("hw_stream_assigned_partitions")
    t_restart = time.monotonic()
    cl.sup.start(spec)
    back = cl.wait(f"{victim} to rejoin", lambda: (
        (cl.metric(victim, "hw_stream_assigned_partitions") or 0) > 0
        and (cl.metric(victim, "hw_stream_events_in_total") or 0) > 0), cl.cfg.recovery_timeout_s)
    now = time.monotonic()
    res.downtime_s, res.recovery_s = round(now - t_kill, 2), round(now - t_restart, 2)
    res.survived = took and back and res.detail["victim_partitions"] not in (None, 0)
    res.crashes = {k: v - before.get(k, 0) for k, v in cl.crashes.items() if v != before.get(k, 0)}
    return res


def checkpoint_fault(cl: Cluster) -> FaultResult:
    """kill -9 the trainer between its checkpoint's table and its manifest, then restart it.

    The kill point (:mod:`headwater.chaos.killpoint`) is armed by SIGUSR2 and fires inside the
    next checkpoint write. Survived when the kill landed there (a table written, no manifest
    for it), the restarted trainer trains again, and it restarted from the last complete
    checkpoint's own table: ``rows_retrained`` counts the examples whose updates the table it
    read already held and which it trains again (the older in-place table: all those since the
    manifest), and is added to ``duplicates_trained``.
    """
    from training.checkpoint import CheckpointStore

    res = FaultResult("trainer-checkpoint")
    before = dict(cl.crashes)
    store, note_path = CheckpointStore(cl.root / "trainer"), cl.killpoint_note
    note_path.unlink(missing_ok=True)
    child = cl.sup.children.pop("trainer")  # its death is the fault's, not a crash to restart
    t_arm = time.monotonic()
    os.kill(child.proc.pid, signal.SIGUSR2)
    # The next checkpoint is at most one interval away (the guard may skip one while holding).
    died = cl.wait("the trainer to die in a checkpoint write", lambda: child.proc.poll() is not None,
                   cl.cfg.recovery_timeout_s)
    if not died:  # the kill point never fired: do it the plain way, and fail the fault
        os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
    t_kill = time.monotonic()
    res.detail["armed_to_kill_s"] = round(t_kill - t_arm, 2)
    res.detail["exit"] = child.proc.returncode
    note = json.loads(note_path.read_text()) if note_path.exists() else {}
    manifest = store.latest()
    written = cl.root / "trainer" / note["table_dir"] if note else None
    read = store.table_path_of(manifest) if manifest is not None else None
    # Landed mid-write: the killed write's table is on disk and no manifest names it.
    landed = bool(note) and written.is_dir() and manifest is not None and manifest.seq < note["seq"]
    res.detail["killed_in_checkpoint"] = note.get("seq", -1)
    res.detail["resumed_from_checkpoint"] = manifest.seq if manifest is not None else -1
    res.detail["kill_landed_mid_write"] = landed
    retrained = 0
    if landed and read == written:  # the restart reads a table ahead of its manifest
        retrained = int(note["examples_trained"]) - int(manifest.examples_trained)
    res.detail["rows_retrained"] = retrained
    t_restart = time.monotonic()
    cl.sup.start(child.spec)
    ok = cl.wait("trainer to process", processing(cl, "trainer", t_restart), cl.cfg.recovery_timeout_s)
    now = time.monotonic()
    res.downtime_s, res.recovery_s = round(now - t_kill, 2), round(now - t_restart, 2)
    res.survived = ok and died and landed and retrained == 0
    res.crashes = {k: v - before.get(k, 0) for k, v in cl.crashes.items() if v != before.get(k, 0)}
    return res


def broker_fault(cl: Cluster, name: str = "broker") -> FaultResult:
    res = FaultResult(name)
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
    res.duplicates_trained = (after.duplicates_trained - before.duplicates_trained
                              + int(res.detail.get("rows_retrained", 0)))
