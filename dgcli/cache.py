"""KV caches for the prompt prefix. Encoder passes (prefill, commit of a finished canvas) add to
them; decoder passes read them and attend to the canvas as well, leaving them unchanged.

Both caches answer the same two questions for attention layer i:
- `encode_kv(i, k, v, window)`: store the new K/V; return (keys, values, is_causal, mask) to attend;
- `decode_kv(i, k, v, window)`: return (keys, values, mask) for the canvas: the cache + the canvas.
`window` is the sliding window W for sliding layers, None for full layers. Tensors are
[B, kv_heads, T, head_dim]: K after k_norm and RoPE, V after v_norm. Masks are bool, True = visible.

`KVCache` keeps exactly what the reference's default `DynamicCache` keeps (full layers: every token;
sliding layers: the last W-1) and concatenates, so it matches the reference bit for bit.
`StaticKVCache` preallocates: sliding layers are a ring of W-1+L slots (the last W-1 tokens plus one
canvas), full layers a buffer of max_tokens+L; the decoder writes the canvas K/V into the free slots
instead of concatenating. Key order in the ring differs from the reference, so results agree to
rounding (~1e-6), not bit for bit.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (k <= q) and, with a window, q-W < k; k_pos < 0 marks empty slots."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask


class KVCache:
    def __init__(self, config: ModelConfig):
        n = config.num_hidden_layers
        self.keep = [config.sliding_window - 1 if config.is_sliding(i) else None for i in range(n)]
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.length = 0  # tokens encoded so far = position of the next token

    def cached(self, i: int) -> int:
        return 0 if self.keys[i] is None else self.keys[i].shape[-2]

    def encode_kv(self, i, k, v, window):
        T, n_cached = k.shape[-2], self.cached(i)
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], dim=-2)
            v = torch.cat([self.values[i], v], dim=-2)
        keep = self.keep[i]
        self.keys[i] = k if keep is None else k[:, :, -keep:]
        self.values[i] = v if keep is None else v[:, :, -keep:]
        # Like the reference: a plain causal flag for a first prefill that no window cuts.
        if n_cached == 0 and (T == 1 or window is None or T < window):
            return k, v, T > 1, None
        pos = torch.arange(n_cached + T, device=k.device)
        return k, v, False, window_mask(pos[n_cached:], pos, window)

    def decode_kv(self, i, k, v, window):
        if self.keys[i] is None:
            return k, v, None
        return torch.cat([self.keys[i], k], dim=-2), torch.cat([self.values[i], v], dim=-2), None

    def copy(self) -> "KVCache":
        """A snapshot: tensors are never modified in place, so sharing them is safe."""
        c = KVCache.__new__(KVCache)
        c.keep, c.keys, c.values, c.length = self.keep, list(self.keys), list(self.values), self.length
        return c

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class StaticKVCache:
    def __init__(self, config: ModelConfig, max_tokens: int, device, dtype):
        L, W = config.canvas_length, config.sliding_window
        self.max_tokens = max_tokens
        self.keys, self.values, self.slot_pos = [], [], []
        for i in range(config.num_hidden_layers):
            size = W - 1 + L if config.is_sliding(i) else max_tokens + L
            shape = (1, config.layer_kv_heads[i], size, config.layer_head_dim[i])
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
            # absolute position held by each ring slot (-1: empty); full layers hold slot == position
            self.slot_pos.append(torch.full((size,), -1, device=device, dtype=torch.long)
                                 if config.is_sliding(i) else None)
        self.length = 0

    def _check_room(self, n: int) -> None:
        if self.length + n > self.max_tokens:
            raise ValueError(f"context full: {self.length + n} tokens > the cache's {self.max_tokens}")

    def encode_kv(self, i, k, v, window):
        T, start = k.shape[-2], self.length
        new_pos = torch.arange(start, start + T, device=k.device)
        if self.slot_pos[i] is None:  # full layer: positions are slots
            self._check_room(T)
            self.keys[i][:, :, start:start + T] = k
            self.values[i][:, :, start:start + T] = v
            keys, values = self.keys[i][:, :, :start + T], self.values[i][:, :, :start + T]
            return keys, values, False, window_mask(new_pos, torch.arange(start + T, device=k.device), None)
        # sliding layer: attend over the ring plus the new tokens, then keep the newest in the ring
        ring_pos = self.slot_pos[i]
        keys = torch.cat([self.keys[i], k], dim=-2)
        values = torch.cat([self.values[i], v], dim=-2)
        committed = torch.where(ring_pos < start, ring_pos, -1)  # drop a decoded canvas left in the ring
        mask = window_mask(new_pos, torch.cat([committed, new_pos]), window)
        size = ring_pos.numel()
        keep = slice(max(0, T - size), T)
        slots = new_pos[keep] % size
        self.keys[i][:, :, slots] = k[:, :, keep]
        self.values[i][:, :, slots] = v[:, :, keep]
        ring_pos[slots] = new_pos[keep]
        return keys, values, False, mask

    def decode_kv(self, i, k, v, window):
        L, start = k.shape[-2], self.length
        canvas_pos = torch.arange(start, start + L, device=k.device)
        if self.slot_pos[i] is None:  # the canvas goes into the slack after the valid tokens
            self.keys[i][:, :, start:start + L] = k
            self.values[i][:, :, start:start + L] = v
            return self.keys[i][:, :, :start + L], self.values[i][:, :, :start + L], None
        # The ring holds the last W-1 tokens; the canvas takes the other L slots. The next commit
        # rewrites those slots with the committed canvas, so nothing of it leaks into the cache.
        ring_pos = self.slot_pos[i]
        slots = canvas_pos % ring_pos.numel()
        self.keys[i][:, :, slots] = k
        self.values[i][:, :, slots] = v
        ring_pos[slots] = canvas_pos
        visible = (ring_pos >= 0) & (ring_pos > start - window)  # the last W-1 tokens and the canvas
        return self.keys[i], self.values[i], visible[None, :]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
