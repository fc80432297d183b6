"""Weight-only int8 linear (W8A16): y = x @ (q · s[:, None])ᵀ, one scale per output row.

For the dense projections and the embedding when the VRAM planner puts them in int8 (docs/quantization.md:
scheme S3). Weights q int8 [N, K], scales s [N] (fp16/bf16/fp32), activations x [M, K] in
fp16/bf16/fp32; the output is [M, N] in x's dtype. The int8 codes convert exactly to fp16/bf16
inside the kernel and go to `tl.dot` with fp32 accumulation; the row scale multiplies the
accumulator in the epilogue, so there is no rounding of q·s. At M = 256 (one canvas) these GEMMs
are compute-bound on GeForce cards (docs/benchmarks.md, floors), so this halves their weight traffic but not
their FLOPs. The W8A8 integer-tensor-core path is a separate, opt-in kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, launch, use_triton
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

    from ._matmul import dot_tile

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


DEFAULT_TILE = (64, 64, 64, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
_TILES = ((64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
          (128, 256, 64, 8, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (32, 128, 64, 4, 4))
_LARGE = frozenset()  # tiles over a 99 KB part's shared memory (python -m kernels.aot measures them)


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


AOT = list(_aot()) if HAS_TRITON else []


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] · (q · s)ᵀ -> [..., N] in x's dtype; Triton on CUDA, else the reference."""
    flat = x.reshape(-1, x.shape[-1])
    if use_triton(x):
        y = int8_linear_triton(flat, q, s)
    else:
        y = int8_linear_ref(flat, q, s)
    return y.view(*x.shape[:-1], q.shape[0])
