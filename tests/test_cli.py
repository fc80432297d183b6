"""The `dg` commands through typer's CliRunner, on the built-in tiny model (CPU, no network)."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import dgcli
from dgcli import cli, store
from dgcli.api import prompt_ids
from dgcli.config import MANIFEST_FILE

FAST = ["-m", "tiny", "--max-tokens", "16", "--steps", "2", "--device", "cpu"]  # cpu: comparable with the fixture
SETTINGS = {"max_new_tokens": 16, "max_denoising_steps": 2}



def invoke(runner, args, **kw):
    result = runner.invoke(cli.app, args, **kw)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_version_and_root_help(runner):
    r = invoke(runner, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"dg {dgcli.__version__}"
    r = invoke(runner, [])
    assert r.exit_code == 0 and "run" in r.output and "quantize" in r.output


@pytest.mark.parametrize("command", ["run", "chat", "pull", "list", "show", "rm", "quantize", "bench"])
def test_every_command_has_help_with_an_example(runner, command):
    r = invoke(runner, [command, "--help"])
    assert r.exit_code == 0
    assert "Examples:" in r.stdout and f"dg {command}" in r.stdout.split("Examples:")[1]


def test_run_prints_only_the_answer(runner, tiny):
    r = invoke(runner, ["run", *FAST, "--seed", "1", "hello"])
    assert r.exit_code == 0, r.stderr
    expected = dgcli.generate(*tiny, "hello", **SETTINGS, seed=1)
    assert r.stdout == expected + "\n"
    assert r.stderr == ""


def test_run_json(runner, tiny):
    r = invoke(runner, ["run", *FAST, "--seed", "5", "--json", "hello"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"] == "tiny" and d["seed"] == 5
    assert d["settings"]["max_new_tokens"] == 16 and d["settings"]["max_denoising_steps"] == 2
    assert 0 < d["generated_tokens"] <= 16 and d["blocks"] == len(d["steps_per_block"]) == 1
    assert all(1 <= s <= 2 for s in d["steps_per_block"])
    assert d["prompt_tokens"] == len(prompt_ids(tiny[1], "hello"))
    assert d["text"] == dgcli.generate(*tiny, "hello", **SETTINGS, seed=5)
    for key in ("prefill_seconds", "denoise_seconds", "total_seconds", "tokens_per_second", "peak_memory_bytes"):
        assert d[key] >= 0


def test_run_reads_stdin_after_the_argument(runner, tiny):
    r = invoke(runner, ["run", *FAST, "--seed", "2", "--json", "Summarize:"], input="line one\nline two\n")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    prompt = "Summarize:\n\nline one\nline two"
    assert d["prompt_tokens"] == len(prompt_ids(tiny[1], prompt))
    assert d["text"] == dgcli.generate(*tiny, prompt, **SETTINGS, seed=2)


def test_run_reads_stdin_alone(runner, tiny):
    r = invoke(runner, ["run", *FAST, "--seed", "2", "--json"], input="just the pipe\n")
    assert json.loads(r.stdout)["prompt_tokens"] == len(prompt_ids(tiny[1], "just the pipe"))


@pytest.mark.parametrize("stdin", ["", "  \n\n"])
def test_run_empty_prompt_is_bad_usage(runner, stdin):
    r = invoke(runner, ["run", "-m", "tiny"], input=stdin)
    assert r.exit_code == 2
    assert r.stderr.startswith("error: empty prompt") and r.stderr.count("\n") == 1
    assert r.stdout == ""


def test_run_raw_and_system_and_think(runner, tiny):
    r = invoke(runner, ["run", *FAST, "--seed", "3", "--json", "--raw", "hello"])
    assert json.loads(r.stdout)["prompt_tokens"] == len(tiny[1].encode("hello", add_special_tokens=True))
    r = invoke(runner, ["run", *FAST, "--seed", "3", "--json", "--system", "be brief", "--think", "hello"])
    assert json.loads(r.stdout)["prompt_tokens"] == len(prompt_ids(tiny[1], "hello", system="be brief", think=True))
    r = invoke(runner, ["run", "-m", "tiny", "--raw", "--system", "x", "hello"])
    assert r.exit_code == 2 and "--raw" in r.stderr


def test_temperature_shorthand(runner):
    r = invoke(runner, ["run", *FAST, "--json", "--temperature", "0.6", "hi"])
    s = json.loads(r.stdout)["settings"]
    assert s["t_max"] == pytest.approx(0.6) and s["t_min"] == pytest.approx(0.3)
    r = invoke(runner, ["run", *FAST, "--temperature", "0.6", "--t-min", "0.1", "hi"])
    assert r.exit_code == 2 and "--temperature" in r.stderr


def test_sampling_flags_reach_the_engine(runner):
    r = invoke(runner, ["run", *FAST, "--json", "--entropy-bound", "0.5", "--t-min", "0.2", "--t-max", "0.9", "hi"])
    s = json.loads(r.stdout)["settings"]
    assert (s["entropy_bound"], s["t_min"], s["t_max"]) == (0.5, 0.2, 0.9)


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "--steps"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--device", "gpu0"], "--device"),
    (["--device", "mps"], "expected cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "--dtype"),
    (["--entropy-bound", "0"], "entropy-bound"),
    (["--t-max", "0.2"], "t_max"),  # below the model's t_min
    (["--noise", "sparkles"], "--noise"),
])
def test_bad_flags_exit_2_with_one_line(runner, args, words):
    r = invoke(runner, ["run", "-m", "tiny", *args, "hi"])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and words in r.stderr and r.stderr.count("\n") == 1


def test_unknown_model_says_how_to_get_it(runner):
    r = invoke(runner, ["run", "-m", "someorg/nothing-here", "hi"])
    assert r.exit_code == 1 and r.stderr == "error: model 'someorg/nothing-here' is not downloaded; " \
                                           "run `dg pull someorg/nothing-here` first\n"
    r = invoke(runner, ["run", "-m", "./no/such/dir", "hi"])
    assert r.exit_code == 1 and r.stderr.startswith("error: no model named './no/such/dir'")


def test_dg_debug_shows_the_traceback(runner, monkeypatch):
    monkeypatch.setenv("DG_DEBUG", "yes")  # the one on/off rule of dgcli.settings
    r = runner.invoke(cli.app, ["run", "-m", "someorg/nothing-here", "hi"])
    assert r.exit_code == 1 and "Traceback" in r.stderr and "ModelNotFoundError" in r.stderr  # same exit code
    monkeypatch.setenv("DG_DEBUG", "loud")
    r = invoke(runner, ["run", "-m", "someorg/nothing-here", "hi"])
    assert r.exit_code == 1 and r.stderr.startswith("error: DG_DEBUG='loud'") and r.stderr.count("\n") == 1


def _fake_stream(exc):
    def stream(*a, **k):
        raise exc
        yield
    return stream


def test_ctrl_c_exits_130(runner, monkeypatch):
    monkeypatch.setattr(dgcli.api, "stream_generate", _fake_stream(KeyboardInterrupt()))
    assert invoke(runner, ["run", "-m", "tiny", "hi"]).exit_code == 130


def test_engine_empty_prompt_exits_2(runner, monkeypatch):
    monkeypatch.setattr(dgcli.api, "stream_generate", _fake_stream(dgcli.errors.EmptyPromptError("empty prompt")))
    r = invoke(runner, ["run", "-m", "tiny", "hi"])
    assert r.exit_code == 2 and r.stderr == "error: empty prompt\n"


def test_broken_pipe_is_quiet(runner, monkeypatch):
    def broken(self, event):
        raise BrokenPipeError
    monkeypatch.setattr(cli.PlainView, "update", broken)
    r = invoke(runner, ["run", *FAST, "hi"])
    assert r.exit_code == 141 and r.stderr == ""


def test_verbose_and_canvas_off_a_terminal(runner):
    r = invoke(runner, ["run", *FAST, "--seed", "7", "--verbose", "--canvas", "hi"])
    assert r.exit_code == 0
    assert "tokens ·" in r.stderr and "seed 7" in r.stderr and r.stderr.count("\n") == 1
    assert "\x1b" not in r.stdout + r.stderr and r.stdout.endswith("\n")


def test_pull_tiny_then_list_show_rm(runner, home):
    r = invoke(runner, ["list"])
    assert r.exit_code == 0 and "no models yet" in r.stdout
    r = invoke(runner, ["pull", "tiny"])
    assert r.exit_code == 0 and (home / "dg" / "models").is_dir()
    rows = json.loads(invoke(runner, ["list", "--json"]).stdout)
    assert [(e["name"], e["kind"]) for e in rows] == [("tiny", "builtin")] and rows[0]["bytes"] > 100_000
    r = invoke(runner, ["list"])
    assert r.stdout.splitlines()[0].split() == ["NAME", "KIND", "SIZE", "WHERE"] and "tiny" in r.stdout
    r = invoke(runner, ["rm", "tiny"], input="n\n")
    assert r.exit_code == 0 and "kept tiny" in r.stdout and Path(rows[0]["path"]).is_dir()  # a choice
    r = invoke(runner, ["rm", "tiny"], input="y\n")
    assert r.exit_code == 0 and not Path(rows[0]["path"]).exists()
    assert json.loads(invoke(runner, ["list", "--json"]).stdout) == []


def test_show_tiny(runner, tiny):
    r = invoke(runner, ["show", "tiny"])
    assert r.exit_code == 0
    assert "(builtin)" in r.stdout and "layers        6 (2 full attention" in r.stdout
    assert "chat template yes" in r.stdout and "entropy_bound=0.1" in r.stdout
    d = json.loads(invoke(runner, ["show", "tiny", "--json", "--context", "100"]).stdout)
    assert d["parameters"] == sum(p.numel() for p in tiny[0].model.state_dict().values())
    assert d["architecture"]["experts"] == 8 and d["quantization"] is None and d["context"] == 100
    assert d["estimated_vram_bytes"] >= d["weight_bytes"] > 0


def test_quantized_dir_is_recognised(runner, home, tiny_dir):
    q = home / "dg" / "models" / "tiny-int4"
    shutil.copytree(tiny_dir, q)
    (q / MANIFEST_FILE).write_text(json.dumps({"format_version": 1, "scheme": "int4"}))
    rows = json.loads(invoke(runner, ["list", "--json"]).stdout)
    assert ("tiny-int4", "quantized") in [(e["name"], e["kind"]) for e in rows]
    r = invoke(runner, ["show", "tiny-int4"])
    assert r.exit_code == 0 and "(quantized)" in r.stdout and "quantization  int4 (format 1)" in r.stdout
    r = invoke(runner, ["rm", "tiny-int4", "--yes"])
    assert r.exit_code == 0 and not q.exists()


def test_quantize_list_show_run(runner, home):
    out = home / "dg" / "models" / "tiny-q"
    r = invoke(runner, ["quantize", "tiny", str(out), "--budget", "1GB", "--context", "1024"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"wrote {out}\n" and (out / MANIFEST_FILE).is_file()
    rows = {e["name"]: e["kind"] for e in json.loads(invoke(runner, ["list", "--json"]).stdout)}
    assert rows == {"tiny": "builtin", "tiny-q": "quantized"}
    d = json.loads(invoke(runner, ["show", "tiny-q", "--json"]).stdout)
    assert d["quantization"]["scheme"] == "int4" and d["vram_plan"]["scheme"] == "int4"
    assert d["estimated_vram_bytes"] == d["vram_plan"]["total_bytes"]
    # The same model, packed: the same parameters, and the KV cache its own plan counts.
    src = json.loads(invoke(runner, ["show", "tiny", "--json"]).stdout)
    assert d["parameters"] == src["parameters"] > 0
    kv_rows = [r["nbytes"] for r in d["vram_plan"]["rows"] if r["section"] == "kv cache"]
    assert d["kv_cache_bytes"] == sum(kv_rows) == src["kv_cache_bytes"]
    r = invoke(runner, ["run", "-m", "tiny-q", "--max-tokens", "16", "--steps", "1", "--seed", "1", "hi"])
    assert r.exit_code == 0 and r.stdout.strip()


def test_list_does_not_import_torch(home):
    """dg list tells a quantized directory by its manifest without the loader (and torch): it stays quick."""
    q = home / "dg" / "models" / "some-int4"
    q.mkdir(parents=True)
    (q / "config.json").write_text("{}")
    (q / MANIFEST_FILE).write_text("{}")
    code = ("import sys; from dgcli import cli; cli.app(['list'], prog_name='dg', standalone_mode=False); "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DG_HOME": str(home / "dg"), "HF_HUB_CACHE": str(home / "hf")})
    assert p.returncode == 0, p.stderr
    assert "some-int4" in p.stdout and "quantized" in p.stdout and p.stdout.rstrip().endswith("False")


def _fake_hf_repo(cache: Path, repo_id: str, model_type: str, shards=("model.safetensors",)) -> Path:
    """A repo in the huggingface_hub cache layout: blobs, a snapshot of symlinks, refs/main."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / ("a" * 40)
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("a" * 40)
    files = {"config.json": json.dumps({"model_type": model_type}), **{s: "x" * 100 for s in shards}}
    for i, (name, content) in enumerate(files.items()):
        blob = root / "blobs" / f"{i:040d}"
        blob.write_text(content)
        (snap / name).symlink_to(blob)
    return root


def test_list_and_rm_hf_cache(runner, home):
    dgr = _fake_hf_repo(home / "hf", "google/diffusiongemma-test", "diffusion_gemma")
    _fake_hf_repo(home / "hf", "someone/llama", "llama")
    rows = json.loads(invoke(runner, ["list", "--json"]).stdout)
    assert [(e["name"], e["kind"]) for e in rows] == [("google/diffusiongemma-test", "bf16")]
    assert rows[0]["bytes"] > 100
    r = invoke(runner, ["rm", "google/diffusiongemma-test", "-y"])
    assert r.exit_code == 0 and not dgr.exists() and (home / "hf" / "models--someone--llama").exists()


def test_rm_refuses_what_dg_does_not_manage(runner, home, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = invoke(runner, ["rm", str(d), "--yes"])
    assert r.exit_code == 1 and d.exists() and "dg list" in r.stderr


def test_pull_offline_is_one_line_and_leaves_nothing(runner, home, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = invoke(runner, ["pull", "google/diffusiongemma-26B-A4B-it"])
    assert r.exit_code == 1
    assert r.stderr == "error: cannot download google/diffusiongemma-26B-A4B-it: offline mode is on (HF_HUB_OFFLINE)\n"
    assert json.loads(invoke(runner, ["list", "--json"]).stdout) == []


def test_pull_downloads_only_the_needed_files(runner, home, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kw):
        calls.append((repo_id, allow_patterns, cache_dir))
        return str(_fake_hf_repo(Path(cache_dir), repo_id, "diffusion_gemma") / "snapshots" / ("a" * 40))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    r = invoke(runner, ["pull", "google/dg-small"])
    assert r.exit_code == 0, r.stderr
    assert calls == [("google/dg-small", store.NEEDED_FILES, home / "hf")]
    assert "google/dg-small is ready" in r.stdout and r.stderr == ""


def test_pull_incomplete_download_is_an_error(runner, home, monkeypatch):
    import huggingface_hub

    def fake(repo_id, allow_patterns=None, cache_dir=None, **kw):
        snap = _fake_hf_repo(Path(cache_dir), repo_id, "diffusion_gemma") / "snapshots" / ("a" * 40)
        (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}}))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = invoke(runner, ["pull", "google/dg-small"])
    assert r.exit_code == 1 and "model-2.safetensors" in r.stderr and "dg pull google/dg-small" in r.stderr


def test_pull_refuses_non_repo_names(runner):
    r = invoke(runner, ["pull", "not a repo"])
    assert r.exit_code == 2 and r.stderr.startswith("error: 'not a repo' is not a Hugging Face repo id")


def test_quantize_calls_the_converter(runner, home, monkeypatch):
    calls = []
    fake = types.ModuleType("quant.convert")
    fake.quantize_checkpoint = lambda src, out, **kw: calls.append((src, out, kw)) or out or Path("default")
    monkeypatch.setitem(sys.modules, "quant.convert", fake)
    import quant.planner

    after = []  # one line from what was written (the plan's table was printed before, by the converter)
    monkeypatch.setattr(quant.planner, "estimate_for_dir", lambda out, **kw: after.append((out, kw)) or types.SimpleNamespace(
        table=lambda: "TABLE", weights=2_000_000, total=3_000_000_000))
    r = invoke(runner, ["quantize", "tiny", "--scheme", "nf4", "--budget", "24GiB", "--context", "4096"])
    assert r.exit_code == 0, r.stderr
    assert after == [(Path("default"), {"context": 4096, "budget_bytes": 24 * 2**30})] and "TABLE" not in r.stderr
    assert "written: 2.0 MB of weights; about 3.0 GB of VRAM at context 4,096" in r.stderr
    assert calls[0] == (store.resolve("tiny"), None, {"scheme": "nf4", "budget_bytes": 24 * 2**30, "context": 4096,
                                                      "force": False})
    assert r.stdout == "wrote default\n"
    invoke(runner, ["quantize", "tiny", str(home / "out"), "--force"])
    assert calls[1][1] == home / "out" and calls[1][2]["budget_bytes"] == 18 * 10**9 and calls[1][2]["force"]


@pytest.mark.parametrize("args, code", [
    (["--budget", "lots"], 2), (["--scheme", "int8"], 2), (["--context", "0"], 2),
])
def test_quantize_bad_flags(runner, args, code):
    r = invoke(runner, ["quantize", "tiny", *args])
    assert r.exit_code == code and r.stderr.startswith("error: ")


def test_quantize_refuses_to_overwrite(runner, home):
    (home / "out").mkdir()
    r = invoke(runner, ["quantize", "tiny", str(home / "out")])
    assert r.exit_code == 1 and "--force" in r.stderr and r.stderr.count("\n") == 1


def test_bench_passes_its_arguments(runner, monkeypatch):
    seen = []
    fake = types.ModuleType("dgcli.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "dgcli.bench", fake)
    monkeypatch.setattr(dgcli, "bench", fake, raising=False)
    r = invoke(runner, ["bench", "-m", "tiny", "--steps", "3"])
    assert r.exit_code == 0 and seen == [["-m", "tiny", "--steps", "3"]]


def test_bench_outside_a_source_checkout(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "dgcli.bench", None)  # importing it fails, as without scripts/bench.py
    monkeypatch.delattr(dgcli, "bench", raising=False)
    r = invoke(runner, ["bench", "-m", "tiny"])
    assert r.exit_code == 1 and "benchmarks are not part of this install" in r.stderr and r.stderr.count("\n") == 1


def test_chat_from_a_pipe(runner):
    r = invoke(runner, ["chat", "tiny", "--max-tokens", "16", "--steps", "2", "--seed", "1"],
               input="hello\n/stats\n/exit\n")
    assert r.exit_code == 0, r.stderr
    assert "dg chat · tiny" in r.stdout and r.stdout.count("tokens ·") == 2  # after the answer, and /stats
    assert "\x1b" not in r.stdout


def test_chat_flags_reach_the_session(runner):
    r = invoke(runner, ["chat", "--model", "tiny", "--no-canvas", "--system", "be terse", "--think", "-t", "0.5",
                        "--entropy-bound", "0.2", "--dtype", "float32", "--device", "cpu", "--noise", "dots",
                        "--fps", "10"], input="/show\n")
    assert r.exit_code == 0, r.stderr
    for line in ("system                 be terse", "think                  True", "t_max                  0.5",
                 "t_min                  0.25", "entropy_bound          0.2", "canvas                 False",
                 "noise                  dots"):
        assert line in r.stdout


def test_chat_two_model_names_is_bad_usage(runner):
    r = invoke(runner, ["chat", "tiny", "--model", "other/model"])
    assert r.exit_code == 2 and "two models" in r.stderr


class FakeTTY:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


def test_canvas_only_on_a_colour_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert cli.use_canvas(FakeTTY(True)) and not cli.use_canvas(FakeTTY(False))
    assert not cli.use_canvas(FakeTTY(True), no_canvas=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli.use_canvas(FakeTTY(True))
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not cli.use_canvas(FakeTTY(True))
