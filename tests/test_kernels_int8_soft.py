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
    assert not kwargs["FROM_LOGITS"]
    tensors = tensors[:1] + tensors[2:]  # the second is the lse slot, unread without FROM_LOGITS
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


# ------------------------------------------------------------------------------------------ from logits
#
# The self-conditioning input softmax(sc_logits) @ E: lse_rows reads the logits for each row's
# logsumexp, int8_soft_logits reads them again and makes p = exp(logits - lse), rounded to their dtype.


def make_logits(L, V, H, dtype, seed=0):
    """Processed logits as a step makes them (a spread tail, a few likely tokens), in the dtype, with
    an int8 table as `make`'s."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, V, generator=g) * 4
    logits[:, :: max(1, V // 7)] += 8
    _, codes, scale = make(1, V, H, torch.float32, seed=seed)
    return logits.to(dtype), codes, scale


def softmax64(logits):
    return torch.softmax(logits.double(), -1)


# Bounds against the float64 product softmax(logits)·W, in units of B as above: the kernel rounds
# p = exp(x - lse) to the dtype and w = q·s once each (k = 2), the reference p, then p·s/typical and
# each chunk's sum (k = 3). EXP: fp32 exp and lse's own error, ~|x - lse| · 2^-23 (|x - lse| <= ~60
# here) plus a few ulp: 2^-16, the fp32 case's budget.
EXP = 2.0**-16


def assert_logits_within(got, logits, codes, scale, dtype, roundings):
    probs = softmax64(logits)
    want = dense64(probs, codes, scale)
    b = (roundings * U[dtype] + SLACK + EXP) * (probs @ (codes.double() * scale.double()[:, None]).abs())
    assert got.dtype == torch.float32 and got.shape == want.shape
    excess = (got.double() - want).abs() / b
    assert excess.max() <= 1, excess.max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_reference_is_torch_logsumexp(monkeypatch, dtype):
    """Chunked over V (ragged last chunk), with an all -inf row (-inf) and a row with one finite entry."""
    monkeypatch.setattr(mod, "CHUNK_ROWS", 64)
    logits, _, _ = make_logits(6, 300, 8, dtype)
    logits[4] = float("-inf")
    logits[5] = float("-inf")
    logits[5, 77] = -3.0
    got = mod.lse_rows_ref(logits)
    want = torch.logsumexp(logits.float(), -1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-7, atol=0)  # the same formula, sums in another order
    assert got[4] == float("-inf") and got[5] == -3.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_logits_reference_matches_float64(monkeypatch, dtype):
    monkeypatch.setattr(mod, "CHUNK_ROWS", 64)
    logits, codes, scale = make_logits(5, 300, 48, dtype)
    got = mod.int8_soft_logits_ref(logits, mod.lse_rows_ref(logits), codes, scale)
    assert_logits_within(got, logits, codes, scale, dtype, REFERENCE + 1)


def test_soft_logits_reference_is_soft_of_the_models_softmax():
    """With the model's probabilities (fp32 softmax rounded to bf16), the same numbers as int8_soft_ref
    of them, up to exp(x - lse) against softmax's exp(x - max) / sum (1 bf16 ulp on a few)."""
    logits, codes, scale = make_logits(4, 300, 32, torch.bfloat16)
    probs = torch.softmax(logits.float(), -1).to(torch.bfloat16)
    mine = torch.exp(logits.float() - mod.lse_rows_ref(logits)[:, None]).to(torch.bfloat16)
    assert (mine.float() - probs.float()).abs().le(probs.float() * 2.0**-7).all()
    got = mod.int8_soft_logits_ref(logits, mod.lse_rows_ref(logits), codes, scale)
    torch.testing.assert_close(got, int8_soft_ref(probs, codes, scale), rtol=2e-2, atol=1e-5)


def test_soft_logits_validates():
    logits, codes, scale = make_logits(2, 64, 16, torch.float32)
    lse = mod.lse_rows_ref(logits)
    with pytest.raises(ValueError, match=r"want \[L, V\], \[L\]"):
        mod.int8_soft_logits_ref(logits, lse[:1], codes, scale)
    with pytest.raises(ValueError, match="lse must be fp32"):
        mod.int8_soft_logits_ref(logits, lse.half(), codes, scale)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        mod.lse_rows_ref(logits.double())


@pytest.fixture
def interpret_exp(interpret, monkeypatch):
    """`interpret`, and the interpreter's float32 exp (numpy's) replaced by torch's, as
    test_kernels_sample does (they differ by up to 2 ulp; on CUDA tl.exp is ex2.approx, within the
    EXP budget)."""
    import numpy as np
    from triton.runtime import interpreter

    def torch_exp(self, arg):
        return self.unary_op(arg, lambda a: torch.from_numpy(np.ascontiguousarray(a)).exp().numpy())

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp", torch_exp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,block", [(300, 64), (1000, 2048), (256, 64)])  # ragged, one short tile, even
def test_triton_lse_matches_torch_logsumexp(interpret_exp, dtype, V, block):
    """Within 4 fp32 ulp of |lse| plus 2^-20 (sums of up to V exps in another order)."""
    logits, _, _ = make_logits(5, V, 8, dtype, seed=V)
    logits[3] = float("-inf")
    logits[4] = -200.0  # far below 0: the running max, not 0, shifts the exps
    got = mod.lse_rows_triton(logits, block=block)
    want = torch.logsumexp(logits.float(), -1)
    assert got[3] == float("-inf")
    ok = torch.isfinite(want)
    assert ((got[ok] - want[ok]).abs() <= 4 * 2.0**-23 * want[ok].abs() + 2.0**-20).all(), (got - want)


@pytest.mark.parametrize("tile,splits", [(None, None), ((16, 32, 32, 4, 2), 3)], ids=["default", "small-3splits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,V,H", [(4, 300, 64), (19, 200, 80)])  # V off the block; ragged L and H
def test_triton_soft_logits_matches_reference(interpret_exp, L, V, H, dtype, tile, splits):
    logits, codes, scale = make_logits(L, V, H, dtype, seed=L)
    logits[0] -= 300  # very negative logits: past V, exp(0 - lse) would overflow unless masked
    lse = mod.lse_rows_ref(logits)
    got = mod.int8_soft_logits_triton(logits, lse, codes, scale, tile=tile, splits=splits)
    assert torch.isfinite(got).all()
    assert_logits_within(got, logits, codes, scale, dtype, KERNEL + 1)
    ref = mod.int8_soft_logits_ref(logits, lse, codes, scale)
    assert_logits_within(ref, logits, codes, scale, dtype, REFERENCE + 1)
    if dtype == torch.float32:  # no rounding to a narrower dtype: the two agree to fp32 sums
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def quant_embedding(codes, scale, dtype):
    from quant.runtime import QuantEmbedding

    V, H = codes.shape
    qe = QuantEmbedding(V, H, "int8_row")
    qe.weight.qweight.copy_(codes)
    qe.weight.scales.copy_(scale)
    return qe.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quant_embedding_soft_logits_goes_through_the_kernels(interpret_exp, dtype):
    """QuantEmbedding.soft_logits (int8_row) = lse_rows then int8_soft_logits, cast and scaled; close
    to the unfused soft(softmax(...)) (the probabilities rounded alike, summed in another order)."""
    logits, codes, scale = make_logits(6, 300, 64, dtype)
    qe = quant_embedding(codes, scale, dtype)
    got = qe.soft_logits(logits.view(2, 3, 300))
    lse = mod.lse_rows_triton(logits)
    want = mod.int8_soft_logits_triton(logits, lse, codes, scale).to(dtype) * qe.embed_scale()
    assert got.dtype == dtype and torch.equal(got, want.view(2, 3, 64))
    unfused = qe.soft(torch.softmax(logits.float(), -1).to(dtype).view(2, 3, 300))
    torch.testing.assert_close(got, unfused, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_embedding_soft_logits_reference_path(monkeypatch, dtype):
    """Off CUDA (the references): close to Embedding.soft_logits' unfused softmax then soft."""
    from dgcli.model import Embedding

    monkeypatch.setenv("DG_KERNELS", "ref")
    logits, codes, scale = make_logits(6, 300, 64, dtype)
    qe = quant_embedding(codes, scale, dtype)
    got = qe.soft_logits(logits.view(1, 6, 300))
    unfused = Embedding.soft_logits(qe, logits.view(1, 6, 300))
    assert got.dtype == dtype and got.shape == (1, 6, 64)
    torch.testing.assert_close(got, unfused, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)))


def test_quant_embedding_soft_logits_in_another_dtype_is_unfused(monkeypatch):
    """fp32 logits into a bf16 model: exactly Embedding.soft_logits (softmax rounded to bf16), as before."""
    from dgcli.model import Embedding

    monkeypatch.setenv("DG_KERNELS", "ref")
    logits, codes, scale = make_logits(3, 300, 32, torch.float32)
    qe = quant_embedding(codes, scale, torch.bfloat16)
    got = qe.soft_logits(logits[None])
    assert got.dtype == torch.bfloat16 and torch.equal(got, Embedding.soft_logits(qe, logits[None]))


def test_lse_reference_makes_no_full_fp32_copy():
    """At full size on meta, lse_rows_ref's largest tensor is a chunk, not an fp32 [L, V]; the
    logits are read twice (the max, then the chunks). torch.logsumexp(logits.float()) makes the copy."""
    probs, codes, _ = full_size()
    with Traffic(codes, probs) as t:
        lse = mod.lse_rows_ref(probs)
    assert lse.shape == (L_FULL,) and t.read["probs"] == 2 * probs.nbytes
    assert t.largest <= L_FULL * mod.CHUNK_ROWS
    with Traffic(codes, probs) as t:
        torch.logsumexp(probs.float(), -1)
    assert t.largest == probs.numel()


def record_launches(monkeypatch):
    import kernels._dispatch as dispatch

    launches = []

    class Recorder:
        def __init__(self, kernel, device):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(
                (self.kernel, grid, [a for a in args if isinstance(a, torch.Tensor)], kwargs))

    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setenv("DG_AUTOTUNE", "off")
    monkeypatch.setattr(dispatch, "launchable", Recorder)
    return launches


@pytest.mark.parametrize("fused", [True, False], ids=["soft_logits", "softmax-then-soft"])
def test_self_conditioning_input_reads_logits_twice_and_codes_once(monkeypatch, fused):
    """The CUDA path at full size (L = 256, V = 262,144, H = 2816), traced on meta with the launches
    recorded: QuantEmbedding.soft_logits moves the logits twice (134 MB each), the codes once
    (738 MB), and [L, H]-sized partials and results; no [L, V] tensor is written (1.10 GB in all).
    Three kernels: the partials' sum, the cast and sqrt(H) are one (no torch op on [L, H] tensors).
    The unfused input (fp32 softmax written and read back, the probabilities written and read again)
    moves 2.31 GB as traced here, and fails the bound by more than 0.5 GB."""
    launches = record_launches(monkeypatch)
    from quant.runtime import QuantEmbedding

    qe = QuantEmbedding(V_FULL, H_FULL, "int8_row", device="meta").to(torch.bfloat16)
    logits, codes, scale = full_size()[0], qe.weight.qweight, qe.weight.scales
    assert codes.shape == (V_FULL, H_FULL) and codes.dtype == torch.int8 and scale.dtype == torch.float16
    x = logits.view(1, L_FULL, V_FULL)
    with Traffic(codes, logits) as t:
        out = qe.soft_logits(x) if fused else qe.soft(torch.softmax(x, -1, dtype=torch.float32).to(x.dtype))
    assert out.shape == (1, L_FULL, H_FULL) and out.dtype == torch.bfloat16
    kernel_bytes = sum(a.nbytes for _, _, tensors, _ in launches for a in tensors)
    total = kernel_bytes + t.bytes
    partials = mod.MAX_SPLITS * L_FULL * H_FULL * 4
    budget = 2 * logits.nbytes + codes.nbytes + scale.nbytes + 2 * partials + 6 * out.nbytes * 2
    if fused:
        assert t.read == {"codes": 0, "probs": 0}  # only the kernels read the logits and the codes
        assert [k.fn.__name__ if hasattr(k, "fn") else k.__name__ for k, _, _, _ in launches] == [
            "_lse_rows_kernel", "_int8_soft_kernel", "_finish_kernel"]
        assert t.bytes < 64, t.bytes  # only the CPU scalar sqrt(H)
        assert all(a.numel() < L_FULL * V_FULL or a.untyped_storage()._cdata == logits.untyped_storage()._cdata
                   for _, _, tensors, _ in launches for a in tensors if a.dtype != torch.int8)
        assert total <= budget, total / 1e9
    else:
        assert total > budget + 0.5e9, total / 1e9


def test_quant_embedding_soft_logits_takes_the_samplers_lse(monkeypatch):
    """Given the logits' logsumexp (the sampler's fused draw makes it), soft_logits skips lse_rows and
    uses it; the plain Embedding ignores it."""
    import quant.runtime as runtime
    from dgcli.model import Embedding

    monkeypatch.setenv("DG_KERNELS", "ref")
    logits, codes, scale = make_logits(6, 300, 64, torch.bfloat16)
    qe = quant_embedding(codes, scale, torch.bfloat16)
    want = qe.soft_logits(logits.view(1, 6, 300))
    lse = mod.lse_rows_ref(logits).view(1, 6)
    monkeypatch.setattr(runtime, "lse_rows", lambda x: pytest.fail("lse_rows ran though lse was given"))
    assert torch.equal(qe.soft_logits(logits.view(1, 6, 300), lse), want)
    shifted = qe.soft_logits(logits.view(1, 6, 300), lse + 1.0)  # it is used: p = exp(x - lse) / e
    torch.testing.assert_close(shifted.float(), want.float() / torch.e, rtol=2e-2, atol=1e-3)
    assert torch.equal(Embedding.soft_logits(qe, logits.view(1, 6, 300), lse + 1.0),
                       Embedding.soft_logits(qe, logits.view(1, 6, 300)))


# ------------------------------------------------------------------------------------------ finish
#
# out_dtype and factor: the result .to(out_dtype) * factor; on the Triton path one kernel sums the split
# partials in order, rounds once to out_dtype and multiplies in fp32 (one more rounding), as torch's
# bf16 x bf16 product does. Tolerance against torch's sum (perhaps in another order): two fp32 sums of
# S terms differ by at most 2(S - 1) · 2^-24 · Σ|terms|; rounded to out_dtype, scaled and rounded
# again, by that times the factor plus two out_dtype ulps: `finish_tolerance`. One split: nothing to
# sum, the same floats.
FINISH_ULPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}  # 1 ulp / |x|, at most


def finish_tolerance(partials, want, factor):
    S = partials.shape[0]
    sums = S * 2.0**-23 * partials.double().abs().sum(0) * float(factor)
    return 2 * FINISH_ULPS[want.dtype] * want.double().abs() + sums


def sqrt_h(H, dtype):
    return torch.tensor(H**0.5).to(dtype)  # as Embedding.embed_scale() makes it


@pytest.mark.parametrize("by_value", [False, True], ids=["factor-tensor", "factor-float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_finish_kernel_matches_reference(interpret, dtype, splits, by_value):
    g = torch.Generator().manual_seed(splits)
    partials = torch.randn(splits, 19, 80, generator=g) * 10.0 ** torch.randint(-6, 2, (1, 19, 80), generator=g)
    factor = sqrt_h(2816, dtype)
    got = mod.finish_triton(partials, dtype, float(factor) if by_value else factor)
    want = mod.finish_ref(partials, dtype, factor)
    assert got.dtype == dtype and got.shape == (19, 80)
    if splits == 1:
        assert torch.equal(got, want)
    else:
        assert ((got.double() - want.double()).abs() <= finish_tolerance(partials, want, factor)).all()
    assert not torch.equal(got, partials.sum(0).to(dtype))  # the factor is applied (sqrt(2816) = 53.07)


def test_finish_kernel_sums_the_splits_in_order(interpret):
    """(1e8 + 1) - 1e8 is 0 in fp32 (1 is under half an ulp of 1e8), 1e8 - 1e8 + 1 is 1: the kernel
    adds split 0, then 1, then 2, whatever the values (deterministic)."""
    partials = torch.tensor([1e8, 1.0, -1e8]).view(3, 1, 1).expand(3, 2, 16).contiguous()
    one = torch.ones((), dtype=torch.float32)
    assert torch.equal(mod.finish_triton(partials, torch.float32, one), torch.zeros(2, 16))
    assert torch.equal(mod.finish_triton(partials[[0, 2, 1]].contiguous(), torch.float32, one), torch.ones(2, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_soft_logits_finish_on_both_paths(interpret_exp, dtype, splits):
    """int8_soft_logits(..., out_dtype, factor): the reference is exactly its fp32 result .to(dtype) *
    factor; the Triton path the same with one split, within FINISH_ULPS with three."""
    logits, codes, scale = make_logits(6, 300, 64, dtype)
    lse = mod.lse_rows_ref(logits)
    factor = sqrt_h(64, dtype)
    ref = mod.int8_soft_logits_ref(logits, lse, codes, scale, dtype, factor)
    fp32 = mod.int8_soft_logits_ref(logits, lse, codes, scale)
    assert ref.dtype == dtype and torch.equal(ref, fp32.to(dtype) * factor)
    tile = (16, 32, 32, 4, 2)
    got = mod.int8_soft_logits_triton(logits, lse, codes, scale, dtype, factor, tile=tile, splits=splits)
    want = mod.int8_soft_logits_triton(logits, lse, codes, scale, tile=tile, splits=splits).to(dtype) * factor
    assert got.dtype == dtype
    if splits == 1:
        assert torch.equal(got, want)
    else:
        assert ((got.double() - want.double()).abs() <= 2 * FINISH_ULPS[dtype] * want.double().abs()).all()


def test_finish_refuses_half_a_pair():
    logits, codes, scale = make_logits(2, 64, 16, torch.bfloat16)
    lse = mod.lse_rows_ref(logits)
    for fn in (mod.int8_soft_logits_ref, mod.int8_soft_logits_triton, mod.int8_soft_logits):
        with pytest.raises(ValueError, match="come together"):
            fn(logits, lse, codes, scale, torch.bfloat16)
        with pytest.raises(ValueError, match="come together"):
            fn(logits, lse, codes, scale, None, sqrt_h(16, torch.bfloat16))
        with pytest.raises(ValueError, match="one torch.bfloat16 element"):
            fn(logits, lse, codes, scale, torch.bfloat16, sqrt_h(16, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_finish(monkeypatch):
    """Compiled, at the step's L and H (V cut to 32,768): the finish with sqrt(H) from the CPU, as
    QuantEmbedding passes it, against torch's sum, cast and multiply of the same partials."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    logits, codes, scale = make_logits(256, 32768, 2816, torch.bfloat16)
    logits, codes, scale = logits.cuda(), codes.cuda(), scale.half().cuda()
    lse = mod.lse_rows(logits)
    factor = sqrt_h(2816, torch.bfloat16)
    for splits in (1, None):
        kw = dict(tile=mod.DEFAULT_TILE, splits=splits)
        want = mod.int8_soft_logits_triton(logits, lse, codes, scale, **kw)
        got = mod.int8_soft_logits_triton(logits, lse, codes, scale, torch.bfloat16, factor, **kw)
        unfused = want.to(torch.bfloat16) * factor
        if splits == 1:
            assert torch.equal(got, unfused)
        else:
            torch.testing.assert_close(got, unfused, rtol=2 * FINISH_ULPS[torch.bfloat16], atol=1e-4)
