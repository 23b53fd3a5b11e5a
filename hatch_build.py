"""Hatchling build hook: generates the gRPC stubs from the .proto at install time.

Editable installs included; the generated files are git-ignored, so they are added to the wheel as
build artifacts. See ``serving/protogen.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ProtoBuildHook(BuildHookInterface):
    """Runs ``serving.protogen.generate`` before the wheel is built."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        root = Path(self.root)
        spec = importlib.util.spec_from_file_location("_hw_protogen", root / "serving" / "protogen.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        written = mod.generate(root)
        build_data.setdefault("artifacts", []).extend(str(p.relative_to(root)) for p in written)
