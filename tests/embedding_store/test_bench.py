"""The benchmark runs end to end on a small workload and reports what the issue asks for."""

import argparse
import json
import subprocess
import sys

from bench import embedding as bench


def test_bench_reports_rates_memory_and_zero_collisions():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--universe", "100000", "--batch", "4096", "--warmup-batches", "3", "--batches", "3"])
    out = bench.run(args)
    for key in ("lookup_ids_per_s", "insert_ids_per_s", "update_ids_per_s", "baseline_lookup_ids_per_s",
                "speedup_vs_dict", "bytes_per_row", "raw_bytes_per_row"):
        assert out[key] > 0, key
    assert out["collisions"] == 0 and out["baseline_matches"]
    assert out["raw_bytes_per_row"] == 64 * 4 * 2
    assert 0 < out["fraction_of_ceiling_paired_median"] and 0 < out["fraction_of_ceiling"]


def test_stream_injects_the_requested_share_of_new_ids():
    s = bench.ZipfStream(universe=1000, s=1.1, batch=1000, new_frac=0.1, seed=0)
    a, b = s.next().numpy(), s.next().numpy()
    assert len(set(b.tolist()) - set(a.tolist())) >= 100


def test_cli_prints_one_json_line_last():
    cmd = [sys.executable, "-m", "headwater", "bench", "embedding", "--json", "--universe", "10000",
           "--batch", "1024", "--warmup-batches", "2", "--batches", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["collisions"] == 0
