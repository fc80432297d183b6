"""The experts' router (dgcli.model.Router) in two kernels around its projection.

`Router.forward(x)` is
    h      = rmsnorm(x) * scale * root_size          (weightless norm; each step rounded to the dtype)
    probs  = softmax(proj(h), fp32)                   (T, E)
    w, idx = topk(probs, k)                           (T, A), descending
    w      = w / w.sum(-1) * per_expert_scale[idx]
Unfused that is ~12 kernels (the norm's, two multiplies, softmax, topk, sum, divide, gather,
multiply). Here:

- `router_norm(x, scale, root_size, eps)`: the first line, one program per row. The two products
  stay rounded one at a time as the model rounds them (bit for bit, except the fp32 sum of squares'
  order, as kernels.rmsnorm): folding scale·root_size into one fp32 weight would round once instead
  of three times, which changes about a third of h's bf16 values by one unit and, on random inputs
  at the released width, the chosen 8 experts of ~4% of the tokens;
- `router_topk(logits, per_expert_scale, top_k)`: the rest, BLOCK_T rows a program, E ≤ 1024.
  Softmax in fp32, top-k by k rounds of (max, lowest index holding it, remove it), renormalised by
  the sum of the k weights, times per_expert_scale[idx]. Weights differ from the reference by the
  exp's and the sums' rounding (~1e-7 relative).

Ties: the kernel takes equal probabilities lowest index first and lists them in that order. CUDA's
torch.topk chooses the same experts (it gathers the values above the k-th, then those equal to it in
index order until k are taken) but orders equal values among the k by an unstable bitonic sort, and
torch.topk on the CPU chooses and orders ties arbitrarily ([.3, .3, .3] at 1, 2, 4 comes back as
2, 4, 1): so the experts agree with CUDA's set for set, and with the CPU's except among equal
probabilities. The slot order only moves the fp32 sum over slots by an ulp. Ties are common: bf16
logits repeat, and equal logits give equal probabilities.

Each has a `_ref` (the model's arithmetic, same signature) and a `_triton`; the plain name dispatches
(Triton on CUDA; `DG_KERNELS` overrides). kernels.fused_router swaps them into the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, launch, pick
from ._tuning import AotSpec
from .rmsnorm import MAX_WIDTH, _block, _rows, _warps, rmsnorm_ref

MAX_EXPERTS = 1024  # a row of logits in one program's registers
ROWS = 4  # logit rows a program (one warp each)


# --------------------------------------------------------------------------------------------------
# References: the model's arithmetic (dgcli.model.Router.forward), as functions


def router_norm_ref(x: torch.Tensor, scale: torch.Tensor, root_size: float, eps: float) -> torch.Tensor:
    return rmsnorm_ref(x, None, eps) * scale * root_size


def router_topk_ref(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, index = torch.topk(probs, k=top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[index], index


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .rmsnorm import _inv_rms

    @triton.jit
    def _router_norm_kernel(x_ptr, s_ptr, out_ptr, N, stride_x, eps, root, BLOCK: tl.constexpr):
        """out[row] = rmsnorm(x[row]) · scale · root, rounded after the norm and after each product."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        n = (h * _inv_rms(tl.sum(h * h, axis=0), N, eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        odt = out_ptr.dtype.element_ty
        y = (n * tl.load(s_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(odt).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (y * root).to(odt), mask=ok)

    @triton.jit
    def _router_topk_kernel(logits_ptr, pes_ptr, w_ptr, idx_ptr, T, E, stride_l,
                            TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        """BLOCK_T rows of logits -> the top-k weights (renormalised, scaled) and their experts."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        src = tl.minimum(rows, T - 1).to(tl.int64)  # rows past the end read the last one: no NaN rows
        cols = tl.arange(0, BLOCK_E)
        col_ok = cols < E
        z = tl.load(logits_ptr + src[:, None] * stride_l + cols[None, :], mask=col_ok[None, :],
                    other=float("-inf")).to(tl.float32)
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = tl.math.div_rn(p, tl.sum(p, axis=1)[:, None])  # correctly rounded, as torch divides
        p = tl.where(col_ok[None, :], p, -1.0)  # below any probability: never chosen
        slots = tl.arange(0, BLOCK_K)
        w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(p, axis=1)
            at = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index of a tie
            w = tl.where(slots[None, :] == j, best[:, None], w)
            idx = tl.where(slots[None, :] == j, at[:, None], idx)
            p = tl.where(cols[None, :] == at[:, None], -1.0, p)
        w = tl.math.div_rn(w, tl.sum(w, axis=1)[:, None])  # unused slots hold 0
        ok = row_ok[:, None] & (slots[None, :] < TOP_K)
        w = w * tl.load(pes_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
        tl.store(w_ptr + out, w, mask=ok)
        tl.store(idx_ptr + out, idx.to(tl.int64), mask=ok)


def router_norm_triton(x: torch.Tensor, scale: torch.Tensor, root_size: float, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    if scale.shape != (N,):
        raise ValueError(f"scale {tuple(scale.shape)} must be [{N}]")
    if N > MAX_WIDTH:
        raise ValueError(f"rows of {N} are wider than the kernel's {MAX_WIDTH}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, scale.dtype), device=x.device)
    xr = _rows(x)
    if xr.shape[0] == 0:
        return out
    block = _block(N)
    launch(_router_norm_kernel, x.device, (xr.shape[0],), xr, scale.contiguous(), out, N, xr.stride(0),
           float(eps), float(root_size), BLOCK=block, num_warps=_warps(block))
    return out


def router_topk_triton(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    if logits.dim() != 2 or per_expert_scale.shape != (logits.shape[1],):
        raise ValueError(f"logits {tuple(logits.shape)} must be [T, E] and per_expert_scale "
                         f"{tuple(per_expert_scale.shape)} [E]")
    T, E = logits.shape
    if not 0 < top_k <= E <= MAX_EXPERTS:
        raise ValueError(f"top_k={top_k} and E={E} must satisfy 0 < top_k <= E <= {MAX_EXPERTS}")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    index = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, index
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    launch(_router_topk_kernel, logits.device, (triton.cdiv(T, ROWS),), logits, per_expert_scale.contiguous(),
           weights, index, T, E, logits.stride(0), TOP_K=top_k, BLOCK_T=ROWS, BLOCK_E=_block(E),
           BLOCK_K=_block_k(top_k), num_warps=ROWS)
    return weights, index


def _block_k(top_k: int) -> int:
    return 1 << (top_k - 1).bit_length()


# --------------------------------------------------------------------------------------------------
# Dispatchers


def router_norm(x: torch.Tensor, scale: torch.Tensor, root_size: float, eps: float) -> torch.Tensor:
    """rmsnorm(x) · scale · root_size as the Router rounds it; Triton on CUDA, else the reference."""
    return pick(router_norm_triton, router_norm_ref, x)(x, scale, root_size, eps)


def router_topk(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """(weights [T, k] fp32, index [T, k] int64) from logits [T, E]; Triton on CUDA, else the reference."""
    return pick(router_topk_triton, router_topk_ref, logits)(logits, per_expert_scale, top_k)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """The released config, bf16: the norm at hidden 2816, top-8 of 128 experts."""
    block = _block(2816)
    yield AotSpec("router.norm", _router_norm_kernel,
                  {"x_ptr": "*bf16", "s_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "stride_x": "i32",
                   "eps": "fp32", "root": "fp32"},
                  dict(BLOCK=block), _warps(block), 1, dict(BLOCK=block, num_warps=_warps(block)), default=True,
                  divisible=("N", "stride_x"))
    consts = dict(TOP_K=8, BLOCK_T=ROWS, BLOCK_E=128, BLOCK_K=8)
    yield AotSpec("router.topk", _router_topk_kernel,
                  {"logits_ptr": "*bf16", "pes_ptr": "*bf16", "w_ptr": "*fp32", "idx_ptr": "*i64", "T": "i32",
                   "E": "i32", "stride_l": "i32"},
                  consts, ROWS, 1, dict(consts, num_warps=ROWS), default=True, divisible=("E", "stride_l"))


AOT = list(_aot()) if HAS_TRITON else []
