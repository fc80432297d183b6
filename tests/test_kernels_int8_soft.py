"""kernels/int8_soft: the reference against a float64 dense product, Triton (interpreter on CPU)
against the reference, and what each path moves: every code read once, never the table decoded."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels.int8_soft as mod
from kernels.int8_linear import quantize_int8_oracle
from kernels.int8_soft import int8_soft, int8_soft_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error bounds, element by element, against the float64 product P·W (W = codes · scale), in units of
# B = |P|·|W|: k·u + 2^-18, u the dtype's unit roundoff and 2^-18 the fp32 sums' slack. The kernel
# rounds one factor of each product once (w = q·s): k = 1. The reference rounds p·s/typical and
# each chunk's partial sum: k = 2. In fp32 only the sums round.
U = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SLACK = 2.0**-18
KERNEL, REFERENCE = 1, 2


def make(L, V, H, dtype, seed=0, spread=True):
    """Probabilities as the model makes them (fp32 softmax, then the dtype), and an int8 table whose
    row scales vary over two decades, with an all-zero row (scale 0)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(L, V, generator=g) * 3, -1).to(dtype)
    w = torch.randn(V, H, generator=g) * 0.02
    if spread:
        w *= 10 ** (torch.rand(V, 1, generator=g) * 2 - 1)
    w[1] = 0
    codes, scale = quantize_int8_oracle(w)
    return probs, codes, scale


def dense64(probs, codes, scale):
    return probs.double() @ (codes.double() * scale.double()[:, None])


def bound(probs, codes, scale, dtype, roundings):
    return (roundings * U[dtype] + SLACK) * (probs.double().abs() @ (codes.double() * scale.double()[:, None]).abs())


def assert_within(got, probs, codes, scale, dtype, roundings):
    want = dense64(probs, codes, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    excess = (got.double() - want).abs() / bound(probs, codes, scale, dtype, roundings)
    assert excess.max() <= 1, excess.max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_float64_dense_product(monkeypatch, dtype):
    monkeypatch.setattr(mod, "CHUNK_ROWS", 64)  # several chunks and a ragged last one at V = 300
    probs, codes, scale = make(5, 300, 48, dtype)
    assert_within(int8_soft_ref(probs, codes, scale), probs, codes, scale, dtype, REFERENCE)


def test_reference_keeps_tiny_fp16_products():
    """p · s is ~1e-9 here, under fp16's smallest subnormal (6e-8): folded in as is, it would vanish.
    The reference folds s relative to the scales' geometric mean, the kernel folds it into q."""
    probs, codes, scale = make(3, 4096, 32, torch.float16, seed=3)
    scale = (scale.float() * 1e-2).half()  # ~1e-6 row scales
    assert dense64(probs, codes, scale).abs().max() > 0
    assert_within(int8_soft_ref(probs, codes, scale), probs, codes, scale, torch.float16, REFERENCE)


def test_validates():
    probs, codes, scale = make(2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="int8"):
        int8_soft_ref(probs, codes.float(), scale)
    with pytest.raises(ValueError, match=r"\[L, V\]"):
        int8_soft_ref(probs[:, :32], codes, scale)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        int8_soft_ref(probs.double(), codes, scale)


def test_dispatcher_keeps_leading_dims():
    probs, codes, scale = make(6, 100, 24, torch.float32)
    got = int8_soft(probs.view(2, 3, 100), codes, scale)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.view(6, 24), int8_soft_ref(probs, codes, scale))


# ------------------------------------------------------------------------------------------ Triton


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    from test_kernels_norm import _round_bf16_casts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DG_KERNELS", "triton")
    _round_bf16_casts(monkeypatch)  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest


@pytest.mark.parametrize("tile,splits", [(None, None), ((16, 32, 32, 4, 2), 1), ((16, 32, 32, 4, 2), 3)],
                         ids=["default", "small-1split", "small-3splits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,V,H", [(4, 300, 64), (19, 200, 80)])  # V off the block; ragged L and H
def test_triton_matches_reference(interpret, L, V, H, dtype, tile, splits):
    probs, codes, scale = make(L, V, H, dtype, seed=L)
    got = mod.int8_soft_triton(probs, codes, scale, tile=tile, splits=splits)
    assert_within(got, probs, codes, scale, dtype, KERNEL)
    # the two sit within their bounds' sum of each other
    gap = (got.double() - int8_soft_ref(probs, codes, scale).double()).abs()
    assert (gap <= bound(probs, codes, scale, dtype, KERNEL) + bound(probs, codes, scale, dtype, REFERENCE)).all()


def test_triton_through_the_dispatcher_with_tiny_fp16_scales(interpret):
    """The kernel's w = q · s is the weight itself, in fp16's normal range even for ~1e-6 scales."""
    probs, codes, scale = make(3, 256, 32, torch.float16, seed=3)
    scale = (scale.float() * 1e-2).half()
    assert_within(int8_soft(probs, codes, scale), probs, codes, scale, torch.float16, KERNEL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quant_embedding_soft_goes_through_the_kernel(interpret, dtype):
    """QuantEmbedding.soft (int8_row) = int8_soft's Triton path, cast and scaled by sqrt(H)."""
    from quant.runtime import QuantEmbedding

    probs, codes, scale = make(6, 300, 64, dtype)
    qe = QuantEmbedding(300, 64, "int8_row")
    qe.weight.qweight.copy_(codes)
    qe.weight.scales.copy_(scale)
    qe.to(dtype)
    got = qe.soft(probs.view(2, 3, 300))
    want = mod.int8_soft_triton(probs, codes, scale).to(dtype) * qe.embed_scale()
    assert got.dtype == dtype and torch.equal(got, want.view(2, 3, 64))


def test_splits_fill_the_waves():
    # 44 tiles (L 256, H 2816 in 128 x 128) on 128 SMs: 14 ranges fill 616 / 640 program slots
    assert mod.splits_for(44, 4096, 128) == 14
    assert mod.splits_for(44, 4096, 132) == 3  # exactly one wave
    assert mod.splits_for(1, 2, 128) == 2  # no more ranges than blocks of V
    assert 1 <= mod.splits_for(44, 4096, 7) <= mod.MAX_SPLITS


# ------------------------------------------------------------------------------------------ traffic

V_FULL, H_FULL, L_FULL = 262144, 2816, 256


class Traffic(TorchDispatchMode):
    """Per op that moves data (not a view, not a bare allocation): bytes of its tensor arguments and
    results; bytes read from the codes' and the probabilities' storages; the largest tensor it makes."""

    ALLOCATIONS = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default)

    def __init__(self, codes, probs):
        super().__init__()
        self.watch = {"codes": codes.untyped_storage()._cdata, "probs": probs.untyped_storage()._cdata}
        self.read = dict.fromkeys(self.watch, 0)
        self.bytes = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in self.ALLOCATIONS:
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.nbytes for t in ins + outs)
            self.largest = max([self.largest] + [t.numel() for t in outs])
            for name, sid in self.watch.items():
                self.read[name] += sum(t.nbytes for t in ins if t.untyped_storage()._cdata == sid)
        return out


def full_size(L=L_FULL):
    codes = torch.empty(V_FULL, H_FULL, dtype=torch.int8, device="meta")
    scale = torch.empty(V_FULL, dtype=torch.float16, device="meta")
    probs = torch.empty(L, V_FULL, dtype=torch.bfloat16, device="meta")
    return probs, codes, scale


def test_reference_reads_each_code_once_and_never_decodes_the_table(monkeypatch):
    """At full size, on meta: the codes and the probabilities are each read once, no op makes a
    table-sized tensor, and the traffic is ~5 bytes per weight (each code converted once to bf16
    and read by the matmul) plus the probability and output passes. A decode of the whole table
    (q.float() * s, then a matmul) makes a [V, H] tensor and moves 13+ bytes per weight."""
    monkeypatch.setenv("DG_KERNELS", "ref")
    probs, codes, scale = full_size(L=4)
    with Traffic(codes, probs) as t:
        out = int8_soft(probs, codes, scale)
    assert out.shape == (4, H_FULL) and out.dtype == torch.float32
    assert t.read == {"codes": codes.nbytes, "probs": probs.nbytes}
    assert t.largest < V_FULL * H_FULL // 8  # a chunk at a time
    assert t.bytes < 5.2 * codes.numel(), t.bytes / codes.numel()

    def decode_all(probs, codes, scale):  # the check fails such a reference
        return probs.float() @ (codes.float() * scale.float()[:, None])

    with Traffic(codes, probs) as t:
        decode_all(probs, codes, scale)
    assert t.largest >= V_FULL * H_FULL and t.bytes > 13 * codes.numel()


def test_triton_path_reads_codes_and_probs_once(monkeypatch):
    """The CUDA path at full size (L = 256), traced on meta with the launch recorded, not run: one
    kernel whose arguments are probs, codes, scales and the fp32 partials, then their sum: in all
    the codes once (738 MB), the probabilities once (134 MB) and at most MAX_SPLITS partials of
    [L, H] fp32 written and read back (~40 MB for the 14 ranges an RTX 4090 gets)."""
    import kernels._dispatch as dispatch

    launches = []

    class Recorder:
        def __init__(self, kernel, device):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(
                (grid, [a for a in args if isinstance(a, torch.Tensor)], kwargs))

    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "launchable", Recorder)
    probs, codes, scale = full_size()
    with Traffic(codes, probs) as t:
        out = int8_soft(probs, codes, scale)
    assert out.shape == (L_FULL, H_FULL) and out.dtype == torch.float32
    assert t.read == {"codes": 0, "probs": 0}  # no torch op touches them: only the kernel
    (grid, tensors, kwargs), = launches
    same = [a.untyped_storage()._cdata == b.untyped_storage()._cdata and a.shape == b.shape
            for a, b in zip(tensors, (probs, codes, scale))]
    assert same == [True] * 3
    partials = tensors[3]
    assert partials.shape == (grid[2], L_FULL, H_FULL) and partials.dtype == torch.float32
    assert grid[:2] == (L_FULL // kwargs["BLOCK_L"], H_FULL // kwargs["BLOCK_H"])
    assert 1 < grid[2] <= mod.MAX_SPLITS
    kernel_bytes = sum(x.nbytes for x in tensors)
    glue = t.bytes  # the sum over the splits: reads the partials, writes [L, H]
    assert glue <= partials.nbytes + 2 * out.nbytes
    total = kernel_bytes + glue
    once = codes.nbytes + probs.nbytes + scale.nbytes
    assert total <= once + 2 * mod.MAX_SPLITS * L_FULL * H_FULL * 4 + out.nbytes, total / 1e9
