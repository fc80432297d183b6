"""The dense GeGLU's first half in one kernel: h = gelu_tanh(x @ gateᵀ) * (x @ upᵀ), int8 weights.

`dgcli.model.MLP.gated` on int8-per-row weights (quant.runtime.QuantLinear -> kernels.int8_linear)
is two int8_linear launches, a gelu and a mul: four kernels, the gate and up outputs written and read
back twice. Here one program computes a [BLOCK_M, BLOCK_N] tile of both projections (the same output
columns of gate and up, each through `_matmul.dot_tile`) and writes h once.

Rounding is the unfused path's, step by step (x's dtype `dt`, bf16 in the model):
    g = (acc_g · s_g).to(dt)      u = (acc_u · s_u).to(dt)        as int8_linear rounds each output
    a = gelu_tanh(g) in fp32, .to(dt)                                as F.gelu does on CUDA (opmath fp32,
        0.5·g·(1 + tanh(β·(g + κ·g³))), β = √2·(2/√π)·½, κ = 0.044715, one rounding)
    h = (a · u).to(dt)                                              the mul, rounded once
tanh is libdevice's tanhf, the function torch's CUDA gelu calls (`c10::cuda::compat::tanh`), compiled
without FTZ as PyTorch is; the PTX contracts g + κ·g³ into one fma, as nvcc does torch's expression by
default (not checked on a GPU: tests/test_kernels_geglu.py has the CUDA test). The interpreter has no
libdevice: it uses tanh(y) = sign(y)·(1 - t)/(1 + t), t = exp(-2|y|), a few fp32 ulps off, so h may
differ from the reference by one unit of dt in the last place, rarely; the tests give it torch's fp32
gelu to compare bit for bit. The fp32 dot sums in the tile's order, as int8_linear's does: exact for
inputs whose products and sums are exact in fp32, otherwise within fp32 rounding of the reference
(with random bf16 inputs ~1% of h differs by one unit in the last place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, interpreting, launch, pick
from ._tuning import AotSpec, rows_bucket, tuned_tile
from .int8_linear import _check, int8_linear_ref


def geglu_int8_ref(x: torch.Tensor, qg: torch.Tensor, sg: torch.Tensor, qu: torch.Tensor,
                   su: torch.Tensor) -> torch.Tensor:
    """The unfused arithmetic: two int8 linears (their references), gelu_tanh, the product, in x's dtype."""
    _check_pair(x, qg, sg, qu, su)
    return F.gelu(int8_linear_ref(x, qg, sg), approximate="tanh") * int8_linear_ref(x, qu, su)


def _check_pair(x, qg, sg, qu, su):
    _check(x, qg, sg)
    _check(x, qu, su)
    if qg.shape != qu.shape:
        raise ValueError(f"gate {tuple(qg.shape)} and up {tuple(qu.shape)} must have the same shape")


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from ._matmul import dot_tile

    @triton.jit
    def _gelu_tanh(g, LIBDEVICE: tl.constexpr):
        """fp32 gelu_tanh in the order of torch's CUDA kernel (GeluCUDAKernelImpl)."""
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
        if LIBDEVICE:
            th = libdevice.tanh(inner)
        else:  # the interpreter
            t = tl.exp(-2.0 * tl.abs(inner))
            th = (1.0 - t) / (1.0 + t)
            th = tl.where(inner < 0, -th, th)
        return 0.5 * g * (1.0 + th)

    @triton.jit
    def _geglu_int8_kernel(
        x_ptr, qg_ptr, sg_ptr, qu_ptr, su_ptr, h_ptr, M, N, K,
        stride_xm, stride_qg, stride_qu, stride_hm,
        EVEN_K: tl.constexpr, FP32: tl.constexpr, LIBDEVICE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)  # fastest: the row tiles sharing the weight tiles run together
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        dt = h_ptr.dtype.element_ty
        g = dot_tile(x_ptr, qg_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_qg,
                     True, EVEN_K, FP32, BLOCK_M, BLOCK_N, BLOCK_K)
        g = g * tl.load(sg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g = g.to(dt).to(tl.float32)  # the gate projection's output
        a = _gelu_tanh(g, LIBDEVICE).to(dt).to(tl.float32)  # F.gelu's output
        u = dot_tile(x_ptr, qu_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_qu,
                     True, EVEN_K, FP32, BLOCK_M, BLOCK_N, BLOCK_K)
        u = u * tl.load(su_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        u = u.to(dt).to(tl.float32)  # the up projection's output
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :]
        tl.store(h_ptrs, (a * u).to(dt), mask=row_ok[:, None] & col_ok[None, :])


DEFAULT_TILE = (64, 64, 64, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
# Two tiles' worth of fp32 per program (the gelu'd gate stays live through the up loop): int8_linear's
# 128x128 tiles, and 4-warp tiles above 64x64, spill here; these compile without spills on
# sm_89/90/120 (python -m kernels.aot --kernel geglu_int8), 183-242 registers at most.
_TILES = ((64, 64, 64, 4, 3), (64, 64, 64, 4, 4), (32, 64, 64, 4, 3), (32, 128, 64, 4, 4), (64, 128, 64, 8, 3),
          (64, 128, 64, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (32, 64, 128, 4, 3), (64, 64, 128, 8, 3))
_LARGE = frozenset()  # tiles over a 99 KB part's shared memory (python -m kernels.aot measures them)


def _libdevice() -> bool:
    return not interpreting()  # compiled kernels only: the interpreter cannot call libdevice


def geglu_int8_triton(x, qg, sg, qu, su, tile: tuple | None = None) -> torch.Tensor:
    """The Triton path; `tile` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), else autotuned on CUDA."""
    _check_pair(x, qg, sg, qu, su)
    x, qg, sg, qu, su = (t.contiguous() for t in (x, qg, sg, qu, su))
    M, K = x.shape
    N = qg.shape[0]
    h = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return h
    exact = _libdevice()
    options = dict(enable_reflect_ftz=False) if exact else {}  # libdevice's non-FTZ tanhf, as CUDA's tanhf

    def run(cfg, warmup=False):
        bm, bn, bk, warps, stages = cfg
        return launch(
            _geglu_int8_kernel, x.device, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
            x, qg, sg, qu, su, h, M, N, K, x.stride(0), qg.stride(0), qu.stride(0), h.stride(0),
            EVEN_K=K % bk == 0, FP32=x.dtype == torch.float32, LIBDEVICE=exact, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, num_warps=warps, num_stages=stages, warmup=warmup, **options,
        )

    if tile is None:
        key = (x.dtype, rows_bucket(M), N, K)
        tile = tuned_tile("geglu_int8", key, _TILES, _LARGE, run, DEFAULT_TILE, x.device)
    run(tile)
    return h


def geglu_int8(x: torch.Tensor, qg: torch.Tensor, sg: torch.Tensor, qu: torch.Tensor,
               su: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x · (qg · sg)ᵀ) * (x · (qu · su)ᵀ) for x [..., K] -> [..., N] in x's dtype; Triton on
    CUDA, else the reference."""
    flat = x.reshape(-1, x.shape[-1])
    h = pick(geglu_int8_triton, geglu_int8_ref, x)(flat, qg, sg, qu, su)
    return h.view(*x.shape[:-1], qg.shape[0])


def _aot():
    """Compile specs for `python -m kernels.aot`: bf16 activations, fp16 scales, the dense MLP's
    shapes (K = hidden 2816, N = intermediate 2112: multiples of 16), libdevice's tanhf (kernels.aot
    compiles with Triton's default FTZ reflection; the launch turns it off), every candidate tile."""
    sig = {"x_ptr": "*bf16", "qg_ptr": "*i8", "sg_ptr": "*fp16", "qu_ptr": "*i8", "su_ptr": "*fp16",
           "h_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_qg": "i32", "stride_qu": "i32", "stride_hm": "i32"}
    for tile in dict.fromkeys((DEFAULT_TILE, *_TILES)):
        bm, bn, bk, warps, stages = tile
        yield AotSpec("geglu_int8", _geglu_int8_kernel, sig,
                      dict(EVEN_K=True, FP32=False, LIBDEVICE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                      warps, stages, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages),
                      default=tile == DEFAULT_TILE, large=tile in _LARGE,
                      divisible=("M", "N", "K", "stride_xm", "stride_qg", "stride_qu", "stride_hm"))


AOT = list(_aot()) if HAS_TRITON else []
