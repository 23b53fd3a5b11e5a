"""The one harness every ``headwater bench WHAT`` runs on: common flags, warm-up, repeats with
medians, the same-run baseline, the physical ceiling, and one JSON line.

A bench module has ``add_arguments(parser)``, which calls :func:`add_common` (``--json``,
``--repeats``, ``--seed``) and, for the flags several benches share, :func:`add_broker`,
:func:`add_threads` and :func:`add_recommend_load`; and ``run(args) -> dict``. The dict keeps the
bench's own figures and its same-run baseline (``baseline_*``) and gains, through
:func:`with_ceiling`, the fields every bench prints:

- ``ceiling``: the most this machine allows for the bench's headline figure, measured in the
  same run (null where there is no physical ceiling worth the name);
- ``ceiling_unit`` and ``ceiling_note``: what that figure is and how it was measured, or why
  there is none;
- ``fraction_of_ceiling``: how close the bench came to it, in (0, 1] when the ceiling is a true
  bound: measured / ceiling for rates, ceiling / measured for times.

A bench names its ceiling a second time in its own unit (``ceiling_ids_per_s``,
``ceiling_ms_per_call``), next to the figure it bounds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

__all__ = ["Ceiling", "add_broker", "add_common", "add_recommend_load", "add_threads", "emit", "interleaved",
           "median", "no_ceiling", "per_item_seconds", "timed", "warm_up", "with_ceiling"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ceiling:
    """The physical bound of a bench's headline figure, measured in the same run.

    ``measured`` is the bench's figure in the same unit; ``lower_is_better`` for times and
    costs (ms per call), where the fraction is ceiling / measured.
    """

    value: float | None
    unit: str
    note: str
    measured: float | None = None
    lower_is_better: bool = False

    @property
    def fraction(self) -> float | None:
        if not self.value or not self.measured or self.value <= 0 or self.measured <= 0:
            return None
        return self.value / self.measured if self.lower_is_better else self.measured / self.value

    def fields(self, digits: int = 3) -> dict[str, Any]:
        frac = self.fraction
        return {"ceiling": None if self.value is None else _round(self.value, digits),
                "ceiling_unit": self.unit, "ceiling_note": self.note,
                "fraction_of_ceiling": None if frac is None else round(frac, 3)}


def no_ceiling(note: str, unit: str = "") -> Ceiling:
    """``ceiling: null``, with the reason in ``ceiling_note``."""
    return Ceiling(None, unit, note)


def with_ceiling(result: dict[str, Any], ceiling: Ceiling, named: str | None = None,
                 digits: int = 3) -> dict[str, Any]:
    """``result`` with the ceiling fields added (``named``: the ceiling again under the bench's
    own name for it, e.g. ``ceiling_ms_per_call``). Existing fields are never overwritten."""
    extra = ceiling.fields(digits)
    if named is not None:
        extra[named] = extra["ceiling"]
    clash = set(extra) & set(result)
    if clash:
        raise ValueError(f"bench result already has {sorted(clash)}")
    return {**result, **extra}


def add_common(parser: argparse.ArgumentParser, *, repeats: int, repeats_help: str,
               repeats_aliases: Sequence[str] = (), seed: int = 0,
               seed_help: str = "random seed of the workload") -> None:
    """Adds the flags every bench takes: ``--json``, ``--repeats`` (``repeats_aliases`` are older
    names of the same flag, kept working) and ``--seed``. A flag the bench already defines (its
    typed config's ``--seed``, say) is left to it."""
    have = parser._option_string_actions  # noqa: SLF001 - argparse has no public query
    if "--json" not in have:
        parser.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    if "--repeats" not in have:
        parser.add_argument("--repeats", *repeats_aliases, dest="repeats", type=int, default=repeats,
                            help=f"{repeats_help} (default {repeats})")
    if "--seed" not in have:
        parser.add_argument("--seed", type=int, default=seed, help=f"{seed_help} (default {seed})")


# The flags several benches share, each defined once: the same name means the same thing.
THREADS_HELP = "torch threads; 1 keeps timings stable on a shared machine (0: torch's default)"


def add_broker(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap-servers``: a bench on Kafka uses the broker given, else starts Tansu for the run."""
    parser.add_argument("--bootstrap-servers", default="", help="use this broker (default: start Tansu)")


def add_threads(parser: argparse.ArgumentParser, help_text: str = THREADS_HELP) -> None:
    """``--threads`` (default 1): torch threads of the measured side (``help_text``: what they run)."""
    parser.add_argument("--threads", type=int, default=1, help=help_text)


def add_recommend_load(parser: argparse.ArgumentParser, *, candidates: int, items: int | None = None) -> None:
    """``--candidates`` per ``Recommend`` call and, for a bench that builds its own table, ``--items``."""
    parser.add_argument("--candidates", type=int, default=candidates, help="candidate items per Recommend")
    if items is not None:
        parser.add_argument("--items", type=int, default=items, help="item rows in the table")


def warm_up(fn: Callable[[], Any], times: int = 1) -> None:
    """Runs ``fn`` untimed: first-call paths, allocations and caches are not throughput."""
    for _ in range(times):
        fn()


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def timed(fn: Callable[[], T], repeats: int, warmup: int = 1) -> tuple[float, list[float], T]:
    """(median seconds, every repeat's seconds, the last result) of ``fn`` after ``warmup``
    untimed calls. The median keeps a neighbour's burst on a shared machine from deciding."""
    warm_up(fn, warmup)
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return median(times), times, out  # type: ignore[return-value]


def per_item_seconds(fn: Callable[[T], Any], items: Sequence[T]) -> float:
    """Seconds for all ``items``, as ``len(items) x`` the median per-item time (one ``fn(item)``
    each): the same rule for a bench, its baseline and its ceiling."""
    gc.collect()
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return median(times) * len(items)


def interleaved(measures: Mapping[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Each measure ``repeats`` times, in rounds whose order rotates (A B C, B C A, ...), so that
    load on a shared machine hits the bench, its baseline and its ceiling alike. Returns every
    round's result per name; the caller reduces (median, or best where the least disturbed pass
    is the figure)."""
    names = list(measures)
    out: dict[str, list[T]] = {k: [] for k in names}
    for r in range(max(1, repeats)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(measures[name]())
    return out


def emit(result: Mapping[str, Any]) -> None:
    """Prints the bench's one JSON line (the last line of its output, a contract)."""
    from headwater.cli.runtime import print_json

    print_json(dict(result))


def _round(value: float, digits: int) -> float | int:
    return int(round(value)) if digits <= 0 or abs(value) >= 1e6 else round(float(value), digits)
