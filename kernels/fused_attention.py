"""Swap the attention modules for ones whose int8 q/k/v projections, norms and RoPE run as one kernel
and whose int8 o_proj reads SDPA's output heads in place.

The static cache's decoder folds grouped query heads into the query length (Attention.attend), so
its output heads come back as a (B, T, Hk, groups, D) view of SDPA's buffer that no `view` can
flatten: `Attention.project` copies them before o_proj. `install(model)` makes every
`dgcli.model.Attention` a `FusedAttention` (a module swap holding the same parameter objects, as
kernels.fused_norms does) whose `project` runs kernels.int8_linear's `int8_linear_heads` on the heads
as they lie, when o_proj is an int8-per-row QuantLinear that would run int8_linear (Triton, per
kernels._dispatch.use_triton) and the head dim is a multiple of 16; otherwise the parent's `project`.
The same K blocks in the same order as int8_linear on the copy: the same output, bit for bit.
Its `qkv` runs kernels.qkv_int8 (one launch a layer for the three projections, the q/k norms with
RoPE and the weightless v norm, head-major outputs) when q/k/v_proj are int8-per-row QuantLinears
on the Triton path, the head dim is at most 512 and cos/sin are in x's dtype; otherwise the parent's.
On the static cache's decoder (`kv_into`, from StaticKVCache.canvas_dest) that kernel writes the
canvas K/V straight into their cache slots (full layers: the canvas positions; sliding layers: the
ring slots) and returns them as None, so `decode_kv` copies nothing: two index_copy_ launches a
layer fewer, and no K/V tensors between them.
The Engine installs it on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from dgcli.model import Attention

from ._dispatch import swap_modules, use_triton
from .fused_mlp import int8_rows
from .int8_linear import int8_linear_heads
from .qkv_int8 import MAX_HEAD_DIM, qkv_int8


class FusedAttention(Attention):
    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_into=None):
        qp, kp, vp, D = self.q_proj, self.k_proj, self.v_proj, self.head_dim
        qn, kn, vn = self.q_norm, self.k_norm, self.v_norm
        if (int8_rows(qp) and int8_rows(kp) and (vp is None or int8_rows(vp)) and use_triton(x)
                and x.dim() == 3 and D % 2 == 0 and D <= MAX_HEAD_DIM and cos.shape == (x.shape[1], D)
                and cos.dtype == sin.dtype == x.dtype and qn.eps == kn.eps == vn.eps
                and qn.weight is not None and kn.weight is not None and vn.weight is None):
            v = (vp.weight.qweight, vp.weight.scales) if vp is not None else (None, None)
            if kv_into is not None and (x.shape[0] != 1 or kv_into[0].dtype != x.dtype):
                kv_into = None  # the scatter writes one sequence in the cache's dtype: the cache copies
            return qkv_int8(x, qp.weight.qweight, qp.weight.scales, kp.weight.qweight, kp.weight.scales, *v,
                            qn.weight, kn.weight, qn.eps, cos, sin, D, kv_into=kv_into)
        return super().qkv(x, cos, sin, kv_into)

    def project(self, heads: torch.Tensor) -> torch.Tensor:
        o = self.o_proj
        if int8_rows(o) and use_triton(heads) and heads.shape[-1] % 16 == 0 and heads.stride(-1) == 1:
            return int8_linear_heads(heads, o.weight.qweight, o.weight.scales)
        return super().project(heads)


def install(model: nn.Module) -> int:
    """Make every plain Attention under `model` a FusedAttention; returns how many (0 on a second call)."""
    return swap_modules(model, Attention, FusedAttention)
