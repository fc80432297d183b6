"""The VRAM planner on the released 26B-A4B config (built on meta): the weight arithmetic of docs/quantization.md,
and the rest against what scripts/step_model.py traces the engine allocating."""

import importlib.util
import sys
from pathlib import Path

import pytest

from dgcli.config import FULL, SLIDING, ModelConfig
from dgcli.known import DIFFUSIONGEMMA_26B_A4B
from quant.planner import CUDA_CONTEXT_BYTES, MOE_BLOCK_M, PREFILL_CHUNK, BudgetError, estimate, model_shapes, plan
from quant.schemes import tensor_formats, tensor_group

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def real():
    return ModelConfig.from_dict(DIFFUSIONGEMMA_26B_A4B)  # the released config, its one copy


def test_default_scheme_fits_18gb_at_32k_itemised(real):
    groups, e = plan(real, "int4", context=32768, budget_bytes=18_000_000_000, vision=False)  # text (--no-vision)
    assert groups == {"experts": "int4_sym_g64", "dense": "int8_row", "embedding": "int8_row"}  # S3
    assert e.fits and e.total < 18e9
    assert e.weights == pytest.approx(14.56e9, abs=0.01e9)  # the default scheme's weights (docs/quantization.md)
    assert any("less than 5%" in n for n in e.notes)  # 17.7 GB: fits, without the 5% headroom
    rows = {r.label: r.nbytes for r in e.rows}
    L, V = 256, 262144
    assert rows["sliding: 25 layers x ring of 1,279"] == 25 * 8 * 1024 * 1279  # W-1+L slots, as StaticKVCache
    assert rows["full: 5 layers x 33,024 positions"] == 5 * 4 * 1024 * 33024
    # A step: graph buffers (the head's raw logits bf16, sc bf16) and the sampler's first step (the
    # Exp(1) draws fp32, proc made fp32 from the logits and copied to bf16; kernels.sample needs no
    # probabilities): 14 bytes per [L x V] element; the graph pool holds a layer's temporaries (the
    # int8 soft embedding reads the logits in place: no softmax copy).
    assert 14 * L * V < e.section("decode step") < 14 * L * V + 100e6
    assert e.section("chat") == rows["sliding: 25 layers x ring of 1,279"] + 1279 * 8  # one shared position map
    # The prefill's last chunk grows with the context (a full layer's K/V repeated 8x over it): at
    # 32k just over a step (whose sampler no longer holds probabilities). Only the larger counts.
    assert e.peak_section == "prefill" and e.section("decode step") < e.section("prefill")
    assert e.total == (e.weights + e.section("kv cache") + e.section("prefill") + e.section("chat")
                       + CUDA_CONTEXT_BYTES)
    table = e.table()
    assert "(the larger peak: counted)" in table and "(the smaller peak: not counted)" in table
    _, e64 = plan(real, "int4", context=65536, budget_bytes=None, vision=False)
    assert e64.peak_section == "prefill" and e64.section("prefill") > 2 * e.section("prefill") - 1e8


def test_vision_tower_is_counted_and_carried_in_int8_when_it_does_not_fit(real):
    """At 18 GB and 32k the text model fits (above); the tower goes in int8 and the note says the
    total with it is over the budget (text use: --no-vision)."""
    groups, e = plan(real, "int4", context=32768, budget_bytes=18_000_000_000)
    assert groups == {"experts": "int4_sym_g64", "dense": "int8_row", "embedding": "int8_row", "vision": "int8_row"}
    assert not e.fits and e.total - e.vision < 18e9
    assert any("--no-vision" in n for n in e.notes)
    assert "vision tower (all its tensors) [bf16/int8_row]" in e.table()


def test_weight_groups_match_parameter_counts(real):
    e = estimate(real, {}, shapes=model_shapes(real, vision=False))  # the text model, everything 16-bit
    assert e.weights == pytest.approx(50.50e9, abs=0.01e9)
    assert estimate(real, {}).weights - e.weights == 2 * 572_794_416  # + the vision tower, bf16
    by = {r.label.split(" [")[0]: r.nbytes for r in e.rows if r.section == "weights"}
    assert by["routed experts"] == 2 * 30 * 128 * 3 * 704 * 2816
    assert by["embedding (lookup, LM head, soft)"] == 2 * 262144 * 2816
    shapes = model_shapes(real)
    assert len([k for k in shapes if tensor_group(k) == "experts"]) == 60
    assert sum(1 for k in shapes if tensor_group(k) == "attention") == 25 * 4 + 5 * 3  # no v_proj on full layers


def test_budget_refuses_or_upgrades(real):
    with pytest.raises(BudgetError) as exc:
        plan(real, "int4", context=131072)  # > 18 GB
    assert "over the 18.00 GB budget" in str(exc.value) and "\n" not in str(exc.value)
    assert "full: 5 layers x 131,328 positions" in exc.value.hint and "over by" in exc.value.hint
    groups, e = plan(real, "int4", context=32768, budget_bytes=24_000_000_000)  # S1, as on a 5090
    assert groups == {"experts": "int4_sym_g64", "dense": "bf16", "embedding": "bf16", "vision": "bf16"}
    assert e.weights - e.vision == pytest.approx(16.96e9, abs=0.01e9) and e.vision == 2 * 572_794_416
    groups, e = plan(real, "nf4", context=32768)
    assert groups["dense"] == "nf4_g64" and e.weights < 14.56e9
    groups, e = plan(real, "int4", budget_bytes=None)  # no budget: the smallest formats
    assert groups["dense"] == "int8_row"


def test_real_shapes_take_group_64_everywhere(real):
    shapes = model_shapes(real)
    f = tensor_formats(shapes, {"experts": "int4_sym_g64", "dense": "nf4_g64", "embedding": "int8_row"})
    assert {f[k] for k in shapes if tensor_group(k) == "experts"} == {"int4_sym_g64"}  # 704 = 11 x 64
    assert {f[k] for k in shapes if tensor_group(k) in ("attention", "mlp", "self_cond")} == {"nf4_g64"}
    assert {f[k] for k in shapes if tensor_group(k) == "other"} == {"keep"}
    assert f["model.decoder.layers.0.router.proj.weight"] == "keep"


def test_constants_are_the_codes():
    """The planner keeps its own copies (it must not import the engine, nor Triton for `dg show`)."""
    from dgcli.engine import PREFILL_CHUNK as ENGINE_CHUNK
    from kernels.moe_int4 import DEFAULT_CONFIG

    assert PREFILL_CHUNK == ENGINE_CHUNK
    assert MOE_BLOCK_M == DEFAULT_CONFIG.block_m


@pytest.fixture(scope="module")
def traced_32k(real):
    """scripts/step_model.py at 32k on the full config: what the engine allocates, traced on meta."""
    spec = importlib.util.spec_from_file_location("dg_step_model", ROOT / "scripts" / "step_model.py")
    sm = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sm
    spec.loader.exec_module(sm)
    return sm.run("full", [32768], eager=False)["contexts"]["32768"]


def test_planner_matches_the_traced_step_and_prefill(real, traced_32k):
    """The planner's total at 32k against the traced peaks (a step and the prefill of a 32k
    prompt) + chat's ring snapshot + the CUDA context it assumes (0.5 GiB, not traced): within 5%.
    Each peak's own items are held closer, so a missing buffer shows even when the total passes."""
    t = traced_32k
    _, e = plan(real, "int4", context=32768, budget_bytes=None, vision=False)  # step_model traces the text model
    traced = max(t["peak_live_bytes_decode"], t["peak_live_bytes_prefill"]) + t["chat_snapshot_bytes"]
    assert e.total == pytest.approx(traced + CUDA_CONTEXT_BYTES, rel=0.05)
    base = t["weights_bytes"] + t["kv_cache_bytes"]
    assert e.weights == t["weights_bytes"]
    assert e.section("kv cache") == pytest.approx(t["kv_cache_bytes"], rel=0.01)
    # The planner holds the sampler's first step of a shape too: its check against torch's
    # exponential_ (kernels.sample) draws q fp32, makes proc fp32 from the raw logits and copies it
    # to bf16 once; the traced step is the steady state after it, which holds none of them.
    check = real.canvas_length * real.vocab_size * 10
    assert e.section("decode step") == pytest.approx(t["peak_live_bytes_decode"] - base + check, rel=0.05)
    assert e.section("prefill") == pytest.approx(t["peak_live_bytes_prefill"] - base, rel=0.05)
    assert e.section("chat") == t["chat_snapshot_bytes"]
