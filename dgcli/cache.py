"""KV caches for the prompt prefix. Encoder passes (prefill, commit of a finished canvas) add to
them; decoder passes read them and attend to the canvas as well, leaving them unchanged.

Both caches answer the same two questions for attention layer i:
- `encode_kv(i, k, v, window)`: store the new K/V; return (keys, values, is_causal, mask) to attend;
- `decode_kv(i, k, v, window)`: return (keys, values, mask) for the canvas: the cache + the canvas;
- `canvas_dest(i)`: None, or where the canvas K/V of layer i go in this decode pass (keys, values,
  slots), for a q/k/v kernel that writes them there itself (kernels.fused_attention on CUDA): it
  then passes k = v = None to `decode_kv`.
`window` is the sliding window W for sliding layers, None for full layers. Tensors are
[B, kv_heads, T, head_dim]: K after k_norm and RoPE, V after v_norm. Masks are bool, True = visible.

`KVCache` keeps exactly what the reference's default `DynamicCache` keeps (full layers: every token;
sliding layers: the last W-1) and concatenates, so it matches the reference bit for bit.
`StaticKVCache` preallocates: sliding layers are a ring of W-1+L+R slots (the last W-1 tokens, one
canvas, and R more so that `truncate` can take back R tokens; R=0 by default, as every slot costs
attention time), full layers a buffer of max_tokens+L; the decoder writes the canvas K/V into the
free slots instead of concatenating (on CUDA the fused q/k/v kernel writes them there itself). Key
order in the ring differs from the reference, so results agree to rounding (~1e-6), not bit for bit.
The decoder reads the canvas positions and their ring slots from device tensors (`prepare_decode`
sets them), so one captured CUDA graph serves every position (dgcli/graphs.py).

One rollback protocol on both (as mlx-lm's `trim` on every cache), so a chat session has one path:
- `truncate(n) -> bool`: forget every token from position n on; False, and nothing changed, when a
  sliding layer no longer holds the W-1 tokens before n;
- `mark()` / `rewind()` / `marked_length`: remember this point and come back to it, however far
  the sliding layers have moved on (the reference cache keeps its lists: its tensors are never
  written in place; the static cache copies its rings: full layers are append-only);
- `reset()`: empty.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ContextFullError


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (k <= q) and, with a window, q-W < k; k_pos < 0 marks empty slots."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask


def _check_truncate(n: int, length: int) -> None:
    if not 0 <= n <= length:
        raise ValueError(f"cannot truncate to {n}: the cache holds {length} tokens")


class KVCache:
    def __init__(self, config: ModelConfig):
        n = config.num_hidden_layers
        self.keep = [config.sliding_window - 1 if config.is_sliding(i) else None for i in range(n)]
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.length = 0  # tokens encoded so far = position of the next token
        self.marked: tuple | None = None  # (length, keys, values) saved by mark()

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

    def prepare_decode(self, L: int, device=None, bucket: int | None = None) -> torch.Tensor:
        """The canvas positions [L] (`bucket` is the static cache's; here every span is exact)."""
        return torch.arange(self.length, self.length + L, device=device)

    def canvas_dest(self, i: int) -> None:
        """None: this cache concatenates, so the canvas K/V have no slots to be written into."""
        return None

    def decode_kv(self, i, k, v, window):
        if self.keys[i] is None:
            return k, v, None
        return torch.cat([self.keys[i], k], dim=-2), torch.cat([self.values[i], v], dim=-2), None

    def truncate(self, n: int) -> bool:
        """Forget positions n.. (slices: the tensors themselves are never modified in place)."""
        _check_truncate(n, self.length)
        if n == 0:
            self.reset()
            return True
        drop = self.length - n
        for i, keep in enumerate(self.keep):
            if keep is not None and self.cached(i) - drop < min(keep, n):
                return False  # the W-1 tokens before n are no longer all here
        for i in range(len(self.keys)):
            if self.keys[i] is not None:
                end = self.cached(i) - drop
                self.keys[i], self.values[i] = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        self.length = n
        if self.marked is not None and self.marked[0] > n:  # what follows n is about to be replaced
            self.marked = None
        return True

    def reset(self) -> None:
        n = len(self.keys)
        self.keys, self.values, self.length, self.marked = [None] * n, [None] * n, 0, None

    def mark(self) -> None:
        self.marked = (self.length, list(self.keys), list(self.values))  # shared tensors: free

    @property
    def marked_length(self) -> int | None:
        return None if self.marked is None else self.marked[0]

    def rewind(self) -> None:
        self.length, keys, values = self.marked
        self.keys, self.values = list(keys), list(values)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class StaticKVCache:
    def __init__(self, config: ModelConfig, max_tokens: int, device, dtype, rollback: int = 0):
        L, W = config.canvas_length, config.sliding_window
        self.max_tokens, self.window = max_tokens, W
        self.rollback = rollback  # ring slots beyond W-1+L: how far back `truncate` can always go
        sliding = any(config.is_sliding(i) for i in range(config.num_hidden_layers))
        self.ring = W - 1 + L + self.rollback if sliding else 0  # slots of each sliding layer
        # Every sliding layer holds the same positions in the same slots, so they share one map of
        # slot -> absolute position (-1: empty), and a pass builds their mask once, at the first of
        # them (on a GPU that is ~10 fewer kernels per layer). Full layers hold slot == position.
        self.ring_pos = torch.full((self.ring,), -1, device=device, dtype=torch.long) if sliding else None
        self.keys, self.values, self.slot_pos = [], [], []
        for i in range(config.num_hidden_layers):
            size = self.ring if config.is_sliding(i) else max_tokens + L
            shape = (1, config.layer_kv_heads[i], size, config.layer_head_dim[i])
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
            self.slot_pos.append(self.ring_pos if config.is_sliding(i) else None)
        self.dtype = dtype
        layers = range(config.num_hidden_layers)
        self.first_sliding = next((i for i in layers if config.is_sliding(i)), None)
        self.last_sliding = max((i for i in layers if config.is_sliding(i)), default=None)
        self.first_full = next((i for i in layers if not config.is_sliding(i)), None)
        self._sliding_pass = self._full_pass = None  # what the first layer of a kind built for this pass
        self.length = 0
        self.lowest_kept = 0  # sliding rings still hold every position from here to length
        # Decoder state on the device, so a captured graph reads it instead of baking it in:
        self.canvas_pos = torch.arange(L, device=device)  # positions of the canvas being decoded
        self.ring_slots = self.canvas_pos % self.ring if sliding else None  # their slots in the rings
        self.slots = torch.arange(max_tokens + L, device=device)
        self.span, self.span_masked = None, False  # full layers attend over slots [:span] (prepare_decode)
        self.marked = None  # (length, lowest_kept, copies of the rings) saved by mark()

    @property
    def capacity(self) -> int:
        return self.slots.numel()

    def prepare_decode(self, L: int, device=None, bucket: int | None = None) -> torch.Tensor:
        """Set the canvas positions (a device-side write, no host sync) and the span of full-layer
        slots the decoder reads: exactly length+L, or rounded up to a multiple of `bucket` so that
        the shapes stay fixed while the context grows (one CUDA graph per bucket)."""
        self._check_room(L, canvas=True)
        end = self.length + L
        torch.arange(self.length, end, out=self.canvas_pos)
        if self.ring:  # made here, before the pass: a fused q/k/v writes into them before decode_kv runs
            if self.ring_slots.shape != self.canvas_pos.shape:  # a canvas of another length (tests)
                self.ring_slots.resize_(self.canvas_pos.shape)
            torch.remainder(self.canvas_pos, self.ring, out=self.ring_slots)
        self.span = end if bucket is None else min(-(-end // bucket) * bucket, self.capacity)
        self.span_masked = bucket is not None  # a bucket's graph must mask its slack even when there is none
        if self.ring:  # the canvas took the L ring slots of the oldest positions kept
            self.lowest_kept = max(self.lowest_kept, end - self.ring)
        return self.canvas_pos

    def truncate(self, n: int) -> bool:
        """Forget every token from position n on (a chat turn that diverges from the cached one).
        False, and nothing changed, when the rings no longer hold the W-1 tokens before n."""
        _check_truncate(n, self.length)
        if n > 0 and max(0, n - self.window + 1) < self.lowest_kept:
            return False
        if self.ring_pos is not None:
            self.ring_pos.masked_fill_(self.ring_pos >= n, -1)
        self.length = n
        self.lowest_kept = min(self.lowest_kept, n)
        if self.marked is not None and self.marked[0] > n:  # its full-layer slots will be overwritten
            self.marked = None
        return True

    def reset(self) -> None:
        self.truncate(0)

    def mark(self) -> None:
        """Remember this point, so that `rewind` can come back to it (a copy of the sliding rings)."""
        rings = [(k.clone(), v.clone()) for k, v, p in zip(self.keys, self.values, self.slot_pos) if p is not None]
        ring_pos = None if self.ring_pos is None else self.ring_pos.clone()
        self.marked = (self.length, self.lowest_kept, rings, ring_pos)

    @property
    def marked_length(self) -> int | None:
        return None if self.marked is None else self.marked[0]

    def rewind(self) -> None:
        """Back to the marked point, in place: the buffers, and the CUDA graphs on them, stay."""
        length, lowest, rings, ring_pos = self.marked
        sliding = [i for i, p in enumerate(self.slot_pos) if p is not None]
        for i, (k, v) in zip(sliding, rings):
            self.keys[i].copy_(k)
            self.values[i].copy_(v)
        if ring_pos is not None:
            self.ring_pos.copy_(ring_pos)
        self.length, self.lowest_kept = length, lowest

    def _check_room(self, n: int, canvas: bool = False) -> None:
        room = self.capacity if canvas else self.max_tokens
        if self.length + n > room:
            raise ContextFullError(f"context full: {self.length + n} tokens > the {room} this cache holds")

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
        ring_pos, size = self.ring_pos, self.ring
        if i == self.first_sliding:  # the mask and the slots, once for all sliding layers of this pass
            committed = torch.where(ring_pos < start, ring_pos, -1)  # drop a decoded canvas left in the ring
            keep = slice(max(0, T - size), T)
            self._sliding_pass = (window_mask(new_pos, torch.cat([committed, new_pos]), window), keep,
                                  new_pos[keep] % size)
        mask, keep, slots = self._sliding_pass
        keys = torch.cat([self.keys[i], k], dim=-2)
        values = torch.cat([self.values[i], v], dim=-2)
        self.keys[i][:, :, slots] = k[:, :, keep]
        self.values[i][:, :, slots] = v[:, :, keep]
        if i == self.last_sliding:  # the shared map moves on once every sliding layer has read it
            ring_pos[slots] = new_pos[keep]
            self.lowest_kept = max(self.lowest_kept, start + T - size)
        return keys, values, False, mask

    def canvas_dest(self, i: int):
        """Where layer i's canvas K/V go in this decode pass: (keys, values, slots), the buffers
        [1, Hk, S, D] and the slots [L] of the canvas's rows (a device tensor that prepare_decode
        sets: full layers the canvas positions, sliding layers their ring slots). A q/k/v kernel that
        writes them there passes None to `decode_kv`, which then copies nothing."""
        slots = self.canvas_pos if self.slot_pos[i] is None else self.ring_slots
        return self.keys[i], self.values[i], slots

    def decode_kv(self, i, k, v, window):
        """k, v None: already in their slots (`canvas_dest`)."""
        pos = self.canvas_pos  # set by prepare_decode; device-side, so graph replays see new values
        if self.slot_pos[i] is None:  # the canvas goes into the slack after the valid tokens
            if k is not None:
                self.keys[i].index_copy_(2, pos, k)
                self.values[i].index_copy_(2, pos, v)
            keys, values = self.keys[i][:, :, :self.span], self.values[i][:, :, :self.span]
            if not self.span_masked:
                return keys, values, None
            if i == self.first_full:  # a bucket: hide the slack (one mask for all full layers)
                self._full_pass = self._bias(self.slots[:self.span] <= pos[-1])
            return keys, values, self._full_pass
        # The ring holds the last W-1 tokens; the canvas takes L other slots. The next commit
        # rewrites those slots with the committed canvas, so nothing of it leaks into the cache.
        if i == self.first_sliding:
            self.ring_pos.index_copy_(0, self.ring_slots, pos)
            visible = (self.ring_pos >= 0) & (self.ring_pos > pos[0] - window)  # the last W-1 tokens + the canvas
            self._sliding_pass = self._bias(visible)
        if k is not None:
            self.keys[i].index_copy_(2, self.ring_slots, k)
            self.values[i].index_copy_(2, self.ring_slots, v)
        return self.keys[i], self.values[i], self._sliding_pass

    def _bias(self, visible: torch.Tensor) -> torch.Tensor:
        """A key mask as SDPA's additive bias [1, S] (0 or -inf), made once a pass: SDPA would
        otherwise turn a bool mask into one in every layer."""
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        return bias.masked_fill_(~visible, float("-inf"))[None, :]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
