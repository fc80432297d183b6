"""The Python API, in the style of mlx-lm: `load`, `stream_generate`, `generate`.

    model, tokenizer = dgcli.load("tiny")
    for event in dgcli.stream_generate(model, tokenizer, "hi", seed=0):
        ...
    text = dgcli.generate(model, tokenizer, "hi")

`prompt` is a string (the chat template is applied unless raw=True), a list of chat messages
({"role", "content"} dicts), or a list of token ids (used as they are). Settings use the reference's
names (max_new_tokens, max_denoising_steps, entropy_bound, t_min, t_max, stability_threshold,
confidence_threshold, eos_token_id, pad_token_id) plus seed; unset ones come from the checkpoint's
generation_config.json, then the reference's defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from . import graphs, store
from .cache import KVCache
from .config import SamplerSettings
from .events import BlockEvent, DoneEvent, Event, PrefillEvent
from .loader import load_model
from .sampler import denoise, useful_length
from .tokenizer import Tokenizer


def load(name_or_path: str | None = None, device=None, dtype=None, cuda_graphs: bool | None = None):
    """(model, tokenizer) for a model name (see dgcli.store.resolve), weights on device/dtype.

    cuda_graphs: replay denoising steps from captured CUDA graphs (dgcli/graphs.py); default on for
    a CUDA device unless DG_CUDA_GRAPHS=0. On CUDA the sampler also takes its statistics from the
    fused LM head (kernels/lm_head.py) unless DG_FUSED_HEAD=0."""
    path = store.resolve(name_or_path)
    tokenizer = Tokenizer.from_dir(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = load_model(path, device=device, dtype=dtype)
    graphs.use_fast_paths(model, cuda_graphs)
    return model, tokenizer


def sampler_settings(model, **overrides) -> SamplerSettings:
    base = getattr(model, "sampler_defaults", None) or SamplerSettings()
    return base.replace(**overrides)


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


def stream_generate(model, tokenizer: Tokenizer, prompt, *, raw: bool = False, system: str | None = None,
                    think: bool = False, cache: KVCache | None = None,
                    logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    **settings) -> Iterator[Event]:
    """Yield the sampler's events, with text filled in on BlockEvent (the new text) and DoneEvent (all of it).

    `cache`: a KV cache already holding a prefix; `prompt` is then only what follows it.
    """
    s = sampler_settings(model, **settings)
    ids = prompt_ids(tokenizer, prompt, raw=raw, system=system, think=think)
    if not ids and (cache is None or cache.length == 0):
        raise ValueError("empty prompt")
    new_ids: list[int] = []
    shown = ""
    for event in denoise(model, ids, s, cache=cache, logits_processor=logits_processor):
        if isinstance(event, BlockEvent):
            new_ids += event.token_ids
            text = final_text(tokenizer, new_ids, s)
            if not event.finished and text.endswith("\ufffd"):  # a character split across blocks
                text = text.rstrip("\ufffd")
            event.text, shown = text[len(shown):], text
        elif isinstance(event, DoneEvent):
            event.text = final_text(tokenizer, event.token_ids, s)
        yield event


def prefill(model, token_ids: list[int], cache) -> PrefillEvent:
    """Encode token ids onto `cache`, as a generation does first (chat uses it to snapshot a prefix)."""
    t0 = time.perf_counter()
    if token_ids:
        model.encode(torch.tensor([token_ids], dtype=torch.long, device=model.device), cache)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
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
