"""The prompt KV cache, kept exactly as the reference's default `DynamicCache` keeps it.

Encoder passes (prefill, commit of a finished canvas) append to it; decoder passes only read it.
Full-attention layers keep every token. Sliding layers keep the last `sliding_window - 1` tokens,
which is also what a decoder pass sees there (the reference's `DynamicSlidingWindowLayer`).
Tensors are [B, kv_heads, T, head_dim]: K after k_norm and RoPE, V after v_norm.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig):
        n = config.num_hidden_layers
        self.keep = [config.sliding_window - 1 if config.is_sliding(i) else None for i in range(n)]
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.length = 0  # tokens encoded so far = position of the next token

    def get(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[i], self.values[i]

    def cached(self, i: int) -> int:
        return 0 if self.keys[i] is None else self.keys[i].shape[-2]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V for layer i; return cached + new (what this encoder pass attends to)."""
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], dim=-2)
            v = torch.cat([self.values[i], v], dim=-2)
        keep = self.keep[i]
        self.keys[i] = k if keep is None else k[:, :, -keep:]
        self.values[i] = v if keep is None else v[:, :, -keep:]
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
