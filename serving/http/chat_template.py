"""Chat prompts from the model's own template (``tokenizer_config.json``'s ``chat_template``).

The template is Jinja from a model folder, i.e. data: it is rendered in Jinja's immutable
sandbox so it cannot reach Python internals. Without a template, a plain ``role: content``
transcript is used.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The model's chat template failed to render these messages."""


def load_chat_template(model_dir: str | Path) -> str | None:
    """The ``chat_template`` string from ``tokenizer_config.json`` (or ``chat_template.jinja``)."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    cfg = model_dir / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    tpl = json.loads(cfg.read_text()).get("chat_template")
    if isinstance(tpl, list):  # named templates: take "default"
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return tpl if isinstance(tpl, str) else None


def load_special_tokens(model_dir: str | Path) -> dict[str, str]:
    """``bos_token``/``eos_token`` strings the template may reference."""
    cfg = Path(model_dir) / "tokenizer_config.json"
    out: dict[str, str] = {}
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        for key in ("bos_token", "eos_token"):
            tok = data.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                out[key] = tok
    return out


@lru_cache(maxsize=8)
def _compile(template: str):  # noqa: ANN202 - jinja Template
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    messages: list[dict[str, str]],
    template: str | None,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
) -> str:
    """The prompt text for ``messages`` (``[{"role", "content"}]``)."""
    if template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
