"""kernels/sample: the reference is torch.multinomial's draw (and dgcli.engine.multinomial's) bit for
bit on the CPU; the Triton kernel (interpreter) picks the reference's token, ties and NaNs included;
at full size it reads proc and q once and writes nothing vocabulary-sized."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels.sample as mod
from dgcli.engine import multinomial
from kernels.sample import draw, draw_ref, draw_triton, plan

ROOT = Path(__file__).resolve().parent.parent


def make(L, V, seed=0, spread=4.0):
    """Processed logits with a softmax-like spread (a few likely tokens, a long tail), their logsumexp,
    and Exp(1) draws as the sampler makes them."""
    g = torch.Generator().manual_seed(seed)
    proc = torch.randn(L, V, generator=g) * spread
    proc[:, :: max(1, V // 7)] += 2 * spread  # some clearly likely tokens
    lse = proc.logsumexp(-1)
    q = torch.empty(L, V).exponential_(1, generator=g)
    return proc, lse, q


@pytest.fixture
def interpret(monkeypatch):
    """The kernels under Triton's interpreter, its float32 exp replaced by torch's. The interpreter's
    is numpy's, which differs from torch's CPU exp by up to 2 ulp on ~40% of arguments; on CUDA the
    kernel calls libdevice's expf, the function torch's CUDA exp is. With torch's exp here, every
    other rounding of the kernel (subtraction, division, comparisons) is checked bit for bit."""
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    def torch_exp(self, arg):
        return self.unary_op(arg, lambda a: torch.from_numpy(np.ascontiguousarray(a)).exp().numpy())

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp", torch_exp)


# ------------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("seed", range(3))
def test_reference_is_torch_multinomial_and_the_samplers_draw(seed):
    """Same generator state -> the same tokens: torch.multinomial(p, 1), dgcli.multinomial(p) and
    draw_ref(proc, lse, q) with q drawn as they draw it (kernels.sample.sample)."""
    proc, lse, _ = make(16, 5000, seed)
    probs = torch.exp(proc - lse[:, None])
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed + 10)).squeeze(-1)
    assert torch.equal(multinomial(probs, torch.Generator().manual_seed(seed + 10)), want)
    g = torch.Generator().manual_seed(seed + 10)
    q = torch.empty(16, 5000).exponential_(1, generator=g)
    assert torch.equal(draw_ref(proc, lse, q), want)
    assert torch.equal(mod.sample(proc, lse, torch.Generator().manual_seed(seed + 10)), want)
    assert len(set(want.tolist())) > 1  # the rows draw different tokens: not all the argmax


def test_sample_keeps_leading_dims_and_the_generators_stream():
    """StepOut's (1, L, V) proc and (1, L) lse give (1, L) tokens; the generator is left where
    multinomial leaves it (the next draw, the renoising randint, is the same)."""
    proc, lse, _ = make(8, 700, seed=5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    got = mod.sample(proc[None], lse[None], g1)
    want = multinomial(torch.exp(proc - lse[:, None]), g2).view(1, 8)
    assert got.shape == (1, 8) and got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(torch.randint(0, 700, (8,), generator=g1), torch.randint(0, 700, (8,), generator=g2))


def test_validates():
    proc, lse, q = make(2, 64)
    with pytest.raises(ValueError, match=r"\[L, V\], \[L\], \[L, V\]"):
        draw_ref(proc, lse[:1], q)
    with pytest.raises(ValueError, match="fp32"):
        draw_ref(proc.double(), lse, q)
    with pytest.raises(ValueError, match="without the last dim"):
        mod.sample(proc, lse[:1], None)


def test_cpu_dispatch_is_the_reference(monkeypatch):
    monkeypatch.delenv("DG_KERNELS", raising=False)
    monkeypatch.setattr(mod, "launch", lambda *a, **k: pytest.fail("launched a kernel on CPU tensors"))
    proc, lse, q = make(3, 100)
    assert torch.equal(draw(proc, lse, q), draw_ref(proc, lse, q))


# ------------------------------------------------------------------------------------ Triton (interpreter)


@pytest.mark.parametrize("V,block,splits", [(1000, 64, 4), (1024, 64, 4), (300, 32, 16), (17, 16, 16), (2000, 16, 1)])
def test_triton_matches_reference(interpret, V, block, splits):
    """Ragged V (not a multiple of the block; a last chunk of one column), several chunks and one."""
    proc, lse, q = make(6, V, seed=V)
    assert torch.equal(draw_triton(proc, lse, q, block=block, splits=splits), draw_ref(proc, lse, q))


@pytest.mark.slow
def test_triton_near_ties_follow_every_rounding(interpret):
    """q = p / c: every ratio of a row is c within an ulp or two, so the token depends on each
    rounding of exp(proc - lse) / q (and on ties, the first index). A kernel that rounded anything
    differently (exp(proc) / exp(lse), a reciprocal then a product) would pick other tokens."""
    proc, lse, _ = make(8, 1000, seed=3, spread=2.0)
    probs = torch.exp(proc - lse[:, None])
    q = probs / torch.tensor([0.3, 1e-3, 2.5e-4, 7.0, 1.0, 0.05, 3e-5, 0.9])[:, None]
    ratio = probs / q
    assert (ratio == ratio.max(-1, keepdim=True).values).sum() > 8 * 3  # several exact ties a row
    want = draw_ref(proc, lse, q)
    assert torch.equal(draw_triton(proc, lse, q, block=32, splits=8), want)
    # the picks are not the obvious ones: the largest probability's column is not the answer everywhere
    assert not torch.equal(want, probs.argmax(-1))


def test_triton_exact_ties_take_the_lowest_index(interpret):
    """The row maximum placed at several columns on purpose: the same lane in later iterations, other
    lanes of a tile, later chunks, the ragged last chunk; the first of them is the token (as
    torch.argmax returns the first maximum). V = 1000, block 32, 4 chunks of 256."""
    proc, lse, q = make(5, 1000, seed=11)
    places = [[700, 600, 999], [40, 40 + 32, 8, 300], [999, 998], [257, 513, 256 + 31], [0, 999, 500]]
    for row, cols in enumerate(places):
        proc[row, cols] = 30.0  # p ~ 1/len(cols) each, far above the rest
        q[row, cols] = 0.5
    lse = proc.logsumexp(-1)
    want = torch.tensor([min(c) for c in places])
    assert torch.equal(draw_ref(proc, lse, q), want)
    assert torch.equal(draw_triton(proc, lse, q, block=32, splits=4), want)


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # numpy's 0 / 0 and x / 0
def test_triton_nan_and_inf_as_torch_argmax(interpret):
    """NaN is the maximum and the first NaN wins (torch.argmax); +inf loses to a NaN only; a row of
    -inf ratios (q = -0.0) gives column 0."""
    proc, lse, q = make(6, 300, seed=2)
    proc[0, [120, 45]] = float("nan")  # NaN in proc: first NaN, 45
    proc[1, 200] = float("-inf")  # p = 0, q = 0: 0 / 0 = NaN at 200, though column 10 is +inf
    q[1, [10, 200]] = 0.0
    lse[2] = float("nan")  # every ratio NaN: column 0
    q[3, 290] = 0.0  # +inf at 290 (p > 0): the token, in the ragged last chunk [288, 300)
    q[4] = -0.0  # every ratio -inf
    proc[5, 299] = float("nan")  # a NaN in the last column only
    want = torch.tensor([45, 200, 0, 290, 0, 299])
    assert torch.equal(draw_ref(proc, lse, q), want)
    assert torch.equal(draw_triton(proc, lse, q, block=32, splits=4), want)


def test_plan_covers_v_in_block_multiples():
    for V, block, splits in [(262144, 2048, 16), (1000, 64, 4), (17, 16, 16), (300, 32, 16), (1, 2048, 16)]:
        span, n = plan(V, block, splits)
        assert span % block == 0 and n <= splits and (n - 1) * span < V <= n * span, (V, span, n)
    assert plan(262144) == (16384, 16)  # the step's: 16 chunks of 8 tiles a row


# ------------------------------------------------------------------------------------------ traffic

L_FULL, V_FULL = 256, 262144


class Traffic(TorchDispatchMode):
    """Bytes each op moves (its tensor arguments and results; an in-place fill writes once), ops, and
    the largest tensor an op makes."""

    FREE = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default)

    def __init__(self):
        super().__init__()
        self.bytes, self.ops, self.largest = 0, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in self.FREE:
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            fresh = [t for t in outs if all(t.untyped_storage()._cdata != i.untyped_storage()._cdata for i in ins)]
            self.bytes += sum(t.nbytes for t in ins + fresh)
            self.ops.append(func.overloadpacket.__name__)
            self.largest = max([self.largest] + [t.numel() for t in fresh])
        return out


def test_full_size_draw_reads_proc_and_q_once(monkeypatch):
    """The step's draw at L = 256, V = 262,144 on meta, the launches recorded: q written once by
    exponential_, then two kernels whose only vocabulary-sized arguments are proc and q (read once);
    the partials are [L, 16]. The unfused sampler moves 9 [L, V] fp32 tensors (2.4 GB), this 3 (0.8 GB)."""
    import kernels._dispatch as dispatch

    launches = []

    class Recorder:
        def __init__(self, kernel, device):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, [a for a in args if isinstance(a, torch.Tensor)]))

    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "launchable", Recorder)
    proc = torch.empty(1, L_FULL, V_FULL, device="meta")
    lse = torch.empty(1, L_FULL, device="meta")
    full = proc.nbytes  # 268 MB
    with Traffic() as t:
        tokens = mod.sample(proc, lse, None)
    assert tokens.shape == (1, L_FULL) and tokens.dtype == torch.int64
    assert t.ops == ["exponential_"] and t.bytes == full and t.largest == 0  # q: written once, in place
    (chunks, grid, args), (combine, grid2, args2) = launches
    assert chunks is mod._draw_chunks_kernel and combine is mod._draw_combine_kernel
    assert grid == (16, L_FULL) and grid2 == (L_FULL,)
    big = [a for a in args + args2 if a.numel() >= V_FULL]
    assert len(big) == 2 and big[0].untyped_storage()._cdata == proc.untyped_storage()._cdata
    kernel_bytes = sum(a.nbytes for a in args + args2)
    assert kernel_bytes - 2 * full < 128 * 1024  # proc and q once; lse, partials (twice) and tokens: 67 KB
    after = t.bytes + kernel_bytes

    with Traffic() as t:  # the unfused draw (dgcli.engine.multinomial) on the fused head's outputs
        multinomial(torch.exp(proc - lse[..., None]).view(-1, V_FULL), None)
    before = t.bytes
    assert before > 9 * full and after < 3 * full + 128 * 1024
    assert before - after > 1.6e9


# ------------------------------------------------------------------------------------------ compiling


@pytest.mark.slow
def test_aot_specs_compile_without_spills():
    """Both kernels at the step's shape compile for sm_89/90/120 without spills, within shared memory."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.aot", "--kernel", "sample", "--jobs", "2"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted((r["kernel"], r["target"]) for r in rows) == sorted(
        (k, t) for k in ("sample.chunks", "sample.combine") for t in ("sm_89", "sm_90", "sm_120"))
    for r in rows:
        assert r["ok"] and r["spills"] == 0 and r["shared_bytes"] <= r["shared_limit"], r
    per_thread = mod.BLOCK // (mod.WARPS * 32)  # elements of a tile per thread
    for r in rows:
        if r["kernel"] == "sample.chunks":
            ops = r["sass"]
            assert r["sass_scope"] == "loop" and ops["LDG"] == 4, r  # 128-bit loads: 2 of proc, 2 of q
            # each element: a correctly rounded division (FCHK: div.rn's range check; Triton's default
            # `/` is MUFU.RCP and a multiply) and libdevice's expf (fma range reduction, then MUFU.EX2;
            # tl.exp is a multiply and MUFU.EX2)
            assert ops["FCHK"] == per_thread and ops["MUFU"] == 2 * per_thread, r
            assert ops["FFMA"] >= 8 * per_thread, r
