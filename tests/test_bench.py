"""The benchmark (scripts/bench.py, `dg bench`) on CPU with the tiny preset: the report's structure
and invariants (fields, engine against eager and against transformers, flags reaching the Engine).
Speed itself is not tested."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgcli.bench
from dgcli import engine as engine_module
from dgcli import graphs
from dgcli.known import DIFFUSIONGEMMA_26B_A4B

bench = dgcli.bench.load()
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(config="tiny", device="cpu", prompt_len=8, steps=2, repeats=1, threads=1)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_phases(section: dict, L: int = 16, graphs_on: bool = False) -> None:  # 16: the tiny canvas
    for k in ("prefill_ms", "step_ms", "commit_ms", "prefill_tokens_per_s"):
        assert positive(section[k]), k
    assert set(section["warmup_ms"]) == {"prefill", "step", "step_sc", "commit"}
    assert section["cuda_graphs"] is graphs_on
    assert positive(section["graph_capture_ms"]) if graphs_on else section["graph_capture_ms"] is None
    assert all(positive(v) for v in section["warmup_ms"].values())
    assert all(positive(v) for v in section["min_ms"].values())
    assert section["min_ms"]["step"] <= section["step_ms"] + 1e-9
    assert set(section["tokens_per_s"]) == {"8", "16", "32", "48"}
    tps = [section["tokens_per_s"][k] for k in ("8", "16", "32", "48")]
    assert all(positive(v) for v in tps) and tps == sorted(tps, reverse=True)  # more steps, fewer tokens/s
    assert tps[0] == pytest.approx(L / (8 * section["step_ms"] + section["commit_ms"]) * 1e3)
    assert section["peak_vram_mb"] is None  # CPU


def test_engine_and_reference_agree():
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    r = bench.run_bench(**TINY, reference=True)
    assert torch.get_num_threads() == threads  # restored
    json.dumps(r)  # serialisable
    assert bench.finite_numbers(r)
    c = r["config"]
    assert c["name"] == "tiny" and c["dtype"] == "float32" and c["experts"] == "dense"
    assert (c["static_cache"], c["cuda_graphs"], c["fused_head"]) == (False, False, False)  # the CPU policy
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch_threads"] == 1
    assert positive(r["weights_gb"]) and positive(r["peak_rss_mb"]) and positive(r["build_ms"])
    check_phases(r["engine"])
    check_phases(r["reference"])
    assert r["engine"]["eager_max_abs_logit_diff"] == 0.0  # on the CPU the engine's step is the eager path
    assert "eager_max_abs_logit_diff" not in r["reference"]
    # dg's random weights given to the reference: the same first-step logits
    assert r["interleaved"] is True and r["reference"]["first_step_max_abs_logit_diff"] < 1e-3
    assert all(positive(v) for k, v in r["speedup_vs_reference"].items() if k != "min_ms")


@pytest.mark.slow
def test_graph_replays_match_eager_and_flags_reach_the_engine(monkeypatch):
    """The engine's steps replayed from captured graphs (traced on the CPU) give the eager logits, and
    the bench passes its flags to the Engine and reports what the Engine did with them."""
    seen = []

    def engine(model, **kw):
        seen.append(kw)
        return real(model, capture=graphs.TracedCapture(), **kw)

    real = engine_module.Engine
    monkeypatch.setattr(engine_module, "Engine", engine)
    r = bench.run_bench(**TINY, static_cache=True, cuda_graphs=True, fused_head=False)
    assert seen == [dict(static_cache=True, cuda_graphs=True, fused_head=False)]
    assert (r["config"]["static_cache"], r["config"]["cuda_graphs"], r["config"]["fused_head"]) == (True, True, False)
    check_phases(r["engine"], graphs_on=True)
    assert r["engine"]["eager_max_abs_logit_diff"] < 1e-4

    seen.clear()
    bench.run_bench(**dict(TINY, steps=1))
    assert seen == [dict(static_cache=None, cuda_graphs=None, fused_head=None)]  # None: the Engine's policy


def test_timed_steps_are_the_engines_alone(monkeypatch):
    """With the fused head the step's output is the raw logits: making proc from them (for the
    self-conditioning input, the first-step check) happens outside the timed step, as the sampler's
    draw makes it, not as one more kernel inside it; the first-step logits are still proc."""
    import importlib

    lm_head_module = importlib.import_module("kernels.lm_head")  # the package re-exports the function
    timing, inside = [False], []
    real_timed, real_process = bench._timed, lm_head_module.process

    def timed(fn, device):
        timing[0] = True
        try:
            return real_timed(fn, device)
        finally:
            timing[0] = False

    monkeypatch.setattr(bench, "_timed", timed)
    monkeypatch.setattr(lm_head_module, "process", lambda *a: inside.append(timing[0]) or real_process(*a))
    r = bench.run_bench(**TINY, fused_head=True)
    assert r["config"]["fused_head"] is True
    assert inside and not any(inside)  # proc made, never inside a timed call
    assert r["engine"]["eager_max_abs_logit_diff"] < 1e-4  # the first step's proc, against the plain path's


def test_command_line_flags(monkeypatch):
    got = []
    monkeypatch.setattr(bench, "run_bench", lambda cfg: got.append(cfg) or {})
    assert bench.main(["--config", "tiny", "--steps", "3"]) == 0
    assert bench.main(["--config", "full", "--static-cache", "--no-cuda-graphs", "--no-fused-head",
                       "--experts", "int4", "--dtype", "float16"]) == 0
    a, b = got
    assert (a.config, a.steps, a.static_cache, a.cuda_graphs, a.fused_head) == ("tiny", 3, None, None, None)
    assert (b.static_cache, b.cuda_graphs, b.fused_head, b.experts, b.dtype) == (True, False, False, "int4", "float16")
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--steps", "0"])


def test_model_only_forwards_to_step_model(monkeypatch):
    seen = []
    fake = type("StepModel", (), {"main": staticmethod(lambda argv: seen.append(argv) or 0)})
    monkeypatch.setattr(bench, "_step_model", lambda: fake)
    monkeypatch.setattr(bench, "run_bench", lambda cfg: pytest.fail("--model-only must not run the bench"))
    assert bench.main(["--config", "tiny", "--model-only", "--steps", "3"]) == 0
    assert seen == [["--config", "tiny", "--steps", "3"]]


def test_int4_experts_and_moe_only():
    from quant.runtime import Packed, QuantExperts

    model = bench.build_model(bench.text_config("tiny"), torch.device("cpu"), torch.float32, "int4")
    layers = model.model.decoder.layers
    assert all(isinstance(layer.experts, QuantExperts) for layer in layers)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for p in (m for m in model.modules() if isinstance(m, Packed)):
        assert p.qweight.device.type == "cpu" and p.dtype == torch.float32 and p.scales.dtype == torch.float16
        w = p.dequantize()  # random weights of std fan_in^-1/2, quantized: not zeros, not garbage
        assert 0.7 < w.std().item() * p.shape[-1] ** 0.5 < 1.3

    r = bench.run_bench(**TINY, experts="int4")
    assert r["config"]["experts"] == "int4" and bench.finite_numbers(r)
    check_phases(r["engine"])
    m = bench.run_bench(**TINY, moe_only=True)["moe"]
    assert m["kernel"] == "reference" and m["tokens"] == 16
    for k in ("ms", "gb_per_s", "copy_gb_per_s", "bytes"):
        assert positive(m[k]), k
    assert m["device_peak_gb_per_s"] is None  # not known for a CPU
    assert 1 <= m["experts_touched"] <= 8


def test_presets_derive_from_the_released_config():
    full = bench.text_config("full")
    released = DIFFUSIONGEMMA_26B_A4B["text_config"]
    assert {k: full[k] for k in released} == released and full["canvas_length"] == 256
    for name in ("reduced", "tiny"):  # what the presets do not narrow is the released model's
        d = bench.text_config(name)
        assert d["rope_parameters"] == released["rope_parameters"] and d["rms_norm_eps"] == released["rms_norm_eps"]
    d = bench.text_config("reduced", layers=12, vocab=1000, canvas=32)
    assert d["num_hidden_layers"] == 12 and len(d["layer_types"]) == 12 and d["layer_types"][11] == "full_attention"
    assert (d["vocab_size"], d["canvas_length"]) == (1000, 32)
    with pytest.raises(ValueError):
        bench.text_config("huge")
    with pytest.raises(ValueError):
        bench.BenchConfig(config="huge")
    with pytest.raises(ValueError):
        bench.run_bench(config="tiny", device="cpu", steps=0)


@pytest.mark.slow
def test_script_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", "tiny", "--device", "cpu",
           "--prompt-len", "8", "--steps", "1", "--repeats", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True)
    r = json.loads(out.read_text())
    assert bench.finite_numbers(r) and positive(r["engine"]["step_ms"])


def test_bench_loaded_model(tmp_path, monkeypatch):
    """`-m tiny`: the built-in model as dg loads it, against the reference built from its config."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    r = bench.run_bench(model="tiny", device="cpu", prompt_len=8, steps=1, repeats=1, threads=1, reference=True)
    assert r["config"]["experts"] == "as loaded" and "tiny" in r["config"]["name"]
    check_phases(r["engine"], L=r["config"]["canvas_length"])
    assert r["reference"]["first_step_max_abs_logit_diff"] < 1e-3


def test_bench_quantized_output(tiny_dir, tmp_path):
    """`-m DIR` on a `dg quantize` output: loaded with its packed modules, timed, and the reference
    (which cannot take packed weights) run apart with its own."""
    pytest.importorskip("transformers")
    from quant.convert import quantize_checkpoint

    out = quantize_checkpoint(tiny_dir, tmp_path / "tiny-int4", budget_bytes=None, progress=False)
    r = bench.run_bench(model=str(out), device="cpu", prompt_len=8, steps=1, repeats=1, threads=1, reference=True)
    check_phases(r["engine"], L=r["config"]["canvas_length"])
    assert r["interleaved"] is False and "first_step_max_abs_logit_diff" not in r["reference"]
    check_phases(r["reference"], L=r["config"]["canvas_length"])
