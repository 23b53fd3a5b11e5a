"""``headwater demo``: the whole platform on one machine, as separate supervised processes
(:mod:`headwater.demo.run`), with its load clients (:mod:`headwater.demo.load`) and, for a log
replay, what it settles before and reports after (:mod:`headwater.demo.dataset`,
:mod:`headwater.demo.drain`)."""

from headwater.demo.run import DemoConfig, DemoMonitor, run_demo, world_args

__all__ = ["DemoConfig", "DemoMonitor", "run_demo", "world_args"]
