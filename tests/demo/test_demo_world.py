"""The demo's synthetic world reaches the generator unchanged, and the summary reports the gap."""

import argparse
import math

from headwater.config import add_config_args, load_config
from headwater.demo import DemoConfig, DemoMonitor, world_args
from streams.generator import GeneratorConfig


def test_demo_world_flags_become_the_generators_config():
    demo = DemoConfig(users=123, items=456, latent_dim=5, segments=7, categories=9,
                      user_noise=0.25, item_noise=0.5, temperature=2.0)
    parser = argparse.ArgumentParser()
    add_config_args(parser, GeneratorConfig)
    gen = load_config(GeneratorConfig, parser.parse_args(world_args(demo)), env={})
    assert (gen.users, gen.items, gen.dim, gen.segments, gen.categories) == (123, 456, 5, 7, 9)
    assert (gen.user_noise, gen.item_noise, gen.temperature) == (0.25, 0.5, 2.0)


def test_default_demo_world_is_the_generators_default_world():
    parser = argparse.ArgumentParser()
    add_config_args(parser, GeneratorConfig)
    assert load_config(GeneratorConfig, parser.parse_args(world_args(DemoConfig())), env={}) == \
        GeneratorConfig()


def test_summary_reports_both_aucs_their_gap_and_events_trained():
    monitor = DemoMonitor([])
    nan = math.nan
    monitor.history = [
        {"t": 0.0, "events": 100.0, "examples": 80.0, "trained": 40.0, "events_trained": 46.0,
         "dlq": 0.0, "auc_window": nan, "auc_truth": nan, "model_version": nan,
         "freshness_ms": nan},
        {"t": 1.0, "events": 200.0, "examples": 170.0, "trained": 150.0, "events_trained": 172.5,
         "dlq": 0.0, "auc_window": 0.84, "auc_truth": 0.88, "model_version": 3.0,
         "freshness_ms": 10.0}]
    s = monitor.summary()
    assert s["auc_last_window"] == 0.84 and s["auc_truth_last_window"] == 0.88
    assert abs(s["auc_gap"] - 0.04) < 1e-12 and s["events_trained"] == 172
