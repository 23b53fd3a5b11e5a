"""The chaos run behind ``headwater bench chaos`` (:mod:`bench.chaos`): kill the pipeline's
processes and its broker mid-stream, count the damage.

The platform runs as in the demo, as separate processes (:class:`~headwater.supervisor.Supervisor`):
a durable broker (Tansu on ``s3://`` storage in a loopback S3 server, so a broker restart keeps
what it acknowledged), the synthetic generator, the joiner, the trainer and two serving replicas
under a failover Recommend load. Then, one after another and each mid-stream:

- ``joiner``, ``trainer``, ``serving``: ``kill -9`` the process group, start it again (the
  trainer is held down until serving reports ``hw_serve_degraded 1``: the stale-model signal);
- ``broker``: ``kill -9`` the broker, keep it down ``broker_down_s``, start it on the same port.

Recovery of a fault = restart -> the component processing again (joiner: consuming; trainer:
training; serving replica: answering Recommend; broker: the joiner and the trainer both making
progress again); ``downtime_s`` is from the kill. After the faults the generator stops (it
reports how many requests were acknowledged), the pipeline drains, the trainer checkpoints, and
:mod:`headwater.chaos.accounting` accounts for every input event (``lost``) and for every example
the final state learned more than once (``duplicates_trained``, from the trainer's checkpoint, not
from what the joiner emitted). Per fault, ``duplicates_skipped`` / ``duplicates_trained`` are the
same figures' growth between the trainer checkpoints before the kill and after the settle.
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
from headwater.chaos.faults import PROCESS_FAULTS, FaultResult, broker_fault, count_duplicates, process_fault

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
    from training.checkpoint import CheckpointStore

    examples = topic_names("hw").examples
    store = CheckpointStore(cl.root / "trainer")
    deadline = time.monotonic() + cl.cfg.drain_timeout_s
    for _ in range(3):
        last, stable_since = None, time.monotonic()
        while time.monotonic() < deadline:
            cl.poll()
            row = (cl.metric("joiner", "hw_stream_pending_requests"),
                   cl.metric("joiner", "hw_stream_examples_out_total"),
                   cl.metric("trainer", "hw_train_examples_total"))
            if row != last:
                last, stable_since = row, time.monotonic()
            elif row[0] == 0 and time.monotonic() - stable_since > 3:
                break
            time.sleep(0.5)
        child = cl.sup.children.pop("trainer")
        os.killpg(child.proc.pid, signal.SIGTERM)
        child.proc.wait(timeout=60)
        end = end_offset(KafkaConfig(bootstrap_servers=cl.broker.bootstrap_servers), examples)
        manifest = store.latest()
        covered = manifest.offsets.get(f"{examples}:0", 0) if manifest else 0
        if covered >= end:
            return True
        log.info("trainer stopped at offset %d of %d; running it again", covered, end)
        cl.sup.start(child.spec)
    return False


def run_chaos(cfg: ChaosConfig, on_phase: Callable[[str], None] | None = None) -> dict:
    """Runs the faults of ``cfg.faults`` against a live pipeline; returns the report.
    ``on_phase`` hears what is happening now (the CLI shows it as a status line)."""
    phase = on_phase or (lambda _text: None)
    from streams.kafka_io import KafkaConfig

    faults = [f.strip() for f in cfg.faults.split(",") if f.strip()]
    unknown = set(faults) - {*PROCESS_FAULTS, "broker"}
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}")
    root = Path(cfg.data_dir) if cfg.data_dir else Path(tempfile.mkdtemp(prefix="hw-chaos-"))
    cl = Cluster(cfg, root)
    t0 = time.monotonic()
    results: list[FaultResult] = []
    try:
        phase("starting broker, generator, joiner, trainer, 2 serving replicas")
        cl.start()
        if not cl.wait("serving's first answer", cl.load.ready.is_set, cfg.startup_timeout_s):
            raise RuntimeError(f"serving did not answer within {cfg.startup_timeout_s}s; logs in {root}/logs")
        cl.load.count_from_now()
        phases = {"startup_s": round(time.monotonic() - t0, 1)}
        cl.sleep(cfg.warmup_s)
        for fault in faults:
            log.info("fault: %s", fault)
            phase(f"fault {len(results) + 1}/{len(faults)}: {fault}")
            before = cl.lineage()
            results.append(broker_fault(cl) if fault == "broker" else process_fault(cl, fault))
            cl.sleep(cfg.settle_s)
            count_duplicates(results[-1], before, cl.lineage())
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
    ok = (ledger.lost == 0 and ledger.examples_untrained == 0 and ledger.duplicates_trained == 0
          and load["errors"] == 0 and drained)
    return {
        "faults_injected": len(results),
        "faults_survived": sum(r.survived and ok for r in results),
        "events_in": ledger.events_in, "events_accounted": ledger.events_accounted,
        "lost": ledger.lost, "duplicates_trained": ledger.duplicates_trained,
        "max_recovery_s": max((r.recovery_s for r in results), default=0.0),
        "max_downtime_s": max((r.downtime_s for r in results), default=0.0),
        "faults": [asdict(r) for r in results],
        "serving": load, "drained": drained, "ledger": ledger.as_dict(),
        "storage": cl.broker.cfg.storage if cl.broker else cfg.storage,
        "wall_s": round(time.monotonic() - t0, 1), **phases, "load_avg": list(os.getloadavg()),
    }
