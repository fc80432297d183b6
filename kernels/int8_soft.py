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

From logits: the step feeds back softmax(sc_logits), which unfused costs ~0.94 GB a step at full size
(the fp32 softmax written and read back, the probabilities written and read again). Instead
`lse_rows(logits)` reads the logits once for each row's logsumexp (an online max and sum in fp32, one
program per row), and `int8_soft_logits(logits, lse, codes, scale)` is the same kernel with FROM_LOGITS:
it loads the logits where it loaded probabilities and makes p = exp(logits - lse) in fp32 on the fly,
rounded to the logits' dtype (as the model rounds its fp32 softmax to the model dtype) before the
dot. The logits are read twice, the codes once, and no [L, V] tensor is written.

Cost: FROM_LOGITS makes exp(logits - lse) again for each H tile (22 at full size: ~1.48e9 exps a
step, one special-function and ~5 other fp32 instructions per element in the sm_90 SASS). At 16
special-function results per clock per SM, that is ~0.4 ms of an H100's throughput against ~0.26 ms
for the kernel's ~0.88 GB at 3.35 TB/s: an estimate from the SASS, not a measurement. Its matmul
takes longer still at the tensor cores' peak (2·L·V·H = 378 GFLOP: ~0.38 ms on an H100, ~2.3 ms on an
RTX 4090; scripts/step_model.py's roofline), so on every target the kernel is bound by its FLOPs, not
by its bytes. A raw-logits mode (proc made in the kernel from the head's raw logits,
softcap and temperature) would remake proc per H tile too, ~3 special-function and ~26 other fp32
instructions per element: it would cost more than the 134 MB of proc it saves, so there is none.

The finish: with `out_dtype` and `factor` (the caller's cast and sqrt(H)) one small kernel sums the
split partials in order, rounds to out_dtype and multiplies, where torch took three kernels.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import HAS_TRITON, launch, pick
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
    return _chunked(lambda a, b: probs[:, a:b], probs.shape[0], probs.dtype, probs.device, codes, scale)


def _chunked(probs_chunk, L, dtype, device, codes, scale):
    s = scale.float()
    positive = s > 0
    log_mean = torch.where(positive, s.clamp_min(torch.finfo(torch.float32).tiny).log(), 0).sum()
    typical = (log_mean / positive.sum().clamp_min(1)).exp()
    rel = s / typical
    acc = torch.zeros(L, codes.shape[1], dtype=torch.float32, device=device)
    for a in range(0, codes.shape[0], CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, codes.shape[0])
        p = (probs_chunk(a, b) * rel[a:b]).to(dtype)
        acc += torch.matmul(p, codes[a:b].to(dtype)).float()
    return acc * typical


def _check_logits(logits, lse):
    if logits.dim() != 2 or lse.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)}, lse {tuple(lse.shape)}: want [L, V], [L]")
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32, got {lse.dtype}")


def lse_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    """logits [L, V] (fp32, bf16 or fp16) -> [L] fp32 logsumexp, as torch.logsumexp(logits.float(), -1)
    computes it (max, then the log of the sum of exp(x - max)), a chunk of CHUNK_ROWS columns at a
    time: never an fp32 copy of the whole [L, V]."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits {tuple(logits.shape)} {logits.dtype}: want [L, V] fp32, bf16 or fp16")
    m = logits.amax(-1).float()
    m_safe = torch.where(m == float("-inf"), 0.0, m)  # an all -inf row sums to 0: lse -inf
    total = torch.zeros_like(m)
    for a in range(0, logits.shape[1], CHUNK_ROWS):
        total += torch.exp(logits[:, a:a + CHUNK_ROWS].float() - m_safe[:, None]).sum(-1)
    return m_safe + total.log()


def int8_soft_logits_ref(logits: torch.Tensor, lse: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                         out_dtype: torch.dtype | None = None, factor: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(logits [L, V]) @ (codes · scale[:, None]) -> [L, H] fp32, with lse [L] = lse_rows(logits):
    each chunk's p = exp(logits - lse) in fp32, rounded to the logits' dtype (the model's softmax
    rounding), then as `int8_soft_ref`. With out_dtype and factor: the result `.to(out_dtype) * factor`."""
    _check(logits, codes, scale)
    _check_logits(logits, lse)
    _check_finish(out_dtype, factor)
    dtype = logits.dtype

    def probs(a, b):
        return torch.exp(logits[:, a:b].float() - lse[:, None]).to(dtype)

    out = _chunked(probs, logits.shape[0], dtype, logits.device, codes, scale)
    return out if out_dtype is None else finish_ref(out[None], out_dtype, factor)


def _check_finish(out_dtype, factor):
    if (out_dtype is None) != (factor is None):
        raise ValueError("out_dtype and factor come together (result.to(out_dtype) * factor), or neither")
    if factor is not None and (factor.numel() != 1 or factor.dtype != out_dtype):
        raise ValueError(f"factor must be one {out_dtype} element, got {tuple(factor.shape)} {factor.dtype}")


def _summed(partials: torch.Tensor) -> torch.Tensor:
    """partials [splits, L, H] fp32 -> their sum [L, H] (torch's; no copy for one split)."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(0)


def finish_ref(partials: torch.Tensor, out_dtype: torch.dtype, factor: torch.Tensor) -> torch.Tensor:
    """partials [splits, L, H] fp32 -> their sum `.to(out_dtype) * factor` [L, H] (torch's ops)."""
    return _summed(partials).to(out_dtype) * factor.reshape(())


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_soft_kernel(
        p_ptr, lse_ptr, c_ptr, s_ptr, out_ptr, L, V, H, span, stride_p, stride_c,
        EVEN_V: tl.constexpr, FP32: tl.constexpr, FROM_LOGITS: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """out[split, l tile, h tile] = probs[l tile, V range] @ (codes · s)[V range, h tile], fp32;
        the V range is [split · span, min(V, (split + 1) · span)), span a multiple of BLOCK_V.
        FROM_LOGITS: p_ptr holds logits, and probs = exp(logits - lse[row]) rounded to their dtype."""
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
        if FROM_LOGITS:
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
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
            if FROM_LOGITS:
                # past V, x = 0 and exp(-lse) may overflow (inf · 0 = NaN in the dot): zero it
                e = tl.exp(p.to(tl.float32) - lse[:, None])
                if not EVEN_V:
                    e = tl.where(v_ok[None, :], e, 0.0)
                p = e.to(p.dtype)
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

    @triton.jit
    def _lse_rows_kernel(x_ptr, out_ptr, V, stride_x, BLOCK: tl.constexpr):
        """out[row] = log(sum(exp(x[row]))) in fp32: a running maximum m (of each tile) and per-lane
        sums of exp(x - m), rescaled when m grows; one exp per element."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ptrs = x_ptr + row.to(tl.int64) * stride_x + offs
        m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), 0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            x = tl.load(ptrs, mask=offs < V - v0, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: sums stay 0
            acc = acc * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
            ptrs += BLOCK
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tl.store(out_ptr + row, m_safe + tl.log(tl.sum(acc, 0)))

    @triton.jit
    def _finish_kernel(part_ptr, factor_ptr, out_ptr, n, splits, factor, FACTOR_PTR: tl.constexpr,
                       BLOCK: tl.constexpr):
        """out = (Σ_split partials[split]).to(out dtype) * factor over n = L · H elements: the splits
        summed in order in fp32, rounded once to out's dtype, then the fp32 product rounded once
        (torch's bf16 × bf16: exact in fp32, so one rounding). The factor is read from factor_ptr
        (FACTOR_PTR) or given as a float."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        ptrs = part_ptr + offs
        acc = tl.load(ptrs, mask=ok, other=0.0)
        for _i in range(1, splits):
            ptrs += n
            acc += tl.load(ptrs, mask=ok, other=0.0)
        if FACTOR_PTR:
            f = tl.load(factor_ptr).to(tl.float32)
        else:
            f = factor
        dtype = out_ptr.dtype.element_ty
        y = acc.to(dtype).to(tl.float32) * f
        tl.store(out_ptr + offs, y.to(dtype), mask=ok)


DEFAULT_TILE = (128, 128, 64, 8, 3)  # BLOCK_L, BLOCK_H, BLOCK_V, num_warps, num_stages
_TILES = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
          (64, 64, 64, 4, 4), (256, 128, 32, 8, 3))
_LARGE = frozenset()  # tiles over a 99 KB part's shared memory (python -m kernels.aot measures them)


def splits_for(tiles: int, v_blocks: int, sms: int) -> int:
    """How many V ranges: the fewest that keep the waves of programs >= 95% full (a program per SM
    at a time), at most MAX_SPLITS and one per BLOCK_V rows; else the fullest. More splits only add
    partial sums to write and add up. At full size (44 tiles of 128 × 128, one resident per SM: 184
    registers a thread) an H100/H200's 132 SMs take 3 splits, one exact wave; a 4090's 128 take 14."""
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
    partials = _soft_triton(probs, None, codes, scale, tile, splits)
    return _summed(partials)


def int8_soft_logits_triton(logits, lse, codes, scale, out_dtype: torch.dtype | None = None,
                            factor: torch.Tensor | None = None, tile: tuple | None = None,
                            splits: int | None = None) -> torch.Tensor:
    """`int8_soft_triton` on softmax(logits), the probabilities made in the kernel from lse; with
    out_dtype and factor, finished by `finish_triton`."""
    _check(logits, codes, scale)
    _check_logits(logits, lse)
    _check_finish(out_dtype, factor)
    partials = _soft_triton(logits, lse.contiguous(), codes, scale, tile, splits)
    if out_dtype is not None:
        return finish_triton(partials, out_dtype, factor)
    return _summed(partials)


def _soft_triton(probs, lse, codes, scale, tile, splits):
    """probs [L, V] (logits when lse is given) against the int8 table: the split-V kernel's fp32
    partials [splits, L, H]."""
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    codes, scale = codes.contiguous(), scale.contiguous()
    L, V = probs.shape
    H = codes.shape[1]
    if L == 0 or H == 0 or V == 0:
        return torch.zeros(1, L, H, dtype=torch.float32, device=probs.device)
    from_logits = lse is not None

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
            probs, lse if from_logits else scale, codes, scale, out, L, V, H, span, probs.stride(0), codes.stride(0),
            EVEN_V=V % bv == 0, FP32=probs.dtype == torch.float32, FROM_LOGITS=from_logits,
            BLOCK_L=bl, BLOCK_H=bh, BLOCK_V=bv, num_warps=warps, num_stages=stages, warmup=warmup,
        )
        return compiled if warmup else out

    if tile is None:
        key = (probs.dtype, rows_bucket(L), V, H)
        name = "int8_soft.logits" if from_logits else "int8_soft"
        tile = tuned_tile(name, key, _TILES, _LARGE, run, DEFAULT_TILE, probs.device)
    return run(tile)


FINISH_BLOCK, FINISH_WARPS = 2048, 4  # 352 programs at L 256, H 2816


def finish_triton(partials: torch.Tensor, out_dtype: torch.dtype, factor) -> torch.Tensor:
    """`finish_ref` in one kernel (instead of torch's sum, cast and multiply: three kernels): the
    splits summed in order (deterministic; torch's sum may add them in another order: to fp32
    rounding). `factor`: one element on the partials' device (read there), or on the CPU, or a float
    (passed by value: no host-to-device copy, nothing to break a CUDA graph's capture)."""
    if partials.dim() != 3 or partials.dtype != torch.float32:
        raise ValueError(f"partials {tuple(partials.shape)} {partials.dtype}: want [splits, L, H] fp32")
    S, L, H = partials.shape
    partials = partials.contiguous()
    out = torch.empty(L, H, dtype=out_dtype, device=partials.device)
    on_device = isinstance(factor, torch.Tensor) and factor.device == partials.device
    if isinstance(factor, torch.Tensor) and not on_device and factor.device.type != "cpu":
        raise ValueError(f"factor on {factor.device}, partials on {partials.device}")
    n = L * H
    if n:
        launch(_finish_kernel, partials.device, (_cdiv(n, FINISH_BLOCK),), partials,
               factor if on_device else out, out, n, S, 0.0 if on_device else float(factor),
               FACTOR_PTR=on_device, BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return out


LSE_BLOCK, LSE_WARPS, LSE_STAGES = 2048, 8, 3  # a row per program: 256 rows of 512 KB (bf16) at full size


def lse_rows_triton(logits: torch.Tensor, block: int = LSE_BLOCK) -> torch.Tensor:
    """The Triton path of `lse_rows`: one program per row, the logits read once."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits {tuple(logits.shape)} {logits.dtype}: want [L, V] fp32, bf16 or fp16")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    L, V = logits.shape
    out = torch.empty(L, dtype=torch.float32, device=logits.device)
    if L:
        launch(_lse_rows_kernel, logits.device, (L,), logits, out, V, logits.stride(0), BLOCK=block,
               num_warps=LSE_WARPS, num_stages=LSE_STAGES)
    return out


# --------------------------------------------------------------------------------------------------
# Dispatcher


def int8_soft(probs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """probs [..., V] @ (codes [V, H] · scale[:, None]) -> [..., H] fp32; Triton on CUDA, else the reference."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = pick(int8_soft_triton, int8_soft_ref, probs)(flat, codes, scale)
    return out.view(*probs.shape[:-1], codes.shape[1])


def lse_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> [...] fp32 logsumexp over V, reading them once; Triton on CUDA, else the reference."""
    flat = logits.reshape(-1, logits.shape[-1])
    return pick(lse_rows_triton, lse_rows_ref, logits)(flat).view(logits.shape[:-1])


def int8_soft_logits(logits: torch.Tensor, lse: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                     out_dtype: torch.dtype | None = None, factor: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(logits [..., V]) @ (codes [V, H] · scale[:, None]) -> [..., H] fp32, lse = lse_rows(logits);
    the probabilities rounded to the logits' dtype, never written. Triton on CUDA, else the reference.
    out_dtype and factor (one out_dtype element, e.g. Embedding.embed_scale()): the result
    `.to(out_dtype) * factor`, on the Triton path in one small kernel that also sums the split partials."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = pick(int8_soft_logits_triton, int8_soft_logits_ref, logits)(flat, lse.reshape(-1), codes, scale,
                                                                      out_dtype, factor)
    return out.view(*logits.shape[:-1], codes.shape[1])


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """bf16 probabilities (or logits) and fp16 scales (the int8_row format) at the production shape
    (L = 256, V = 262,144, H = 2816: all multiples of 16, V of every BLOCK_V), every candidate tile;
    the finish over the step's [L, H] into bf16, the factor by value (embed_scale is a CPU scalar);
    the row logsumexp over bf16 logits."""
    sig = {"p_ptr": "*bf16", "lse_ptr": "*fp32", "c_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": "*fp32", "L": "i32",
           "V": "i32", "H": "i32", "span": "i32", "stride_p": "i32", "stride_c": "i32"}
    for name, from_logits in (("int8_soft", False), ("int8_soft.logits", True)):
        for tile in dict.fromkeys((DEFAULT_TILE, *_TILES)):
            bl, bh, bv, warps, stages = tile
            yield AotSpec(name, _int8_soft_kernel, sig,
                          dict(EVEN_V=True, FP32=False, FROM_LOGITS=from_logits, BLOCK_L=bl, BLOCK_H=bh, BLOCK_V=bv),
                          warps, stages, dict(BLOCK_L=bl, BLOCK_H=bh, BLOCK_V=bv, num_warps=warps, num_stages=stages),
                          default=tile == DEFAULT_TILE, large=tile in _LARGE,
                          divisible=("L", "V", "H", "span", "stride_p", "stride_c"))
    yield AotSpec("int8_soft.finish", _finish_kernel,
                  {"part_ptr": "*fp32", "factor_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "splits": "i32",
                   "factor": "fp32"},
                  dict(FACTOR_PTR=False, BLOCK=FINISH_BLOCK), FINISH_WARPS, 1,
                  dict(BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS), default=True, divisible=("n",))
    yield AotSpec("int8_soft.lse", _lse_rows_kernel, {"x_ptr": "*bf16", "out_ptr": "*fp32", "V": "i32", "stride_x": "i32"},
                  dict(BLOCK=LSE_BLOCK), LSE_WARPS, LSE_STAGES,
                  dict(BLOCK=LSE_BLOCK, num_warps=LSE_WARPS, num_stages=LSE_STAGES), default=True,
                  divisible=("V", "stride_x"))


AOT = list(_aot()) if HAS_TRITON else []
