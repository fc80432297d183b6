"""Traces (dgcli/trace.py) and their numbers (dgcli/trace_metrics.py): `dg run --trace`, `dg trace report`,
checked against an independent, plain computation from the trace's lines by docs/trace.md's definitions."""

import gzip
import io
import json
import math

import pytest
from rich.console import Console

from dgcli import cli
from dgcli.api import stream_generate
from dgcli.events import StepEvent
from dgcli.repl import Repl
from dgcli.session import ChatSession
from dgcli.trace import Trace, TraceWriter, numbered, read_trace, save
from dgcli.trace_metrics import metrics

# 300 tokens: two canvases, and with this seed tiny writes an EOS in the second (positions after it excluded)
RUN = ["run", "-m", "tiny", "--device", "cpu", "--steps", "4", "--max-tokens", "300", "--seed", "4", "hello"]


def invoke(runner, args):
    r = runner.invoke(cli.app, [str(a) for a in args])
    assert "Traceback" not in r.stderr, r.stderr
    return r


# ---- the independent computation: plain loops over the file's lines, as docs/trace.md defines ----

def lines_of(path):
    raw = open(path, "rb").read()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode().splitlines()]


def tau_b(xs, ys):
    conc = disc = tie_x = tie_y = 0
    n = len(xs)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                tie_x += 1
                tie_y += 1
            elif dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - tie_x) * (pairs - tie_y))
    return None if denom == 0 else (conc - disc) / denom


def by_definition(lines):
    header = lines[0]
    eos = header["settings"]["eos_token_id"]
    out = []
    for b in [r for r in lines if r["type"] == "block"]:
        steps = sorted((r for r in lines if r["type"] == "step" and r["block"] == b["block"]), key=lambda r: r["step"])
        S = len(steps)
        final = steps[-1]["argmax"]
        n = len(final)
        for p, t in enumerate(final):
            if t in eos:
                n = p + 1
                break
        commit = []
        for p in range(n):
            c = S
            while c > 1 and steps[c - 2]["argmax"][p] == final[p]:
                c -= 1
            commit.append(c)
        taus = {}
        for g in (1, 4, 16, 64):
            windows = [commit[i:i + g] for i in range(0, n, g)]
            taus[str(g)] = tau_b(list(range(len(windows))), [sum(w) / len(w) for w in windows])
        per_step = [commit.count(s) for s in range(1, S + 1)]
        revised = 0
        for p in range(n):
            acc = [s for s in range(S) if steps[s]["accepted"][p]]
            if acc and any(steps[t]["argmax"][p] != steps[acc[0]]["argmax"][p] for t in range(acc[0], S)):
                revised += 1
        out.append({
            "steps": S, "positions": n, "commit_step": commit, "kendall_tau": taus,
            "commit_profile": [c / n for c in per_step], "batch_sizes": [c for c in per_step if c],
            "late_burst": sum(1 for c in commit if c > 0.75 * S) / n, "revisions": revised,
            "confidence_at_commit": [math.exp(-steps[commit[p] - 1]["entropy"][p]) for p in range(n)],
        })
    return out


def close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_run_trace_report_json_agrees_with_the_definitions(runner, tmp_path):
    plain = invoke(runner, RUN)
    path = tmp_path / "t.jsonl.gz"
    traced = invoke(runner, RUN[:1] + ["--trace", path] + RUN[1:])
    assert traced.exit_code == 0 and plain.exit_code == 0
    assert traced.stdout == plain.stdout and plain.stdout.strip()  # the trace never touches stdout
    assert f"written to {path}" in traced.stderr
    lines = lines_of(path)
    header = lines[0]
    assert header["type"] == "header" and header["format"] == "dg-trace" and header["version"] == 1
    assert header["records"] == len(lines) - 1 and header["model"] == "tiny" and header["seed"] == 4
    assert [r["type"] for r in lines].count("done") == 1 and lines[-1]["type"] == "done"
    ids = {i for r in lines if r["type"] == "step" for i in r["canvas"] + r["argmax"]}
    assert ids <= {int(k) for k in header["tokens"]}  # renders without the tokenizer

    r = invoke(runner, ["trace", "report", path, "--json"])
    assert r.exit_code == 0
    got = json.loads(r.stdout)
    want = by_definition(lines)
    assert len(got["blocks"]) == len(want) == 2
    assert want[1]["positions"] < 256  # the EOS cut is exercised
    for g, w in zip(got["blocks"], want):
        for key, value in w.items():
            assert close(g[key], value), key
    summary = got["summary"]
    for k in ("1", "4", "16", "64"):
        taus = [b["kendall_tau"][k] for b in want if b["kendall_tau"][k] is not None]
        assert close(summary["kendall_tau"][k], sum(taus) / len(taus) if taus else None)
    assert summary["revisions"] == sum(b["revisions"] for b in want)

    table = invoke(runner, ["trace", "report", path])
    assert table.exit_code == 0 and "tau@16" in table.stdout and "random-init" in table.stdout


def crafted(commit_order, L=8, eos_at=None, accept_revised=None):
    """A trace of one block of L steps where position p's argmax reaches its final id at commit_order[p]."""
    S = L
    final = [100 + p for p in range(L)]
    if eos_at is not None:
        final[eos_at] = 1
    steps = []
    for s in range(1, S + 1):
        argmax = [final[p] if s >= commit_order[p] else 50 + p for p in range(L)]
        accepted = [s == commit_order[p] for p in range(L)]
        if accept_revised is not None and s == 1:
            accepted[accept_revised] = True  # accepted at step 1, its argmax changes later: a revision
        steps.append({"block": 0, "step": s, "max_steps": S, "canvas": argmax, "accepted": accepted,
                      "argmax": argmax, "entropy": [0.5 * p for p in range(L)], "temperature": 0.5,
                      "stopped": s == S, "seconds": 0.01})
    ids = {i for st in steps for i in st["argmax"]}
    header = {"type": "header", "format": "dg-trace", "version": 1, "model": "crafted",
              "settings": {"eos_token_id": [1], "pad_token_id": 0}, "seed": 0, "prompt_tokens": 3,
              "tokens": {str(i): f" t{i}" for i in ids}, "canvas_length": L, "interrupted": False}
    return Trace(header, steps, [{"block": 0, "token_ids": final, "steps": S, "finished": True}],
                 {"generated_tokens": L})


def test_known_answers(tmp_path):
    m = metrics(crafted(list(range(1, 9))))["blocks"][0]  # strictly left to right, one position a step
    assert m["commit_step"] == list(range(1, 9))
    assert m["kendall_tau"] == {"1": 1.0, "4": 1.0, "16": None, "64": None}  # one window: undefined
    assert m["batch_sizes"] == [1] * 8 and m["commit_profile"] == [1 / 8] * 8
    assert m["late_burst"] == 2 / 8  # steps 7 and 8 of 8
    assert m["revisions"] == 0 and m["confidence_at_commit"][2] == pytest.approx(math.exp(-1.0))

    m = metrics(crafted(list(range(8, 0, -1))))["blocks"][0]
    assert m["kendall_tau"]["1"] == -1.0 and m["kendall_tau"]["4"] == -1.0

    m = metrics(crafted([8] * 8))["blocks"][0]  # everything at the last step: one batch, no order
    assert m["kendall_tau"]["1"] is None and m["batch_sizes"] == [8] and m["late_burst"] == 1.0

    m = metrics(crafted([1, 1, 2, 2, 3, 3, 4, 4], eos_at=5, accept_revised=7))["blocks"][0]
    assert m["positions"] == 6 and m["commit_step"] == [1, 1, 2, 2, 3, 3]  # the EOS kept, after it excluded
    assert m["batch_sizes"] == [2, 2, 2] and m["revisions"] == 0  # position 7 is after the EOS
    m = metrics(crafted([1, 1, 2, 2, 3, 3, 4, 4], accept_revised=7))["blocks"][0]
    assert m["revisions"] == 1

    path = save(crafted(list(range(1, 9))), tmp_path / "c.jsonl")
    assert metrics(read_trace(path))["blocks"][0]["kendall_tau"]["1"] == 1.0


def test_gzip_round_trip_and_atomic_write(tmp_path):
    t = crafted([1, 2, 2, 3, 4, 4, 5, 8])
    plain, gz = save(t, tmp_path / "a.jsonl"), save(t, tmp_path / "a.jsonl.gz")
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and gzip.decompress(gz.read_bytes()) == plain.read_bytes()
    a, b = read_trace(plain), read_trace(gz)
    assert a.lines() == b.lines() == t.lines()
    renamed = tmp_path / "renamed.jsonl"  # gzip is recognised by its bytes, not its name
    renamed.write_bytes(gz.read_bytes())
    assert read_trace(renamed).lines() == t.lines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.gz", "renamed.jsonl"]  # no temp


def test_interrupted_generation_keeps_what_was_recorded(tiny, tmp_path):
    engine, tok = tiny
    path = tmp_path / "cut.jsonl"
    events = stream_generate(engine, tok, "hi", max_new_tokens=300, max_denoising_steps=3, seed=2)
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path, tok, model="tiny") as w:
            for ev in events:
                w.update(ev)
                if isinstance(ev, StepEvent) and ev.block == 1 and ev.step == 2:
                    raise KeyboardInterrupt
    t = read_trace(path)
    assert t.header["interrupted"] is True and t.done is None
    assert len(t.steps) == 5 and len(t.blocks) == 1
    assert len(metrics(t)["blocks"]) == 1  # the unfinished block is not measured

    with TraceWriter(tmp_path / "none.jsonl", tok):
        pass
    assert not (tmp_path / "none.jsonl").exists()  # nothing recorded: no file


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def test_bad_trace_files_are_one_line_exit_2(runner, tmp_path):
    good = save(crafted(list(range(1, 9))), tmp_path / "good.jsonl").read_bytes()
    text = good.decode()
    first, rest = text.split("\n", 1)
    header = json.loads(first)
    cases = {
        "missing.jsonl": None,
        "empty.jsonl": b"",
        "words.txt": "hello world\n",
        "binary.bin": bytes(range(256)),
        "other.json": '{"type": "header", "format": "something-else"}\n',
        "v2.jsonl": json.dumps({**header, "version": 2}) + "\n" + rest,
        "cut-mid-line.jsonl": good[: len(good) - 40],
        "cut-at-line.jsonl": "".join(text.splitlines(keepends=True)[:-3]),
        "cut-header.jsonl": good[:30],
        "cut.jsonl.gz": gzip.compress(good)[:-20],
        "bad-gzip.gz": b"\x1f\x8b" + b"nonsense" * 10,
        "bad-record.jsonl": first + "\n" + rest.replace('"canvas":[', '"canvas":"x","was":[', 1),
        "list-line.jsonl": first + "\n[1, 2]\n" + rest,
    }
    for name, data in cases.items():
        path = tmp_path / name if data is None else write(tmp_path, name, data)
        r = invoke(runner, ["trace", "report", path, "--json"])
        assert r.exit_code == 2, (name, r.stderr)
        assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), (name, r.stderr)
    assert "truncated" in invoke(runner, ["trace", "report", tmp_path / "cut-mid-line.jsonl"]).stderr
    assert "truncated" in invoke(runner, ["trace", "report", tmp_path / "cut-at-line.jsonl"]).stderr
    assert "truncated" in invoke(runner, ["trace", "report", tmp_path / "cut.jsonl.gz"]).stderr
    assert "version 2" in invoke(runner, ["trace", "report", tmp_path / "v2.jsonl"]).stderr
    assert "not a dg trace" in invoke(runner, ["trace", "report", tmp_path / "words.txt"]).stderr
    r = invoke(runner, ["trace", "report", tmp_path], )
    assert r.exit_code == 2 and "directory" in r.stderr

    r = invoke(runner, RUN[:1] + ["--trace", tmp_path / "no" / "t.jsonl"] + RUN[1:])
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_report_files(runner, tmp_path):
    path = save(crafted([1, 2, 2, 3, 4, 4, 5, 8]), tmp_path / "c.jsonl.gz")
    r = invoke(runner, ["trace", "report", path, "-o", tmp_path / "r.html", "--png", tmp_path / "png"])
    assert r.exit_code == 0 and r.stdout == ""
    for name in ("heatmap.png", "profile.png", "tau.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every tau undefined (the whole block settles at once): the plots still draw
    flat = save(crafted([8] * 8), tmp_path / "flat.jsonl")
    r = invoke(runner, ["trace", "report", flat, "--png", tmp_path / "flat"])
    assert r.exit_code == 0 and (tmp_path / "flat" / "tau.png").exists()
    page = (tmp_path / "r.html").read_text()
    assert 'id="data"' in page and "<script src" not in page and "http" not in page.split("<body>")[1]


def test_numbered_names():
    assert numbered("chat.jsonl.gz", 3).name == "chat-3.jsonl.gz"
    assert numbered("d/chat.jsonl", 1).as_posix() == "d/chat-1.jsonl"
    assert numbered("t", 2).name == "t-2"


def test_repl_trace_command(tiny, tmp_path):
    from test_repl import FAST, Script

    out = io.StringIO()
    f = tmp_path / "next.jsonl"
    repl = Repl(ChatSession(*tiny, settings=dict(FAST)), Console(file=out, width=100, color_system=None),
                Script("one", f"/trace {f}", "two", "three", "/trace off", "four"), model_name="tiny", canvas=False,
                trace=tmp_path / "all.jsonl.gz")
    repl.run()
    # --trace: every answer numbered; /trace FILE: the next answer only, then --trace goes on; /trace off: none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-1.jsonl.gz", "all-2.jsonl.gz", "next.jsonl"]
    assert read_trace(f).header["prompt"] == "two" and read_trace(tmp_path / "all-2.jsonl.gz").header["prompt"] == "three"
    assert "written to" in out.getvalue() and "tracing off" in out.getvalue()


def test_help_has_examples(runner):
    for command in (["trace", "report"], ["probe"]):
        r = invoke(runner, [*command, "--help"])
        assert r.exit_code == 0 and f"dg {' '.join(command)}" in r.stdout.split("Examples:")[1]
    assert "--trace FILE" in invoke(runner, ["run", "--help"]).stdout
    assert "--trace FILE" in invoke(runner, ["chat", "--help"]).stdout
