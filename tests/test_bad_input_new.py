"""Issue 15's bar held to the new commands (dg fill, --trace, dg trace report, dg probe, --image): each
class of hostile input found by running them is one `error:` line with the right exit code, never a
traceback, and leaves nothing behind. In-process (CliRunner) except where the OS matters (signals)."""

import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from dgcli import cli
from dgcli.files import NotAFileError, write_text_atomic

FAST = ["-m", "tiny", "--steps", "2", "--device", "cpu", "--seed", "3"]
ROOT = Path(__file__).resolve().parent.parent


def invoke(args, **kw):
    r = CliRunner().invoke(cli.app, args, **kw)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def one_error(r, code: int, *fragments: str) -> str:
    assert r.exit_code == code, (r.exit_code, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    """A real trace of a short generation (plain JSON Lines)."""
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    r = invoke(["run", *FAST, "--max-tokens", "16", "--trace", str(path), "hi"])
    assert r.exit_code == 0, r.stderr
    return path


# ---- writing onto a device, FIFO or socket ------------------------------------------------------------
# The atomic rename would put a regular file in its place: run as root, `--trace /dev/full` replaced
# the device node. A FIFO shows the same without root.

@pytest.mark.parametrize("args", [
    ["run", *FAST, "--max-tokens", "8", "--trace", "{fifo}", "hi"],
    ["fill", *FAST, "--template", "a {{text:2}}", "--trace", "{fifo}"],
    ["trace", "report", "{trace}", "-o", "{fifo}"],
], ids=["run-trace", "fill-trace", "report-o"])
def test_writes_refuse_a_special_file(tmp_path, trace_file, args):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = invoke([a.format(fifo=fifo, trace=trace_file) for a in args])
    one_error(r, 2, "is not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["fifo"]


@pytest.mark.parametrize("args", [
    ["run", *FAST, "--trace", "/proc/dg-test.jsonl", "hi"],
    ["fill", *FAST, "--template", "a {{text:2}}", "--trace", "/proc/dg-test.jsonl.gz"],
    ["chat", *FAST, "--trace", "/proc/dg-test.jsonl"],
    ["trace", "report", "{trace}", "-o", "/proc/dg-test.html"],
], ids=["run", "fill", "chat", "report"])
def test_unwritable_trace_target_fails_before_the_work(trace_file, monkeypatch, args):
    """A place where no file can be made (/proc here; a read-only directory for a user) is refused
    before the model loads, not after the whole generation."""
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the model"))
    one_error(invoke([a.format(trace=trace_file) for a in args], input=""), 2, "cannot write /proc/dg-test")


def test_probe_refuses_a_special_summary_before_the_runs(tmp_path, no_load):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "summary.json")
    one_error(invoke(["probe", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), *FAST]), 2,
              "summary.json is not a regular file")


@pytest.mark.parametrize("flags, fragment", [(["-m", "no-such-model"], "no-such-model"),
                                             (["-m", "tiny", "--t-min", "5"], "t_min")], ids=["model", "setting"])
def test_probe_leaves_no_empty_out_when_the_model_fails(tmp_path, flags, fragment):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    r = invoke(["probe", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), *flags])
    assert r.exit_code in (1, 2) and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_atomic_writes_refuse_a_special_file(tmp_path):  # chat's /save, dg quantize's files
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotAFileError, match="not a regular file"):
        write_text_atomic(tmp_path / "fifo", "x")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode) and os.listdir(tmp_path) == ["fifo"]


def test_chat_slash_trace_onto_a_special_file_is_a_red_line(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    r = invoke(["chat", *FAST, "--max-tokens", "8", "--no-canvas"],
               input=f"/trace {tmp_path / 'fifo'}\n/image {tmp_path}\n/fill {{{{text:0}}}}\n/show\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("error: ") == 3 and "is not a regular file" in r.stdout
    assert "messages               0" in r.stdout  # the session went on


# ---- --schema: counts given as floats, NaN and Infinity ------------------------------------------------

@pytest.mark.parametrize("text, code, fragment", [
    ('{"type": "string", "maxLength": 1e9}', 2, "longer than the model's context"),  # was a TypeError
    ('{"type": "array", "items": {"type": "integer"}, "minItems": 2.0, "maxItems": 2e0}', 0, None),
    ('{"type": "string", "maxLength": 4.0}', 0, None),
    ('{"const": NaN}', 2, "NaN or Infinity"),
    ('{"enum": ["a", Infinity]}', 2, "NaN or Infinity"),
    ('{"type": "object", "properties": {"a": {"const": -Infinity}}}', 2, "at a"),
    ('{"type": "number", "maximum": NaN}', 2, "'maximum'"),
    ('[1, 2]', 2, "is an object"),
    ('{"$ref": "#/definitions/x"}', 2, "'$ref'"),
    ('{"nope', 2, "is not JSON"),
], ids=["maxLength-1e9", "items-2.0", "maxLength-4.0", "const-nan", "enum-inf", "nested-inf", "maximum-nan",
        "list", "ref", "not-json"])
def test_schema_values(tmp_path, text, code, fragment):
    f = tmp_path / "s.json"
    f.write_text(text)
    r = invoke(["fill", *FAST, "--schema", str(f), "--json"])
    if code:
        one_error(r, code, fragment)
    else:
        assert r.exit_code == 0 and r.stderr == "", r.stderr
        value = json.loads(json.loads(r.stdout)["text"])
        jsonschema.validate(value, json.loads(text))  # valid JSON, its counts honoured


# ---- traces holding NaN or Infinity (json.loads takes them; --json would print invalid JSON) -------------

@pytest.mark.parametrize("line, value", [(0, "NaN"), (1, "NaN"), (1, "Infinity"), (-1, "-Infinity")],
                         ids=["header", "step-nan", "step-inf", "done"])
def test_trace_with_non_finite_numbers_is_refused(tmp_path, trace_file, line, value):
    records = [json.loads(x) for x in trace_file.read_text().splitlines()]
    key = {0: "seed", 1: "temperature", -1: "total_seconds"}[line]
    assert key in records[line]
    records[line][key] = float(value.replace("Infinity", "inf"))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    n = line + 1 if line >= 0 else len(records)
    one_error(invoke(["trace", "report", str(bad), "--json"]), 2, f"line {n} holds {value}")


@pytest.mark.parametrize("key, value", [("model", 5), ("prompt", ["x"]), ("created", {"a": 1})])
def test_trace_header_text_fields_must_be_text(tmp_path, trace_file, key, value):  # the page printed them
    records = [json.loads(x) for x in trace_file.read_text().splitlines()]
    records[0][key] = value
    bad = put(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    one_error(invoke(["trace", "report", str(bad), "-o", str(tmp_path / "x.html")]), 2, f"'{key}' is not text")
    assert os.listdir(tmp_path) == ["t.jsonl"]


# ---- text that is not Unicode: bad argv bytes, lone surrogates in JSON, non-UTF-8 files ------------------

def test_fill_template_with_bad_argv_bytes_is_replaced_once():
    r = invoke(["fill", *FAST, "--template", "caf\udce9 {{text:2}} \udcff"])
    assert r.exit_code == 0 and r.stdout.startswith("caf\ufffd ") and r.stdout.endswith(" \ufffd\n")
    assert r.stderr.count("is not valid UTF-8") == 1 and r.stderr.count("\n") == 1


def test_fill_template_file_not_utf8_is_said_once(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"caf\xe9 {{text:2}}\n")
    r = invoke(["fill", *FAST, "--template-file", str(f)])
    assert r.exit_code == 0 and r.stdout.startswith("caf\ufffd ")
    assert "--template-file" in r.stderr and r.stderr.count("\n") == 1


def test_lone_surrogates_reach_neither_the_tokenizer_nor_the_trace(tmp_path):
    prompts = tmp_path / "p.jsonl"  # valid JSON, but "\ud800" is no Unicode character
    prompts.write_text('{"prompt": "\\ud800 hi", "answer": "\\udcff"}\n')
    out = tmp_path / "out"
    r = invoke(["probe", str(prompts), "--out", str(out), *FAST, "--max-tokens", "8"])
    assert r.exit_code == 0, r.stderr
    (trace,) = (out / "traces").iterdir()
    assert invoke(["trace", "report", str(trace), "--json"]).exit_code == 0  # written, and readable
    assert json.loads((out / "summary.json").read_text())["runs_done"] == 1


@pytest.mark.parametrize("template", ["\ud800 {{text:2}}", "{{choice:a\udcff|b}}", {"enum": ["\ud800"]}],
                         ids=["fixed", "choice", "schema-enum"])
def test_fill_answer_with_lone_surrogates_can_be_sent(tiny, template):  # dg serve's dg_template was a 500
    import dgcli

    out = dgcli.fill(*tiny, "hi", template, max_denoising_steps=2, seed=1)
    json.dumps({"text": out.text, "holes": out.holes}, ensure_ascii=False).encode("utf-8")  # as a server sends it
    assert "\ufffd" in out.text + "".join(map(str, out.holes.values())) or out.text == "b"  # the choice's other


def test_tokenizer_replaces_lone_surrogates(tiny):
    tok = tiny[1]
    assert tok.encode("a\ud800b") == tok.encode("a\ufffd\ufffd\ufffdb")  # as surrogatepass bytes, replaced


# ---- dg probe: an unusable --out fails before the weights load, in one line ------------------------------

@pytest.mark.parametrize("out", ["{file}/sub", "{file}"], ids=["under-a-file", "a-file"])
def test_probe_out_unusable(tmp_path, out, monkeypatch):
    (tmp_path / "f").write_text("x")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the model"))
    one_error(invoke(["probe", str(prompts), "--out", out.format(file=tmp_path / "f"), *FAST]), 2, "--out"
              if out == "{file}" else "cannot use")


# ---- signals: SIGTERM keeps what finished and leaves nothing half-written ---------------------------------

def dg(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dgcli", *args], env=env, stderr=subprocess.PIPE, **kw)


def wait_until(check, proc, timeout=60):
    end = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_probe_keeps_the_finished_runs(tmp_path, sig):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(500)))
    out = tmp_path / "out"
    proc = dg("probe", str(prompts), "--out", str(out), *FAST, "--max-tokens", "16", stdout=subprocess.DEVNULL)
    try:
        def finished():  # whole traces only: a run being written has a hidden temporary file
            return [t for t in os.listdir(out / "traces") if not t.startswith(".")] if (out / "traces").is_dir() else []

        wait_until(lambda: len(finished()) >= 2, proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "runs: wrote" in err
    summary = json.loads((out / "summary.json").read_text())
    traces = sorted(os.listdir(out / "traces"))
    assert summary["interrupted"] and summary["runs_done"] == len(traces) >= 2
    assert all(t.endswith(".jsonl.gz") and not t.startswith(".") for t in traces)  # no temporary file
    assert sorted(os.listdir(out)) == ["report.html", "summary.json", "traces"]


def test_sigterm_mid_generation_leaves_no_trace_file(tmp_path):
    """The trace is written whole at the end (dgcli/trace.py), so a killed run leaves no file at all.
    (dg fill --trace shares the writer; its output comes at the end, so it has no mid-point to wait for.)"""
    slow = ["-m", "tiny", "--max-tokens", "4000", "--steps", "40", "--entropy-bound", "1e-4", "--seed", "1"]
    proc = dg("run", *slow, "--trace", str(tmp_path / "t.jsonl.gz"), "write a long story", stdout=subprocess.PIPE)
    try:
        assert proc.stdout.read(1)  # the first block is out: mid-generation
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM  # the shell's 143
    finally:
        proc.kill()
    assert b"Traceback" not in proc.stderr.read()
    assert os.listdir(tmp_path) == []


# ---- pins: classes that already held when tried (one line, the right code, before the model loads) -------

def png_bomb(path: Path, side: int = 60000) -> Path:
    """A 1-bit PNG claiming side x side pixels in a file of a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress((b"\0" * (side // 8 + 2)) * 8)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the model"))


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d, "is not a file"),
    (lambda d: put(d / "empty.png", b""), "is not an image"),
    (lambda d: png_bomb(d / "bomb.png"), "too large"),
    (lambda d: put(d / "cut.png", png_bomb(d / "b.png", 64).read_bytes()[:60]), "cannot be decoded"),
    (lambda d: os.symlink("loop", d / "loop") or d / "loop", "loop"),
    (lambda d: "", "an image path is empty"),
], ids=["directory", "0-byte", "png-bomb", "truncated", "symlink-loop", "empty-name"])
def test_bad_images_fail_before_the_model_loads(tmp_path, no_load, make, fragment):
    one_error(invoke(["run", *FAST, "--image", str(make(tmp_path)), "hi"]), 2, fragment)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: put(d / "e.jsonl", b""), "is empty"),
    (lambda d: d, "is a directory"),
    (lambda d: put(d / "z.gz", b""), "is empty"),
    (lambda d: put(d / "c.gz", gzip.compress(b"x" * 999)[:20]), "truncated"),
    (lambda d: put(d / "h.jsonl", b'{"a": "' + b"x" * 3_000_000 + b'"}\n'), "not a dg trace"),
    (lambda d: d / "missing.jsonl", "cannot read"),
], ids=["empty", "directory", "0-byte-gz", "cut-gz", "huge-line", "missing"])
def test_bad_trace_files(tmp_path, make, fragment):
    one_error(invoke(["trace", "report", str(make(tmp_path))]), 2, fragment)


def test_trace_report_png_onto_a_file(tmp_path, trace_file):
    (tmp_path / "f").write_text("x")
    one_error(invoke(["trace", "report", str(trace_file), "--png", str(tmp_path / "f")]), 2, "is a file")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("lines, flags, fragment", [
    ("", [], "no prompts"),
    ('{"prompt": "hi"}\nnot json\n', [], ":2: not JSON"),
    ('{"regime": "x"}\n', [], 'non-empty "prompt"'),
    ('{"prompt": "hi"}\n', ["--steps", "0"], "from 1 to"),
    ('{"prompt": "hi"}\n', ["--steps=-1"], "from 1 to"),
    ('{"prompt": "hi"}\n', ["--steps", "abc"], "separated by commas"),
    ('{"prompt": "hi"}\n', ["--steps", ","], "separated by commas"),
], ids=["empty", "bad-json", "no-prompt", "steps-0", "steps-neg", "steps-abc", "steps-comma"])
def test_bad_probe_input(tmp_path, no_load, lines, flags, fragment):
    (tmp_path / "p.jsonl").write_text(lines)
    r = invoke(["probe", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), *FAST, *flags])
    one_error(r, 2, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template, fragment", [
    ("{{text:100000000}}", "longer than the model's context"),
    ("a {{text:0}}", "N >= 1"),
    ("a {{text:{{int:2}}}}", "unclosed"),
    ("a {{text:3", "unclosed"),
    ("{{choice:a||b}}", "empty option"),
    ("{{choice: |\t}}", "empty option"),
    ("", "empty template"),
], ids=["huge-n", "n-0", "nested", "unbalanced", "empty-option", "blank-options", "empty"])
def test_bad_templates(tiny, template, fragment):
    one_error(invoke(["fill", *FAST, "--template", template]), 2, fragment)


# ---- inputs that never end or blow up: a device, a gzip bomb ---------------------------------------------

@pytest.mark.parametrize("args", [
    ["fill", *FAST, "--prefix", "/dev/zero", "--length", "4"],
    ["fill", *FAST, "--template-file", "/dev/urandom"],
    ["fill", *FAST, "--schema", "/dev/zero"],
    ["trace", "report", "/dev/zero"],
    ["probe", "/dev/zero", "--out", "{tmp}/out", *FAST],
], ids=["prefix", "template-file", "schema", "trace", "probe"])
def test_reading_a_device_is_refused(tmp_path, no_load, args):
    one_error(invoke([a.format(tmp=tmp_path) for a in args]), 2, "is a device, not a file")


def test_trace_gzip_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    import dgcli.trace

    monkeypatch.setattr(dgcli.trace, "MAX_BYTES", 2**20)
    bomb = put(tmp_path / "t.jsonl.gz", gzip.compress(b"{" * (2**20 + 1)))
    one_error(invoke(["trace", "report", str(bomb)]), 2, "is larger than 1 MiB")


def test_template_from_a_pipe_still_works(tmp_path):  # --template-file <(...) is a FIFO
    r, w = os.pipe()
    os.write(w, b"x {{text:2}}")
    os.close(w)
    try:
        res = invoke(["fill", *FAST, "--template-file", f"/dev/fd/{r}"])
    finally:
        os.close(r)
    assert res.exit_code == 0 and res.stdout.startswith("x "), res.stderr
