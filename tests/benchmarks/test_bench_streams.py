"""``headwater bench streams --json`` with one and two joiners: every example, none lost, both
settings reported, the old fields kept (other tools read them)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--drain"]])
def test_bench_streams_reports_one_and_two_joiners(mode):
    out = subprocess.run([sys.executable, "-m", "headwater", "bench", "streams", "--json",
                          "--events", "30000", "--repeats", "1", *mode],
                         capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["joiners"] == [1, 2] and set(r["events_per_s_by_joiners"]) == {"1", "2"}
    assert r["scale_1_to_2"] > 0 and r["mode"] == ("drain" if mode else "live")
    for run in r["runs"]:
        assert run["lost"] == 0 and run["examples"] == r["expected_examples"]
    for field in ("events_per_s", "lost", "duplicates", "produce_events_per_s",
                  "raw_kafka_events_per_s", "ceiling_events_per_s", "fraction_of_ceiling"):
        assert field in r
