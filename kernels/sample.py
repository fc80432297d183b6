"""The sampler's draw from the fused head's outputs, in one pass over the vocabulary.

A denoising step samples one token per canvas position as `torch.multinomial(probs, 1)` does for
one sample: q ~ Exp(1) from the generator, then argmax(probs / q) per row. With the fused LM head's
outputs (proc [L, V] fp32 and lse [L]) probs = exp(proc - lse), so the unfused draw writes probs,
reads it, writes q, reads probs and q, writes the ratio and reads it again: ~2 GB at L = 256,
V = 262,144 (268 MB per [L, V] fp32 tensor).

- `draw(proc [L, V], lse [L], q [L, V]) -> [L] int64` = argmax_v(exp(proc - lse) / q);
  `draw_ref` is that expression in PyTorch, `draw_triton` the kernel; `draw` dispatches (Triton on
  CUDA; `DG_KERNELS` overrides): proc and q read once, nothing vocabulary-sized written.
- `draw_fused(proc, lse, seed, offset, threads, sc, sc_lse)`: the same draw with q never written:
  each program makes the Exp(1) draws of torch's CUDA `exponential_` at that generator state in
  registers (kernels.cuda_rng), and also writes proc in the model dtype into `sc` (the next step's
  self-conditioning input) and that input's per-row logsumexp (`sc_lse`, so the soft embedding need
  not read it for that). proc is read once, sc written once: 0.40 GB where q, the draw and the bf16
  copy moved 1.21 GB. `draw_fused_ref` is its PyTorch/numpy reference.
  `process=(softcap, temperature)`: the input is the raw logits in the model dtype (kernels.lm_head
  raw=True) and the kernel makes proc in registers with lm_head's `process_logits`, the head's own
  arithmetic (the floats `lm_head.process` would write).
- `sample_sc(proc [..., V], lse [...], g, dtype, sc=None, sc_lse=None) -> (tokens, sc, sc_lse)`: the
  fused draw on CUDA, else q drawn from g as `dgcli.engine.multinomial` draws it, `draw`, and
  sc = proc.to(dtype). The same tokens as `multinomial(exp(proc - lse), g)` and the same generator
  state after: the fused path moves g's philox offset as exponential_ would (`g.get_offset()`,
  `g.set_offset()`, host numbers: no sync). The first call per (device, shape) checks the claim: it
  draws torch's q (one [L, V] fp32 tensor, once), compares it bit for bit with kernels.cuda_rng's
  draws and the offset step with torch's (one host read, once), and takes its tokens from that q; a
  mismatch turns the fused draw off for that device and shape for good, with one stderr line.
  `sample(proc, lse, g)` is its tokens.
- `sample_sc(logits, lse, g, dtype, sc, sc_lse, process=(softcap, temperature))`, the engine's
  (StepOut.sample_sc): everything as `sample_sc(lm_head.process(logits, ...), ...)` would give, but
  the fused draw reads the bf16 logits (134 MB at L = 256, V = 262,144) where it read 268 MB of fp32
  proc, and the head writes 134 MB of logits, not 268 MB of proc: 0.27 GB less a step (sc, 134 MB,
  is written as before). The unfused paths (the check's step, fallbacks, the CPU) make proc with
  `lm_head.process` (once, or after a failure) and return their usual sc = proc.to(dtype).

The kernels: `draw_triton`'s (chunk, row) programs reduce a V-range to (max ratio, first index), a
second tiny kernel combines each row's chunks. The fused draw's program (b, k) is torch's threads
[256 b, 256 b + 256) at their call k: their four draws each go to four segments of 256 consecutive
elements of the flat [L, V] (torch's grid-stride order), each reduced per row it covers to (max ratio,
first column) and sum(exp(sc - lse)); a second kernel combines each row's segments in column order.
Ties go to the lowest index, as torch.argmax returns the first maximum.

What is exact. On CUDA the ratio is the same float as PyTorch's: proc - lse is one fp32 subtraction,
exp is libdevice's `__nv_expf` (the CUDA math library's expf, which PyTorch's exp kernel compiles to
as `std::exp`; compiled here without FTZ, as PyTorch is: `tl.exp` would be the approximate
`ex2.approx` on a scaled argument), and the division is correctly rounded (`div_rn`, as CUDA's `/`
without fast math; Triton's default `/` is `div.full`, approximate). So the token is torch's, bit for
bit, as far as this can be shown without a GPU: the PTX is the one described; no GPU ran it here
(the fused draw's Exp(1) draws are checked against torch's at run time, see above).
Under the interpreter (CPU tensors) exp is numpy's float32 exp, which differs from torch's CPU exp
by up to 2 units in the last place: the tests give the interpreter torch's exp to check the rest bit
for bit. On the CPU `draw` takes `draw_ref`, torch's own arithmetic. sc_lse differs from
kernels.int8_soft.lse_rows at rounding level (another order of the sum, lse as the shift).
On raw logits the kernel's proc is lm_head's process kernel's, float for float: the same
`process_logits` (tl.exp and Triton's `/`, which the launch's non-FTZ libdevice setting does not
touch) on the same fp32 widening of the logits; the tests check tokens, sc and sc_lse bit for bit
against the draw on `process_triton`'s proc under the interpreter.

NaN: as torch.argmax, a NaN ratio counts as the maximum, and the first NaN of a row wins (a NaN in
proc or lse, or 0 / 0 where q is 0). The sampler checks finiteness separately.
"""

from __future__ import annotations

import torch

from . import cuda_rng
from ._dispatch import HAS_TRITON, KernelUnavailable, interpreting, launch, pick, use_triton
from ._tuning import AotSpec
from .lm_head import _temperature

BLOCK = 2048  # columns per loop iteration: 8 fp32 of proc and 8 of q per thread at 8 warps
WARPS = 8
MAX_SPLITS = 16  # V-chunks per row: 4096 programs at L = 256, 64 KB of proc and of q each at V = 262,144
FUSED_WARPS = 1  # the fused draw: a warp per program, 8 neighbouring elements of each segment per lane
# (~90 SASS instructions an element at sm_90, the Philox rounds included; 2 warps: ~120, the segment
# reductions crossing warps)


def _check(proc, lse, q):
    if proc.dim() != 2 or q.shape != proc.shape or lse.shape != proc.shape[:1]:
        raise ValueError(f"proc {tuple(proc.shape)}, lse {tuple(lse.shape)}, q {tuple(q.shape)}: want [L, V], [L], [L, V]")
    if proc.dtype != torch.float32 or lse.dtype != torch.float32 or q.dtype != torch.float32:
        raise ValueError(f"proc, lse and q must be fp32, got {proc.dtype}, {lse.dtype}, {q.dtype}")


# --------------------------------------------------------------------------------------------------
# Reference


def draw_ref(proc: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """argmax(exp(proc - lse) / q) per row, PyTorch's arithmetic (what dgcli.engine.multinomial does)."""
    _check(proc, lse, q)
    return torch.div(torch.exp(proc - lse[:, None]), q).argmax(-1)


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from .lm_head import process_logits

    @triton.jit
    def _first_max(v1, i1, v2, i2):
        """The (value, index) torch.argmax keeps of two: NaN above all, then the larger, then the
        lower index among equals (and among NaNs)."""
        nan1 = v1 != v1
        nan2 = v2 != v2
        take1 = (v1 > v2) | (nan1 & ~nan2) | (((v1 == v2) | (nan1 & nan2)) & (i1 < i2))
        return tl.where(take1, v1, v2), tl.where(take1, i1, i2)

    @triton.jit
    def _draw_chunks_kernel(proc_ptr, lse_ptr, q_ptr, val_ptr, idx_ptr, V, span, splits, stride_proc, stride_q,
                            EVEN: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
        """(val, idx)[row, split] = the first maximum of exp(proc - lse) / q over the row's columns
        [split · span, min(V, (split + 1) · span)), span a multiple of BLOCK."""
        split = tl.program_id(0)
        row = tl.program_id(1)
        start = split * span
        end = tl.minimum(start + span, V)
        lse = tl.load(lse_ptr + row)
        offs = tl.arange(0, BLOCK)
        p_ptrs = proc_ptr + row.to(tl.int64) * stride_proc + start + offs
        q_ptrs = q_ptr + row.to(tl.int64) * stride_q + start + offs
        # Each lane's first maximum over its columns (start + offs + k · BLOCK, increasing): a strictly
        # larger value, or a first NaN, replaces it. A lane holding only -inf keeps its first column.
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_i = start + offs
        for v0 in range(start, end, BLOCK):
            cols = v0 + offs
            if EVEN:
                x = tl.load(p_ptrs)
                q = tl.load(q_ptrs)
            else:
                ok = cols < end
                x = tl.load(p_ptrs, mask=ok, other=0.0)
                q = tl.load(q_ptrs, mask=ok, other=1.0)
            if LIBDEVICE:
                p = libdevice.exp(x - lse)  # CUDA's expf, as torch.exp
            else:
                p = tl.exp(x - lse)  # the interpreter has no libdevice
            r = tl.math.div_rn(p, q)
            if not EVEN:
                r = tl.where(ok, r, float("-inf"))
            take = (r > best) | ((r != r) & (best == best))
            best = tl.where(take, r, best)
            best_i = tl.where(take, cols, best_i)
            p_ptrs += BLOCK
            q_ptrs += BLOCK
        v, i = tl.reduce((best, best_i), 0, _first_max)
        tl.store(val_ptr + row * splits + split, v)
        tl.store(idx_ptr + row * splits + split, i)

    @triton.jit
    def _draw_combine_kernel(val_ptr, idx_ptr, out_ptr, splits, BLOCK_S: tl.constexpr):
        """out[row] = the index of the first maximum over the row's chunks (chunk order = column order)."""
        row = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        ok = s < splits
        v = tl.load(val_ptr + row * splits + s, mask=ok, other=float("-inf"))
        i = tl.load(idx_ptr + row * splits + s, mask=ok, other=2147483647)  # loses every tie
        _, best = tl.reduce((v, i), 0, _first_max)
        tl.store(out_ptr + row, best.to(tl.int64))

    @triton.jit
    def _fused_segment(proc_ptr, lse_ptr, sc_ptr, val_ptr, idx_ptr, sum_ptr, e, seg, t, n, L, V, n_seg, softcap, temp,
                       WRITE_SC: tl.constexpr, SC_LSE: tl.constexpr, STRADDLE: tl.constexpr,
                       LIBDEVICE: tl.constexpr, RAW: tl.constexpr, HAS_CAP: tl.constexpr, S: tl.constexpr):
        """One segment: the flat elements [seg · S, seg · S + S) of proc with their draws e ([S]):
        (first max ratio, its column) per row it covers (slot 0: its first row; slot 1: the next,
        STRADDLE only), written at val/idx[slot · n_seg + seg]; proc in sc's dtype to sc (WRITE_SC); and
        sum(exp(sc - lse)) per row at sum[slot · n_seg + seg] (SC_LSE, with WRITE_SC).
        RAW: proc_ptr holds the raw logits; proc = process_logits of them, the head's arithmetic."""
        base = seg.to(tl.int64) * S
        if base < n:
            li = base + t
            ok = li < n
            row0 = base // V
            col = (base - row0 * V).to(tl.int32) + t  # < V + S: at most the next row (S <= V)
            x = tl.load(proc_ptr + li, mask=ok, other=0.0)
            if RAW:  # as kernels.lm_head's process kernel makes proc: the same floats
                x = process_logits(x.to(tl.float32), softcap, temp, HAS_CAP)
            lse0 = tl.load(lse_ptr + row0)
            if STRADDLE:
                second = col >= V
                lse1 = tl.load(lse_ptr + row0 + 1, mask=row0 + 1 < L, other=0.0)
                lse = tl.where(second, lse1, lse0)
                col = tl.where(second, col - V, col)
            else:
                lse = lse0
            if LIBDEVICE:
                p = libdevice.exp(x - lse)  # CUDA's expf, as torch.exp
            else:
                p = tl.exp(x - lse)
            r = tl.where(ok, tl.math.div_rn(p, e), float("-inf"))
            if WRITE_SC:
                tl.store(sc_ptr + li, x.to(sc_ptr.dtype.element_ty), mask=ok)
            if SC_LSE:
                ex = tl.where(ok, tl.exp(x.to(sc_ptr.dtype.element_ty).to(tl.float32) - lse), 0.0)
            big = 2147483647  # loses every tie
            if STRADDLE:
                v, i = tl.reduce((tl.where(second, float("-inf"), r), tl.where(second, big, col)), 0, _first_max)
                v1, i1 = tl.reduce((tl.where(second, r, float("-inf")), tl.where(second, col, big)), 0, _first_max)
                tl.store(val_ptr + n_seg + seg, v1)
                tl.store(idx_ptr + n_seg + seg, i1)
                if SC_LSE:
                    tl.store(sum_ptr + seg, tl.sum(tl.where(second, 0.0, ex), 0))
                    tl.store(sum_ptr + n_seg + seg, tl.sum(tl.where(second, ex, 0.0), 0))
            else:
                v, i = tl.reduce((r, col), 0, _first_max)
                if SC_LSE:
                    tl.store(sum_ptr + seg, tl.sum(ex, 0))
            tl.store(val_ptr + seg, v)
            tl.store(idx_ptr + seg, i)

    @triton.jit(do_not_specialize=["key0", "key1", "base_lo", "base_hi"])
    def _fused_draw_kernel(proc_ptr, lse_ptr, sc_ptr, val_ptr, idx_ptr, sum_ptr, temp_ptr, n, L, V, N, n_seg,
                           key0, key1, base_lo, base_hi, softcap, WRITE_SC: tl.constexpr, SC_LSE: tl.constexpr,
                           STRADDLE: tl.constexpr, LIBDEVICE: tl.constexpr, RAW: tl.constexpr,
                           HAS_CAP: tl.constexpr, S: tl.constexpr):
        """Program (b, k): torch's exponential_ threads [b·S, (b+1)·S) at their call k (kernels.cuda_rng)
        make four draws each, for the flat elements 4 N k + N ii + idx: four segments of S elements
        (segment number (4k + ii) · N / S + b, S dividing N). RAW: proc_ptr holds the raw logits,
        processed with softcap (HAS_CAP) and the temperature at temp_ptr."""
        b = tl.program_id(0)
        k = tl.program_id(1)
        t = tl.arange(0, S)
        if RAW:
            temp = tl.load(temp_ptr)
        else:
            temp = 1.0
        lo, hi = cuda_rng.counter(base_lo, base_hi, k)
        e0, e1, e2, e3 = cuda_rng.exp_draws(key0, key1, lo, hi, (b * S + t).to(tl.uint32), LIBDEVICE)
        per = N // S
        seg = 4 * k * per + b
        _fused_segment(proc_ptr, lse_ptr, sc_ptr, val_ptr, idx_ptr, sum_ptr, e0, seg, t, n, L, V, n_seg,
                       softcap, temp, WRITE_SC, SC_LSE, STRADDLE, LIBDEVICE, RAW, HAS_CAP, S)
        _fused_segment(proc_ptr, lse_ptr, sc_ptr, val_ptr, idx_ptr, sum_ptr, e1, seg + per, t, n, L, V, n_seg,
                       softcap, temp, WRITE_SC, SC_LSE, STRADDLE, LIBDEVICE, RAW, HAS_CAP, S)
        _fused_segment(proc_ptr, lse_ptr, sc_ptr, val_ptr, idx_ptr, sum_ptr, e2, seg + 2 * per, t, n, L, V, n_seg,
                       softcap, temp, WRITE_SC, SC_LSE, STRADDLE, LIBDEVICE, RAW, HAS_CAP, S)
        _fused_segment(proc_ptr, lse_ptr, sc_ptr, val_ptr, idx_ptr, sum_ptr, e3, seg + 3 * per, t, n, L, V, n_seg,
                       softcap, temp, WRITE_SC, SC_LSE, STRADDLE, LIBDEVICE, RAW, HAS_CAP, S)

    @triton.jit
    def _fused_combine_kernel(val_ptr, idx_ptr, sum_ptr, lse_ptr, out_ptr, sc_lse_ptr, V, n_seg,
                              SC_LSE: tl.constexpr, STRADDLE: tl.constexpr, S: tl.constexpr,
                              BLOCK_C: tl.constexpr):
        """Row r: the first maximum over the segments covering it (in column order), its slot in
        each; SC_LSE: sc_lse[r] = lse[r] + log(the sum of its segments' sums)."""
        row = tl.program_id(0)
        start = row.to(tl.int64) * V
        s_lo = start // S
        s_hi = (start + V - 1) // S
        offs = tl.arange(0, BLOCK_C)
        best = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        best_i = tl.full((BLOCK_C,), 2147483647, tl.int32)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for s0 in range(s_lo, s_hi + 1, BLOCK_C):
            s = s0 + offs
            ok = s <= s_hi
            if STRADDLE:
                where = tl.where((s * S) // V == row, s, s + n_seg)  # slot 1: the segment began a row earlier
            else:
                where = s
            v = tl.load(val_ptr + where, mask=ok, other=float("-inf"))
            i = tl.load(idx_ptr + where, mask=ok, other=2147483647)
            take = (v > best) | ((v != v) & (best == best))  # a lane's segments come in column order
            best = tl.where(take, v, best)
            best_i = tl.where(take, i, best_i)
            if SC_LSE:
                acc += tl.load(sum_ptr + where, mask=ok, other=0.0)
        _, token = tl.reduce((best, best_i), 0, _first_max)
        tl.store(out_ptr + row, token.to(tl.int64))
        if SC_LSE:
            tl.store(sc_lse_ptr + row, tl.load(lse_ptr + row) + tl.log(tl.sum(acc, 0)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(V: int, block: int = BLOCK, splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(span, chunks): the V-range of a program, a multiple of block, and how many cover V (none empty)."""
    v_blocks = max(1, _cdiv(V, block))
    span = _cdiv(v_blocks, min(splits, v_blocks)) * block
    return span, _cdiv(V, span)


def _libdevice() -> bool:
    return not interpreting()  # compiled kernels only: the interpreter cannot call libdevice


def draw_triton(proc, lse, q, block: int = BLOCK, splits: int = MAX_SPLITS, warps: int = WARPS) -> torch.Tensor:
    """The Triton path (two launches, [L, chunks] partials); `block`, `splits`: the tiling (tests)."""
    _check(proc, lse, q)
    L, V = proc.shape
    out = torch.empty(L, dtype=torch.int64, device=proc.device)
    if L == 0:
        return out
    if V == 0:
        raise ValueError("an empty vocabulary has no argmax")
    proc = proc if proc.stride(-1) == 1 else proc.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    lse = lse.contiguous()
    span, n = plan(V, block, splits)
    val = torch.empty(L, n, dtype=torch.float32, device=proc.device)
    idx = torch.empty(L, n, dtype=torch.int32, device=proc.device)
    exact = _libdevice()
    options = dict(enable_reflect_ftz=False) if exact else {}  # libdevice's non-FTZ expf, as CUDA's expf
    launch(_draw_chunks_kernel, proc.device, (n, L), proc, lse, q, val, idx, V, span, n, proc.stride(0),
           q.stride(0), EVEN=V % block == 0, LIBDEVICE=exact, BLOCK=block, num_warps=warps, num_stages=1, **options)
    launch(_draw_combine_kernel, proc.device, (L,), val, idx, out, n, BLOCK_S=max(16, 1 << (n - 1).bit_length()),
           num_warps=1)
    return out


# --------------------------------------------------------------------------------------------------
# The fused draw: torch's Exp(1) draws made in the kernel (kernels.cuda_rng), proc read once


def segment_size(V: int) -> int | None:
    """Elements per segment of the fused draw: cuda_rng.SPAN, or for a shorter row the largest power
    of two <= V (it still divides N = 256 · grid); None below 16 columns (the unfused draw)."""
    if V < 16:
        return None
    return min(cuda_rng.SPAN, 1 << (V.bit_length() - 1))


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)  # raw logits' and sc's dtypes


def _processed(proc, process) -> torch.Tensor:
    """fp32 proc: proc itself, or (process given) made from the raw logits by kernels.lm_head.process,
    as the head on the same path would have written it."""
    if process is None:
        return proc
    from .lm_head import process as make_proc

    return make_proc(proc, *process)


def _check_fused(proc, lse, process):
    if proc.dim() != 2 or lse.shape != proc.shape[:1]:
        raise ValueError(f"proc {tuple(proc.shape)}, lse {tuple(lse.shape)}: want [L, V], [L]")
    if lse.dtype != torch.float32 or proc.dtype not in ((torch.float32,) if process is None else _FLOATS):
        what = "raw logits must be bf16, fp16 or fp32" if process is not None else "proc must be fp32"
        raise ValueError(f"{what}, lse fp32: got {proc.dtype}, {lse.dtype}")


def draw_fused_ref(proc, lse, seed: int, offset: int, threads: int, sc=None, sc_lse=None,
                   process=None) -> torch.Tensor:
    """What `draw_fused_triton` computes, in PyTorch and numpy: proc (made from raw logits by
    kernels.lm_head.process_ref when `process` is given), q from kernels.cuda_rng.exponential_ref (its
    log numpy's, not the device's __logf), `draw_ref`, then sc = proc in sc's dtype and
    sc_lse = lse + log(sum(exp(proc in that dtype - lse))) per row."""
    _check_fused(proc, lse, process)
    if process is not None:
        from .lm_head import process_ref

        proc = process_ref(proc, *process)
    L, V = proc.shape
    q = torch.from_numpy(cuda_rng.exponential_ref(proc.numel(), seed, offset, threads)).view(L, V).to(proc.device)
    tokens = draw_ref(proc, lse, q)
    if sc is not None:
        sc.copy_(proc)
    if sc_lse is not None:
        rounded = proc.to(sc.dtype).float()
        sc_lse.copy_(lse + torch.exp(rounded - lse[:, None]).sum(-1).log())
    return tokens


def draw_fused(proc, lse, seed: int, offset: int, threads: int, sc=None, sc_lse=None,
               process=None) -> torch.Tensor:
    """The fused draw (see `draw_fused_triton`): Triton on CUDA, else its reference."""
    return (draw_fused_triton if use_triton(proc) else draw_fused_ref)(proc, lse, seed, offset, threads, sc, sc_lse,
                                                                       process)


def draw_fused_triton(proc, lse, seed: int, offset: int, threads: int, sc=None, sc_lse=None,
                      process=None) -> torch.Tensor:
    """`draw(proc [L, V], lse [L], q)` for q = torch's CUDA exponential_(1) on an [L, V] tensor at
    generator (seed, offset) on a device whose launch has `threads` threads (kernels.cuda_rng.layout),
    the draws made in registers: proc read once, nothing vocabulary-sized written but sc. `sc`
    ([L, V], the model dtype): proc rounded to it is written there (the next step's self-conditioning
    input); `sc_lse` ([L] fp32, with sc): that input's logsumexp, lse + log(sum(exp(sc - lse))).
    `process` = (softcap or None, temperature: a 1-element fp32 tensor on the device): proc holds the
    raw logits (bf16, fp16 or fp32), made into proc in registers as kernels.lm_head.process_triton
    makes it, float for float."""
    _check_fused(proc, lse, process)
    L, V = proc.shape
    S = segment_size(V)
    if S is None or threads % S or proc.stride(1) != 1 or proc.stride(0) != V or L == 0:
        raise ValueError(f"the fused draw needs a contiguous [L, V] proc with V >= 16, got {tuple(proc.shape)}")
    if sc_lse is not None and sc is None:
        raise ValueError("sc_lse comes with sc")
    # The kernel writes sc and sc_lse at flat offsets: a strided or mis-shaped buffer would be overwritten wrongly.
    if sc is not None and (sc.shape != proc.shape or not sc.is_contiguous() or sc.dtype not in _FLOATS):
        raise ValueError(f"sc must be a contiguous float [L, V] buffer like proc, got {tuple(sc.shape)} {sc.dtype}")
    if sc_lse is not None and (sc_lse.shape != (L,) or not sc_lse.is_contiguous() or sc_lse.dtype != torch.float32):
        raise ValueError(f"sc_lse must be a contiguous fp32 [{L}] buffer, got {tuple(sc_lse.shape)} {sc_lse.dtype}")
    n = proc.numel()
    device = proc.device
    programs, calls = cuda_rng.grid(n, threads, S)
    n_seg = programs * calls * 4
    straddle = V % S != 0
    slots = 2 if straddle else 1
    val = torch.empty(slots * n_seg, dtype=torch.float32, device=device)
    idx = torch.empty(slots * n_seg, dtype=torch.int32, device=device)
    sums = torch.empty(slots * n_seg if sc_lse is not None else 1, dtype=torch.float32, device=device)
    out = torch.empty(L, dtype=torch.int64, device=device)
    key0, key1 = cuda_rng.i32_halves(seed)
    base_lo, base_hi = cuda_rng.i32_halves(offset // 4)
    exact = _libdevice()
    options = dict(enable_reflect_ftz=False) if exact else {}
    sc_arg = sc if sc is not None else lse  # unused without WRITE_SC
    lse = lse.contiguous()
    # the temperature as process_triton passes it (a tensor on the device stays: no copy); lse: unused without RAW
    softcap, temp = (process[0], _temperature(process[1], device)) if process is not None else (None, lse)
    launch(_fused_draw_kernel, device, (programs, calls), proc, lse, sc_arg, val, idx, sums, temp, n, L, V, threads,
           n_seg, key0, key1, base_lo, base_hi, float(softcap or 1.0), WRITE_SC=sc is not None,
           SC_LSE=sc_lse is not None, STRADDLE=straddle, LIBDEVICE=exact, RAW=process is not None,
           HAS_CAP=bool(softcap), S=S, num_warps=FUSED_WARPS, num_stages=1, **options)
    per_row = -(-V // S) + straddle  # segments covering a row
    launch(_fused_combine_kernel, device, (L,), val, idx, sums, lse, out, sc_lse if sc_lse is not None else lse, V,
           n_seg, SC_LSE=sc_lse is not None, STRADDLE=straddle, S=S,
           BLOCK_C=min(1024, max(16, 1 << (per_row - 1).bit_length())), num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# Dispatchers


def draw(proc: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """argmax(exp(proc [L, V] - lse [L]) / q [L, V]) per row -> [L] int64; Triton on CUDA, else the reference."""
    return pick(draw_triton, draw_ref, proc)(proc, lse, q)


def exponential(proc: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """q ~ Exp(1) shaped as proc, drawn from g as `dgcli.engine.multinomial` draws it."""
    return torch.empty_like(proc, memory_format=torch.contiguous_format).exponential_(1, generator=g)


def _generator(g, device):
    if g is not None:
        return g
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def philox_state(g, device) -> tuple[int, int]:
    """(seed, philox offset) of g (None: the device's default generator), read on the host: no sync."""
    g = _generator(g, device)
    return g.initial_seed(), g.get_offset()


def set_philox_offset(g, device, offset: int) -> None:
    _generator(g, device).set_offset(offset)


def fused_device(t: torch.Tensor) -> bool:
    """Whether the fused draw may serve t: a CUDA tensor (its generator torch's CUDA Philox, the
    stream kernels.cuda_rng reproduces) on the Triton path (DG_KERNELS=ref keeps the unfused draw)."""
    return t.is_cuda and use_triton(t)


_checked: dict = {}  # (device, numel) -> True: the fused draws were torch's; False: they were not


def check_status(device: torch.device, n: int) -> bool | None:
    """Whether the fused draw may run for n elements on device: None before its check has run."""
    return _checked.get((str(device), n))


def _fusable(proc, lse, raw: bool = False) -> bool:
    """Whether the fused draw can serve (proc, lse): on its device, fp32 (raw logits: bf16, fp16 or
    fp32), contiguous, 32-bit indexable (as exponential_ is then one launch), at least 16 columns, not
    under graph capture (the generator's offset is read on the host)."""
    V = proc.shape[-1] if proc.dim() else 0
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return (fused_device(proc) and proc.dtype in (_FLOATS if raw else (torch.float32,))
            and segment_size(V) is not None and 0 < proc.numel() < 2**31 and proc.is_contiguous()
            and lse.shape == proc.shape[:-1] and not capturing)


def _self_check(proc, lse, g, threads: int) -> torch.Tensor:
    """The first fused draw of a (device, shape), on fp32 proc: q drawn by torch (one [L, V] fp32
    tensor, once) and compared bit for bit with kernels.cuda_rng's draws, and torch's offset step with
    ours; the tokens come from torch's q (the unfused draw), so this step is exact either way. A
    mismatch turns the fused draw off for the device and shape for good, with one line on stderr."""
    import sys

    n = proc.numel()
    seed, offset = philox_state(g, proc.device)
    q = exponential(proc, g)
    step = philox_state(g, proc.device)[1] - offset
    want = cuda_rng.layout(n, *cuda_rng.device_threads(proc.device))[1]
    try:
        bad = int(cuda_rng.count_mismatches(q, seed, offset, threads)) if step == want else -1  # one host read, once
    except KernelUnavailable:  # launch said so on stderr: the unfused draw, as for a mismatch
        bad = None
    ok = bad == 0
    _checked[(str(proc.device), n)] = ok
    if not ok and bad is not None:
        what = f"{bad} of {n} draws differ" if bad > 0 else f"the generator advanced {step}, not {want}"
        print(f"dg: the sampler's fused Exp(1) draws are not torch's on {proc.device} ({what}); "
              "drawing them with torch's exponential_ instead", file=sys.stderr)
    V = proc.shape[-1]
    return draw(proc.reshape(-1, V), lse.reshape(-1), q.view(-1, V)).view(lse.shape)


def sample_sc(proc: torch.Tensor, lse: torch.Tensor, g: torch.Generator | None, dtype: torch.dtype | None,
              sc: torch.Tensor | None = None, sc_lse: torch.Tensor | None = None, process=None):
    """`sample`, and the next step's self-conditioning input: proc in `dtype` and its logsumexp.
    Returns (tokens, sc, sc_lse). Fused (CUDA, once the draws were checked): the draw kernel makes the
    Exp(1) draws itself and writes sc (into `sc` when given, the graph's static buffer) and sc_lse
    (into `sc_lse` when given); nothing else moves a vocabulary-sized tensor. Otherwise: `sample`'s
    draw, then sc = proc.to(dtype) (a new tensor) and sc_lse None (the step computes it). dtype None:
    the tokens only (sc, sc_lse None).

    `process` = (softcap or None, temperature: a 1-element fp32 tensor on the device): proc holds the
    raw logits (the fused head's raw=True output, in the model dtype) and everything is as for
    proc = kernels.lm_head.process(proc, *process): the same tokens, generator state, sc and sc_lse.
    The fused draw makes proc in registers; the unfused paths (the check's step, fallbacks) make it."""
    if lse.shape != proc.shape[:-1]:
        raise ValueError(f"lse {tuple(lse.shape)} must be proc's {tuple(proc.shape)} without the last dim")
    V = proc.shape[-1]
    if _fusable(proc, lse, process is not None):
        n = proc.numel()
        threads, step = cuda_rng.layout(n, *cuda_rng.device_threads(proc.device))
        status = check_status(proc.device, n)
        if status is None:
            proc = _processed(proc, process)
            tokens = _self_check(proc, lse, g, threads)
            return tokens, (None if dtype is None else proc.to(dtype)), None
        if status:
            seed, offset = philox_state(g, proc.device)
            set_philox_offset(g, proc.device, offset + step)  # where exponential_ would leave it
            if dtype is None:
                sc = sc_lse = None
            else:
                sc = torch.empty(proc.shape, dtype=dtype, device=proc.device) if sc is None else sc
                sc_lse = torch.empty(lse.shape, dtype=torch.float32, device=proc.device) if sc_lse is None else sc_lse
            try:
                tokens = draw_fused(proc.view(-1, V), lse.reshape(-1), seed, offset, threads,
                                    None if sc is None else sc.view(-1, V), None if sc_lse is None else sc_lse.view(-1),
                                    process)
                return tokens.view(lse.shape), sc, sc_lse
            except KernelUnavailable:  # the unfused draw from the same generator state, from now on
                _checked[(str(proc.device), n)] = False
                set_philox_offset(g, proc.device, offset)
    proc = _processed(proc, process)
    q = exponential(proc, g)
    tokens = draw(proc.reshape(-1, V), lse.reshape(-1), q.view(-1, V)).view(lse.shape)
    return tokens, (None if dtype is None else proc.to(dtype)), None


def sample(proc: torch.Tensor, lse: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """One token per row of proc (..., V) fp32 with lse (...) = logsumexp(proc): q ~ Exp(1) drawn from
    g as `dgcli.engine.multinomial` draws it (same shape, same generator calls), then `draw`. Returns
    (...) int64: `torch.multinomial(exp(proc - lse), 1, generator=g)`'s tokens for the same state of g.
    On CUDA the draws are made inside the draw kernel once checked (`sample_sc`): the same numbers."""
    return sample_sc(proc, lse, g, None)[0]


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """The step's draw: fp32 proc and q at V = 262,144 (a multiple of BLOCK: every tile full), L = 256
    rows, MAX_SPLITS chunks; libdevice's expf. (kernels.aot compiles with Triton's default FTZ
    reflection, the launch turns it off: the two differ only in `.ftz` on expf's internal fmas.)"""
    if not HAS_TRITON:
        return
    span, n = plan(262144)
    sig = {"proc_ptr": "*fp32", "lse_ptr": "*fp32", "q_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32",
           "V": "i32", "span": "i32", "splits": "i32", "stride_proc": "i32", "stride_q": "i32"}
    yield AotSpec("sample.chunks", _draw_chunks_kernel, sig, dict(EVEN=True, LIBDEVICE=True, BLOCK=BLOCK), WARPS, 1,
                  dict(BLOCK=BLOCK, num_warps=WARPS, num_stages=1), default=True,
                  divisible=("V", "span", "splits", "stride_proc", "stride_q"))
    block_s = max(16, 1 << (n - 1).bit_length())
    yield AotSpec("sample.combine", _draw_combine_kernel,
                  {"val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "splits": "i32"},
                  dict(BLOCK_S=block_s), 1, 1, dict(BLOCK_S=block_s, num_warps=1), default=True,
                  divisible=("splits",))

    # The fused draw at the step's shape on an H100's layout (N = 270,336: 1056 blocks of 256), bf16
    # self-conditioning input and its logsumexp; no segment straddles a row (V a multiple of 256).
    threads, _ = cuda_rng.layout(256 * 262144, *cuda_rng.ASSUMED_DEVICE)
    fsig = {"proc_ptr": "*fp32", "lse_ptr": "*fp32", "sc_ptr": "*bf16", "val_ptr": "*fp32", "idx_ptr": "*i32",
            "sum_ptr": "*fp32", "temp_ptr": "*fp32", "n": "i32", "L": "i32", "V": "i32", "N": "i32", "n_seg": "i32",
            "key0": "i32", "key1": "i32", "base_lo": "i32", "base_hi": "i32", "softcap": "fp32"}
    S = cuda_rng.SPAN
    consts = dict(WRITE_SC=True, SC_LSE=True, STRADDLE=False, LIBDEVICE=True, RAW=False, HAS_CAP=False, S=S)
    divisible = ("n", "L", "V", "N", "n_seg")
    yield AotSpec("sample.fused", _fused_draw_kernel, fsig, consts, FUSED_WARPS, 1,
                  dict(S=S, num_warps=FUSED_WARPS, num_stages=1), default=True, divisible=divisible)
    # The engine's (StepOut.sample_sc): the fused head's bf16 logits in, proc made in registers
    # (softcap, temperature), sc and its logsumexp written into the graph's buffers.
    yield AotSpec("sample.fused.raw", _fused_draw_kernel, {**fsig, "proc_ptr": "*bf16"},
                  {**consts, "RAW": True, "HAS_CAP": True}, FUSED_WARPS, 1,
                  dict(S=S, num_warps=FUSED_WARPS, num_stages=1), default=True, divisible=divisible)
    csig = {"val_ptr": "*fp32", "idx_ptr": "*i32", "sum_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*i64",
            "sc_lse_ptr": "*fp32", "V": "i32", "n_seg": "i32"}
    block_c = 262144 // S
    yield AotSpec("sample.fused_combine", _fused_combine_kernel, csig,
                  dict(SC_LSE=True, STRADDLE=False, S=S, BLOCK_C=block_c), 4, 1,
                  dict(BLOCK_C=block_c, num_warps=4), default=True, divisible=("V", "n_seg"))


AOT = list(_aot())
