"""Nothing half-written, no traceback for a bad place or name: dg quantize's signals, lock and --force,
stale partial outputs, broken model directories in `dg list`, a corrupt tiny, DG_HOME, `dg rm` failing
part-way, and model names no model can have."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dgcli import cli, store, tiny
from dgcli.config import MANIFEST_FILE
from dgcli.errors import DgError
from quant import convert
from quant.convert import OutputExistsError, quantize_checkpoint
from test_quant_process import HELD_QUANTIZE, wait_for

ROOT = os.geteuid() == 0  # permission bits do not stop root


@pytest.fixture
def home(home):
    """The fresh DG_HOME itself (conftest's `home` is the folder that holds it and the HF cache)."""
    return home / "dg"


def one_line_error(r, code):
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ---- dg quantize: signals, stale partials, lock, --force, unwritable places --------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_quantize_leaves_nothing_partial(tiny_dir, tmp_path, sig):
    home, ready, err = tmp_path / "dg", tmp_path / "ready", tmp_path / "stderr"
    models = home / "models"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DG_HOME": str(home)}
    with open(err, "wb") as f:  # OUT defaults to $DG_HOME/models/<name>-int4
        proc = subprocess.Popen([sys.executable, "-c", HELD_QUANTIZE, str(ready), "quantize", str(tiny_dir)],
                                stdout=subprocess.DEVNULL, stderr=f, env=env)
        try:
            wait_for(ready, proc, err)
            assert any(".partial-" in p.name for p in models.iterdir())  # it is writing
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == 128 + sig
        finally:
            if proc.poll() is None:
                proc.kill()
    assert b"Traceback" not in err.read_bytes()
    assert list(models.iterdir()) == []  # no OUT, no partial directory, no lock file


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_are_swept_by_list_and_quantize(home, tiny_dir, tmp_path):
    models = home / "models"
    stale = [models / f".q.partial-{_dead_pid()}-abc", models / f".q.old-{_dead_pid()}-def",
             models / ".q.partial-legacy"]  # no pid: stale when older than this process
    live = models / f".q.partial-{os.getppid()}-xyz"  # a running process's: kept
    for d in [*stale, live]:
        d.mkdir(parents=True)
        (d / "model-00001.safetensors").write_bytes(b"x")
    os.utime(stale[2], (1, 1))
    (models / ".q.lock").write_text("123\n")  # left by a SIGKILLed run: nobody holds it
    assert [e.name for e in store.list_models()] == []
    assert sorted(models.iterdir()) == [live]

    out = tmp_path / "o" / "q"
    out.parent.mkdir()
    (out.parent / f".q.partial-{_dead_pid()}-abc").mkdir()
    quantize_checkpoint(tiny_dir, out, budget_bytes=None, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q"]


def test_second_quantize_to_the_same_out_is_refused(tiny_dir, tmp_path, runner):
    out = tmp_path / "q"
    with convert._output_lock(out):  # what a first run holds while it writes
        with pytest.raises(DgError, match="another dg quantize is writing"):
            quantize_checkpoint(tiny_dir, out, budget_bytes=None, progress=False)
        r = runner.invoke(cli.app, ["quantize", str(tiny_dir), str(out)])
        one_line_error(r, 1)
        assert "another dg quantize" in r.stderr
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock
    quantize_checkpoint(tiny_dir, out, budget_bytes=None, progress=False)  # free again


def _file(p):
    p.write_text("mine")


def _dir(p):
    p.mkdir()
    (p / "notes.txt").write_text("mine")


def _dangling(p):
    p.symlink_to(p.parent / "nowhere")


@pytest.mark.parametrize("make", [_file, _dir, _dangling])
def test_force_replaces_only_a_dg_model_directory(tiny_dir, tmp_path, make, runner):
    out = tmp_path / "out"
    make(out)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputExistsError, match="never replaced"):
        quantize_checkpoint(tiny_dir, out, budget_bytes=None, force=True, progress=False)
    one_line_error(runner.invoke(cli.app, ["quantize", str(tiny_dir), str(out), "--force"]), 1)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_force_replaces_a_dg_output(tiny_dir, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(tiny_dir, out, budget_bytes=None, progress=False)
    (out / "extra").write_text("x")
    quantize_checkpoint(tiny_dir, out, budget_bytes=None, force=True, progress=False)
    assert not (out / "extra").exists() and (out / MANIFEST_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def _unwritable_dirs(tmp_path):
    places = [Path("/proc/dg-out"), tmp_path / "file" / "out"]  # /proc: read-only even for root
    (tmp_path / "file").write_text("x")
    if not ROOT:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        places.append(ro / "out")
    return places


def test_quantize_into_an_unwritable_place_is_one_line(tiny_dir, tmp_path, runner):
    for out in _unwritable_dirs(tmp_path):
        r = runner.invoke(cli.app, ["quantize", str(tiny_dir), str(out)])
        one_line_error(r, 1)
        assert str(out.parent) in r.stderr


# ---- broken models: dg list marks them, dg pull tiny checks tiny -------------------------------------

def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _bad_header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))


def _broken_models(models: Path, q: Path):
    """name -> (how it was broken, a word the note must hold)."""
    import shutil

    def copy(name):
        return Path(shutil.copytree(q, models / name))

    cases = {}
    d = copy("missing-shard")
    next(d.glob("model-*.safetensors")).unlink()
    cases[d.name] = "missing"
    d = copy("truncated")
    _truncate(next(d.glob("model-*.safetensors")))
    cases[d.name] = "truncated"
    d = copy("bad-header")
    _bad_header(next(d.glob("model-*.safetensors")))
    cases[d.name] = "header"
    d = copy("no-manifest")
    (d / MANIFEST_FILE).unlink()
    cases[d.name] = MANIFEST_FILE
    d = copy("no-config")
    (d / "config.json").unlink()
    cases[d.name] = "config.json"
    return cases


def test_list_marks_broken_model_directories(home, tiny_dir, tmp_path, runner):
    q = quantize_checkpoint(tiny_dir, tmp_path / "q", budget_bytes=None, progress=False)
    models = home / "models"
    models.mkdir(parents=True)
    cases = _broken_models(models, q)
    import shutil

    shutil.copytree(q, models / "whole")
    rows = {e["name"]: e for e in json.loads(runner.invoke(cli.app, ["list", "--json"]).stdout)}
    assert set(rows) == {*cases, "whole"}
    assert rows["whole"]["note"] == ""
    for name, word in cases.items():
        assert rows[name]["note"].startswith("broken: ") and word in rows[name]["note"], (name, rows[name])
    text = runner.invoke(cli.app, ["list"]).stdout
    assert text.count("broken: ") == len(cases)
    r = runner.invoke(cli.app, ["rm", "no-config", "--yes"])  # a broken one can be removed
    assert r.exit_code == 0 and not (models / "no-config").exists()


@pytest.mark.parametrize("damage", [_truncate, _bad_header, Path.unlink])
def test_pull_tiny_checks_its_weights(home, runner, damage):
    assert runner.invoke(cli.app, ["pull", "tiny"]).exit_code == 0
    weights = home / "models" / f"tiny-v{tiny.VERSION}" / "model.safetensors"
    damage(weights)
    r = runner.invoke(cli.app, ["pull", "tiny"])
    one_line_error(r, 1)
    assert "dg rm tiny" in r.stderr and "ready" not in r.stdout
    assert "broken" in json.loads(runner.invoke(cli.app, ["list", "--json"]).stdout)[0]["note"]
    assert runner.invoke(cli.app, ["rm", "tiny", "--yes"]).exit_code == 0
    assert runner.invoke(cli.app, ["pull", "tiny"]).exit_code == 0
    assert store.checkpoint_problem(weights.parent) == ""


# ---- DG_HOME, dg rm part-way ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["pull", "tiny"], ["list"], ["run", "-m", "tiny", "--steps", "2", "hi"],
                                     ["quantize", "tiny"]])
def test_dg_home_that_is_a_file_is_one_line(tmp_path, monkeypatch, runner, command):
    (tmp_path / "home").write_text("x")
    monkeypatch.setenv("DG_HOME", str(tmp_path / "home"))
    r = runner.invoke(cli.app, command)
    one_line_error(r, 1)
    assert "DG_HOME" in r.stderr


def test_dg_home_that_is_unwritable_is_one_line(tmp_path, monkeypatch, runner):
    monkeypatch.setenv("DG_HOME", "/proc/dg-home")  # read-only even for root
    r = runner.invoke(cli.app, ["pull", "tiny"])
    one_line_error(r, 1)
    assert "/proc/dg-home" in r.stderr


def test_rm_failing_part_way_says_what_is_left(home, runner, monkeypatch):
    import shutil

    d = home / "models" / "m"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    (d / "sub" / "keep").write_bytes(b"x")
    real = os.unlink

    def unlink(path, *a, **k):  # a file that cannot be deleted (permissions do not stop root)
        if str(path).endswith("keep") or (k.get("dir_fd") is not None and path == "keep"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(shutil.os, "unlink", unlink)
    r = runner.invoke(cli.app, ["rm", "m", "--yes"])
    one_line_error(r, 1)
    assert "2 of 3 files deleted, 1 left" in r.stderr and "keep" in r.stderr and str(d) in r.stderr
    assert (d / "sub" / "keep").exists() and not (d / "config.json").exists()


# ---- names no model can have: usage errors --------------------------------------------------------------

BAD_NAMES = ["", " ", "x" * 5000, "a/" + "b" * 300]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("command", [["run", "-m", "{}", "hi"], ["show", "{}"], ["pull", "{}"],
                                     ["quantize", "{}"]])
def test_impossible_model_names_are_usage_errors(home, runner, name, command):
    r = runner.invoke(cli.app, [a.replace("{}", name) for a in command])
    one_line_error(r, 2)
    assert len(r.stderr) < 300


@pytest.mark.parametrize("name", ["org/..", "../x", "org/a..b", "org/-x", "org/x.", "a--b/c", "org/" + "x" * 97,
                                  "org/a b"])
def test_pull_malformed_repo_ids_are_usage_errors(home, runner, name):
    r = runner.invoke(cli.app, ["pull", name])
    one_line_error(r, 2)
    assert "repo id" in r.stderr


def test_valid_repo_ids_still_look_like_repo_ids():
    for name in ["google/diffusiongemma-26B-A4B-it", "a/b", "Org_1/model.v2", "x/" + "y" * 96]:
        assert store.looks_like_repo_id(name), name


@pytest.mark.parametrize("args", [["chat", ""], ["chat", "-m", ""]])
def test_chat_with_an_empty_model_name_is_a_usage_error(runner, args):
    one_line_error(runner.invoke(cli.app, args, input=""), 2)


def test_a_read_only_dg_home_still_serves_what_it_holds(home, runner, monkeypatch):
    assert runner.invoke(cli.app, ["pull", "tiny"]).exit_code == 0
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as if unwritable (root ignores the mode bits)
    assert runner.invoke(cli.app, ["show", "tiny"]).exit_code == 0
    assert runner.invoke(cli.app, ["pull", "tiny"]).exit_code == 0
    import shutil

    shutil.rmtree(home / "models" / f"tiny-v{tiny.VERSION}")
    r = runner.invoke(cli.app, ["pull", "tiny"])  # now it has to write: one line
    one_line_error(r, 1)
    assert "cannot write into" in r.stderr
