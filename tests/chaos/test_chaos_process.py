"""Process faults under load: kill -9 the joiner, the trainer and a serving replica mid-stream,
restart each, and account for every input event (``headwater bench chaos``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from headwater.chaos import ChaosConfig, run_chaos


def _check(report: dict, faults: int) -> None:
    assert report["faults_injected"] == faults == report["faults_survived"], report["faults"]
    assert report["events_in"] > 0 and report["lost"] == 0
    assert report["events_accounted"] == report["events_in"]
    led = report["ledger"]
    assert led["examples_untrained"] == 0 and led["requests_missing_from_topic"] == 0
    # Each example learned once, whatever the joiner re-emitted (duplicate_examples).
    assert report["duplicates_trained"] == led["duplicates_trained"] == 0
    assert led["examples_trained"] == led["examples_on_topic"] - led["duplicate_examples"]
    assert led["dedup_forgotten"] == 0
    assert report["serving"]["errors"] == 0 and report["serving"]["answered"] > 0
    for f in report["faults"]:
        assert 0 < f["recovery_s"] <= f["downtime_s"]
        assert f["duplicates_trained"] == 0 and f["duplicates_skipped"] >= 0
        assert f["lost"] == 0 and f["failed_calls"] == 0
        if f["fault"] == "trainer":
            assert f["detail"]["serving_degraded_while_down"]
            assert f["detail"]["serving_fresh_after_recovery"]


def test_process_faults_short(tmp_path):
    # joiner-rebalance runs with the full benchmark below; the default suite's kill -9 of one of
    # two joiners is tests/streams/test_joiner_scale_out.py (the short run stays near a minute)
    cfg = ChaosConfig(faults="joiner,trainer,serving", storage="memory",
                      data_dir=str(tmp_path), warmup_s=1.0, settle_s=1.0, load_qps=10.0)
    report = run_chaos(cfg)
    _check(report, faults=3)


@pytest.mark.slow
def test_chaos_benchmark_full():
    """The README's ``headwater bench chaos --json``: all seven faults, the broker down 10 s twice
    (once during a log replay), the trainer killed once plainly and once inside a checkpoint write."""
    out = subprocess.run([sys.executable, "-m", "headwater", "bench", "chaos", "--json"],
                         capture_output=True, text=True, timeout=1200, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    _check(report, faults=7)
    checkpoint = next(f for f in report["faults"] if f["fault"] == "trainer-checkpoint")
    assert checkpoint["detail"]["kill_landed_mid_write"] and checkpoint["detail"]["rows_retrained"] == 0
    replay = next(f for f in report["faults"] if f["fault"] == "broker-replay")
    assert replay["detail"]["replay_running_at_kill"] and replay["detail"]["replay"]["lost"] == 0
    trainer = next(f for f in report["faults"] if f["fault"] == "trainer")
    assert not trainer["detail"]["serving_degraded_before_kill"]  # the kill turned it on
    rebalance = next(f for f in report["faults"] if f["fault"] == "joiner-rebalance")
    # the killed joiner owned partitions, and the survivor took every one of them
    assert rebalance["detail"]["victim_partitions"] > 0
    assert rebalance["detail"]["survivors_partitions"] == 8
    broker = next(f for f in report["faults"] if f["fault"] == "broker")
    assert broker["detail"]["down_s"] >= 10.0 and broker["detail"]["storage"].startswith("s3://")
