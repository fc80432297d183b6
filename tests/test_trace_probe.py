"""`dg probe` on the shipped probe set (scripts/probes/*.jsonl), with a small step budget on tiny."""

import json
from pathlib import Path

import pytest

from dgcli import cli, probe
from dgcli.trace import read_trace

PROBES = sorted((Path(__file__).parent.parent / "scripts" / "probes").glob("*.jsonl"))
FAST = ["-m", "tiny", "--device", "cpu", "--max-tokens", "16", "--steps", "2", "--seed", "0"]


def invoke(runner, args):
    r = runner.invoke(cli.app, [str(a) for a in args])
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_shipped_set_has_six_regimes():
    prompts = probe.read_prompts(PROBES)
    regimes = {p.regime for p in prompts}
    assert regimes == {"json", "maths", "factual", "code", "prose", "lists"}
    assert all(sum(p.regime == r for p in prompts) >= 3 for r in regimes)
    assert any(p.answers for p in prompts if p.regime == "maths")


def test_probe_writes_a_summary_per_regime(runner, tmp_path):
    out = tmp_path / "out"
    r = invoke(runner, ["probe", *PROBES, "--out", out, *FAST])
    assert r.exit_code == 0 and r.stdout == ""
    summary = json.loads((out / "summary.json").read_text())
    prompts = probe.read_prompts(PROBES)
    assert summary["runs_done"] == summary["runs_planned"] == len(prompts) and not summary["interrupted"]
    assert set(summary["regimes"]) == {"json", "maths", "factual", "code", "prose", "lists"}
    for name, reg in summary["regimes"].items():
        a = reg["by_steps"]["2"]
        assert a["runs"] == reg["prompts"] == sum(p.regime == name for p in prompts)
        assert a["steps_per_block"] <= 2 and set(a["kendall_tau"]) == {"1", "4", "16", "64"}
        assert 0 <= a["late_burst"] <= 1 and a["tokens_per_second"] > 0
        assert a["answered"] == sum(bool(p.answers) for p in prompts if p.regime == name)
    # each run's numbers are its trace's: the summary's per-run tau is what the trace file gives
    row = summary["runs"][0]
    from dgcli.trace_metrics import metrics

    assert metrics(read_trace(out / row["trace"]))["summary"]["kendall_tau"] == row["kendall_tau"]
    assert len(list((out / "traces").glob("*.jsonl.gz"))) == len(prompts)
    page = (out / "report.html").read_text()
    assert all(f"<h2>{name} ·" in page for name in summary["regimes"]) and "random-init" in page


def test_ctrl_c_keeps_what_finished(runner, tmp_path, monkeypatch):
    real, calls = probe.stream_generate, []

    def interrupted_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "stream_generate", interrupted_third)
    out = tmp_path / "out"
    r = invoke(runner, ["probe", PROBES[0], "--out", out, *FAST])
    assert r.exit_code == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["runs_done"] == 2
    assert len(list((out / "traces").iterdir())) == 2 and "interrupted" in (out / "report.html").read_text()


@pytest.mark.parametrize("line, why", [
    ("not json", "not JSON"), ('{"regime": "x"}', "prompt"), ('{"prompt": "p", "answer": 3}', "answer"),
    ('{"prompt": "p", "regime": "a b/c"}', "regime"),
])
def test_bad_prompt_files_are_usage_errors(runner, tmp_path, line, why):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    r = invoke(runner, ["probe", f, "--out", tmp_path / "o", *FAST])
    assert r.exit_code == 2 and why in r.stderr and r.stderr.count("\n") == 1 and ":1:" in r.stderr


def test_bad_steps_and_out(runner, tmp_path):
    r = invoke(runner, ["probe", PROBES[0], "--out", tmp_path / "o", "-m", "tiny", "--steps", "4,x"])
    assert r.exit_code == 2 and "--steps" in r.stderr
    (tmp_path / "file").write_text("")
    r = invoke(runner, ["probe", PROBES[0], "--out", tmp_path / "file", "-m", "tiny"])
    assert r.exit_code == 2 and "not a directory" in r.stderr
