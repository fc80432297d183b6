"""`dg fill` through typer's CliRunner on the tiny model: stdout, --json, infill, exit codes."""

import json

import jsonschema
import pytest

from dgcli import cli

FAST = ["-m", "tiny", "--steps", "3", "--device", "cpu", "--seed", "4"]


def invoke(runner, args, **kw):
    result = runner.invoke(cli.app, args, **kw)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_fill_prints_only_the_filled_text(runner):
    r = invoke(runner, ["fill", *FAST, "a pet", "--template", "Pet: {{choice:cat|dog}}, age {{int:2}}."])
    assert r.exit_code == 0 and r.stderr == ""
    line = r.stdout
    assert line.endswith(".\n") and line.count("\n") == 1 and line.split(",")[0] in ("Pet: cat", "Pet: dog")
    assert line.split("age ")[1][:-2].isdigit()


def test_fill_json_has_text_holes_and_stats(runner, tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "ok": {"type": "boolean"}, "n": {"type": "integer"}}}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    r = invoke(runner, ["fill", *FAST, "--schema", str(f), "--json"])
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    value = json.loads(out["text"])
    jsonschema.validate(value, schema)
    assert out["holes"] == value and out["finish_reason"] == "template" and out["seed"] == 4
    plain = invoke(runner, ["fill", *FAST, "--schema", str(f)])
    assert plain.stdout == out["text"] + "\n"  # the same seed, the same fill


def test_infill_from_files(runner, tmp_path):
    (tmp_path / "p.py").write_text("def area(r):\n    ")
    (tmp_path / "s.py").write_text("\n    return a\n")
    (tmp_path / "t.txt").write_text("x = {{int:2}}")
    r = invoke(runner, ["fill", *FAST, "--prefix", str(tmp_path / "p.py"), "--suffix", str(tmp_path / "s.py"),
                        "--length", "6"])
    assert r.exit_code == 0 and r.stdout.startswith("def area(r):\n    ") and r.stdout.endswith("\n    return a\n")
    r = invoke(runner, ["fill", *FAST, "--template-file", str(tmp_path / "t.txt")])
    assert r.exit_code == 0 and r.stdout[:4] == "x = " and r.stdout[4:].strip().isdigit()
    r = invoke(runner, ["fill", *FAST, "--raw", "--template-file", str(tmp_path / "t.txt"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["prompt_tokens"] == 1  # <bos> alone


@pytest.mark.parametrize("args, words", [
    (["--template", "Name: {{text:4"], "unclosed '{{' at column 7"),
    (["--template", "{{name:float}}"], "unknown hole type 'float'"),
    (["--template", "{{text:0}}"], "N >= 1"),
    (["--template", "{{text:9000}}"], "longer than the model's context"),
    (["--template", "{{choice:Cat|cat}}"], "are the same tokens"),
    (["--schema", "SCHEMA_ANYOF"], "'anyOf' (at a) is not supported"),
    (["--schema", "NOT_JSON"], "is not JSON"),
    (["--schema", "MISSING"], "cannot read --schema"),
    ([], "give one of --template"),
    (["--template", "{{int:1}}", "--schema", "MISSING"], "give one of --template"),
    (["--prefix", "NOT_JSON"], "infill needs --length"),
    (["--length", "0", "--prefix", "NOT_JSON"], "--length"),
    (["--raw", "--system", "be brief", "--template", "{{int:1}}"], "cannot be combined with --raw"),
])
def test_bad_templates_exit_2_with_one_line(runner, tmp_path, args, words):
    (tmp_path / "anyof.json").write_text('{"type": "object", "properties": {"a": {"anyOf": [{"type": "null"}]}}}')
    (tmp_path / "bad.json").write_text("{nope")
    names = {"SCHEMA_ANYOF": "anyof.json", "NOT_JSON": "bad.json", "MISSING": "missing.json"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    r = invoke(runner, ["fill", *FAST, *args])
    assert r.exit_code == 2 and words in r.stderr and r.stderr.count("\n") == 1 and r.stdout == "", r.stderr


def test_fill_help_has_examples(runner):
    r = invoke(runner, ["fill", "--help"])
    assert r.exit_code == 0 and "--schema" in r.stdout and "--steps" in r.stdout
    assert "dg fill -m tiny --prefix" in r.stdout.split("Examples:")[1]


def test_fill_trace_records_the_pins_and_reports(runner, tmp_path):
    """dg fill --trace: the same stdout as without it, and a trace whose step lines mark the pins."""
    from dgcli.trace import read_trace

    t = tmp_path / "fill.jsonl.gz"
    args = ["fill", *FAST, "a pet", "--template", "Pet: {{choice:cat|dog}}, age {{int:2}}."]
    plain = invoke(runner, args)
    traced = invoke(runner, [*args, "--trace", str(t)])
    assert traced.exit_code == 0 and traced.stdout == plain.stdout
    steps = read_trace(t).steps
    assert steps and all(len(s["pinned"]) == len(s["canvas"]) and any(s["pinned"]) for s in steps)
    pinned = [i for i, p in enumerate(steps[0]["pinned"]) if p]
    assert all([s["canvas"][i] for i in pinned] == [steps[0]["canvas"][i] for i in pinned] for s in steps)
    report = invoke(runner, ["trace", "report", str(t), "--json"])
    assert report.exit_code == 0 and json.loads(report.stdout)["blocks"][0]["steps"] == len(steps)
