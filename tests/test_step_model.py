"""scripts/step_model.py: the traced model of a denoising step (kernels, bytes, peak memory) on the
reduced config, fast; the full-size run is marked slow."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTEXTS = (1024, 4096)


def load_step_model():
    spec = importlib.util.spec_from_file_location("dg_step_model", ROOT / "scripts" / "step_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sm():
    return load_step_model()


@pytest.fixture(scope="module")
def reduced(sm):
    return sm.run("reduced", CONTEXTS)


def test_report_structure(sm, reduced):
    assert reduced["model"] is True and "not a measurement" in reduced["note"]
    assert reduced["formats"] == {"experts": "int4_sym_g64", "dense": "int8_row", "embedding": "int8_row"}
    assert list(reduced["contexts"]) == [str(c) for c in CONTEXTS]
    for r in reduced["contexts"].values():
        for key in ("kernels_per_step", "bytes_per_step", "floor_bytes", "peak_live_bytes_decode",
                    "peak_live_bytes_prefill", "chat_snapshot_bytes"):
            assert r[key] > 0, key
        assert set(r["by_part"]) == set(sm.PARTS)
        assert sum(p["kernels"] for p in r["by_part"].values()) == r["kernels_per_step"]
        assert sum(p["bytes"] for p in r["by_part"].values()) == r["bytes_per_step"]
        assert set(r["predicted_ms"]) == set(sm.GPUS) == {"RTX 4090", "RTX 5090", "H100 SXM"}
        ms = r["bytes_per_step"] / sm.GPUS["RTX 4090"] * 1e3 + r["kernels_per_step"] * reduced["per_kernel_us"] * 1e-3
        assert r["predicted_ms"]["RTX 4090"] == pytest.approx(ms, abs=0.01)
        assert r["floor_bytes"] < r["dram_bytes_per_step"] <= r["bytes_per_step"]
        assert r["host_syncs_per_step"] == 0  # a step that CUDA graphs can capture
        assert r["eager"]["kernels_per_step"] > 0


def test_substituted_kernels_count_once_per_call(reduced):
    """The CUDA path is what is traced: each Triton kernel and each attention is ONE kernel. The
    plain-PyTorch path would decode 128 experts one by one: hundreds of ops per layer."""
    layers = 6
    r = reduced["contexts"]["1024"]
    calls = r["calls_by_part"]
    assert calls["experts"]["gate_up_kernel"] == calls["experts"]["down_kernel"] == layers
    assert r["by_part"]["experts"]["kernels"] <= 40 * layers
    assert calls["attention"]["attention"] == layers
    # kernels.qkv_int8: a layer's q/k/v projections, their norms and RoPE in one kernel (5 sliding
    # layers' 3 int8_linear launches and the full layer's 2, and their 3 norms, before)
    assert calls["attention"]["qkv_int8_kernel"] == layers and "int8_linear_kernel" not in calls["attention"]
    # ... and writes the canvas K/V straight into their cache slots: no copies after it (two a layer
    # before), only the rings' position map's once a step
    assert calls["attention"]["index_copy_"] == 1
    # The decoder folds grouped query heads into the query length without a copy: q comes head-major
    # from the qkv kernel (the fold is a view), and o_proj reads the output heads in place.
    assert calls["attention"]["int8_linear_heads_kernel"] == layers
    assert "reshape" not in calls["attention"]
    # kernels.fused_mlp: the gate, up, gelu and product in one kernel, then down (int8_linear)
    assert calls["dense"] == {"geglu_int8_kernel": layers, "int8_linear_kernel": layers}
    assert calls["self_conditioning"]["geglu_int8_kernel"] == 1 and "gelu" not in calls["self_conditioning"]
    assert calls["head"]["lm_head_kernel"] == 1
    # kernels.fused_norms and fused_mix, as the Engine installs them on CUDA: a layer's glue on each
    # side of the MLPs (6 norms, the router's norm, the slot sum, the residual adds, the scalar, and
    # the norm that reads its output: the next layer's input norm or the final one) in one kernel each
    # way; the first layer's input norm on its own (the q/k/v norms are in the qkv kernel).
    assert calls["norms"] == {"rmsnorm_kernel": 1, "mix_in_kernel": layers, "mix_out_kernel": layers}
    assert "sum" not in calls["experts"] and "router_norm_kernel" not in calls["experts"]
    # The sampler's draw: one kernel makes torch's Exp(1) draws, reads the head's raw bf16 logits
    # once (proc made in registers) and writes the next step's bf16 input into the graph's buffer,
    # with its logsumexp: no exponential_, no proc, no bf16 copy, no graph input copy, no lse_rows.
    sampler, sc = calls["sampler"], calls["self_conditioning"]
    assert "lm_head_kernel" not in sampler and sampler["fused_draw_kernel"] == sampler["fused_combine_kernel"] == 1
    assert not {"exponential_", "to", "draw_chunks_kernel", "process_kernel"} & set(sampler)
    assert not {"copy_", "lse_rows_kernel"} & set(sc) and sc["int8_soft_kernel"] == 1
    logits = 256 * 32768 * 2  # [L, V] bf16 of the reduced config
    assert 2 * logits < r["by_part"]["sampler"]["bytes"] < 2 * logits + 2 * 2**20  # logits read, sc written
    embedding = 32768 * (512 + 2)  # int8 codes and an fp16 scale a row
    head = r["by_part"]["head"]["bytes"] - embedding  # the head writes the raw logits, not fp32 proc
    assert logits < head < logits + 4 * 2**20  # and h, the partials written and combined


def test_experts_count_only_the_real_pairs_rows_of_h(sm, reduced, monkeypatch):
    """The routed experts' h [cap, I] has a row per sorted slot, routing padding included, but gate_up
    writes and down reads only the P real (token, slot) pairs' rows (kernels/moe_int4.py): counted
    whole, the experts' bytes grow by exactly the padding rows, twice a layer, and nothing else does."""
    from kernels.moe_int4 import DEFAULT_CONFIG

    c = sm.CONFIGS["reduced"]
    E, bm, I = c["num_experts"], DEFAULT_CONFIG.block_m, c["moe_intermediate_size"]
    P = c["canvas_length"] * c["top_k_experts"]
    cap = -(-(P + min(E, P) * (bm - 1)) // bm) * bm
    padding = (cap - P) * I * 2  # bf16 rows
    assert padding > 0
    monkeypatch.setattr(sm, "ROWS_TOUCHED", {})
    whole = sm.run("reduced", [1024], eager=False)["contexts"]["1024"]
    now = reduced["contexts"]["1024"]
    assert whole["by_part"]["experts"]["bytes"] - now["by_part"]["experts"]["bytes"] == 2 * 6 * padding
    assert whole["bytes_per_step"] - now["bytes_per_step"] == 2 * 6 * padding
    assert whole["kernels_per_step"] == now["kernels_per_step"]
    assert whole["dram_bytes_per_step"] == now["dram_bytes_per_step"]  # h is under L2_RESIDENT here


def test_bytes_grow_with_context_in_attention_only(reduced):
    """Shapes decide the kernels, so a longer context adds no kernel; it adds bytes, all in
    attention (the full layer reads more of the cache), and the cache itself."""
    short, long = (reduced["contexts"][str(c)] for c in CONTEXTS)
    assert long["kernels_per_step"] == short["kernels_per_step"]
    assert long["bytes_per_step"] > short["bytes_per_step"]
    for part in reduced["contexts"]["1024"]["by_part"]:
        grew = long["by_part"][part]["bytes"] - short["by_part"][part]["bytes"]
        assert grew > 0 if part == "attention" else grew == 0, part
    assert long["floor_bytes"] - short["floor_bytes"] == long["kv_cache_bytes"] - short["kv_cache_bytes"] > 0
    assert long["eager"]["bytes_per_step"] > short["eager"]["bytes_per_step"]


def test_prefill_peak_grows_as_the_planner_counts(sm, reduced):
    """A longer prompt's prefill holds a larger cache, and its last chunk's full layer attends over
    more keys (K/V repeated over the heads, a mask and its bias), as quant.planner counts them.
    Dropping a substitution (e.g. attention decomposed into [chunk x context] score matrices per
    head) breaks this."""
    from dgcli.config import ModelConfig
    from quant.planner import estimate, model_shapes
    from quant.schemes import tensor_formats

    sm_config = ModelConfig.from_dict(sm.CONFIGS["reduced"])
    shapes = model_shapes(sm_config)
    formats = tensor_formats(shapes, reduced["formats"])
    short, long = (reduced["contexts"][str(c)] for c in CONTEXTS)
    e_short, e_long = (estimate(sm_config, formats, c, shapes=shapes) for c in CONTEXTS)
    grew = long["peak_live_bytes_prefill"] - short["peak_live_bytes_prefill"]
    expected = (e_long.section("kv cache") + e_long.section("prefill")
                - e_short.section("kv cache") - e_short.section("prefill"))
    assert grew > long["kv_cache_bytes"] - short["kv_cache_bytes"] > 0
    assert grew == pytest.approx(expected, rel=0.05)


@pytest.mark.slow
def test_last_chunk_shortcut_keeps_the_prefill_peak(sm):
    """The report traces only the prefill's last chunk; the peak is the same as with every chunk."""
    cut = sm.run("reduced", [4096], eager=False)["contexts"]["4096"]
    full = sm.run("reduced", [4096], eager=False, full_prefill=True)["contexts"]["4096"]
    assert cut["prefill"]["traced_from"] == 2048 and full["prefill"]["traced_from"] == 0
    assert cut["peak_live_bytes_prefill"] == full["peak_live_bytes_prefill"]
    assert cut["peak_live_bytes_decode"] == full["peak_live_bytes_decode"]


def test_flops_are_the_matmuls_of_the_config(sm, reduced):
    """Tensor-core FLOPs per part, from the reduced config's shapes: each rule of kernel_flops (the
    int8 matmuls, the soft embedding, the int4 experts with their expected padding, the router's
    aten linear, attention's QK and PV) against the arithmetic. A rule that stops matching its
    kernel's arguments (0 FLOPs, or the wrong tensor taken as the weight) fails here."""
    c = sm.CONFIGS["reduced"]
    L, V, H, I, layers = c["canvas_length"], c["vocab_size"], c["hidden_size"], c["intermediate_size"], 6
    E, A, Im, D, Dg = c["num_experts"], c["top_k_experts"], c["moe_intermediate_size"], c["head_dim"], c["global_head_dim"]
    Hq, Hkv, Hkv_full = c["num_attention_heads"], c["num_key_value_heads"], c["num_global_key_value_heads"]
    sliding, full = 5, 1
    P, block = L * A, 16  # the experts' (token, slot) pairs; moe_int4's default BLOCK_M
    rows = P + E * (block - 1) / 2
    for ctx in CONTEXTS:
        r = reduced["contexts"][str(ctx)]
        part = {p: v["flops"] for p, v in r["by_part"].items()}
        assert part["head"] == 2 * L * V * H
        assert part["self_conditioning"] == 2 * L * V * H + 3 * 2 * L * H * I  # soft embedding, its MLP
        assert part["dense"] == layers * 3 * 2 * L * H * I
        assert part["experts"] == layers * (2 * L * E * H + int(2 * rows * 2 * Im * H) + int(2 * rows * H * Im))
        projections = 2 * L * H * (sliding * (2 * Hq * D + 2 * Hkv * D) + full * (2 * Hq * Dg + Hkv_full * Dg))
        ring = c["sliding_window"] - 1 + L
        sdpa_sliding = sliding * 2 * (Hq * L) * ring * 2 * D
        span, rest = divmod(part["attention"] - projections - sdpa_sliding, full * 2 * (Hq * L) * 2 * Dg)
        assert rest == 0 and ctx + L <= span < ctx + L + 1024  # the full layer's keys: the span read
        assert part["norms"] == part["sampler"] == part["other"] == 0
        assert r["flops_per_step"] == sum(part.values())


def test_roofline_is_at_least_each_bound(sm, reduced):
    """The roofline takes each kernel's slower bound: never below the DRAM bytes at the bandwidth,
    nor below the FLOPs at the tensor peak, both plus the per-kernel cost; and its floor (weights
    and cache read once, the same FLOPs) lies between the two floors and the roofline."""
    for r in reduced["contexts"].values():
        cost = r["kernels_per_step"] * reduced["per_kernel_us"] * 1e-3
        for gpu in sm.GPUS:
            roof = r["predicted_ms_roofline"][gpu]
            assert roof >= r["predicted_ms_small_in_l2"][gpu] - 0.01
            assert roof >= r["compute_floor_ms"][gpu] + cost - 0.01
            assert 0 < r["compute_bound_ms"][gpu] <= roof
            # the floor's roofline: the same FLOPs, only weights and cache moved (once), no kernel cost
            floor = r["roofline_floor_ms"][gpu]
            assert max(r["compute_floor_ms"][gpu], 0.98 * r["floor_ms"][gpu]) <= floor + 0.01 <= roof - cost + 0.02
            assert r["compute_floor_ms"][gpu] == pytest.approx(r["flops_per_step"] / sm.TENSOR_FLOPS[gpu] * 1e3,
                                                               abs=0.01)


@pytest.mark.slow
def test_command_line_prints_json(sm, capsys):
    import json

    assert sm.main(["--config", "reduced", "--contexts", "1024", "--no-eager", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "eager" not in report["contexts"]["1024"] and report["config"] == "reduced"


@pytest.mark.slow
def test_full_size_step(sm):
    """The released config at 8k and 32k: the int4 experts are the largest item, one layer's
    packed experts (404.4 MB of codes and scales) read once per layer."""
    report = sm.run("full", (8192, 32768), eager=False)
    for r in report["contexts"].values():
        experts = r["calls_by_part"]["experts"]
        assert experts["gate_up_kernel"] == experts["down_kernel"] == 30
        assert max(r["by_part"], key=lambda p: r["by_part"][p]["dram_bytes"]) == "experts"
        assert r["by_part"]["experts"]["dram_bytes"] > 30 * 404.4e6
        assert 14.5e9 < r["floor_bytes"] < r["bytes_per_step"]
        # With a 256-token canvas the int8 matmuls are compute-bound on the GeForce cards: there the
        # FLOPs at the tensor peak take longer than the floor's bytes at the bandwidth.
        assert r["compute_floor_ms"]["RTX 4090"] > r["floor_ms"]["RTX 4090"]
        assert r["compute_floor_ms"]["H100 SXM"] < r["floor_ms"]["H100 SXM"]
