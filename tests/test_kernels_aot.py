"""`python -m kernels.aot`: every Triton kernel compiled for sm_89, sm_90 and sm_120 without a GPU
(Triton emits real PTX and cubin for a named target; its wheel bundles ptxas and cuobjdump).

The quick tests compile what must hold on every card dg targets: each kernel's default config (the
one used without autotuning) and the tiles declared too large for a 99 KB part. Compiling every
autotune candidate takes minutes on 2 cores: `DG_AOT_ALL=1` runs that sweep too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from kernels import aot  # noqa: E402
from kernels._tuning import SMALL_SMEM, SMEM_LIMIT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("sm_89", "sm_90", "sm_120")
KNOWN = ("int8_linear", "int8_linear.heads", "geglu_int8", "qkv_int8.d256", "qkv_int8.d512", "lm_head",
         "lm_head.int8", "moe_int4.gate_up", "moe_int4.down", "int8_soft")  # at least these


def run_aot(*args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    out = subprocess.run([sys.executable, "-m", "kernels.aot", "--jobs", "2", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def quick():
    """Default and large configs of every kernel on every target, compiled once for this module."""
    return run_aot("--configs", "default,large")


def test_limits_are_the_targets_opt_in_maxima():
    # cudaDevAttrMaxSharedMemoryPerBlockOptin: 99 KB on Ada (sm_89) and consumer Blackwell (sm_120), 227 KB on H100
    assert SMEM_LIMIT == {89: 101376, 90: 232448, 120: 101376} and SMALL_SMEM == 101376
    assert set(aot.TARGETS) == set(TARGETS)


def names() -> set:
    return {s.kernel for s in aot.specs()}


def test_every_kernel_declares_one_default():
    assert set(KNOWN) <= names()
    for name in names():
        assert sum(s.default for s in aot.specs() if s.kernel == name) == 1, name


@pytest.mark.slow
def test_defaults_compile_everywhere_within_limits_without_spills(quick):
    defaults = [r for r in quick if r["default"]]
    assert sorted((r["kernel"], r["target"]) for r in defaults) == sorted((k, t) for k in names() for t in TARGETS)
    for r in defaults:
        where = f"{r['kernel']} {r['config']} on {r['target']}"
        assert r["ok"], f"{where}: {r.get('error')}"
        assert r["shared_bytes"] <= r["shared_limit"], where
        assert r["spills"] == 0, f"{where}: {r['spills']} bytes of spills"
        assert r["candidate"], where
        assert 0 < r["registers"] <= 255 and r["sass"], where
    for r in defaults:  # the matmul kernels: their main loop is found, and it runs on tensor cores
        if r["kernel"] in KNOWN:
            assert r["sass_scope"] == "loop" and (r["sass"].get("HMMA") or r["sass"].get("HGMMA")), r


@pytest.mark.slow
def test_moe_main_loops_have_no_int_to_float(quick):
    """The int4 dequantisation is a mantissa trick (OR + one subtract), not I2F per weight."""
    rows = [r for r in quick if r["kernel"].startswith("moe_int4") and r["default"]]
    assert len(rows) == 2 * len(TARGETS)
    for r in rows:
        conversions = {op: n for op, n in r["sass"].items() if op.startswith("I2F")}
        assert not conversions, f"{r['kernel']} on {r['target']}: {conversions}"
        assert r["sass"].get("HFMA2", 0) + r["sass"].get("HADD2", 0) > 0  # the packed subtract is there


@pytest.mark.slow
def test_large_tiles_cannot_fit_99kb_parts_and_are_not_offered_there(quick):
    large = [r for r in quick if not r["default"]]
    head = {tuple(r["config"].values())[:3] for r in large if r["kernel"] == "lm_head"}
    assert head == {(64, 256, 64), (128, 128, 128)}  # the bf16 head's tiles of 120 and 128 KB
    for r in large:
        assert r["ok"]
        small = r["shared_limit"] == SMALL_SMEM
        assert (r["shared_bytes"] > r["shared_limit"]) == small, r  # 120-128 KB: over 99 KB, under 227 KB
        assert r["candidate"] == (not small), r


@pytest.mark.skipif(not os.environ.get("DG_AOT_ALL"), reason="every autotune candidate: minutes; DG_AOT_ALL=1")
def test_every_candidate_compiles_within_its_targets_limit():
    for r in run_aot():
        where = f"{r['kernel']} {r['config']} on {r['target']}"
        if r["candidate"]:
            assert r["ok"], f"{where}: {r.get('error')}"
            assert r["shared_bytes"] <= r["shared_limit"], where
        elif r["ok"]:
            assert r["shared_bytes"] > SMALL_SMEM, f"{where}: fits, but is not offered"


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                                /* 0x00000a0000017a02 */
        /*0010*/                   I2F.BF16 R2, R3 ;                                     /* 0x0000000000000000 */
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                 /* 0x0000000000000000 */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                 /* 0x0000000000000000 */
        /*0040*/              @P0 BRA 0x20 ;                                             /* 0x0000000000000000 */
        /*0050*/                   IADD3 R1, R1, 0x1, RZ ;                               /* 0x0000000000000000 */
        /*0060*/              @!P1 BRA 0x10 ;                                            /* 0x0000000000000000 */
        /*0070*/                   EXIT ;                                                /* 0x0000000000000000 */
        /*0080*/                   BRA 0x80;                                             /* 0x0000000000000000 */
"""


def test_main_loop_is_the_innermost_backward_branch():
    assert aot.main_loop_opcodes(SASS) == ("loop", {"HMMA": 2, "BRA": 1})
    flat = SASS.replace("BRA 0x20", "BRA 0x70").replace("BRA 0x10", "BRA 0x70")  # only forward/self branches
    scope, ops = aot.main_loop_opcodes(flat)
    assert scope == "kernel" and ops["HMMA"] == 2 and ops["I2F"] == 1
