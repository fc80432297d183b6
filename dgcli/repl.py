"""`dg chat`: the interactive loop (Repl) around a ChatSession (dgcli/session.py).

Repl reads input with prompt-toolkit (history file, Alt-Enter or a \"\"\" block for several lines),
handles slash commands, and shows each answer through a canvas_view. Ctrl-C stops the turn.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.text import Text

from . import store
from .canvas_view import NOISE_STYLES, CanvasView, PlainView, TokenPieces, consume, format_stats
from .errors import DgError, first_line
from .files import write_text_atomic
from .session import ChatSession

HELP = """commands:
  /help                 this list
  /clear                forget the conversation
  /system TEXT          set the system prompt (/system alone removes it)
  /image FILE           attach an image to the next message (models with a vision tower)
  /set KEY VALUE        change a setting: max_new_tokens (max_tokens), max_denoising_steps (steps),
                        entropy_bound, t_min, t_max, temperature (t_max=T, t_min=T/2),
                        stability_threshold, confidence_threshold, seed, think on|off,
                        canvas on|off, noise text|dots|draft; VALUE 'none' restores the default
  /show                 the settings in use
  /save FILE, /load FILE  the conversation as JSON
  /stats                numbers for the last answer
  /trace FILE           trace the next answer into FILE (.gz: gzip); /trace off stops --trace
  /fill TEMPLATE        send TEMPLATE and have the answer fill it: fixed text with holes
                        {{text:N}} {{int:N}} {{choice:a|b}} {{bool}} (docs/fill.md)
  /exit, /bye, Ctrl-D   leave
input: Enter sends; Alt-Enter starts a new line; a block between \"\"\" lines is sent whole.
Ctrl-C stops an answer; at the prompt, press it twice (or Ctrl-D) to leave."""


def needs_more(text: str) -> bool:
    """True while a \"\"\" block is open."""
    s = text.strip()
    return s.startswith('"""') and (len(s) < 6 or not s.endswith('"""'))


def unquote(text: str) -> str:
    s = text.strip()
    if s.startswith('"""'):
        s = s[3:]
        s = s[:-3] if s.endswith('"""') else s
        return s.strip("\n")
    return text


def prompt_toolkit_reader(input=None, output=None, decode: InputText | None = None) -> Callable[[str], str]:
    """prompt-toolkit input with a history file; Enter sends unless a \"\"\" block is open. Bytes
    that are not UTF-8 (a Latin-1 terminal, a paste) reach us as lone surrogates: `decode` replaces them."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("enter")
    def _(event):
        buf = event.current_buffer
        if needs_more(buf.text):
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    store.data_dir().mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(store.data_dir() / "chat_history")), key_bindings=kb,
                            multiline=True, prompt_continuation="... ", input=input, output=output)
    decode = decode or InputText()
    return lambda prompt: decode(session.prompt(prompt), "the input")


class InputText:
    """Text from outside (a pipe, argv, a file) that may not be UTF-8: undecodable bytes become
    U+FFFD, and `notice` hears about it once. Takes bytes, or str as Python decodes argv and a
    C-locale stdin (bad bytes as lone surrogates, which the tokenizer would refuse)."""

    def __init__(self, notice: Callable[[str], None] | None = None):
        self.notice = notice or (lambda message: print(message, file=sys.stderr, flush=True))
        self.noticed = False

    def __call__(self, data: bytes | str | None, where: str = "the input") -> str | None:
        if data is None:
            return None
        if isinstance(data, str):
            try:
                data.encode("utf-8")
                return data
            except UnicodeEncodeError:
                try:
                    data = data.encode("utf-8", "surrogateescape")  # back to the bytes they came from
                except UnicodeEncodeError:  # surrogates not from a byte: invalid UTF-8 once encoded
                    data = data.encode("utf-8", "surrogatepass")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            if not self.noticed:
                self.noticed = True
                self.notice(f"warning: {where} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
            return data.decode("utf-8", "replace")

    def read(self, stream, where: str = "stdin") -> str:
        """All of a stream, as bytes when it has them (a strict text stream would raise instead)."""
        return self(getattr(stream, "buffer", stream).read(), where)


def line_reader(stream, decode: InputText | None = None) -> Callable[[str], str]:
    """Plain input (stdin not a terminal): one line per message, or a \"\"\" block. Lines are read
    as bytes where the stream has them and decoded by `decode`: bad bytes never end the chat."""
    decode = decode or InputText()
    source = getattr(stream, "buffer", stream)

    def read(prompt: str) -> str:
        text = ""
        while True:
            try:
                line = decode(source.readline(), "stdin")
            except OSError as e:
                raise DgError(f"cannot read the input: {first_line(e)}") from None
            if not line:
                if text:
                    return text
                raise EOFError
            text += line
            if not needs_more(text):
                return text.rstrip("\n")
    return read


def on_off(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise DgError(f"{key} is on or off, got '{value}'")


class Repl:
    def __init__(self, session: ChatSession, console: Console, read: Callable[[str], str], *,
                 canvas: bool = True, noise: str = "text", fps: float = 15.0, model_name: str = "",
                 trace: str | Path | None = None):
        self.session, self.console, self.read = session, console, read
        self.canvas, self.noise, self.fps, self.model_name = canvas, noise, fps, model_name
        # --trace FILE: every answer, numbered (FILE-1, FILE-2, ...); /trace FILE: the next answer only
        self.trace_all, self.trace_next, self.traced = trace, None, 0
        self.pieces = TokenPieces(session.tokenizer)
        self.ctrl_c = False

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(Text(text, style=style), soft_wrap=True)

    def run(self) -> None:
        self.say(f"dg chat · {self.model_name} · /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = self.read(">>> ")
            except KeyboardInterrupt:
                if self.ctrl_c:
                    break
                self.ctrl_c = True
                self.say("(Ctrl-C again or Ctrl-D to leave)")
                continue
            except EOFError:
                break
            self.ctrl_c = False
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                try:
                    if not self.command(line.strip()):
                        break
                except (DgError, OSError, ValueError) as e:  # a failed command is a red line; the chat goes on
                    self.say(f"error: {first_line(e)}", style="red")
                continue
            self.answer(unquote(line))

    def answer(self, text: str, template=None) -> None:
        events = self.session.turn(text, template=template)
        if self.canvas:
            view = CanvasView(self.console, self.pieces, fps=self.fps, noise=self.noise)
        else:
            view = PlainView(self.console.file)
        try:
            with self.trace_writer(text) as tracer, view:  # the trace notice after the answer
                consume(events, [view] + ([tracer] if tracer else []))
        except KeyboardInterrupt:
            self.say("[interrupted]", style="yellow")
            return
        except DgError as e:
            self.say(f"error: {e}", style="red")
            return
        if self.session.last is not None:
            self.say(format_stats(self.session.last, self.session.last_reused))

    def trace_writer(self, text: str):
        """The trace view for this answer (dgcli/trace.py), or a no-op context if none is asked for."""
        from contextlib import nullcontext

        from .trace import numbered, writer

        if self.trace_next is not None:
            path, self.trace_next = self.trace_next, None
        elif self.trace_all is not None:
            self.traced += 1
            path = numbered(self.trace_all, self.traced)
        else:
            return nullcontext()
        s = self.session
        return writer(path, s.engine, s.tokenizer, model=self.model_name, settings=s.settings, prompt=text,
                      notice=lambda message: self.say(message))

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/help":
            self.say(HELP, style="")
        elif name == "/clear":
            s.clear()
            self.say("conversation cleared")
        elif name == "/image":
            if not arg:
                raise DgError("usage: /image FILE")
            n = s.attach(str(Path(arg.strip("\"'")).expanduser()))
            self.say(f"[image: {n} tokens]")
        elif name == "/system":
            s.system = arg or None
            self.say(f"system prompt {'set' if arg else 'removed'}")
        elif name == "/set":
            parts = arg.split(None, 1)
            if len(parts) != 2:
                raise DgError("usage: /set KEY VALUE")
            self.set(*parts)
        elif name == "/show":
            rows = {"model": self.model_name, **s.effective_settings(), "think": s.think, "system": s.system,
                    "canvas": self.canvas, "noise": self.noise, "messages": len(s.messages)}
            self.say("\n".join(f"{k:22} {v}" for k, v in rows.items()), style="")
        elif name == "/save":
            if not arg:
                raise DgError("usage: /save FILE")
            text = json.dumps({"model": self.model_name, **s.to_json()}, indent=2)
            try:
                write_text_atomic(Path(arg).expanduser(), text)  # a failed write keeps the old file whole
            except OSError as e:
                raise DgError(f"cannot write {arg}: {e.strerror or first_line(e)}") from None
            self.say(f"saved {len(s.messages)} messages to {arg}")
        elif name == "/load":
            if not arg:
                raise DgError("usage: /load FILE")
            try:
                d = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DgError(f"cannot read {arg}: {e}") from None
            try:
                s.load_json(d)  # checks everything before it changes anything
            except DgError as e:
                raise DgError(f"cannot load {arg}: {e}") from None
            self.say(f"loaded {len(s.messages)} messages from {arg}")
        elif name == "/trace":
            from .trace import check_target

            if arg == "off":
                self.trace_all = self.trace_next = None
                self.say("tracing off")
            elif arg:
                self.trace_next = check_target(arg)
                self.say(f"the next answer will be traced to {arg}")
            else:
                self.say(f"tracing: next answer to {self.trace_next}" if self.trace_next else
                         f"tracing every answer to {self.trace_all} (numbered)" if self.trace_all else
                         "tracing off; /trace FILE traces the next answer")
        elif name == "/fill":
            if not arg:
                raise DgError("usage: /fill TEMPLATE, e.g. /fill Name: {{text:4}}, age {{int:3}}")
            from .template import parse

            self.answer(arg, template=parse(arg))  # a bad template is one red line, before any compute
        elif name == "/stats":
            self.say(format_stats(s.last, s.last_reused) if s.last else "no answer yet")
        else:
            self.say(f"unknown command {name}; /help lists them", style="red")
        return True

    def set(self, key: str, value: str) -> None:
        if key == "think":
            self.session.think = on_off(key, value)
        elif key == "canvas":
            self.canvas = on_off(key, value)
        elif key == "noise":
            if value not in NOISE_STYLES:
                raise DgError(f"noise is one of {', '.join(NOISE_STYLES)}")
            self.noise = value
        else:
            key = self.session.set(key, value)
        self.say(f"{key} = {value}")
