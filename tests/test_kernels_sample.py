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

import kernels.cuda_rng as rng
import kernels.sample as mod
from dgcli.engine import multinomial
from kernels.int8_soft import lse_rows_ref
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


def record_launches(monkeypatch) -> list:
    """Triton launches recorded instead of run (DG_KERNELS=triton, on meta tensors): a list of
    (kernel, grid, tensor arguments), filled as the code under test launches."""
    import kernels._dispatch as dispatch

    launches = []

    class Recorder:
        def __init__(self, kernel, device):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, [a for a in args if isinstance(a, torch.Tensor)]))

    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "launchable", Recorder)
    return launches


def test_full_size_draw_reads_proc_and_q_once(monkeypatch):
    """The step's draw at L = 256, V = 262,144 on meta, the launches recorded: q written once by
    exponential_, then two kernels whose only vocabulary-sized arguments are proc and q (read once);
    the partials are [L, 16]. The unfused sampler moves 9 [L, V] fp32 tensors (2.4 GB), this 3 (0.8 GB)."""
    launches = record_launches(monkeypatch)
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
    """The kernels at the step's shape compile for sm_89/90/120 without spills, within shared memory."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.aot", "--kernel", "sample", "--jobs", "2"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    kernels = ("sample.chunks", "sample.combine", "sample.fused", "sample.fused.raw", "sample.fused_combine")
    assert sorted((r["kernel"], r["target"]) for r in rows) == sorted(
        (k, t) for k in kernels for t in ("sm_89", "sm_90", "sm_120"))
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
        if r["kernel"] == "sample.fused":  # no loop: the whole kernel, 32 elements a lane
            ops, n = r["sass"], 4 * rng.SPAN // (mod.FUSED_WARPS * 32)
            # per element: a correctly rounded division (FCHK), and MUFU for __logf's lg2, expf's ex2,
            # the division's reciprocal and sc_lse's exp
            assert ops["FCHK"] == n and 4 * n <= ops["MUFU"] <= 4 * n + 8, r
            assert ops["LDG"] <= n // 4 + 4 and "LDL" not in ops and "STL" not in ops, r  # 128-bit loads of proc
            assert sum(ops.values()) < 110 * n, r  # ~91 instructions an element at sm_90
        if r["kernel"] == "sample.fused.raw":  # the engine's: bf16 logits in, sc and sc_lse written
            ops, n = r["sass"], 4 * rng.SPAN // (mod.FUSED_WARPS * 32)
            # the softcap's exp and the tanh's division add two MUFU an element (x / softcap and
            # / temperature divide by one value: ptxas makes one reciprocal for each)
            assert ops["FCHK"] == n and 6 * n <= ops["MUFU"] <= 6 * n + 16, r
            # 128-bit loads of 8 logits, the segments' lse and the temperature; stores: 8 of sc (128
            # bits) and the three partials per segment
            assert ops["LDG"] <= n // 8 + 5 and ops["STG"] == 4 + 3 * 4 and "LDL" not in ops and "STL" not in ops, r
            assert sum(ops.values()) < 130 * n, r  # ~115 instructions an element at sm_90


def test_aot_compiles_the_fused_draw_the_engine_launches(monkeypatch):
    """The fused draw as the sampler launches it at full size (StepOut.sample_sc on the fused head's
    bf16 logits with process, sc and its logsumexp into the graph's buffers) is an AOT spec: its
    constexprs and pointer dtypes, so that the compile test checks the kernel that runs."""
    import triton.language as tl

    from dgcli.engine import SelfCond, StepOut

    launched = []
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(mod, "launch", lambda kernel, device, grid, *args, **kw: launched.append((kernel, args, kw)))
    monkeypatch.setattr(mod, "fused_device", lambda t: True)
    monkeypatch.setattr(mod, "check_status", lambda device, n: True)
    monkeypatch.setattr(mod, "philox_state", lambda g, d: (7, 40))
    monkeypatch.setattr(mod, "set_philox_offset", lambda g, d, off: None)
    meta = dict(device="meta")
    out = StepOut(torch.empty(1, L_FULL, V_FULL, dtype=torch.bfloat16, **meta), torch.empty(1, L_FULL, dtype=torch.long, **meta),
                  torch.empty(1, L_FULL, **meta), torch.empty(1, L_FULL, **meta), (30.0, torch.empty((), **meta)))
    into = SelfCond(torch.empty(1, L_FULL, V_FULL, dtype=torch.bfloat16, **meta), torch.empty(1, L_FULL, **meta))
    out.sample_sc(None, torch.bfloat16, into)
    (_, args, kw), = [x for x in launched if x[0] is mod._fused_draw_kernel]
    names = mod._fused_draw_kernel.arg_names
    dtypes = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}
    pointers = {n: dtypes[a.dtype] for n, a in zip(names, args) if isinstance(a, torch.Tensor)}
    specs = [s for s in mod.AOT if s.fn is mod._fused_draw_kernel]
    constexprs = {k: v for k, v in kw.items() if k in names}
    assert any(s.constexprs == constexprs and all(s.signature[n] == t for n, t in pointers.items()) for s in specs), (
        constexprs, pointers, [(s.kernel, s.constexprs) for s in specs])
    assert constexprs["RAW"] and constexprs["WRITE_SC"] and constexprs["SC_LSE"] and pointers["sc_ptr"] == "*bf16"


# ------------------------------------------------------------------------------ the fused draw (cuda_rng)



def _log32(u):
    """The log both sides use on the CPU (the device's is __logf; see test_kernels_cuda_rng)."""
    return np.log(np.asarray(u, dtype=np.float64)).astype(np.float32)


@pytest.fixture
def fused_interpret(interpret, monkeypatch):
    """The interpreter as `interpret` sets it up, its log and the reference's the same, its fp32 -> bf16
    casts rounded to nearest even as the GPU's (the interpreter truncates)."""
    from test_kernels_norm import _round_bf16_casts
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_log", lambda self, arg: self.unary_op(arg, _log32))
    monkeypatch.setattr(rng, "exponential_ref", _with_log(rng.exponential_ref))
    _round_bf16_casts(monkeypatch)


def _with_log(ref):
    return lambda n, seed, offset, threads, log=None: ref(n, seed, offset, threads, log=log or _log32)


def _q(L, V, seed, offset, threads):
    return torch.from_numpy(rng.exponential_ref(L * V, seed, offset, threads, log=_log32)).view(L, V)


@pytest.mark.parametrize("L,V,device,dtype", [
    (6, 1000, (1, 256), torch.bfloat16),  # N = 256: six calls a thread; segments straddle rows (1000 % 256)
    (4, 1024, (1, 512), torch.float16),  # rows of whole segments; fp16 model dtype
    (3, 17, (1, 256), torch.bfloat16),  # segments of 16 columns, straddling
    (5, 300, (2, 1024), None),  # tokens only; N = 1536 > L·V: one call, lanes 0 only
])
def test_fused_draw_is_the_draw_on_torchs_exp_draws(fused_interpret, L, V, device, dtype):
    """The fused kernel's tokens are draw_ref's on the draws torch's exponential_ would make at that
    generator state (kernels.cuda_rng's reference); it writes proc in the model dtype and that
    input's logsumexp, close to lse_rows'."""
    proc, lse, _ = make(L, V, seed=V)
    seed, offset = 2**63 + 99, 4 * 1234
    threads, _ = rng.layout(L * V, *device)
    want = draw_ref(proc, lse, _q(L, V, seed, offset, threads))
    assert not torch.equal(want, proc.argmax(-1))  # a sample, not the argmax
    sc = None if dtype is None else torch.full((L, V), 7.0, dtype=dtype)
    sc_lse = None if dtype is None else torch.full((L,), 7.0)
    got = mod.draw_fused_triton(proc, lse, seed, offset, threads, sc, sc_lse)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(mod.draw_fused_ref(proc, lse, seed, offset, threads), want)
    if dtype is not None:
        assert torch.equal(sc, proc.to(dtype))
        torch.testing.assert_close(sc_lse, lse_rows_ref(sc), rtol=0, atol=2e-5)
        ref_sc, ref_lse = torch.empty_like(sc), torch.empty_like(sc_lse)
        mod.draw_fused_ref(proc, lse, seed, offset, threads, ref_sc, ref_lse)
        assert torch.equal(ref_sc, sc)
        torch.testing.assert_close(ref_lse, sc_lse, rtol=0, atol=2e-5)
    # another offset is another stream, other tokens
    assert not torch.equal(mod.draw_fused_triton(proc, lse, seed, offset + 4 * 7, threads), want)


def test_fused_draw_refuses_buffers_it_would_write_wrongly(fused_interpret):
    """sc and sc_lse are written at flat offsets: a transposed, mis-shaped or integer buffer is refused
    with a one-line error before anything is launched, and the buffer is left as it was."""
    L, V = 4, 64
    proc, lse, _ = make(L, V, seed=3)
    threads, _ = rng.layout(L * V, 1, 256)
    bad = [dict(sc=torch.zeros(V, L, dtype=torch.bfloat16).t()),  # right shape, transposed
           dict(sc=torch.zeros(L, V + 1, dtype=torch.bfloat16)),
           dict(sc=torch.zeros(L, V, dtype=torch.int32)),
           dict(sc=torch.zeros(L, V, dtype=torch.bfloat16), sc_lse=torch.zeros(L, dtype=torch.bfloat16)),
           dict(sc=torch.zeros(L, V, dtype=torch.bfloat16), sc_lse=torch.zeros(2 * L)[::2])]
    for kwargs in bad:
        before = {k: v.clone() for k, v in kwargs.items()}
        with pytest.raises(ValueError, match="must be a contiguous") as e:
            mod.draw_fused_triton(proc, lse, 1, 0, threads, **kwargs)
        assert "\n" not in str(e.value)
        assert all(torch.equal(kwargs[k], before[k]) for k in kwargs)


def test_fused_draw_ties_and_nans_as_torch_argmax(fused_interpret):
    """Equal ratios over a whole row (proc = -inf: every ratio 0 / q = 0) give its first column;
    NaNs at several places (other segments, lanes, calls) give the first NaN, as torch.argmax.
    V = 600 over segments of 256 and N = 256: a row spans three or four segments of several calls."""
    L, V, threads, seed, offset = 5, 600, 256, 5, 0
    proc, lse, _ = make(L, V, seed=1)
    q = _q(L, V, seed, offset, threads)
    nan_at = {0: [555, 300, 20], 1: [599, 256], 2: [513, 512, 511]}
    for row, cols in nan_at.items():
        proc[row, cols] = float("nan")
    proc[3] = float("-inf")  # p = exp(-inf - lse) = 0 everywhere: every ratio 0, a tie over the row
    lse[3] = 0.0
    lse[4] = float("nan")  # every ratio NaN: column 0
    want = draw_ref(proc, lse, q)
    assert want.tolist() == [20, 256, 511, 0, 0]
    assert torch.equal(mod.draw_fused_triton(proc, lse, seed, offset, threads), want)


class FakePhilox:
    """Generators' (seed, offset) kept here, as a CUDA generator keeps them; `exponential` draws
    torch's CUDA stream from them (kernels.cuda_rng's reference) and moves the offset as torch does."""

    def __init__(self, monkeypatch, device=(1, 256)):
        self.state, self.device, self.layout = {}, device, rng.layout  # the real layout, if a test patches it
        monkeypatch.setattr(mod, "fused_device", lambda t: True)
        monkeypatch.setattr(rng, "device_threads", lambda d: device)
        monkeypatch.setattr(mod, "philox_state", lambda g, d: (g.initial_seed(), self.state.get(id(g), 0)))
        monkeypatch.setattr(mod, "set_philox_offset", lambda g, d, off: self.state.__setitem__(id(g), off))
        monkeypatch.setattr(mod, "exponential", self.exponential)
        monkeypatch.setattr(mod, "_checked", {})

    def exponential(self, proc, g):
        n = proc.numel()
        threads, step = self.layout(n, *self.device)
        seed, offset = g.initial_seed(), self.state.get(id(g), 0)
        self.state[id(g)] = offset + step
        return torch.from_numpy(rng.exponential_ref(n, seed, offset, threads, log=_log32)).view(proc.shape)


def test_sample_sc_checks_once_then_draws_in_the_kernel(monkeypatch, capsys):
    """The first call of a shape draws torch's q and checks the kernel's draws against it (one [L, V]
    tensor, once); later calls make the draws in the kernel and write sc. Tokens and the generator's
    offset are those of the unfused sampler at every call."""
    fake = FakePhilox(monkeypatch)
    checks = []
    monkeypatch.setattr(rng, "count_mismatches", lambda *a: checks.append(a) or torch.zeros((), dtype=torch.int32))
    proc, lse, _ = make(4, 700, seed=3)
    g = torch.Generator().manual_seed(11)
    g_ref = torch.Generator().manual_seed(11)
    for call in range(3):
        tokens, sc, sc_lse = mod.sample_sc(proc[None], lse[None], g, torch.bfloat16)
        want = draw_ref(proc, lse, fake.exponential(proc, g_ref))[None]
        assert torch.equal(tokens, want), call
        assert fake.state[id(g)] == fake.state[id(g_ref)]
        assert torch.equal(sc, proc[None].to(torch.bfloat16)) and sc.shape == (1, 4, 700)
        assert (sc_lse is None) == (call == 0)  # the check's step: the unfused draw, the step makes lse
    assert len(checks) == 1 and mod.check_status(proc.device, proc.numel()) is True
    assert capsys.readouterr().err == ""


def test_sample_sc_writes_into_the_given_buffers(monkeypatch):
    FakePhilox(monkeypatch)
    monkeypatch.setattr(mod, "_checked", {("cpu", 4 * 700): True})
    proc, lse, _ = make(4, 700, seed=4)
    sc, sc_lse = torch.zeros(1, 4, 700, dtype=torch.bfloat16), torch.zeros(1, 4)
    _, got_sc, got_lse = mod.sample_sc(proc[None], lse[None], torch.Generator().manual_seed(1), torch.bfloat16,
                                       sc, sc_lse)
    assert got_sc is sc and got_lse is sc_lse
    assert torch.equal(sc[0], proc.to(torch.bfloat16))
    torch.testing.assert_close(sc_lse[0], lse_rows_ref(sc[0]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("failure", ["draws", "offset"])
def test_a_failed_check_falls_back_for_good(monkeypatch, capsys, failure):
    """A check that finds other draws (or another offset step) than torch's: one line on stderr, and
    from then on torch's exponential_ and the unfused draw, with the same tokens as ever."""
    fake = FakePhilox(monkeypatch)
    if failure == "draws":
        monkeypatch.setattr(rng, "count_mismatches", lambda *a: torch.tensor(5, dtype=torch.int32))
    else:
        monkeypatch.setattr(rng, "layout", lambda n, *d: (256, 4 * 9999))  # ours would step differently from torch
        monkeypatch.setattr(rng, "count_mismatches", lambda *a: pytest.fail("checked the draws after a bad step"))
    proc, lse, _ = make(3, 500, seed=5)
    g, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for call in range(3):
        tokens, sc, sc_lse = mod.sample_sc(proc[None], lse[None], g, torch.bfloat16)
        assert sc_lse is None and torch.equal(sc, proc[None].to(torch.bfloat16))
        if failure == "draws":
            assert torch.equal(tokens, draw_ref(proc, lse, fake.exponential(proc, g_ref))[None]), call
    monkeypatch.setattr(mod, "draw_fused", lambda *a: pytest.fail("the fused draw ran after a failed check"))
    mod.sample_sc(proc[None], lse[None], g, torch.bfloat16)
    err = capsys.readouterr().err
    assert err.count("dg: the sampler's fused Exp(1) draws are not torch's") == 1
    assert ("5 of 1500 draws differ" if failure == "draws" else "advanced") in err
    assert mod.check_status(proc.device, proc.numel()) is False


def test_unfused_paths_are_unchanged(monkeypatch):
    """Off CUDA (and with DG_KERNELS=ref on CUDA): the exponential_ draw and proc.to(dtype), as before."""
    monkeypatch.delenv("DG_KERNELS", raising=False)
    monkeypatch.setattr(mod, "draw_fused", lambda *a: pytest.fail("fused off CUDA"))
    proc, lse, _ = make(3, 400, seed=6)
    tokens, sc, sc_lse = mod.sample_sc(proc[None], lse[None], torch.Generator().manual_seed(3), torch.bfloat16)
    want = multinomial(torch.exp(proc - lse[:, None]), torch.Generator().manual_seed(3))
    assert torch.equal(tokens[0], want) and torch.equal(sc[0], proc.to(torch.bfloat16)) and sc_lse is None
    monkeypatch.setenv("DG_KERNELS", "ref")
    assert not mod.fused_device(torch.empty(1, device="meta"))


def test_full_size_fused_draw_reads_proc_once_and_writes_sc(monkeypatch):
    """The step's draw at L = 256, V = 262,144 on meta, in its steady state (checked): no torch op
    moves anything; two kernels whose only vocabulary-sized arguments are proc (read) and the bf16
    self-conditioning input (written into the buffer given); partials ~3 MB. Against the unfused
    sampler on the fused head (q written by exponential_, proc and q read, then proc copied to bf16):
    0.8 GB less here (the step then skips its input copy and lse_rows: 0.4 GB more)."""
    launches = record_launches(monkeypatch)
    monkeypatch.setattr(mod, "fused_device", lambda t: True)
    monkeypatch.setattr(mod, "check_status", lambda device, n: True)
    offsets = []
    monkeypatch.setattr(mod, "philox_state", lambda g, d: (7, 40))
    monkeypatch.setattr(mod, "set_philox_offset", lambda g, d, off: offsets.append(off))
    proc = torch.empty(1, L_FULL, V_FULL, device="meta")
    lse = torch.empty(1, L_FULL, device="meta")
    sc_buf = torch.empty(1, L_FULL, V_FULL, dtype=torch.bfloat16, device="meta")
    lse_buf = torch.empty(1, L_FULL, device="meta")
    full = proc.nbytes  # 268 MB
    with Traffic() as t:
        tokens, sc, sc_lse = mod.sample_sc(proc, lse, None, torch.bfloat16, sc_buf, lse_buf)
    assert tokens.shape == (1, L_FULL) and sc is sc_buf and sc_lse is lse_buf
    assert t.ops == [] and t.bytes == 0
    assert offsets == [40 + rng.layout(L_FULL * V_FULL, *rng.ASSUMED_DEVICE)[1]]  # as exponential_ leaves it
    (draw_k, grid, args), (combine, grid2, args2) = launches
    assert draw_k is mod._fused_draw_kernel and combine is mod._fused_combine_kernel
    assert grid == (270336 // 256, 63) and grid2 == (L_FULL,)  # an H100's layout: 1056 blocks, 63 calls
    big = [a for a in args + args2 if a.numel() >= L_FULL * V_FULL // 16]  # the partials hold one value per 256
    assert [a.untyped_storage()._cdata for a in big] == [proc.untyped_storage()._cdata, sc_buf.untyped_storage()._cdata]
    kernel_bytes = sum(a.nbytes for a in args + args2)
    assert kernel_bytes - 1.5 * full < 8 * 2**20  # partials (written, then read) and lse
    after = kernel_bytes

    monkeypatch.setattr(mod, "fused_device", lambda t: False)
    with Traffic() as t:  # the unfused draw from the fused head, then the bf16 copy
        mod.sample(proc, lse, None)
        proc.to(torch.bfloat16)
    before = t.bytes + sum(a.nbytes for _, _, args in launches[2:] for a in args)
    assert before > 4.5 * full and before - after > 0.79e9  # and the step no longer copies sc nor reads it for lse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("L,V", [(256, 262144), (8, 1000)])
def test_cuda_fused_sample_is_the_unfused_sample(monkeypatch, capsys, L, V):
    """On a GPU: the first call checks the kernel's draws against torch's exponential_ (passes), the
    next ones draw in the kernel; at every call the tokens and the generator's offset are those of
    exponential_ + draw, sc is proc in bf16 and sc_lse lse_rows' up to rounding."""
    monkeypatch.setattr(mod, "_checked", {})
    monkeypatch.delenv("DG_KERNELS", raising=False)
    g = torch.Generator(device="cuda").manual_seed(5)
    g_ref = torch.Generator(device="cuda").manual_seed(5)
    proc, lse, _ = make(L, V, seed=1)
    proc, lse = proc.cuda()[None], lse.cuda()[None]
    for call in range(3):
        tokens, sc, sc_lse = mod.sample_sc(proc, lse, g, torch.bfloat16)
        q = torch.empty_like(proc).exponential_(1, generator=g_ref)
        assert torch.equal(tokens, draw(proc[0], lse[0], q[0])[None]), call
        assert g.get_offset() == g_ref.get_offset()
        assert torch.equal(sc, proc.to(torch.bfloat16))
        if call:
            torch.testing.assert_close(sc_lse, lse_rows_ref(sc[0])[None], rtol=0, atol=1e-4)
        for gen in (g, g_ref):  # the sampler's renoising draw between two samples
            torch.randint(0, 10, (3,), device="cuda", generator=gen)
    assert mod.check_status(proc.device, proc.numel()) is True and capsys.readouterr().err == ""


# ------------------------------------------------------------------- the fused draw on raw logits


def make_raw(L, V, seed=0, dtype=torch.bfloat16, softcap=30.0, temperature=0.7):
    """Raw logits in the model dtype (the fused head's raw=True output), the temperature as the
    engine passes it (a 1-element fp32 tensor), proc = process_ref of them and lse = its logsumexp."""
    from kernels.lm_head import process_ref

    logits, _, _ = make(L, V, seed, spread=6.0)
    logits = logits.to(dtype)
    temp = torch.tensor([temperature])
    lse = process_ref(logits, softcap, temp).logsumexp(-1)
    return logits, lse, (softcap, temp)


@pytest.mark.parametrize("L,V,device,dtype,softcap,temperature", [
    (3, 1000, (1, 256), torch.bfloat16, 30.0, 0.7),  # segments straddle rows (1000 % 256)
    (4, 1024, (1, 512), torch.bfloat16, None, 0.7),  # rows of whole segments; no softcap
    (3, 17, (1, 256), torch.float16, 30.0, 1.3),  # fp16 logits, segments of 16 columns, straddling
    (4, 700, (1, 256), torch.float32, 2.0, 0.5),  # fp32 logits; a softcap that bends every value
])
def test_fused_draw_on_raw_logits_is_the_draw_on_their_proc(fused_interpret, L, V, device, dtype, softcap,
                                                             temperature):
    """process=(softcap, temperature): the kernel reads the raw logits and makes proc in registers as
    kernels.lm_head's process kernel does: tokens, sc and sc_lse bit for bit those of the draw on the
    proc that kernel materializes."""
    from kernels.lm_head import process_ref, process_triton

    logits, lse, process = make_raw(L, V, seed=V, dtype=dtype, softcap=softcap, temperature=temperature)
    proc = process_triton(logits, *process)
    assert not torch.equal(proc, logits.float())  # processing matters here
    seed, offset = 2**63 + 99, 4 * 1234
    threads, _ = rng.layout(L * V, *device)
    sc, sc_lse = torch.full((L, V), 7.0, dtype=torch.bfloat16), torch.full((L,), 7.0)
    want = mod.draw_fused_triton(proc, lse, seed, offset, threads, sc, sc_lse)
    assert not torch.equal(want, proc.argmax(-1))  # a sample, not the argmax
    raw_sc, raw_lse = torch.full_like(sc, 7.0), torch.full_like(sc_lse, 7.0)
    got = mod.draw_fused_triton(logits, lse, seed, offset, threads, raw_sc, raw_lse, process)
    assert torch.equal(got, want) and torch.equal(raw_sc, sc) and torch.equal(raw_lse, sc_lse)
    assert torch.equal(mod.draw_fused_triton(logits, lse, seed, offset, threads, process=process), want)
    # the reference: process_ref's proc (CPU arithmetic, rounding-level apart), then draw_fused_ref
    ref_proc = process_ref(logits, *process)
    ref_sc, ref_lse = torch.empty_like(sc), torch.empty_like(sc_lse)
    want_ref = mod.draw_fused_ref(ref_proc, lse, seed, offset, threads, ref_sc, ref_lse)
    got_sc, got_lse = torch.empty_like(sc), torch.empty_like(sc_lse)
    assert torch.equal(mod.draw_fused_ref(logits, lse, seed, offset, threads, got_sc, got_lse, process), want_ref)
    assert torch.equal(got_sc, ref_sc) and torch.equal(got_lse, ref_lse)
    torch.testing.assert_close(ref_lse, sc_lse, rtol=0, atol=2e-5)


def test_fused_draw_on_raw_logits_validates(fused_interpret):
    logits, lse, process = make_raw(2, 64)
    threads, _ = rng.layout(2 * 64, 1, 256)
    with pytest.raises(ValueError, match="proc must be fp32"):
        mod.draw_fused_triton(logits, lse, 1, 0, threads)  # bf16 without process: not proc
    with pytest.raises(ValueError, match="raw logits must be"):
        mod.draw_fused_triton(logits.to(torch.int32), lse, 1, 0, threads, process=process)
    with pytest.raises(ValueError, match="sc_lse comes with sc"):
        mod.draw_fused_triton(logits, lse, 1, 0, threads, None, torch.empty(2), process)


def _sample_both(fake, monkeypatch, logits, lse, process, seed, calls):
    """sample_sc on raw logits with `process` and on process(logits), each from a fresh check, each
    with its own generator: per call ((tokens, sc, sc_lse) raw, the same materialized), the offsets."""
    from kernels.lm_head import process as make_proc

    runs = []
    for raw in (True, False):
        monkeypatch.setattr(mod, "_checked", {})
        fake.state.clear()  # a new generator may take a freed one's id
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(calls):
            if raw:
                out.append(mod.sample_sc(logits[None], lse[None], g, torch.bfloat16, process=process))
            else:
                out.append(mod.sample_sc(make_proc(logits, *process)[None], lse[None], g, torch.bfloat16))
            out[-1] = (*out[-1], fake.state.get(id(g), 0))
        runs.append(out)
    return list(zip(*runs))


def test_sample_sc_on_raw_logits_is_sample_sc_on_their_proc(fused_interpret, monkeypatch):
    """sample_sc(logits, process=...) under the interpreter (the fused kernel, process_triton): at the
    check's step and after it, the tokens, generator offsets, sc and sc_lse of sample_sc(process(logits))."""
    from kernels.lm_head import process

    monkeypatch.setenv("DG_KERNELS", "triton")
    fake = FakePhilox(monkeypatch)
    monkeypatch.setattr(rng, "count_mismatches", lambda *a: torch.zeros((), dtype=torch.int32))
    logits, lse, proc_args = make_raw(4, 300, seed=3, temperature=0.8)
    sc_want = process(logits, *proc_args).to(torch.bfloat16)[None]
    steps = _sample_both(fake, monkeypatch, logits, lse, proc_args, 4, 2)
    for call, (raw, want) in enumerate(steps):
        assert torch.equal(raw[0], want[0]) and raw[3] == want[3] > 0, call
        assert torch.equal(raw[1], sc_want) and torch.equal(want[1], sc_want)
        assert (raw[2] is None) == (want[2] is None) == (call == 0)
    assert torch.equal(steps[1][0][2], steps[1][1][2])  # sc_lse
    assert not torch.equal(steps[0][0][0], steps[1][0][0])  # the two steps drew differently


@pytest.mark.parametrize("failure", ["draws", "unavailable"])
def test_raw_fallbacks_draw_from_the_materialized_proc(monkeypatch, capsys, failure):
    """Raw logits, and the fused draw off (a failed check; the draw kernel unavailable after a passed
    one): the unfused draw on kernels.lm_head.process(logits), the same tokens and offsets as the
    sampler on that proc, and sc = that proc in the model dtype."""
    from kernels._dispatch import KernelUnavailable
    from kernels.lm_head import process

    fake = FakePhilox(monkeypatch)
    ok = failure != "draws"
    monkeypatch.setattr(rng, "count_mismatches", lambda *a: torch.tensor(0 if ok else 5, dtype=torch.int32))
    if failure == "unavailable":
        def unavailable(*a):
            raise KernelUnavailable("_fused_draw_kernel is unavailable on cpu")
        monkeypatch.setattr(mod, "draw_fused", unavailable)
    logits, lse, proc_args = make_raw(3, 500, seed=5, temperature=1.5)
    proc = process(logits, *proc_args)
    g, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for call in range(3):
        tokens, sc, sc_lse = mod.sample_sc(logits[None], lse[None], g, torch.bfloat16, process=proc_args)
        assert torch.equal(tokens, draw_ref(proc, lse, fake.exponential(proc, g_ref))[None]), call
        assert fake.state[id(g)] == fake.state[id(g_ref)]
        assert sc_lse is None and torch.equal(sc, proc[None].to(torch.bfloat16))
    assert mod.check_status(proc.device, proc.numel()) is False
    assert ("5 of 1500 draws differ" in capsys.readouterr().err) == (failure == "draws")


def test_raw_logits_off_the_fused_path(monkeypatch):
    """On the CPU (and DG_KERNELS=ref): the unfused draw on process_ref's proc and sc = proc.to(dtype)."""
    from kernels.lm_head import process_ref

    monkeypatch.delenv("DG_KERNELS", raising=False)
    monkeypatch.setattr(mod, "draw_fused", lambda *a: pytest.fail("fused off CUDA"))
    logits, lse, proc_args = make_raw(3, 400, seed=6)
    proc = process_ref(logits, *proc_args)
    want = multinomial(torch.exp(proc - lse[:, None]), torch.Generator().manual_seed(3))
    tokens, sc, sc_lse = mod.sample_sc(logits[None], lse[None], torch.Generator().manual_seed(3), torch.bfloat16,
                                       process=proc_args)
    assert torch.equal(tokens[0], want) and torch.equal(sc[0], proc.to(torch.bfloat16)) and sc_lse is None


def test_full_size_fused_draw_on_raw_logits_reads_them_once(monkeypatch):
    """The step's draw on the raw head's bf16 logits, sc and sc_lse into the graph's buffers (as
    StepOut.sample_sc): one draw kernel whose vocabulary-sized arguments are the logits (134 MB read)
    and sc (134 MB written), where the fp32-proc draw read 268 MB of proc (and the head wrote 268 MB
    of proc, not 134 MB of logits)."""
    launches = record_launches(monkeypatch)
    monkeypatch.setattr(mod, "fused_device", lambda t: True)
    monkeypatch.setattr(mod, "check_status", lambda device, n: True)
    monkeypatch.setattr(mod, "philox_state", lambda g, d: (7, 40))
    monkeypatch.setattr(mod, "set_philox_offset", lambda g, d, off: None)
    logits = torch.empty(1, L_FULL, V_FULL, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(1, L_FULL, device="meta")
    temp = torch.empty(1, device="meta")
    sc_buf, lse_buf = torch.empty_like(logits), torch.empty(1, L_FULL, device="meta")
    with Traffic() as t:
        tokens, sc, sc_lse = mod.sample_sc(logits, lse, None, torch.bfloat16, sc_buf, lse_buf, (30.0, temp))
    assert tokens.shape == (1, L_FULL) and sc is sc_buf and sc_lse is lse_buf and t.ops == []
    (draw_k, _, args), (combine, _, args2) = launches
    assert draw_k is mod._fused_draw_kernel and combine is mod._fused_combine_kernel
    big = [a for a in args + args2 if a.numel() >= L_FULL * V_FULL // 16]
    assert [a.untyped_storage()._cdata for a in big] == [x.untyped_storage()._cdata for x in (logits, sc_buf)]
    # the temperature read on the device (no host sync)
    assert any(a.untyped_storage()._cdata == temp.untyped_storage()._cdata for a in args)
    kernel_bytes = sum(a.nbytes for a in args + args2)
    assert kernel_bytes - logits.nbytes - sc_buf.nbytes < 8 * 2**20  # partials (written, then read) and lse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("L,V", [(256, 262144), (8, 1000)])
def test_cuda_fused_sample_on_raw_logits_is_the_sample_on_their_proc(monkeypatch, capsys, L, V):
    """On a GPU: sample_sc on bf16 logits with process=(30, temperature) (the engine's), against
    sample_sc on lm_head.process(logits) from the same generator state: the same tokens, offsets and
    sc at every call (the check's included), and the same sc_lse bit for bit once fused."""
    from kernels.lm_head import process

    monkeypatch.delenv("DG_KERNELS", raising=False)
    logits, lse, (cap, temp) = make_raw(L, V, seed=1, temperature=0.8)
    logits, lse, args = logits.cuda()[None], lse.cuda()[None], (cap, temp.cuda())
    proc = process(logits, *args)
    runs = []
    for raw in (True, False):
        monkeypatch.setattr(mod, "_checked", {})
        g = torch.Generator(device="cuda").manual_seed(5)
        out = []
        for _ in range(3):
            if raw:
                tokens, sc, sc_lse = mod.sample_sc(logits, lse, g, torch.bfloat16, process=args)
            else:
                tokens, sc, sc_lse = mod.sample_sc(proc, lse, g, torch.bfloat16)
            out.append((tokens, sc, sc_lse, g.get_offset()))
            torch.randint(0, 10, (3,), device="cuda", generator=g)  # the renoising draw between samples
        runs.append(out)
    for call, (raw, want) in enumerate(zip(*runs)):
        assert torch.equal(raw[0], want[0]) and raw[3] == want[3], call
        assert torch.equal(raw[1], proc.to(torch.bfloat16)) and torch.equal(raw[1], want[1]), call
        assert (raw[2] is None) == (want[2] is None) == (call == 0), call
        if call:
            assert torch.equal(raw[2], want[2]), call
    assert capsys.readouterr().err == ""
