"""Weight-only int8 linear (W8A16): y = x @ (q · s[:, None])ᵀ, one scale per output row.

For the dense projections and the embedding when the VRAM planner puts them in int8 (docs/quantization.md:
scheme S3). Weights q int8 [N, K], scales s [N] (fp16/bf16/fp32), activations x [M, K] in
fp16/bf16/fp32; the output is [M, N] in x's dtype. The int8 codes convert exactly to fp16/bf16
inside the kernel and go to `tl.dot` with fp32 accumulation; the row scale multiplies the
accumulator in the epilogue, so there is no rounding of q·s. At M = 256 (one canvas) these GEMMs
are compute-bound on GeForce cards (docs/benchmarks.md, floors), so this halves their weight traffic but not
their FLOPs. The W8A8 integer-tensor-core path is a separate, opt-in kernel.

`int8_linear_heads` is the same linear over attention's output heads as SDPA left them, (B, T, H1,
H2, D) with any strides but a contiguous head (the grouped decoder's (B, T, Hk, groups, D) view of
CUDA's [B, groups·T, Hk, D] buffer): o_proj reads them in place instead of after a flattening copy,
with the same K blocks in the same order, so the result is int8_linear's on the copy, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, launch, pick
from ._tuning import AotSpec, rows_bucket, tuned_tile


def quantize_int8_oracle(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w [N, K]: (q int8 [N, K], s fp16 [N]) with w ≈ q · s: the test oracle for quant.formats.quantize_int8_row."""
    s = (w.float().abs().amax(-1) / 127.0).to(torch.float16)
    div = torch.where(s == 0, torch.ones_like(s), s).float()[:, None]
    return torch.round(w.float() / div).clamp(-127, 127).to(torch.int8), s


def _check(x, q, s):
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1] or s.shape != (q.shape[0],):
        raise ValueError(f"x {tuple(x.shape)}, q {tuple(q.shape)}, s {tuple(s.shape)}: want [M, K], [N, K], [N]")
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp32 matmul of x and the codes, times the row scale, cast to x's dtype."""
    _check(x, q, s)
    return (F.linear(x.float(), q.float()) * s.float()).to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._matmul import dot_tile, dot_tile_heads

    @triton.jit
    def _int8_linear_kernel(
        x_ptr, q_ptr, s_ptr, y_ptr, M, N, K,
        stride_xm, stride_qn, stride_ym,
        EVEN_K: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)  # fastest: the row tiles sharing a weight tile run together
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        acc = dot_tile(x_ptr, q_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_qn,
                       True, EVEN_K, FP32, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = acc * tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _int8_linear_heads_kernel(
        x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, T, D, H2,
        stride_xb, stride_xt, stride_xh1, stride_xh2, stride_qn, stride_ym,
        FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """_int8_linear_kernel with x (B, T, H1, H2, D) read in place: row m = b · T + t."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        a_rows = (rows // T).to(tl.int64) * stride_xb + (rows % T).to(tl.int64) * stride_xt
        acc = dot_tile_heads(x_ptr, q_ptr, a_rows, cols, row_ok, col_ok, K, stride_qn, D, H2, stride_xh1, stride_xh2,
                             True, FP32, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = acc * tl.load(s_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


DEFAULT_TILE = (64, 64, 64, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
_TILES = ((64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
          (128, 256, 64, 8, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (32, 128, 64, 4, 4))
_LARGE = frozenset()  # tiles over a 99 KB part's shared memory (python -m kernels.aot measures them)
# The heads kernel's: int8_linear's less the two that spill on sm_89/sm_120 (there as here)
_HEADS_TILES = tuple(t for t in _TILES if t not in ((128, 256, 64, 8, 3), (64, 128, 128, 4, 3)))


def _tune_key(x, q):
    """What the tile choice depends on: dtypes, the weight's shape, the row count's bucket."""
    return (x.dtype, rows_bucket(x.shape[0]), q.shape[0], q.shape[1])


def int8_linear_triton(x, q, s, tile: tuple | None = None) -> torch.Tensor:
    """The Triton path; `tile` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), else autotuned on CUDA."""
    _check(x, q, s)
    lead = x.shape[:-1]
    x, q, s = x.contiguous(), q.contiguous(), s.contiguous()
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)

    def run(cfg, warmup=False):
        bm, bn, bk, warps, stages = cfg
        return launch(
            _int8_linear_kernel, x.device, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
            x, q, s, y, M, N, K, x.stride(0), q.stride(0), y.stride(0),
            EVEN_K=K % bk == 0, FP32=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, num_stages=stages, warmup=warmup,
        )

    if tile is None:
        tile = tuned_tile("int8_linear", _tune_key(x, q), _TILES, _LARGE, run, DEFAULT_TILE, x.device)
    run(tile)
    return y.view(*lead, N)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) or (B, T, H1, H2, D) as 5 dims, a view."""
    if x.dim() == 4:
        x = x.unsqueeze(3)
    if x.dim() != 5 or x.stride(-1) != 1:
        raise ValueError(f"heads {tuple(x.shape)}, strides {x.stride()}: want (B, T, H[, H2], D), unit stride in D")
    return x


def int8_linear_heads_ref(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8_linear_ref over the heads flattened: (B, T, ..., D) -> (B, T, N)."""
    B, T = x.shape[:2]
    return int8_linear_ref(x.reshape(B * T, -1), q, s).view(B, T, -1)


def int8_linear_heads_triton(x, q, s, tile: tuple | None = None) -> torch.Tensor:
    """The Triton path of int8_linear_heads: x (B, T, H[, H2], D) read in place, D a multiple of 16;
    `tile` as int8_linear_triton's, its BLOCK_K cut to a divisor of D (each K block in one head)."""
    x = _heads(x)
    B, T, H1, H2, D = x.shape
    K = H1 * H2 * D
    if q.dim() != 2 or q.shape[1] != K or s.shape != (q.shape[0],) or q.dtype != torch.int8 or D % 16:
        raise ValueError(f"heads {tuple(x.shape)}, q {tuple(q.shape)} {q.dtype}, s {tuple(s.shape)}: want int8 "
                         f"[N, {K}], [N], head dim a multiple of 16")
    q, s = q.contiguous(), s.contiguous()
    M, N = B * T, q.shape[0]
    y = torch.empty(B, T, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    sb, st, sh1, sh2, _ = x.stride()

    def run(cfg, warmup=False):
        bm, bn, bk, warps, stages = cfg
        return launch(
            _int8_linear_heads_kernel, x.device, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
            x, q, s, y, M, N, K, T, D, H2, sb, st, sh1, sh2, q.stride(0), N,
            FP32=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=math.gcd(bk, D),
            num_warps=warps, num_stages=stages, warmup=warmup,
        )

    if tile is None:
        key = (x.dtype, rows_bucket(M), N, K, D)
        tile = tuned_tile("int8_linear_heads", key, _HEADS_TILES, _LARGE, run, DEFAULT_TILE, x.device)
    run(tile)
    return y


def int8_linear_heads(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Attention's output heads x (B, T, H[, H2], D) · (q · s)ᵀ -> (B, T, N); Triton (reading the heads
    in place) on CUDA, else the reference."""
    return pick(int8_linear_heads_triton, int8_linear_heads_ref, x)(x, q, s)


def _aot():
    """Compile specs for `python -m kernels.aot`: bf16 activations, the dense projections' shapes
    (K, N in 2112..4096, all multiples of 16), every candidate tile."""
    sig = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_qn": "i32", "stride_ym": "i32"}
    for tile in dict.fromkeys((DEFAULT_TILE, *_TILES)):
        bm, bn, bk, warps, stages = tile
        yield AotSpec("int8_linear", _int8_linear_kernel, sig,
                      dict(EVEN_K=True, FP32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps, stages,
                      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages),
                      default=tile == DEFAULT_TILE, large=tile in _LARGE,
                      divisible=("M", "N", "K", "stride_xm", "stride_qn", "stride_ym"))
    # o_proj over the grouped decoder's heads: D 256 or 512 (every BLOCK_K divides it), any strides
    heads = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
             "K": "i32", "T": "i32", "D": "i32", "H2": "i32", "stride_xb": "i32", "stride_xt": "i32",
             "stride_xh1": "i32", "stride_xh2": "i32", "stride_qn": "i32", "stride_ym": "i32"}
    for tile in dict.fromkeys((DEFAULT_TILE, *_HEADS_TILES)):
        bm, bn, bk, warps, stages = tile
        yield AotSpec("int8_linear.heads", _int8_linear_heads_kernel, heads,
                      dict(FP32=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps, stages,
                      dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages),
                      default=tile == DEFAULT_TILE, large=tile in _LARGE,
                      divisible=("M", "N", "K", "T", "D", "stride_xb", "stride_xt", "stride_xh1", "stride_xh2",
                                 "stride_qn", "stride_ym"))


AOT = list(_aot()) if HAS_TRITON else []


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] · (q · s)ᵀ -> [..., N] in x's dtype; Triton on CUDA, else the reference."""
    flat = x.reshape(-1, x.shape[-1])
    y = pick(int8_linear_triton, int8_linear_ref, x)(flat, q, s)
    return y.view(*x.shape[:-1], q.shape[0])
