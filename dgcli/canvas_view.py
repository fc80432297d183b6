"""What the user sees while a generation runs: the live canvas, or plain streamed text.

Both views consume the event stream (dgcli/events.py) and nothing else: no torch, no model.
`CanvasView` draws the block being denoised as text in reading order inside a Rich `Live` region:
positions the sampler accepted this step bright, a template's pinned positions in cyan, the rest
(fresh noise) dimmed, or drawn as `·`,
or as the model's current draft; under it a step counter, a bar for the block, how many positions
this step accepted (acceptance is decided afresh each step: it is not progress), and tokens/s
(steps/s until the first block commits, so a one-block answer still shows a rate).
When a block commits, its text joins the committed text above the canvas and whole lines of it
move into the normal scrollback, so the answer stays in the terminal once the region is gone.
Rendering happens on Live's own timer thread (`fps` frames a second) from the latest event only:
`update()` just stores the event, so a slow terminal skips frames instead of slowing generation.
`PlainView` writes each block's committed text as it arrives (pipes, NO_COLOR, --no-canvas).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .events import BlockEvent, DoneEvent, PrefillEvent, StepEvent
from .units import format_bytes

NOISE_STYLES = ("text", "dots", "draft")  # how unaccepted positions are drawn
ACCEPTED, NOISE, DRAFT, COMMITTED, STATUS = "bold green", "dim", "dim italic", "", "dim"
PINNED = "cyan"  # a template's fixed positions (dg fill)


class TokenPieces:
    """Each token id as it reads inside running text, leading space included, cleaned for a terminal.

    The piece is decode([anchor, id]) minus decode([anchor]), which gets word boundaries right for
    SentencePiece, byte-level BPE and WordPiece alike. Pieces are cached: a canvas reuses many ids.
    """

    def __init__(self, tokenizer, anchor_text: str = "a"):
        self.tok = tokenizer
        ids = tokenizer.encode(anchor_text, add_special_tokens=False)
        self.anchor = ids[:1]
        self.anchor_str = tokenizer.decode(self.anchor, skip_special_tokens=False) if ids else ""
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            s = self.cache.get(i)
            if s is None:
                s = self.cache[i] = clean(self.piece(i))
            out.append(s)
        return out

    def piece(self, i: int) -> str:
        both = self.tok.decode(self.anchor + [i], skip_special_tokens=False)
        if self.anchor and both.startswith(self.anchor_str):
            return both[len(self.anchor_str):]
        return self.tok.decode([i], skip_special_tokens=False)


def clean(s: str) -> str:
    """One line of printable text: newlines become ↵, other control characters a space."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ("↵" if c == "\n" else " ") for c in s)


def format_stats(done: DoneEvent, reused: int = 0) -> str:
    """One line of statistics for a finished generation."""
    steps = done.steps_per_block
    parts = [
        f"{done.generated_tokens} tokens",
        f"{done.blocks} block{'s' if done.blocks != 1 else ''}",
        f"{sum(steps) / len(steps):.1f} steps/block" if steps else "0 steps",
        f"{done.tokens_per_second:.1f} tok/s",
        f"{done.tokens_per_forward:.2f} tok/forward",
        f"prompt {done.prompt_tokens} tok" + (f" (+{reused} cached)" if reused else "")
        + f" in {done.prefill_seconds:.2f}s",
        f"total {done.total_seconds:.2f}s",
    ]
    if done.peak_memory_bytes:
        parts.append(f"peak {format_bytes(done.peak_memory_bytes)}")
    parts.append(f"seed {done.seed}")
    return " · ".join(parts)


def consume(events, views) -> DoneEvent | None:
    """Feed every event to every view; close the generator whatever happens (that cancels it)."""
    done = None
    try:
        for ev in events:
            for v in views:
                v.update(ev)
            if isinstance(ev, DoneEvent):
                done = ev
    finally:
        events.close()
    return done


class PlainView:
    """Committed text only, written to a file (stdout) as each block commits; a newline at the end."""

    def __init__(self, file):
        self.file = file
        self.wrote = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.wrote and not self.wrote.endswith("\n"):
            self.file.write("\n")
        self.file.flush()

    def update(self, event) -> None:
        if isinstance(event, BlockEvent) and event.text:
            self.file.write(event.text)
            self.file.flush()
            self.wrote = event.text


class CanvasView:
    """The live canvas on a Rich console. Use as a context manager; feed it every event via update().

    pieces: maps token ids to display strings (a TokenPieces). show_text: also print the committed
    text (chat); off when the answer goes elsewhere (`dg run --canvas` with stdout piped).
    """

    def __init__(self, console: Console, pieces: Callable[[list[int]], list[str]], *, fps: float = 15.0,
                 noise: str = "text", show_text: bool = True):
        if noise not in NOISE_STYLES:
            raise ValueError(f"noise style must be one of {', '.join(NOISE_STYLES)}")
        self.console, self.pieces, self.noise, self.show_text = console, pieces, noise, show_text
        self.step: StepEvent | None = None  # latest step of the block being denoised
        self.tail = ""  # committed text not yet moved to the scrollback (the current line)
        self.committed_tokens = 0
        self.steps = 0  # denoising steps seen: the rate before any token is committed
        self.blocks = 0
        self.t0: float | None = None
        self.frames = 0
        self.finished = False
        self.live = Live(get_renderable=self.render, console=console, refresh_per_second=fps, transient=True,
                         redirect_stdout=False, redirect_stderr=False)

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()
        if self.show_text:
            self.console.print(Text(self.tail, style=COMMITTED), soft_wrap=True)
            self.tail = ""

    def update(self, event) -> None:
        """Called from the generating thread: store, never draw."""
        if isinstance(event, StepEvent):
            if self.t0 is None:
                self.t0 = time.perf_counter() - event.seconds
            self.steps += 1
            self.step = event
        elif isinstance(event, BlockEvent):
            self.blocks += 1
            self.committed_tokens += len(event.token_ids)
            self.step = None
            self.commit(event.text)
        elif isinstance(event, DoneEvent):
            self.committed_tokens = event.generated_tokens
            self.finished = True
        elif isinstance(event, PrefillEvent):
            self.t0 = None
            self.steps = 0

    def commit(self, text: str) -> None:
        """Add committed text; print every finished line (as wrapped on screen) above the live region."""
        if not self.show_text or not text:
            return
        lines = Text(self.tail + text).wrap(self.console, max(self.console.width, 1))
        # Live's own (re-entrant) lock: no frame may show the new tail before its lines are printed.
        with self.live._lock:
            self.tail = lines[-1].plain if len(lines) else ""
            for line in list(lines)[:-1]:
                self.live.console.print(Text(line.plain.rstrip(" "), style=COMMITTED), soft_wrap=True)

    def render(self):
        """One frame from the latest event (called on Live's timer thread)."""
        self.frames += 1
        ev = self.step
        body = Text(self.tail, style=COMMITTED)
        if self.finished:
            return body
        if ev is not None:
            body.append_text(self.canvas_text(ev, strip_first=not self.tail))
        status = self.status(ev)
        if not body.plain:
            return status
        status_rows = len(self.console.render_lines(status, self.console.options.update(height=None), pad=False))
        return Group(self.fit(body, self.console.height - status_rows), status)

    def fit(self, body: Text, room: int) -> Text:
        """The body cropped to `room` rows (the terminal's height less the status line's): Live would
        otherwise crop the frame's bottom, and the status line would vanish in a short terminal."""
        room = max(room, 1)
        lines = body.wrap(self.console, max(self.console.width, 1))
        if len(lines) <= room:
            return body
        more = Text("… (the canvas goes on below the screen)", style=STATUS)
        return Text("\n").join([*list(lines)[:room - 1], more])

    def canvas_text(self, ev: StepEvent, strip_first: bool = False) -> Text:
        shown = ev.argmax if self.noise == "draft" else ev.canvas
        pieces = self.pieces(shown)
        out = Text()
        for i, (piece, acc) in enumerate(zip(pieces, ev.accepted)):
            if strip_first and i == 0:
                piece = piece.lstrip()
            if ev.pinned is not None and ev.pinned[i]:
                out.append(piece, style=PINNED)
            elif acc:
                out.append(piece, style=ACCEPTED)
            elif self.noise == "dots":
                out.append(" ·" if piece.startswith(" ") else "·", style=NOISE)
            else:
                out.append(piece, style=NOISE if self.noise == "text" else DRAFT)
        return out

    def status(self, ev: StepEvent | None) -> Table:
        grid = Table.grid(padding=(0, 1))
        elapsed = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        rate = self.rate(elapsed)
        if ev is None:
            what = "reading the prompt" if self.t0 is None else "committing"
            grid.add_row(Text(f"block {self.blocks + 1:>2}", style=STATUS), Text(what, style=STATUS),
                         Text(rate, style=STATUS))
        else:
            free = len(ev.accepted) - (sum(ev.pinned) if ev.pinned else 0)  # a template's holes only
            accepted = sum(a and not (ev.pinned and ev.pinned[i]) for i, a in enumerate(ev.accepted))
            grid.add_row(
                Text(f"block {ev.block + 1:>2}", style=STATUS),
                ProgressBar(total=ev.max_steps, completed=ev.step, width=16),
                Text(f"step {ev.step:>2}/{ev.max_steps}", style=STATUS),
                Text(f"{accepted:>3}/{free} accepted this step", style=STATUS),
                Text(rate, style=STATUS),
            )
        return grid

    def rate(self, elapsed: float) -> str:
        """Committed tokens per second; before the first commit (all of a one-block answer) there are
        none yet, so the denoising steps per second instead of a dash."""
        if elapsed <= 0:
            return "    — tok/s"
        if self.committed_tokens:
            return f"{self.committed_tokens / elapsed:6.1f} tok/s"
        if self.steps:
            return f"{self.steps / elapsed:6.1f} steps/s"
        return "    — tok/s"
