"""Swap the GeGLU MLPs for ones whose gate, up, gelu and product run as one kernels.geglu_int8 launch.

`install(model)` makes every `dgcli.model.MLP` (each layer's dense branch) a `FusedMLP` and the
`SelfConditioning` module (MLP's `gated` between two norms) a `FusedSelfConditioning`: a module swap, as
kernels.fused_norms does, holding the same parameter objects. Only `gated` changes, and only where
both gate_proj and up_proj are int8-per-row QuantLinears that would run kernels.int8_linear (Triton
per kernels._dispatch.use_triton); otherwise the parent's `gated` runs. The Engine installs it on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from dgcli.model import MLP, SelfConditioning
from quant.runtime import QuantLinear

from ._dispatch import swap_modules, use_triton
from .geglu_int8 import geglu_int8


def int8_rows(linear: nn.Module) -> bool:
    """Whether `linear` is an int8-per-row QuantLinear (what kernels.int8_linear reads)."""
    return isinstance(linear, QuantLinear) and linear.weight.format.name == "int8_row"


class FusedGated:
    """The `gated` of a FusedMLP and a FusedSelfConditioning (mixed in before the model class)."""

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        if int8_rows(g) and int8_rows(u) and use_triton(x):
            return geglu_int8(x, g.weight.qweight, g.weight.scales, u.weight.qweight, u.weight.scales)
        return super().gated(x)


class FusedMLP(FusedGated, MLP):
    pass


class FusedSelfConditioning(FusedGated, SelfConditioning):
    pass


def install(model: nn.Module) -> int:
    """Make every plain MLP and SelfConditioning under `model` fused; returns how many (0 on a second call)."""
    return swap_modules(model, MLP, FusedMLP) + swap_modules(model, SelfConditioning, FusedSelfConditioning)
