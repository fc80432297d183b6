"""Swap the model's layers for ones whose glue between the big matmuls runs kernels.mix: `mix_in`
(residual add of the normed attention output, the dense, experts' and router's inputs) and `mix_out`
(slot sum, the three norms, residual add, layer scalar, and the norm that reads the output next),
two kernels instead of twelve.

`install(model)` makes every `dgcli.model.Layer` a `FusedLayer` (a class swap, as kernels.fused_norms
does for the RMSNorms; dgcli/model.py is not edited): the same module objects, so state-dict keys and
weights are unchanged. Each call asks `kernels._dispatch.use_triton` (Triton on CUDA, `DG_KERNELS`
overrides) and that the layer is the model's shape of it, and otherwise runs the parent's methods
(whose norms may be kernels.fused_norms' and kernels.fused_router's). The Engine installs it on CUDA
(dgcli/engine.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dgcli.model import Layer, RMSNorm

from ._dispatch import KernelUnavailable, _skipped, guarded, swap_modules, use_triton
from .mix import mix_in_triton, mix_out_triton
from .rmsnorm import MAX_WIDTH


class FusedLayer(Layer):
    """Layer whose mix_in and mix_out each run one Triton kernel when dispatch says so."""

    def _fits(self, x: torch.Tensor) -> bool:
        """Triton for x, a row in one program, and the norms as the kernels assume them: weighted, the
        router's weightless, one eps (the config's) for all."""
        norms = (self.post_attention_layernorm, self.pre_feedforward_layernorm, self.pre_feedforward_layernorm_2,
                 self.post_feedforward_layernorm_1, self.post_feedforward_layernorm_2, self.post_feedforward_layernorm)
        return (use_triton(x) and x.shape[-1] <= MAX_WIDTH and self.router.norm.weight is None
                and all(n.weight is not None and n.eps == self.router.norm.eps for n in norms))

    def mix_in(self, x: torch.Tensor, h: torch.Tensor):
        if not (self._fits(x) and h.shape == x.shape and h.dtype == x.dtype == self.router.scale.dtype):
            return super().mix_in(x, h)
        return guarded(mix_in_triton, partial(super().mix_in, x, h), x, h, self.post_attention_layernorm.weight,
                       self.pre_feedforward_layernorm.weight, self.pre_feedforward_layernorm_2.weight, self.router.scale,
                       self.router.root_size, self.router.norm.eps)

    def mix_out(self, x: torch.Tensor, dense: torch.Tensor, slots: torch.Tensor, scalar: torch.Tensor,
                next_norm: RMSNorm | None = None):
        if not (self._fits(x) and dense.shape == x.shape and dense.dtype == x.dtype == scalar.dtype
                and scalar.numel() == 1):
            return super().mix_out(x, dense, slots, scalar, next_norm)
        fold = next_norm is not None and next_norm.weight is not None and next_norm.eps == self.router.norm.eps
        plain = partial(super().mix_out, x, dense, slots, scalar, next_norm)
        if mix_out_triton in _skipped:
            return plain()
        try:
            x, normed = mix_out_triton(x, dense, slots, self.post_feedforward_layernorm_1.weight,
                                       self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
                                       scalar, self.router.norm.eps, next_norm.weight if fold else None)
        except KernelUnavailable:
            _skipped.add(mix_out_triton)
            return plain()
        if next_norm is not None and not fold:  # a norm the kernel does not fold: on its own
            normed = next_norm(x)
        return x, normed


def install(model: nn.Module) -> int:
    """Make every plain Layer under `model` a FusedLayer; returns how many (0 on a second call)."""
    return swap_modules(model, Layer, FusedLayer)
