"""The Python API, in the style of mlx-lm: `load`, `stream_generate`, `generate`, `fill` (templates).

    model, tokenizer = dgcli.load("tiny")
    for event in dgcli.stream_generate(model, tokenizer, "hi", seed=0):
        ...
    text = dgcli.generate(model, tokenizer, "hi")

`prompt` is a string (the chat template is applied unless raw=True), a list of chat messages
({"role", "content"} dicts), or a list of token ids (used as they are). A message's content may be a
list of parts in the Hugging Face format: {"type": "image", "image": PATH | PIL.Image} and
{"type": "text", "text": ...} (dgcli/images.py; the model needs its vision tower). Settings use the reference's
names (max_new_tokens, max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold,
confidence_threshold, eos_token_id, pad_token_id) plus seed; unset ones come from the checkpoint's
generation_config.json, then the reference's defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from . import store
from .config import SamplerSettings
from .engine import Engine, as_engine
from .errors import ContextLengthError, EmptyPromptError
from .events import BlockEvent, DoneEvent, Event, PrefillEvent
from .images import EncodedPrompt, encode_prompt, has_images
from .loader import load_model, load_sampler_defaults
from .sampler import denoise, useful_length
from .tokenizer import Tokenizer


def load(name_or_path: str | None = None, device=None, dtype=None, cuda_graphs: bool | None = None,
         vision: bool = True):
    """(engine, tokenizer) for a model name (see dgcli.store.resolve), weights on device/dtype;
    vision=False leaves the vision tower out (text only, less memory).

    The engine (dgcli/engine.py) holds the model and how it runs: on CUDA a static cache, denoising
    steps replayed from CUDA graphs (unless cuda_graphs=False or DG_CUDA_GRAPHS=0) and the fused LM
    head (unless DG_FUSED_HEAD=0); elsewhere the reference's arithmetic. `engine.model` is the
    plain PyTorch model."""
    from quant.runtime import prepare_quantized  # dg quantize outputs plug into the loader here

    path = store.resolve(name_or_path)
    tokenizer = Tokenizer.from_dir(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = load_model(path, device=device, dtype=dtype, prepare=prepare_quantized, vision=vision)
    return Engine(model, load_sampler_defaults(path), cuda_graphs=cuda_graphs), tokenizer


def sampler_settings(engine, **overrides) -> SamplerSettings:
    return as_engine(engine).sampler_settings(**overrides)


def prompt_ids(tokenizer: Tokenizer, prompt, raw: bool = False, system: str | None = None,
               think: bool = False) -> list[int]:
    """Token ids for a prompt given as text, chat messages, or ids."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str) and raw:
        return tokenizer.encode(prompt, add_special_tokens=True)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=think)
    return tokenizer.encode(text, add_special_tokens=False)


def stream_generate(engine, tokenizer: Tokenizer, prompt, *, raw: bool = False, system: str | None = None,
                    think: bool = False, cache=None,
                    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    template=None, **settings) -> Iterator[Event]:
    """Yield the sampler's events, with text filled in on BlockEvent (the new text) and DoneEvent (all of it).

    `engine`: from dgcli.load (a plain DiffusionGemma works too, with the default policy).
    `cache`: a KV cache already holding a prefix (`engine.new_cache()`); `prompt` is then only what follows it.
    `template`: the answer fills it (template text, a JSON Schema dict, or a dgcli.filling.Plan; see
    docs/fill.md); it sets the answer's length, so max_new_tokens is ignored.
    """
    engine = as_engine(engine)
    s = engine.sampler_settings(**settings)
    plan = None
    if template is not None:
        from .filling import layout

        plan = layout(template, tokenizer, engine, s)
        s = s.replace(max_new_tokens=plan.n_blocks * plan.L)
    if isinstance(prompt, EncodedPrompt):  # ids with their images already placed (a chat session's)
        ids, pixels = prompt.ids, prompt.images
    elif has_images(prompt):  # messages with image parts: placeholders expanded, pixels ready
        encoded = encode_prompt(engine.model, tokenizer, list(prompt), system=system, think=think)
        ids, pixels = encoded.ids, encoded.images
    else:
        ids, pixels = prompt_ids(tokenizer, prompt, raw=raw, system=system, think=think), None
    if not ids and (cache is None or cache.length == 0):
        raise EmptyPromptError("empty prompt")
    try:
        check_context(engine, len(ids), s.max_new_tokens, cache, template=plan is not None)
    except ContextLengthError as e:
        if not pixels:
            raise
        raise ContextLengthError(f"{e} (the {len(pixels)} image(s) take {sum(p.tokens for p in pixels)} of the "
                                 f"prompt's tokens)") from None
    new_ids: list[int] = []
    shown = ""
    for event in denoise(engine, ids, s, cache=cache, logits_processor=logits_processor, images=pixels,
                         template=plan.blocks if plan is not None else None):
        if isinstance(event, BlockEvent) and plan is not None:
            new_ids += event.token_ids
            text = plan.read(new_ids)[0]
            event.text, shown = text[len(shown):], text
        elif isinstance(event, DoneEvent) and plan is not None:
            event.text = plan.read(event.token_ids)[0]
        elif isinstance(event, BlockEvent):
            new_ids += event.token_ids
            text = final_text(tokenizer, new_ids, s)
            if not event.finished and text.endswith("\ufffd"):  # a character split across blocks
                text = text.rstrip("\ufffd")
            event.text, shown = text[len(shown):], text
        elif isinstance(event, DoneEvent):
            event.text = final_text(tokenizer, event.token_ids, s)
        yield event


def check_context(engine, prompt_tokens: int, max_new_tokens: int, cache=None, template: bool = False) -> None:
    """Refuse, before any compute, a prompt whose tokens (after what `cache` holds) plus the answer
    budget, rounded up to whole canvases (the sampler decodes whole ones), cannot fit the model's
    positions or the cache's room: a ContextLengthError naming both numbers."""
    engine = as_engine(engine)
    L = engine.config.canvas_length
    cached = cache.length if cache is not None else 0
    answer = -(-max_new_tokens // L) * L
    need = cached + prompt_tokens + answer
    room, what = engine.config.max_position_embeddings, "the model's context"
    capacity = getattr(cache, "capacity", None)  # a static cache: its buffers are fixed (KVCache grows)
    if capacity is not None and capacity < room:
        room, what = capacity, "this cache's room"
    if need > room:
        parts = f"{prompt_tokens} prompt" + (f" + {cached} cached" if cached else "")
        raise ContextLengthError(
            f"too long: {parts} + {answer} answer tokens ({max_new_tokens} as whole {L}-token canvases) = {need} "
            f"tokens, but {what} holds {room}; shorten the prompt or "
            + ("the template" if template else "lower the answer budget (--max-tokens)"))


def prefill(engine, token_ids: list[int], cache, images=None) -> PrefillEvent:
    """Encode token ids onto `cache`, as a generation does first (chat uses it to mark a prefix);
    `images`: the Pixels of the image spans in token_ids."""
    engine = as_engine(engine)
    t0 = time.perf_counter()
    if token_ids:
        ids = torch.tensor([token_ids], dtype=torch.long, device=engine.device)
        engine.prefill(ids, cache, images) if images else engine.prefill(ids, cache)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return PrefillEvent(prompt_tokens=len(token_ids), cached_tokens=cache.length, seconds=time.perf_counter() - t0)


def final_text(tokenizer: Tokenizer, token_ids: list[int], s: SamplerSettings) -> str:
    """Decoded text, cut at the first EOS and at max_new_tokens tokens."""
    n = min(useful_length(token_ids, s.eos_token_id), s.max_new_tokens)
    return tokenizer.decode(token_ids[:n], skip_special_tokens=True)


def generate(model, tokenizer: Tokenizer, prompt, **kwargs) -> str:
    """The generated text (see stream_generate for the arguments)."""
    done = None
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(event, DoneEvent):
            done = event
    return done.text


def fill(engine, tokenizer, prompt, template, **kwargs):
    """Fill `template` (template text, a dgcli.template.Template, or a JSON Schema dict) as the answer
    to `prompt` -> dgcli.filling.FillResult(text, holes, done); kwargs as stream_generate's."""
    from .filling import FillResult, layout

    engine = as_engine(engine)
    settings = {k: v for k, v in kwargs.items() if k not in ("raw", "system", "think", "cache", "logits_processor")}
    plan = layout(template, tokenizer, engine, engine.sampler_settings(**settings))
    done = None
    for event in stream_generate(engine, tokenizer, prompt, template=plan, **kwargs):
        if isinstance(event, DoneEvent):
            done = event
    return FillResult(done.text, plan.read(done.token_ids)[1], done)
