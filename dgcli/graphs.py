"""CUDA graphs for the denoising step.

A step makes about 160 tensor op calls per layer, some 5,000 for 30 layers (counted with the torch
profiler on the CPU: bf16, reduced config, grouped matmuls as one call each). Launched one by one
from Python, at a few microseconds each, that is milliseconds per step, the order of the step's
memory-bound floor on an H100 (an estimate: not yet timed on a GPU). So the decoder pass is captured
once as a CUDA graph and replayed: one launch per step.

What makes the pass capturable (see `DiffusionGemma.decode_at` and `StaticKVCache`):
- fixed buffers: the canvas ids, the self-conditioning logits and the output logits live here, and
  each step copies its inputs into them; the cache is preallocated;
- positions on the device: the cache writes the canvas positions into a device tensor before each
  replay, so RoPE, ring slots and masks follow them without recapture;
- fixed shapes: the full-attention layers read a span of cache slots rounded up to `BUCKET`, the
  slack hidden by a mask, so one graph serves a whole bucket of context lengths. There is one graph
  per (bucket, first step or not, fused LM head or not): a canvas's first step has no
  self-conditioning input, and `decode_stats` takes the temperature in and gives statistics out;
- no host synchronisation: routing sorts and offsets stay on the device (no `.item()`, `.tolist()`).
The graphs share one memory pool: they run one at a time, and each step's output is read before
the next replay. A pass that cannot be captured (an op that syncs, an unsupported kernel) turns graphs
off for the model with a one-line warning, and decoding goes on eagerly.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

BUCKET = 1024  # tokens: full layers attend over at most this many empty slots


def enabled_by_env(name: str = "DG_CUDA_GRAPHS") -> bool:
    """A switch that is on unless the variable says 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def use_fast_paths(model, cuda_graphs: bool | None = None) -> None:
    """On CUDA: CUDA graphs (unless cuda_graphs=False, or DG_CUDA_GRAPHS=0 when None) and the fused
    LM head in the sampler (unless DG_FUSED_HEAD=0). Elsewhere the model stays on its reference paths."""
    if model.device.type != "cuda":
        return
    if cuda_graphs if cuda_graphs is not None else enabled_by_env():
        model.graph_capture = CudaCapture()
    model.fused_head = enabled_by_env("DG_FUSED_HEAD") and model.can_fuse_head()


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
    Python state is frozen at capture and only the tensors' contents change between replays."""

    def __call__(self, fn):
        from torch.fx.experimental.proxy_tensor import make_fx

        traced = make_fx(fn)()

        class Replay:
            def replay(self):
                traced()

        return Replay()


class DecodeGraphs:
    """`decode` for one static cache, replayed from captured graphs."""

    def __init__(self, model, cache, capture, bucket: int | None = None):
        L, V = model.config.canvas_length, model.config.vocab_size
        dev = model.device
        self.model, self.cache, self.capture, self.bucket = model, cache, capture, bucket or BUCKET
        self.canvas = torch.zeros(1, L, dtype=torch.long, device=dev)
        self.sc = torch.zeros(1, L, V, dtype=model.dtype, device=dev)
        self.out = torch.empty(1, L, V, dtype=torch.float32, device=dev)
        # decode_stats: the temperature in, HeadOut out (proc shares the logits' buffer)
        from kernels.lm_head import HeadOut

        self.temp = torch.ones(1, dtype=torch.float32, device=dev)
        self.stats = HeadOut(self.out.view(L, V), torch.zeros(L, dtype=torch.long, device=dev),
                             torch.zeros(L, device=dev), torch.zeros(L, device=dev))
        self.graphs: dict[tuple[int, bool, bool], object] = {}  # (span, self-conditioned, fused head)
        self.capture_seconds = 0.0  # warm-up and capture time, reported apart from the steps

    def decode(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None,
               temperature: torch.Tensor | None = None):
        """`model.decode`, or with a temperature `model.decode_stats`, replayed from a graph.
        The results are this object's buffers: valid until the next call."""
        positions = self.cache.prepare_decode(canvas.shape[1], bucket=self.bucket)
        self.canvas.copy_(canvas)
        if sc_logits is not None:
            self.sc.copy_(sc_logits)
        fused = temperature is not None
        if fused:
            self.temp.copy_(temperature.reshape(1))
        key = (self.cache.span, sc_logits is not None, fused)
        graph = self.graphs.get(key)
        if graph is None:
            step = self._step(positions, key[1], fused)
            t0 = time.perf_counter()
            try:
                graph = self.capture(step)
            except (RuntimeError, NotImplementedError, ValueError) as e:
                # Something in the pass cannot be captured (a host sync, an unsupported kernel):
                # say so once and go on eagerly; the results are the same, only slower.
                first = str(e).splitlines()[0] if str(e) else ""
                print(f"dg: CUDA graphs off ({type(e).__name__}: {first}); decoding eagerly", file=sys.stderr)
                self.model.graph_capture = None
                self.cache.graphs = None
                return self.model.decode_at(canvas, self.cache, sc_logits, positions, temperature=temperature)
            self.graphs[key] = graph
            self.capture_seconds += time.perf_counter() - t0
        graph.replay()
        return self.stats if fused else self.out

    def _step(self, positions, with_sc: bool, fused: bool):
        sc = self.sc if with_sc else None
        if not fused:
            return lambda: self.model.decode_at(self.canvas, self.cache, sc, positions, out=self.out)

        def step():
            head = self.model.decode_at(self.canvas, self.cache, sc, positions, out=self.stats.proc,
                                        temperature=self.temp)
            for buf, value in zip(self.stats[1:], head[1:]):
                buf.copy_(value)
        return step


def graphs_for(model, cache) -> DecodeGraphs:
    """The cache's DecodeGraphs, made on first use with the model's capture backend."""
    if cache.graphs is None:
        cache.graphs = DecodeGraphs(model, cache, model.graph_capture)
    return cache.graphs
