"""Tokenizer (`tokenizer.json` via the `tokenizers` library) and the checkpoint's chat template.

The template is rendered in a sandboxed jinja2 environment, as transformers renders it, with the
Gemma 4 turn format: `<|turn>user\\n...<turn|>\\n<|turn>model\\n`. Thinking is off unless asked
(`enable_thinking`). Rendered prompts already contain `<bos>`, so they are encoded without adding
special tokens; raw prompts get the tokenizer's own post-processing (a leading `<bos>`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .config import read_json
from .errors import CheckpointError, DgError, first_line


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None, special: dict[str, str | None]):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self._template = None
        self.path: Path | None = None  # the checkpoint directory (images read its processor config)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise CheckpointError(f"tokenizer.json not found in {path}")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{f} could not be read ({first_line(e)})") from None
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        out = cls(tok, find_chat_template(path, cfg), {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token")})
        out.path = path
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # lone surrogates (a JSON "\ud800", undecodable argv bytes): not Unicode text
            if not isinstance(text, str):
                raise
            clean = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # as U+FFFD, not a crash
            return self.tok.encode(clean, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, tools: list[dict] | None = None, **tokens: str) -> str:
        """The rendered conversation; `tools`: function specs the template lists; `tokens`: more special
        tokens the template may read (image_token...)."""
        if not self.chat_template:
            raise DgError("this model has no chat template; pass the prompt raw (--raw) instead")
        if self._template is None:
            self._template = compile_template(self.chat_template)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                tools=tools, bos_token=self.bos_token or "", eos_token=self.eos_token or "", **tokens,
            )
        except jinja2.TemplateError as e:
            raise DgError(f"chat template failed: {first_line(e)}") from None


def find_chat_template(path: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's chat_template."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        t = read_json(path / "chat_template.json").get("chat_template")
        if t:
            return t
    t = tokenizer_config.get("chat_template")
    if isinstance(t, list):  # named templates: take the default one
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t


def compile_template(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"the chat template has a syntax error: {first_line(e)}") from None


def _token_str(v) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised as a dict
        return v.get("content")
    return v
