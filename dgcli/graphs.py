"""CUDA graphs for the denoising step, applied from outside the model (the engine wraps its step).

A full-size step is about 450 GPU kernels on CUDA (scripts/step_model.py, a model: projections,
norms, each layer's glue, router and soft embedding fused by dg's kernels; ~5,600 before those). Launched one by one from Python,
at a few microseconds each, that is milliseconds per step, the order of the step's memory-bound
floor on an H100 (an estimate: not yet timed on a GPU). So the step is captured once as a CUDA
graph and replayed: one launch per step.

What makes the step capturable (see `DiffusionGemma.decode`, `Engine.stats` and `StaticKVCache`):
- fixed buffers: the canvas ids, the self-conditioning logits, the temperature and every output
  live here; each step copies its inputs in, and the outputs are overwritten by the next replay
  (a caller keeps a copy of what it keeps: the sampler clones the argmax it commits). The sampler's
  fused draw writes the self-conditioning logits and their logsumexp straight into this object's
  buffers (`Engine.sc_buffers`); handed its own buffers, a step copies nothing;
- positions on the device: the cache writes the canvas positions into a device tensor before each
  replay, so RoPE, ring slots and masks follow them without recapture;
- fixed shapes: the full-attention layers read a span of cache slots rounded up to `BUCKET`, the
  slack hidden by a mask, so one graph serves a whole bucket of context lengths. There is one graph
  per (bucket, self-conditioning input: none, logits, logits with their logsumexp, fused LM head
  or not): a canvas's first step has no self-conditioning input;
- no host synchronisation: routing sorts and offsets stay on the device (no `.item()`, `.tolist()`).
The graphs share one memory pool: they run one at a time. A step that cannot be captured raises
here; the engine then turns graphs off for itself (one warning) and steps eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

BUCKET = 1024  # tokens: full layers attend over at most this many empty slots


class CudaCapture:
    """Captures `fn` into a torch.cuda.CUDAGraph, after a warm-up run on a side stream (allocator,
    cuBLAS workspaces, Triton compilation and autotuning all happen there, not in the graph)."""

    def __init__(self):
        self.pool = None

    def __call__(self, fn: Callable[[], None]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph


class TracedCapture:
    """The same protocol without CUDA, for tests on the CPU: `fn` is traced once with make_fx into
    a list of aten ops on the live buffers, and `replay()` re-runs that trace. As with a CUDA graph,
    Python state is frozen at capture and only the buffers' contents change between replays."""

    def __call__(self, fn):
        from torch.fx.experimental.proxy_tensor import make_fx

        traced = make_fx(fn)()

        class Replay:
            def replay(self):
                traced()

        return Replay()


class GraphedStep:
    """`Engine.stats` on one static cache, replayed from captured graphs into this object's buffers."""

    def __init__(self, engine, cache, capture):
        from .engine import StepOut  # the engine imports this module lazily; no cycle at import time

        L, V, dev = engine.config.canvas_length, engine.config.vocab_size, engine.device
        self.engine, self.cache, self.capture = engine, cache, capture
        self.canvas = torch.zeros(1, L, dtype=torch.long, device=dev)
        self.sc = torch.zeros(1, L, V, dtype=engine.dtype, device=dev)
        self.sc_lse = torch.zeros(1, L, dtype=torch.float32, device=dev)  # sc's logsumexp, when the sampler made it
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        # The outputs: the fused head's graphs write raw logits in the model dtype (134 MB at full
        # size), the unfused ones fp32 proc (268 MB); an engine's graphs are all one kind.
        self.fused = engine.fused_head
        values = torch.empty(1, L, V, dtype=engine.dtype if self.fused else torch.float32, device=dev)
        self.out = StepOut(values, torch.zeros(1, L, dtype=torch.long, device=dev),
                           torch.zeros(1, L, dtype=torch.float32, device=dev),
                           torch.zeros(1, L, dtype=torch.float32, device=dev),
                           (engine.config.final_logit_softcapping, self.temperature) if self.fused else None)
        # (span, self-conditioning: 0 none, 1 sc, 2 sc with its logsumexp, fused head)
        self.graphs: dict[tuple[int, int, bool], object] = {}
        self.capture_seconds = 0.0  # warm-up and capture time, reported apart from the steps

    def __call__(self, canvas: torch.Tensor, sc: torch.Tensor | None, temperature: torch.Tensor, fused: bool,
                 sc_lse: torch.Tensor | None = None):
        """One step; sc (and sc_lse) may be this object's own buffers, which the sampler's draw wrote
        (Engine.sc_buffers): then nothing is copied."""
        if fused != self.fused:  # the engine's steps without a processor are all one kind
            raise ValueError(f"a {'fused' if fused else 'unfused'} head step on graphs made for the other kind")
        positions = self.cache.prepare_decode(canvas.shape[1], bucket=self.engine.bucket)
        self.canvas.copy_(canvas)
        if sc is not None and sc is not self.sc:
            self.sc.copy_(sc)
        if sc is not None and sc_lse is not None and sc_lse is not self.sc_lse:
            self.sc_lse.copy_(sc_lse)
        self.temperature.copy_(temperature.reshape(()))
        kind = 0 if sc is None else 1 if sc_lse is None else 2
        key = (self.cache.span, kind, fused)
        graph = self.graphs.get(key)
        if graph is None:
            sc_buf = self.sc if sc is not None else None
            lse_buf = self.sc_lse if kind == 2 else None
            t0 = time.perf_counter()
            graph = self.capture(lambda: self.engine.stats(self.canvas, self.cache, sc_buf, self.temperature,
                                                           positions, fused, out=self.out, sc_lse=lse_buf))
            self.graphs[key] = graph
            self.capture_seconds += time.perf_counter() - t0
        graph.replay()
        return self.out if fused else self.out._replace(lse=None)
