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
The sample is drawn as argmax(p / E), E ~ Exp(1) from the generator: what `torch.multinomial`
does for one sample, bit for bit, without its two host reads (`StepOut.sample_sc`; from the fused
head on CUDA, one kernel makes E in registers as torch's exponential_ would, reads the head's raw
logits once (making proc from them in registers) and writes the next step's self-conditioning
input). A step reads the host once, for its event and the stop flag together. The decoder pass
and the statistics are the engine's (dgcli/engine.py): on CUDA it replays graphs and fuses the LM
head; the decisions are the same up to float rounding.
This module knows tokens only; text is the tokenizer layer's job (dgcli/api.py).

Templates (dgcli/filling.py, docs/fill.md) hand in one `TemplateBlock` per canvas: pinned positions are
written over the canvas after the same random draws as an untemplated run, are never renoised, keep
their pin as argmax, count as zero entropy (accepted, using none of the entropy bound), and are left
out of the stop rule's mean entropy (the mean is over the holes). Typed holes are a logits processor
of the block, applied before the statistics. No EOS handling: the template decides the length.
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .engine import Engine, as_engine, entropy  # noqa: F401 (entropy: the sampler's maths, kept importable here)
from .errors import CheckpointError, EmptyPromptError
from .config import SamplerSettings
from .events import BlockEvent, DoneEvent, Event, PrefillEvent, StepEvent


@dataclass
class TemplateBlock:
    """One canvas of a template (laid out by dgcli/filling.py)."""

    pinned: torch.Tensor  # (L,) bool, on the engine's device
    tokens: torch.Tensor  # (L,) int64: the pins where pinned
    processor: Callable[[torch.Tensor], torch.Tensor] | None = None  # typed holes: (1, L, V) logits
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None  # the committed canvas (1, L) -> (1, L)
    pinned_host: list[bool] = field(init=False)  # for the events
    n_pinned: int = field(init=False)

    def __post_init__(self):
        self.pinned_host = self.pinned.tolist()
        self.n_pinned = sum(self.pinned_host)


def chain(first, second):
    """Two logits processors, first then second (either may be None)."""
    if first is None or second is None:
        return first or second
    return lambda logits: second(first(logits))


def temperature_schedule(settings: SamplerSettings) -> torch.Tensor:
    """Temperatures for cur_step = N .. 1 on the CPU, fp32: the reference's linear schedule computed
    the same way (an int32 step over N), once per generation instead of an upload per step."""
    steps = torch.arange(settings.max_denoising_steps, 0, -1, dtype=torch.int32)
    return settings.t_min + ((settings.t_max - settings.t_min) * (steps / settings.max_denoising_steps))


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
    engine: Engine,
    prompt_ids: list[int] | torch.Tensor,
    settings: SamplerSettings,
    cache=None,
    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    images=None,
    template: Sequence[TemplateBlock] | None = None,
) -> Iterator[Event]:
    """Generate after prompt_ids (tokens not yet in `cache`), yielding events (see dgcli/events.py).
    `engine`: a dgcli Engine (a plain model gets one with the default policy). `images`: the
    dgcli.images.Pixels of the image spans in prompt_ids, in order. `template`: one TemplateBlock per
    canvas; it sets the number of blocks (settings.max_new_tokens should cover them)."""
    t_start = time.perf_counter()
    engine = as_engine(engine)
    device = engine.device
    L = engine.config.canvas_length
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if cache is None:
        cache = engine.new_cache(max_tokens=ids.shape[1] + settings.max_new_tokens + L)
    if ids.shape[1] == 0 and cache.length == 0:
        raise EmptyPromptError("empty prompt: there is nothing to condition on")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g, seed = make_generator(device, settings.seed)
    temps = temperature_schedule(settings)
    block_state = Block(engine, cache, settings, g, temps.to(device), temps.tolist(), logits_processor)
    eos = torch.tensor(settings.eos_token_id, device=device) if settings.eos_token_id else None
    prompt_len = ids.shape[1]
    max_length = cache.length + prompt_len + settings.max_new_tokens
    n_blocks = len(template) if template else math.ceil(settings.max_new_tokens / L)
    captured = engine.capture_seconds

    pending = ids
    new_tokens: list[torch.Tensor] = []
    steps_per_block: list[int] = []
    prefill_s = denoise_s = commit_s = 0.0
    finish_reason = "length"
    for block in range(n_blocks):
        t0 = time.perf_counter()
        if block == 0:
            if pending.shape[1]:
                engine.prefill(pending, cache, images) if images else engine.prefill(pending, cache)
            _sync(device)
            prefill_s = time.perf_counter() - t0
            yield PrefillEvent(prompt_tokens=prompt_len, cached_tokens=cache.length, seconds=prefill_s)
        else:
            engine.commit(pending, cache)
            _sync(device)
            commit_s += time.perf_counter() - t0

        plan = template[block] if template else None
        argmax, steps = yield from block_state.run(block, plan)
        denoise_s += block_state.seconds
        committed = argmax.clone()  # a graph's output buffer: the next replay overwrites it
        finished = cache.length + L >= max_length
        if plan is not None:  # the template sets the length; EOS inside a hole ends only that hole
            committed = plan.finish(committed) if plan.finish else committed
            finished, finish_reason = block == n_blocks - 1, "template"
        elif eos is not None:
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
        generated_tokens=(sum(L - t.n_pinned for t in template[:len(steps_per_block)]) if template else
                          min(useful_length(token_ids, settings.eos_token_id), settings.max_new_tokens)),
        blocks=len(steps_per_block),
        steps_per_block=steps_per_block,
        prefill_seconds=prefill_s,
        denoise_seconds=denoise_s,
        commit_seconds=commit_s,
        total_seconds=time.perf_counter() - t_start,
        seed=seed,
        settings={**settings.__dict__, "seed": seed},
        peak_memory_bytes=peak_memory(device),
        warmup_seconds=engine.capture_seconds - captured,
    )


class Block:
    """Denoising one canvas: `run(block)` yields a StepEvent per step and returns (argmax, steps)."""

    def __init__(self, engine: Engine, cache, settings: SamplerSettings, g: torch.Generator,
                 temps: torch.Tensor, temps_host: list[float], processor=None):
        self.engine, self.cache, self.settings, self.g = engine, cache, settings, g
        self.temps, self.temps_host, self.processor = temps, temps_host, processor
        self.seconds = 0.0  # denoising time of the last block, graph captures excluded

    def run(self, block: int, plan: TemplateBlock | None = None):
        engine, s = self.engine, self.settings
        V, L = engine.config.vocab_size, engine.config.canvas_length
        canvas = torch.randint(0, V, (1, L), device=engine.device, generator=self.g)
        sc, out = None, None
        stability = StabilityTracker(s.stability_threshold)
        self.seconds = 0.0
        if plan is not None and plan.n_pinned:
            canvas = torch.where(plan.pinned, plan.tokens, canvas)  # the same draws, then the pins
            if plan.n_pinned == L:  # nothing to denoise
                return canvas, 0
        processor = chain(self.processor, plan.processor if plan is not None else None)
        for i in range(s.max_denoising_steps):
            t0 = time.perf_counter()
            captured = engine.capture_seconds
            out = engine.step(canvas, self.cache, sc, self.temps[i], processor)
            canvas, accepted, stop, argmax, ent, sc = self.decide(out, stability, plan, processor)
            # The one host read of a step: the event's lists and the stop flag, in one transfer.
            host = _to_host(canvas[0], accepted[0], argmax[0], ent[0], stop)
            if not host["finite"]:
                raise CheckpointError("the model's outputs are NaN or infinite: its weights are broken "
                                      "(re-download or re-quantize them)")
            dt = time.perf_counter() - t0 - (engine.capture_seconds - captured)  # a new graph: reported apart
            self.seconds += dt
            yield StepEvent(
                block=block, step=i + 1, max_steps=s.max_denoising_steps, canvas=host["canvas"],
                accepted=host["accepted"], argmax=host["argmax"], entropy=host["entropy"],
                temperature=self.temps_host[i], stopped=host["stop"], seconds=dt,
                pinned=plan.pinned_host if plan is not None else None,
            )
            if host["stop"]:
                break
        return argmax, i + 1

    def decide(self, out, stability: StabilityTracker, plan: TemplateBlock | None = None, processor=None):
        """Sample every position; keep the lowest-entropy ones within the entropy bound, renoise the
        rest; stop when the argmax canvas is stable and the mean entropy below the threshold.
        Pinned positions: zero entropy, their pin as argmax and canvas, outside the mean.
        Returns (canvas, accepted, stop, argmax, entropy, sc): argmax and entropy with the pins
        applied; sc the next step's self-conditioning input (an engine.SelfCond: proc in the model
        dtype, written by the draw itself on the fused path, into the buffers the next step reads
        when it replays a graph; `processor`: the next step's, which decides that)."""
        s, engine = self.settings, self.engine
        V = engine.config.vocab_size
        sampled, sc = out.sample_sc(self.g, engine.dtype, engine.sc_buffers(self.cache, processor))
        pins = plan if plan is not None and plan.n_pinned else None
        argmax, ent = pinned_stats(out, pins)
        accepted = accept_mask(ent, s.entropy_bound)
        noise = torch.randint(0, V, sampled.shape, device=sampled.device, generator=self.g)
        canvas = torch.where(accepted, sampled, noise)
        if pins is None:
            mean = out.entropy.mean(dim=-1)
        else:
            canvas = torch.where(pins.pinned, pins.tokens, canvas)
            mean = ent.sum(dim=-1) / (ent.shape[-1] - pins.n_pinned)  # over the holes
        stop = stability(argmax) & (mean < s.confidence_threshold)
        return canvas, accepted, stop, argmax, ent, sc


def pinned_stats(out, plan: TemplateBlock | None):
    """(argmax, entropy) of a step with a template block's pins applied: the pin as argmax, zero
    entropy (so pins use none of the entropy bound); the step's own without pins."""
    if plan is None or not plan.n_pinned:
        return out.argmax, out.entropy
    return torch.where(plan.pinned, plan.tokens, out.argmax), out.entropy.masked_fill(plan.pinned, 0.0)


def _to_host(canvas, accepted, argmax, entropy, stop) -> dict:
    """One device-to-host copy for a step's event: ids and entropies travel as float64 (exact)."""
    L = canvas.shape[0]
    finite = torch.isfinite(entropy).all().reshape(1)
    flat = torch.cat([canvas.double(), accepted.double(), argmax.double(), entropy.double(),
                      stop.double().reshape(1), finite.double()]).tolist()
    ints = [int(x) for x in flat[:L]], [int(x) for x in flat[2 * L:3 * L]]
    return {"canvas": ints[0], "accepted": [x != 0 for x in flat[L:2 * L]], "argmax": ints[1],
            "entropy": flat[3 * L:4 * L], "stop": flat[4 * L] != 0, "finite": flat[4 * L + 1] != 0}


def useful_length(token_ids: list[int], eos_ids: list[int] | None) -> int:
    """Tokens before the first EOS (the EOS itself not counted)."""
    if eos_ids:
        for i, t in enumerate(token_ids):
            if t in eos_ids:
                return i
    return len(token_ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
