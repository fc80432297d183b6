"""Output that cannot be written, and output that must not mislead (issue 15).

Every way stdout can fail (closed, disk full, a reader that left) is one `error:` line or, for a closed
pipe, silence with 141; never a traceback. DG_DEBUG adds the traceback and keeps the exit code.
Declining `dg rm` is a choice (exit 0). `dg show` on a broken checkpoint is one line, as `dg run` is.
The canvas status says what its numbers are.
"""

import errno
import io
import os
import subprocess
import sys
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dgcli import cli, store
from dgcli.canvas_view import CanvasView
from dgcli.events import BlockEvent, StepEvent

DG = [sys.executable, "-m", "dgcli"]
FAST = ["-m", "tiny", "--max-tokens", "16", "--steps", "2", "--seed", "0", "--device", "cpu"]


class FullDisk(io.StringIO):
    """stdout on a full disk (`> /dev/full`): every write or flush fails with ENOSPC."""

    def write(self, s):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class LeftReader(FullDisk):
    """stdout into a pipe whose reader went away (`| head -0`)."""

    def write(self, s):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    def flush(self):
        self.write("")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def dg(args, stdout, monkeypatch, capsys, stdin=Terminal()):
    """Run dg in this process with `stdout` as sys.stdout; (exit code, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)  # a terminal: nothing piped in
    monkeypatch.setattr(sys, "stdout", stdout)
    code = cli.app(args, prog_name="dg", standalone_mode=False)
    return code, capsys.readouterr().err


COMMANDS = {
    "run": ["run", *FAST, "hi"],
    "run --json": ["run", *FAST, "--json", "hi"],
    "show": ["show", "tiny"],
    "show --json": ["show", "tiny", "--json"],
    "list": ["list"],
    "list --json": ["list", "--json"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("sink", ["closed", "full"])
def test_unwritable_stdout_is_one_line_exit_1(command, sink, tiny_dir, monkeypatch, capsys):
    code, err = dg(COMMANDS[command], None if sink == "closed" else FullDisk(), monkeypatch, capsys)
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert ("stdout is closed" if sink == "closed" else "No space left on device") in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_reader_that_left_is_silent_141(command, tiny_dir, monkeypatch, capsys):
    code, err = dg(COMMANDS[command], LeftReader(), monkeypatch, capsys)
    assert code == 141 and err == ""


@pytest.mark.parametrize("sink, code, message", [
    (None, 1, "stdout is closed"), (FullDisk, 1, "No space left on device"), (LeftReader, 141, None)])
def test_chat_into_unwritable_stdout(sink, code, message, tiny_dir, monkeypatch, capsys):
    """dg chat writes its banner, answers and red lines to stdout: a failure there ends it like dg run."""
    stdin = io.StringIO("hi\n/stats\n")
    got, err = dg(["chat", *FAST], sink() if sink else None, monkeypatch, capsys, stdin=stdin)
    assert got == code, err
    if message is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_closed_stdout_is_refused_before_any_work(monkeypatch, capsys):
    import dgcli.cli_common as cc

    monkeypatch.setattr(cc, "load", lambda *a, **k: pytest.fail("loaded a model for an answer with nowhere to go"))
    code, err = dg(["run", "-m", "tiny", "hi"], None, monkeypatch, capsys)
    assert code == 1 and "stdout is closed" in err


@pytest.mark.parametrize("args", [["list"], ["list", "--json"]])
@pytest.mark.parametrize("sink", ["closed", "full", "pipe"])
def test_real_process_output_failures(args, sink, tmp_path):
    """What the interpreter adds at exit (its last flush) must not add a traceback or change the code."""
    env = dict(os.environ, DG_HOME=str(tmp_path))
    redirect = {"closed": ">&-", "full": ">/dev/full", "pipe": "| (exec 0<&-)"}[sink]  # reader exits at once
    cmd = " ".join(f"'{a}'" for a in DG + args) + f" {redirect}; echo rc=$? >&2"
    if sink == "pipe":  # the pipeline's status is the reader's: ask for dg's
        cmd = "set -o pipefail; " + cmd
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120)
    err, rc = p.stderr.rsplit("rc=", 1)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if sink == "pipe":
        assert int(rc) in (0, 141) and err == "", err
    else:
        assert int(rc) == 1 and err.count("\n") == 1 and err.startswith("error: "), err


@pytest.mark.slow
@pytest.mark.parametrize("args", [["run", *FAST, "hi"], ["run", *FAST, "--json", "hi"], ["show", "tiny"]])
@pytest.mark.parametrize("sink", [">&-", ">/dev/full"])
def test_real_process_run_and_show(args, sink, tmp_path):
    env = dict(os.environ, DG_HOME=str(tmp_path))
    cmd = " ".join(f"'{a}'" for a in DG + args) + f" {sink}"
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr


# ---- DG_DEBUG adds the traceback, never changes the exit code ----------------------------------------

@pytest.mark.parametrize("args, code", [
    (["run", "-m", "tiny", "--steps", "0", "hi"], 2),  # typer's own range check
    (["run", "-m", "tiny", "-t", "1", "--t-max", "2", "hi"], 2),  # dg's BadUsage
    (["show", "someorg/nothing-here"], 1),  # a DgError
])
def test_dg_debug_keeps_the_exit_code(args, code, monkeypatch):
    runner = CliRunner()
    plain = runner.invoke(cli.app, args)
    assert plain.exit_code == code and "Traceback" not in plain.stderr
    monkeypatch.setenv("DG_DEBUG", "1")
    debug = runner.invoke(cli.app, args)
    assert debug.exit_code == code
    assert "Traceback" in debug.stderr and debug.stderr.endswith(plain.stderr)  # the same line, last


# ---- dg rm: "no" is an answer ---------------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["n\n", "N\n", "\n", "no\n"])
def test_declining_rm_keeps_the_model_and_exits_0(answer, tmp_path, monkeypatch):
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    path = store.resolve("tiny")
    r = CliRunner().invoke(cli.app, ["rm", "tiny"], input=answer)
    assert r.exit_code == 0 and "kept tiny" in r.stdout and "error" not in r.stderr
    assert (path / "model.safetensors").is_file()


def test_rm_without_an_answer_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    path = store.resolve("tiny")
    r = CliRunner().invoke(cli.app, ["rm", "tiny"], input="")
    assert r.exit_code == 1 and r.stderr.splitlines()[-1] == "error: no answer on stdin (pass --yes to skip the " \
                                                             "question)"
    assert "Traceback" not in r.stderr and (path / "model.safetensors").is_file()


def test_rm_asks_on_stderr_so_a_full_stdout_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    store.resolve("tiny")
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, err = dg(["rm", "tiny"], FullDisk(), monkeypatch, capsys, stdin=None)
    assert code == 1 and err.startswith("delete tiny") and err.endswith("error: cannot write the output: "
                                                                          "No space left on device\n"), err


# ---- dg show on a broken checkpoint: one line, like dg run ---------------------------------------------

def _break(kind, shard):
    data = shard.read_bytes()
    shard.unlink()
    if kind == "garbage":
        shard.write_bytes(os.urandom(4096))
    elif kind == "empty":
        shard.write_bytes(b"")
    elif kind == "header cut":
        shard.write_bytes(data[:3000])
    elif kind == "data cut":
        shard.write_bytes(data[: len(data) // 2])
    elif kind == "symlink loop":
        shard.symlink_to(shard.name)
    elif kind == "directory":
        shard.mkdir()


@pytest.mark.parametrize("kind", ["garbage", "empty", "header cut", "data cut", "symlink loop", "directory"])
@pytest.mark.parametrize("command", ["show", "run"])
def test_broken_weights_are_one_line(kind, command, tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    _break(kind, ckpt / "model.safetensors")
    args = ["show", str(ckpt)] if command == "show" else ["run", "-m", str(ckpt), "--device", "cpu", "hi"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "safetensors" in r.stderr and r.stdout == ""


# ---- the canvas status says what its numbers are ----------------------------------------------------------

def _step(n, accepted, L=4):
    return StepEvent(block=0, step=n, max_steps=8, canvas=list(range(L)), accepted=accepted, argmax=list(range(L)),
                     entropy=[0.0] * L, temperature=0.5, stopped=False, seconds=0.01)


def _status(view, ev):
    record = Console(record=True, width=120, file=io.StringIO())
    record.print(view.status(ev))
    return record.export_text()


def test_accepted_count_is_labelled_per_step():
    view = CanvasView(Console(file=io.StringIO()), lambda ids: [f" w{i}" for i in ids])
    view.update(_step(1, [True, False, False, False]))
    view.update(_step(2, [True, True, True, False]))
    assert "3/4 accepted this step" in _status(view, view.step)


def test_rate_is_a_number_before_the_first_block_commits():
    """A one-block answer commits only at its end: until then the status shows steps/s, not a dash."""
    view = CanvasView(Console(file=io.StringIO()), lambda ids: [f" w{i}" for i in ids])
    for n in (1, 2, 3, 4):
        view.update(_step(n, [True, False, False, False]))
    view.t0 = time.perf_counter() - 2.0  # a fixed elapsed time: 4 steps in ~2 s
    line = _status(view, view.step)
    assert "—" not in line and "steps/s" in line
    rate = float(line.split("steps/s")[0].split()[-1])
    assert 1.0 < rate <= 2.0
    view.update(BlockEvent(block=0, token_ids=[1, 2, 3, 4], steps=4, finished=False, text=""))
    line = _status(view, None)
    assert "tok/s" in line and "—" not in line  # committed tokens: the real tokens/s
