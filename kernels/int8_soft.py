"""The self-conditioning soft embedding over an int8 table: probs @ (codes · scale[:, None]).

A denoising step feeds back `softmax(sc_logits) @ E · sqrt(H)`, E the tied embedding [V, H]; in the
quantized schemes E is int8 per row (codes [V, H] int8, scale [V]). `int8_soft(probs [L, V], codes,
scale)` returns the fp32 product [L, H]; the caller casts and applies sqrt(H).

The reduction runs over the vocabulary (V = 262,144 against L = 256 and H = 2816), so the Triton
kernel splits it: a (L tiles, H tiles, V splits) grid, each program accumulating an fp32 [BLOCK_L,
BLOCK_H] partial over its V range with `tl.dot`, then one torch.sum over the [splits, L, H] partials.
Each code is read from DRAM once: the L tiles of a codes tile are launched together (the fastest grid
axis), then the H tiles of a V range, which share its probabilities through L2.

The row scale goes into the codes in registers: w = q · s (exact in fp32: |q| <= 127), rounded once to
the probabilities' dtype for the dot, i.e. the weight a dense table in that dtype would hold. The
probabilities are used as they come. Folding s into them instead would push p · s (~1e-9) below
fp16's range; the weight q · s sits in its normal range.

`int8_soft_ref` is plain PyTorch, over chunks of CHUNK_ROWS vocabulary rows (never a [V, H] copy).
There the scale goes into the probabilities, relative to the scales' geometric mean (so fp16 keeps
p · s/typical in range), and each chunk of codes is converted once to the dtype: 5 bytes per weight
moved (1 read, 2 written, 2 read by the matmul) where a scaled fp32 decode moves 13 or more.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import HAS_TRITON, launch, use_triton
from ._tuning import AotSpec, rows_bucket, tuned_tile

CHUNK_ROWS = 4096  # vocabulary rows the reference converts at a time (23 MB of bf16 at H = 2816)
MAX_SPLITS = 16  # the [splits, L, H] fp32 partials: 46 MB at L = 256, H = 2816
ASSUMED_SMS = 128  # streaming multiprocessors when the device has none to ask (meta tensors): an RTX 4090's


def _check(probs, codes, scale):
    if probs.dim() != 2 or codes.dim() != 2 or probs.shape[1] != codes.shape[0] or scale.shape != (codes.shape[0],):
        raise ValueError(f"probs {tuple(probs.shape)}, codes {tuple(codes.shape)}, scale {tuple(scale.shape)}: "
                         "want [L, V], [V, H], [V]")
    if codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8, got {codes.dtype}")
    if probs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"probs must be fp32, bf16 or fp16, got {probs.dtype}")


# --------------------------------------------------------------------------------------------------
# Reference


def int8_soft_ref(probs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """probs [L, V] @ (codes [V, H] · scale[:, None]) -> [L, H] fp32, in chunks of CHUNK_ROWS rows.

    Each chunk: p · (s / typical) rounded to probs' dtype, times the codes converted to that dtype
    (exact), summed in fp32; `typical` (the geometric mean of the positive scales, a device scalar:
    no host sync) multiplies the sum. Zero scales (all-zero rows) are left out of the mean."""
    _check(probs, codes, scale)
    dtype = probs.dtype
    s = scale.float()
    positive = s > 0
    log_mean = torch.where(positive, s.clamp_min(torch.finfo(torch.float32).tiny).log(), 0).sum()
    typical = (log_mean / positive.sum().clamp_min(1)).exp()
    rel = s / typical
    acc = torch.zeros(probs.shape[0], codes.shape[1], dtype=torch.float32, device=probs.device)
    for a in range(0, codes.shape[0], CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, codes.shape[0])
        p = (probs[:, a:b] * rel[a:b]).to(dtype)
        acc += torch.matmul(p, codes[a:b].to(dtype)).float()
    return acc * typical


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_soft_kernel(
        p_ptr, c_ptr, s_ptr, out_ptr, L, V, H, span, stride_p, stride_c,
        EVEN_V: tl.constexpr, FP32: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """out[split, l tile, h tile] = probs[l tile, V range] @ (codes · s)[V range, h tile], fp32;
        the V range is [split · span, min(V, (split + 1) · span)), span a multiple of BLOCK_V."""
        pid_l = tl.program_id(0)  # fastest: the L tiles reading one codes tile run together
        pid_h = tl.program_id(1)
        split = tl.program_id(2)
        rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < L
        col_ok = cols < H
        offs_v = tl.arange(0, BLOCK_V)
        start = split * span
        end = tl.minimum(start + span, V)
        p_ptrs = p_ptr + rows[:, None].to(tl.int64) * stride_p + (start + offs_v)[None, :]
        c_ptrs = c_ptr + (start + offs_v)[:, None].to(tl.int64) * stride_c + cols[None, :]
        s_ptrs = s_ptr + start + offs_v
        acc = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
        for v0 in range(start, end, BLOCK_V):
            if EVEN_V:
                p = tl.load(p_ptrs, mask=row_ok[:, None], other=0.0)
                c = tl.load(c_ptrs, mask=col_ok[None, :], other=0)
                s = tl.load(s_ptrs)
            else:
                v_ok = offs_v < V - v0
                p = tl.load(p_ptrs, mask=row_ok[:, None] & v_ok[None, :], other=0.0)
                c = tl.load(c_ptrs, mask=v_ok[:, None] & col_ok[None, :], other=0)
                s = tl.load(s_ptrs, mask=v_ok, other=0.0)
            # q · s exact in fp32, one rounding to the dot's dtype (int -> bf16 directly is also
            # mis-converted by Triton's interpreter)
            w = (c.to(tl.float32) * s.to(tl.float32)[:, None]).to(p.dtype)
            if FP32:
                acc = tl.dot(p, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(p, w, acc)
            p_ptrs += BLOCK_V
            c_ptrs += BLOCK_V * stride_c
            s_ptrs += BLOCK_V
        out_ptrs = out_ptr + (split.to(tl.int64) * L + rows[:, None]) * H + cols[None, :]
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


DEFAULT_TILE = (128, 128, 64, 8, 3)  # BLOCK_L, BLOCK_H, BLOCK_V, num_warps, num_stages
_TILES = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
          (64, 64, 64, 4, 4), (256, 128, 32, 8, 3))
_LARGE = frozenset()  # tiles over a 99 KB part's shared memory (python -m kernels.aot measures them)


def splits_for(tiles: int, v_blocks: int, sms: int) -> int:
    """How many V ranges: the fewest that keep the waves of programs >= 95% full (a program per SM
    at a time), at most MAX_SPLITS and one per BLOCK_V rows; else the fullest. More splits only add
    partial sums to write and add up."""
    best, best_fill = 1, 0.0
    for s in range(1, max(1, min(MAX_SPLITS, v_blocks)) + 1):
        programs = tiles * s
        fill = programs / (sms * math.ceil(programs / sms))
        if fill >= 0.95:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return ASSUMED_SMS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def int8_soft_triton(probs, codes, scale, tile: tuple | None = None, splits: int | None = None) -> torch.Tensor:
    """The Triton path; `tile` = (BLOCK_L, BLOCK_H, BLOCK_V, warps, stages), else autotuned on CUDA;
    `splits` = how many V ranges, else `splits_for` the device."""
    _check(probs, codes, scale)
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    codes, scale = codes.contiguous(), scale.contiguous()
    L, V = probs.shape
    H = codes.shape[1]
    if L == 0 or H == 0 or V == 0:
        return torch.zeros(L, H, dtype=torch.float32, device=probs.device)

    def plan(cfg):
        bl, bh, bv, _, _ = cfg
        v_blocks = _cdiv(V, bv)
        n = splits or splits_for(_cdiv(L, bl) * _cdiv(H, bh), v_blocks, _sms(probs.device))
        span = _cdiv(v_blocks, min(n, v_blocks)) * bv
        return span, _cdiv(V, span)  # every range non-empty

    def run(cfg, warmup=False, out=None):
        bl, bh, bv, warps, stages = cfg
        span, n = plan(cfg)
        if out is None:
            out = torch.empty(n, L, H, dtype=torch.float32, device=probs.device)
        compiled = launch(
            _int8_soft_kernel, probs.device, (_cdiv(L, bl), _cdiv(H, bh), n),
            probs, codes, scale, out, L, V, H, span, probs.stride(0), codes.stride(0),
            EVEN_V=V % bv == 0, FP32=probs.dtype == torch.float32, BLOCK_L=bl, BLOCK_H=bh, BLOCK_V=bv,
            num_warps=warps, num_stages=stages, warmup=warmup,
        )
        return compiled if warmup else out

    if tile is None:
        key = (probs.dtype, rows_bucket(L), V, H)
        tile = tuned_tile("int8_soft", key, _TILES, _LARGE, run, DEFAULT_TILE, probs.device)
    partials = run(tile)
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)


# --------------------------------------------------------------------------------------------------
# Dispatcher


def int8_soft(probs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """probs [..., V] @ (codes [V, H] · scale[:, None]) -> [..., H] fp32; Triton on CUDA, else the reference."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = (int8_soft_triton if use_triton(probs) else int8_soft_ref)(flat, codes, scale)
    return out.view(*probs.shape[:-1], codes.shape[1])


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """bf16 probabilities and fp16 scales (the int8_row format) at the production shape (L = 256,
    V = 262,144, H = 2816: all multiples of 16, V of every BLOCK_V), every candidate tile."""
    sig = {"p_ptr": "*bf16", "c_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": "*fp32", "L": "i32", "V": "i32",
           "H": "i32", "span": "i32", "stride_p": "i32", "stride_c": "i32"}
    for tile in dict.fromkeys((DEFAULT_TILE, *_TILES)):
        bl, bh, bv, warps, stages = tile
        yield AotSpec("int8_soft", _int8_soft_kernel, sig,
                      dict(EVEN_V=True, FP32=False, BLOCK_L=bl, BLOCK_H=bh, BLOCK_V=bv), warps, stages,
                      dict(BLOCK_L=bl, BLOCK_H=bh, BLOCK_V=bv, num_warps=warps, num_stages=stages),
                      default=tile == DEFAULT_TILE, large=tile in _LARGE,
                      divisible=("L", "V", "H", "span", "stride_p", "stride_c"))


AOT = list(_aot()) if HAS_TRITON else []
