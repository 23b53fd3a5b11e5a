"""The broker-replay fault: the broker goes down for ``broker_down_s`` while ``headwater replay``
sends a real-shaped log, and the ledger of that log.

The log is written for the run (:func:`streams.log_world_writer.write_log`: string ids, a string
and a multi-valued column, empty cells; never a committed file) into the run's directory, with
the schema a user would write beside it. The replay goes to topics of its own
(``hwreplay.*``, on the run's broker), so its ledger is exact and the pipeline's is untouched; the
pipeline rides out the same outage, and its figures are the broker fault's.

Ledger: the log is re-read the way the replay reads it (same schema, same request ids), and each
event it holds is looked up on the topics: every impression item on ``hwreplay.impressions``,
every click on ``hwreplay.actions``, every bad row on ``hwreplay.dlq`` (with its line). ``lost``
is what is on none of them; messages a producer retry sent twice are counted, not lost.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from headwater.chaos.accounting import _read, end_offset
from headwater.chaos.cluster import Cluster
from headwater.chaos.faults import FaultResult, broker_fault

log = logging.getLogger(__name__)

__all__ = ["REPLAY_PREFIX", "ReplayLedger", "account_replay", "replay_command", "replay_fault",
           "write_replay_log"]

REPLAY_PREFIX = "hwreplay"


@dataclass
class ReplayLedger:
    """Where every event of the replayed log went (counts are events unless named otherwise)."""

    rows: int = 0
    bad_rows: int = 0
    requests: int = 0
    events_in: int = 0  # impression items + clicks of the good rows, + one per bad row
    events_accounted: int = 0
    lost: int = 0
    impression_items: int = 0
    items_on_topic: int = 0
    clicks: int = 0
    clicks_on_topic: int = 0
    bad_rows_in_dlq: int = 0
    duplicate_messages: int = 0  # impression/action messages on the topics twice (a retry)

    def as_dict(self) -> dict:
        return asdict(self)


def write_replay_log(directory: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """A real-shaped CSV log of ``rows`` rows and its schema TOML under ``directory``."""
    from streams.log_world_config import LogWorldConfig
    from streams.log_world_writer import write_log

    directory.mkdir(parents=True, exist_ok=True)
    cfg = LogWorldConfig(seed=seed, rows=rows, users=max(rows // 20, 20), items=max(rows // 10, 30))
    return write_log(cfg, directory / "log.csv")


def _replay_config(schema: Path):
    from streams.replay import ReplayConfig

    return ReplayConfig(schema=str(schema), on_bad_row="dead-letter")


def account_replay(kafka, log_path: Path, schema: Path, prefix: str = REPLAY_PREFIX) -> ReplayLedger:
    """Accounts for every event of the log at ``log_path`` on the ``prefix`` topics."""
    from streams.events import Impression, SchemaError, Watermark, decode_dead_letter, decode_event
    from streams.kafka_io import topic_names
    from streams.log_reader import log_requests, source_name
    from streams.replay import read_log

    topics = topic_names(prefix)
    encoded = read_log(log_path, _replay_config(schema))
    led = ReplayLedger(rows=len(encoded) + len(encoded.bad_rows), bad_rows=len(encoded.bad_rows))
    want_items, want_clicks = set(), set()
    for imp, actions in log_requests(encoded, source_name(log_path)):
        led.requests += 1
        want_items.update((imp.request_id, int(i)) for i in imp.items)
        want_clicks.update((a.request_id, int(a.item_id)) for a in actions)
    led.impression_items, led.clicks = len(want_items), len(want_clicks)

    seen_items, seen_clicks, messages = set(), set(), 0
    distinct: set[bytes] = set()
    for topic in (topics.impressions, topics.actions):
        for value in _read(kafka, topic):
            event = decode_event(value)
            if isinstance(event, Watermark):
                continue
            messages += 1
            distinct.add(value)
            if isinstance(event, Impression):
                seen_items.update((event.request_id, int(i)) for i in event.items)
            else:
                seen_clicks.update((a.request_id, int(a.item_id)) for a in event)
    led.duplicate_messages = messages - len(distinct)
    bad_lines = {b.line for b in encoded.bad_rows}
    dlq_lines = set()
    for value in _read(kafka, topics.dlq):
        try:
            dead = decode_dead_letter(value)
        except SchemaError:
            continue
        if dead.topic == str(log_path):
            dlq_lines.add(dead.offset)
    led.items_on_topic = len(want_items & seen_items)
    led.clicks_on_topic = len(want_clicks & seen_clicks)
    led.bad_rows_in_dlq = len(bad_lines & dlq_lines)
    led.events_in = led.impression_items + led.clicks + led.bad_rows
    led.events_accounted = led.items_on_topic + led.clicks_on_topic + led.bad_rows_in_dlq
    led.lost = led.events_in - led.events_accounted
    log.info("replay ledger: %s", led.as_dict())
    return led


def _speed(log_path: Path, schema: Path, wall_s: float) -> float:
    """The event-time speed-up that spreads the log over about ``wall_s`` seconds."""
    from streams.replay import load_requests

    times = [imp.event_time_ms for imp, _ in load_requests(log_path, _replay_config(schema))]
    span_s = (max(times) - min(times)) / 1000.0 if times else 0.0
    return max(span_s / max(wall_s, 1.0), 1.0)


def replay_command(log_path: Path, schema: Path, bootstrap_servers: str, wall_s: float,
                   prefix: str = REPLAY_PREFIX) -> list[str]:
    """``headwater replay`` of the log to the ``prefix`` topics, paced over about ``wall_s``."""
    return [sys.executable, "-m", "headwater", "replay", str(log_path), "--bootstrap-servers",
            bootstrap_servers, "--topic-prefix", prefix, "--schema", str(schema),
            "--on-bad-row", "dead-letter", "--speed", f"{_speed(log_path, schema, wall_s):.1f}"]


def replay_fault(cl: Cluster) -> FaultResult:
    """Starts ``headwater replay`` of a fresh log, takes the broker down for ``broker_down_s``
    once the replay is sending (:func:`headwater.chaos.faults.broker_fault`), and waits for the
    replay to finish. Survived when the pipeline came back, the replay finished on its own
    (exit 0) and its ledger lost nothing."""
    from streams.kafka_io import KafkaConfig, topic_names

    c = cl.cfg
    log_path, schema = write_replay_log(cl.root / "replay", c.replay_rows, c.seed)
    kafka = KafkaConfig(bootstrap_servers=cl.broker.bootstrap_servers, topic_prefix=REPLAY_PREFIX)
    cl.broker.create_topics(REPLAY_PREFIX)
    impressions = topic_names(REPLAY_PREFIX).impressions
    cmd = replay_command(log_path, schema, cl.broker.bootstrap_servers, c.replay_s)
    t_start = time.monotonic()
    with open(cl.root / "logs" / "replay.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        sending = cl.wait("the replay to send", lambda: proc.poll() is not None
                          or end_offset(kafka, impressions) > 0, c.startup_timeout_s)
        running = sending and proc.poll() is None
        res = broker_fault(cl, "broker-replay")
        finished = cl.wait("the replay to finish", lambda: proc.poll() is not None,
                           c.recovery_timeout_s + c.replay_s)
        res.detail["replay_running_at_kill"] = running
        res.detail["replay_exit"] = proc.returncode
        res.detail["replay_paced_s"] = c.replay_s
        res.detail["replay_wall_s"] = round(time.monotonic() - t_start, 2)  # at most: polled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    led = account_replay(kafka, log_path, schema)
    res.detail["replay"] = led.as_dict()
    res.survived = res.survived and running and finished and proc.returncode == 0 and led.lost == 0
    return res
