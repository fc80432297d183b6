"""A layer's glue between its big matmuls, one kernel each way (dgcli.model.Layer.mix_in / mix_out).

After attention's o_proj output h, a layer (dgcli.model.Layer) mixes into and out of its residual x:

- `mix_in(x, h, ...)` -> (x + norm_pa(h), norm_ff(x'), norm_ff2(x'), router input): the residual add
  of the normed attention output, then the dense MLP's, the experts' and the router's inputs
  (the router's: weightless norm · scale · H^-½, as dgcli.model.Router.inputs) from one read of x';
- `mix_out(x, dense, slots, ...)` -> x' = (x + norm_ff(norm_ff1(dense) + norm_ff2(Σ slots))) · scalar:
  the experts' per-slot outputs (T, A, H) summed in fp32 in slot order, both branches normed and
  added, the sum normed and added to the residual, times the layer scalar; and, given its weight,
  the norm that reads x' next (the next layer's input norm, or the final norm), or None.

Unfused that is 4 + 7 kernels with the norms already one kernel each (kernels.fused_norms), each
reading and writing a whole activation. Here one program per row (H = 2816 in one program's registers,
as kernels.rmsnorm) holds the row through every step.

Each rounds where the model rounds: every norm's output, every add and product in the activations'
dtype (bf16 at full size); the slot sum in fp32, rounded once. So the results differ from the
references only in the order of the fp32 sums of squares (as kernels.rmsnorm: most elements bit for
bit, the rest by one unit in the last place) and of the slot sum, which the kernel adds in slot order.
Each has a `_ref` (the model's arithmetic, same signature) and a `_triton`; the plain name dispatches
(Triton on CUDA; `DG_KERNELS` overrides). kernels.fused_mix swaps them into the model.
"""

from __future__ import annotations

import torch

from dgcli.model import sum_slots

from ._dispatch import HAS_TRITON, launch, pick
from ._tuning import AotSpec
from .rmsnorm import MAX_WIDTH, _block, _rows, _warps, rmsnorm_add_ref, rmsnorm_ref
from .router import router_norm_ref

# --------------------------------------------------------------------------------------------------
# References: the model's arithmetic (dgcli.model.Layer.mix_in / mix_out), as functions


def mix_in_ref(x, h, w_attn, w_dense, w_experts, router_scale, root_size: float, eps: float):
    """(x + rmsnorm(h)·w_attn = x', rmsnorm(x')·w_dense, rmsnorm(x')·w_experts, the router's input of x')."""
    x = rmsnorm_add_ref(x, h, w_attn, eps)
    return (x, rmsnorm_ref(x, w_dense, eps), rmsnorm_ref(x, w_experts, eps),
            router_norm_ref(x, router_scale, root_size, eps))


def mix_out_ref(x, dense, slots, w_dense, w_experts, w_out, scalar, eps: float, w_next=None):
    """(x' = (x + rmsnorm(rmsnorm(dense)·w_dense + rmsnorm(Σ slots)·w_experts)·w_out) · scalar,
    rmsnorm(x')·w_next or None); slots (rows of x, A, H), summed in fp32 and rounded to x's dtype."""
    moe = rmsnorm_ref(sum_slots(slots, x.dtype).reshape(x.shape), w_experts, eps)
    x = rmsnorm_add_ref(x, rmsnorm_ref(dense, w_dense, eps) + moe, w_out, eps) * scalar
    return x, (rmsnorm_ref(x, w_next, eps) if w_next is not None else None)


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .rmsnorm import _inv_rms

    @triton.jit
    def _norm(v, w_ptr, cols, ok, N, eps, DT: tl.constexpr):
        """rmsnorm(v)·w of an fp32 row, rounded to DT (the norm's output), back in fp32."""
        y = v * _inv_rms(tl.sum(v * v, axis=0), N, eps) * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        return y.to(DT).to(tl.float32)

    @triton.jit
    def _mix_in_kernel(x_ptr, h_ptr, wa_ptr, wd_ptr, we_ptr, rs_ptr, xo_ptr, do_ptr, eo_ptr, ro_ptr,
                       N, stride_x, stride_h, eps, root, BLOCK: tl.constexpr):
        """One row: x' = x + norm_a(h); then norm_d(x'), norm_e(x') and the router's input of x'."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        DT = xo_ptr.dtype.element_ty
        h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        x = (x + _norm(h, wa_ptr, cols, ok, N, eps, DT)).to(DT)  # the norm rounded, then the add
        out = row * N + cols
        tl.store(xo_ptr + out, x, mask=ok)
        x = x.to(tl.float32)
        n = x * _inv_rms(tl.sum(x * x, axis=0), N, eps)  # one sum of squares serves the three norms
        tl.store(do_ptr + out, (n * tl.load(wd_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(DT), mask=ok)
        tl.store(eo_ptr + out, (n * tl.load(we_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(DT), mask=ok)
        # the router's: the weightless norm, · scale, · H^-½, each rounded (kernels.router says why)
        r = n.to(DT).to(tl.float32) * tl.load(rs_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(ro_ptr + out, (r.to(DT).to(tl.float32) * root).to(DT), mask=ok)

    @triton.jit
    def _mix_out_kernel(x_ptr, d_ptr, s_ptr, w1_ptr, w2_ptr, w_ptr, scalar_ptr, wn_ptr, out_ptr, normed_ptr,
                        N, A, stride_x, stride_d, stride_st, stride_sa, eps, HAS_NEXT: tl.constexpr,
                        BLOCK: tl.constexpr):
        """One row: x' = (x + norm(norm_1(dense) + norm_2(Σ_j slots[j]))) · scalar, the slots in
        order; and norm_next(x') if HAS_NEXT."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        DT = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        src = s_ptr + row * stride_st + cols
        for j in range(0, A):  # fixed order: slot 0 first, as the reference's sum
            acc += tl.load(src + j * stride_sa, mask=ok, other=0.0).to(tl.float32)
        moe = _norm(acc.to(DT).to(tl.float32), w2_ptr, cols, ok, N, eps, DT)
        d = tl.load(d_ptr + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
        both = (_norm(d, w1_ptr, cols, ok, N, eps, DT) + moe).to(DT).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        x = (x + _norm(both, w_ptr, cols, ok, N, eps, DT)).to(DT).to(tl.float32)
        x = (x * tl.load(scalar_ptr).to(tl.float32)).to(DT)
        tl.store(out_ptr + row * N + cols, x, mask=ok)
        if HAS_NEXT:
            tl.store(normed_ptr + row * N + cols, _norm(x.to(tl.float32), wn_ptr, cols, ok, N, eps, DT), mask=ok)


def _check(x, *weights):
    N = x.shape[-1]
    for w in weights:
        if w.shape != (N,):
            raise ValueError(f"weight {tuple(w.shape)} must be [{N}]")
    if N > MAX_WIDTH:
        raise ValueError(f"rows of {N} are wider than the kernel's {MAX_WIDTH}")
    return N


def mix_in_triton(x, h, w_attn, w_dense, w_experts, router_scale, root_size: float, eps: float):
    N = _check(x, w_attn, w_dense, w_experts, router_scale)
    if h.shape != x.shape or h.dtype != x.dtype or router_scale.dtype != x.dtype:
        raise ValueError(f"h {tuple(h.shape)} {h.dtype} and the router's scale ({router_scale.dtype}) must have "
                         f"x's shape {tuple(x.shape)} and dtype {x.dtype}")
    outs = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(4))
    xr, hr = _rows(x), _rows(h)
    if xr.shape[0] == 0:
        return outs
    block = _block(N)
    launch(_mix_in_kernel, x.device, (xr.shape[0],), xr, hr, w_attn.contiguous(), w_dense.contiguous(),
           w_experts.contiguous(), router_scale.contiguous(), *outs, N, xr.stride(0), hr.stride(0), float(eps),
           float(root_size), BLOCK=block, num_warps=_warps(block))
    return outs


def mix_out_triton(x, dense, slots, w_dense, w_experts, w_out, scalar, eps: float, w_next=None):
    N = _check(x, w_dense, w_experts, w_out, *([w_next] if w_next is not None else []))
    rows = x.numel() // N if N else 0
    if dense.shape != x.shape or dense.dtype != x.dtype or scalar.numel() != 1 or scalar.dtype != x.dtype:
        raise ValueError(f"dense {tuple(dense.shape)} {dense.dtype} must be x's {tuple(x.shape)} {x.dtype}, and "
                         f"scalar ({tuple(scalar.shape)}, {scalar.dtype}) one value of x's dtype")
    if slots.dim() != 3 or slots.shape[0] != rows or slots.shape[2] != N:
        raise ValueError(f"slots {tuple(slots.shape)} must be [{rows}, A, {N}]")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty_like(out) if w_next is not None else None
    if rows == 0:
        return out, normed
    xr, dr = _rows(x), _rows(dense)
    if slots.stride(-1) != 1:
        slots = slots.contiguous()
    block = _block(N)
    launch(_mix_out_kernel, x.device, (rows,), xr, dr, slots, w_dense.contiguous(), w_experts.contiguous(),
           w_out.contiguous(), scalar, w_next.contiguous() if w_next is not None else out, out,
           normed if normed is not None else out, N, slots.shape[1], xr.stride(0), dr.stride(0), slots.stride(0),
           slots.stride(1), float(eps), HAS_NEXT=w_next is not None, BLOCK=block, num_warps=_warps(block))
    return out, normed


# --------------------------------------------------------------------------------------------------
# Dispatchers


def mix_in(x, h, w_attn, w_dense, w_experts, router_scale, root_size: float, eps: float):
    """`Layer.mix_in`'s four outputs; Triton on CUDA, else the reference."""
    return pick(mix_in_triton, mix_in_ref, x)(x, h, w_attn, w_dense, w_experts, router_scale,
                                                            root_size, eps)


def mix_out(x, dense, slots, w_dense, w_experts, w_out, scalar, eps: float, w_next=None):
    """`Layer.mix_out`'s (new residual, its next norm or None); Triton on CUDA, else the reference."""
    return pick(mix_out_triton, mix_out_ref, x)(x, dense, slots, w_dense, w_experts, w_out, scalar,
                                                              eps, w_next)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """The released config, bf16 at hidden 2816; the slots as the int4 experts write them (bf16); the
    next norm always folded in (every layer's output has one: the next input norm or the final)."""
    block = _block(2816)
    config = dict(BLOCK=block, num_warps=_warps(block))
    b = "*bf16"
    yield AotSpec("mix.in", _mix_in_kernel,
                  {"x_ptr": b, "h_ptr": b, "wa_ptr": b, "wd_ptr": b, "we_ptr": b, "rs_ptr": b, "xo_ptr": b,
                   "do_ptr": b, "eo_ptr": b, "ro_ptr": b, "N": "i32", "stride_x": "i32", "stride_h": "i32",
                   "eps": "fp32", "root": "fp32"},
                  dict(BLOCK=block), _warps(block), 1, config, default=True, divisible=("N", "stride_x", "stride_h"))
    yield AotSpec("mix.out", _mix_out_kernel,
                  {"x_ptr": b, "d_ptr": b, "s_ptr": b, "w1_ptr": b, "w2_ptr": b, "w_ptr": b, "scalar_ptr": b,
                   "wn_ptr": b, "out_ptr": b, "normed_ptr": b, "N": "i32", "A": "i32", "stride_x": "i32",
                   "stride_d": "i32", "stride_st": "i32", "stride_sa": "i32", "eps": "fp32"},
                  dict(HAS_NEXT=True, BLOCK=block), _warps(block), 1, config, default=True,
                  divisible=("N", "stride_x", "stride_d", "stride_st", "stride_sa"))


AOT = list(_aot()) if HAS_TRITON else []
