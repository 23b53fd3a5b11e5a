"""The bench harness: every ``headwater bench WHAT`` takes the common flags and prints its ceiling
next to its own figures, and the harness's pieces do what the benches rely on."""

import argparse

import pytest

import bench
from bench.harness import Ceiling, add_common, interleaved, no_ceiling, timed, with_ceiling
from headwater.cli import build_parser

CEILING_FIELDS = {"ceiling", "ceiling_unit", "ceiling_note", "fraction_of_ceiling"}


def test_every_command_has_a_module_named_after_it_with_the_common_flags():
    parser = build_parser()
    for name in bench.NAMES:
        module = bench.load(name)
        assert module.__name__ == f"bench.{name}" and module.__doc__
        args = parser.parse_args(["bench", name, "--json", "--repeats", "2", "--seed", "3"])
        seed = args.tc_seed if name == "learning" else args.seed  # learning: the learner's seed
        assert (args.json, args.repeats, int(seed)) == (True, 2, 3), name  # chaos: typed by its config


def test_older_flag_names_still_set_the_repeats():
    parser = build_parser()
    assert parser.parse_args(["bench", "embedding", "--rounds", "5"]).repeats == 5
    assert parser.parse_args(["bench", "serving", "--rounds", "4"]).repeats == 4
    assert parser.parse_args(["bench", "freshness", "--samples", "7"]).repeats == 7


def test_a_flag_the_bench_already_has_is_left_to_it():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", dest="tc_seed", type=int, default=None)
    add_common(p, repeats=1, repeats_help="runs")
    args = p.parse_args(["--seed", "9"])
    assert args.tc_seed == 9 and not hasattr(args, "seed")


def test_fraction_is_measured_over_ceiling_for_rates_and_ceiling_over_measured_for_times():
    assert Ceiling(100.0, "ids/s", "gather", measured=80.0).fraction == pytest.approx(0.8)
    assert Ceiling(2.0, "ms", "floor", measured=8.0, lower_is_better=True).fraction == pytest.approx(0.25)
    assert Ceiling(100.0, "ids/s", "gather").fraction is None


def test_with_ceiling_adds_the_fields_and_never_overwrites_the_bench_own():
    out = with_ceiling({"bench": "x", "qps": 5.0}, Ceiling(10.0, "qps", "max", measured=5.0), named="ceiling_qps")
    assert CEILING_FIELDS | {"ceiling_qps"} <= set(out)
    assert out["qps"] == 5.0 and out["ceiling"] == out["ceiling_qps"] == 10.0 and out["fraction_of_ceiling"] == 0.5
    none = with_ceiling({"bench": "x"}, no_ceiling("no machine bound"))
    assert none["ceiling"] is None and none["fraction_of_ceiling"] is None and none["ceiling_note"]
    with pytest.raises(ValueError):
        with_ceiling({"ceiling": 1}, no_ceiling("clash"))


def test_interleaved_rotates_the_order_every_round():
    order = []
    got = interleaved({k: (lambda k=k: order.append(k) or k) for k in "abc"}, repeats=3)
    assert order == list("abcbcacab") and got == {k: [k] * 3 for k in "abc"}


def test_timed_warms_up_and_reports_the_median_of_the_repeats():
    calls = []
    med, times, out = timed(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and out == 5 and min(times) <= med <= max(times)
