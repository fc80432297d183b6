"""Swap the model's RMSNorms for ones that run kernels.rmsnorm: one kernel a norm instead of ~8, the
residual add and the q/k RoPE inside it.

`install(model)` replaces every `dgcli.model.RMSNorm` module (a module swap, as gpt-fast swaps in its
quantized linears; dgcli/model.py is not edited) with a `FusedRMSNorm` holding the same parameter
objects, so state-dict keys and weights are unchanged. Each call asks `kernels._dispatch.use_triton`
(Triton on CUDA, `DG_KERNELS` overrides) and otherwise runs the parent's PyTorch methods.
The Engine installs it on CUDA (dgcli/engine.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dgcli.model import RMSNorm

from ._dispatch import guarded, swap_modules, use_triton
from .rmsnorm import MAX_WIDTH, rmsnorm_add_triton, rmsnorm_rope_triton, rmsnorm_triton


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose forward, add_to and rope each run one Triton kernel when dispatch says so."""

    @classmethod
    def replacing(cls, norm: RMSNorm) -> FusedRMSNorm:
        """`norm` itself, now a FusedRMSNorm (same parameter objects: only the methods change)."""
        norm.__class__ = cls
        return norm

    def _fits(self, x: torch.Tensor) -> bool:
        return use_triton(x) and x.shape[-1] <= MAX_WIDTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fits(x):
            return guarded(rmsnorm_triton, partial(super().forward, x), x, self.weight, self.eps)
        return super().forward(x)

    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if x.shape == h.shape and self._fits(h):
            return guarded(rmsnorm_add_triton, partial(super().add_to, x, h), x, h, self.weight, self.eps)
        return super().add_to(x, h)  # broadcasting adds: the reference's own

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and cos.shape == sin.shape == (x.shape[1], x.shape[3]) and self._fits(x):
            # Head-major: what attention reads (Attention.qkv transposes q, k to (B, Hx, T, D)), so
            # the static cache's decoder folds q's query heads into its length without a copy.
            return guarded(rmsnorm_rope_triton, partial(super().rope, x, cos, sin), x, self.weight, self.eps, cos, sin,
                           head_major=True)
        return super().rope(x, cos, sin)


def install(model: nn.Module) -> int:
    """Make every plain RMSNorm under `model` a FusedRMSNorm; returns how many (0 on a second call)."""
    return swap_modules(model, RMSNorm, FusedRMSNorm)
