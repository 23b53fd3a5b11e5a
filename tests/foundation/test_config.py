"""Config precedence: defaults < TOML file < HW_* environment < command-line flags."""

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from headwater.config import ConfigError, add_config_args, describe, load_config, load_configs

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SampleConfig:
    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"help": "Kafka brokers"})
    batch_size: int = field(default=512, metadata={"help": "rows per batch"})
    window_s: float = 600.0
    compress: bool = True
    slots: list[int] = field(default_factory=lambda: [1, 2])


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, SampleConfig)
    return parser.parse_args(argv)


def test_defaults_when_nothing_is_given():
    cfg = load_config(SampleConfig, _parse([]), env={})
    assert cfg == SampleConfig()


def test_file_then_env_then_flags_override_in_order(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text('bootstrap_servers = "k:1"\n[joiner]\nbatch_size = 7\nwindow_s = 1.5\n')
    env = {"HW_BATCH_SIZE": "9", "HW_COMPRESS": "false"}
    cfg = load_config(SampleConfig, _parse(["--config", str(path), "--window-s", "2.5"]),
                      section="joiner", env=env)
    assert cfg.bootstrap_servers == "k:1"
    assert cfg.batch_size == 9
    assert cfg.window_s == 2.5
    assert cfg.compress is False


def test_list_fields_parse_from_comma_separated_flags():
    cfg = load_config(SampleConfig, _parse(["--slots", "3,4,5"]), env={})
    assert cfg.slots == [3, 4, 5]


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(SampleConfig, _parse(["--batch-size", "many"]), env={})


def test_unknown_field_in_section_is_refused(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text("[joiner]\nbatch_sise = 7\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(SampleConfig, {}, file=path, section="joiner", env={})


def test_describe_lists_documented_defaults():
    rows = {r[0]: r for r in describe(SampleConfig)}
    assert rows["batch_size"][2] == 512
    assert rows["bootstrap_servers"][3] == "Kafka brokers"


def test_unknown_top_level_key_is_refused_without_a_section(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text("batch_sise = 7\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(SampleConfig, {}, file=path, env={})


# `headwater train` and `headwater serve` load several config classes from one table: the table may
# hold the fields of any of them, and a key that none of them has is still refused.

def _train_classes():
    from streams.kafka_io import KafkaConfig
    from training.config import TrainerConfig
    return KafkaConfig, TrainerConfig


def _serve_classes():
    from serving.config import ServeConfig
    from serving.param_server import ParamServerConfig
    from serving.shard_fleet import PsClientConfig
    from streams.kafka_io import KafkaConfig
    return KafkaConfig, ServeConfig, ParamServerConfig, PsClientConfig


def test_train_table_fields_load_into_their_class(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text('topic_prefix = "top"\n[train]\nbatch_size = 512\nbootstrap_servers = "k:1"\n')
    kafka, cfg = load_configs(_train_classes(), {}, file=path, section="train", env={})
    assert cfg.batch_size == 512
    assert kafka.bootstrap_servers == "k:1"  # a Kafka field in the [train] table
    assert kafka.topic_prefix == "top"  # top-level keys still apply


def test_serve_table_fields_load_into_their_class(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text('[serve]\nport = 0\nbootstrap_servers = "k:1"\nhistory_versions = 7\n'
                    'ps_deadline_ms = 5\n')
    kafka, cfg, ps_cfg, client_cfg = load_configs(_serve_classes(), {}, file=path, section="serve", env={})
    assert cfg.port == 0
    assert kafka.bootstrap_servers == "k:1"
    assert ps_cfg.history_versions == 7
    assert client_cfg.ps_deadline_ms == 5


def test_shared_top_level_field_applies_to_every_class_that_has_it(tmp_path):
    @dataclass
    class Other:
        bootstrap_servers: str = ""
        port: int = 1

    path = tmp_path / "hw.toml"
    path.write_text('bootstrap_servers = "k:9"\n[p]\nbatch_size = 3\nport = 4\n')
    sample, other = load_configs((SampleConfig, Other), {}, file=path, section="p", env={})
    assert sample.bootstrap_servers == other.bootstrap_servers == "k:9"
    assert (sample.batch_size, other.port) == (3, 4)


@pytest.mark.parametrize("section, own_key", [("train", "batch_size = 512"), ("serve", "port = 0")])
def test_unknown_key_in_a_shared_table_names_the_key_and_the_table(tmp_path, section, own_key):
    classes = _train_classes() if section == "train" else _serve_classes()
    path = tmp_path / "hw.toml"
    path.write_text(f'[{section}]\n{own_key}\nbootstrap_servers = "k:1"\nbatch_sise = 1\n')
    with pytest.raises(ConfigError, match=rf"'batch_sise' in \[{section}\]"):
        load_configs(classes, {}, file=path, section=section, env={})


def test_headwater_serve_accepts_its_table_and_names_an_unknown_key(tmp_path):
    """The CLI's own loading: the [serve] keys of all four classes pass, the typo stops it (exit 2)."""
    path = tmp_path / "hw.toml"
    path.write_text('[serve]\nport = 0\nbootstrap_servers = "127.0.0.1:1"\nnum_shards = 1\n'
                    'ps_deadline_ms = 5\nprot = 1\n')
    proc = subprocess.run([sys.executable, "-m", "headwater", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "'prot' in [serve]" in proc.stderr
