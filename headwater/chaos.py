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
:mod:`headwater.chaos_accounting` accounts for every input event (``lost``) and for every example
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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from headwater.chaos_accounting import TrainedLineage, account, end_offset, trained_lineage
from headwater.chaos_load import FailoverLoadClient
from headwater.demo import free_port
from headwater.metrics import scrape
from headwater.supervisor import ChildSpec, Supervisor

log = logging.getLogger(__name__)

__all__ = ["ChaosConfig", "FaultResult", "run_chaos"]

PROCESS_FAULTS = ("joiner", "trainer", "serving")


@dataclass
class ChaosConfig:
    """Settings of ``headwater bench chaos`` (defaults: the shortened run, ~2-3 minutes)."""

    faults: str = field(default="joiner,trainer,serving,broker", metadata={
        "help": "faults in order: joiner, trainer, serving (kill -9 + restart), broker (down + up)"})
    storage: str = field(default="s3", metadata={"help": "broker storage: s3 (durable, local S3) or memory"})
    data_dir: str = field(default="", metadata={"help": "state and logs (empty = a temp dir, removed)"})
    events_per_s: float = field(default=1000.0, metadata={"help": "generator rate (impression items + clicks)"})
    items_per_request: int = field(default=10, metadata={"help": "items shown per request"})
    negative_rate: float = field(default=0.5, metadata={"help": "joiner's negative keep probability"})
    join_window_s: float = field(default=2.0, metadata={"help": "joiner's event-time window"})
    warmup_s: float = field(default=5.0, metadata={"help": "stream time after serving is up, before the first fault"})
    settle_s: float = field(default=4.0, metadata={"help": "stream time between faults"})
    broker_down_s: float = field(default=10.0, metadata={"help": "how long the broker stays down"})
    stale_after_s: float = field(default=8.0, metadata={
        "help": "serving's staleness bound (degraded after it); above the generator's burst "
                "period (512 requests per block: 5 s at the default rate)"})
    load_qps: float = field(default=20.0, metadata={"help": "Recommend calls per second (failover client)"})
    startup_timeout_s: float = field(default=240.0, metadata={"help": "wait this long for serving's first answer"})
    recovery_timeout_s: float = field(default=120.0, metadata={"help": "a fault not recovered by then failed"})
    drain_timeout_s: float = field(default=180.0, metadata={"help": "wait this long for the pipeline to drain"})
    seed: int = field(default=0, metadata={"help": "generator seed"})


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


class _Cluster:
    """The broker, the supervised processes and the load client of one chaos run."""

    def __init__(self, cfg: ChaosConfig, root: Path) -> None:
        from streams.generator import GeneratorConfig

        self.cfg, self.root = cfg, root
        self.s3 = None
        self.broker = None
        self.ports: dict[str, int] = {}
        self.crashes: dict[str, int] = {}
        self.gen = GeneratorConfig(seed=cfg.seed, items_per_request=cfg.items_per_request,
                                   events_per_s=cfg.events_per_s,
                                   request_interval_ms=cfg.items_per_request * 1000.0 / cfg.events_per_s,
                                   start_time_ms=int(time.time() * 1000), max_action_delay_ms=1500,
                                   final_watermark=False)
        self.sup: Supervisor | None = None
        self.gen_sup: Supervisor | None = None
        self.load: FailoverLoadClient | None = None

    # -- start / stop ------------------------------------------------------------------------
    def start_broker(self) -> str:
        from streams.broker import BrokerConfig, EmbeddedBroker, LocalS3Server

        bcfg = BrokerConfig(port=0)
        if self.cfg.storage == "s3":
            self.s3 = LocalS3Server().start()
            bcfg.storage, bcfg.s3_endpoint = self.s3.storage_url, self.s3.endpoint
        self.broker = EmbeddedBroker(bcfg).start()
        return self.broker.bootstrap_servers

    def specs(self, bootstrap: str) -> tuple[list[ChildSpec], ChildSpec]:
        hw = [sys.executable, "-m", "headwater"]
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        common = ["--bootstrap-servers", bootstrap, "--topic-prefix", "hw"]
        c = self.cfg

        def spec(name: str, argv: list[str], **kw) -> ChildSpec:
            self.ports[name] = free_port()
            return ChildSpec(name, hw + argv + ["--metrics-port", str(self.ports[name])],
                             env={"OMP_NUM_THREADS": "1"}, log_file=logs / f"{name}.log", **kw)

        children = [spec("joiner", ["join", *common, "--state-dir", str(self.root / "joiner"),
                                    "--window-s", str(c.join_window_s), "--allowed-lateness-s", "1",
                                    "--negative-rate", str(c.negative_rate), "--idle-close-s", "3"]),
                    spec("trainer", ["train", *common, "--checkpoint-dir", str(self.root / "trainer"),
                                     "--checkpoint-interval-s", "3", "--embedding-dim", "8",
                                     "--hidden", "64,32", "--eval-window", "5000",
                                     "--torch-threads", "1"])]
        for r in ("a", "b"):
            self.ports[f"grpc-{r}"] = free_port()
            children.append(spec(f"serving-{r}", [
                "serve", *common, "--port", str(self.ports[f"grpc-{r}"]),
                "--state-dir", str(self.root / f"serving-{r}"), "--persist-interval-s", "5",
                "--stale-after-s", str(c.stale_after_s), "--workers", "8"]))
        g = self.gen
        generator = spec("generator", [
            "generate", *common, "--seed", str(g.seed), "--events-per-s", str(g.events_per_s),
            "--items-per-request", str(g.items_per_request), "--no-final-watermark",
            "--request-interval-ms", str(g.request_interval_ms), "--start-time-ms", str(g.start_time_ms),
            "--max-action-delay-ms", str(g.max_action_delay_ms)], max_restarts=0)
        return children, generator

    def start(self) -> None:
        bootstrap = self.start_broker()
        children, generator = self.specs(bootstrap)
        self.sup = Supervisor(children)
        self.gen_sup = Supervisor([generator])
        self.sup.start_all()
        self.gen_sup.start_all()
        self.load = FailoverLoadClient([f"127.0.0.1:{self.ports['grpc-a']}",
                                        f"127.0.0.1:{self.ports['grpc-b']}"], qps=self.cfg.load_qps)
        self.load.start()

    def close(self) -> None:
        for part in (self.load, self.gen_sup, self.sup, self.broker, self.s3):
            if part is None:
                continue
            try:
                part.stop()
            except Exception:  # tearing down must reach every part
                log.exception("error while stopping %s", type(part).__name__)

    # -- observation -------------------------------------------------------------------------
    def metric(self, name: str, sample: str, labels: dict | None = None) -> float | None:
        """Sum of a sample in a child's /metrics (None while the child is not answering)."""
        got = scrape(f"http://127.0.0.1:{self.ports[name]}/metrics", timeout_s=0.5)
        if not got:
            return None
        return sum(v for lab, v in got.get(sample, [])
                   if not labels or all(lab.get(k) == x for k, x in labels.items()))

    def poll(self) -> None:
        """Restarts children that died on their own (e.g. during the broker outage); counts them."""
        assert self.sup is not None
        for name in self.sup.poll():
            self.crashes[name] = self.crashes.get(name, 0) + 1

    def wait(self, what: str | None, cond, timeout_s: float, every_s: float = 0.25) -> bool:
        """Polls ``cond`` (restarting crashed children meanwhile) until true or ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if cond():
                return True
            time.sleep(every_s)
        if what:
            log.warning("timed out waiting for %s", what)
        return False

    def sleep(self, seconds: float) -> None:
        self.wait(None, lambda: False, seconds)

    def lineage(self) -> TrainedLineage | None:
        """What the trainer's newest checkpoint has learned (None while none can be read)."""
        from training.checkpoint import CheckpointCorruptError

        for _ in range(3):  # the trainer may prune the state file between manifest and read
            try:
                return trained_lineage(self.root / "trainer")
            except (OSError, CheckpointCorruptError) as exc:
                log.debug("trainer checkpoint not readable yet: %s", exc)
                time.sleep(0.2)
        return None

    def kill9(self, name: str) -> None:
        assert self.sup is not None
        child = self.sup.children[name]
        os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()


def _processing(cl: _Cluster, name: str, since: float):
    """The 'processing again' test of a restarted component."""
    if name == "joiner":
        return lambda: (cl.metric("joiner", "hw_stream_events_in_total") or 0) > 0
    if name == "trainer":
        return lambda: (cl.metric("trainer", "hw_train_examples_total") or 0) > 0
    target = f"127.0.0.1:{cl.ports['grpc-' + name[-1]]}"
    return lambda: cl.load.last_ok[target] > since


def _process_fault(cl: _Cluster, fault: str) -> FaultResult:
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
    ok = cl.wait(f"{name} to process", _processing(cl, name, t_restart), cl.cfg.recovery_timeout_s)
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


def _broker_fault(cl: _Cluster) -> FaultResult:
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


def _count_duplicates(res: FaultResult, before: TrainedLineage | None,
                      after: TrainedLineage | None) -> None:
    """The fault's share of the trainer's duplicate figures (both read from its checkpoints)."""
    if after is None:
        return
    before = before or TrainedLineage()
    res.duplicates_skipped = after.duplicates_skipped - before.duplicates_skipped
    res.duplicates_trained = after.duplicates_trained - before.duplicates_trained


def _stop_generator(cl: _Cluster) -> int:
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


def _drain(cl: _Cluster) -> bool:
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
    cl = _Cluster(cfg, root)
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
            results.append(_broker_fault(cl) if fault == "broker" else _process_fault(cl, fault))
            cl.sleep(cfg.settle_s)
            _count_duplicates(results[-1], before, cl.lineage())
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

