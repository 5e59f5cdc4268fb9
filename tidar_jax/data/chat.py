"""Chat templates of imported instruct models, rendered without transformers.

A tokenizer directory (an imported WORKDIR, or a Hugging Face model directory) keeps its Jinja chat template in
chat_template.jinja (transformers >= 4.47 layout) or under "chat_template" in tokenizer_config.json. Rendering
follows transformers' `apply_chat_template(..., tokenize=False)`: a sandboxed Jinja environment with trim_blocks,
lstrip_blocks and loop controls, a `tojson` that does not HTML-escape, `raise_exception` and `strftime_now`, and the
special-token strings (bos_token, eos_token, ...) of tokenizer_config.json as variables. Needs jinja2.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class ChatTemplateError(ValueError):
    """No chat template in the directory, or the template rejected the messages."""


def _tokenizer_config(directory: Path) -> dict:
    path = directory / TOKENIZER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def load_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The directory's default chat template source, or None when it has none."""
    directory = Path(tokenizer_dir)
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text()
    template = _tokenizer_config(directory).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def apply_chat_template(tokenizer_dir: str | Path, messages: Sequence[Mapping[str, str]],
                        add_generation_prompt: bool = True) -> str:
    """Renders `messages` ([{"role": "user", "content": "..."}, ...]) into the prompt text the model was tuned on;
    with `add_generation_prompt` the text ends where the assistant's reply starts. Encode the result with the
    model's tokenizer (special tokens such as <|im_start|> are part of the text)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2: pip install jinja2") from None
    template = load_chat_template(tokenizer_dir)
    if template is None:
        raise ChatTemplateError(f"{tokenizer_dir} has no chat template ({TEMPLATE_FILE} or 'chat_template' in "
                                f"{TOKENIZER_CONFIG}); prompt the model with plain text instead")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    config = _tokenizer_config(Path(tokenizer_dir))
    special = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        special[key] = value.get("content") if isinstance(value, dict) else value
    try:
        return env.from_string(template).render(messages=[dict(m) for m in messages],
                                                add_generation_prompt=add_generation_prompt, **special)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template of {tokenizer_dir} failed: {e}") from None


def encode_chat(tokenizer_dir: str | Path, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat, with the template's special tokens (e.g. <|im_start|>) as their ids.

    `tidar_jax.data.tokenizer.Tokenizer.encode` deliberately encodes special-token strings as plain text, which would
    break a chat prompt; this reads tokenizer_dir/tokenizer.json directly and lets them match. The template's own
    leading bos (if any) is kept; nothing else is added.
    """
    from tokenizers import Tokenizer

    text = apply_chat_template(tokenizer_dir, messages, add_generation_prompt)
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids
