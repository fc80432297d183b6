#!/usr/bin/env python
"""Speed benchmark: a prompt prefill, timed denoising steps and a commit through dg's Engine, on a
random-init model of the DiffusionGemma shape (or a loaded one), optionally against the transformers
reference in the same process. Prints (or writes) a JSON report; docs/benchmarks.md describes it.

    python scripts/bench.py --config full                        # GPU: 26B-A4B shape, bf16 experts
    python scripts/bench.py --config full --experts int4         # ... experts packed int4 (quant.runtime)
    python scripts/bench.py --config full --moe-only             # MoE kernel GB/s vs device bandwidth
    python scripts/bench.py --config reduced --reference --threads 1 --out cpu.json   # CPU, vs transformers
    python scripts/bench.py -m tiny                              # a model as loaded by dg
    python scripts/bench.py --model-only ARGS                    # scripts/step_model.py with ARGS

`dg bench ARGS` runs this file (through dgcli/bench.py). It lives here, not in the dg package, because
it builds the transformers reference with tests/reference.py: a developer tool for a source checkout.

Phases: build the model (on `meta`, then materialised on the device and filled with random weights:
nothing is downloaded and a 26B model never passes through host RAM), prefill, steps, commit, and the
reference. Timings are wall-clock around CUDA synchronisation. The first call of each phase is a
warm-up (allocator, Triton compilation, autotuning, graph capture), reported apart. A step is
`Engine.step`, what the sampler calls: the sampler's multinomial and accept/renoise are excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dgcli.config import (FULL, MAX_CANVAS, MAX_DENOISING_STEPS, MAX_DIM, MAX_LAYERS, MAX_SEED,  # noqa: E402
                          SLIDING, ModelConfig)
from dgcli.errors import DgError, first_line  # noqa: E402
from dgcli.known import DIFFUSIONGEMMA_26B_A4B  # noqa: E402
from dgcli.model import DiffusionGemma, Experts  # noqa: E402

S, F = SLIDING, FULL
STEPS_PER_BLOCK = (8, 16, 32, 48)
INT4 = "int4_sym_g64"  # the experts' format in dg quantize's default scheme

# The released text config, with the canvas length (a top-level field of config.json) folded in.
FULL_26B = dict(DIFFUSIONGEMMA_26B_A4B["text_config"], canvas_length=DIFFUSIONGEMMA_26B_A4B["canvas_length"])
PRESETS = {
    "full": FULL_26B,
    # Same routing (128 experts, top-8), layer pattern, window and canvas; 1/5.5 of the width and
    # one 6-layer period, so a step takes about a second on a 2-core CPU.
    "reduced": dict(FULL_26B, vocab_size=32768, hidden_size=512, intermediate_size=384, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                    num_global_key_value_heads=2, layer_types=[S] * 5 + [F], moe_intermediate_size=128),
    # For tests only (widths stay multiples of 64: int4 groups).
    "tiny": dict(FULL_26B, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                 num_global_key_value_heads=1, sliding_window=32, layer_types=[S, F], num_experts=8,
                 top_k_experts=2, moe_intermediate_size=64, canvas_length=16),
}

# Vendor peak DRAM bandwidth in GB/s, matched by substring of the device name (first match wins).
PEAK_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
            ("A100", 1555.0), ("RTX 5090", 1792.0), ("RTX 4090", 1008.0), ("RTX 3090", 936.0), ("L40S", 864.0),
            ("L4", 300.0))
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class BenchConfig:
    """What to measure. Defaults are the command line's."""

    config: str = "reduced"  # preset: full (26B-A4B shape), reduced (CPU), tiny (tests)
    model: str | None = None  # load this model (a name for dgcli.store.resolve) instead of a preset
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # default: bf16 on CUDA, fp32 on CPU
    prompt_len: int = 512
    steps: int = 8  # timed denoising steps
    repeats: int = 3  # timed prefills and commits
    experts: str = "dense"  # dense: the model's own; int4: packed by quant.runtime
    reference: bool = False  # also time transformers on the same shapes
    moe_only: bool = False  # only one layer of int4 experts at canvas-many tokens
    layers: int | None = None  # overrides of the preset (layers keeps 5 sliding / 1 full)
    vocab: int | None = None
    canvas: int | None = None
    threads: int | None = None  # torch CPU threads, restored afterwards
    seed: int = 0
    static_cache: bool | None = None  # None: the Engine's policy (static on CUDA)
    cuda_graphs: bool | None = None  # None: the Engine's policy (DG_CUDA_GRAPHS)
    fused_head: bool | None = None  # None: the Engine's policy (DG_FUSED_HEAD)

    def __post_init__(self):
        if self.model is None and self.config not in PRESETS:
            raise ValueError(f"unknown config {self.config!r}; choose from {', '.join(PRESETS)}")
        if self.experts not in ("dense", "int4"):
            raise ValueError(f"experts must be 'dense' or 'int4', got {self.experts!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        # Upper bounds: beyond them a run only takes longer, measuring nothing new (or cannot fit).
        for name, high in (("prompt_len", 131_072), ("steps", MAX_DENOISING_STEPS), ("repeats", 100),
                           ("layers", MAX_LAYERS), ("vocab", MAX_DIM), ("canvas", MAX_CANVAS), ("threads", 1024),
                           ("seed", MAX_SEED)):
            v, low = getattr(self, name), 0 if name == "seed" else 1
            if v is None and name in ("layers", "vocab", "canvas", "threads"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise ValueError(f"{name.replace('_', '-')} must be an integer from {low} to {high}, got {v!r}")
        if self.device is not None:
            from dgcli.loader import resolve_device

            try:
                resolve_device(self.device)  # cuda without a GPU: said now, not as a torch assertion mid-run
            except DgError as e:
                raise ValueError(str(e)) from None

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32


def text_config(name: str = "reduced", layers: int | None = None, vocab: int | None = None,
                canvas: int | None = None) -> dict:
    """A preset's text config (released field names, plus canvas_length), with optional overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    if layers is not None:
        d["num_hidden_layers"] = layers
        d["layer_types"] = [S if (i + 1) % 6 else F for i in range(layers)]
    if vocab is not None:
        d["vocab_size"] = vocab
    if canvas is not None:
        d["canvas_length"] = canvas
    return d


def file_text_config(path: Path) -> dict:
    """The text config of a checkpoint directory's config.json, in the same form as the presets."""
    raw = json.loads((path / "config.json").read_text())
    tc = dict(raw.get("text_config", raw))
    tc["canvas_length"] = raw.get("canvas_length") or tc.get("canvas_length") or 256
    return tc


# ---------------------------------------------------------------------------------------------------
# Phase 1: the model


@torch.no_grad()
def build_model(tc: dict, device: torch.device, dtype: torch.dtype, experts: str = "dense",
                seed: int = 0) -> DiffusionGemma:
    """dg's model with random weights, built on `meta` and materialised on `device` in `dtype`.
    experts="int4": the routed experts packed by quant.runtime, as a `dg quantize` output loads."""
    config = ModelConfig.from_dict(tc)
    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    if experts == "int4":  # swapped in after .to(dtype), so the fp16 scales stay fp16
        from quant.runtime import Packed, quantize_modules
        from quant.schemes import tensor_group

        quantize_modules(model, {n: INT4 for n, _ in model.named_parameters() if tensor_group(n) == "experts"})
        for m in model.modules():
            if isinstance(m, Packed):
                random_packed(m, device, dtype, gen)
    model.to_empty(device=device)
    for p in model.parameters():
        if p.dim() == 1:  # norms, router scale, per-expert scale: around 1
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_packed(p, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                  max_elements: int = 1 << 26) -> None:
    """Materialise a quant.runtime.Packed made on `meta` on `device` (Packed's .to() would copy out
    of meta, which torch refuses), holding random weights (std fan_in^-1/2) quantized in its own
    format, a few rows (experts) at a time so that the fp32 source stays small on any device."""
    for name, buf in p._buffers.items():
        p._buffers[name] = torch.empty_like(buf, device=device)
    p.dtype = dtype  # what it decodes to, as the loader sets it
    shape = p.shape
    rows = max(1, max_elements // math.prod(shape[1:]))
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        w = torch.randn((b - a, *shape[1:]), generator=gen, device=device) * shape[-1] ** -0.5
        for suffix, t in p.format.quantize(w).items():
            getattr(p, suffix)[a:b].copy_(t)


def load_random_or_named(cfg: BenchConfig, device: torch.device, dtype: torch.dtype):
    """-> (text config, name, experts label, a function building the model)."""
    if cfg.model is None:
        tc = text_config(cfg.config, cfg.layers, cfg.vocab, cfg.canvas)
        return tc, cfg.config, cfg.experts, lambda: build_model(tc, device, dtype, cfg.experts, cfg.seed)
    from dgcli import store
    from dgcli.loader import load_model
    from quant.runtime import prepare_quantized  # as dgcli.load plugs it in: dg quantize outputs load too

    path = store.resolve(cfg.model)
    return file_text_config(path), str(path), "as loaded", lambda: load_model(path, device=device, dtype=dtype,
                                                                               prepare=prepare_quantized)


# ---------------------------------------------------------------------------------------------------
# Runners: the phase calls of each side


class EngineRunner:
    """dg through its Engine, as the sampler calls it. With a static cache (CUDA) one cache serves
    every prefill (reset each time), so allocation stays out of the timing and the graphs stay valid."""

    def __init__(self, engine, max_tokens: int):
        self.engine, self.max_tokens = engine, max_tokens
        self.cache = None
        self.temperature = torch.ones((), device=engine.device)  # T = 1: proc is the softcapped logits

    def prefill(self, prompt):
        if self.engine.static_cache and self.cache is not None:
            self.cache.reset()
        else:
            self.cache = self.engine.new_cache(max_tokens=self.max_tokens)
        self.engine.prefill(prompt, self.cache)
        return self.cache

    def step(self, canvas, cache, sc):  # the StepOut: with the fused head, raw logits (proc made outside the timing)
        return self.engine.step(canvas, cache, sc, self.temperature)

    def logits(self, out):  # copies: the step's output may be a buffer that the next step overwrites
        return out.proc.to(torch.float32, copy=True)

    def sc(self, out):
        return out.proc.to(self.engine.dtype, copy=True)

    def fork(self, cache):
        """The cache as prefilled, to commit into: marked on the first call, rewound after (in place,
        so a static cache keeps its buffers and graphs)."""
        if cache.marked_length is None:
            cache.mark()
        else:
            cache.rewind()
        return cache

    def commit(self, canvas, cache):
        self.engine.commit(canvas, cache)

    def eager(self, canvas, cache):
        """The first step's logits on the model's plain path (no graphs, no fused head)."""
        model = self.engine.model
        return model.logits(model.decode(canvas, cache))

    def capture_ms(self) -> float | None:
        return self.engine.capture_seconds * 1e3 if self.engine.cuda_graphs else None


class ReferenceRunner:
    """The same phases through transformers, called as its `generate` calls them."""

    def __init__(self, model):
        self.model = model
        self._mask_key = self._mask = None

    def prefill(self, prompt):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self.model.model.encoder(input_ids=prompt, past_key_values=cache)
        return cache

    def step(self, canvas, cache, sc):
        # generate() builds the decoder mask once per block: build it on the first (warm-up) step, then reuse
        key = (id(cache), canvas.shape)
        if self._mask_key != key:
            dam = torch.ones(canvas.shape[0], cache.get_seq_length() + canvas.shape[1], dtype=torch.bool,
                             device=canvas.device)
            self._mask = self.model.model.decoder.create_diffusion_decoder_attention_mask(
                config=self.model.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
                decoder_attention_mask=dam)
            self._mask_key = key
        return self.model(decoder_input_ids=canvas, self_conditioning_logits=sc, past_key_values=cache,
                          decoder_attention_mask=self._mask).logits

    def commit(self, canvas, cache):
        self.model.model.encoder(input_ids=canvas, past_key_values=cache)

    def fork(self, cache):
        import copy

        return copy.deepcopy(cache)

    def logits(self, out):
        return out.to(torch.float32, copy=True)

    def sc(self, logits):
        return logits.to(self.model.model.decoder.embed_tokens.weight.dtype)

    def capture_ms(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------
# Phases 2-4: prefill, steps, commit (every timed call alternates between the runners, so a load
# change on a shared machine hits each side alike)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3


@dataclass
class Record:
    """One runner's measurements: warm-up calls, timed calls per phase, checks."""

    warmup_ms: dict = dataclasses.field(default_factory=dict)
    ms: dict = dataclasses.field(default_factory=lambda: {"prefill": [], "step": [], "commit": []})
    cache: object = None
    first_logits: torch.Tensor | None = None  # the first step's (no self-conditioning)
    eager_diff: float | None = None


def prefill_phase(runners: dict, rec: dict, prompt, repeats: int, device) -> None:
    for n, r in runners.items():
        rec[n].cache, rec[n].warmup_ms["prefill"] = _timed(lambda r=r: r.prefill(prompt), device)
    for _ in range(repeats):
        for n, r in runners.items():
            rec[n].cache, ms = _timed(lambda r=r: r.prefill(prompt), device)
            rec[n].ms["prefill"].append(ms)


def step_phase(runners: dict, rec: dict, canvas, steps: int, device) -> None:
    last = {}
    for n, r in runners.items():
        c = rec[n].cache
        out, rec[n].warmup_ms["step"] = _timed(lambda r=r, c=c: r.step(canvas, c, None), device)
        first = rec[n].first_logits = r.logits(out)  # a copy: a graph's output buffer is overwritten by the next step
        if isinstance(r, EngineRunner):
            rec[n].eager_diff = (r.eager(canvas, c).float() - first).abs().max().item()
        # the first step with self-conditioning: with CUDA graphs, its graph is captured here
        last[n], rec[n].warmup_ms["step_sc"] = _timed(lambda r=r, c=c, sc=r.sc(out): r.step(canvas, c, sc), device)
    for _ in range(steps):
        for n, r in runners.items():
            c = rec[n].cache
            last[n], ms = _timed(lambda r=r, c=c, sc=r.sc(last[n]): r.step(canvas, c, sc), device)
            rec[n].ms["step"].append(ms)


def commit_phase(runners: dict, rec: dict, canvas, repeats: int, device) -> None:
    for i in range(repeats + 1):
        for n, r in runners.items():
            c = r.fork(rec[n].cache)  # a commit appends to the cache: each starts from the prefilled one
            ms = _timed(lambda r=r, c=c: r.commit(canvas, c), device)[1]
            if i == 0:
                rec[n].warmup_ms["commit"] = ms
            else:
                rec[n].ms["commit"].append(ms)


def measure(runners: dict, prompt, canvas, cfg: BenchConfig, device) -> dict[str, Record]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rec = {n: Record() for n in runners}
    with torch.inference_mode():
        prefill_phase(runners, rec, prompt, cfg.repeats, device)
        step_phase(runners, rec, canvas, cfg.steps, device)
        commit_phase(runners, rec, canvas, cfg.repeats, device)
    return rec


def summary(r: Record, runner, prompt_len: int, L: int, device) -> dict:
    """A runner's report section."""
    prefill_ms, step_ms, commit_ms = (sum(r.ms[k]) / len(r.ms[k]) for k in ("prefill", "step", "commit"))
    capture = runner.capture_ms()
    out = {
        "warmup_ms": r.warmup_ms,
        "cuda_graphs": capture is not None,
        "graph_capture_ms": capture,  # inside warmup_ms["step"] and ["step_sc"]
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": prompt_len / prefill_ms * 1e3,
        "step_ms": step_ms,
        "commit_ms": commit_ms,
        "min_ms": {k: min(v) for k, v in r.ms.items()},  # robust to other processes on a shared machine
        "tokens_per_s": {str(s): L / (s * step_ms + commit_ms) * 1e3 for s in STEPS_PER_BLOCK},
        # of the whole measurement when several runners share it
        "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    if r.eager_diff is not None:  # graphs and the fused head against the plain path, same inputs
        out["eager_max_abs_logit_diff"] = r.eager_diff
    return out


# ---------------------------------------------------------------------------------------------------
# Phase 5: the transformers reference


def _reference_module():
    """tests/reference.py: the one place that builds a transformers DiffusionGemma from a text config."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import transformers  # noqa: F401  (checked first: reference.py would raise pytest's Skipped)
        import reference
    except ImportError as e:  # it needs transformers, and pytest (whose importorskip it uses)
        raise SystemExit(f"--reference needs the test extras: pip install -e '.[test]' ({e})") from None
    return reference


def build_reference(tc: dict, device: torch.device, dtype: torch.dtype):
    """transformers' DiffusionGemmaForBlockDiffusion for `tc`, constructed directly on `device` in `dtype`."""
    from transformers import DiffusionGemmaForBlockDiffusion

    config = _reference_module().reference_config(tc, max_positions=131_072)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffusionGemmaForBlockDiffusion(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()  # no .to(dtype): that would round the RoPE inv_freq buffers, which stay fp32


def give_weights(model: DiffusionGemma, ref) -> None:
    """Copy dg's weights into the reference (same names, plus the reference's tied copies)."""
    state = model.state_dict()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    # vision tower, tied LM head, and the encoder's copies of decoder weights (tied in the reference)
    tied = {k for k in missing if k.startswith("model.encoder.language_model.")
            and k.replace("encoder.language_model", "decoder") in state}
    missing = [k for k in missing if "vision" not in k and k != "lm_head.weight" and k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"reference weight mapping failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    ref.tie_weights()


def speedup(e: dict, r: dict) -> dict:
    """Reference time / dg time per phase (> 1: dg is faster)."""
    return {
        "prefill": r["prefill_ms"] / e["prefill_ms"], "step": r["step_ms"] / e["step_ms"],
        "commit": r["commit_ms"] / e["commit_ms"],
        **{f"tokens_per_s_{s}": e["tokens_per_s"][str(s)] / r["tokens_per_s"][str(s)] for s in STEPS_PER_BLOCK},
        "min_ms": {k: r["min_ms"][k] / e["min_ms"][k] for k in e["min_ms"]},
    }


# ---------------------------------------------------------------------------------------------------
# The MoE kernel alone


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 10 if device.type == "cuda" else 3
    _, ms = _timed(lambda: [dst.copy_(src) for _ in range(reps)], device)
    return 2 * nbytes * reps / (ms * 1e-3) / 1e9


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


@torch.no_grad()
def moe_bench(tc: dict, device: torch.device, dtype: torch.dtype, tokens: int, repeats: int, seed: int = 0) -> dict:
    """One layer's routed experts, int4 as quant.runtime.QuantExperts runs them (kernels.moe_int4 on
    CUDA), on `tokens` tokens with uniform random routing. Bytes moved = packed weights and scales of
    the experts touched, plus activations in and out; GB/s = bytes / time."""
    from kernels import _dispatch
    from kernels.moe_int4 import moe_int4_ref, tuned_configs
    from quant.runtime import QuantExperts

    config = ModelConfig.from_dict(tc)
    E, H, I, A = config.num_experts, config.hidden_size, config.moe_intermediate_size, config.top_k_experts
    with torch.device("meta"):
        experts = QuantExperts(Experts(config), {"gate_up_proj": INT4, "down_proj": INT4})
    gen = torch.Generator(device=device).manual_seed(seed)
    gu, dn = experts.gate_up_proj, experts.down_proj
    for p in (gu, dn):
        random_packed(p, device, dtype, gen)
    x = torch.randn(tokens, H, generator=gen, device=device).to(dtype)
    scores = torch.rand(tokens, E, generator=gen, device=device)
    weights, index = torch.topk(scores.softmax(-1), A)
    weights = weights / weights.sum(-1, keepdim=True)

    touched = int(torch.unique(index).numel())
    per_expert = sum(t[0].numel() * t.element_size() for p in (gu, dn) for t in p._buffers.values())
    nbytes = touched * per_expert + 2 * x.numel() * x.element_size()
    kernel = "triton" if x.is_cuda and _dispatch.use_triton(x) else "reference"
    _, warm_ms = _timed(lambda: experts(x, index, weights), device)  # includes compile + autotune on CUDA
    ms = sum(_timed(lambda: experts(x, index, weights), device)[1] for _ in range(repeats)) / repeats
    out = {
        "kernel": kernel, "tokens": tokens, "experts_touched": touched, "shape": {"E": E, "H": H, "I": I, "A": A},
        "warmup_ms": warm_ms, "ms": ms, "bytes": nbytes, "gb_per_s": nbytes / (ms * 1e-3) / 1e9,
        "device_peak_gb_per_s": peak_bandwidth_gbs(device), "copy_gb_per_s": copy_bandwidth_gbs(device),
    }
    if out["device_peak_gb_per_s"]:
        out["fraction_of_peak"] = out["gb_per_s"] / out["device_peak_gb_per_s"]
    out["fraction_of_copy"] = out["gb_per_s"] / out["copy_gb_per_s"]
    if kernel == "triton":
        args = (x, index, weights, gu.qweight, gu.scales, dn.qweight, dn.scales)
        out["autotuned"] = {k: vars(v) for k, v in tuned_configs().items()}
        ref_runs = max(1, repeats // 4)
        out["reference_ms"] = sum(_timed(lambda: moe_int4_ref(*args), device)[1] for _ in range(ref_runs)) / ref_runs
        want = moe_int4_ref(*args).float()
        out["max_abs_err_vs_reference"] = (experts(x, index, weights).float() - want).abs().max().item()
    return out


# ---------------------------------------------------------------------------------------------------
# The report


def machine(device: torch.device) -> dict:
    m = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
         "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):  # a busy shared box makes CPU timings meaningless: record it
        m["load_average_1min"] = os.getloadavg()[0]
    try:
        import triton

        m["triton"] = triton.__version__
    except ImportError:
        m["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(device_name=p.name, capability=f"{p.major}.{p.minor}", vram_gb=p.total_memory / 1e9)
    return m


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _threads(n: int | None):
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def run_bench(cfg: BenchConfig | None = None, **overrides) -> dict:
    """Run the benchmark and return its report (a JSON-serialisable dict). Keyword arguments set
    BenchConfig's fields: run_bench(config="tiny", device="cpu", steps=2)."""
    cfg = dataclasses.replace(cfg or BenchConfig(), **overrides)
    dev, dt = cfg.torch_device(), cfg.torch_dtype()
    with _threads(cfg.threads):
        tc, name, experts, build = load_random_or_named(cfg, dev, dt)
        L = tc["canvas_length"]
        report = {
            "machine": machine(dev),
            "config": {"name": name, "dtype": str(dt).removeprefix("torch."), "experts": experts,
                       **{k: tc[k] for k in ("hidden_size", "num_hidden_layers", "num_experts", "top_k_experts",
                                             "moe_intermediate_size", "vocab_size", "canvas_length")}},
            "prompt_len": cfg.prompt_len,
            "steps_timed": cfg.steps,
            "repeats": cfg.repeats,
            "step_excludes": "the sampler's multinomial and accept/renoise. dg's step is Engine.step: decode, "
                             "LM head, and the sampler's argmax/entropy/logsumexp (fused into the head on "
                             "CUDA); the reference's is its forward only",
        }
        if cfg.moe_only:
            report["moe"] = moe_bench(tc, dev, dt, L, max(cfg.repeats, 10 if dev.type == "cuda" else 2), cfg.seed)
        else:
            bench_model(cfg, tc, build, dev, dt, report)
        report["peak_rss_mb"] = _peak_rss_mb()
        return report


def bench_model(cfg: BenchConfig, tc: dict, build, dev: torch.device, dt: torch.dtype, report: dict) -> None:
    """Build, time dg's phases through the Engine and, with cfg.reference, transformers' (into `report`)."""
    from dgcli.engine import Engine

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    prompt = torch.randint(0, tc["vocab_size"], (1, cfg.prompt_len), generator=gen).to(dev)
    canvas = torch.randint(0, tc["vocab_size"], (1, tc["canvas_length"]), generator=gen).to(dev)
    L = canvas.shape[1]

    def timed(runners: dict) -> dict[str, Record]:
        rec = measure(runners, prompt, canvas, cfg, dev)
        for n, r in runners.items():
            report[n] = summary(rec[n], r, cfg.prompt_len, L, dev)
        return rec

    model, report["build_ms"] = _timed(build, dev)
    report["weights_gb"] = _param_bytes(model) / 1e9
    engine = Engine(model, static_cache=cfg.static_cache, cuda_graphs=cfg.cuda_graphs, fused_head=cfg.fused_head)
    for k in ("static_cache", "cuda_graphs", "fused_head"):  # what the Engine did with the flags
        report["config"][k] = bool(getattr(engine, k))
    runners = {"engine": EngineRunner(engine, cfg.prompt_len + 2 * L)}
    if not cfg.reference:
        timed(runners)
        return
    # Same weights, and timings interleaved, when both models fit at once (unquantized weights only).
    runtime = sys.modules.get("quant.runtime")  # not imported: nothing is packed
    packed = runtime is not None and any(isinstance(m, runtime.Packed) for m in model.modules())
    together = not packed and (dev.type == "cpu" or torch.cuda.mem_get_info(dev)[0] > 1.2 * _param_bytes(model))
    if together:
        ref = build_reference(tc, dev, dt)
        give_weights(model, ref)
        rec = timed({**runners, "reference": ReferenceRunner(ref)})
        diff = (rec["engine"].first_logits - rec["reference"].first_logits).abs().max().item()
        report["reference"]["first_step_max_abs_logit_diff"] = diff
    else:  # dg first, freed before the reference is built
        timed(runners)
        del model, engine, runners
        _release(dev)
        timed({"reference": ReferenceRunner(build_reference(tc, dev, dt))})
    report["interleaved"] = together
    report["speedup_vs_reference"] = speedup(report["engine"], report["reference"])


def finite_numbers(report: dict) -> bool:
    """True when every number in the report is finite (a sanity check for tests and CI)."""
    def walk(v):
        if isinstance(v, dict):
            return all(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(walk(x) for x in v)
        if isinstance(v, float):
            return math.isfinite(v)
        return True

    return walk(report)


# ---------------------------------------------------------------------------------------------------
# Command line


def _step_model():
    """scripts/step_model.py, loaded on demand (--model-only)."""
    path = Path(__file__).resolve().parent / "step_model.py"
    if not path.is_file():
        raise SystemExit(f"--model-only needs {path}, which is missing")
    spec = importlib.util.spec_from_file_location("dg_step_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before the run: opened for appending (which changes
    nothing in a file that exists), and removed again when the run would be the one to create it."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory")
    existed = out.exists()
    try:
        with open(out, "a"):
            pass
        if not existed:
            out.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or first_line(e)})") from None


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line on stderr and exit code 2, as the dg commands do."""

    def error(self, message: str):
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dg bench", description="Time prefill, denoising steps and commits; "
                                "print a JSON report (see docs/benchmarks.md).")
    p.add_argument("--config", choices=sorted(PRESETS), default="reduced",
                   help="random-init shape: full (26B-A4B), reduced (CPU), tiny (tests) [reduced]")
    p.add_argument("-m", "--model", help="time this model as loaded instead (tiny, a directory, a repo id)")
    p.add_argument("--device", help="cuda | cpu [cuda when available]")
    p.add_argument("--dtype", choices=DTYPES, help="[bf16 on CUDA, fp32 on CPU]")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens to prefill [512]")
    p.add_argument("--steps", type=int, default=8, help="timed denoising steps [8]")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills and commits [3]")
    p.add_argument("--experts", choices=["dense", "int4"], default="dense",
                   help="the model's own experts, or random int4 packed by quant.runtime [dense]")
    p.add_argument("--reference", action="store_true", help="also time transformers on the same shapes")
    p.add_argument("--moe-only", action="store_true", help="only the int4 MoE kernel: one layer, canvas tokens")
    p.add_argument("--model-only", action="store_true",
                   help="run scripts/step_model.py instead, with every other argument passed on")
    p.add_argument("--layers", type=int, help="override the layer count (keeps 5 sliding / 1 full)")
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    p.add_argument("--canvas", type=int, help="override the canvas (block) length")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    # unset (None): the Engine's default policy
    p.add_argument("--static-cache", action="store_true", default=None,
                   help="the preallocated KV cache also off CUDA")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="launch each step's kernels eagerly on CUDA")
    p.add_argument("--no-fused-head", dest="fused_head", action="store_false", default=None,
                   help="the plain LM head and sampler statistics on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line (this script and `dg bench`): parse, run, print or write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model-only" in argv:
        argv.remove("--model-only")
        return _step_model().main(argv) or 0
    p = parser()
    a = p.parse_args(argv)
    out = a.out
    del a.out, a.model_only
    try:
        cfg = BenchConfig(**vars(a))  # the options' names are BenchConfig's fields
        if out:
            check_writable(out)
    except ValueError as e:
        p.error(str(e))
    text = json.dumps(run_bench(cfg), indent=2)
    if out:
        try:
            out.write_text(text + "\n")
        except OSError as e:  # the disk filled during the run
            print(f"error: --out {out}: {e.strerror or first_line(e)}", file=sys.stderr)
            return 1
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
