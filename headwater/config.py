"""Typed configuration: one dataclass per process, filled from defaults < file < env < flags.

Packages define their config as plain ``@dataclass`` types (so they keep no dependency on this
module); the CLI turns every field into a flag and loads the object with :func:`load_config`.
A field's ``metadata["help"]`` is its documentation; ``headwater config show`` prints them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

T = TypeVar("T")

ENV_PREFIX = "HW_"


class ConfigError(ValueError):
    """A configuration value could not be parsed or names an unknown field."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse(name: str, tp: Any, raw: Any) -> Any:
    """Coerces a file/env/flag value to the field's type, with an error naming the field."""
    base = _base_type(tp)
    if raw is None:
        return None
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (item,) = typing.get_args(base)[:1] or (str,)
            items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s]
            values = [_parse(name, item, v) for v in items]
            return tuple(values) if origin is tuple else values
        if base in (int, float, str):
            if base is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(f"not an integer: {raw!r}")
            return base(raw)
        if isinstance(base, type) and issubclass(base, Path):
            return Path(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config field {name!r}: {exc}") from None
    return raw


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one ``--flag`` per field of ``cls`` plus ``--config FILE``; defaults stay in the class."""
    group = parser.add_argument_group(f"{cls.__name__} (env {ENV_PREFIX}<FIELD>, file --config)")
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in _field_types(cls).items():
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        base = _base_type(tp)
        if base is bool:
            group.add_argument(flag_name(name), dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag_name(name), dest=name, default=None, metavar=name.upper(),
                               help=help_text)


def load_config(cls: type[T], args: argparse.Namespace | Mapping[str, Any] | None = None,
                file: Path | str | None = None, section: str | None = None,
                env: Mapping[str, str] | None = None, *, also: Sequence[type] = ()) -> T:
    """Builds ``cls`` from its defaults, then a TOML file, then ``HW_*`` env vars, then flags.

    ``section`` picks a table of the TOML file (``[joiner]``); top-level keys apply to every
    process that has a field of that name (``bootstrap_servers``, ``topic_prefix``). A process
    that loads several config classes from one table names the others in ``also`` (or uses
    :func:`load_configs`): each class takes the table's keys it has, and a key that none of them
    has is an error naming the key and the table.
    """
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    flags = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    file = file if file is not None else flags.get("config")
    if file is not None:
        data = tomllib.loads(Path(file).read_text())
        table = data.get(section) if section else None
        table = table if isinstance(table, dict) else {}
        top = {k: v for k, v in data.items() if not isinstance(v, dict)}
        # No section: the top level is this config's own table and is checked like one.
        _check_keys(table if section else top, [cls, *also], section, file)
        for key, raw in {**top, **table}.items():
            if key in types_:
                values[key] = _parse(key, types_[key], raw)
    env = os.environ if env is None else env
    for name, tp in types_.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _parse(name, tp, raw)
    for name, tp in types_.items():
        raw = flags.get(name)
        if raw is not None:
            values[name] = _parse(name, tp, raw)
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def load_configs(classes: Sequence[type], args: argparse.Namespace | Mapping[str, Any] | None = None,
                 file: Path | str | None = None, section: str | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[Any, ...]:
    """One :func:`load_config` per class, all from the same table: ``[train]`` holds the fields of
    ``KafkaConfig`` and ``TrainerConfig`` alike; a key that none of ``classes`` has is an error."""
    return tuple(load_config(cls, args, file, section, env, also=classes) for cls in classes)


def _check_keys(table: Mapping[str, Any], classes: Sequence[type], section: str | None,
                file: Path | str) -> None:
    """Refuses a key of ``table`` that no class in ``classes`` has (a typo), naming it and the table."""
    known: set[str] = set()
    for c in classes:
        known.update(_field_types(c))
    for key in table:
        if key not in known:
            where = f"[{section}] of {file}" if section else f"the top level of {file}"
            names = ", ".join(dict.fromkeys(c.__name__ for c in classes))
            raise ConfigError(f"unknown config field {key!r} in {where} (not a field of {names})")


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(field, type, default, help) rows: the documented defaults of a config class."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append((f.name, str(_field_types(cls)[f.name]), default, f.metadata.get("help", "")))
    return rows

