"""The canvas renderer from events alone (synthetic and from the tiny model), and the plain view."""

import io

import pytest
from rich.console import Console

import dgcli
from dgcli.canvas_view import ACCEPTED, NOISE, CanvasView, PlainView, TokenPieces, clean, consume, format_stats
from dgcli.events import BlockEvent, DoneEvent, PrefillEvent, StepEvent


def terminal(width=60):
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=True, color_system="truecolor"), out


def step(canvas, accepted, argmax=None, n=1, block=0):
    return StepEvent(block=block, step=n, max_steps=8, canvas=canvas, accepted=accepted, argmax=argmax or canvas,
                     entropy=[0.0] * len(canvas), temperature=0.5, stopped=False, seconds=0.01)


def words(ids):
    return [f" w{i}" for i in ids]


def test_token_pieces_read_as_running_text(tiny):
    tok = tiny[1]
    ids = tok.encode("the cats ran, then a dog.", add_special_tokens=False)
    pieces = TokenPieces(tok)(ids)
    assert "".join(pieces).strip() == tok.decode(ids)
    assert pieces[0] == " the" and any(p == "s" for p in pieces)  # a word-piece continuation has no space


def test_clean_keeps_one_line():
    assert clean(" a\nb\tc\x07") == " a↵b c " and clean("plain") == "plain"


def test_canvas_text_styles():
    console, _ = terminal()
    view = CanvasView(console, words)
    text = view.canvas_text(step([1, 2, 3], [True, False, True]), strip_first=True)
    assert text.plain == "w1 w2 w3"
    styles = {text.plain[s.start:s.end]: s.style for s in text.spans}
    assert styles == {"w1": ACCEPTED, " w2": NOISE, " w3": ACCEPTED}


def test_noise_styles():
    console, _ = terminal()
    ev = step([1, 2, 3], [True, False, False], argmax=[1, 7, 8])
    assert CanvasView(console, words, noise="dots").canvas_text(ev).plain == " w1 · ·"
    assert CanvasView(console, words, noise="draft").canvas_text(ev).plain == " w1 w7 w8"
    with pytest.raises(ValueError):
        CanvasView(console, words, noise="sparkles")


def test_frame_shows_status_and_committed_tail():
    console, _ = terminal(80)
    view = CanvasView(console, words)
    view.update(PrefillEvent(prompt_tokens=3, cached_tokens=3, seconds=0.0))
    view.update(step([1, 2], [True, False], n=3))
    record = Console(record=True, width=80, file=io.StringIO())
    record.print(view.render())
    frame = record.export_text()
    assert "w1 w2" in frame and "block  1" in frame and "step  3/8" in frame and "1/2 accepted" in frame


@pytest.mark.parametrize("height", [4, 10, 40])
def test_status_line_survives_a_short_terminal(height):
    """A 256-token canvas is ~20 rows at 80 columns: the frame fits the screen, status line last."""
    console = Console(file=io.StringIO(), width=80, height=height, force_terminal=True)
    view = CanvasView(console, words)
    view.update(PrefillEvent(prompt_tokens=3, cached_tokens=3, seconds=0.0))
    view.update(step(list(range(256)), [i % 3 == 0 for i in range(256)], n=5))
    lines = console.render_lines(view.render(), console.options.update(height=None), pad=False)
    text = ["".join(seg.text for seg in line).rstrip() for line in lines]
    assert len(text) <= height and "step  5/8" in text[-1] and "steps/s" in text[-1], text  # one row at 80 columns
    assert ("goes on below the screen" in "".join(text)) == (height < 40)


def test_commit_moves_whole_lines_to_the_scrollback():
    console, out = terminal(20)
    text = "alpha beta gamma delta epsilon zeta eta theta"
    with CanvasView(console, words, fps=50) as view:
        view.update(step([1, 2], [True, True]))
        view.update(BlockEvent(block=0, token_ids=[1, 2], steps=1, finished=False, text=text))
        assert view.step is None and 0 < len(view.tail) <= 20  # only the last screen line stays live
        assert len(view.tail) < len(text) and text.endswith(view.tail.rstrip())
        view.update(BlockEvent(block=1, token_ids=[3], steps=1, finished=True, text=" iota"))
    printed = out.getvalue()
    for w in text.split() + ["iota"]:
        assert w in printed


def test_updates_never_draw_so_a_slow_terminal_skips_frames_instead_of_slowing_generation():
    console, out = terminal()
    view = CanvasView(console, words, fps=10)  # not started: nothing but Live's timer would draw
    before = view.frames
    for i in range(400):
        view.update(step([i % 50] * 64, [i % 2 == 0] * 64, n=i % 8 + 1))
    assert view.frames == before and out.getvalue() == ""
    console.print(view.render())  # what one timer tick draws: the latest event only
    assert view.frames == before + 1 and " w49" in out.getvalue() and " w48" not in out.getvalue()
    assert "step  8/8" in out.getvalue()


def test_canvas_on_the_tiny_model_ends_with_the_answer(tiny):
    console, out = terminal(100)
    events = dgcli.stream_generate(*tiny, "hello", max_new_tokens=300, max_denoising_steps=2, seed=4)
    with CanvasView(console, TokenPieces(tiny[1]), fps=50) as view:
        done = consume(events, [view])
    printed = out.getvalue()
    assert done.text and done.text.split()[-1] in printed
    assert "\x1b[" in printed  # it drew on the terminal


def test_plain_view_writes_blocks_and_a_final_newline():
    f = io.StringIO()
    with PlainView(f) as v:
        for text in ("one ", "two"):
            v.update(BlockEvent(block=0, token_ids=[], steps=1, finished=False, text=text))
        v.update(step([1], [True]))
    assert f.getvalue() == "one two\n"


def test_consume_closes_the_generator_on_error():
    closed = []

    def gen():
        try:
            yield PrefillEvent(prompt_tokens=1, cached_tokens=1, seconds=0.0)
            yield PrefillEvent(prompt_tokens=1, cached_tokens=1, seconds=0.0)
        finally:
            closed.append(True)

    class Boom:
        def update(self, ev):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consume(gen(), [Boom()])
    assert closed == [True]


def test_format_stats():
    done = DoneEvent(token_ids=[1] * 10, finish_reason="eos", prompt_tokens=5, generated_tokens=8, blocks=2,
                     steps_per_block=[3, 5], prefill_seconds=0.1, denoise_seconds=0.3, commit_seconds=0.1,
                     total_seconds=0.5, seed=9, peak_memory_bytes=2_500_000_000)
    line = format_stats(done, reused=12)
    assert line.startswith("8 tokens · 2 blocks · 4.0 steps/block · 20.0 tok/s")
    assert "prompt 5 tok (+12 cached)" in line and "peak 2.5 GB" in line and line.endswith("seed 9")
