"""Attention's q/k/v projections, their RMSNorms and RoPE in one kernel, int8 weights.

`dgcli.model.Attention.qkv` on int8-per-row weights is three kernels.int8_linear launches (two on
the full layers, where V is the raw k_proj output) and three kernels.rmsnorm norms (q and k with
RoPE, v without weight), each norm reading back a projection's output and writing it again. Here one
launch does it all: a program computes one whole head for BLOCK_M rows, as two [BLOCK_M, D/2] tiles
(`_matmul.dot_tile_halves`: the halves RoPE pairs, dim i with i + D/2), norms it and rotates it, and
writes it head-major, (B, Hx, T, D), the layout attention reads. The grid's second axis walks the
query heads, then the key heads, then (sliding layers) the value heads; on the full layers each key
head also writes its value head (K=V: the same projection, normed again without weight).
On the static cache's decoder (`kv_into` = the cache's (keys, values, slots), one sequence) the key
and value heads are written straight into the cache instead, row t of head h to [0, h, slots[t]]
(SCATTER): the canvas's K/V need no copy into the cache after, and no (B, Hk, T, D) tensors. Only
the store addresses change, not a value.

Rounding is the unfused CUDA path's, step by step (x's dtype `dt`, bf16 in the model):
    p = (acc · s).to(dt)                                 int8_linear's output
    r = 1 / sqrt_rn(Σp² / D + eps)                        kernels.rmsnorm's (_inv_rms, fp32)
    n = (p · r · w).to(dt)                               the norm's output (v: no w)
    q/k: (n1·c1).to(dt) + (-(n2·s1)).to(dt), (n2·c2).to(dt) + (n1·s2).to(dt), each sum to dt   RoPE
The fp32 dot sums in int8_linear's order (the same K blocks). Each norm sums its squares as its
unfused kernel does: q/k per half, the halves added (kernels.rmsnorm's rope kernel), v over the
whole row at once (its plain kernel; the halves joined, so K=V heads compute both sums). The order
within a sum follows the tile's layout, which differs from the unfused kernels' on a GPU: with
inputs whose sums are exact the result is the unfused path's bit for bit (the tests' check),
otherwise a rare element differs by one unit in the last place.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, launch, pick
from ._tuning import AotSpec, rows_bucket, tuned_tile
from .int8_linear import int8_linear_ref
from .rmsnorm import _block, rmsnorm_ref, rmsnorm_rope_ref

MAX_HEAD_DIM = 512  # the released model's widest head; compiled without spills up to here (see _TILES)


def _check(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, cos, sin, head_dim):
    D = head_dim
    if x.dim() != 3 or D % 2 or D > MAX_HEAD_DIM or cos.shape != (x.shape[1], D) or sin.shape != cos.shape:
        raise ValueError(f"x {tuple(x.shape)} must be (B, T, K), cos/sin (T, {D}), head dim even and <= "
                         f"{MAX_HEAD_DIM}; got cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    K = x.shape[-1]
    for name, w, s in (("q", wq, sq), ("k", wk, sk), ("v", wv, sv)):
        if w is None and name == "v":
            continue
        if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != K or w.shape[0] % D or s.shape != (w.shape[0],):
            raise ValueError(f"{name}: codes {tuple(w.shape)} {w.dtype}, scales {tuple(s.shape)}: want int8 "
                             f"[heads · {D}, {K}] and [heads · {D}]")
    if wv is not None and wv.shape != wk.shape:
        raise ValueError(f"v {tuple(wv.shape)} and k {tuple(wk.shape)} must have the same shape")
    for name, w in (("q", q_weight), ("k", k_weight)):
        if w.shape != (D,):
            raise ValueError(f"{name} norm weight {tuple(w.shape)} must be [{D}]")


def _check_into(kv_into, x, Hk: int, D: int):
    """kv_into = (keys, values, slots): two (1, Hk, S, D) buffers in x's dtype and [T] int64 slots."""
    keys, values, slots = kv_into
    B, T, _ = x.shape
    want = (1, Hk, keys.shape[2] if keys.dim() == 4 else -1, D)
    for name, buf in (("keys", keys), ("values", values)):
        if (B != 1 or tuple(buf.shape) != want or buf.dtype != x.dtype or not buf.is_contiguous()
                or buf.device != x.device):
            raise ValueError(f"kv_into {name} {tuple(buf.shape)} {buf.dtype}: want a contiguous {want} buffer in "
                             f"{x.dtype} for one sequence (x {tuple(x.shape)})")
    if slots.shape != (T,) or slots.dtype != torch.int64 or slots.device != x.device:
        raise ValueError(f"kv_into slots {tuple(slots.shape)} {slots.dtype}: want [{T}] int64")


def qkv_int8_ref(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, eps: float, cos, sin, head_dim: int,
                 kv_into=None):
    """The unfused arithmetic (Attention.qkv on int8 linears, their references): q, k, v as (B, Hx, T, D).
    wv/sv None: V is the raw k projection (the full layers). kv_into = (keys, values, slots): K/V
    copied into those cache slots (as StaticKVCache.decode_kv would) and returned as None."""
    _check(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, cos, sin, head_dim)
    if kv_into is not None:
        _check_into(kv_into, x, wk.shape[0] // head_dim, head_dim)
    B, T, K = x.shape
    flat = x.reshape(B * T, K)

    def proj(w, s):
        return int8_linear_ref(flat, w, s).view(B, T, -1, head_dim)

    q = rmsnorm_rope_ref(proj(wq, sq), q_weight, eps, cos, sin)
    k_raw = proj(wk, sk)
    v = rmsnorm_ref(proj(wv, sv) if wv is not None else k_raw, None, eps)
    k = rmsnorm_rope_ref(k_raw, k_weight, eps, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kv_into is None:
        return q, k, v
    keys, values, slots = kv_into
    keys.index_copy_(2, slots, k)
    values.index_copy_(2, slots, v)
    return q, None, None


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._matmul import dot_tile_halves
    from .rmsnorm import _inv_rms

    @triton.jit
    def _head(x_ptr, w_ptr, s_ptr, nw_ptr, cos_ptr, sin_ptr, out_ptr, v_ptr, slot_ptr, head, H, rows, row_ok,
              M, T, K, D, eps, stride_xm, stride_w, stride_cos, stride_sin, stride_kvh,
              ROPE: tl.constexpr, ALSO_V: tl.constexpr, SCATTER: tl.constexpr, EVEN_K: tl.constexpr,
              FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """Head `head` of H (one projection's) for `rows`, stored head-major: ROPE, the q/k norm with
        its weight and RoPE to out (and, ALSO_V, the weightless v norm to v_ptr); else the v norm to v_ptr.
        SCATTER (one sequence): row t goes to slot slot_ptr[t] of a buffer whose heads are
        stride_kvh elements apart, not to row t of a (B, H, T, D) tensor (only k/v heads scatter)."""
        half = D // 2
        offs = tl.arange(0, BLOCK_H)
        ok = offs < half
        cols = head * D + offs
        acc1, acc2 = dot_tile_halves(x_ptr, w_ptr, rows, cols, row_ok, ok, K, half, stride_xm, stride_w,
                                     True, EVEN_K, FP32, BLOCK_M, BLOCK_H, BLOCK_K)
        dt = out_ptr.dtype.element_ty
        p1 = (acc1 * tl.load(s_ptr + cols, mask=ok, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        p2 = (acc2 * tl.load(s_ptr + cols + half, mask=ok, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        b = rows // T
        t = rows % T
        mask = row_ok[:, None] & ok[None, :]
        if SCATTER:  # into the KV cache's slots for these rows: buffer[0, head, slot[t], :]
            slot = tl.load(slot_ptr + t, mask=row_ok, other=0).to(tl.int64)
            dst = (head.to(tl.int64) * stride_kvh + slot * D)[:, None] + offs[None, :]
        else:
            dst = ((b.to(tl.int64) * H + head) * T + t)[:, None] * D + offs[None, :]  # (B, H, T, D)
        if ALSO_V or not ROPE:  # a v norm (no weight): the row's squares in one sum, as rmsnorm's kernel
            sq = tl.reshape(tl.permute(tl.join(p1 * p1, p2 * p2), (0, 2, 1)), (BLOCK_M, 2 * BLOCK_H))
            rv = _inv_rms(tl.sum(sq, axis=1), D, eps)[:, None]
            tl.store(v_ptr + dst, (p1 * rv).to(dt), mask=mask)
            tl.store(v_ptr + dst + half, (p2 * rv).to(dt), mask=mask)
        if not ROPE:
            return
        # a q/k norm: the halves' sums added, as rmsnorm's rope kernel
        r = _inv_rms(tl.sum(p1 * p1, axis=1) + tl.sum(p2 * p2, axis=1), D, eps)[:, None]
        n1 = p1 * r
        n2 = p2 * r
        n1 = n1 * tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)[None, :]
        n2 = n2 * tl.load(nw_ptr + half + offs, mask=ok, other=0.0).to(tl.float32)[None, :]
        n1 = n1.to(dt).to(tl.float32)  # the norm's output
        n2 = n2.to(dt).to(tl.float32)
        # x·cos + cat(-x2, x1)·sin, each product and the sum rounded, as kernels.rmsnorm
        c = cos_ptr + t.to(tl.int64)[:, None] * stride_cos + offs[None, :]
        s = sin_ptr + t.to(tl.int64)[:, None] * stride_sin + offs[None, :]
        c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
        o1 = (n1 * c1).to(dt).to(tl.float32) + (-(n2 * s1)).to(dt).to(tl.float32)
        c2 = tl.load(c + half, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s + half, mask=mask, other=0.0).to(tl.float32)
        o2 = (n2 * c2).to(dt).to(tl.float32) + (n1 * s2).to(dt).to(tl.float32)
        tl.store(out_ptr + dst, o1.to(dt), mask=mask)
        tl.store(out_ptr + dst + half, o2.to(dt), mask=mask)

    @triton.jit
    def _qkv_int8_kernel(
        x_ptr, wq_ptr, sq_ptr, wk_ptr, sk_ptr, wv_ptr, sv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
        q_ptr, k_ptr, v_ptr, slot_ptr, M, T, K, D, Hq, Hk, eps,
        stride_xm, stride_wq, stride_wk, stride_wv, stride_cos, stride_sin, stride_kvh,
        K_IS_V: tl.constexpr, SCATTER: tl.constexpr, EVEN_K: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Grid (row tiles, Hq + Hk [+ Hk]): query heads, key heads, then value heads (unless K_IS_V).
        SCATTER: k_ptr/v_ptr are KV-cache buffers and the key/value heads' rows go to their slots."""
        pid_m = tl.program_id(0)  # fastest: the row tiles sharing a head's weights run together
        h = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if h < Hq:
            _head(x_ptr, wq_ptr, sq_ptr, qw_ptr, cos_ptr, sin_ptr, q_ptr, v_ptr, slot_ptr, h, Hq, rows, row_ok,
                  M, T, K, D, eps, stride_xm, stride_wq, stride_cos, stride_sin, stride_kvh,
                  True, False, False, EVEN_K, FP32, BLOCK_M, BLOCK_H, BLOCK_K)
        elif h < Hq + Hk:
            _head(x_ptr, wk_ptr, sk_ptr, kw_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, h - Hq, Hk, rows, row_ok,
                  M, T, K, D, eps, stride_xm, stride_wk, stride_cos, stride_sin, stride_kvh,
                  True, K_IS_V, SCATTER, EVEN_K, FP32, BLOCK_M, BLOCK_H, BLOCK_K)
        else:
            _head(x_ptr, wv_ptr, sv_ptr, kw_ptr, cos_ptr, sin_ptr, v_ptr, v_ptr, slot_ptr, h - Hq - Hk, Hk, rows,
                  row_ok, M, T, K, D, eps, stride_xm, stride_wv, stride_cos, stride_sin, stride_kvh,
                  False, False, SCATTER, EVEN_K, FP32, BLOCK_M, BLOCK_H, BLOCK_K)


# (BLOCK_M, BLOCK_K, warps, stages) by head dim; BLOCK_H is half the head dim (at least 16). Two
# [BLOCK_M, D/2] fp32 tiles per program plus RoPE's tables: these compile without spills within a
# 99 KB part's shared memory on sm_89/90/120 (python -m kernels.aot --kernel qkv_int8; at D 512 every
# 4-warp tile over 16 rows spills, at D 256 16-row and 8-warp 32-row tiles spill on some target).
_TILES = {256: ((32, 64, 4, 3), (32, 32, 4, 4), (64, 64, 8, 3)),
          512: ((32, 64, 8, 3), (16, 64, 4, 3))}


def tiles(head_dim: int) -> tuple:
    """The candidate tiles for a head dim (the first is the default): D 512's above 256, else D 256's."""
    return _TILES[512 if head_dim > 256 else 256]


_LARGE = frozenset()


def qkv_int8_triton(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, eps: float, cos, sin, head_dim: int,
                    tile: tuple | None = None, kv_into=None):
    """The Triton path: q, k, v as (B, Hx, T, D), each contiguous; `tile` = (BLOCK_M, BLOCK_K, warps,
    stages), else autotuned on CUDA. cos/sin in x's dtype. kv_into = (keys, values, slots), one
    sequence: K and V go straight into the cache buffers keys/values (1, Hk, S, D), row t of head h to
    [0, h, slots[t]] (the decoder's canvas slots, no copy after), and come back as None."""
    _check(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, cos, sin, head_dim)
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"cos/sin {cos.dtype}/{sin.dtype} must be x's dtype {x.dtype}")
    B, T, K = x.shape
    D = head_dim
    Hq, Hk = wq.shape[0] // D, wk.shape[0] // D
    scatter = kv_into is not None
    if scatter:
        _check_into(kv_into, x, Hk, D)
    flat = x.reshape(B * T, K).contiguous()
    wq, sq, wk, sk, q_weight, k_weight = (t.contiguous() for t in (wq, sq, wk, sk, q_weight, k_weight))
    k_is_v = wv is None
    wv, sv = (wk, sk) if k_is_v else (wv.contiguous(), sv.contiguous())
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    q = torch.empty(B, Hq, T, D, dtype=x.dtype, device=x.device)
    if scatter:
        k, v, slots = kv_into
    else:
        k = torch.empty(B, Hk, T, D, dtype=x.dtype, device=x.device)
        v = torch.empty(B, Hk, T, D, dtype=x.dtype, device=x.device)
        slots = k  # any pointer: not read with SCATTER off
    M = B * T
    if M == 0:
        return (q, None, None) if scatter else (q, k, v)
    heads = Hq + Hk + (0 if k_is_v else Hk)
    block_h = _block(D // 2)

    def run(cfg, warmup=False):
        bm, bk, warps, stages = cfg
        return launch(
            _qkv_int8_kernel, x.device, (triton.cdiv(M, bm), heads),
            flat, wq, sq, wk, sk, wv, sv, q_weight, k_weight, cos, sin, q, k, v, slots, M, T, K, D, Hq, Hk,
            float(eps), flat.stride(0), wq.stride(0), wk.stride(0), wv.stride(0), cos.stride(0), sin.stride(0),
            k.stride(1), K_IS_V=k_is_v, SCATTER=scatter, EVEN_K=K % bk == 0, FP32=x.dtype == torch.float32,
            BLOCK_M=bm, BLOCK_H=block_h, BLOCK_K=bk, num_warps=warps, num_stages=stages, warmup=warmup,
        )

    if tile is None:  # (a scatter's timing runs write the same rows again: harmless)
        key = (x.dtype, rows_bucket(M), K, D, Hq, Hk, k_is_v, scatter)
        tile = tuned_tile("qkv_int8", key, tiles(D), _LARGE, run, tiles(D)[0], x.device)
    run(tile)
    return (q, None, None) if scatter else (q, k, v)


def qkv_int8(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, eps: float, cos, sin, head_dim: int, kv_into=None):
    """Attention.qkv on int8-per-row projections: x (B, T, K) -> q, k, v (B, Hx, T, D); Triton on CUDA
    (head-major buffers), else the reference. kv_into = (keys, values, slots): K/V written into those
    cache slots instead (by the kernel, or the reference's index_copy_), returned as None."""
    fn = pick(qkv_int8_triton, qkv_int8_ref, x)
    return fn(x, wq, sq, wk, sk, wv, sv, q_weight, k_weight, eps, cos, sin, head_dim, kv_into=kv_into)


def _aot():
    """Compile specs for `python -m kernels.aot`: bf16 activations, fp16 scales, hidden 2816; the
    sliding layers (D 256, separate V) and the full layers (D 512, K=V), every candidate tile, as the
    decoder launches them (SCATTER: K/V into the cache's slots); `.prefill`: as the encoder does
    (fresh K/V; no slot index, k in its place)."""
    sig = {"x_ptr": "*bf16", "wq_ptr": "*i8", "sq_ptr": "*fp16", "wk_ptr": "*i8", "sk_ptr": "*fp16",
           "wv_ptr": "*i8", "sv_ptr": "*fp16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "cos_ptr": "*bf16",
           "sin_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i64",
           "M": "i32", "T": "i32", "K": "i32", "D": "i32", "Hq": "i32", "Hk": "i32", "eps": "fp32",
           "stride_xm": "i32", "stride_wq": "i32", "stride_wk": "i32", "stride_wv": "i32", "stride_cos": "i32",
           "stride_sin": "i32", "stride_kvh": "i32"}
    divisible = ("M", "T", "K", "D", "stride_xm", "stride_wq", "stride_wk", "stride_wv", "stride_cos",
                 "stride_sin", "stride_kvh")
    for head_dim, k_is_v in ((256, False), (512, True)):
        for scatter in (True, False):
            name = f"qkv_int8.d{head_dim}" + ("" if scatter else ".prefill")
            signature = sig if scatter else dict(sig, slot_ptr="*bf16")  # the prefill passes k, unread
            for tile in tiles(head_dim):
                bm, bk, warps, stages = tile
                yield AotSpec(name, _qkv_int8_kernel, signature,
                              dict(K_IS_V=k_is_v, SCATTER=scatter, EVEN_K=True, FP32=False, BLOCK_M=bm,
                                   BLOCK_H=_block(head_dim // 2), BLOCK_K=bk),
                              warps, stages, dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages),
                              default=tile == tiles(head_dim)[0], large=tile in _LARGE,
                              divisible=divisible)


AOT = list(_aot()) if HAS_TRITON else []
