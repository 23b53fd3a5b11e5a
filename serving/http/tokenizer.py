"""The model folder's tokenizer (``tokenizer.json``) with what the server needs around it:
end-of-sequence ids, the chat template and its special tokens."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from serving.http.chat_template import load_chat_template, load_special_tokens


class ModelTokenizer:
    """``tokenizers`` over a Hugging Face model folder."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.chat_template = load_chat_template(model_dir)
        self.special_tokens = load_special_tokens(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
        eos: set[int] = set()
        for source in (cfg, _read(model_dir / "generation_config.json")):
            e = source.get("eos_token_id")
            eos.update(e if isinstance(e, list) else [e] if isinstance(e, int) else [])
        eos_text = self.special_tokens.get("eos_token")
        if eos_text and self.tokenizer.token_to_id(eos_text) is not None:
            eos.add(self.tokenizer.token_to_id(eos_text))
        self.eos_token_ids = sorted(eos)
        bos_text = self.special_tokens.get("bos_token")
        self.bos_token_id = self.tokenizer.token_to_id(bos_text) if bos_text else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
