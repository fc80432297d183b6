"""The sampler's draw from the fused head's outputs, in one pass over the vocabulary.

A denoising step samples one token per canvas position as `torch.multinomial(probs, 1)` does for
one sample: q ~ Exp(1) from the generator, then argmax(probs / q) per row. With the fused LM head's
outputs (proc [L, V] fp32 and lse [L]) probs = exp(proc - lse), so the unfused draw writes probs,
reads it, writes q, reads probs and q, writes the ratio and reads it again: ~2 GB at L = 256,
V = 262,144 (268 MB per [L, V] fp32 tensor). The exponential draws must stay torch's (the
generator's stream), so q is still made by `exponential_` (one [L, V] write); everything after it is
`draw`: proc and q read once, nothing vocabulary-sized written.

- `draw(proc [L, V], lse [L], q [L, V]) -> [L] int64` = argmax_v(exp(proc - lse) / q);
  `draw_ref` is that expression in PyTorch, `draw_triton` the kernel; `draw` dispatches (Triton on
  CUDA; `DG_KERNELS` overrides).
- `sample(proc [..., V], lse [...], g)`: q drawn from g as `dgcli.engine.multinomial` draws it, then
  `draw`: the same tokens as `sample(exp(proc - lse), g)`, given the same generator state.

The kernel: each (chunk, row) program reduces a V-range to (max ratio, first index), a second tiny
kernel combines each row's chunks; ties go to the lowest index, as torch.argmax returns the first
maximum.

What is exact. On CUDA the ratio is the same float as PyTorch's: proc - lse is one fp32 subtraction,
exp is libdevice's `__nv_expf` (the CUDA math library's expf, which PyTorch's exp kernel compiles to
as `std::exp`; compiled here without FTZ, as PyTorch is: `tl.exp` would be the approximate
`ex2.approx` on a scaled argument), and the division is correctly rounded (`div_rn`, as CUDA's `/`
without fast math; Triton's default `/` is `div.full`, approximate). So the token is torch's, bit for
bit, as far as this can be shown without a GPU: the PTX is the one described; no GPU ran it here.
Under the interpreter (CPU tensors) exp is numpy's float32 exp, which differs from torch's CPU exp
by up to 2 units in the last place: the tests give the interpreter torch's exp to check the rest bit
for bit. On the CPU `draw` takes `draw_ref`, torch's own arithmetic.

NaN: as torch.argmax, a NaN ratio counts as the maximum, and the first NaN of a row wins (a NaN in
proc or lse, or 0 / 0 where q is 0). The sampler checks finiteness separately.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, interpreting, launch, use_triton
from ._tuning import AotSpec

BLOCK = 2048  # columns per loop iteration: 8 fp32 of proc and 8 of q per thread at 8 warps
WARPS = 8
MAX_SPLITS = 16  # V-chunks per row: 4096 programs at L = 256, 64 KB of proc and of q each at V = 262,144


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
# Dispatchers


def draw(proc: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """argmax(exp(proc [L, V] - lse [L]) / q [L, V]) per row -> [L] int64; Triton on CUDA, else the reference."""
    return (draw_triton if use_triton(proc) else draw_ref)(proc, lse, q)


def sample(proc: torch.Tensor, lse: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """One token per row of proc (..., V) fp32 with lse (...) = logsumexp(proc): q ~ Exp(1) drawn from
    g as `dgcli.engine.multinomial` draws it (same shape, same generator calls), then `draw`. Returns
    (...) int64: `torch.multinomial(exp(proc - lse), 1, generator=g)`'s tokens for the same state of g."""
    V = proc.shape[-1]
    if lse.shape != proc.shape[:-1]:
        raise ValueError(f"lse {tuple(lse.shape)} must be proc's {tuple(proc.shape)} without the last dim")
    q = torch.empty_like(proc, memory_format=torch.contiguous_format).exponential_(1, generator=g)
    return draw(proc.reshape(-1, V), lse.reshape(-1), q.view(-1, V)).view(lse.shape)


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


AOT = list(_aot())
