"""Config precedence: defaults < TOML file < HW_* environment < command-line flags."""

import argparse
from dataclasses import dataclass, field

import pytest

from headwater.config import ConfigError, add_config_args, describe, load_config


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
