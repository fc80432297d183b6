"""Entropy-bounded block diffusion, exactly as the reference's `generate()` (transformers 5.23.0).

Per block (canvas of L tokens):
  encode the pending tokens into the cache (the prompt, then each committed canvas);
  canvas = uniform noise over the whole vocabulary;
  for cur_step = N .. 1 (counting down):
    logits = decoder(canvas, cache, self-conditioning = previous step's processed logits)
    proc = processors(logits) / T, T = t_min + (t_max - t_min) · cur_step / N
    sample every position; accept the lowest-entropy positions while the sum of the entropies
    before each stays <= entropy_bound; renoise every other position with fresh uniform tokens;
    stop when the argmax canvas repeats (stability) and the mean entropy < confidence_threshold;
  commit the argmax canvas; a block with an EOS anywhere finishes generation (pads after the EOS).
Random draws, in this order, all from one generator: randint(L) per block, then per step
multinomial(L×V) and randint(L). `seed=S` reproduces `torch.manual_seed(S); model.generate(...)`.
On CUDA, `model.fused_head` has the LM head compute the step's statistics in one pass over the
vocabulary (kernels/lm_head.py): the same decisions up to float rounding, several fewer passes
over the [L, 262144] fp32 logits.
This module knows tokens only; text is the tokenizer layer's job (dgcli/api.py).
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable, Iterator

import torch

from .cache import KVCache, StaticKVCache
from .config import SamplerSettings
from .events import BlockEvent, DoneEvent, Event, PrefillEvent, StepEvent


def temperature(cur_step: int, settings: SamplerSettings, device) -> torch.Tensor:
    """The reference's linear schedule, computed the same way (an int32 step tensor, fp32 result)."""
    step = torch.tensor(cur_step, device=device, dtype=torch.int32)
    return settings.t_min + ((settings.t_max - settings.t_min) * (step / settings.max_denoising_steps))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dim, the same arithmetic as torch.distributions.Categorical."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(logp, dim=-1)
    return -(torch.clamp(logp, min=torch.finfo(logp.dtype).min) * probs).sum(-1)


def accept_mask(token_entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum(H) - max(H) <= bound (the lowest always)."""
    sorted_h, order = torch.sort(token_entropy, dim=-1, descending=False)
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(keep_sorted), dim=-1, index=order, src=keep_sorted)


class StabilityTracker:
    """'Stable': this step's argmax equals each of the last k argmax canvases (history starts at -1)."""

    def __init__(self, k: int):
        self.k = k
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        if self.history is None:
            self.history = torch.full((self.k, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
        stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
        self.history = torch.roll(self.history, shifts=-1, dims=0)
        self.history[-1] = argmax
        return stable


def pad_after_eos(block: torch.Tensor, eos: torch.Tensor, pad: int | None) -> tuple[torch.Tensor, bool]:
    """(block with every token after the first EOS replaced by pad, whether it holds an EOS)."""
    is_eos = torch.isin(block, eos)
    if not bool(is_eos.any()):
        return block, False
    if pad is not None:
        c = is_eos.cumsum(dim=-1)
        block = block.masked_fill((c > 0) & ~((c == 1) & is_eos), pad)
    return block, True


def make_generator(device: torch.device, seed: int | None) -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**63) if seed is None else int(seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g, seed


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def denoise(
    model,
    prompt_ids: list[int] | torch.Tensor,
    settings: SamplerSettings,
    cache: KVCache | StaticKVCache | None = None,
    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[Event]:
    """Generate after prompt_ids (tokens not yet in `cache`), yielding events (see dgcli/events.py)."""
    t_start = time.perf_counter()
    device = model.device
    V, L = model.config.vocab_size, model.config.canvas_length
    N = settings.max_denoising_steps
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if cache is None:  # preallocated on a GPU (no per-step concatenation); the reference's on the CPU
        needed = ids.shape[1] + settings.max_new_tokens + model.config.canvas_length
        cache = model.new_cache(static=device.type == "cuda", max_tokens=needed)
    if ids.shape[1] == 0 and cache.length == 0:
        raise ValueError("empty prompt: there is nothing to condition on")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g, seed = make_generator(device, settings.seed)
    eos = torch.tensor(settings.eos_token_id, device=device) if settings.eos_token_id else None
    prompt_len = ids.shape[1]
    max_length = cache.length + prompt_len + settings.max_new_tokens
    n_blocks = math.ceil(settings.max_new_tokens / L)
    # The fused LM head (model.fused_head: on by default on CUDA) unless a processor must see the logits.
    fused = logits_processor is None and getattr(model, "fused_head", False)

    pending = ids
    new_tokens: list[torch.Tensor] = []
    steps_per_block: list[int] = []
    prefill_s = denoise_s = commit_s = warmup_s = 0.0
    finish_reason = "length"
    for block in range(n_blocks):
        t0 = time.perf_counter()
        if pending.shape[1]:
            model.encode(pending, cache)
        _sync(device)
        if block == 0:
            prefill_s = time.perf_counter() - t0
            yield PrefillEvent(prompt_tokens=prompt_len, cached_tokens=cache.length, seconds=prefill_s)
        else:
            commit_s += time.perf_counter() - t0

        canvas = torch.randint(0, V, (1, L), device=device, generator=g)
        argmax = canvas
        sc_logits = None
        stability = StabilityTracker(settings.stability_threshold)
        steps = 0
        for cur_step in range(N, 0, -1):
            t0 = time.perf_counter()
            captured = _capture_seconds(cache)
            temp = temperature(cur_step, settings, device)
            if fused:  # the LM head computes proc, argmax, entropy and lse in one pass
                head = model.decode_stats(canvas, cache, sc_logits, temp)
                proc, argmax, h = head.proc.view(1, L, V), head.argmax.view(1, L), head.entropy.view(1, L)
                probs = torch.exp(proc - head.lse.view(1, L, 1))
            else:
                logits = model.decode(canvas, cache, sc_logits)
                if logits_processor is not None:
                    logits = logits_processor(logits)
                proc = logits / temp
                probs = torch.softmax(proc, dim=-1, dtype=torch.float32)
                argmax = proc.argmax(dim=-1)
                h = entropy(proc)
            warmup = _capture_seconds(cache) - captured  # a new CUDA graph: reported apart
            warmup_s += warmup
            sampled = torch.multinomial(probs.view(-1, V), num_samples=1, generator=g).view(1, L)
            accepted = accept_mask(h, settings.entropy_bound)
            noise = torch.randint(0, V, (1, L), device=device, generator=g)
            canvas = torch.where(accepted, sampled, noise)
            stop = stability(argmax) & (h.mean(dim=-1) < settings.confidence_threshold)
            sc_logits = proc.to(model.dtype)
            steps += 1
            stopped = bool(stop.all())  # the one host sync of a step
            dt = time.perf_counter() - t0 - warmup
            denoise_s += dt
            yield StepEvent(
                block=block, step=steps, max_steps=N, canvas=canvas[0].tolist(),
                accepted=accepted[0].tolist(), argmax=argmax[0].tolist(), entropy=h[0].tolist(),
                temperature=float(temp), stopped=stopped, seconds=dt,
            )
            if stopped:
                break

        committed = argmax
        finished = cache.length + L >= max_length
        if eos is not None:
            committed, has_eos = pad_after_eos(committed, eos, settings.pad_token_id)
            if has_eos:
                finished, finish_reason = True, "eos"
        new_tokens.append(committed[0])
        steps_per_block.append(steps)
        yield BlockEvent(block=block, token_ids=committed[0].tolist(), steps=steps, finished=finished)
        if finished:
            break
        pending = committed

    token_ids = torch.cat(new_tokens).tolist()
    yield DoneEvent(
        token_ids=token_ids,
        finish_reason=finish_reason,
        prompt_tokens=prompt_len,
        generated_tokens=min(useful_length(token_ids, settings.eos_token_id), settings.max_new_tokens),
        blocks=len(steps_per_block),
        steps_per_block=steps_per_block,
        prefill_seconds=prefill_s,
        denoise_seconds=denoise_s,
        commit_seconds=commit_s,
        total_seconds=time.perf_counter() - t_start,
        seed=seed,
        settings={**settings.__dict__, "seed": seed},
        peak_memory_bytes=peak_memory(device),
        warmup_seconds=warmup_s,
    )


def useful_length(token_ids: list[int], eos_ids: list[int] | None) -> int:
    """Tokens before the first EOS (the EOS itself not counted)."""
    if eos_ids:
        for i, t in enumerate(token_ids):
            if t in eos_ids:
                return i
    return len(token_ids)


def _capture_seconds(cache) -> float:
    graphs = getattr(cache, "graphs", None)
    return graphs.capture_seconds if graphs is not None else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
