"""The settings and the running cluster of one chaos run (:mod:`headwater.chaos.run`): the
broker, the supervised processes, the failover load client, and how the run observes them."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from headwater.chaos.accounting import TrainedLineage, trained_lineage
from headwater.chaos.load import FailoverLoadClient
from headwater.metrics import scrape
from headwater.supervisor import ChildSpec, Supervisor
from streams.broker import free_port

log = logging.getLogger(__name__)

__all__ = ["ChaosConfig", "Cluster"]


@dataclass
class ChaosConfig:
    """Settings of ``headwater bench chaos`` (defaults: the shortened run, ~2-3 minutes)."""

    faults: str = field(default="joiner,joiner-rebalance,trainer,serving,broker,trainer-checkpoint,"
                                "broker-replay", metadata={
        "help": "faults in order: joiner, trainer, serving (kill -9 + restart), joiner-rebalance "
                "(kill -9 one of the joiners, the others take its partitions, then it rejoins), "
                "broker (down + up), "
                "trainer-checkpoint (kill -9 inside a checkpoint write + restart), broker-replay "
                "(broker down + up while `headwater replay` sends a real-shaped CSV log); not by "
                "default: serving-rerank (both replicas run the LLM in-process, serve --llm, under a "
                "load that asks for a rerank every --rerank-every-th call; kill -9 one mid-rerank + restart)"})
    storage: str = field(default="s3", metadata={"help": "broker storage: s3 (durable, local S3) or memory"})
    data_dir: str = field(default="", metadata={"help": "state and logs (empty = a temp dir, removed)"})
    events_per_s: float = field(default=1000.0, metadata={"help": "generator rate (impression items + clicks)"})
    items_per_request: int = field(default=10, metadata={"help": "items shown per request"})
    negative_rate: float = field(default=0.5, metadata={"help": "joiner's negative keep probability"})
    join_window_s: float = field(default=2.0, metadata={"help": "joiner's event-time window"})
    joiners: int = field(default=2, metadata={
        "help": "joiner processes in one consumer group (input topics: 2 partitions per joiner)"})
    warmup_s: float = field(default=5.0, metadata={"help": "stream time after serving is up, before the first fault"})
    settle_s: float = field(default=4.0, metadata={"help": "stream time between faults"})
    broker_down_s: float = field(default=10.0, metadata={"help": "how long the broker stays down"})
    replay_rows: int = field(default=4000, metadata={"help": "rows of the log the broker-replay fault replays"})
    replay_s: float = field(default=30.0, metadata={
        "help": "wall time the broker-replay fault's replay is paced to (the outage falls inside it)"})
    stale_after_s: float = field(default=8.0, metadata={
        "help": "serving's staleness bound (degraded after it); above the generator's burst "
                "period (512 requests per block: 5 s at the default rate)"})
    load_qps: float = field(default=20.0, metadata={"help": "Recommend calls per second (failover client)"})
    rerank_every: int = field(default=5, metadata={
        "help": "with serving-rerank: every N-th Recommend call of the load asks serving's LLM to rerank"})
    rerank_deadline_ms: float = field(default=500.0, metadata={
        "help": "with serving-rerank: serving's rerank deadline (later: answered in DLRM order, degraded)"})
    startup_timeout_s: float = field(default=240.0, metadata={"help": "wait this long for serving's first answer"})
    recovery_timeout_s: float = field(default=120.0, metadata={"help": "a fault not recovered by then failed"})
    drain_timeout_s: float = field(default=180.0, metadata={"help": "wait this long for the pipeline to drain"})
    seed: int = field(default=0, metadata={"help": "generator seed"})


class Cluster:
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
        self.killpoint_note = root / "trainer-killpoint.json"  # written by the armed kill point
        # Set by headwater.chaos.rerank.attach_llm for the serving-rerank fault: both replicas'
        # LLM flags, and every how many calls the load asks for a rerank (0 = never).
        self.serving_args: list[str] = []
        self.rerank_every = 0

    # -- start / stop ------------------------------------------------------------------------
    def start_broker(self) -> str:
        from streams.broker import BrokerConfig, EmbeddedBroker, LocalS3Server

        bcfg = BrokerConfig(port=0, input_partitions=self.input_partitions)
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

        def spec(name: str, argv: list[str], head: list[str] = hw, **kw) -> ChildSpec:
            self.ports[name] = free_port()
            return ChildSpec(name, head + argv + ["--metrics-port", str(self.ports[name])],
                             env={"OMP_NUM_THREADS": "1"}, log_file=logs / f"{name}.log", **kw)

        # The trainer carries a kill point for the checkpoint fault (idle unless armed).
        killpoint = [sys.executable, "-m", "headwater.chaos.killpoint", str(self.killpoint_note)]

        children = [spec(name, ["join", *common, "--state-dir", str(self.root / name),
                                "--window-s", str(c.join_window_s), "--allowed-lateness-s", "1",
                                "--negative-rate", str(c.negative_rate), "--idle-close-s", "3"])
                    for name in self.joiner_names]
        children += [spec("trainer", ["train", *common, "--checkpoint-dir", str(self.root / "trainer"),
                                     "--checkpoint-interval-s", "3", "--embedding-dim", "8",
                                     "--hidden", "64,32", "--eval-window", "5000",
                                     "--torch-threads", "1"], head=killpoint)]
        for r in ("a", "b"):
            self.ports[f"grpc-{r}"] = free_port()
            children.append(spec(f"serving-{r}", [
                "serve", *common, "--port", str(self.ports[f"grpc-{r}"]),
                "--state-dir", str(self.root / f"serving-{r}"), "--persist-interval-s", "5",
                "--stale-after-s", str(c.stale_after_s), "--workers", "8", *self.serving_args]))
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
        # A rerank call waits up to serving's rerank deadline on top of the DLRM's time.
        self.load = FailoverLoadClient([f"127.0.0.1:{self.ports['grpc-a']}",
                                        f"127.0.0.1:{self.ports['grpc-b']}"], qps=self.cfg.load_qps,
                                       rerank_every=self.rerank_every, rerank_items=self.gen.items,
                                       rerank_timeout_s=1.0 + self.cfg.rerank_deadline_ms / 1000.0)
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
    @property
    def joiner_names(self) -> list[str]:
        return ["joiner"] + [f"joiner-{i + 1}" for i in range(1, self.cfg.joiners)]

    @property
    def input_partitions(self) -> int:
        return 2 * self.cfg.joiners if self.cfg.joiners > 1 else 1

    def joiners_metric(self, sample: str) -> float | None:
        """A sample summed over the joiners (None while one of them does not answer)."""
        values = [self.metric(n, sample) for n in self.joiner_names if n in self.sup.children]
        return None if any(v is None for v in values) else sum(values)

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
