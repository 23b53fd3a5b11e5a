"""``headwater bench rank`` on the device: the engine's cached-context ranking against a full
forward per candidate, both on the device in fp32 (bench/rank.py's ``run``, unchanged workload on
a GPU: a random ~20M Llama, a 512-token context, 100 candidates of ~16 tokens).

``ok``: the two paths' scores agree within the tolerance (fp32; on a GPU the Triton prefill
kernel's ``tl.dot`` runs in TF32, hence the looser bound there). ``same_ranking`` is reported, not
judged: candidates of a random model score within rounding of each other.
"""

from __future__ import annotations

import argparse

from bench import rank as bench_rank
from bench.gpu_check.common import Setup, model_folder, result

TOLERANCE = {"cpu": 1e-4, "cuda": 1e-2}
PERTURB = 1.0  # added to the measured difference with --perturb: the reference shifted by this much


def check_rank(setup: Setup) -> dict:
    parser = argparse.ArgumentParser()
    bench_rank.add_arguments(parser)
    flags = ["--device", setup.device.type, "--seed", str(setup.seed), "--threads", "0"]
    if setup.tiny:
        flags += ["--model", str(model_folder(setup, "tiny").path), "--context-tokens", "32", "--candidates", "8",
                  "--candidate-tokens", "4", "--repeats", "1"]
    out = bench_rank.run(parser.parse_args(flags))
    setup.release()
    tol = TOLERANCE[setup.device.type]
    diff = out["max_abs_diff"] + (PERTURB if setup.perturb else 0.0)
    figures = {k: out[k] for k in ("backend", "model_params", "context_tokens", "candidates", "candidate_tokens",
                                   "ms_per_call", "naive_ms_per_call", "speedup", "same_ranking",
                                   "ceiling_ms_per_call", "fraction_of_ceiling")}
    return result("rank", setup, diff <= tol, (
        "a full forward per candidate on the same weights and device (bench/rank.py naive_scores), "
        "log_softmax over all its logits"), **figures, max_abs_diff=diff, tolerance=tol)
