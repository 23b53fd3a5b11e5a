"""The chaos run behind ``headwater bench chaos`` (:mod:`bench.chaos`): kill the pipeline's
processes and its broker mid-stream, count the damage.

The platform runs as in the demo, as separate processes (:class:`~headwater.supervisor.Supervisor`):
a durable broker (Tansu on ``s3://`` storage in a loopback S3 server, so a broker restart keeps
what it acknowledged), the synthetic generator, the joiner, the trainer and two serving replicas
under a failover Recommend load. Then, one after another and each mid-stream:

- ``joiner-rebalance``: ``kill -9`` one of the joiners (two by default, one consumer group) and
  keep it down until the survivor owns every input partition and rebuilt their pending requests
  from the input; then it rejoins and the partitions split again.
- ``joiner``, ``trainer``, ``serving``: ``kill -9`` the process group, start it again (the
  trainer is held down until serving reports ``hw_serve_degraded 1``: the stale-model signal);
- ``broker``: ``kill -9`` the broker, keep it down ``broker_down_s``, start it on the same port;
- ``trainer-checkpoint``: ``kill -9`` the trainer inside a checkpoint write, between its table
  and its manifest (:mod:`headwater.chaos.killpoint`), and restart it: it must resume from the
  last complete checkpoint, whose table, de-dup filter and offsets are one cut, so nothing is
  trained twice (``rows_retrained``, counted into ``duplicates_trained``);
- ``broker-replay``: the broker fault while ``headwater replay`` sends a real-shaped CSV log
  (string, multi-valued and empty cells) to topics of its own; the replay must finish on its own
  and that log's ledger lose nothing (:mod:`headwater.chaos.replay`).
- ``serving-rerank`` (not in the default list: it puts the LLM into both serving replicas for the
  whole run): ``kill -9`` a replica running the LLM in-process (``serve --llm``) while a rerank
  call is in flight to it, under a load whose every ``rerank_every``-th call asks for a rerank,
  and restart it (:mod:`headwater.chaos.rerank`).

Recovery of a fault = restart -> the component processing again (joiner: consuming; trainer:
training; serving replica: answering Recommend; broker: the joiner and the trainer both making
progress again); ``downtime_s`` is from the kill. After the faults the generator stops (it
reports how many requests were acknowledged), the pipeline drains, the trainer checkpoints, and
:mod:`headwater.chaos.accounting` accounts for every input event (``lost``) and for every example
the final state learned more than once (``duplicates_trained``, from the trainer's checkpoint, not
from what the joiner emitted). Per fault, ``duplicates_skipped`` / ``duplicates_trained`` are the
same figures' growth between the trainer checkpoints before the kill and after the settle;
``failed_calls`` are the Recommend calls no replica answered from the fault to the end of its
settle, and ``lost`` the events the run lost (plus, for ``broker-replay``, its own log's). With
the rerank load on (a run with ``serving-rerank``), each fault also reports the rerank calls of
the same span that were ``reranked_calls`` and ``degraded_calls`` (answered in DLRM order: an
answer, not a failure).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from headwater.chaos.accounting import account, end_offset
from headwater.chaos.cluster import ChaosConfig, Cluster
from headwater.chaos.faults import (PROCESS_FAULTS, REBALANCE_FAULT, FaultResult, broker_fault,
                                   checkpoint_fault, count_duplicates, process_fault,
                                   rebalance_fault)
from headwater.chaos.replay import replay_fault
from headwater.chaos.rerank import RERANK_FAULT, attach_llm, rerank_fault

log = logging.getLogger(__name__)

__all__ = ["ChaosConfig", "FaultResult", "run_chaos"]


def _stop_generator(cl: Cluster) -> int:
    """SIGTERM the generator; it flushes (every send acknowledged) and prints what it sent."""
    child = cl.gen_sup.children["generator"]
    os.killpg(child.proc.pid, signal.SIGTERM)
    child.proc.wait(timeout=120)
    text = (cl.root / "logs" / "generator.log").read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("{") and '"requests"' in line:
            return int(json.loads(line)["requests"])
    raise RuntimeError(f"the generator did not report what it sent (exit {child.proc.returncode}): "
                       f"{text[-1500:]}")


def _drain(cl: Cluster) -> bool:
    """Waits until the joiner has closed every window and the trainer has trained everything,
    then stops the trainer cleanly (its final checkpoint covers all of hw.examples)."""
    from streams.kafka_io import KafkaConfig, topic_names
    from training.checkpoint import CheckpointCorruptError, CheckpointStore

    examples = topic_names("hw").examples
    kafka = KafkaConfig(bootstrap_servers=cl.broker.bootstrap_servers)
    store = CheckpointStore(cl.root / "trainer")

    def covered() -> int:
        try:
            manifest = store.latest()
        except (OSError, CheckpointCorruptError):  # pruned under the read: the next one will do
            return 0
        return manifest.offsets.get(f"{examples}:0", 0) if manifest else 0

    deadline = time.monotonic() + cl.cfg.drain_timeout_s
    for _ in range(3):
        last, stable_since = None, time.monotonic()
        while time.monotonic() < deadline:
            cl.poll()
            row = (cl.joiners_metric("hw_stream_pending_requests"),
                   cl.joiners_metric("hw_stream_examples_out_total"),
                   cl.metric("trainer", "hw_train_examples_total"))
            if row != last:
                last, stable_since = row, time.monotonic()
            # The joiner is done; the trainer is too once a checkpoint covers hw.examples (a
            # lagging trainer, e.g. after a broker outage under load, just takes longer), or
            # when it has not moved for a long while (stuck: stop it and run it again).
            quiet = time.monotonic() - stable_since
            if row[0] == 0 and quiet > 3 and (quiet > 30 or covered() >= end_offset(kafka, examples)):
                break
            time.sleep(0.5)
        child = cl.sup.children.pop("trainer")
        os.killpg(child.proc.pid, signal.SIGTERM)
        child.proc.wait(timeout=60)
        end, done = end_offset(kafka, examples), covered()
        if done >= end:
            return True
        log.info("trainer stopped at offset %d of %d; running it again", done, end)
        cl.sup.start(child.spec)
    return False


_OTHER_FAULTS: dict[str, Callable[[Cluster], FaultResult]] = {
    "broker": broker_fault, "trainer-checkpoint": checkpoint_fault, "broker-replay": replay_fault,
    RERANK_FAULT: rerank_fault, REBALANCE_FAULT: rebalance_fault}


def run_chaos(cfg: ChaosConfig, on_phase: Callable[[str], None] | None = None) -> dict:
    """Runs the faults of ``cfg.faults`` against a live pipeline; returns the report.
    ``on_phase`` hears what is happening now (the CLI shows it as a status line)."""
    phase = on_phase or (lambda _text: None)
    from streams.kafka_io import KafkaConfig

    faults = [f.strip() for f in cfg.faults.split(",") if f.strip()]
    unknown = set(faults) - {*PROCESS_FAULTS, *_OTHER_FAULTS}
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}")
    root = Path(cfg.data_dir) if cfg.data_dir else Path(tempfile.mkdtemp(prefix="hw-chaos-"))
    cl = Cluster(cfg, root)
    t0 = time.monotonic()
    results: list[FaultResult] = []
    try:
        if RERANK_FAULT in faults:
            phase("writing the LLM and the item catalog for serving's rerank")
            attach_llm(cl)
        phase("starting broker, generator, joiner, trainer, 2 serving replicas"
              + (" with the LLM" if cl.rerank_every else ""))
        cl.start()
        if not cl.wait("serving's first answer", cl.load.ready.is_set, cfg.startup_timeout_s):
            raise RuntimeError(f"serving did not answer within {cfg.startup_timeout_s}s; logs in {root}/logs")
        cl.load.count_from_now()
        phases = {"startup_s": round(time.monotonic() - t0, 1)}
        cl.sleep(cfg.warmup_s)
        for fault in faults:
            log.info("fault: %s", fault)
            phase(f"fault {len(results) + 1}/{len(faults)}: {fault}")
            before, errors = cl.lineage(), cl.load.errors
            reranked, degraded = cl.load.reranked, cl.load.degraded
            inject = _OTHER_FAULTS.get(fault)
            results.append(inject(cl) if inject is not None else process_fault(cl, fault))
            cl.sleep(cfg.settle_s)
            count_duplicates(results[-1], before, cl.lineage())
            results[-1].failed_calls = cl.load.errors - errors
            if cl.rerank_every:
                results[-1].reranked_calls = cl.load.reranked - reranked
                results[-1].degraded_calls = cl.load.degraded - degraded
            log.info("fault %s: %s", fault, asdict(results[-1]))
        phase("stopping the stream and draining")
        requests = _stop_generator(cl)
        t_drain = time.monotonic()
        drained = _drain(cl)
        phases["drain_s"] = round(time.monotonic() - t_drain, 1)
        t_account = time.monotonic()
        phase("accounting for every input event")
        load = cl.load.summary()
        cl.load.stop()
        ledger = account(KafkaConfig(bootstrap_servers=cl.broker.bootstrap_servers), cl.gen,
                         requests, cfg.negative_rate, root / "trainer")
        phases["accounting_s"] = round(time.monotonic() - t_account, 1)
    finally:
        cl.close()
        if not cfg.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    for r in results:  # the run's ledger covers every fault; a replayed log adds its own
        r.lost = ledger.lost + int(r.detail.get("replay", {}).get("lost", 0))
    lost = ledger.lost + sum(int(r.detail.get("replay", {}).get("lost", 0)) for r in results)
    retrained = sum(int(r.detail.get("rows_retrained", 0)) for r in results)
    ok = (lost == 0 and ledger.examples_untrained == 0 and ledger.duplicates_trained == 0
          and retrained == 0 and load["errors"] == 0 and drained)
    return {
        "faults_injected": len(results),
        "faults_survived": sum(r.survived and ok for r in results),
        "events_in": ledger.events_in, "events_accounted": ledger.events_accounted,
        "lost": lost, "duplicates_trained": ledger.duplicates_trained + retrained,
        "max_recovery_s": max((r.recovery_s for r in results), default=0.0),
        "max_downtime_s": max((r.downtime_s for r in results), default=0.0),
        "faults": [asdict(r) for r in results],
        "serving": load, "drained": drained, "ledger": ledger.as_dict(),
        "storage": cl.broker.cfg.storage if cl.broker else cfg.storage,
        "wall_s": round(time.monotonic() - t0, 1), **phases, "load_avg": list(os.getloadavg()),
    }
