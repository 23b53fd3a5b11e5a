"""``headwater bench serving`` produces its documented JSON (tiny settings; no timing asserted)."""

import argparse

import pytest

from bench import serving as bench


def test_bench_reports_points_for_both_modes_and_a_headline():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # Two processes per mode on one port, clients over several connections: the multi-process path.
    args = parser.parse_args(["--clients", "1,4", "--duration-s", "0.3", "--warmup-s", "0.6",
                              "--items", "2000", "--p99-budget-ms", "1000", "--processes", "2",
                              "--connections", "4"])
    out = bench.run(args)
    assert (out["processes"], out["connections"]) == (2, 4)
    assert [p["clients"] for p in out["points"]] == [1, 4]
    for p in out["points"]:
        assert p["qps"] > 0 and p["baseline_qps"] > 0 and p["errors"] == 0 and p["baseline_errors"] == 0
        assert 0 < p["p50_ms"] <= p["p99_ms"] and 0 < p["baseline_p50_ms"] <= p["baseline_p99_ms"]
    best = max(out["points"], key=lambda p: p["qps"])
    assert out["qps"] == best["qps"] and out["p99_ms"] == best["p99_ms"]
    want = out["qps"] / max(p["baseline_qps"] for p in out["points"])
    assert out["speedup_vs_baseline"] == pytest.approx(want, abs=0.02)
