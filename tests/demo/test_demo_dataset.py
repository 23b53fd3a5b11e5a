"""`headwater demo --dataset FILE` replays a real-shaped log to its end, then exits 0 by itself
with a summary of the whole log; a bad row is dead-lettered and counted, or, when asked, stops
the demo with an error that names its line."""

import json
import math
import subprocess
import sys
import time

from demo_helpers import processes_matching

from streams.broker import free_port
from tests.streams.log_fixtures import without_column, write_real_shaped_csv

ROWS = 300
# Column order of the fixture: user_id,item_id,label,ts,genres,year,age,gender,occupation,device.
BAD_ROW = "7,3,maybe,1574553700,Comedy,1990,30,M,writer,web\n"  # label neither 0 nor 1


def _log_with_one_bad_row(tmp_path):
    path = write_real_shaped_csv(tmp_path / "ratings.csv", rows=ROWS)
    with open(path, "a") as fh:
        fh.write(BAD_ROW)
    return path


def _demo(tmp_path, *flags: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "headwater", "demo", "--json", "--no-llm",
         "--data-dir", str(tmp_path / "hw"), "--dashboard-port", str(free_port()), *flags],
        capture_output=True, text=True, timeout=timeout_s)
    return proc, time.monotonic() - t0


def _unit_interval(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_demo_replays_a_log_to_its_end_and_exits_with_its_summary(tmp_path):
    log = _log_with_one_bad_row(tmp_path)
    proc, seconds = _demo(tmp_path, "--dataset", str(log), timeout_s=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 150, seconds
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["drained"] is True
    assert summary["examples"] == ROWS and summary["trained"] == ROWS  # every good row, once
    assert summary["dead_letters"] == 1  # the bad row, on the dead-letter topic
    positives = sum(line.split(",")[2] == "1" for line in log.read_text().splitlines()[1:])
    assert summary["events"] == ROWS + positives  # each row is a shown item, a positive also a click
    assert _unit_interval(summary["auc_overall"]) and _unit_interval(summary["auc_last_window"])
    assert math.isfinite(summary["logloss"]) and summary["logloss"] > 0
    assert summary["eval_window"] == (ROWS + 1) // 10  # the last window is the log's last tenth
    for name in ("counting", "vw"):
        assert _unit_interval(summary["baselines"][name]["auc_overall"]), summary["baselines"]
    # The Recommend load called with the log's own ids, and the served model knows every item
    # it sent (the generator's id range would hit almost none of them).
    assert summary["serving_ids"] == "dataset" and summary["serving_calls"] > 0, summary
    assert summary["serving_errors"] == 0 and summary["serving_known_item_share"] == 1.0, summary
    assert processes_matching(str(tmp_path)) == set()


def test_a_bad_row_stops_the_demo_before_it_starts_when_dead_letters_are_refused(tmp_path):
    log = _log_with_one_bad_row(tmp_path)
    proc, _ = _demo(tmp_path, "--dataset", str(log), "--on-bad-row", "error", timeout_s=60)
    assert proc.returncode == 2
    # The file, and the bad row's line (header, ROWS rows, then it) and column.
    assert str(log) in proc.stderr and f"line {ROWS + 2}, column 'label'" in proc.stderr
    assert not (tmp_path / "hw" / "logs").exists()  # no process was started


# ---------------------------------------------------------------- the end-of-log check, alone
def _send(kafka, topic: str, n: int) -> None:
    from streams.kafka_producer import BatchProducer

    producer = BatchProducer(kafka)
    for i in range(n):  # sent together: one record batch of n records
        producer.send(topic, b"m%d" % i)
    producer.flush()
    producer.close()


def _commit(kafka, group: str, topic: str, offset: int) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                             enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    consumer.close()


def test_log_end_counts_every_record_of_a_several_record_last_batch(kafka_topics):
    from kafka import KafkaConsumer

    from headwater.demo.drain import log_end
    from streams.kafka_io import topic_names

    topic = topic_names(kafka_topics.topic_prefix).examples
    _send(kafka_topics, topic, 5)
    consumer = KafkaConsumer(bootstrap_servers=kafka_topics.bootstrap_servers)
    try:
        assert log_end(consumer, topic) == {0: 5}
    finally:
        consumer.close()


def test_drained_once_the_joiner_then_the_trainer_have_committed_the_ends(kafka_topics):
    from headwater.demo.drain import DrainWatch
    from streams.kafka_io import topic_names

    t = topic_names(kafka_topics.topic_prefix)
    _send(kafka_topics, t.impressions, 3)
    _send(kafka_topics, t.actions, 2)
    _send(kafka_topics, t.examples, 4)
    groups = {"joiner_group": f"{t.examples}-j", "trainer_group": f"{t.examples}-t"}
    watch = DrainWatch(kafka_topics.bootstrap_servers, t.impressions, t.actions, t.examples,
                       settle_s=1.0, **groups)
    try:
        assert not watch.drained(0.0, now=0.0)  # nothing committed yet
        _commit(kafka_topics, groups["joiner_group"], t.impressions, 3)
        assert not watch.drained(0.0, now=1.0)  # the joiner has not read the actions' end
        _commit(kafka_topics, groups["joiner_group"], t.actions, 2)
        _commit(kafka_topics, groups["trainer_group"], t.examples, 3)
        for now in (2.0, 3.0, 4.0):
            assert not watch.drained(0.0, now=now)  # the trainer is one example short
        _commit(kafka_topics, groups["trainer_group"], t.examples, 4)
        assert not watch.drained(1.0, now=5.0)  # a request still pending in the joiner
        assert not watch.drained(0.0, now=6.0)  # settling: nothing pending, the end unmoved...
        assert watch.drained(0.0, now=7.0)  # ...for settle_s
    finally:
        watch.close()


def test_demo_learns_a_log_of_positives_only_with_its_sampled_negatives(tmp_path):
    from streams.log_reader import encode_log
    from streams.replay import ReplayConfig, log_schema

    full = write_real_shaped_csv(tmp_path / "full.csv", rows=ROWS)
    plays = without_column(full, tmp_path / "plays.csv")  # interactions only
    schema = tmp_path / "plays.toml"  # and the user's last 3 items as a feature (serving fills it)
    schema.write_text("recent_items = 3\n")
    proc, _ = _demo(tmp_path, "--dataset", str(plays), "--schema", str(schema), "--negatives", "2", timeout_s=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = encode_log(plays, log_schema(plays, ReplayConfig(schema=str(schema), negatives=2)))
    assert "recent_items" in expected.sparse  # what every process encodes
    assert ROWS < len(expected) <= 3 * ROWS
    assert summary["drained"] is True and summary["dead_letters"] == 0
    assert summary["examples"] == summary["trained"] == len(expected)  # each example once, negatives too
    assert summary["events"] == len(expected) + ROWS  # every shown item, and a click per row
    assert _unit_interval(summary["auc_overall"]) and math.isfinite(summary["logloss"])
    for name in ("counting", "vw"):
        assert _unit_interval(summary["baselines"][name]["auc_overall"]), summary["baselines"]
    assert processes_matching(str(tmp_path)) == set()
