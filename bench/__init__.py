"""``headwater bench WHAT``: one module per benchmark, named after its command, on one harness.

Each module (``bench.streams``, ``bench.embedding``, ...) has ``add_arguments(parser)`` and
``run(args) -> dict``; :mod:`bench.harness` gives them the common flags (``--json``,
``--repeats``, ``--seed``), warm-up, repeats with medians, the physical ceiling measured in the
same run next to the bench's baseline, and the one JSON line. Library pieces a bench uses (the
load generator, the synthetic streams) stay in their packages; this package may import them all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["NAMES", "load"]

NAMES: tuple[str, ...] = ("streams", "embedding", "trainer", "freshness", "learning", "serving",
                          "ps", "llm", "rank", "rerank", "spec", "overload", "chaos", "retrieval")


def load(name: str) -> ModuleType:
    """The module of ``headwater bench NAME``."""
    if name not in NAMES:
        raise KeyError(f"no bench {name!r}; benches: {', '.join(NAMES)}")
    return importlib.import_module(f"bench.{name}")
