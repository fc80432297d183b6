"""`dg chat`: the conversation (ChatSession) and the interactive loop around it (Repl).

ChatSession re-renders the whole conversation with the chat template each turn and reuses the KV
cache of earlier turns: it keeps cache snapshots (free: the cache's tensors are never written in
place) for the ids they hold, and when a new prompt starts with those ids only the rest is encoded.
Two snapshots per turn: after the conversation up to the user's message (templates usually render
a finished assistant turn differently from the generation prompt, so this is the one that matches
next turn), and after the whole prompt (it matches when the template renders turns the same way).
Repl reads input with prompt-toolkit (history file, Alt-Enter or a \"\"\" block for several lines),
handles slash commands, and shows each answer through a canvas_view. Ctrl-C stops the turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.text import Text

from . import store
from .canvas_view import NOISE_STYLES, CanvasView, PlainView, TokenPieces, consume, format_stats
from .errors import DgError
from .events import BlockEvent, DoneEvent, Event, PrefillEvent
from .api import prefill, prompt_ids, sampler_settings, stream_generate

SETTINGS = {"max_new_tokens": int, "max_denoising_steps": int, "entropy_bound": float, "t_min": float,
            "t_max": float, "stability_threshold": int, "confidence_threshold": float, "seed": int}
ALIASES = {"max_tokens": "max_new_tokens", "steps": "max_denoising_steps"}


def snapshot(cache):
    """A copy of the reference KVCache; it shares the tensors, which are never modified in place."""
    return cache.copy()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model; no terminal I/O. `turn(text)` yields the engine's events.

    Earlier turns' K/V are reused. The reference cache (CPU) is snapshotted for free at each prompt.
    The static cache (CUDA, where the denoising steps replay CUDA graphs) is written in place, so
    there is one, kept across turns with the tokens it holds: rolled back to where a new prompt
    diverges from them if its rings reach, else rewound to the end of the last user message
    (marked after its prefill). Its graphs stay valid from turn to turn.
    """

    def __init__(self, model, tokenizer, *, settings: dict | None = None, system: str | None = None,
                 think: bool = False, reuse_cache: bool = True, static_cache: bool | None = None,
                 context: int = 32768):
        self.model, self.tokenizer = model, tokenizer
        self.settings = dict(settings or {})
        self.system, self.think, self.reuse_cache = system, think, reuse_cache
        self.messages: list[dict] = []  # user/assistant turns; an interrupted answer has "interrupted": True
        self.last: DoneEvent | None = None
        self.last_reused = 0  # prompt tokens the last turn took from the cache
        self.snapshots: list[tuple[list[int], object]] = []  # reference cache: (ids, cache at ids)
        self.static = model.device.type == "cuda" if static_cache is None else static_cache
        self.context = context  # tokens the static cache holds
        self.live: tuple[list[int], object] | None = None  # static cache: (its tokens, the cache)

    def conversation(self) -> list[dict]:
        msgs = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return ([{"role": "system", "content": self.system}] if self.system else []) + msgs

    def clear(self) -> None:
        self.messages, self.snapshots, self.last, self.last_reused = [], [], None, 0
        if self.live is not None:
            self.live = ([], self.live[1])

    def cached_prefix(self, ids: list[int]):
        """(cache, n): a cache holding ids[:n] already, n as large as the cache allows."""
        if self.static:
            if self.live is None:
                self.live = ([], self.model.new_cache(static=True, max_tokens=self.context))
            tokens, cache = self.live
            n = min(common_prefix(tokens[:cache.length], ids), len(ids) - 1) if self.reuse_cache else 0
            if cache.truncate(n):
                return cache, n
            if cache.marked_length is not None and cache.marked_length <= n:  # the last prompt
                cache.rewind()
                return cache, cache.length
            cache.reset()  # the rings no longer reach back there
            return cache, 0
        best = max((s for s in self.snapshots if ids[:len(s[0])] == s[0]), key=lambda s: len(s[0]), default=None)
        if best is None or not self.reuse_cache:
            return self.model.new_cache(), 0
        return snapshot(best[1]), len(best[0])

    def prefill(self, cache, ids: list[int]) -> PrefillEvent:
        return prefill(self.model, ids, cache)

    def turn(self, text: str) -> Iterator[Event]:
        """Add a user message and yield the answer's events. Closing it early (Ctrl-C) keeps the
        committed part in the transcript, marked interrupted; an error takes the message back."""
        self.messages.append({"role": "user", "content": text})
        committed, done, snaps = "", None, []
        try:
            msgs = self.conversation()
            ids = prompt_ids(self.tokenizer, msgs, think=self.think)
            history = self.tokenizer.encode(self.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=False, enable_thinking=self.think), add_special_tokens=False)
            cache, start = self.cached_prefix(ids)
            self.last_reused, extra_s = start, 0.0
            blocks: list[int] = []  # static cache: it holds (ids + blocks)[:cache.length]
            if self.reuse_cache and start < len(history) < len(ids) and ids[:len(history)] == history:
                # The conversation so far, without the generation prompt: the next turn's prompt
                # starts with it, whatever this answer turns out to be.
                extra_s = self.prefill(cache, ids[start:len(history)]).seconds
                if self.static:
                    cache.mark()
                else:
                    snaps.append((history, snapshot(cache)))
                start = len(history)
            events = stream_generate(self.model, self.tokenizer, ids[start:], cache=cache, **self.settings)
            try:
                for ev in events:
                    if isinstance(ev, PrefillEvent) and not self.static:
                        snaps.append((ids, snapshot(cache)))
                    if isinstance(ev, PrefillEvent):
                        ev.prompt_tokens += start - self.last_reused  # what this turn encoded in both calls
                        ev.seconds += extra_s
                    elif isinstance(ev, BlockEvent):
                        committed += ev.text
                        blocks += ev.token_ids
                    elif isinstance(ev, DoneEvent):
                        ev.prompt_tokens += start - self.last_reused
                        ev.prefill_seconds += extra_s
                        ev.total_seconds += extra_s
                        done = ev
                    yield ev
            finally:
                events.close()
                if self.static:
                    self.live = ((ids + blocks)[:cache.length], cache)
        except (DgError, ValueError):
            self.messages.pop()
            raise
        except BaseException:  # closed by the consumer, or Ctrl-C inside the engine
            self.messages.append({"role": "assistant", "content": committed, "interrupted": True})
            self.snapshots = snaps
            raise
        self.messages.append({"role": "assistant", "content": done.text if done else committed})
        self.snapshots, self.last = snaps, done

    # ---- settings and transcript ----

    def set(self, key: str, value: str) -> str:
        """Change a sampling setting from text ('none' unsets it); returns the canonical name."""
        key = ALIASES.get(key, key)
        if key == "temperature":
            try:
                t = float(value)
            except ValueError:
                raise DgError(f"temperature needs a number, got '{value}'") from None
            new = {**self.settings, "t_max": t, "t_min": t / 2}
        elif key in SETTINGS:
            new = dict(self.settings)
            if value.lower() in ("none", "default"):
                new.pop(key, None)
            else:
                try:
                    new[key] = SETTINGS[key](value)
                except ValueError:
                    raise DgError(f"{key} needs a number, got '{value}'") from None
        else:
            raise DgError(f"unknown setting '{key}'; known: {', '.join([*SETTINGS, 'temperature'])}")
        sampler_settings(self.model, **new)  # raises ConfigError with the reason
        self.settings = new
        return key

    def effective_settings(self) -> dict:
        s = sampler_settings(self.model, **self.settings).__dict__
        return {k: s[k] for k in SETTINGS}

    def to_json(self) -> dict:
        return {"system": self.system, "think": self.think, "settings": self.settings, "messages": self.messages}

    def load_json(self, d: dict) -> None:
        msgs = d.get("messages") if isinstance(d, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
            raise DgError("not a dg conversation: expected an object with a 'messages' list of {role, content}")
        self.clear()
        self.messages = msgs
        self.system = d.get("system") or None
        self.think = bool(d.get("think", self.think))
        self.settings = dict(d.get("settings") or self.settings)


HELP = """commands:
  /help                 this list
  /clear                forget the conversation
  /system TEXT          set the system prompt (/system alone removes it)
  /set KEY VALUE        change a setting: max_new_tokens (max_tokens), max_denoising_steps (steps),
                        entropy_bound, t_min, t_max, temperature (t_max=T, t_min=T/2),
                        stability_threshold, confidence_threshold, seed, think on|off,
                        canvas on|off, noise text|dots|draft; VALUE 'none' restores the default
  /show                 the settings in use
  /save FILE, /load FILE  the conversation as JSON
  /stats                numbers for the last answer
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


def prompt_toolkit_reader(input=None, output=None) -> Callable[[str], str]:
    """prompt-toolkit input with a history file; Enter sends unless a \"\"\" block is open."""
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
    return lambda prompt: session.prompt(prompt)


def line_reader(stream) -> Callable[[str], str]:
    """Plain input (stdin not a terminal): one line per message, or a \"\"\" block."""
    def read(prompt: str) -> str:
        text = ""
        while True:
            line = stream.readline()
            if not line:
                if text:
                    return text
                raise EOFError
            text += line
            if not needs_more(text):
                return text.rstrip("\n")
    return read


class Repl:
    def __init__(self, session: ChatSession, console: Console, read: Callable[[str], str], *,
                 canvas: bool = True, noise: str = "text", fps: float = 15.0, model_name: str = ""):
        self.session, self.console, self.read = session, console, read
        self.canvas, self.noise, self.fps, self.model_name = canvas, noise, fps, model_name
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
                except DgError as e:
                    self.say(f"error: {e}", style="red")
                continue
            self.answer(unquote(line))

    def answer(self, text: str) -> None:
        events = self.session.turn(text)
        if self.canvas:
            view = CanvasView(self.console, self.pieces, fps=self.fps, noise=self.noise)
        else:
            view = PlainView(self.console.file)
        try:
            with view:
                consume(events, [view])
        except KeyboardInterrupt:
            self.say("[interrupted]", style="yellow")
            return
        except DgError as e:
            self.say(f"error: {e}", style="red")
            return
        if self.session.last is not None:
            self.say(format_stats(self.session.last, self.session.last_reused))

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
            Path(arg).expanduser().write_text(json.dumps({"model": self.model_name, **s.to_json()}, indent=2))
            self.say(f"saved {len(s.messages)} messages to {arg}")
        elif name == "/load":
            if not arg:
                raise DgError("usage: /load FILE")
            try:
                d = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DgError(f"cannot read {arg}: {e}") from None
            s.load_json(d)
            self.say(f"loaded {len(s.messages)} messages from {arg}")
        elif name == "/stats":
            self.say(format_stats(s.last, s.last_reused) if s.last else "no answer yet")
        else:
            self.say(f"unknown command {name}; /help lists them", style="red")
        return True

    def set(self, key: str, value: str) -> None:
        on = value.lower() in ("on", "true", "1", "yes")
        if key == "think":
            self.session.think = on
        elif key == "canvas":
            self.canvas = on
        elif key == "noise":
            if value not in NOISE_STYLES:
                raise DgError(f"noise is one of {', '.join(NOISE_STYLES)}")
            self.noise = value
        else:
            key = self.session.set(key, value)
        self.say(f"{key} = {value}")
