"""Swap the model's expert routers for ones that run kernels.router: the norm and scales in one
kernel, the projection (a matmul), then softmax, top-k, renormalisation and per-expert scale in one
kernel: 3 kernels a layer instead of ~12.

`install(model)` replaces every `dgcli.model.Router` (a module swap, as kernels.fused_norms does for
the RMSNorms; dgcli/model.py is not edited) with a `FusedRouter` holding the same parameter and
submodule objects, so state-dict keys and weights are unchanged. Each call asks
`kernels._dispatch.use_triton` (Triton on CUDA, `DG_KERNELS` overrides) and otherwise runs the
parent's methods. The Engine installs it on CUDA (dgcli/engine.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dgcli.model import Router

from ._dispatch import KernelUnavailable, _skipped, guarded, swap_modules, use_triton
from .rmsnorm import MAX_WIDTH
from .router import MAX_EXPERTS, router_norm_triton, router_topk_triton


class FusedRouter(Router):
    """Router whose inputs (the norm) and route (after the projection) each run a kernels.router
    kernel when dispatch says so; forward is the parent's, the two in turn.
    The norm keeps the model's three roundings (norm, ·scale, ·root_size): see kernels/router.py."""

    @classmethod
    def replacing(cls, router: Router) -> FusedRouter:
        """`router` itself, now a FusedRouter (same parameters and submodules: only forward changes)."""
        router.__class__ = cls
        return router

    def _fits(self, x: torch.Tensor) -> bool:
        return (use_triton(x) and self.norm.weight is None and x.shape[-1] <= MAX_WIDTH
                and self.top_k <= self.per_expert_scale.numel() <= MAX_EXPERTS)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fits(x):
            return super().inputs(x)
        return guarded(router_norm_triton, partial(super().inputs, x), x, self.scale, self.root_size, self.norm.eps)

    def route(self, h: torch.Tensor):
        if not self._fits(h):
            return super().route(h)
        if router_topk_triton in _skipped:
            return super().route(h)
        logits = self.proj(h)
        try:
            weights, index = router_topk_triton(logits.reshape(-1, logits.shape[-1]), self.per_expert_scale, self.top_k)
        except KernelUnavailable:
            _skipped.add(router_topk_triton)
            return super().route(h)
        return weights.view(*logits.shape[:-1], -1), index.view(*logits.shape[:-1], -1)


def install(model: nn.Module) -> int:
    """Make every plain Router under `model` a FusedRouter; returns how many (0 on a second call)."""
    return swap_modules(model, Router, FusedRouter)
