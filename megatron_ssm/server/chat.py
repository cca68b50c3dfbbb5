"""Chat templates: found beside the tokenizer (HF's `tokenizer_config.json` "chat_template", or
`chat_template.jinja`), rendered by jinja2's sandbox the way transformers renders them (trim_blocks,
lstrip_blocks, `raise_exception`, the tokenizer's special tokens as variables)."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path


def _token_text(v) -> str | None:
    if isinstance(v, dict):  # {"content": "</s>", "lstrip": false, ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_tokenizer_config(*dirs: str | Path) -> tuple[str | None, dict[str, str | None]]:
    """(chat template or None, special tokens as text) from the first directory that has them."""
    template, special = None, {}
    for d in dirs:
        d = Path(d)
        if d.is_file():
            d = d.parent
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        if not special:
            special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                       if _token_text(cfg.get(k)) is not None}
        if template is None:
            t = cfg.get("chat_template")
            if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if x.get("name") == "default"), None)
            if t is None and (d / "chat_template.jinja").is_file():
                t = (d / "chat_template.jinja").read_text()
            template = t if isinstance(t, str) and t.strip() else None
    return template, special


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def check_template(template: str) -> None:
    """Raise ValueError if the template does not compile (at server start, not per request)."""
    from jinja2.exceptions import TemplateError

    try:
        _compile(template)
    except TemplateError as e:
        raise ValueError(f"the chat template does not compile: {e}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str | None]) -> str:
    from .protocol import ApiError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except Exception as e:  # the template refuses the conversation (raise_exception), or breaks on it
        raise ApiError(f"the chat template refused these messages: {e}", param="messages") from None
