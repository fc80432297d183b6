"""kernels/moe_int4: the packed format, the reference against a slow obvious oracle and against the
model's own `Experts`, and the Triton kernels against the reference.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set for this module only
by the `interpret` fixture), which is slow: shapes are tiny (H, I multiples of 64; E=4). GPU cases
run the real shapes and are skipped with a reason when there is no CUDA device.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from dgcli.errors import ConfigError

pytest.importorskip("triton", reason="triton is not installed (the references are tested without it elsewhere)")

M = importlib.import_module("kernels.moe_int4")  # the module: kernels.moe_int4 is also the function
from kernels.moe_int4 import (  # noqa: E402
    MoeConfig, moe_align, moe_align_ref, moe_align_triton, moe_int4, moe_int4_ref, moe_int4_triton, pack_int4_oracle,
    unpack_int4_oracle,
)

CUDA = torch.cuda.is_available()
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# |triton - reference| bounds. fp32: only the summation order differs. fp16/bf16: x is already in that
# dtype, the kernel rounds h = gelu(g)·u and each weighted slot output y once to it (the model does the
# same), the reference stays in fp32.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in the interpreter for this test only (the launcher wraps them on demand)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DG_KERNELS", raising=False)


def make_case(T, H, I, E, A, seed=0, group_size=64, skew=False):
    """Random packed experts and a router-like routing: A distinct experts per token, weights summing to 1."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    q1, s1 = pack_int4_oracle(w1, group_size)
    q2, s2 = pack_int4_oracle(w2, group_size)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    if skew:  # every token picks the same A experts: long runs spanning several row blocks
        logits[:, :A] += 100.0
    weights, index = torch.topk(logits.softmax(-1), A)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, index, weights, q1, s1, q2, s2


def oracle(x, index, weights, q1, s1, q2, s2, group_size=64):
    """The slow obvious version: dequantise everything, gather each pair's expert, einsum."""
    w1 = unpack_int4_oracle(q1, s1, group_size)[index]  # (T, A, 2I, H)
    w2 = unpack_int4_oracle(q2, s2, group_size)[index]  # (T, A, H, I)
    gate, up = torch.einsum("th,tanh->tan", x.float(), w1).chunk(2, dim=-1)
    y = torch.einsum("tai,tahi->tah", F.gelu(gate, approximate="tanh") * up, w2)
    return (y * weights[..., None]).sum(1)


# ---------------------------------------------------------------------------------------------------
# Format


def test_unpack_nibble_order_and_offset():
    # Byte 0x3A: low nibble 0xA -> k=0 -> 10-8 = 2; high nibble 0x3 -> k=1 -> 3-8 = -5.
    q = torch.tensor([[0x3A, 0xF0] + [0x88] * 30], dtype=torch.uint8)  # one row, K=64
    s = torch.tensor([[0.5]], dtype=torch.float16)
    w = unpack_int4_oracle(q, s)
    assert w.shape == (1, 64)
    assert w[0, :4].tolist() == [1.0, -2.5, -4.0, 3.5]
    assert (w[0, 4:] == 0).all()


def test_pack_layout_and_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, 192, generator=g)
    w[0, 0, :64] = 0  # an all-zero group gets scale 0 and decodes to exact zeros
    q, s = pack_int4_oracle(w)
    assert q.dtype == torch.uint8 and q.shape == (3, 5, 96)
    assert s.dtype == torch.float16 and s.shape == (3, 5, 3)
    deq = unpack_int4_oracle(q, s)
    err = (deq - w).abs().reshape(3, 5, 3, 64)
    assert (err <= s.float()[..., None] / 2 + 1e-6).all()  # round to nearest
    assert (deq[0, 0, :64] == 0).all() and s[0, 0, 0] == 0
    q2, s2 = pack_int4_oracle(deq)  # packing the decoded weights is lossless
    assert torch.equal(q2, q) and torch.equal(s2, s)
    # low nibble holds the even element: recompute codes by hand for one byte
    codes = torch.round(w[1, 2, :2] / s[1, 2, 0].float()).clamp(-8, 7) + 8
    assert q[1, 2, 0].item() == int(codes[0]) | (int(codes[1]) << 4)


def test_pack_rejects_bad_group():
    with pytest.raises(ValueError):
        pack_int4_oracle(torch.zeros(2, 96), 64)


# ---------------------------------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("T,H,I,E,A,group_size", [(1, 128, 64, 4, 2, 64), (7, 128, 192, 4, 2, 64),
                                                    (33, 64, 128, 8, 3, 32), (9, 128, 64, 4, 4, 64)])
def test_reference_matches_oracle(T, H, I, E, A, group_size):
    case = make_case(T, H, I, E, A, seed=T, group_size=group_size)
    got = moe_int4_ref(*case, group_size=group_size)
    torch.testing.assert_close(got, oracle(*case, group_size=group_size), atol=1e-5, rtol=1e-5)


def test_reference_matches_model_experts():
    """Same semantics as dgcli.model.Experts given the dequantised weights."""
    from dgcli.config import ModelConfig
    from dgcli.model import Experts

    T, H, I, E, A = 11, 128, 64, 4, 2
    config = ModelConfig.from_dict(dict(vocab_size=32, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=E,
                                        top_k_experts=A, moe_intermediate_size=I))
    x, index, weights, q1, s1, q2, s2 = make_case(T, H, I, E, A, seed=3)
    experts = Experts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(unpack_int4_oracle(q1, s1))
        experts.down_proj.copy_(unpack_int4_oracle(q2, s2))
        want = experts(x, index, weights)
    torch.testing.assert_close(moe_int4_ref(x, index, weights, q1, s1, q2, s2), want, atol=1e-5, rtol=1e-5)


def test_reference_validates_shapes():
    x, index, weights, q1, s1, q2, s2 = make_case(3, 128, 64, 4, 2)
    with pytest.raises(ValueError):
        moe_int4_ref(x[:, :64], index, weights, q1, s1, q2, s2)
    with pytest.raises(ValueError):
        moe_int4_ref(x, index, weights[:, :1], q1, s1, q2, s2)
    with pytest.raises(ValueError):
        moe_int4_ref(x, index, weights, q1, s1, q2, s2[:, :, :0])


# ---------------------------------------------------------------------------------------------------
# Routing layout


ALIGN_CASES = [(1, 4, 2, 16), (33, 4, 2, 16), (33, 8, 3, 32), (5, 128, 8, 16)]


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("T,E,A,block_m", ALIGN_CASES)
def test_moe_align(T, E, A, block_m, impl, monkeypatch):
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(T)
    index = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    sorted_ids, block_expert = (moe_align_ref if impl == "ref" else moe_align_triton)(index, E, block_m)
    P = T * A
    assert sorted_ids.numel() % block_m == 0 and block_expert.numel() == sorted_ids.numel() // block_m
    real = sorted_ids[sorted_ids < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    assert (sorted_ids[sorted_ids >= P] == P).all()
    flat = index.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        ids = sorted_ids[b * block_m:(b + 1) * block_m]
        assert torch.equal(ids < P, torch.arange(block_m) < (ids < P).sum())  # real pairs first: a prefix
        ids = ids[ids < P]
        if e < 0:
            assert ids.numel() == 0  # blocks past the end are idle
        else:
            assert ids.numel() > 0 and (flat[ids.long()] == e).all()
    used = block_expert[block_expert >= 0]
    assert torch.equal(used, used.sort().values)  # experts in order, one run each


def routings(T, E, A, seed):
    """Routings the kernel must lay out as the reference does: random (most experts present),
    skewed (a few experts take every token: long runs over many blocks, most experts empty)."""
    g = torch.Generator().manual_seed(seed)
    yield torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    hot = torch.randperm(E, generator=g)[:A + 2]
    yield torch.stack([hot[torch.randperm(A + 2, generator=g)[:A]] for _ in range(T)])


@pytest.mark.parametrize("T,E,A,block_m", [(1, 4, 2, 16), (3, 5, 2, 16), (33, 8, 3, 32), (40, 128, 8, 16),
                                           (37, 128, 8, 64), (300, 16, 4, 16)],
                         ids=["1", "E5", "33", "P320", "P296-bm64", "P1200"])
def test_moe_align_triton_is_the_reference(T, E, A, block_m, monkeypatch):
    """Bit for bit, under the interpreter: P below and above the kernel's 128 lanes and not a multiple
    of them or of block_m, experts without pairs, E not a power of two."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for skewed, index in enumerate(routings(T, E, A, seed=T)):
        if skewed and E > A + 2:
            assert (torch.bincount(index.reshape(-1), minlength=E) == 0).any()
        got, want = moe_align_triton(index, E, block_m), moe_align_ref(index, E, block_m)
        assert got[0].dtype == got[1].dtype == torch.int32
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_moe_align_dispatch(monkeypatch):
    """CUDA tensors (DG_KERNELS=triton here) take the kernel, one launch; past its 16-bit counters,
    the reference."""
    launches = []
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(M, "launch", lambda *a, **k: launches.append(a[0]))
    index = torch.zeros(4, 2, dtype=torch.long)
    moe_align(index, 4, 16)
    assert launches == [M._align_kernel]
    monkeypatch.setattr(M, "MAX_ALIGN_SLOTS", 32)  # cap 16 + 2·15 -> 48: over
    got = moe_align(index, 4, 16)
    assert len(launches) == 1 and all(torch.equal(a, b) for a, b in zip(got, moe_align_ref(index, 4, 16)))


def test_moe_int4_with_the_align_kernel(monkeypatch):
    """The experts' Triton path with the layout from the kernel (DG_KERNELS=triton) gives the same
    output as with the reference's layout, bit for bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case(7, 128, 64, 4, 2, seed=5)
    want = moe_int4_triton(*case, config=MoeConfig())  # CPU tensors: moe_align takes the reference
    calls = []
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(M, "moe_align_triton", lambda *a: calls.append(1) or moe_align_triton(*a))
    assert torch.equal(moe_int4_triton(*case, config=MoeConfig()), want) and calls


# ---------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU)

SHAPES = [(1, 128, 64, 4, 2), (7, 128, 192, 4, 2), (33, 128, 64, 4, 2)]
CONFIGS = {
    "default": MoeConfig(),
    # BLOCK_M 32, and BLOCK_N 128 over I=64/192 and H=128: masked column tails on both kernels
    "bm32-bn128": MoeConfig(block_m=32, gu_block_n=128, dn_block_n=128),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("T,H,I,E,A", SHAPES)
def test_triton_matches_reference(interpret, T, H, I, E, A, cfg, dtype):
    x, *rest = make_case(T, H, I, E, A, seed=T)
    x = x.to(dtype)
    got = moe_int4_triton(x, *rest, config=CONFIGS[cfg])
    assert got.dtype == dtype and got.shape == (T, H)
    want = moe_int4_ref(x, *rest)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nibble_dequantisation_is_exact(interpret, dtype):
    """The kernels' mantissa trick gives nibble - 8 exactly for all 256 byte values, both nibbles."""
    import triton
    import triton.language as tl

    from kernels._dispatch import launchable

    @triton.jit
    def unpack(b_ptr, lo_ptr, hi_ptr):
        offs = tl.arange(0, 256)
        b = tl.load(b_ptr + offs)
        tl.store(lo_ptr + offs, M._nibbles(b, False, lo_ptr.dtype.element_ty))
        tl.store(hi_ptr + offs, M._nibbles(b, True, hi_ptr.dtype.element_ty))

    b = torch.arange(256, dtype=torch.uint8)
    lo, hi = torch.empty(256, dtype=dtype), torch.empty(256, dtype=dtype)
    launchable(unpack, b.device)[(1,)](b, lo, hi)
    assert torch.equal(lo, ((b & 0xF).float() - 8).to(dtype))
    assert torch.equal(hi, ((b >> 4).float() - 8).to(dtype))


def test_triton_skewed_routing_and_group_32(interpret):
    """All tokens on the same experts (runs of 33 rows over 3 blocks of 16), other experts empty."""
    x, *rest = make_case(33, 64, 128, 8, 2, seed=5, group_size=32, skew=True)
    got = moe_int4_triton(x, *rest, group_size=32, config=MoeConfig())
    torch.testing.assert_close(got, moe_int4_ref(x, *rest, group_size=32), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bm,bn", [(16, 64), (32, 128)])  # 32 x 128: masked column tails (I 192, H 128)
def test_padding_rows_of_h_are_never_written_nor_read(interpret, monkeypatch, bm, bn, dtype):
    """h [cap, I] has a row per sorted slot, routing padding included (here 7 tokens x 2 slots on 4
    experts: 14 real rows of 64 or 128). gate_up writes only the real pairs' rows, down reads only those:
    padding rows filled with NaN stay NaN, every load of down's is outside them, and y is bit for bit
    what it is with zeros there (the old layout), and the reference within tolerance."""
    import numpy as np
    from triton.runtime import interpreter

    T, H, I, E, A = 7, 128, 192, 4, 2
    x, index, weights, q1, s1, q2, s2 = make_case(T, H, I, E, A, seed=3)
    x, P = x.to(dtype), T * A
    sorted_ids, block_expert = moe_align(index, E, bm)
    pad = sorted_ids >= P
    assert pad.sum() > 2 * P  # mostly padding at this size: the test bites
    h = torch.full((sorted_ids.numel(), I), float("nan"), dtype=dtype)
    M._launch_gate_up(x, index, q1, s1, sorted_ids, block_expert, h, 64, bn, 4, 3, bm)
    assert h[pad].isnan().all() and not h[~pad].isnan().any()

    loads = []  # every address down loads (mask on), from the interpreter
    real_load = interpreter.interpreter_builder.create_masked_load

    def recording_load(ptrs, mask, *args):
        loads.append(np.broadcast_to(ptrs.data, mask.data.shape)[mask.data].copy())
        return real_load(ptrs, mask, *args)

    def down(h):
        y = torch.empty(P, H, dtype=dtype)
        M._launch_down(h, weights.float(), q2, s2, sorted_ids, block_expert, y, 64, bn, 4, 3, bm)
        return y

    with monkeypatch.context() as m:
        m.setattr(interpreter.interpreter_builder, "create_masked_load", recording_load)
        y = down(h)
    addr = np.concatenate(loads).astype(np.int64) - h.data_ptr()
    rows = addr[(addr >= 0) & (addr < h.numel() * h.element_size())] // (I * h.element_size())
    assert rows.size and not pad[torch.from_numpy(np.unique(rows))].any()
    assert torch.equal(y, down(h.masked_fill(pad[:, None], 0.0)))
    got = y.view(T, A, H).sum(1, dtype=torch.float32).to(dtype)
    torch.testing.assert_close(got.float(), moe_int4_ref(x, index, weights, q1, s1, q2, s2).float(), **TOL[dtype])


def test_triton_no_tokens(interpret):
    x, index, weights, *w = make_case(4, 128, 64, 4, 2)
    got = moe_int4_triton(x[:0], index[:0], weights[:0], *w)
    assert got.shape == (0, 128)


# ---------------------------------------------------------------------------------------------------
# Dispatcher


def test_dispatch_env(monkeypatch):
    case = make_case(3, 128, 64, 4, 2)
    calls = []
    monkeypatch.setattr(M, "moe_int4_triton", lambda *a, **k: calls.append("triton") or moe_int4_ref(*a))
    monkeypatch.setattr(M, "moe_int4_ref", lambda *a, **k: calls.append("ref") or torch.zeros(3, 128))
    monkeypatch.delenv("DG_KERNELS", raising=False)
    moe_int4(*case)  # CPU tensors, auto: the reference
    monkeypatch.setenv("DG_KERNELS", "triton")
    moe_int4(*case)
    monkeypatch.setenv("DG_KERNELS", "ref")
    moe_int4(*case)
    assert calls == ["ref", "triton", "ref"]
    monkeypatch.setenv("DG_KERNELS", "fast")
    with pytest.raises(ConfigError, match="DG_KERNELS"):
        moe_int4(*case)


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("on", True), ("0", False), ("false", False),
                                      ("no", False), ("OFF", False)])
def test_autotune_switch(monkeypatch, value, on):
    """DG_AUTOTUNE follows dgcli.settings' on/off words (DG_AUTOTUNE=false used to leave it on)."""
    from kernels._tuning import autotune_enabled

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DG_AUTOTUNE", value)
    assert autotune_enabled(torch.device("cuda")) is on
    assert not autotune_enabled(torch.device("cpu"))
    monkeypatch.setenv("DG_AUTOTUNE", "maybe")
    with pytest.raises(ConfigError, match="DG_AUTOTUNE"):
        autotune_enabled(torch.device("cuda"))


def test_dispatch_forced_triton_on_cpu(interpret, monkeypatch):
    monkeypatch.setenv("DG_KERNELS", "triton")
    x, *rest = make_case(7, 128, 64, 4, 2, seed=2)
    torch.testing.assert_close(moe_int4(x, *rest), moe_int4_ref(x, *rest), **TOL[torch.float32])


def test_cpu_triton_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if INTERPRETED_AT_IMPORT:
        pytest.skip("kernels were imported in interpreter mode")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        moe_int4_triton(*make_case(2, 128, 64, 4, 2))


# ---------------------------------------------------------------------------------------------------
# GPU: the real shapes, compiled kernels


gpu = pytest.mark.skipif(not CUDA or INTERPRETED_AT_IMPORT,
                         reason="needs a CUDA device (and TRITON_INTERPRET unset at import)")


@gpu
@pytest.mark.parametrize("T", [1, 37, 256, 2048])
def test_gpu_moe_align(T, monkeypatch):
    """The compiled single-program layout kernel against the reference, bit for bit (canvas and
    prefill-chunk sizes; a skewed routing: long runs, empty experts)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for index in routings(T, 128, 8, seed=T):
        index = index.cuda()
        for block_m in (16, 32, 64):
            got, want = moe_align_triton(index, 128, block_m), moe_align_ref(index, 128, block_m)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@gpu
@pytest.mark.parametrize("T", [1, 37, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_shapes(T, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    H, I, E, A = 2816, 704, 128, 8
    case = [t.cuda() for t in make_case(T, H, I, E, A, seed=T)]
    case[0] = case[0].to(dtype)
    want = moe_int4_ref(*case).float()
    for cfg in (MoeConfig(), MoeConfig(block_m=32, gu_block_n=128, dn_block_n=128, dn_warps=8)):
        got = moe_int4_triton(*case, config=cfg).float()
        torch.testing.assert_close(got, want, **TOL[dtype])
    got = moe_int4(*case).float()  # autotuned
    torch.testing.assert_close(got, want, **TOL[dtype])


# ---------------------------------------------------------------------------------------------------
# Autotuning: candidates, persistence under $DG_HOME (CPU: fake kernels, the timing monkeypatched)


class FakeKernels:
    """`run(cfg, warmup)` for pick_fastest: compiling reports `shared[cfg]` bytes, timing costs `ms[cfg]`."""

    def __init__(self, shared, ms, compile_error=None):
        self.shared, self.ms, self.compile_error = shared, ms, compile_error
        self.timed = []
        self.running = None

    def __call__(self, cfg, warmup=False):
        from types import SimpleNamespace

        if warmup:
            if self.compile_error and cfg in self.compile_error:
                raise self.compile_error[cfg]
            return SimpleNamespace(metadata=SimpleNamespace(shared=self.shared[cfg]))
        self.running = cfg

    def time(self, fn):
        fn()
        self.timed.append(self.running)
        return self.ms[self.running]


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Autotuning as on a CUDA device named "Fake GPU" with a 99 KB part's shared memory, DG_HOME in tmp."""
    from kernels import _tuning

    monkeypatch.setenv("DG_HOME", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_AUTOTUNE", raising=False)
    monkeypatch.setattr(_tuning, "_memo", {})
    monkeypatch.setattr(_tuning, "_files", {})
    monkeypatch.setattr(_tuning, "_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(_tuning, "shared_limit", lambda device: 101376)
    return _tuning


TUNE_TILES = ((1, 1), (2, 2), (3, 3))


def test_tuning_persists_and_is_reused(tuning, monkeypatch, tmp_path):
    import json

    fake = FakeKernels(shared={t: 1000 for t in TUNE_TILES}, ms={(1, 1): 3.0, (2, 2): 1.0, (3, 3): 2.0})
    monkeypatch.setattr(tuning, "_time", fake.time)
    cuda = torch.device("cuda")
    assert tuning.tuned_tile("k", ("bf16", 256), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (2, 2)
    assert sorted(fake.timed) == sorted(TUNE_TILES)
    stored = json.loads((tmp_path / "tuning" / "k.json").read_text())
    import triton

    assert stored == {f"Fake GPU | triton {triton.__version__} | bf16/256": [2, 2]}
    assert not [p for p in (tmp_path / "tuning").iterdir() if p.name != "k.json"]  # no temp file left

    # a new process: nothing in memory, the file answers and nothing is timed
    monkeypatch.setattr(tuning, "_memo", {})
    monkeypatch.setattr(tuning, "_files", {})
    monkeypatch.setattr(tuning, "_time", lambda fn: pytest.fail("re-tuned a stored choice"))
    assert tuning.tuned_tile("k", ("bf16", 256), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (2, 2)
    # another device name is another entry: tuned again
    monkeypatch.setattr(tuning, "_device_name", lambda device: "Other GPU")
    monkeypatch.setattr(tuning, "_time", fake.time)
    fake.ms[(3, 3)] = 0.5
    assert tuning.tuned_tile("k", ("bf16", 256), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (3, 3)
    assert len(json.loads((tmp_path / "tuning" / "k.json").read_text())) == 2


def test_tuning_file_corrupt_or_stale_is_retuned(tuning, monkeypatch, tmp_path):
    import json

    fake = FakeKernels(shared={t: 1000 for t in TUNE_TILES}, ms={(1, 1): 3.0, (2, 2): 1.0, (3, 3): 2.0})
    monkeypatch.setattr(tuning, "_time", fake.time)
    path = tmp_path / "tuning" / "k.json"
    path.parent.mkdir()
    path.write_text('{"Fake GPU | triton')  # cut short by a crash
    assert tuning.tuned_tile("k", ("bf16",), TUNE_TILES, frozenset(), fake, (1, 1), torch.device("cuda")) == (2, 2)
    assert fake.timed and list(json.loads(path.read_text()).values()) == [[2, 2]]

    # a stored tile that is no longer a candidate is tuned again
    entry = next(iter(json.loads(path.read_text())))
    path.write_text(json.dumps({entry: [9, 9]}))
    monkeypatch.setattr(tuning, "_memo", {})
    monkeypatch.setattr(tuning, "_files", {})
    fake.timed.clear()
    assert tuning.tuned_tile("k", ("bf16",), TUNE_TILES, frozenset(), fake, (1, 1), torch.device("cuda")) == (2, 2)
    assert fake.timed


def test_tuning_off_or_interpreted_uses_default(tuning, monkeypatch):
    monkeypatch.setattr(tuning, "_time", lambda fn: pytest.fail("timed with autotuning off"))
    fake = FakeKernels(shared={}, ms={})
    monkeypatch.setenv("DG_AUTOTUNE", "false")
    assert tuning.tuned_tile("k", (), TUNE_TILES, frozenset(), fake, (1, 1), torch.device("cuda")) == (1, 1)
    monkeypatch.setenv("DG_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.tuned_tile("k", (), TUNE_TILES, frozenset(), fake, (1, 1), torch.device("cuda")) == (1, 1)


def test_a_graph_capture_gets_the_tile_its_warm_up_chose(tuning, monkeypatch):
    """CudaCapture runs the step once before capturing it: the capture must launch the tile that run
    tuned (or read from the file), the one already compiled and loaded, not the default (another
    kernel in the graph than eager ran, another summation order, a module loaded mid-capture); under
    capture nothing is timed, and without a choice yet the default is not remembered."""
    fake = FakeKernels(shared={t: 1000 for t in TUNE_TILES}, ms={(1, 1): 3.0, (2, 2): 1.0, (3, 3): 2.0})
    monkeypatch.setattr(tuning, "_time", fake.time)
    cuda = torch.device("cuda")
    assert tuning.tuned_tile("k", ("bf16",), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (2, 2)  # the warm-up
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(tuning, "_time", lambda fn: pytest.fail("timed under capture"))
    assert tuning.tuned_tile("k", ("bf16",), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (2, 2)
    monkeypatch.setattr(tuning, "_memo", {})  # a new process: the file's choice
    assert tuning.tuned_tile("k", ("bf16",), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (2, 2)
    assert tuning.tuned_tile("k", ("fp16",), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (1, 1)  # none yet
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "_time", fake.time)
    assert tuning.tuned_tile("k", ("fp16",), TUNE_TILES, frozenset(), fake, (1, 1), cuda) == (2, 2)  # tuned later


def test_candidates_over_shared_memory_are_never_timed(tuning, monkeypatch):
    # (3, 3) would be fastest but needs 128 KB; (2, 2) does not compile at all
    fake = FakeKernels(shared={(1, 1): 50_000, (2, 2): 0, (3, 3): 131072}, ms={(1, 1): 2.0, (2, 2): 1.0, (3, 3): 0.1},
                       compile_error={(2, 2): RuntimeError("PassManager::run failed")})
    monkeypatch.setattr(tuning, "_time", fake.time)
    assert tuning.pick_fastest(TUNE_TILES, fake, (1, 1), "k", limit=101376) == ((1, 1), 2.0)
    assert fake.timed == [(1, 1)]
    # nothing fits: the default, untimed, with a warning
    fake.timed.clear()
    with pytest.warns(UserWarning, match="no autotune candidate"):
        cfg, ms = tuning.pick_fastest(TUNE_TILES, fake, (1, 1), "k", limit=1000)
    assert cfg == (1, 1) and ms != ms and not fake.timed


def test_large_tiles_are_not_candidates_on_99kb_parts():
    from kernels import _tuning
    from kernels.lm_head import _LARGE, _TILES

    assert _LARGE and _LARGE < set(_TILES)
    small = _tuning.candidates(_TILES, _LARGE, 101376)  # sm_89, sm_120
    assert not set(small) & _LARGE and len(small) == len(_TILES) - len(_LARGE)
    assert _tuning.candidates(_TILES, _LARGE, 232448) == _TILES  # sm_90


@pytest.mark.parametrize("where", ["compile", "time"])
def test_out_of_memory_surfaces(tuning, monkeypatch, where):
    fake = FakeKernels(shared={t: 0 for t in TUNE_TILES}, ms={t: 1.0 for t in TUNE_TILES})
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    if where == "compile":
        fake.compile_error = {(2, 2): oom}
        monkeypatch.setattr(tuning, "_time", fake.time)
    else:
        monkeypatch.setattr(tuning, "_time", lambda fn: (_ for _ in ()).throw(oom))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tuning.pick_fastest(TUNE_TILES, fake, (1, 1), "k", limit=101376)


def test_other_errors_surface(tuning, monkeypatch):
    """Only compiler rejections drop a candidate; a bug in the launcher is not swallowed."""
    fake = FakeKernels(shared={t: 0 for t in TUNE_TILES}, ms={}, compile_error={(1, 1): TypeError("bad argument")})
    with pytest.raises(TypeError):
        tuning.pick_fastest(TUNE_TILES, fake, (1, 1), "k", limit=101376)


def test_tune_keys_ignore_what_does_not_change_the_choice():
    """Prompt lengths in a chat vary; the keys must not (beyond the buckets that matter)."""
    from kernels.int8_linear import _tune_key as int8_key
    from kernels.lm_head import _tune_key as head_key

    q = torch.zeros(64, 32, dtype=torch.int8)
    keys = {int8_key(torch.zeros(m, 32), q) for m in (300, 777, 4096)}
    assert len(keys) == 1 and int8_key(torch.zeros(1, 32), q) == int8_key(torch.zeros(9, 32), q)
    assert int8_key(torch.zeros(40, 32), q) != int8_key(torch.zeros(256, 32), q)
    w = torch.zeros(100, 32)
    assert head_key(torch.zeros(256, 32), w, torch.float32) == head_key(torch.zeros(512, 32), w, torch.float32)
    _, index, _, q1, *_ = make_case(1, 64, 64, 128, 8)
    moe_key = [M._tune_key(torch.zeros(t, 64), index.expand(t, 8), q1.expand(128, -1, -1), 64) for t in (2000, 5000)]
    assert moe_key[0] == moe_key[1]
    assert "cuda:0" not in str(moe_key) and not any(isinstance(k, torch.device) for k in moe_key[0])
