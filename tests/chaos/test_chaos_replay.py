"""The broker down for 10 s while ``headwater replay`` sends a real-shaped log (``headwater bench
chaos``'s ``broker-replay`` fault): the replay rides out the outage, finishes on its own, and the
log's ledger finds every event on the topics."""

from __future__ import annotations

import csv
import subprocess
import time

import pytest

from headwater.chaos import ChaosConfig, run_chaos
from headwater.chaos.accounting import end_offset
from headwater.chaos.replay import REPLAY_PREFIX, account_replay, replay_command, write_replay_log
from streams.broker import BrokerConfig, EmbeddedBroker, LocalS3Server
from streams.kafka_io import topic_names


def test_the_fixture_log_has_what_real_logs_have(tmp_path):
    log_path, schema = write_replay_log(tmp_path, rows=300)
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and schema.exists()
    assert all(r["user_id"].startswith("u") and r["item_id"].startswith("i") for r in rows)  # string ids
    assert any("|" in r["genres"] for r in rows)  # multi-valued
    assert any(v == "" for r in rows for v in r.values())  # empty cells


def test_a_replay_rides_out_the_broker_down_for_10_s_and_its_ledger_loses_nothing(tmp_path):
    log_path, schema = write_replay_log(tmp_path / "log", rows=1500, seed=3)
    with LocalS3Server() as s3:  # durable storage: what the broker acknowledged survives its kill
        broker = EmbeddedBroker(BrokerConfig(port=0, storage=s3.storage_url, s3_endpoint=s3.endpoint)).start()
        try:
            broker.create_topics(REPLAY_PREFIX)
            kafka = broker.kafka_config(REPLAY_PREFIX)
            replay = subprocess.Popen(replay_command(log_path, schema, broker.bootstrap_servers, wall_s=20.0),
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "replay.log", "ab"))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and end_offset(kafka, topic_names(REPLAY_PREFIX).impressions) == 0:
                assert replay.poll() is None, (tmp_path / "replay.log").read_text()[-2000:]
                time.sleep(0.2)
            assert replay.poll() is None, "the outage must fall inside the replay"

            broker.kill()
            time.sleep(10.0)
            broker.start()  # same port; topics and data come back from S3

            assert replay.wait(timeout=120) == 0, (tmp_path / "replay.log").read_text()[-2000:]
            led = account_replay(kafka, log_path, schema)
        finally:
            broker.stop()
    assert led.requests > 0 and led.events_in > led.requests
    assert led.lost == 0 and led.events_accounted == led.events_in
    assert led.items_on_topic == led.impression_items and led.clicks_on_topic == led.clicks > 0


@pytest.mark.slow  # the whole chaos cluster on S3 storage, a 30 s replay and a 10 s outage: ~2-3 min
def test_the_chaos_run_takes_the_broker_down_during_a_replay_and_loses_nothing(tmp_path):
    report = run_chaos(ChaosConfig(faults="broker-replay", data_dir=str(tmp_path), warmup_s=1.0,
                                   settle_s=1.0, load_qps=10.0))
    (fault,) = report["faults"]
    assert report["faults_survived"] == 1, fault
    assert fault["detail"]["down_s"] >= 10.0 and fault["detail"]["replay_running_at_kill"]
    assert fault["detail"]["replay_exit"] == 0 and fault["detail"]["replay"]["lost"] == 0
    assert fault["lost"] == 0 and fault["duplicates_trained"] == 0 and fault["failed_calls"] == 0
    assert report["lost"] == 0 and report["duplicates_trained"] == 0
