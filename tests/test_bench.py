"""Smoke test of the benchmark (dgcli/bench.py, scripts/bench.py) on CPU with a tiny config: the
report has its fields and every number in it is positive and finite. Speed itself is not tested."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgcli.bench import finite_numbers, run_bench, text_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(config="tiny", device="cpu", prompt_len=8, steps=2, repeats=1, threads=1)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_phases(section: dict, L: int = 16) -> None:  # 16: the tiny canvas
    for k in ("prefill_ms", "step_ms", "commit_ms", "prefill_tokens_per_s"):
        assert positive(section[k]), k
    assert set(section["warmup_ms"]) == {"prefill", "step", "step_sc", "commit"}
    assert section["cuda_graphs"] is False and section["graph_capture_ms"] is None  # CPU: eager
    assert all(positive(v) for v in section["warmup_ms"].values())
    assert all(positive(v) for v in section["min_ms"].values())
    assert section["min_ms"]["step"] <= section["step_ms"] + 1e-9
    assert set(section["tokens_per_s"]) == {"8", "16", "32", "48"}
    tps = [section["tokens_per_s"][k] for k in ("8", "16", "32", "48")]
    assert all(positive(v) for v in tps) and tps == sorted(tps, reverse=True)  # more steps, fewer tokens/s
    assert tps[0] == pytest.approx(L / (8 * section["step_ms"] + section["commit_ms"]) * 1e3)
    assert section["peak_vram_mb"] is None  # CPU


def test_bench_engine_and_reference():
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    r = run_bench(**TINY, reference=True)
    assert torch.get_num_threads() == threads  # restored
    json.dumps(r)  # serialisable
    assert finite_numbers(r)
    assert r["config"]["name"] == "tiny" and r["config"]["dtype"] == "float32"
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch_threads"] == 1
    assert positive(r["weights_gb"]) and positive(r["peak_rss_mb"])
    check_phases(r["engine"])
    check_phases(r["reference"])
    # same random weights on both sides, and the model matches the reference
    assert r["interleaved"] is True and r["reference"]["first_step_max_abs_logit_diff"] < 1e-3  # same weights on both sides
    assert all(positive(v) for k, v in r["speedup_vs_reference"].items() if k != "min_ms")


def test_bench_int4_experts_and_moe_only():
    r = run_bench(**TINY, experts="int4")
    assert r["config"]["experts"] == "int4" and finite_numbers(r)
    check_phases(r["engine"])
    m = run_bench(**TINY, moe_only=True)["moe"]
    assert m["kernel"] == "reference" and m["tokens"] == 16
    for k in ("ms", "gb_per_s", "copy_gb_per_s", "bytes"):
        assert positive(m[k]), k
    assert m["device_peak_gb_per_s"] is None  # not known for a CPU
    assert 1 <= m["experts_touched"] <= 8


def test_presets():
    full = text_config("full")
    assert (full["hidden_size"], full["num_hidden_layers"], full["num_experts"], full["top_k_experts"],
            full["moe_intermediate_size"], full["vocab_size"]) == (2816, 30, 128, 8, 704, 262144)
    assert full["layer_types"].count("full_attention") == 5 and full["layer_types"][5] == "full_attention"
    d = text_config("reduced", layers=12, vocab=1000, canvas=32)
    assert d["num_hidden_layers"] == 12 and len(d["layer_types"]) == 12 and d["layer_types"][11] == "full_attention"
    with pytest.raises(ValueError):
        text_config("huge")
    with pytest.raises(ValueError):
        run_bench(config="tiny", device="cpu", steps=0)


def test_script_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", "tiny", "--device", "cpu",
           "--prompt-len", "8", "--steps", "1", "--repeats", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True)
    r = json.loads(out.read_text())
    assert finite_numbers(r) and positive(r["engine"]["step_ms"])


def test_bench_loaded_model(tmp_path, monkeypatch):
    """`-m tiny`: the built-in model as dg loads it, against the reference built from its config."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    r = run_bench(model="tiny", device="cpu", prompt_len=8, steps=1, repeats=1, threads=1, reference=True)
    assert r["config"]["experts"] == "as loaded" and "tiny" in r["config"]["name"]
    check_phases(r["engine"], L=r["config"]["canvas_length"])
    assert r["reference"]["first_step_max_abs_logit_diff"] < 1e-3
