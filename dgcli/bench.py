"""Speed benchmark: one prompt prefill, timed denoising steps and a commit on a random-init model of
the DiffusionGemma shape, optionally against the transformers reference in the same process.

`run_bench(...) -> dict` is the library entry (`dg bench` and scripts/bench.py print its JSON). The
model is built directly on the target device: on `meta` first, then materialised and filled with
random weights, so nothing is downloaded and a 26B model never passes through host RAM.
Timings are wall-clock around CUDA synchronisation. The first call of each phase is a warm-up
(allocator, Triton compile, autotune) and is reported separately. A step is `model.decode` only: the
sampler's softmax/multinomial/entropy work is excluded on both sides.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import platform
import time

import torch
from torch import nn

from .config import FULL, SLIDING, ModelConfig
from .model import DiffusionGemma

S, F = SLIDING, FULL
STEPS_PER_BLOCK = (8, 16, 32, 48)

# The released google/diffusiongemma-26B-A4B-it text config (shared/docs/quant.md §0).
FULL_26B = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, sliding_window=1024, layer_types=([S] * 5 + [F]) * 5,
    num_experts=128, top_k_experts=8, moe_intermediate_size=704, canvas_length=256,
)
PRESETS = {
    "full": FULL_26B,
    # Same routing (128 experts, top-8), layer pattern, window and canvas; 1/5.5 of the width and
    # one 6-layer period, so a step takes about a second on a 2-core CPU.
    "reduced": dict(FULL_26B, vocab_size=32768, hidden_size=512, intermediate_size=384, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                    num_global_key_value_heads=2, layer_types=[S] * 5 + [F], moe_intermediate_size=128),
    # For smoke tests only.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                 sliding_window=32, layer_types=[S, F], num_experts=8, top_k_experts=2, moe_intermediate_size=64,
                 canvas_length=16),
}

# Vendor peak DRAM bandwidth in GB/s, matched by substring of the device name (first match wins).
PEAK_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
            ("A100", 1555.0), ("RTX 5090", 1792.0), ("RTX 4090", 1008.0), ("RTX 3090", 936.0), ("L40S", 864.0),
            ("L4", 300.0))


def text_config(name: str = "reduced", layers: int | None = None, vocab: int | None = None,
                canvas: int | None = None) -> dict:
    """A preset's text config dict, with optional overrides (layers keeps the 5-sliding/1-full pattern)."""
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


# ---------------------------------------------------------------------------------------------------
# Building the models


class Int4Experts(nn.Module):
    """Random packed-int4 experts through `kernels.moe_int4` (a stand-in for quant's runtime module,
    which the bench cannot depend on): same forward signature as `model.Experts`."""

    def __init__(self, config: ModelConfig, group_size: int = 64):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.group_size = group_size
        self.register_buffer("gate_up_q", torch.empty(E, 2 * I, H // 2, dtype=torch.uint8))
        self.register_buffer("gate_up_s", torch.empty(E, 2 * I, H // group_size, dtype=torch.float16))
        self.register_buffer("down_q", torch.empty(E, H, I // 2, dtype=torch.uint8))
        self.register_buffer("down_s", torch.empty(E, H, I // group_size, dtype=torch.float16))

    def forward(self, x, index, weights):
        from kernels.moe_int4 import moe_int4

        return moe_int4(x, index, weights, self.gate_up_q, self.gate_up_s, self.down_q, self.down_s,
                        self.group_size)


def _random_int4_(q: torch.Tensor, s: torch.Tensor, fan_in: int, gen: torch.Generator) -> None:
    q.copy_(torch.randint(0, 256, q.shape, generator=gen, device=q.device, dtype=torch.int32).to(torch.uint8))
    # codes uniform in [0, 15]: std of (q - 8) is about 4.6, so this scale gives std fan_in^-1/2
    s.copy_(torch.full_like(s, fan_in**-0.5 / 4.6) * (1 + 0.1 * torch.randn(s.shape, generator=gen, device=s.device)))


@torch.no_grad()
def build_engine(config: ModelConfig, device: torch.device, dtype: torch.dtype, experts: str = "dense",
                 seed: int = 0) -> DiffusionGemma:
    """dg's model with random weights, built on `meta` and materialised on `device` in `dtype`."""
    if experts not in ("dense", "int4"):
        raise ValueError(f"experts must be 'dense' or 'int4', got {experts!r}")
    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
        if experts == "int4":  # swapped in after .to(dtype), so the fp16 scales stay fp16
            for layer in model.model.decoder.layers:
                layer.experts = Int4Experts(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norms, router scale, per-expert scale: around 1
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * p.shape[-1] ** -0.5)
    for mod in model.modules():
        if isinstance(mod, Int4Experts):
            _random_int4_(mod.gate_up_q, mod.gate_up_s, config.hidden_size, gen)
            _random_int4_(mod.down_q, mod.down_s, config.moe_intermediate_size, gen)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    return model.eval()


def build_reference(tc: dict, device: torch.device, dtype: torch.dtype):
    """transformers' DiffusionGemmaForBlockDiffusion with the same text config and a tiny vision tower
    (as tests/reference.py), constructed directly on `device` in `dtype`."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    tc = dict(tc)
    canvas = tc.pop("canvas_length")
    tc.setdefault("max_position_embeddings", 131_072)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    config = DiffusionGemmaConfig(text_config=tc, vision_config=vision, canvas_length=canvas)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffusionGemmaForBlockDiffusion(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()  # no .to(dtype): that would round the RoPE inv_freq buffers, which stay fp32


# ---------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3


class _Engine:
    """Phase calls on dg's model: prefill (encode prompt), step (decode), commit (encode canvas).
    On CUDA as `dg run` runs it: the static cache, and CUDA graphs when the model has a capture."""

    def __init__(self, model: DiffusionGemma):
        self.model = model
        self.static = model.device.type == "cuda"
        self.cache = None
        self.temp = torch.ones(1, device=model.device)  # fused head: at temperature 1, proc is the logits

    def prefill(self, prompt):
        if not self.static:
            cache = self.model.new_cache()
        else:  # one cache, reset each time: allocation stays out of the timing and graphs stay valid
            if self.cache is None:
                self.cache = self.model.new_cache(static=True, max_tokens=prompt.shape[1] + 2 * self.model.config.canvas_length)
            cache = self.cache
            cache.reset()
        self.model.encode(prompt, cache)
        self.prompt_len = prompt.shape[1]
        return cache

    def step(self, canvas, cache, sc):
        if self.model.fused_head:  # as the sampler runs on CUDA
            return self.model.decode_stats(canvas, cache, sc, self.temp).proc.view(*canvas.shape, -1)
        return self.model.decode(canvas, cache, sc)

    def fork(self, cache):
        """A cache to commit into, leaving `cache` as it was: the static one is rolled back instead."""
        if self.static:
            cache.truncate(self.prompt_len)
            return cache
        return cache.copy()

    def commit(self, canvas, cache):
        self.model.encode(canvas, cache)

    def sc(self, logits):
        return logits.to(self.model.dtype)

    def capture_ms(self) -> float | None:
        graphs = getattr(self.cache, "graphs", None)
        return graphs.capture_seconds * 1e3 if graphs is not None else None


class _Reference:
    """The same phases through transformers, called as its `generate` calls them."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, prompt):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self.model.model.encoder(input_ids=prompt, past_key_values=cache)
        return cache

    @torch.inference_mode()
    def step(self, canvas, cache, sc):
        # generate() builds the decoder mask once per block: build it on the first (warm-up) step, then reuse
        key = (id(cache), canvas.shape)
        if getattr(self, "_mask_key", None) != key:
            cur = cache.get_seq_length()
            dam = torch.ones(canvas.shape[0], cur + canvas.shape[1], dtype=torch.bool, device=canvas.device)
            self._mask = self.model.model.decoder.create_diffusion_decoder_attention_mask(
                config=self.model.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
                decoder_attention_mask=dam)
            self._mask_key = key
        out = self.model(decoder_input_ids=canvas, self_conditioning_logits=sc, past_key_values=cache,
                         decoder_attention_mask=self._mask)
        return out.logits

    @torch.inference_mode()
    def commit(self, canvas, cache):
        self.model.model.encoder(input_ids=canvas, past_key_values=cache)

    def fork(self, cache):
        return copy.deepcopy(cache)

    def sc(self, logits):
        return logits.to(self.model.model.decoder.embed_tokens.weight.dtype)


def _mean(xs):
    return sum(xs) / len(xs)


def _phases(runners: dict, prompt, canvas, steps: int, repeats: int, device) -> dict:
    """Warm-up and timed prefill, denoising steps and commit for each runner -> {name: (report, logits)}.

    With several runners every timed call alternates between them, so a load change on a shared
    machine hits both sides alike. `logits` are those of each runner's first step (no self-conditioning).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    names = list(runners)
    t = {n: {"prefill": [], "step": [], "commit": []} for n in names}
    warm, cache, first, logits = {n: {} for n in names}, {}, {}, {}
    for n in names:
        cache[n], warm[n]["prefill"] = _timed(lambda r=runners[n]: r.prefill(prompt), device)
    for _ in range(repeats):
        for n in names:
            t[n]["prefill"].append(_timed(lambda r=runners[n]: r.prefill(prompt), device)[1])
    for n in names:  # the first step of a canvas has no self-conditioning
        first[n], warm[n]["step"] = _timed(lambda r=runners[n]: r.step(canvas, cache[n], None), device)
        first[n] = first[n].clone()  # a graph's output buffer is overwritten by the next step
        r = runners[n]  # and a step with it: with CUDA graphs, its graph is captured here
        logits[n], warm[n]["step_sc"] = _timed(lambda r=r, sc=r.sc(first[n]): r.step(canvas, cache[n], sc), device)
    for _ in range(steps):
        for n in names:
            r = runners[n]
            logits[n], ms = _timed(lambda r=r, sc=r.sc(logits[n]): r.step(canvas, cache[n], sc), device)
            t[n]["step"].append(ms)
    for i in range(repeats + 1):
        for n in names:
            c = runners[n].fork(cache[n])  # a commit appends to the cache: time each on a fresh copy
            ms = _timed(lambda r=runners[n], c=c: r.commit(canvas, c), device)[1]
            if i == 0:
                warm[n]["commit"] = ms
            else:
                t[n]["commit"].append(ms)
            del c
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    L = canvas.shape[1]
    out = {}
    for n in names:
        step_ms, commit_ms, prefill_ms = (_mean(t[n][k]) for k in ("step", "commit", "prefill"))
        capture = getattr(runners[n], "capture_ms", lambda: None)()
        out[n] = ({
            "warmup_ms": warm[n],
            "cuda_graphs": capture is not None,
            "graph_capture_ms": capture,  # inside warmup_ms["step"] and ["step_sc"]
            "prefill_ms": prefill_ms,
            "prefill_tokens_per_s": prompt.shape[1] / prefill_ms * 1e3,
            "step_ms": step_ms,
            "commit_ms": commit_ms,
            # min over repeats: robust to other processes on a shared machine
            "min_ms": {k: min(v) for k, v in t[n].items()},
            "tokens_per_s": {str(s): L / (s * step_ms + commit_ms) * 1e3 for s in STEPS_PER_BLOCK},
            "peak_vram_mb": peak,  # of the whole measurement when several runners share it
        }, first[n])
    return out


# ---------------------------------------------------------------------------------------------------
# MoE kernel microbenchmark


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
    """One layer's routed experts (int4) on `tokens` tokens with uniform random routing, through the
    dispatcher (Triton on CUDA). Bytes moved = packed weights and scales of the experts touched, plus
    activations in and out; GB/s = bytes / time."""
    from kernels import _dispatch
    from kernels.moe_int4 import moe_int4, moe_int4_ref, tuned_configs

    config = ModelConfig.from_dict(tc)
    E, H, I, A = config.num_experts, config.hidden_size, config.moe_intermediate_size, config.top_k_experts
    gen = torch.Generator(device=device).manual_seed(seed)
    experts = Int4Experts(config).to(device)
    _random_int4_(experts.gate_up_q, experts.gate_up_s, H, gen)
    _random_int4_(experts.down_q, experts.down_s, I, gen)
    x = torch.randn(tokens, H, generator=gen, device=device).to(dtype)
    scores = torch.rand(tokens, E, generator=gen, device=device)
    weights, index = torch.topk(scores.softmax(-1), A)
    weights = weights / weights.sum(-1, keepdim=True)
    args = (x, index, weights, experts.gate_up_q, experts.gate_up_s, experts.down_q, experts.down_s)

    touched = int(torch.unique(index).numel())
    per_expert = sum(t[0].numel() * t.element_size()
                     for t in (experts.gate_up_q, experts.gate_up_s, experts.down_q, experts.down_s))
    nbytes = touched * per_expert + 2 * x.numel() * x.element_size()
    kernel = "triton" if _dispatch.use_triton(x) else "reference"
    _, warm_ms = _timed(lambda: moe_int4(*args), device)  # includes compile + autotune on CUDA
    ms = _mean([_timed(lambda: moe_int4(*args), device)[1] for _ in range(repeats)])
    out = {
        "kernel": kernel, "tokens": tokens, "experts_touched": touched, "shape": {"E": E, "H": H, "I": I, "A": A},
        "warmup_ms": warm_ms, "ms": ms, "bytes": nbytes, "gb_per_s": nbytes / (ms * 1e-3) / 1e9,
        "device_peak_gb_per_s": peak_bandwidth_gbs(device), "copy_gb_per_s": copy_bandwidth_gbs(device),
    }
    if out["device_peak_gb_per_s"]:
        out["fraction_of_peak"] = out["gb_per_s"] / out["device_peak_gb_per_s"]
    out["fraction_of_copy"] = out["gb_per_s"] / out["copy_gb_per_s"]
    if kernel == "triton":
        out["autotuned"] = {k: vars(v) for k, v in tuned_configs().items()}
        ref_ms = _mean([_timed(lambda: moe_int4_ref(*args), device)[1] for _ in range(max(1, repeats // 4))])
        want = moe_int4_ref(*args).float()
        out["reference_ms"] = ref_ms
        out["max_abs_err_vs_reference"] = (moe_int4(*args).float() - want).abs().max().item()
    return out


# ---------------------------------------------------------------------------------------------------
# Entry


def _machine(device: torch.device) -> dict:
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


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_bench(config: str = "reduced", device: str | None = None, dtype: str | None = None, prompt_len: int = 512,
              steps: int = 8, repeats: int = 3, reference: bool = False, moe_only: bool = False,
              experts: str = "dense", layers: int | None = None, vocab: int | None = None,
              canvas: int | None = None, threads: int | None = None, seed: int = 0,
              model: str | None = None, cuda_graphs: bool = True) -> dict:
    """Run the benchmark and return its report (a JSON-serialisable dict).

    config: "full" (26B-A4B shape), "reduced" (same routing, narrow; for CPU) or "tiny" (tests).
    model: instead of a random preset, load this model (a name for dgcli.store.resolve: `tiny`, a
    checkpoint directory, a downloaded repo id, a `dg quantize` output) and time it as loaded.
    device: "cuda" / "cpu" (default: cuda if available). dtype: "bfloat16" / "float16" / "float32"
    (default: bf16 on CUDA, fp32 on CPU). steps: timed denoising steps; repeats: timed prefills and
    commits. reference: also time transformers on the same shapes and report our speedup.
    moe_only: only the int4 MoE kernel on one layer's experts at canvas-many tokens.
    experts: "dense" (the model's own experts) or "int4" (random packed, through kernels.moe_int4).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype, None) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    for name, v in (("prompt_len", prompt_len), ("steps", steps), ("repeats", repeats)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if model is None:
            tc = text_config(config, layers, vocab, canvas)
            build = lambda mc: build_engine(mc, dev, dt, experts, seed)  # noqa: E731
        else:
            from . import store
            from .loader import load_model

            path = store.resolve(model)
            mc = ModelConfig.from_file(path / "config.json")
            tc, config, experts = config_dict(mc), str(path), "as loaded"
            build = lambda mc: load_model(path, device=dev, dtype=dt)  # noqa: E731
        mc = ModelConfig.from_dict(tc)
        return _run(tc, mc, build, dev, dt, config, prompt_len, steps, repeats, reference, moe_only, experts, seed,
                    cuda_graphs)
    finally:
        torch.set_num_threads(prev_threads)


def config_dict(mc: ModelConfig) -> dict:
    """A text-config dict (the released checkpoint's field names) describing `mc`, for presets and
    for building the transformers reference of a loaded model."""
    first = {t: mc.layer_types.index(t) for t in (S, F) if t in mc.layer_types}
    s_i, f_i = first.get(S, 0), first.get(F, 0)
    return dict(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.layer_kv_heads[s_i], head_dim=mc.layer_head_dim[s_i],
        global_head_dim=mc.layer_head_dim[f_i], num_global_key_value_heads=mc.layer_kv_heads[f_i],
        sliding_window=mc.sliding_window, layer_types=list(mc.layer_types), num_experts=mc.num_experts,
        top_k_experts=mc.top_k_experts, moe_intermediate_size=mc.moe_intermediate_size,
        rms_norm_eps=mc.rms_norm_eps, rope_parameters=mc.rope_parameters, canvas_length=mc.canvas_length,
    )


def _run(tc, mc, build, dev, dt, config, prompt_len, steps, repeats, reference, moe_only, experts, seed,
         cuda_graphs=True) -> dict:
    report = {
        "machine": _machine(dev),
        "config": {"name": config, "dtype": str(dt).removeprefix("torch."), "experts": experts,
                   **{k: tc[k] for k in ("hidden_size", "num_hidden_layers", "num_experts", "top_k_experts",
                                         "moe_intermediate_size", "vocab_size", "canvas_length")}},
        "prompt_len": prompt_len,
        "steps_timed": steps,
        "repeats": repeats,
        "step_excludes": "multinomial and accept/renoise; with fused_head the step includes the LM head's "
                         "argmax/entropy/lse, else it is decode() only",
    }
    if moe_only:
        report["moe"] = moe_bench(tc, dev, dt, mc.canvas_length, max(repeats, 10 if dev.type == "cuda" else 2), seed)
        report["peak_rss_mb"] = _peak_rss_mb()
        return report

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    prompt = torch.randint(0, mc.vocab_size, (1, prompt_len), generator=gen).to(dev)
    canvas_ids = torch.randint(0, mc.vocab_size, (1, mc.canvas_length), generator=gen).to(dev)

    model, build_ms = _timed(lambda: build(mc), dev)
    report["weights_gb"] = _param_bytes(model) / 1e9
    report["build_ms"] = build_ms
    from .graphs import use_fast_paths

    use_fast_paths(model, cuda_graphs)  # as dgcli.load does
    report["config"]["cuda_graphs"] = model.graph_capture is not None
    report["config"]["fused_head"] = model.fused_head
    engine = _Engine(model)
    if not reference:
        with torch.inference_mode():
            report["engine"] = _phases({"engine": engine}, prompt, canvas_ids, steps, repeats, dev)["engine"][0]
    else:
        # Same weights, and timings interleaved, when both models fit at once (unquantized experts only).
        plain = all(type(m).__name__ == "Experts" for m in model.modules() if "Experts" in type(m).__name__)
        same = plain and (dev.type == "cpu" or _free_bytes(dev) > 1.2 * _param_bytes(model))
        if not same:
            with torch.inference_mode():
                report["engine"] = _phases({"engine": engine}, prompt, canvas_ids, steps, repeats, dev)["engine"][0]
            del model, engine
            gc.collect()
            _empty_cache(dev)
        ref = build_reference(tc, dev, dt)
        if same:
            state = model.state_dict()
            missing, unexpected = ref.load_state_dict(state, strict=False)
            # vision tower, tied LM head, and the encoder's copies of decoder weights (tied in the reference)
            tied = {k for k in missing if k.startswith("model.encoder.language_model.")
                    and k.replace("encoder.language_model", "decoder") in state}
            missing = [k for k in missing if "vision" not in k and k != "lm_head.weight" and k not in tied]
            if missing or unexpected:
                raise RuntimeError(f"reference weight mapping failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
            ref.tie_weights()
            del state
            with torch.inference_mode():
                both = _phases({"engine": engine, "reference": _Reference(ref)}, prompt, canvas_ids, steps,
                               repeats, dev)
            report["engine"] = both["engine"][0]
            report["reference"] = both["reference"][0]
            report["interleaved"] = True
            diff = (both["engine"][1] - both["reference"][1]).abs().max().item()
            report["reference"]["first_step_max_abs_logit_diff"] = diff
        else:
            report["reference"] = _phases({"reference": _Reference(ref)}, prompt, canvas_ids, steps, repeats,
                                          dev)["reference"][0]
            report["interleaved"] = False
        e, r = report["engine"], report["reference"]
        report["speedup_vs_reference"] = {  # > 1: dg is faster
            "prefill": r["prefill_ms"] / e["prefill_ms"], "step": r["step_ms"] / e["step_ms"],
            "commit": r["commit_ms"] / e["commit_ms"],
            **{f"tokens_per_s_{s}": e["tokens_per_s"][str(s)] / r["tokens_per_s"][str(s)] for s in STEPS_PER_BLOCK},
            "min_ms": {k: r["min_ms"][k] / e["min_ms"][k] for k in e["min_ms"]},
        }
    report["peak_rss_mb"] = _peak_rss_mb()
    return report


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.mem_get_info(device)[0]


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def main(argv: list[str] | None = None) -> int:
    """Command line (scripts/bench.py and `dg bench`): parse, run, print or write the JSON."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="dg bench", description="Time prefill, denoising steps and commits; "
                                "print a JSON report (see docs/benchmarks.md).")
    p.add_argument("--config", choices=sorted(PRESETS), default="reduced",
                   help="random-init shape: full (26B-A4B), reduced (CPU), tiny (smoke) [reduced]")
    p.add_argument("-m", "--model", help="time this model as loaded instead (tiny, a directory, a repo id)")
    p.add_argument("--device", help="cuda | cpu [cuda when available]")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="[bf16 on CUDA, fp32 on CPU]")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens to prefill [512]")
    p.add_argument("--steps", type=int, default=8, help="timed denoising steps [8]")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills and commits [3]")
    p.add_argument("--experts", choices=["dense", "int4"], default="dense",
                   help="the model's own experts, or random packed int4 through kernels.moe_int4 [dense]")
    p.add_argument("--reference", action="store_true", help="also time transformers on the same shapes")
    p.add_argument("--moe-only", action="store_true", help="only the int4 MoE kernel: one layer, canvas tokens")
    p.add_argument("--layers", type=int, help="override the layer count (keeps 5 sliding / 1 full)")
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    p.add_argument("--canvas", type=int, help="override the canvas (block) length")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch each step's kernels eagerly on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    a = p.parse_args(argv)
    report = run_bench(config=a.config, device=a.device, dtype=a.dtype, prompt_len=a.prompt_len, steps=a.steps,
                       repeats=a.repeats, reference=a.reference, moe_only=a.moe_only, experts=a.experts,
                       layers=a.layers, vocab=a.vocab, canvas=a.canvas, threads=a.threads, seed=a.seed,
                       model=a.model, cuda_graphs=not a.no_cuda_graphs)
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    else:
        print(text)
    return 0


__all__ = ["run_bench", "main", "text_config", "config_dict", "build_engine", "build_reference", "moe_bench",
           "PRESETS"]
