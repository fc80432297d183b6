"""Traces: what the sampler did at every step of a generation, as a JSON Lines file (docs/trace.md).

A trace is one generation. Line 1 is the header (format, version, model, settings, seed, prompt token
count, the string of every token id that appears, how many records follow); then one `step` line per
denoising step, one `block` line per committed canvas, and one `done` line (the DoneEvent's stats).
A name ending in `.gz` is gzip-compressed.

`TraceWriter` is a view of the event stream (like canvas_view's views: `update(event)`, used as a
context manager): it keeps the events in memory (a step is a few lists the sampler already copied to
the host, so a step costs an append) and writes the whole file when the generation ends, because the
header, the first line, lists the token strings of every step. It writes a temporary file and renames
it, so a half-written trace never exists under its name. Interrupted (Ctrl-C), it writes what was
recorded, the header saying `"interrupted": true` (no `done` line; a last block may be unfinished),
unless made with keep_partial=False. `read_trace` checks a file and gives one-line TraceErrors
(exit code 2) for a file that is not a trace, is of another version, or was cut short.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import DgError, first_line
from .events import BlockEvent, DoneEvent, PrefillEvent, StepEvent
from .files import atomic_output, check_not_special, read_file_limited, read_limited

FORMAT = "dg-trace"
VERSION = 1
STEP_FIELDS = ("block", "step", "max_steps", "canvas", "accepted", "argmax", "entropy", "temperature", "stopped",
               "seconds")
BLOCK_FIELDS = ("block", "token_ids", "steps", "finished")
MAX_BYTES = 2**30  # a trace read (uncompressed): /dev/zero or a gzip bomb must not fill the memory


class TraceError(DgError):
    """A trace file that cannot be read or written as asked: the user has to change it (exit code 2)."""

    exit_code = 2


@dataclass
class Trace:
    """A trace in memory: the header, and the step, block and done records as plain dicts."""

    header: dict
    steps: list[dict] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    done: dict | None = None

    def token(self, i: int) -> str:
        return self.header["tokens"].get(str(i), f"<{i}>")

    def block_steps(self, block: int) -> list[dict]:
        return [s for s in self.steps if s["block"] == block]

    def lines(self) -> list[dict]:
        body = [{"type": "step", **s} for s in self.steps] + [{"type": "block", **b} for b in self.blocks]
        body.sort(key=lambda r: (r["block"], r["type"] == "block", r.get("step", 0)))
        if self.done is not None:
            body.append({"type": "done", **self.done})
        return [{**self.header, "records": len(body)}] + body


# ---- writing ------------------------------------------------------------------------------------------

def check_target(path: str | os.PathLike) -> Path:
    """The trace's path, refused before any work if its directory does not exist (bad usage)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise TraceError(f"{path} is a directory: give a file name")
    check_not_special(p)
    if not p.parent.is_dir():
        raise TraceError(f"cannot write {path}: directory {p.parent} does not exist")
    test = p.parent / f".{p.name}.check-{os.getpid()}"  # can a file be made there? (before the run, not after)
    try:
        os.close(os.open(test, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(test)
    except OSError as e:
        raise TraceError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    return p


def write_atomic(path: Path, data: bytes) -> None:
    """data under path, never half of it (dgcli/files.py: a temporary file beside it, then a rename)."""
    try:
        with atomic_output(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise DgError(f"cannot write {path}: {e.strerror or first_line(e)}") from None


def encode(trace: Trace, gz: bool) -> bytes:
    text = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in trace.lines())
    data = text.encode("utf-8", "backslashreplace")  # a lone surrogate (a prompt's "\ud800") as its JSON escape
    return gzip.compress(data, compresslevel=6, mtime=0) if gz else data  # 6: gzip's own default, ~9's size


def save(trace: Trace, path: str | os.PathLike) -> Path:
    path = Path(path)
    write_atomic(path, encode(trace, path.name.endswith(".gz")))
    return path


class TraceWriter:
    """Records a generation's events; on exit writes the trace to `path` (None: keeps it in memory only).

    tokenizer: turns the ids into the strings the header lists. model, prompt, meta: go in the header.
    settings: the sampler settings asked for (the DoneEvent's, complete, replace them when it comes).
    notice: called with one line once the file is written (the CLI prints it on stderr).
    """

    def __init__(self, path, tokenizer, *, model: str = "", settings: dict | None = None, prompt=None,
                 meta: dict | None = None, keep_partial: bool = True, notice=None):
        self.path = check_target(path) if path is not None else None
        self.tokenizer, self.keep_partial, self.notice = tokenizer, keep_partial, notice
        self.header = {"type": "header", "format": FORMAT, "version": VERSION, "dg": __version__, "model": model,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "settings": dict(settings or {}), "seed": (settings or {}).get("seed"),
                       "prompt": prompt if isinstance(prompt, str) else None, "meta": dict(meta or {})}
        self.trace = Trace(self.header)
        self.written: Path | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.keep_partial:  # stopped (even after its last step): no file
            return
        if self.trace.done is None and not (self.keep_partial and self.trace.steps):
            return
        if self.path is not None:
            self.written = save(self.finish(), self.path)
            if self.notice:
                self.notice(f"trace: {len(self.trace.steps)} steps written to {self.path}"
                            + (" (interrupted)" if self.trace.done is None else ""))

    def update(self, event) -> None:
        if isinstance(event, StepEvent):
            record = {k: getattr(event, k) for k in STEP_FIELDS}
            if event.pinned is not None:  # a template's fixed positions (dg fill): optional in format 1
                record["pinned"] = event.pinned
            self.trace.steps.append(record)
        elif isinstance(event, BlockEvent):
            self.trace.blocks.append({k: getattr(event, k) for k in BLOCK_FIELDS})
        elif isinstance(event, PrefillEvent):
            self.header.update(prompt_tokens=event.prompt_tokens, cached_tokens=event.cached_tokens)
        elif isinstance(event, DoneEvent):
            d = event.to_dict()
            d.pop("token_ids")  # the block records have them
            self.trace.done = d
            self.header.update(settings=event.settings, seed=event.seed, prompt_tokens=event.prompt_tokens)

    def finish(self) -> Trace:
        """The trace as it stands, its header completed (token strings, canvas length, interrupted)."""
        t, h = self.trace, self.header
        ids = sorted({i for s in t.steps for key in ("canvas", "argmax") for i in s[key]}
                     | {i for b in t.blocks for i in b["token_ids"]})
        h["tokens"] = {str(i): s for i, s in zip(ids, pieces(self.tokenizer, ids))}
        h["canvas_length"] = len(t.steps[0]["canvas"]) if t.steps else 0
        h["interrupted"] = t.done is None
        h.setdefault("prompt_tokens", 0)
        return t


def writer(path, engine, tokenizer, *, model: str = "", settings: dict | None = None, **kwargs) -> TraceWriter:
    """A TraceWriter for one generation by `engine`: its header holds every sampler setting in use (the
    ones asked for over the checkpoint's defaults), so even an interrupted trace knows its EOS ids.
    The piece a command adds for --trace: `views.append(trace.writer(path, engine, tok, ...))`."""
    from .engine import as_engine

    full = dict(as_engine(engine).sampler_settings(**(settings or {})).__dict__)
    return TraceWriter(path, tokenizer, model=model, settings=full, **kwargs)


def numbered(path: str | os.PathLike, n: int) -> Path:
    """path with -n before its .jsonl/.jsonl.gz/.gz ending (chat.jsonl.gz -> chat-3.jsonl.gz)."""
    p = Path(path)
    for end in (".jsonl.gz", ".jsonl", ".gz", ".json"):
        if p.name.endswith(end) and len(p.name) > len(end):
            return p.with_name(f"{p.name[:-len(end)]}-{n}{end}")
    return p.with_name(f"{p.name}-{n}")


_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {id: piece}, across traces


def pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each id as it reads inside running text, leading space included (canvas_view.TokenPieces, raw:
    newlines stay newlines; the renderers make them visible). Kept per tokenizer: the noise touches
    much of the vocabulary, and `dg probe` writes many traces."""
    from .canvas_view import TokenPieces

    try:
        known = _PIECES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        known = {}
    todo = [i for i in dict.fromkeys(ids) if i not in known]
    if todo:
        tp = TokenPieces(tokenizer)
        known.update((i, tp.piece(i)) for i in todo)
    return [known[i] for i in ids]


# ---- reading ------------------------------------------------------------------------------------------

def read_trace(path: str | os.PathLike) -> Trace:
    """A trace file (gzip or not, whatever its name), checked; TraceError with one line otherwise."""
    name = str(path)
    try:
        raw = read_file_limited(Path(path).expanduser(), MAX_BYTES, name)
    except IsADirectoryError:
        raise TraceError(f"{name} is a directory, not a trace") from None
    except OSError as e:
        raise TraceError(f"cannot read {name}: {e.strerror or first_line(e)}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = read_limited(gzip.GzipFile(fileobj=io.BytesIO(raw)), MAX_BYTES, name)  # a gzip bomb stops here
        except EOFError:
            raise TraceError(f"{name} is truncated (its gzip stream ends early)") from None
        except (OSError, ValueError) as e:
            raise TraceError(f"{name} is not a dg trace (bad gzip data: {first_line(e)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{name} is not a dg trace (not UTF-8 text)") from None
    return parse(text, name)


def parse(text: str, name: str = "the trace") -> Trace:
    lines = text.split("\n")
    complete_last = lines[-1] == ""  # a trace ends with a newline; a cut one may not
    if complete_last:
        lines.pop()
    if not lines or not lines[0].strip():
        raise TraceError(f"{name} is empty: not a dg trace")
    try:
        header = json.loads(lines[0], parse_constant=_no_constant)
    except NonFinite as e:
        raise TraceError(f"{name}: line 1 holds {e}, which is not a number a trace can have") from None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("type") != "header" or header.get("format") != FORMAT:
        if len(lines) == 1 and not complete_last and lines[0].startswith('{"type":"header"'):
            raise TraceError(f"{name} is truncated (it ends inside its header)")
        raise TraceError(f"{name} is not a dg trace (its first line is not a {FORMAT} header)")
    if header.get("version") != VERSION:
        raise TraceError(f"{name} is {FORMAT} version {header.get('version')!r}; this dg reads version {VERSION}")
    check(header, {"records": int, "tokens": dict, "settings": dict, "canvas_length": int}, name, 1)
    for key in ("model", "prompt", "created", "dg"):  # optional, but the report prints them as text
        if header.get(key) is not None and not isinstance(header[key], str):
            raise TraceError(f"{name}: line 1 (header): '{key}' is not text")
    trace = Trace(header)
    for n, line in enumerate(lines[1:], start=2):
        try:
            r = json.loads(line, parse_constant=_no_constant)
        except NonFinite as e:
            raise TraceError(f"{name}: line {n} holds {e}, which is not a number a trace can have") from None
        except ValueError:
            if n == len(lines):
                raise TraceError(f"{name} is truncated (its last line is cut off)") from None
            raise TraceError(f"{name}: line {n} is not JSON") from None
        kind = r.get("type") if isinstance(r, dict) else None
        if kind == "step":
            check(r, {"block": int, "step": int, "max_steps": int, "canvas": list, "accepted": list, "argmax": list,
                      "entropy": list, "temperature": (int, float), "stopped": bool, "seconds": (int, float)}, name, n)
            if not len(r["canvas"]) == len(r["accepted"]) == len(r["argmax"]) == len(r["entropy"]) \
                    == header["canvas_length"]:
                raise TraceError(f"{name}: line {n}: canvas, accepted, argmax and entropy must each hold "
                                 f"canvas_length ({header['canvas_length']}) values")
            if not (ints(r["canvas"]) and ints(r["argmax"]) and all(type(a) is bool for a in r["accepted"])
                    and all(type(h) in (int, float) for h in r["entropy"])):
                raise TraceError(f"{name}: line {n}: canvas and argmax must hold token ids, accepted true/false, "
                                 f"entropy numbers")
            trace.steps.append(r)
        elif kind == "block":
            check(r, {"block": int, "token_ids": list, "steps": int}, name, n)
            if not ints(r["token_ids"]):
                raise TraceError(f"{name}: line {n}: token_ids must hold token ids")
            trace.blocks.append(r)
        elif kind == "done":
            trace.done = r
        else:
            raise TraceError(f"{name}: line {n} has no known type (step, block or done)")
        del r["type"]
    if len(lines) - 1 < header["records"]:
        raise TraceError(f"{name} is truncated: {len(lines) - 1} of {header['records']} records after the header")
    if len(lines) - 1 > header["records"]:
        raise TraceError(f"{name} holds {len(lines) - 1} records after the header, not {header['records']}")
    if trace.done is None and not header.get("interrupted"):
        raise TraceError(f"{name} is truncated (no done record)")
    known = {k for k in header["tokens"] if isinstance(header["tokens"][k], str)}
    missing = {i for s in trace.steps for i in s["argmax"] + s["canvas"] if str(i) not in known}
    if missing:
        raise TraceError(f"{name}: the header lacks the strings of {len(missing)} token ids (e.g. {min(missing)})")
    return trace


class NonFinite(ValueError):
    pass


def _no_constant(name: str):
    """NaN and Infinity: json.loads takes them, but metrics and --json would carry them on (invalid JSON)."""
    raise NonFinite(name)


def check(record: dict, fields: dict, name: str, n: int) -> None:
    for key, kind in fields.items():
        v = record.get(key)
        if v is None or isinstance(v, bool) and kind is int or not isinstance(v, kind):
            raise TraceError(f"{name}: line {n} ({record.get('type')}): '{key}' is missing or not "
                             f"{getattr(kind, '__name__', 'a number')}")


def ints(values: list) -> bool:
    return all(type(i) is int for i in values)
