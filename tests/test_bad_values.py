"""Bad values are refused early with one clear line: prompts too long for the context, out-of-range
sampler settings and flags, crafted config.json files and index files, and `dg bench`'s options."""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

import dgcli
import dgcli.bench
from dgcli import cli, loader
from dgcli.api import check_context, stream_generate
from dgcli.config import MAX_DENOISING_STEPS, MAX_SEED, MAX_TEMPERATURE, ModelConfig, SamplerSettings
from dgcli.engine import Engine
from dgcli.errors import CheckpointError, ConfigError, ContextLengthError, DgError
from dgcli.events import DoneEvent
from dgcli.session import ChatSession

FAST = {"max_new_tokens": 16, "max_denoising_steps": 2, "seed": 3}


def no_compute(monkeypatch, engine):
    """Any encoder or decoder pass fails the test: the refusal must come before them."""
    def fail(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(engine.model, "encode", fail)
    monkeypatch.setattr(engine.model, "decode", fail)


# ---- the prompt and answer against the context -----------------------------------------------------

def test_too_long_is_a_usage_error_naming_both_numbers_before_any_compute(tiny, monkeypatch):
    engine, tok = tiny
    positions = engine.config.max_position_embeddings  # 8192 on tiny; canvases of 256
    no_compute(monkeypatch, engine)
    with pytest.raises(ContextLengthError) as e:
        list(stream_generate(engine, tok, [5] * 100, max_new_tokens=positions - 100 - 10, max_denoising_steps=2))
    assert isinstance(e.value, ValueError) and isinstance(e.value, DgError) and e.value.exit_code == 2
    # 100 prompt tokens + 8082 answer tokens, rounded up to 32 canvases of 256 = 8192 + 100 > 8192
    assert "8292" in str(e.value) and str(positions) in str(e.value) and "\n" not in str(e.value)


def test_the_answer_counts_as_whole_canvases(tiny):
    engine = tiny[0]
    L, positions = engine.config.canvas_length, engine.config.max_position_embeddings
    check_context(engine, positions - L, 1)  # one canvas fits exactly
    with pytest.raises(ContextLengthError):
        check_context(engine, positions - L + 1, 1)
    with pytest.raises(ContextLengthError):
        check_context(engine, positions - 2 * L + 1, L + 1)  # 257 answer tokens take two canvases
    check_context(engine, positions - 2 * L, L + 1)


def test_a_static_cache_is_checked_against_its_own_room(tiny, monkeypatch):
    engine = Engine(tiny[0].model, tiny[0].sampler_defaults, static_cache=True)
    cache = engine.new_cache(max_tokens=64)  # room: 64 + one canvas of 256
    no_compute(monkeypatch, engine)
    with pytest.raises(ContextLengthError, match=r"320"):
        list(stream_generate(engine, tiny[1], [5] * 100, cache=cache, **FAST))


def test_chat_refuses_the_turn_and_goes_on(tiny):
    s = ChatSession(*tiny, settings=FAST)
    s.settings["max_new_tokens"] = 100_000
    with pytest.raises(ContextLengthError):
        list(s.turn("hello"))
    assert s.messages == []
    s.settings["max_new_tokens"] = 16
    assert isinstance(list(s.turn("hello"))[-1], DoneEvent) and len(s.messages) == 2


def test_dg_run_too_long_exits_2_with_one_line(monkeypatch):
    r = CliRunner().invoke(cli.app, ["run", "-m", "tiny", "hi", "--device", "cpu", "--steps", "2",
                                     "--max-tokens", "100000"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: too long") and r.stderr.count("\n") == 1 and "8192" in r.stderr


# ---- sampler values: every path (API, CLI, /set, /load) goes through SamplerSettings.validate --------

@pytest.mark.parametrize("overrides", [
    {"t_max": math.inf}, {"t_max": math.nan}, {"t_min": math.nan}, {"t_max": 1e308},
    {"t_max": MAX_TEMPERATURE * 2, "t_min": 1.0}, {"t_min": -1.0}, {"t_min": "abc"}, {"t_max": True},
    {"max_denoising_steps": MAX_DENOISING_STEPS + 1}, {"max_denoising_steps": 1_000_000},
    {"max_denoising_steps": 2.5}, {"max_new_tokens": -4}, {"max_new_tokens": "16"},
    {"seed": 2**64}, {"seed": MAX_SEED + 1}, {"seed": -1}, {"seed": "7"},
    {"entropy_bound": math.inf}, {"confidence_threshold": math.nan}, {"stability_threshold": -1},
    {"stability_threshold": 10**6},  # would allocate a [10**6, canvas] int64 history (2 GB)
    {"eos_token_id": "1"}, {"pad_token_id": "0"},
])
def test_out_of_range_settings_are_refused(overrides):
    with pytest.raises(ConfigError):
        SamplerSettings().replace(**overrides)


def test_the_bounds_themselves_are_accepted():
    s = SamplerSettings().replace(t_max=MAX_TEMPERATURE, t_min=0.0, max_denoising_steps=MAX_DENOISING_STEPS,
                                  seed=MAX_SEED, stability_threshold=MAX_DENOISING_STEPS)
    assert (s.t_max, s.max_denoising_steps, s.seed, s.stability_threshold) == \
        (MAX_TEMPERATURE, MAX_DENOISING_STEPS, MAX_SEED, MAX_DENOISING_STEPS)


@pytest.mark.parametrize("key, value", [("t_max", "inf"), ("t_max", "1e308"), ("temperature", "nan"),
                                        ("steps", "100000"), ("seed", "18446744073709551616")])
def test_chat_set_refuses_them(tiny, key, value):
    s = ChatSession(*tiny)
    with pytest.raises(DgError):
        s.set(key, value)
    assert s.settings == {}


@pytest.mark.parametrize("args, needle", [
    (["--seed", "18446744073709551616"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--t-max", "inf"], "--t-max"),
    (["--t-min", "nan"], "--t-min"),
    (["-t", "1e308"], "--temperature"),
    (["--steps", "1000000"], "1024"),
    (["--steps", "0"], "--steps"),
])
@pytest.mark.parametrize("command", ["run", "chat"])
def test_flags_out_of_range_exit_2_before_loading(monkeypatch, command, args, needle):
    monkeypatch.setattr(dgcli, "load", lambda *a, **k: pytest.fail("loaded a model for a bad flag"))
    prompt = ["hi"] if command == "run" else []
    r = CliRunner().invoke(cli.app, [command, "-m", "tiny", *prompt, *args], input="")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and needle in r.stderr
    assert "Traceback" not in r.stderr


# ---- crafted checkpoints ------------------------------------------------------------------------------

@pytest.fixture
def crafted(tiny_dir, tmp_path):
    """A copy of tiny whose config.json (or index) a test rewrites."""
    d = tmp_path / "crafted"
    shutil.copytree(tiny_dir, d)
    return d


def rewrite(path, change):
    d = json.loads(path.read_text())
    change(d.get("text_config", d), d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("change, error", [
    (lambda t, top: t.update(num_hidden_layers=1e9), ConfigError),
    (lambda t, top: t.update(num_hidden_layers=10**9, layer_types=None), ConfigError),
    (lambda t, top: t.update(num_hidden_layers=3, layer_types=None), CheckpointError),  # in range, not the weights'
    (lambda t, top: t.update(num_hidden_layers=1, layer_types=None), CheckpointError),
    (lambda t, top: top.update(canvas_length=1e9), ConfigError),
    (lambda t, top: top.update(canvas_length=10**9), ConfigError),
    (lambda t, top: top.update(canvas_length=-1), ConfigError),
    (lambda t, top: top.update(eos_token_id="1"), ConfigError),
    (lambda t, top: top.update(eos_token_id=[1, "x"]), ConfigError),
    (lambda t, top: t.update(sliding_window="512"), ConfigError),
    (lambda t, top: t.update(sliding_window=10**12), ConfigError),
    (lambda t, top: t.update(max_position_embeddings=math.inf), ConfigError),
    (lambda t, top: t.update(head_dim=10**9), ConfigError),
    (lambda t, top: t.update(rms_norm_eps="small"), ConfigError),
    (lambda t, top: t.update(pad_token_id=10**9), ConfigError),
    (lambda t, top: t.update(vocab_size=t["vocab_size"] * 1000), CheckpointError),
    (lambda t, top: t.update(hidden_size=t["hidden_size"] * 2), CheckpointError),
])
def test_crafted_config_is_refused_before_the_model_is_built(crafted, monkeypatch, change, error):
    rewrite(crafted / "config.json", change)
    monkeypatch.setattr(loader, "DiffusionGemma", lambda *a: pytest.fail("built a model from a crafted config"))
    with pytest.raises(error) as e:
        loader.load_model(crafted, device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shard", ["../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\..\\x.safetensors", 7])
def test_index_shards_must_stay_inside_the_checkpoint(crafted, shard):
    first = loader.shard_files(crafted)[0]
    keys = list(json.loads((crafted / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (crafted / "model.safetensors.index.json").exists() else []
    keys = keys or ["model.decoder.norm.weight"]
    (crafted / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {keys[0]: shard, **{k: first.name for k in keys[1:]}}}))
    with pytest.raises(CheckpointError, match="refused"):
        loader.shard_files(crafted)


# ---- dg bench's options -------------------------------------------------------------------------------

@pytest.fixture
def bench(monkeypatch):
    b = dgcli.bench.load()
    monkeypatch.setattr(b, "run_bench", lambda cfg: pytest.fail("ran the bench with bad options"))
    return b


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "steps"), (["--steps", "100000"], "steps"), (["--prompt-len", "0"], "prompt-len"),
    (["--repeats", "-1"], "repeats"), (["--canvas", "-1"], "canvas"), (["--vocab", "0"], "vocab"),
    (["--threads", "0"], "threads"), (["--layers", "100000"], "layers"), (["--device", "tpu"], "tpu"),
    (["--steps", "x"], "--steps"),
])
def test_bench_bad_options_exit_2_with_one_line(bench, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "tiny", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_bench_cuda_without_a_gpu(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "tiny", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_bench_unwritable_out_is_refused_first(bench, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file / "x.json", tmp_path / "missing" / "x.json", tmp_path):
        with pytest.raises(SystemExit) as e:
            bench.main(["--config", "tiny", "--out", str(out)])
        assert e.value.code == 2 and "--out" in capsys.readouterr().err
    fresh = tmp_path / "new.json"
    bench.check_writable(fresh)  # writable: nothing is left behind by the check
    assert not fresh.exists()
