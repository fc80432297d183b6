"""dg chat without a terminal: ChatSession (cache reuse, interruption, settings) and Repl (commands, Ctrl-C)."""

import io
import json

import pytest
from rich.console import Console

import dgcli
from dgcli.errors import ConfigError, DgError
from dgcli.events import BlockEvent, DoneEvent, PrefillEvent, StepEvent
from dgcli.api import prompt_ids
from dgcli.engine import Engine
from dgcli.repl import Repl, line_reader, needs_more, prompt_toolkit_reader, unquote
from dgcli.session import ChatSession

FAST = {"max_new_tokens": 16, "max_denoising_steps": 2, "seed": 11}
# Reused and fresh prompts are encoded in different chunks, so K/V differ by float noise (~1e-6).
# The tiny random model amplifies such noise about tenfold per step through self-conditioning, so
# token identity is asserted over two steps a block (and two blocks); beyond, the first step's entropies.
EXACT = {"max_new_tokens": 300, "max_denoising_steps": 2, "seed": 11}


def run_turn(session, text):
    events = list(session.turn(text))
    return next(e for e in events if isinstance(e, PrefillEvent)), events[-1]


def steps_of(events):
    return [e for e in events if isinstance(e, StepEvent)]


def test_second_turn_reuses_the_cache(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, settings=FAST)
    p1, _ = run_turn(s, "hello there")
    assert s.last_reused == 0 and p1.prompt_tokens == len(prompt_ids(tok, [{"role": "user", "content": "hello there"}]))
    p2, d2 = run_turn(s, "tell me more")
    full = prompt_ids(tok, s.conversation()[:-1])
    assert s.last_reused > 0 and p2.prompt_tokens == len(full) - s.last_reused < len(full)
    assert isinstance(d2, DoneEvent) and d2.prompt_tokens == p2.prompt_tokens
    assert s.messages[-1] == {"role": "assistant", "content": d2.text}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_reused_answer_is_the_fresh_answer(tiny, seed):
    model, tok = tiny
    settings = {**EXACT, "seed": seed}
    s = ChatSession(model, tok, settings=settings)
    for text in ("hello there", "tell me more", "and then?"):
        events = list(s.turn(text))
        fresh = list(dgcli.stream_generate(model, tok, s.conversation()[:-1], **settings))
        assert events[-1].token_ids == fresh[-1].token_ids and events[-1].text == fresh[-1].text
    assert s.last_reused > 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
@pytest.mark.usefixtures("sdpa_layout")
def test_static_cache_session_rolls_back_and_answers_as_fresh(tiny, seed):
    """The CUDA way (one static cache kept across turns, truncated where a prompt diverges), on the CPU."""
    model, tok = tiny
    settings = {**EXACT, "seed": seed}
    s = ChatSession(Engine(model.model, model.sampler_defaults, static_cache=True), tok, settings=settings, context=4096)
    cache, reused = None, []
    for text in ("hello there", "tell me more", "and then?"):
        events = list(s.turn(text))
        fresh = list(dgcli.stream_generate(model, tok, s.conversation()[:-1], **settings))
        assert events[-1].token_ids == fresh[-1].token_ids and events[-1].text == fresh[-1].text
        tokens, c = s.tokens, s.cache
        assert cache is None or c is cache  # the same buffers (and CUDA graphs) all along
        cache = c
        assert len(tokens) == cache.length
        reused.append(s.last_reused)
    # Each turn reuses at least the conversation up to the previous user message (the mark).
    assert reused[0] == 0 and 0 < reused[1] < reused[2]
    s.system = "be brief"  # diverges at the first tokens: rolled back to nothing
    events = list(s.turn("hi"))
    assert s.last_reused == 0 and isinstance(events[-1], DoneEvent)


def test_static_cache_context_full_is_a_clear_error(tiny):
    s = ChatSession(Engine(tiny[0].model, tiny[0].sampler_defaults, static_cache=True), tiny[1], settings=FAST, context=64)
    with pytest.raises(DgError, match="too long: .* holds"):
        list(s.turn("hello " * 80))
    assert s.messages == []
    s.clear()
    assert run_turn(s, "hi")[0].prompt_tokens < 64  # the session goes on


def first_step(events):
    """The first StepEvent; the generation is then cancelled."""
    try:
        return next(e for e in events if isinstance(e, StepEvent))
    finally:
        events.close()


def test_reused_logits_match_the_fresh_ones(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, settings=FAST)
    run_turn(s, "hello there")
    a = first_step(s.turn("tell me more"))
    b = first_step(dgcli.stream_generate(model, tok, s.conversation()[:-1], **FAST))
    assert s.last_reused > 0 and a.canvas == b.canvas
    assert max(abs(x - y) for x, y in zip(a.entropy, b.entropy)) < 1e-3


def test_reuse_can_be_turned_off(tiny):
    s = ChatSession(*tiny, settings=FAST, reuse_cache=False)
    run_turn(s, "hello")
    p, _ = run_turn(s, "again")
    assert s.last_reused == 0 and p.prompt_tokens == len(prompt_ids(tiny[1], s.conversation()[:-1]))


def test_think_mode_reuses_the_whole_previous_prompt(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, settings=FAST, think=True)
    run_turn(s, "hello")
    first = prompt_ids(tok, [{"role": "user", "content": "hello"}], think=True)
    run_turn(s, "again")
    assert s.last_reused == len(first)


def test_changing_the_system_prompt_rolls_back_to_where_it_diverges(tiny):
    s = ChatSession(*tiny, settings=FAST)
    run_turn(s, "hello")
    before = prompt_ids(tiny[1], s.conversation())
    s.system = "you are terse"
    run_turn(s, "again")
    after = prompt_ids(tiny[1], s.conversation()[:-1])
    shared = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert s.last_reused == shared < 4  # only the tokens before the system turn


def test_interrupted_turn_keeps_the_committed_text(tiny):
    s = ChatSession(*tiny, settings={"max_new_tokens": 600, "max_denoising_steps": 2, "seed": 1})
    events = s.turn("hello")
    block = None
    for ev in events:
        if isinstance(ev, BlockEvent):
            block = ev
            break
    events.close()
    assert not block.finished
    assert s.messages[-1] == {"role": "assistant", "content": block.text, "interrupted": True}
    assert s.last is None
    run_turn(s, "go on")  # the conversation continues, reusing the cache up to the interrupted turn
    assert s.last_reused > 0 and len(s.messages) == 4


def test_a_failing_turn_takes_the_message_back(tiny):
    s = ChatSession(*tiny, settings={"t_min": 0.9, "t_max": 0.1})
    with pytest.raises(ConfigError):
        list(s.turn("hello"))
    assert s.messages == []


def test_set_validates_and_converts(tiny):
    s = ChatSession(*tiny)
    assert s.set("steps", "4") == "max_denoising_steps" and s.settings == {"max_denoising_steps": 4}
    s.set("temperature", "0.6")
    assert s.settings["t_max"] == 0.6 and s.settings["t_min"] == 0.3
    with pytest.raises(ConfigError):
        s.set("t_min", "0.9")
    assert s.settings["t_min"] == 0.3
    with pytest.raises(DgError, match="unknown setting"):
        s.set("top_p", "0.9")
    with pytest.raises(DgError, match="needs a number"):
        s.set("seed", "abc")
    s.set("max_denoising_steps", "none")
    assert "max_denoising_steps" not in s.settings and s.effective_settings()["max_denoising_steps"] == 48


class Script:
    """A reader that returns scripted lines and raises scripted exceptions, then EOF."""

    def __init__(self, *items):
        self.items = list(items)

    def __call__(self, prompt):
        if not self.items:
            raise EOFError
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def make_repl(tiny, *lines, **kw):
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None)
    kw.setdefault("canvas", False)
    repl = Repl(ChatSession(*tiny, settings=dict(FAST)), console, Script(*lines), model_name="tiny", **kw)
    return repl, out


def test_slash_commands(tiny, tmp_path):
    f = tmp_path / "conv.json"
    repl, out = make_repl(tiny, "/help", "/set max_tokens 24", "/set think on", "/system be brief", "hello",
                          "/stats", "/show", f"/save {f}", "/clear", "/show", f"/load {f}", "/bogus",
                          "/set seed", "/set top_p 1", "/exit", "never read")
    repl.run()
    text = out.getvalue()
    assert "/system TEXT" in text and "max_new_tokens = 24" in text and "think = on" in text
    assert text.count("tokens ·") == 2 and "seed 11" in text
    assert "max_new_tokens         24" in text and "system                 be brief" in text
    saved = json.loads(f.read_text())
    assert saved["system"] == "be brief" and saved["think"] is True and saved["model"] == "tiny"
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert "messages               0" in text and "loaded 2 messages" in text
    assert repl.session.messages == saved["messages"] and repl.session.settings["max_new_tokens"] == 24
    assert "unknown command /bogus" in text and "usage: /set KEY VALUE" in text and "unknown setting" in text
    assert repl.read.items == ["never read"]  # /exit left the loop


def test_load_rejects_other_json(tiny, tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"hello": 1}')
    repl, out = make_repl(tiny, f"/load {f}", f"/load {tmp_path / 'missing.json'}")
    repl.run()
    assert "not a dg conversation" in out.getvalue() and "cannot read" in out.getvalue()


def test_ctrl_c_at_the_prompt_needs_a_second_press(tiny):
    repl, out = make_repl(tiny, KeyboardInterrupt(), "/show", KeyboardInterrupt(), KeyboardInterrupt(), "/help")
    repl.run()
    text = out.getvalue()
    assert text.count("Ctrl-C again") == 2 and "max_new_tokens" in text  # /show ran between the presses
    assert repl.read.items == ["/help"]  # two presses in a row left


def test_ctrl_c_during_an_answer_returns_to_the_prompt(tiny, monkeypatch):
    import dgcli.repl as repl_mod

    class InterruptingView(repl_mod.PlainView):
        def update(self, event):
            super().update(event)
            if isinstance(event, BlockEvent):
                raise KeyboardInterrupt

    monkeypatch.setattr(repl_mod, "PlainView", InterruptingView)
    repl, out = make_repl(tiny, "/set max_tokens 2048", "/set steps 2", "hello", "/show")
    repl.run()
    text = out.getvalue()
    msgs = repl.session.messages
    assert "[interrupted]" in text and "max_denoising_steps    2" in text  # the loop went on to /show
    assert msgs[-1]["interrupted"] is True and msgs[-1]["content"] and msgs[-1]["content"] in text


def test_canvas_view_is_used_when_asked(tiny):
    repl, out = make_repl(tiny, "hello", canvas=True)
    repl.run()
    assert repl.session.last is not None
    assert repl.session.last.text.split()[:3] == out.getvalue().split("\n", 1)[1].split()[:3]


def test_multiline_helpers():
    assert needs_more('"""') and needs_more('"""first line\nsecond') and not needs_more('"""a\nb"""')
    assert not needs_more("plain") and unquote('"""\na\nb\n"""') == "a\nb" and unquote("x") == "x"
    read = line_reader(io.StringIO('one\n"""\ntwo\nthree\n"""\nfour'))
    assert [read(""), read(""), read("")] == ["one", '"""\ntwo\nthree\n"""', "four"]
    with pytest.raises(EOFError):
        read("")


def test_prompt_toolkit_keys(tmp_path, monkeypatch):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    monkeypatch.setenv("DG_HOME", str(tmp_path))
    with create_pipe_input() as inp:
        read = prompt_toolkit_reader(input=inp, output=DummyOutput())
        inp.send_text("first\x1b\rsecond\r")  # Alt-Enter adds a line, Enter sends
        assert read(">>> ") == "first\nsecond"
        inp.send_text('"""\rline a\rline b"""\r')  # Enter inside a """ block adds a line
        assert read(">>> ") == '"""\nline a\nline b"""'
        inp.send_text("some text\x03again\r")  # Ctrl-C with text clears the line
        assert read(">>> ") == "again"
        inp.send_text("\x03")  # Ctrl-C on an empty line
        with pytest.raises(KeyboardInterrupt):
            read(">>> ")
    assert "first" in (tmp_path / "chat_history").read_text()  # history survives the session


def test_prompt_toolkit_input_that_is_not_utf8_is_replaced_once(tmp_path, monkeypatch):
    """A Latin-1 terminal types b'caf\\xe9': prompt-toolkit hands over a lone surrogate, which the
    tokenizer would refuse; the reader replaces it and says so once."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from dgcli.repl import InputText

    monkeypatch.setenv("DG_HOME", str(tmp_path))
    notices = []
    with create_pipe_input() as inp:
        read = prompt_toolkit_reader(input=inp, output=DummyOutput(), decode=InputText(notices.append))
        inp.send_bytes(b"caf\xe9\r")
        assert read(">>> ") == "caf\ufffd"
        inp.send_bytes(b"na\xefve\r")
        assert read(">>> ") == "na\ufffdve"
    assert len(notices) == 1 and "not valid UTF-8" in notices[0]
