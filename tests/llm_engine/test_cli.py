"""``headwater llm convert`` prints the converted folder, which the engine loads."""

from __future__ import annotations

import json

from headwater.cli import main
from llm_engine.config import ModelConfig


def test_convert_command_reports_a_loadable_folder(capsys):
    assert main(["llm", "convert"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"]
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.num_hidden_layers == 30 and cfg.tie_word_embeddings


def test_convert_missing_file_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        main(["llm", "convert", "--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")])
