"""LM head fused with the sampler's per-position statistics, computed in chunks of the vocabulary.

A denoising step turns h [L, H] into logits over V = 262144 tokens. Done unfused, the arithmetic is
    logits = h @ Eᵀ (model dtype) -> fp32 -> tanh(·/cap)·cap -> / temperature,
then softmax, argmax, entropy and logsumexp over [L, V]. That writes and re-reads several fp32
[256 × 262144] tensors (256 MiB each) per step. Here every vocabulary chunk is produced once: it is
softcapped and divided by the temperature in registers (Triton) or while still small (reference),
written once to `proc` (the processed logits, in `out_dtype`), and reduced on the spot to per-row
partials (max, argmax, Σe^(x-m), Σe^(x-m)(x-m)). The partials are combined in a fixed order: by
`combine` (torch, the reference) or on the Triton path by `_combine_kernel` (one program per row, the
same arithmetic in one launch instead of ~19 small ones).
    entropy = log Σe^(x-m) - Σe^(x-m)(x-m) / Σe^(x-m)      (nats; terms stay small for confident rows)
    lse     = m + log Σe^(x-m)
Sampling itself is left to the caller (kernels.sample).

`raw=True` writes the logits themselves in h's dtype (rounded as the model rounds them, before the
softcap and the temperature) instead of fp32 proc: half the bytes written, and half read by each
consumer, which makes proc again in registers with `process_logits` (the same arithmetic, so the
same floats: `process(logits, ...)` equals the proc the head would have written, path for path).

The embedding may be the model's float matrix [V, H] or int8 with one scale per vocabulary row
(`weight_scale` [V]; docs/quantization.md); the scale is applied to the fp32 accumulator. Logits are
rounded to h's dtype before the softcap, as `Embedding.head` in the model does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, guarded, launch, pick
from ._tuning import AotSpec, rows_bucket, tuned_tile


class HeadOut(NamedTuple):
    proc: torch.Tensor | None  # [L, V] out_dtype: softcap(logits) / temperature (None with raw=True)
    argmax: torch.Tensor  # [L] int64, first maximum
    entropy: torch.Tensor  # [L] fp32, nats, of softmax(proc)
    lse: torch.Tensor  # [L] fp32, logsumexp(proc)
    logits: torch.Tensor | None = None  # [L, V] h's dtype, before softcap and temperature (raw=True only)


def _check(h, weight, weight_scale):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h {tuple(h.shape)} must be [L, H] and weight {tuple(weight.shape)} [V, H]")
    if weight.dtype == torch.int8:
        if weight_scale is None or weight_scale.shape != (weight.shape[0],):
            raise ValueError(f"int8 weight needs weight_scale of shape [{weight.shape[0]}]")
    elif weight_scale is not None:
        raise ValueError("weight_scale is only for int8 weights")


def _temperature(temperature, device) -> torch.Tensor:
    """A 1-element fp32 tensor on device (a tensor stays on device: no host sync, graph friendly)."""
    return torch.as_tensor(temperature, dtype=torch.float32, device=device).reshape(1)


def _out(out, L, V, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(L, V, dtype=dtype, device=device)
    if out.shape != (L, V) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{L}, {V}] {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    return out


def combine(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, arg: torch.Tensor):
    """Merge per-chunk partials [L, C] (chunk order = vocabulary order) into (argmax, entropy, lse)."""
    M = m.max(dim=-1, keepdim=True).values
    a = torch.exp(m - M)
    S = (a * s).sum(-1)
    Tt = (a * (t + (m - M) * s)).sum(-1)
    first = (m == M).int().argmax(-1, keepdim=True)  # earliest chunk holding the maximum
    argmax = arg.gather(-1, first).squeeze(-1).long()
    logS = torch.log(S)
    return argmax, logS - Tt / S, M.squeeze(-1) + logS


def process_ref(logits: torch.Tensor, softcap: float | None, temperature) -> torch.Tensor:
    """softcap(logits) / temperature in fp32, `lm_head_ref`'s arithmetic (logits: the model's, rounded)."""
    x = logits.float()
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    return x / _temperature(temperature, logits.device)


def lm_head_ref(h, weight, temperature, softcap: float | None = 30.0, weight_scale=None,
                out_dtype=torch.float32, chunk: int = 16384, out: torch.Tensor | None = None,
                raw: bool = False) -> HeadOut:
    """PyTorch, one vocabulary chunk at a time (fp32 intermediates of [L, chunk] only)."""
    _check(h, weight, weight_scale)
    L, V = h.shape[0], weight.shape[0]
    temp = _temperature(temperature, h.device)
    proc = _out(out, L, V, h.dtype if raw else out_dtype, h.device)
    parts = []
    for v0 in range(0, V, chunk):
        w = weight[v0:v0 + chunk]
        if weight_scale is None:
            x = F.linear(h, w).float()  # in the model dtype, like Embedding.head
        else:
            x = (F.linear(h.float(), w.float()) * weight_scale[v0:v0 + chunk].float()).to(h.dtype).float()
        if raw:
            proc[:, v0:v0 + chunk] = x
        x = process_ref(x, softcap, temp)
        if not raw:
            proc[:, v0:v0 + chunk] = x
        m, a = x.max(dim=-1)
        d = x - m[:, None]
        b = torch.exp(d)
        parts.append((m, b.sum(-1), (b * d).sum(-1), a + v0))
    m, s, t, arg = (torch.stack(p, dim=-1) for p in zip(*parts))
    return _result(proc, raw, *combine(m, s, t, arg))


def _result(written, raw, argmax, entropy, lse) -> HeadOut:
    return HeadOut(None, argmax, entropy, lse, written) if raw else HeadOut(written, argmax, entropy, lse)


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._matmul import dot_tile

    @triton.jit
    def process_logits(x, softcap, temp, HAS_CAP: tl.constexpr):
        """softcap(x) / temp for fp32 x (the logits as the model rounds them): the head kernel's
        arithmetic, shared by every kernel that makes proc from raw logits (the same floats)."""
        if HAS_CAP:
            y = x / softcap
            e = tl.exp(-2.0 * tl.abs(y))
            th = (1.0 - e) / (1.0 + e)
            x = tl.where(y >= 0, th, -th) * softcap
        return x / temp

    @triton.jit
    def _process_kernel(x_ptr, temp_ptr, out_ptr, n, softcap, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
        """out = process_logits(x) over n flat elements."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, process_logits(x, softcap, tl.load(temp_ptr), HAS_CAP), mask=ok)

    @triton.jit
    def _lm_head_kernel(
        h_ptr, w_ptr, ws_ptr, temp_ptr, out_ptr, pm_ptr, ps_ptr, pt_ptr, pa_ptr,
        L, V, K, softcap,
        stride_hl, stride_wv, stride_ol, stride_pl,
        HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr, EVEN_K: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RAW: tl.constexpr = False,
    ):
        pid_m = tl.program_id(0)  # fastest: the row tiles of one vocabulary tile run together (L2 reuse)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < L
        col_ok = cols < V
        acc = dot_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_hl, stride_wv,
                       HAS_SCALE, EVEN_K, FP32, BLOCK_M, BLOCK_N, BLOCK_K)  # int8 codes when scaled
        if HAS_SCALE:
            acc = acc * tl.load(ws_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x = acc.to(h_ptr.dtype.element_ty).to(tl.float32)  # the model's logits are in its dtype
        o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_ol + cols[None, :]
        if RAW:  # the logits themselves (h's dtype): consumers make proc with process_logits
            tl.store(o_ptrs, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        x = process_logits(x, softcap, tl.load(temp_ptr), HAS_CAP)
        if not RAW:
            tl.store(o_ptrs, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

        xm = tl.where(col_ok[None, :], x, float("-inf"))
        m = tl.max(xm, axis=1)
        arg = tl.argmax(xm, axis=1)
        d = x - m[:, None]  # x itself is finite on masked columns (zero weights): no inf·0
        b = tl.where(col_ok[None, :], tl.exp(d), 0.0)
        s = tl.sum(b, axis=1)
        t = tl.sum(b * d, axis=1)
        p = rows.to(tl.int64) * stride_pl + pid_n
        tl.store(pm_ptr + p, m, mask=row_ok)
        tl.store(ps_ptr + p, s, mask=row_ok)
        tl.store(pt_ptr + p, t, mask=row_ok)
        tl.store(pa_ptr + p, arg + pid_n * BLOCK_N, mask=row_ok)

    @triton.jit
    def _combine_kernel(pm_ptr, ps_ptr, pt_ptr, pa_ptr, arg_out, ent_out, lse_out, C, stride_pl,
                        BLOCK_C: tl.constexpr):
        """`combine` for one row of C <= BLOCK_C partials, element for element the same arithmetic
        (so the same NaNs); only the two sums' order differs from torch's (a fixed tree: deterministic)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_C)
        ok = offs < C
        base = row.to(tl.int64) * stride_pl
        m = tl.load(pm_ptr + base + offs, mask=ok, other=float("-inf"))
        s = tl.load(ps_ptr + base + offs, mask=ok, other=0.0)
        t = tl.load(pt_ptr + base + offs, mask=ok, other=0.0)
        M = tl.max(m, 0)
        # torch's max propagates NaN; Triton's need not (fmax on the GPU): say it explicitly
        M = tl.where(tl.sum((m != m).to(tl.int32), 0) > 0, float("nan"), M)
        d = m - M
        a = tl.exp(d)
        S = tl.sum(tl.where(ok, a * s, 0.0), 0)
        Tt = tl.sum(tl.where(ok, a * (t + d * s), 0.0), 0)
        first = tl.min(tl.where(ok & (m == M), offs, BLOCK_C), 0)  # the earliest chunk holding the max
        first = tl.where(first == BLOCK_C, 0, first)  # none (a NaN max): chunk 0, as torch's argmax of zeros
        logS = tl.log(S)
        tl.store(arg_out + row, tl.load(pa_ptr + base + first).to(tl.int64))
        tl.store(ent_out + row, logS - Tt / S)
        tl.store(lse_out + row, M + logS)


DEFAULT_TILE = (64, 128, 64, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
DEFAULT_TILE_INT8 = (128, 128, 64, 8, 3)  # int8 codes: (64, 128, 64, 4) spills on sm_89 (python -m kernels.aot)
_TILES = ((64, 128, 64, 4, 3), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
          (64, 256, 64, 8, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3))
# 120 and 128 KB of shared memory with a bf16/fp16 embedding: more than sm_89/sm_120's 99 KB per block
_LARGE = frozenset({(64, 256, 64, 8, 4), (128, 128, 128, 8, 3)})


def _default(weight) -> tuple:
    return DEFAULT_TILE_INT8 if weight.dtype == torch.int8 else DEFAULT_TILE


def _large(weight) -> frozenset:
    return frozenset() if weight.dtype == torch.int8 else _LARGE


def _tune_key(h, weight, out_dtype):
    """What the tile choice depends on: dtypes, the embedding's shape, the row count's bucket."""
    return (h.dtype, weight.dtype, out_dtype, rows_bucket(h.shape[0]), weight.shape[1], weight.shape[0])


def lm_head_triton(h, weight, temperature, softcap: float | None = 30.0, weight_scale=None,
                   out_dtype=torch.float32, tile: tuple | None = None, out: torch.Tensor | None = None,
                   raw: bool = False) -> HeadOut:
    """The Triton path; `tile` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), else autotuned on CUDA."""
    _check(h, weight, weight_scale)
    h, weight = h.contiguous(), weight.contiguous()
    L, K = h.shape
    V = weight.shape[0]
    temp = _temperature(temperature, h.device)
    out_dtype = h.dtype if raw else out_dtype
    proc = _out(out, L, V, out_dtype, h.device)
    if L == 0:
        z = torch.empty(0, device=h.device)
        return _result(proc, raw, z.long(), z, z)

    def run(cfg, warmup=False):
        bm, bn, bk, warps, stages = cfg
        n_tiles = triton.cdiv(V, bn)
        part = torch.empty(4, L, n_tiles, dtype=torch.float32, device=h.device)
        arg = torch.empty(L, n_tiles, dtype=torch.int32, device=h.device)
        kernel = launch(
            _lm_head_kernel, h.device, (triton.cdiv(L, bm), n_tiles), h, weight, weight_scale if weight_scale is not None else h, temp, proc,
            part[0], part[1], part[2], arg,
            L, V, K, float(softcap or 1.0),
            h.stride(0), weight.stride(0), proc.stride(0), n_tiles,
            HAS_SCALE=weight_scale is not None, HAS_CAP=bool(softcap), EVEN_K=K % bk == 0,
            FP32=h.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, RAW=raw,
            num_warps=warps, num_stages=stages, warmup=warmup,
        )
        return kernel if warmup else (part, arg)

    if tile is None:
        tile = tuned_tile("lm_head", _tune_key(h, weight, out_dtype), _TILES, _large(weight), run, _default(weight),
                          h.device)
    part, arg = run(tile)
    return _result(proc, raw, *guarded(combine_triton, lambda: combine(part[0], part[1], part[2], arg),
                                       part[0], part[1], part[2], arg))


PROCESS_BLOCK, PROCESS_WARPS = 2048, 8


def process_triton(logits: torch.Tensor, softcap: float | None, temperature) -> torch.Tensor:
    """`process_ref` with the head kernel's arithmetic (`process_logits`): one pass, fp32 out."""
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    n = logits.numel()
    if n:
        launch(_process_kernel, logits.device, (triton.cdiv(n, PROCESS_BLOCK),), logits,
               _temperature(temperature, logits.device), out, n, float(softcap or 1.0), HAS_CAP=bool(softcap),
               BLOCK=PROCESS_BLOCK, num_warps=PROCESS_WARPS)
    return out


COMBINE_WARPS = 4


def combine_triton(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, arg: torch.Tensor):
    """`combine` in one launch: m, s, t fp32 and arg int32, [L, C] with a common row stride and a unit
    column stride (the head kernel's partials). Same results but the sums' order (to rounding)."""
    L, C = m.shape
    if not (s.shape == t.shape == arg.shape == m.shape and m.stride() == s.stride() == t.stride() == arg.stride()
            and m.stride(1) == 1):
        raise ValueError("m, s, t, arg must be [L, C] with one row stride and contiguous rows")
    out_arg = torch.empty(L, dtype=torch.int64, device=m.device)
    ent, lse = torch.empty(2, L, dtype=torch.float32, device=m.device)
    if L:
        launch(_combine_kernel, m.device, (L,), m, s, t, arg, out_arg, ent, lse, C, m.stride(0),
               BLOCK_C=max(16, triton.next_power_of_2(C)), num_warps=COMBINE_WARPS)
    return out_arg, ent, lse


def _aot():
    """Compile specs for `python -m kernels.aot`: the head as the engine launches it (raw=True: the
    logits in bf16), bf16 rows against the bf16 embedding ("lm_head") and the int8 one
    ("lm_head.int8"), the real shapes (L 256, H 2816, V 262144), every tile."""
    for name, w, scaled in (("lm_head", "*bf16", False), ("lm_head.int8", "*i8", True)):
        sig = {"h_ptr": "*bf16", "w_ptr": w, "ws_ptr": "*fp16" if scaled else "*bf16", "temp_ptr": "*fp32",
               "out_ptr": "*bf16", "pm_ptr": "*fp32", "ps_ptr": "*fp32", "pt_ptr": "*fp32", "pa_ptr": "*i32",
               "L": "i32", "V": "i32", "K": "i32", "softcap": "fp32",
               "stride_hl": "i32", "stride_wv": "i32", "stride_ol": "i32", "stride_pl": "i32"}
        default, large = (DEFAULT_TILE_INT8, frozenset()) if scaled else (DEFAULT_TILE, _LARGE)
        for tile in dict.fromkeys((default, *_TILES)):
            bm, bn, bk, warps, stages = tile
            yield AotSpec(name, _lm_head_kernel, sig,
                          dict(HAS_SCALE=scaled, HAS_CAP=True, EVEN_K=True, FP32=False,
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, RAW=True), warps, stages,
                          dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages),
                          default=tile == default, large=tile in large,
                          divisible=("L", "V", "K", "stride_hl", "stride_wv", "stride_ol"))


def _aot_combine():
    """The combine at the real vocabulary, one spec per BLOCK_N the tiles use (C = 262144 / BLOCK_N)."""
    sig = {"pm_ptr": "*fp32", "ps_ptr": "*fp32", "pt_ptr": "*fp32", "pa_ptr": "*i32", "arg_out": "*i64",
           "ent_out": "*fp32", "lse_out": "*fp32", "C": "i32", "stride_pl": "i32"}
    for bn in sorted({t[1] for t in _TILES}):
        c = 262144 // bn
        yield AotSpec("lm_head.combine", _combine_kernel, sig, dict(BLOCK_C=c), COMBINE_WARPS, 1,
                      dict(BLOCK_C=c, num_warps=COMBINE_WARPS), default=bn == DEFAULT_TILE[1],
                      divisible=("C", "stride_pl"))


def _aot_process():
    """proc from bf16 logits (the fused draw's fallback), at the step's size."""
    sig = {"x_ptr": "*bf16", "temp_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "softcap": "fp32"}
    yield AotSpec("lm_head.process", _process_kernel, sig, dict(HAS_CAP=True, BLOCK=PROCESS_BLOCK), PROCESS_WARPS, 1,
                  dict(BLOCK=PROCESS_BLOCK, num_warps=PROCESS_WARPS), default=True, divisible=("n",))


AOT = [*_aot(), *_aot_combine(), *_aot_process()] if HAS_TRITON else []


def lm_head(h, weight, temperature, softcap: float | None = 30.0, weight_scale=None,
            out_dtype=torch.float32, out: torch.Tensor | None = None, raw: bool = False) -> HeadOut:
    """h [L, H] · weight [V, H]ᵀ -> HeadOut(proc, argmax, entropy, lse); Triton on CUDA, else reference.
    `out`: a contiguous [L, V] tensor of out_dtype to write proc into (a CUDA graph's fixed buffer).
    raw: write the logits in h's dtype instead (HeadOut.logits, into `out` of that dtype; proc None);
    `process` turns them into proc."""
    return pick(lm_head_triton, lm_head_ref, h)(h, weight, temperature, softcap, weight_scale, out_dtype, out=out,
                                                raw=raw)


def process(logits: torch.Tensor, softcap: float | None, temperature) -> torch.Tensor:
    """The fp32 proc of raw logits (any shape), as the head on the same path (Triton or reference)
    would have written it."""
    return pick(process_triton, process_ref, logits)(logits, softcap, temperature)

