"""Bad input never crashes dg: bytes that are not UTF-8 (piped, in argv, on chat's stdin), failing or
malformed slash commands, settings loaded from a file, a closed stdin, flags that contradict."""

import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dgcli import cli
from dgcli.api import prompt_ids
from dgcli.errors import DgError
from dgcli.repl import InputText, Repl, line_reader
from dgcli.session import ChatSession

FAST = ["-m", "tiny", "--max-tokens", "16", "--steps", "2", "--device", "cpu", "--seed", "3"]
SETTINGS = {"max_new_tokens": 16, "max_denoising_steps": 2, "seed": 11}
NOTICE = "is not valid UTF-8"


def invoke(args, **kw):
    r = CliRunner().invoke(cli.app, args, **kw)
    assert "Traceback" not in r.stderr, r.stderr
    return r


# ---- bytes that are not UTF-8 ----------------------------------------------------------------------

@pytest.mark.parametrize("data, text", [
    (b"caf\xe9", "caf\ufffd"),  # Latin-1
    ("caf\udce9", "caf\ufffd"),  # argv, or a C-locale stdin: the bad byte as a lone surrogate
    ("\ud800x", "\ufffd\ufffd\ufffdx"),  # a surrogate that is no byte
    (b"\xff\xfe\x00binary", "\ufffd\ufffd\x00binary"),
    ("café", "café"), (b"caf\xc3\xa9", "café"), (None, None),
])
def test_input_text_replaces_bad_bytes(data, text):
    notes = []
    decode = InputText(notes.append)
    assert decode(data) == text and decode(data) == text
    assert len(notes) == (0 if text in ("café", None) else 1)  # once, however often


@pytest.mark.parametrize("args, stdin, prompt, system", [
    (["Summarize:"], b"caf\xe9\n", "Summarize:\n\ncaf\ufffd", None),
    (["caf\udce9"], b"", "caf\ufffd", None),
    (["-s", "be \udcff", "hi"], b"", "hi", "be \ufffd"),
    (["-s", "\udcff", "a\udce9"], b"\xff\xfe\x00\n", "a\ufffd\n\n\ufffd\ufffd\x00", "\ufffd"),
], ids=["stdin", "argv", "system", "all"])
def test_run_decodes_bad_bytes_with_one_notice(tiny, args, stdin, prompt, system):
    r = invoke(["run", *FAST, "--json", *args], input=stdin)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count(NOTICE) == 1 and r.stderr.count("\n") == 1
    assert json.loads(r.stdout)["prompt_tokens"] == len(prompt_ids(tiny[1], prompt, system=system))


def test_chat_decodes_binary_stdin_and_goes_on(tiny):
    r = invoke(["chat", *FAST, "--no-canvas", "-s", "x\udcff"], input=b"hi \xff\xfe\n\x80\x81\n/show\n")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count(NOTICE) == 1
    assert "system                 x\ufffd" in r.stdout and "messages               4" in r.stdout


def test_line_reader_reads_bytes_and_fails_in_one_line():
    notes = []
    read = line_reader(io.BytesIO(b"caf\xe9\n\xff\n"), InputText(notes.append))
    assert [read(""), read("")] == ["caf\ufffd", "\ufffd"] and len(notes) == 1
    with pytest.raises(EOFError):
        read("")

    class Broken(io.StringIO):
        def readline(self, *a):
            raise OSError(5, "Input/output error")

    with pytest.raises(DgError, match="cannot read the input: .*Input/output error"):
        line_reader(Broken())("")


# ---- slash commands: a failure is one red line, and the chat goes on ---------------------------------

def make_repl(tiny, *lines):
    """A Repl reading `lines` and then /show (to prove the chat went on), then EOF."""
    items = [*lines, "/show"]

    def read(prompt):
        if not items:
            raise EOFError
        return items.pop(0)

    out = io.StringIO()
    repl = Repl(ChatSession(*tiny, settings=dict(SETTINGS)), Console(file=out, width=100, color_system=None), read,
                canvas=False, model_name="tiny")
    return repl, out


def conversation(tmp_path, **fields):
    f = tmp_path / "conv.json"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}))
    return f


@pytest.mark.parametrize("command, error", [
    ("/save {tmp}/missing/dir/x.json", "cannot write {tmp}/missing/dir/x.json: No such file or directory"),
    ("/save {tmp}", "cannot write {tmp}: Is a directory"),
    ("/load {tmp}", "cannot read {tmp}"),
    ("/load {tmp}/latin1.json", "cannot read {tmp}/latin1.json"),
    ("/load {tmp}/nan.json", "cannot load {tmp}/nan.json: t_max"),
    ("/set think maybe", "think is on or off, got 'maybe'"),
    ("/set canvas maybe", "canvas is on or off, got 'maybe'"),
    ("/set max_tokens -4", "max_new_tokens"),
    ("/set temperature x", "temperature needs a number, got 'x'"),
    ("/set steps 1e400", "max_denoising_steps needs a number"),
])
def test_failed_command_is_one_line_and_the_chat_goes_on(tiny, tmp_path, command, error):
    (tmp_path / "latin1.json").write_bytes(b'{"messages": [], "system": "caf\xe9"}')
    (tmp_path / "nan.json").write_text('{"messages": [], "settings": {"t_max": NaN}}')
    repl, out = make_repl(tiny, command.format(tmp=tmp_path))
    repl.run()
    text = out.getvalue()
    assert f"error: {error.format(tmp=tmp_path)}" in text, text
    assert text.count("error:") == 1 and "messages               0" in text  # /show ran after it
    assert repl.session.settings == SETTINGS and repl.session.think is False and repl.canvas is False


def test_save_that_fails_midway_keeps_the_old_file_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    f = tmp_path / "conv.json"
    f.write_text("old, whole")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    repl, out = make_repl(tiny, f"/save {f}")
    repl.run()
    assert f"error: cannot write {f}: No space left on device" in out.getvalue()
    assert f.read_text() == "old, whole" and sorted(p.name for p in tmp_path.iterdir()) == ["conv.json"]


def test_any_os_or_value_error_of_a_command_is_one_line(tiny, monkeypatch):
    repl, out = make_repl(tiny, "/clear", "/stats")

    def fail():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repl.session, "clear", fail)
    repl.run()
    assert "error: [Errno 28] No space left on device" in out.getvalue() and "no answer yet" in out.getvalue()


@pytest.mark.parametrize("fields, error", [
    ({"settings": {"max_new_tokens": -4, "t_min": "abc"}}, 't_min needs a number, got "abc"'),
    ({"settings": {"max_new_tokens": -4}}, "max_new_tokens"),  # the engine's range check, as /set's
    ({"settings": {"t_min": 0.9}}, "t_max"),  # t_max must stay above t_min
    ({"settings": {"max_denoising_steps": True}}, "max_denoising_steps needs an integer, got true"),
    ({"settings": {"seed": 1.5}}, "seed needs an integer, got 1.5"),
    ({"settings": {"t_max": [1]}}, "t_max needs a number, got [1]"),
    ({"settings": {"top_p": 1}}, "unknown setting 'top_p'"),
    ({"settings": "fast"}, "settings must be an object"),
    ({"think": "maybe"}, "think must be true or false"),
    ({"system": ["x"]}, "system must be text or null"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "not a dg conversation"),
    ({"messages": [{"role": "user", "content": 5}]}, "not a dg conversation"),
])
def test_load_checks_everything_before_it_changes_anything(tiny, tmp_path, fields, error):
    f = conversation(tmp_path, **fields)
    repl, out = make_repl(tiny, "hello", f"/load {f}", "/set max_tokens none", "/set think off")
    repl.run()
    text = out.getvalue()
    assert f"error: cannot load {f}: {error}" in text, text
    assert text.count("error:") == 1 and "max_new_tokens = none" in text and "think = off" in text
    assert len(repl.session.messages) == 2 and repl.session.messages[0]["content"] == "hello"  # kept
    assert repl.session.settings == {k: v for k, v in SETTINGS.items() if k != "max_new_tokens"}


def test_load_takes_good_settings_as_set_would(tiny, tmp_path):
    f = conversation(tmp_path, settings={"max_tokens": 24, "t_min": 0.1, "seed": None}, think=True, system="s")
    repl, out = make_repl(tiny, f"/load {f}", "/set max_tokens none")
    repl.run()
    s = repl.session
    assert "loaded 1 messages" in out.getvalue() and "error" not in out.getvalue()
    assert s.settings == {"t_min": 0.1} and s.think is True and s.system == "s"


# ---- the command line ---------------------------------------------------------------------------------

def test_think_with_raw_is_bad_usage():
    r = invoke(["run", *FAST, "--think", "--raw", "hi"])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == "error: --think needs the chat template; it cannot be combined with --raw\n"


@pytest.mark.slow
def test_chat_with_stdin_closed_is_one_line(tmp_path):
    env = {**os.environ, "DG_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dgcli", "chat", *FAST], capture_output=False, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env=env, preexec_fn=lambda: os.close(0), timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: stdin is closed: dg chat reads its messages there\n"
