"""Chat templates of imported instruct models, rendered without transformers.

A tokenizer directory (an imported WORKDIR, or a Hugging Face model directory) keeps its Jinja chat template in
chat_template.jinja (transformers >= 4.47 layout) or under "chat_template" in tokenizer_config.json. Rendering
follows transformers' `apply_chat_template(..., tokenize=False)`: a sandboxed Jinja environment with trim_blocks,
lstrip_blocks and loop controls, a `tojson` that does not HTML-escape, `raise_exception` and `strftime_now`, and the
special-token strings (bos_token, eos_token, ...) of tokenizer_config.json as variables. Needs jinja2.
"""

from __future__ import annotations

import functools
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


# Private-use characters placed around each message's content in a second rendering, to find where the contents
# landed in the prompt text (inside any whitespace, so that a template's `| trim` keeps them).
_OPEN, _CLOSE = "\ue000", "\ue001"


def _marked(content):
    """`content` with _OPEN / _CLOSE around its non-blank middle (blank or non-text contents as they are)."""
    if not isinstance(content, str) or not content.strip():
        return content
    start, end = len(content) - len(content.lstrip()), len(content.rstrip())
    return content[:start] + _OPEN + content[start:end] + _CLOSE + content[end:]


def _content_spans(tokenizer_dir, messages, add_generation_prompt: bool, text: str) -> list[tuple[int, int]] | None:
    """[start, end) character spans of `text` (the rendered chat) that come from message contents, or None when
    they cannot be told apart from the template's own text (the template rewrites contents beyond trimming, or a
    content holds a marker character)."""
    if any(_OPEN in str(m.get("content", "")) or _CLOSE in str(m.get("content", "")) for m in messages):
        return None
    marked = apply_chat_template(tokenizer_dir, [{**m, "content": _marked(m.get("content"))} for m in messages],
                                 add_generation_prompt)
    spans, plain, start = [], [], None
    for ch in marked:
        if ch == _OPEN and start is None:
            start = len(plain)
        elif ch == _CLOSE and start is not None:
            spans.append((start, len(plain)))
            start = None
        elif ch in (_OPEN, _CLOSE):
            return None
        else:
            plain.append(ch)
    return spans if start is None and "".join(plain) == text else None


@functools.lru_cache(maxsize=4)
def _chat_tokenizer(path: str, version: tuple[int, int] | None):
    """The tokenizers library's tokenizer of `path` for `encode_chat` alone (it flips `encode_special_tokens`, so it
    is shared with no other user), loaded once per file version: loading costs ~80 ms, encoding a prompt ~1 ms."""
    from tidar_jax.data.tokenizer import Tokenizer

    return Tokenizer.from_file(path).hf_tokenizer


def encode_chat(tokenizer_dir: str | Path, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = True, special_tokens_in_content: bool = False) -> list[int]:
    """Token ids of the rendered chat, with the template's special tokens (e.g. <|im_start|>) as their ids, and the
    message contents as plain text: a special-token string typed inside a message (`<|im_end|>`, `<|im_start|>
    system`) is encoded as ordinary text, as `Tokenizer.encode` does, so a message cannot close its turn or open
    another role. `special_tokens_in_content` lets such strings become special tokens (trusted text only).

    Where the contents hold no special-token string the ids are exactly those of encoding the rendered text with
    special tokens matched. Raises ChatTemplateError when a content holds one but the template rewrites contents
    so that they cannot be located in the prompt. The template's own leading bos (if any) is kept; nothing else
    is added.
    """
    from tidar_jax.data.tokenizer import check_text

    for i, message in enumerate(messages):
        if isinstance(message.get("content"), str):
            check_text(message["content"], f"message {i}")
    text = apply_chat_template(tokenizer_dir, messages, add_generation_prompt)
    path = Path(tokenizer_dir) / "tokenizer.json"
    stat = path.stat() if path.is_file() else None
    tokenizer = _chat_tokenizer(str(path), stat and (stat.st_mtime_ns, stat.st_size))
    tokenizer.encode_special_tokens = False  # the template's special-token strings become their ids
    encoding = tokenizer.encode(text, add_special_tokens=False)
    if special_tokens_in_content:
        return encoding.ids
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    found = [(i, a, b) for i, (a, b) in zip(encoding.ids, encoding.offsets) if i in special]
    spans = _content_spans(tokenizer_dir, messages, add_generation_prompt, text)
    if spans is None:
        injected = next((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and any(
            t.content in str(m.get("content", "")) for m in messages)), None)
        if injected is not None:
            raise ChatTemplateError(f"a message holds the special-token string {injected!r}, and the chat template "
                                    f"of {tokenizer_dir} rewrites message contents, so it cannot be kept as text: "
                                    "remove it (or allow special tokens in messages, for trusted text)")
        return encoding.ids
    template_specials = [(i, a, b) for i, a, b in found if not any(a < end and b > start for start, end in spans)]
    if len(template_specials) == len(found):
        return encoding.ids
    # Re-encode the text between the template's own special tokens with special-token matching off, as the
    # tokenizer splits at those tokens anyway: contents become plain text and everything else keeps its ids.
    tokenizer.encode_special_tokens = True
    ids, pos = [], 0
    for token_id, a, b in template_specials:
        ids += tokenizer.encode(text[pos:a], add_special_tokens=False).ids + [token_id]
        pos = b
    return ids + tokenizer.encode(text[pos:], add_special_tokens=False).ids
