"""The template language of `dg fill` (docs/fill.md): fixed text with typed holes.

    Name: {{name:text:8}}, age {{age:int:3}}, likes cats: {{bool}}, size {{choice:S|M|XL}}

A hole is `{{TYPE}}` or `{{NAME:TYPE}}`; TYPE is `text:N` (at most N tokens of anything), `int:N`
(digits only, at most N tokens), `choice:a|b|c` (exactly one option; `\\|` is a literal bar) or
`bool` (true or false). `\\{{` writes a literal `{{`. A name may not be a type's keyword.
This module only parses; dgcli/filling.py lays a template out on canvases and reads the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DgError

TYPES = ("text", "int", "choice", "bool")
NAME = re.compile(r"[A-Za-z_][\w.\-\[\]]*")
MAX_OPTIONS = 4096


class TemplateError(DgError):
    """A template, schema or token template that cannot be filled: the caller has to change it (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Fixed:
    """Text written in advance (pinned). `ids`: given as tokens (a token-level template); else the
    text is tokenized and comes back verbatim."""

    text: str
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Hole:
    """A blank the model fills. kind: text (anything), string (JSON-safe text: no quote, backslash or
    control character; `chars` caps each token's length), int (digits), choice (one of `options`).
    `value`: how the holes dict reports it: "text", "int", "bool" or "json" (options are JSON)."""

    kind: str
    size: int = 0  # positions (text, string, int); a choice's width comes from its options' tokens
    name: str | None = None
    options: tuple[str, ...] = ()
    chars: int | None = None
    value: str = "text"

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice:" + "|".join(self.options)
        return f"{self.kind}:{self.size}"


@dataclass(frozen=True)
class Template:
    parts: tuple[Fixed | Hole, ...]

    @property
    def holes(self) -> list[Hole]:
        return [p for p in self.parts if isinstance(p, Hole)]


def parse(source: str) -> Template:
    """Parse template text; a TemplateError (one line, with the column) for anything malformed."""
    if not isinstance(source, str):
        raise TemplateError(f"a template is text, got {type(source).__name__}")
    source = unicode_text(source)
    parts: list[Fixed | Hole] = []
    text, i, n = [], 0, len(source)
    while i < n:
        if source.startswith("\\{{", i):
            text.append("{{")
            i += 3
        elif source.startswith("{{", i):
            end = source.find("}}", i + 2)
            inner_open = source.find("{{", i + 2)
            if end < 0 or 0 <= inner_open < end:
                raise TemplateError(f"unclosed '{{{{' at {where(source, i)} (write \\{{{{ for a literal '{{{{')")
            if text:
                parts.append(Fixed("".join(text)))
                text = []
            parts.append(parse_hole(source[i + 2:end], where(source, i)))
            i = end + 2
        else:
            text.append(source[i])
            i += 1
    if text:
        parts.append(Fixed("".join(text)))
    if not parts:
        raise TemplateError("empty template: give some text or a hole")
    names = [h.name for h in parts if isinstance(h, Hole) and h.name]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup:
        raise TemplateError(f"hole name '{dup}' is used twice")
    return Template(tuple(parts))


def unicode_text(text: str) -> str:
    """Lone surrogates (a JSON "\ud800") as U+FFFD: fixed text is copied into the answer, which could
    then be neither encoded nor sent."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def where(source: str, i: int) -> str:
    line = source.count("\n", 0, i) + 1
    col = i - (source.rfind("\n", 0, i) + 1) + 1
    return f"column {col}" if line == 1 else f"line {line}, column {col}"


def parse_hole(content: str, at: str) -> Hole:
    spec = content.strip()
    if not spec:
        raise TemplateError(f"empty hole '{{{{}}}}' at {at}: write {{{{TYPE}}}} or {{{{NAME:TYPE}}}}")
    head, colon, rest = spec.partition(":")
    name = None
    if head.strip() not in TYPES:
        if not colon:
            raise unknown(head, at)
        name = head.strip()
        if not rest.strip() or rest.strip()[0].isdigit():  # {{txt:4}}: a mistyped type, not a name
            raise unknown(name, at)
        if not NAME.fullmatch(name):
            raise TemplateError(f"bad hole name '{name}' at {at}: letters, digits, _ . - (not starting with a digit)")
        spec = rest.strip()
        head, colon, rest = spec.partition(":")
    kind = head.strip()
    if kind not in TYPES:
        raise unknown(kind, at)
    if kind in ("text", "int"):
        if not colon:
            raise TemplateError(f"{kind} needs a length at {at}: {kind}:N")
        try:
            size = int(rest.strip())
        except ValueError:
            size = None
        if size is None or size <= 0:
            raise TemplateError(f"{kind}:N needs a whole number N >= 1 at {at}, got '{rest.strip()}'")
        return Hole(kind, size, name, value="int" if kind == "int" else "text")
    if kind == "bool":
        if colon:
            raise TemplateError(f"bool takes no argument at {at}, got 'bool:{rest}'")
        return Hole("choice", 0, name, ("true", "false"), value="bool")
    options = split_options(rest if colon else "")
    if not options:
        raise TemplateError(f"choice needs options at {at}: choice:a|b|c")
    if any(not o.strip() for o in options):
        raise TemplateError(f"empty option in 'choice:{rest}' at {at}")
    dup = next((o for o in options if options.count(o) > 1), None)
    if dup is not None:
        raise TemplateError(f"option '{dup}' appears twice in a choice at {at}")
    if len(options) > MAX_OPTIONS:
        raise TemplateError(f"a choice has at most {MAX_OPTIONS} options, got {len(options)} at {at}")
    return Hole("choice", 0, name, tuple(options))


def split_options(text: str) -> list[str]:
    """a|b|c; `\\|` is a literal bar."""
    if not text:
        return []
    out, cur, i = [], [], 0
    while i < len(text):
        if text.startswith("\\|", i):
            cur.append("|")
            i += 2
        elif text[i] == "|":
            out.append("".join(cur))
            cur, i = [], i + 1
        else:
            cur.append(text[i])
            i += 1
    out.append("".join(cur))
    return out


def unknown(kind: str, at: str) -> TemplateError:
    return TemplateError(f"unknown hole type '{kind}' at {at}: use text:N, int:N, choice:a|b|c or bool")


def infill(prefix: str, suffix: str, length: int) -> Template:
    """PREFIX{{text:N}}SUFFIX, the texts taken as they are (no escapes)."""
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise TemplateError(f"the infill length must be a whole number >= 1, got {length!r}")
    prefix, suffix = unicode_text(prefix), unicode_text(suffix)
    parts = ([Fixed(prefix)] if prefix else []) + [Hole("text", length, "infill")] + ([Fixed(suffix)] if suffix else [])
    return Template(tuple(parts))


def from_tokens(seed_canvas, pinned) -> Template:
    """vLLM's token-level template: `diffusion_seed_canvas` ids and `diffusion_pinned` flags of the same
    length. Pinned entries are kept; each run of unpinned ones is a text hole (their seed values are
    not used: those positions start as noise, as any canvas does)."""
    def items(name, xs, ok, expected):
        if not isinstance(xs, (list, tuple)) or not xs:
            raise TemplateError(f"{name} must be a non-empty list")
        bad = next((x for x in xs if not ok(x)), None)
        if bad is not None:
            raise TemplateError(f"{name} holds {bad!r}: expected {expected}")
        return list(xs)

    seed = items("diffusion_seed_canvas", seed_canvas,
                 lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, "token ids (integers >= 0)")
    if pinned is None:
        raise TemplateError("diffusion_seed_canvas needs diffusion_pinned (which of its positions are fixed)")
    flags = items("diffusion_pinned", pinned, lambda x: isinstance(x, bool) or (isinstance(x, int) and x in (0, 1)),
                  "booleans or 0/1")
    if len(flags) != len(seed):
        raise TemplateError(f"diffusion_pinned has {len(flags)} entries but diffusion_seed_canvas {len(seed)}")
    parts: list[Fixed | Hole] = []
    i = 0
    while i < len(seed):
        j = i
        while j < len(seed) and bool(flags[j]) == bool(flags[i]):
            j += 1
        if flags[i]:
            parts.append(Fixed("", tuple(seed[i:j])))
        else:
            parts.append(Hole("text", j - i, str(sum(isinstance(p, Hole) for p in parts))))
        i = j
    return Template(tuple(parts))
