"""``headwater bench llm`` on a tiny workload: both sides produce exactly the requested tokens and
the JSON states the workload it measured."""

from __future__ import annotations

import argparse

import torch

from bench import llm as bench


def test_bench_runs_engine_and_baseline_on_the_stated_workload():
    threads = torch.get_num_threads()
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--num-requests", "5", "--max-num-seqs", "2", "--prompt-len", "4", "9",
                         "--output-median", "4", "--output-max", "9", "--device", "cpu"])
    prompts, olens = bench.workload(args)
    assert len(prompts) == 5 and all(4 <= len(q) <= 9 for q in prompts) and all(4 <= n <= 9 for n in olens)
    assert bench.workload(args) == (prompts, olens)  # seeded
    out = bench.run(args)  # raises if the engine's token count differs from the request
    assert out["output_tokens"] == sum(olens) and out["num_requests"] == 5
    assert out["output_len_lognormal"] == {"median": 4.0, "sigma": 1.2, "min": 4, "max": 9, "seed": 0}
    assert out["threads"] == 1 and torch.get_num_threads() == threads and out["speedup_vs_baseline"] > 0 and out["kv_peak_blocks"] > 0
