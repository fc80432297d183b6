"""The Engine: the policy it decides once, chunked prefill, the environment switches, and the layering
that keeps speed outside the model."""

import ast
from pathlib import Path

import pytest
import torch

from dgcli import engine as engine_mod
from dgcli import settings
from dgcli.cache import KVCache, StaticKVCache
from dgcli.config import SamplerSettings
from dgcli.engine import Engine
from dgcli.errors import ConfigError
from dgcli.events import DoneEvent
from dgcli.sampler import denoise

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_policy_is_the_reference(tiny):
    engine = tiny[0]
    assert isinstance(engine, Engine) and not engine.static_cache and not engine.cuda_graphs
    assert not engine.fused_head and isinstance(engine.new_cache(), KVCache)
    forced = Engine(engine.model, static_cache=True)
    assert isinstance(forced.new_cache(max_tokens=512), StaticKVCache) and not forced.cuda_graphs
    # the model carries no run-time flags: they are the engine's
    for flag in ("graph_capture", "fused_head", "sampler_defaults", "source", "quantization"):
        assert not hasattr(engine.model, flag)


@pytest.mark.usefixtures("sdpa_layout")
def test_chunked_prefill_is_one_pass(tiny, monkeypatch):
    """A static cache takes a long prompt in chunks; the answer is the one-pass answer."""
    model = tiny[0].model
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, 300), generator=torch.Generator().manual_seed(5)).tolist()[0]
    settings = SamplerSettings(max_new_tokens=256, max_denoising_steps=2, seed=4, eos_token_id=None)

    def answer(chunk):
        monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", chunk)
        engine = Engine(model, static_cache=True)
        cache = engine.new_cache(max_tokens=1024)
        encoded = []
        real_encode = model.encode
        monkeypatch.setattr(model, "encode", lambda ids, c: encoded.append(ids.shape[1]) or real_encode(ids, c))
        done = [e for e in denoise(engine, prompt, settings, cache=cache) if isinstance(e, DoneEvent)][0]
        monkeypatch.undo()
        return done.token_ids, encoded

    one, passes_one = answer(4096)
    chunked, passes_chunked = answer(128)
    assert passes_one == [300] and passes_chunked == [128, 128, 44]
    assert chunked == one


def test_switches_have_one_rule(monkeypatch):
    for value, want in [("0", False), ("false", False), ("OFF", False), ("no", False), ("1", True),
                        ("true", True), ("On", True), ("", True)]:
        monkeypatch.setenv("DG_CUDA_GRAPHS", value)
        assert settings.flag("DG_CUDA_GRAPHS", True) is want, value
    monkeypatch.setenv("DG_AUTOTUNE", "maybe")
    with pytest.raises(ConfigError, match="DG_AUTOTUNE='maybe'"):
        settings.flag("DG_AUTOTUNE", True)
    monkeypatch.setenv("DG_KERNELS", "Triton")
    assert settings.kernels_mode() == "triton"
    monkeypatch.setenv("DG_KERNELS", "fast")
    with pytest.raises(ConfigError, match="DG_KERNELS"):
        settings.kernels_mode()


def test_every_switch_is_documented_in_the_readme():
    """The README's table is settings.SWITCHES (test_config checks that the code reads no other DG_*)."""
    readme = (ROOT / "README.md").read_text()
    for name, (default, what) in settings.SWITCHES.items():
        assert f"| `{name}` | {default} | {what} |" in readme, name


LAYERS = ["errors", "settings", "config", "cache", "model", "loader", "engine", "graphs", "sampler", "events",
          "api", "session"]


def dgcli_imports(name):
    tree = ast.parse((ROOT / "dgcli" / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_layers_import_only_downwards():
    """config -> model -> cache -> engine (graphs, kernels plugged in) -> sampler -> api -> session."""
    model = dgcli_imports("model")
    assert model & set(LAYERS) <= {"config", "cache", "errors"}
    assert not any(m.startswith(("kernels", "quant")) for m in model)
    assert not any(m.startswith(("kernels", "quant")) for m in dgcli_imports("loader") | dgcli_imports("cache"))
    assert not dgcli_imports("engine") & {"sampler", "api", "session", "repl", "cli"}
    assert not dgcli_imports("sampler") & {"api", "session", "repl", "cli", "tokenizer"}
    assert not dgcli_imports("session") & {"repl", "cli", "canvas_view"}


def test_broken_weights_are_named_not_a_multinomial_error(tiny):
    """NaN weights: the step's one host read carries a finiteness flag, and the error names the weights."""
    import copy

    from dgcli.errors import CheckpointError

    model = copy.deepcopy(tiny[0].model)
    model.model.decoder.norm.weight.data.fill_(float("nan"))
    settings = SamplerSettings(max_new_tokens=16, max_denoising_steps=2, seed=0, eos_token_id=None)
    with pytest.raises(CheckpointError, match="NaN or infinite: its weights are broken"):
        list(denoise(Engine(model), [5, 6, 7], settings))


def test_engine_applies_every_fused_swap_on_cuda_only(tiny, monkeypatch):
    """kernels.install_fused: each module with a kernel becomes its fused subclass on CUDA, none elsewhere."""
    import copy

    from dgcli import model as dgmodel
    from kernels.fused_attention import FusedAttention
    from kernels.fused_mix import FusedLayer
    from kernels.fused_mlp import FusedMLP, FusedSelfConditioning
    from kernels.fused_norms import FusedRMSNorm
    from kernels.fused_router import FusedRouter

    swaps = {dgmodel.RMSNorm: FusedRMSNorm, dgmodel.Router: FusedRouter, dgmodel.Layer: FusedLayer,
             dgmodel.MLP: FusedMLP, dgmodel.SelfConditioning: FusedSelfConditioning,
             dgmodel.Attention: FusedAttention}
    cpu = copy.deepcopy(tiny[0].model)
    Engine(cpu)
    assert not any(type(m) in swaps.values() for m in cpu.modules())
    cuda = copy.deepcopy(tiny[0].model)
    monkeypatch.setattr(dgmodel.DiffusionGemma, "device", property(lambda self: torch.device("cuda")))
    Engine(cuda, static_cache=False, cuda_graphs=False, fused_head=False)
    for plain, fused in swaps.items():
        found = [m for m in cuda.modules() if isinstance(m, plain)]
        assert found and all(type(m) is fused for m in found), plain.__name__
