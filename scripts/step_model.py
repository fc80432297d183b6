#!/usr/bin/env python
"""A model of one denoising step of the full-size 26B-A4B on CUDA: GPU kernels, bytes moved and
peak memory, traced on `meta` tensors. It is a model, NOT a measurement: no GPU runs here.

    python scripts/step_model.py                # 8k and 32k, the released config (~15 s of CPU)
    python scripts/step_model.py --json         # the report as JSON (--out FILE writes it)
    python scripts/step_model.py --config reduced --contexts 1024,4096

What is traced, and how:
- the released config (dgcli/known.py) in the int4 scheme at the formats `dg quantize` picks by
  default (experts int4 g64, dense and embedding int8 per row), swapped in by
  quant.runtime.quantize_modules, all on `meta`: shapes, dtypes and storages without data;
- the CUDA paths: while tracing, `Tensor.is_cuda` answers True for meta tensors, so every CUDA-only
  branch (the Triton kernels' dispatch, the int4 experts) is taken. Each Triton launch (the
  kernels' `launchable`) is replaced by a recorder: ONE kernel whose bytes are its tensor arguments
  (weights read, activations in, outputs written), each whole, except where a kernel touches only
  some rows of one: ROWS_TOUCHED (the routed experts' h [cap, I] has a row per sorted slot, routing
  padding included (3968 rows for 2048 pairs at the full size), but gate_up writes and down reads
  only the P real pairs' rows, so h counts P·I·itemsize there), and a KV-cache buffer, of which the
  fused q/k/v writes only the canvas's slots. The torch glue around the kernels (routing sort, slot
  sum, partial combine) is traced as it runs.
  `F.scaled_dot_product_attention` is modelled as CUDA runs it with a mask (memory-efficient
  attention; an assumption: flash attention takes no mask, and the full layers' head dim 512 is over
  its limit): the bool mask negated and made an additive bias in q's dtype, padded (a copy) to a
  multiple of 8 keys, then ONE fused kernel reading q, k, v, bias;
- the engine as CUDA runs it by default (dgcli/engine.py: static cache, fused LM head, CUDA graphs,
  RMSNorms, routers, layers' glue, MLPs and attentions swapped for kernels.fused_norms / fused_router /
  fused_mix / fused_mlp / fused_attention (`kernels.install_fused`): the Engine swaps them on CUDA
  only, so this script does).
  The graph backend here replays the step by running it, its allocations in a modelled private pool
  that keeps its peak, as a CUDA graph's pool does. A prompt of the context's length is prefilled
  (only its last chunk is traced: it holds the most; --full-prefill traces every chunk), then a
  canvas's first two steps are taken, each followed by the sampler's work (`Block.decide` in
  dgcli/sampler.py: its draw also writes the bf16 proc that self-conditions the next step, with
  the Exp(1) draws made in the kernel, its check against torch's taken as passed). The second,
  self-conditioned step is the one reported; the same step with graphs off is under `eager`;
- a TorchDispatchMode records every aten op. Kernels are the ops that write new or existing memory:
  views and bare allocations are not. Bytes of an op = each distinct tensor it reads + each tensor
  it writes (stride-0 dimensions once; a gather reads, and an indexed write writes, only the rows it
  moves). `dram_bytes` leaves out activations under L2_RESIDENT bytes (neither weights nor cache),
  which stay in L2 between kernels on these GPUs; `bytes` counts everything as DRAM traffic;
- parts: module forward hooks push a name (experts = router + routed experts, dense = the dense MLP
  branch, attention = projections, cache writes, attention, norms = every RMSNorm (with the residual
  add or the q/k RoPE fused into it) and a layer's glue around its MLPs (Layer.mix_in / mix_out),
  self_conditioning, head = the LM head, sampler, other = embedding lookup, residuals, step glue);
  self-conditioning, head and sampler own everything inside them;
- live memory: every storage an op allocates counts until its last reference dies (a weakref
  finalizer), so peaks follow Python's own lifetimes. Weights count once, as they sit. Not counted:
  kernels' workspaces (sorting, cuBLAS), allocator rounding, the CUDA context.
Predicted time = bytes / vendor bandwidth + kernels x a per-kernel cost (`--per-kernel-us`, 2 us:
a launch gap and the tail of a small kernel), as the issue defines it (`predicted_ms`). That assumes
every kernel is bound by its bytes, and many are not: with a 256-token canvas the int8-weight
matmuls (q/k/v/o, the dense MLP, the LM head, the soft embedding) do 2 x 256 FLOPs per weight
byte, and the full layers' attention grows with the context. So each kernel also counts its
tensor-core FLOPs (`kernel_flops`, `_aten_flops`, the attention's QK and PV), and
`predicted_ms_roofline` takes for each kernel the longer of its DRAM bytes at the bandwidth and its
FLOPs at the vendor's peak dense bf16 rate with fp32 accumulation (TENSOR_FLOPS), plus the
per-kernel cost; `compute_bound_ms` is the part of it in kernels whose FLOPs outlast their bytes,
`compute_floor_ms` all FLOPs at that peak. CUDA-core work (norms, the sampler's draw, dequantising
the weights), overlap between kernels and cache effects beyond the L2 split are not modelled; the
prefill is compute-bound, so only its memory is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import sys
import time
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from dgcli import known  # noqa: E402
from dgcli import model as dgmodel  # noqa: E402
from dgcli.config import ModelConfig  # noqa: E402

GPUS = {"RTX 4090": 1008e9, "RTX 5090": 1792e9, "H100 SXM": 3350e9}  # vendor DRAM bandwidth, bytes/s
# Vendor peak dense tensor-core throughput for bf16 inputs with fp32 accumulation, FLOP/s (the NVIDIA
# Ada and Blackwell GeForce whitepapers, the H100 SXM datasheet): what every matmul here runs at,
# the int8 and int4 weights being converted to bf16 in registers first.
TENSOR_FLOPS = {"RTX 4090": 165.2e12, "RTX 5090": 209.5e12, "H100 SXM": 989.4e12}
PER_KERNEL_US = 2.0
CONTEXTS = (8192, 32768)
PARTS = ("experts", "dense", "attention", "norms", "head", "self_conditioning", "sampler", "other")
OWNING = ("sampler", "head", "self_conditioning")  # these own every op made inside them
MEM_EFF_ALIGN = 8  # keys: the memory-efficient attention kernel pads its bias to this multiple
L2_RESIDENT = 16 * 2**20  # an activation this small stays in L2 (50-96 MB on these GPUs) between kernels
# Triton kernels that touch only some rows of a tensor argument: kernel -> {tensor argument: the
# argument giving how many of its rows}. kernels/moe_int4.py: gate_up and down touch h's P real rows.
ROWS_TOUCHED = {"gate_up_kernel": {"h_ptr": "num_pairs"}, "down_kernel": {"h_ptr": "num_pairs"}}
NOTE = ("a model, not a measurement: kernels and bytes traced on meta tensors taking the CUDA paths "
        "(scripts/step_model.py); time = bytes / vendor bandwidth + kernels x per-kernel cost")

_FULL = known.text_config()
CONFIGS = {
    "full": _FULL,
    # The same routing, layer pattern, window and canvas, narrow: for tests (seconds on a CPU).
    "reduced": dict(_FULL, vocab_size=32768, hidden_size=512, intermediate_size=384, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                    num_global_key_value_heads=2, layer_types=_FULL["layer_types"][:6], moe_intermediate_size=128),
}

aten = torch.ops.aten
_NOT_KERNELS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,  # allocation only
                aten.new_empty.default, aten.new_empty_strided.default, aten._local_scalar_dense.default}
_WRITE_ONLY = {"copy_", "fill_", "zero_", "exponential_", "uniform_", "normal_", "random_", "bernoulli_"}
_GATHERS = {"index", "index_select", "gather", "embedding", "take"}
_INDEXED_WRITES = {"index_copy_", "index_put_", "_index_put_impl_", "index_add_", "scatter_", "scatter_add_",
                   "scatter_reduce_", "index_fill_", "masked_scatter_", "put_"}


# ---------------------------------------------------------------------------------------------------
# The recorder


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing t: broadcast (stride-0) dimensions count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride:
            n *= size
    return n * t.element_size()


def _key(t: torch.Tensor):
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


class Kernel(NamedTuple):
    """One recorded GPU kernel."""

    phase: str
    part: str
    name: str
    bytes: int  # read + written, every byte
    dram: int  # the same without activations under L2_RESIDENT
    flops: int  # tensor-core FLOPs
    floor: int  # weights and cache it reads that no earlier kernel of the phase read whole


class Recorder(TorchDispatchMode):
    """Records GPU kernels and live memory while active (see the module docstring). A kernel is
    (phase, part, name, bytes, dram bytes): dram bytes leave out activations small enough to stay
    in L2 between kernels (under L2_RESIDENT bytes, neither a weight nor the KV cache)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.kernels: list[Kernel] = []
        self.read_whole: dict[str, set[int]] = {}  # per phase: resident storages some kernel read whole
        self.syncs: list[str] = []  # phases of host reads (.item(), .tolist())
        self.phase = "setup"
        self.parts: list[str | None] = []  # module / function stack
        self.resident: set[int] = set()  # storages always read from DRAM: weights, KV cache
        self.kv_cache: set[int] = set()  # the KV cache's K/V buffers, which a Triton kernel writes rows of
        self.live = 0  # bytes in the default pool
        self.pool_live = 0  # bytes the graph pool holds now, and the most it has held (kept reserved)
        self.pool_reserved = 0
        self.in_pool = False
        self.peak = 0

    # ---- phases, parts, pool ----
    @contextlib.contextmanager
    def phase_as(self, name: str):
        saved, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = saved

    @contextlib.contextmanager
    def part(self, name: str | None):
        self.parts.append(name)
        try:
            yield
        finally:
            self.parts.pop()

    @contextlib.contextmanager
    def graph_pool(self):
        saved, self.in_pool = self.in_pool, True
        try:
            yield
        finally:
            self.in_pool = saved

    def reset_peak(self) -> None:
        self.peak = self.live + self.pool_reserved

    def keep_resident(self, tensors) -> None:
        self.resident.update(t.untyped_storage()._cdata for t in tensors)

    def _part_now(self, tensors) -> str:
        for p in self.parts:
            if p in OWNING:
                return p
        for p in reversed(self.parts):
            if p is not None:
                return p
        # Vocabulary-wide work outside the head and the sampler is the self-conditioning input.
        if any(t.dim() and t.shape[-1] == self.vocab for t in tensors):
            return "self_conditioning"
        return "other"

    # ---- memory ----
    def _allocated(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        n = storage.nbytes()
        if self.in_pool:
            self.pool_live += n
            self.pool_reserved = max(self.pool_reserved, self.pool_live)
        else:
            self.live += n
        weakref.finalize(storage, self._freed, n, self.in_pool)
        self.peak = max(self.peak, self.live + self.pool_reserved)

    def _freed(self, n: int, pooled: bool) -> None:
        if pooled:
            self.pool_live -= n
        else:
            self.live -= n

    # ---- kernels ----
    def _record(self, name: str, tensors, touches, flops: int = 0) -> None:
        total = dram = floor = 0
        whole = self.read_whole.setdefault(self.phase, set())
        for t, n in touches:
            total += n
            storage = t.untyped_storage()
            if storage._cdata in self.resident:
                if storage._cdata not in whole:  # the floor reads each weight (and the cache) once
                    floor += n
                    if n >= storage.nbytes():
                        whole.add(storage._cdata)
            if n >= L2_RESIDENT or storage._cdata in self.resident:
                dram += n
        self.kernels.append(Kernel(self.phase, self._part_now(tensors), name, total, dram, flops, floor))

    def launch(self, name: str, tensors, flops: int = 0) -> None:
        """One kernel that reads or writes each of `tensors` once (and does `flops` of matmul)."""
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self._record(name, tensors, _distinct(tensors), flops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in _tensors((args, kwargs)) if _on_gpu(t)]
        # New storage or not decides, not the schema: under inference mode composite ops such as
        # `to` or `reshape` arrive here whole, and return a view or a copy as the case may be.
        inputs = {t.untyped_storage()._cdata for t in ins}
        fresh, new = [], set()
        for t in _tensors(out):
            sid = t.untyped_storage()._cdata
            if _on_gpu(t) and sid not in inputs:
                fresh.append(t)
                if sid not in new:
                    new.add(sid)
                    self._allocated(t)
        if not ins and not fresh:
            return out
        if func is aten._local_scalar_dense.default:
            self.syncs.append(self.phase)
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if (fresh or mutates) and func not in _NOT_KERNELS and func.namespace != "prim":
            self._record(func.overloadpacket.__name__, ins + fresh, _op_touches(func, args, kwargs, fresh),
                         _aten_flops(func, args, kwargs))
        return out


_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul"}


def _aten_flops(func, args, kwargs) -> int:
    """Multiply-add FLOPs (2 per MAC) of an aten matmul: out elements x the contracted length."""
    name = func.overloadpacket.__name__
    if name not in _MATMULS:
        return 0
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    k = a.shape[-1]
    n = b.shape[0] if name == "linear" else b.shape[-1]
    return 2 * (a.numel() // k) * n * k


def kernel_flops(name: str, bound: dict) -> int:
    """Tensor-core FLOPs of a Triton launch, from its arguments: the matmuls only (norms, routing,
    the sampler's draw are CUDA-core work, not modelled). The rules follow each kernel's signature:
    - int8-weight matmuls (int8_linear, int8_linear_heads, geglu_int8, qkv_int8, lm_head): the first
      tensor is the activation, each 2-D int8 tensor a weight [N, K]: 2·M·N·K summed over weights;
    - int8_soft: probabilities or logits [L, V] times the int8 embedding [V, H]: 2·L·V·H;
    - the int4 experts (moe_int4's gate_up / down): 2·rows·N·K over the rows the tiles compute: the
      real (token, slot) pairs and their experts' padding to BLOCK_M, expected (BLOCK_M-1)/2 a
      routed expert (an assumption: each expert's count is as likely any remainder mod BLOCK_M).
    `bound`: the launch's arguments by the kernel's parameter names."""
    tensors = _tensors(list(bound.values()))
    if name in ("gate_up_kernel", "down_kernel"):
        q, cap, pairs = bound["q_ptr"], bound["sorted_ptr"].numel(), bound["num_pairs"]
        experts, block = q.shape[0], bound["BLOCK_M"]
        rows = min(cap, pairs + min(experts, pairs) * (block - 1) / 2)
        return int(2 * rows * q.shape[1] * q.shape[2] * 2)  # two 4-bit codes a byte
    weights = [t for t in tensors if t.dtype == torch.int8 and t.dim() == 2]
    if not weights:
        return 0
    x = tensors[0]
    if name == "int8_soft_kernel":
        return 2 * x.numel() * weights[0].shape[1]
    return sum(2 * (x.numel() // w.shape[1]) * w.shape[0] * w.shape[1] for w in weights)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type in ("cuda", "meta")  # meta stands for CUDA here (see cuda_paths)


def _distinct(tensors) -> list[tuple[torch.Tensor, int]]:
    seen, touches = set(), []
    for t in tensors:
        if _key(t) not in seen:
            seen.add(_key(t))
            touches.append((t, footprint(t)))
    return touches


def _op_touches(func, args, kwargs, fresh) -> list[tuple[torch.Tensor, int]]:
    """(tensor, bytes) an aten op reads and writes: each distinct input once, a mutated input read
    and written (written only by copy/fill/random ops and out= overloads), outputs written."""
    name = func.overloadpacket.__name__
    schema = func._schema
    bound = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)]
    mutated = [v for a, v in zip(schema.arguments, bound) if a.alias_info is not None and a.alias_info.is_write]
    if name in _GATHERS:  # reads as many rows of self as it writes, not all of self
        source, rest = bound[0], _tensors(bound[1:])
        return _distinct(rest) + [(source, sum(footprint(t) for t in fresh))] + [(t, footprint(t)) for t in fresh]
    if name in _INDEXED_WRITES:
        # Only the indexed part of self is written (and read back by index_add_), not all of it.
        target = mutated[0]
        others = [t for t in _tensors(bound[1:]) if t is not target]
        written = max((t.numel() for t in others), default=0) * target.element_size()
        return _distinct(others) + [(target, written * (2 if name == "index_add_" else 1))]
    write_only = name in _WRITE_ONLY or schema.overload_name.startswith("out")
    inputs = _tensors(bound)
    reads = [t for t in inputs if not (write_only and any(t is m for m in mutated))]
    writes = [t for t in inputs if any(t is m for m in mutated)] + fresh
    return _distinct(reads) + [(t, footprint(t)) for t in writes]


# ---------------------------------------------------------------------------------------------------
# What the CUDA path runs, on meta tensors


class _Launcher:
    """Stands in for `launchable(kernel, device)`: `[grid](*args)` records one kernel."""

    def __init__(self, rec: Recorder, kernel):
        self.rec = rec
        self.fn = getattr(kernel, "fn", kernel)
        self.name = getattr(self.fn, "__name__", "triton_kernel").strip("_")

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        """One kernel: its tensor arguments' bytes (see _touches) and its FLOPs (kernel_flops)."""
        bound = dict(zip(inspect.signature(self.fn).parameters, args), **kwargs)
        tensors = _tensors((args, kwargs))
        self.rec._record(self.name, tensors, self._touches(tensors, bound), kernel_flops(self.name, bound))

    def _touches(self, tensors, bound: dict) -> list[tuple[torch.Tensor, int]]:
        """Each distinct tensor argument whole, except: ROWS_TOUCHED's (only so many rows along dim 0),
        and a KV-cache buffer, written only in the rows of the launch's slot index (the fused q/k/v's
        canvas K/V, row t to slot slots[t])."""
        rows = {id(bound[t]): int(bound[n]) for t, n in ROWS_TOUCHED.get(self.name, {}).items()}
        slots = None
        if any(t.untyped_storage()._cdata in self.rec.kv_cache for t in tensors):
            slots, = [t for t in tensors if t.dtype == torch.int64 and t.dim() == 1]
        touches = []
        for t, n in _distinct(tensors):
            if id(t) in rows:
                n = n * rows[id(t)] // t.shape[0]
            elif slots is not None and t.untyped_storage()._cdata in self.rec.kv_cache:
                n = n // t.shape[-2] * slots.numel()
            touches.append((t, n))
        return touches


def _fake_sdpa(rec: Recorder):
    """F.scaled_dot_product_attention as CUDA runs it for these shapes: a bool mask becomes an
    additive bias in q's dtype (padded to MEM_EFF_ALIGN keys), then one fused kernel. Flash attention
    takes no mask and the full layers' head dim (512) is over its limit, so the memory-efficient
    kernel is the one that runs (an assumption of this model)."""

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.where(bias.logical_not(), float("-inf"), torch.zeros((), dtype=q.dtype, device=q.device))
        if bias is not None and bias.shape[-1] % MEM_EFF_ALIGN:
            S = bias.shape[-1]
            bias = F.pad(bias, (0, MEM_EFF_ALIGN - S % MEM_EFF_ALIGN))[..., :S]
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        scores = q.numel() // q.shape[-1] * k.shape[-2]  # every query against every key (no skipping)
        rec.launch("attention", [q, k, v, out] + ([bias] if bias is not None else []),
                   2 * scores * (q.shape[-1] + v.shape[-1]))
        return out

    return sdpa


class PoolCapture:
    """The engine's graph backend, modelled: `replay()` runs the step with its allocations in the
    graph's private pool, which keeps its peak reserved. graphs.CudaCapture also runs the step
    twice at capture (a warm-up, then the capture): the same ops, and a peak no higher than the
    replayed step's (the pool holds the same buffers), so they are not traced."""

    def __init__(self, rec: Recorder):
        self.rec = rec

    def __call__(self, fn):
        rec = self.rec

        class Replay:
            def replay(self):
                with rec.graph_pool():
                    fn()

        return Replay()


@contextlib.contextmanager
def cuda_paths(rec: Recorder):
    """The substitutions, undone on exit: meta tensors answer `is_cuda`; Triton launches and SDPA
    are recorded as one kernel each; module hooks and a few methods (the head, the soft embedding,
    the norms' fused uses) push their part; autotuning is off (it would time candidates)."""
    import importlib

    from quant import runtime

    # By module: the kernels package re-exports functions under the same names as its modules.
    names = ("_dispatch", "moe_int4", "int8_linear", "lm_head", "fused_norms", "fused_router", "fused_mix", "sample")
    dispatch, moe_int4, int8_linear, lm_head, fused_norms, fused_router, fused_mix, sample = (
        importlib.import_module(f"kernels.{m}") for m in names)

    from dgcli.engine import Engine  # noqa: F401 (fail here, not mid-trace, if the engine is missing)

    def owner(fn, part):
        def wrapped(*args, **kwargs):
            with rec.part(part):
                return fn(*args, **kwargs)
        return wrapped

    # Every launch goes through _dispatch.launchable (a module may hold its own reference to it).
    patches = [(m, "launchable", lambda kernel, device: _Launcher(rec, kernel))
               for m in (dispatch, moe_int4, int8_linear, lm_head) if "launchable" in m.__dict__]
    patches += [(torch.Tensor, "is_cuda", property(lambda t: t.device.type in ("cuda", "meta"))),
                (F, "scaled_dot_product_attention", _fake_sdpa(rec)),
                (lm_head, "lm_head", owner(lm_head.lm_head, "head")),
                (dgmodel.DiffusionGemma, "logits", owner(dgmodel.DiffusionGemma.logits, "head")),
                (dgmodel.RMSNorm, "add_to", owner(dgmodel.RMSNorm.add_to, "norms")),
                (dgmodel.RMSNorm, "rope", owner(dgmodel.RMSNorm.rope, "norms")),
                (fused_norms.FusedRMSNorm, "add_to", owner(fused_norms.FusedRMSNorm.add_to, "norms")),
                (fused_norms.FusedRMSNorm, "rope", owner(fused_norms.FusedRMSNorm.rope, "norms")),
                (dgmodel.Layer, "mix_in", owner(dgmodel.Layer.mix_in, "norms")),
                (dgmodel.Layer, "mix_out", owner(dgmodel.Layer.mix_out, "norms")),
                (fused_mix.FusedLayer, "mix_in", owner(fused_mix.FusedLayer.mix_in, "norms")),
                (fused_mix.FusedLayer, "mix_out", owner(fused_mix.FusedLayer.mix_out, "norms")),
                (dgmodel.Router, "route", owner(dgmodel.Router.route, "experts")),  # called as methods: no hooks
                (fused_router.FusedRouter, "route", owner(fused_router.FusedRouter.route, "experts")),
                (dgmodel.Experts, "slots", owner(dgmodel.Experts.slots, "experts")),
                (runtime.QuantExperts, "slots", owner(runtime.QuantExperts.slots, "experts")),
                (dgmodel.Embedding, "soft", owner(dgmodel.Embedding.soft, "self_conditioning")),
                (runtime.QuantEmbedding, "soft", owner(runtime.QuantEmbedding.soft, "self_conditioning")),
                (runtime.QuantEmbedding, "soft_logits", owner(runtime.QuantEmbedding.soft_logits, "self_conditioning")),
                # The sampler's fused draw in its steady state: its once-per-shape check against
                # torch's exponential_ passed; the generator's (seed, offset) are host numbers.
                (sample, "check_status", lambda device, n: True),
                (sample, "philox_state", lambda g, device: (0, 0)),
                (sample, "set_philox_offset", lambda g, device, offset: None)]
    saved = [(m, name, m.__dict__.get(name)) for m, name, _ in patches]  # None: inherited
    env = {k: os.environ.get(k) for k in ("DG_AUTOTUNE", "DG_KERNELS")}
    os.environ.update(DG_AUTOTUNE="off", DG_KERNELS="auto")
    parts = {dgmodel.RMSNorm: "norms", dgmodel.Attention: "attention", dgmodel.MLP: "dense",
             dgmodel.SelfConditioning: "self_conditioning", dgmodel.Router: "experts", dgmodel.Experts: "experts",
             dgmodel.Embedding: "other"}

    def pre(module, args):
        rec.parts.append(next((p for cls, p in parts.items() if isinstance(module, cls)), None))

    def post(module, args, output):
        rec.parts.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post)]
    try:
        for m, name, value in patches:
            setattr(m, name, value)
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, name, value in saved:
            if value is None:
                delattr(m, name)
            else:
                setattr(m, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(config: ModelConfig):
    """(model on meta in the default int4 scheme, its format groups, weight bytes)."""
    from kernels import install_fused
    from quant.planner import plan
    from quant.runtime import quantize_modules
    from quant.schemes import tensor_formats

    groups, _ = plan(config, "int4", budget_bytes=None)  # the smallest formats: dg quantize's default choice
    with torch.device("meta"):
        model = dgmodel.DiffusionGemma(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantize_modules(model, tensor_formats(shapes, groups))
    model.to(torch.bfloat16)  # as loaded on CUDA; packed codes and scales keep their dtypes
    install_fused(model)  # the Engine does this on CUDA only, so not on meta: done here
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    return model, groups, sum(storages.values())


# ---------------------------------------------------------------------------------------------------
# One context


def _summary(kernels, phase: str, per_kernel_us: float) -> dict:
    """Kernels and bytes of one phase, in total and by part, and the predicted times."""
    rows = [k for k in kernels if k.phase == phase]
    by_part = {p: {"kernels": 0, "bytes": 0, "dram_bytes": 0, "flops": 0} for p in PARTS}
    for r in rows:
        by_part[r.part]["kernels"] += 1
        by_part[r.part]["bytes"] += r.bytes
        by_part[r.part]["dram_bytes"] += r.dram
        by_part[r.part]["flops"] += r.flops
    n, nbytes, dram, flops = len(rows), sum(r.bytes for r in rows), sum(r.dram for r in rows), sum(r.flops for r in rows)
    agg: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        a = agg.setdefault((r.part, r.name), [0, 0])
        a[0] += 1
        a[1] += r.bytes
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:10]
    ops = {p: {op: c for (q, op), (c, _) in sorted(agg.items(), key=lambda kv: -kv[1][0]) if q == p} for p in PARTS}
    return {"kernels_per_step": n, "bytes_per_step": nbytes, "dram_bytes_per_step": dram, "by_part": by_part,
            "predicted_ms": _ms(nbytes, n, per_kernel_us), "predicted_ms_small_in_l2": _ms(dram, n, per_kernel_us),
            "flops_per_step": flops, "compute_floor_ms": {g: round(flops / f * 1e3, 2) for g, f in TENSOR_FLOPS.items()},
            "predicted_ms_roofline": _roofline_ms(rows, per_kernel_us),
            # the same kernels moving only the floor's bytes (weights and cache, each read once)
            # with their FLOPs, and no per-kernel cost: the time this step's work cannot go below
            "roofline_floor_ms": _roofline_ms(rows, 0, moved=lambda r: r.floor),
            # the part of predicted_ms_roofline spent in kernels whose FLOPs outlast their bytes
            "compute_bound_ms": _roofline_ms(rows, 0, compute_bound_only=True),
            "top_ops": [{"part": p, "op": op, "calls": c, "bytes": b} for (p, op), (c, b) in top],
            "calls_by_part": ops}


def _ms(nbytes: int, kernels: int, per_kernel_us: float) -> dict:
    return {gpu: round(nbytes / bw * 1e3 + kernels * per_kernel_us * 1e-3, 2) for gpu, bw in GPUS.items()}


def _roofline_ms(rows, per_kernel_us: float, moved=lambda r: r.dram, compute_bound_only: bool = False) -> dict:
    """Per GPU: each kernel takes the longer of its `moved` bytes (DRAM by default) at the bandwidth
    and its FLOPs at the tensor cores' peak (no overlap between kernels), plus the per-kernel cost;
    compute_bound_only: only the kernels whose FLOPs take the longer."""
    result = {}
    for g, bw in GPUS.items():
        times = [(moved(r) / bw, r.flops / TENSOR_FLOPS[g]) for r in rows]
        if compute_bound_only:
            times = [t for t in times if t[1] > t[0]]
        result[g] = round((sum(max(t) for t in times) + len(times) * per_kernel_us * 1e-6) * 1e3, 2)
    return result


def _steps(engine, cache, rec: Recorder, phase: str) -> None:
    """A canvas's first two denoising steps as the sampler takes them (Block.run): each is the
    engine's step and the sampler's decisions (`Block.decide`, whose draw also writes the bf16 proc
    that self-conditions the next step, into the graph's input buffer). The second, self-conditioned
    one (the steady state) is recorded under `phase`; the first makes what a later step finds in
    place (graph buffers, previous proc)."""
    from dgcli.sampler import Block, StabilityTracker

    config, settings = engine.config, engine.sampler_defaults
    dev, n = engine.device, settings.max_denoising_steps
    temps = torch.full((n,), settings.t_max, device=dev)
    block = Block(engine, cache, settings, None, temps, [settings.t_max] * n, None)
    stability = StabilityTracker(settings.stability_threshold)
    canvas = torch.zeros(1, config.canvas_length, dtype=torch.long, device=dev)
    sc = None
    for i, name in enumerate(("setup", phase)):
        with rec.phase_as(name):
            out = engine.step(canvas, cache, sc, temps[i])
            with rec.part("sampler"):
                canvas, *_, sc = block.decide(out, stability)
            del out


def model_context(model, ctx: int, weights: int, rec: Recorder, per_kernel_us: float, eager: bool = True,
                  full_prefill: bool = False) -> dict:
    """The figures for one context: a prompt of ctx tokens prefilled, then a step at position ctx."""
    from dgcli.engine import PREFILL_CHUNK, Engine

    rec.keep_resident(list(model.parameters()) + list(model.buffers()))
    engine = Engine(model, static_cache=True, fused_head=True, capture=PoolCapture(rec))
    rec.reset_peak()
    with rec.phase_as("prefill"):
        cache = engine.new_cache(max_tokens=ctx)
        rec.keep_resident([t for t in cache.keys + cache.values + cache.slot_pos if t is not None])
        rec.kv_cache.update(t.untyped_storage()._cdata for t in cache.keys + cache.values)
        ids = torch.zeros(1, ctx, dtype=torch.long, device=engine.device)
        start = 0
        if not full_prefill:
            # The prefill's peak is its last chunk's: earlier chunks attend over fewer keys (smaller
            # masks, fewer repeated K/V). On meta only shapes matter, so the cache is advanced to
            # that chunk's start without running the chunks before it.
            start = (ctx - 1) // PREFILL_CHUNK * PREFILL_CHUNK
            cache.length = start
        engine.prefill(ids[:, start:], cache)
    peak_prefill = rec.peak
    rec.reset_peak()
    _steps(engine, cache, rec, "step")
    result = _summary(rec.kernels, "step", per_kernel_us)
    kv = cache.nbytes()
    result.update({
        "floor_bytes": weights + kv,
        "floor_ms": {gpu: round((weights + kv) / bw * 1e3, 2) for gpu, bw in GPUS.items()},
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "peak_live_bytes_decode": weights + rec.peak,
        "peak_live_bytes_prefill": weights + peak_prefill,
        "graph_pool_bytes": rec.pool_reserved,
        "host_syncs_per_step": rec.syncs.count("step"),
        "prefill": {"tokens": ctx, "chunk": PREFILL_CHUNK, "traced_from": start,
                    "kernels_traced": sum(1 for k in rec.kernels if k.phase == "prefill")},
    })
    del engine  # and its graphs: their pool goes back
    gc.collect()
    rec.pool_reserved = rec.pool_live
    if eager:  # DG_CUDA_GRAPHS=0, or a capture that failed: the same step launched op by op
        engine = Engine(model, static_cache=True, fused_head=True, cuda_graphs=False)
        rec.reset_peak()
        _steps(engine, cache, rec, "eager")
        result["eager"] = _summary(rec.kernels, "eager", per_kernel_us)
        result["eager"]["peak_live_bytes_decode"] = weights + rec.peak
        del engine
    live = rec.live
    cache.mark()  # what `dg chat` holds while a turn runs: a copy of the sliding rings
    result["chat_snapshot_bytes"] = rec.live - live
    return result


def run(config: str = "full", contexts=CONTEXTS, per_kernel_us: float = PER_KERNEL_US, eager: bool = True,
        full_prefill: bool = False) -> dict:
    """The report (see the module docstring): {"contexts": {str(ctx): {...}}, ...}."""
    from quant.planner import CUDA_CONTEXT_BYTES

    t0 = time.perf_counter()
    mc = ModelConfig.from_dict(CONFIGS[config])
    report = {"model": True, "note": NOTE, "config": config, "per_kernel_us": per_kernel_us,
              "l2_resident_bytes": L2_RESIDENT, "gpus_bytes_per_s": GPUS, "cuda_graphs": True, "fused_head": True,
              "cuda_context_bytes_assumed": CUDA_CONTEXT_BYTES, "contexts": {}}
    model, groups, weights = build(mc)
    report.update(scheme="int4", formats=groups, weights_bytes=weights)
    for ctx in contexts:
        rec = Recorder(mc.vocab_size)
        with cuda_paths(rec), rec, torch.inference_mode():
            report["contexts"][str(ctx)] = model_context(model, ctx, weights, rec, per_kernel_us, eager, full_prefill)
        del rec
        gc.collect()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


# ---------------------------------------------------------------------------------------------------
# Command line


def _table(report: dict) -> str:
    gb = 1e9
    lines = [f"MODEL, not a measurement ({report['config']} config, int4 scheme: {report['formats']}); "
             f"weights {report['weights_bytes'] / gb:.2f} GB; {report['per_kernel_us']} us per kernel"]
    for ctx, r in report["contexts"].items():
        lines.append(f"\ncontext {int(ctx):,}: {r['kernels_per_step']} kernels, {r['bytes_per_step'] / gb:.2f} GB per "
                     f"step ({r['dram_bytes_per_step'] / gb:.2f} GB without small activations; floor "
                     f"{r['floor_bytes'] / gb:.2f} GB); peak live {r['peak_live_bytes_decode'] / gb:.2f} GB decoding, "
                     f"{r['peak_live_bytes_prefill'] / gb:.2f} GB prefilling")
        lines.append(f"  {'part':<18}{'kernels':>7} {'all GB':>9} {'DRAM GB':>9} {'GFLOP':>9}")
        for part, v in r["by_part"].items():
            lines.append(f"  {part:<18}{v['kernels']:>7} {v['bytes'] / gb:>9.3f} {v['dram_bytes'] / gb:>9.3f} "
                         f"{v['flops'] / 1e9:>9.0f}")
        for label, key in (("predicted ms", "predicted_ms"), ("  small in L2", "predicted_ms_small_in_l2"),
                           ("  roofline", "predicted_ms_roofline"), ("  of which compute-bound", "compute_bound_ms"),
                           ("floor ms (bytes)", "floor_ms"), ("floor ms (FLOPs)", "compute_floor_ms"),
                           ("floor ms (roofline)", "roofline_floor_ms")):
            lines.append(f"  {label}: " + ", ".join(f"{g} {ms}" for g, ms in r[key].items()))
        if "eager" in r:
            e = r["eager"]
            ms = ", ".join(f"{g} {ms}" for g, ms in e["predicted_ms"].items())
            lines.append(f"  eager (no CUDA graphs): {e['kernels_per_step']} kernels, "
                         f"{e['bytes_per_step'] / gb:.2f} GB; predicted ms: {ms}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="step_model", description="Model (not a measurement) of one denoising "
                                "step on CUDA: kernels, bytes, peak memory, predicted time.")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--config", choices=sorted(CONFIGS), default="full", help="[full: the released 26B-A4B]")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated [8192,32768]")
    p.add_argument("--per-kernel-us", type=float, default=PER_KERNEL_US, help=f"[{PER_KERNEL_US}]")
    p.add_argument("--no-eager", action="store_true", help="skip the graphs-off variant")
    p.add_argument("--full-prefill", action="store_true", help="trace every prefill chunk, not only the last")
    p.add_argument("--out", type=Path, help="write the JSON here")
    a = p.parse_args(argv)
    try:
        contexts = [int(c) for c in a.contexts.split(",") if c.strip()]
    except ValueError:
        p.error(f"--contexts: expected numbers, got {a.contexts!r}")
    report = run(a.config, contexts, a.per_kernel_us, not a.no_eager, a.full_prefill)
    text = json.dumps(report, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text if a.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
