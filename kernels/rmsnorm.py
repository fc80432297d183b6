"""RMSNorm in one kernel, alone or fused with what follows it in a layer.

dg's RMSNorm (dgcli.model.RMSNorm) computes in fp32 and rounds once to the input dtype:
    y = (x.float() * (mean(x.float()²) + eps) ** -0.5 * w.float()).to(x.dtype)     (w optional)
Unfused that is ~8 kernels a norm (cast, square, mean, add, pow, two multiplies, cast back), 11
norms a layer; each costs the GPU 1-3 µs however small, and CUDA graphs only remove the CPU's part.
Here each is one program per row (rows up to 4096 wide: hidden 2816, head dims 256 and 512):

- `rmsnorm(x, weight, eps)`;
- `rmsnorm_add(x, h, weight, eps)` = x + rmsnorm(h): the residual add after a sublayer
  (`RMSNorm.add_to`), the norm rounded to h's dtype before the add, as the model does;
- `rmsnorm_rope(x, weight, eps, cos, sin)` = apply_rope(rmsnorm(x), cos, sin): the q/k norms
  (`RMSNorm.rope`), x (B, T, Hx, D), cos/sin (T, D), non-interleaved (dim i pairs with i + D/2),
  `n·cos + cat(-n2, n1)·sin` with each product and the sum rounded to the dtype, as the model does;
  `head_major=True` writes the same values as a (B, T, Hx, D) view of a (B, Hx, T, D) buffer, the
  layout attention reads (Attention.qkv transposes at once), so folding query heads is a view.

Each has a `_ref` (the model's arithmetic in PyTorch, same signature) and a `_triton`; the plain name
dispatches (Triton on CUDA; `DG_KERNELS` overrides). The Triton results differ from the reference only
in the order of the fp32 sum of squares: the elementwise steps are the same correctly rounded
operations (an fp32 product or sum of two bf16/fp16 values rounded to that dtype is the dtype's own
correctly rounded result), so most elements agree bit for bit and the rest by one unit in the last place.
"""

from __future__ import annotations

import torch

from dgcli.model import apply_rope

from ._dispatch import HAS_TRITON, launch, pick
from ._tuning import AotSpec

MAX_WIDTH = 4096  # one row in one program's registers (compiled without spills at this width); wider: the reference


# --------------------------------------------------------------------------------------------------
# References: the model's arithmetic (dgcli.model.RMSNorm), as functions


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)  # pow, as the reference
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


def rmsnorm_add_ref(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x + rmsnorm_ref(h, weight, eps)


def rmsnorm_rope_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(rmsnorm_ref(x, weight, eps), cos, sin)


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _inv_rms(ss, n, eps):
        """(ss / n + eps) ** -0.5 with a correctly rounded sqrt and division, as torch.pow on the CPU."""
        return tl.math.div_rn(1.0, tl.sqrt_rn(ss / n + eps))

    @triton.jit
    def _rmsnorm_kernel(h_ptr, w_ptr, res_ptr, out_ptr, N, stride_h, stride_res, stride_out, eps,
                        HAS_W: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        """out[row] = (res[row] +) rmsnorm(h[row]) · w: one program per row."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        y = h * _inv_rms(tl.sum(h * h, axis=0), N, eps)
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = y.to(h_ptr.dtype.element_ty)  # the norm's own rounding, before any add
        if HAS_RES:
            res = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
            y = res + y.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rmsnorm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, Hx, D,
                             stride_xb, stride_xt, stride_xh, stride_cos, stride_sin, eps,
                             HAS_W: tl.constexpr, HEAD_MAJOR: tl.constexpr, BLOCK: tl.constexpr):
        """out[b, t, h] = rope(rmsnorm(x[b, t, h]) · w, cos[t], sin[t]); one program per row, on a
        (T, Hx, B) grid (positions on the axis without a 65535 limit), each half of the head in its
        own registers (BLOCK >= D / 2). out is contiguous (B, T, Hx, D), or (B, Hx, T, D) if HEAD_MAJOR."""
        t = tl.program_id(0)
        hx = tl.program_id(1)
        b = tl.program_id(2)
        half = D // 2
        cols = tl.arange(0, BLOCK)
        ok = cols < half
        src = x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + hx.to(tl.int64) * stride_xh
        x1 = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + cols, mask=ok, other=0.0).to(tl.float32)
        r = _inv_rms(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0), D, eps)
        n1 = x1 * r
        n2 = x2 * r
        if HAS_W:
            n1 = n1 * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            n2 = n2 * tl.load(w_ptr + half + cols, mask=ok, other=0.0).to(tl.float32)
        n1 = n1.to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's output, in x's dtype
        n2 = n2.to(x_ptr.dtype.element_ty).to(tl.float32)
        c = cos_ptr + t.to(tl.int64) * stride_cos
        s = sin_ptr + t.to(tl.int64) * stride_sin
        c1 = tl.load(c + cols, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(c + half + cols, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(s + cols, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(s + half + cols, mask=ok, other=0.0).to(tl.float32)
        odt = out_ptr.dtype.element_ty
        # x·cos + cat(-x2, x1)·sin, each product and the sum rounded to the dtype, as the model does
        o1 = (n1 * c1).to(odt).to(tl.float32) + (-(n2 * s1)).to(odt).to(tl.float32)
        o2 = (n2 * c2).to(odt).to(tl.float32) + (n1 * s2).to(odt).to(tl.float32)
        if HEAD_MAJOR:
            dst = out_ptr + ((b.to(tl.int64) * Hx + hx) * T + t) * D
        else:
            dst = out_ptr + ((b.to(tl.int64) * T + t) * Hx + hx) * D
        tl.store(dst + cols, o1.to(odt), mask=ok)
        tl.store(dst + half + cols, o2.to(odt), mask=ok)


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _warps(block: int) -> int:
    """A warp per 256 elements (8 fp32 values a thread), 1 to 8 warps: no spills at 4096."""
    return min(8, max(1, block // 256))


def _check_weight(weight, n: int):
    if weight is not None and weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{n}]")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width) with unit stride along the width (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _norm_rows(h, weight, eps, res, out_dtype) -> torch.Tensor:
    N = h.shape[-1]
    _check_weight(weight, N)
    if N > MAX_WIDTH:
        raise ValueError(f"rows of {N} are wider than the kernel's {MAX_WIDTH}")
    out = torch.empty(h.shape, dtype=out_dtype, device=h.device)
    hr = _rows(h)
    if hr.shape[0] == 0:
        return out
    rr = _rows(res) if res is not None else hr
    w = weight.contiguous() if weight is not None else hr
    block = _block(N)
    launch(_rmsnorm_kernel, h.device, (hr.shape[0],), hr, w, rr, out.view(-1, N), N,
           hr.stride(0), rr.stride(0), N, float(eps),
           HAS_W=weight is not None, HAS_RES=res is not None, BLOCK=block, num_warps=_warps(block))
    return out


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _norm_rows(x, weight, eps, None, x.dtype)


def rmsnorm_add_triton(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.shape != h.shape:
        raise ValueError(f"x {tuple(x.shape)} and h {tuple(h.shape)} must have the same shape")
    return _norm_rows(h, weight, eps, x, torch.promote_types(x.dtype, h.dtype))


def rmsnorm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                        sin: torch.Tensor, head_major: bool = False) -> torch.Tensor:
    """head_major: the result is a (B, T, Hx, D) view of a contiguous (B, Hx, T, D) buffer."""
    if x.dim() != 4 or cos.shape != (x.shape[1], x.shape[3]) or sin.shape != cos.shape or x.shape[3] % 2:
        raise ValueError(f"x {tuple(x.shape)} must be (B, T, Hx, D) with D even and cos/sin (T, D), got cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    B, T, Hx, D = x.shape
    _check_weight(weight, D)
    if D > MAX_WIDTH:
        raise ValueError(f"head dim {D} is wider than the kernel's {MAX_WIDTH}")
    odt = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    if head_major:
        out = torch.empty(B, Hx, T, D, dtype=odt, device=x.device).transpose(1, 2)
    else:
        out = torch.empty(B, T, Hx, D, dtype=odt, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    w = weight.contiguous() if weight is not None else x
    block = _block(D // 2)
    launch(_rmsnorm_rope_kernel, x.device, (T, Hx, B), x, w, cos, sin, out, T, Hx, D,
           x.stride(0), x.stride(1), x.stride(2), cos.stride(0), sin.stride(0), float(eps),
           HAS_W=weight is not None, HEAD_MAJOR=head_major, BLOCK=block, num_warps=_warps(2 * block))
    return out


# --------------------------------------------------------------------------------------------------
# Dispatchers


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """rmsnorm(x) · weight in x's dtype; Triton on CUDA, else the reference."""
    return pick(rmsnorm_triton, rmsnorm_ref, x)(x, weight, eps)


def rmsnorm_add(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x + rmsnorm(h) · weight; Triton on CUDA, else the reference."""
    return pick(rmsnorm_add_triton, rmsnorm_add_ref, h)(x, h, weight, eps)


def rmsnorm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """apply_rope(rmsnorm(x) · weight, cos, sin); Triton on CUDA, else the reference."""
    return pick(rmsnorm_rope_triton, rmsnorm_rope_ref, x)(x, weight, eps, cos, sin)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """One config per production use, each its own kernel name (no autotuning: the width fixes BLOCK
    and the warps), bf16: the hidden norms (2816, with and without weight, and with the residual add),
    the weightless v norms (256, 512) and the q/k norms with RoPE (256, 512)."""
    norm_sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
                "stride_h": "i32", "stride_res": "i32", "stride_out": "i32", "eps": "fp32"}
    for name, width, has_w, has_res in (("rmsnorm.h2816", 2816, True, False),
                                        ("rmsnorm.h2816_noweight", 2816, False, False),
                                        ("rmsnorm.v256", 256, False, False), ("rmsnorm.v512", 512, False, False),
                                        ("rmsnorm.add", 2816, True, True)):
        block = _block(width)
        yield AotSpec(name, _rmsnorm_kernel, norm_sig, dict(HAS_W=has_w, HAS_RES=has_res, BLOCK=block),
                      _warps(block), 1, dict(BLOCK=block, num_warps=_warps(block)), default=True,
                      divisible=("N", "stride_h", "stride_res", "stride_out"))
    rope_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*bf16",
                "T": "i32", "Hx": "i32", "D": "i32", "stride_xb": "i32", "stride_xt": "i32", "stride_xh": "i32",
                "stride_cos": "i32", "stride_sin": "i32", "eps": "fp32"}
    for head_dim in (256, 512):
        block = _block(head_dim // 2)
        yield AotSpec(f"rmsnorm.rope{head_dim}", _rmsnorm_rope_kernel, rope_sig,
                      dict(HAS_W=True, HEAD_MAJOR=True, BLOCK=block),
                      _warps(2 * block), 1, dict(BLOCK=block, num_warps=_warps(2 * block)), default=True,
                      divisible=("D", "stride_xb", "stride_xt", "stride_xh", "stride_cos", "stride_sin"))


AOT = list(_aot()) if HAS_TRITON else []
