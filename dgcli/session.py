"""A chat conversation with one engine, without any terminal I/O: `ChatSession.turn(text)` yields
the engine's events; `dg chat` (dgcli/repl.py) and anything else that chats drive it.

Each turn re-renders the whole conversation with the chat template and reuses the K/V of earlier
turns through the one rollback protocol every cache has (dgcli/cache.py): the session keeps one
cache and the tokens it holds; a new prompt rolls the cache back to where it diverges from them
(`truncate`) when the sliding layers still reach that far, else back to the end of the last user
message (`mark`ed after its prefill, `rewind`), else to nothing. On CUDA the cache is static and
its captured graphs stay valid from turn to turn; on the CPU it is the reference's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .api import check_context, prefill, prompt_ids, stream_generate
from .images import EncodedPrompt, encode_prompt, images_between, open_image, spans, vision_for, check_vision
from .config import TUNABLE_SETTINGS, temperature_shorthand
from .engine import as_engine
from .errors import DgError
from .events import BlockEvent, DoneEvent, Event, PrefillEvent

ALIASES = {"max_tokens": "max_new_tokens", "steps": "max_denoising_steps"}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one engine; no terminal I/O. `turn(text)` yields the engine's events."""

    def __init__(self, engine, tokenizer, *, settings: dict | None = None, system: str | None = None,
                 think: bool = False, reuse_cache: bool = True, context: int = 32768):
        self.engine, self.tokenizer = as_engine(engine), tokenizer
        self.settings = dict(settings or {})
        self.system, self.think, self.reuse_cache = system, think, reuse_cache
        self.messages: list[dict] = []  # user/assistant turns; an interrupted answer has "interrupted": True
        self.last: DoneEvent | None = None
        self.last_reused = 0  # prompt tokens the last turn took from the cache
        self.context = context  # tokens a static cache holds
        self.cache = None  # made on the first turn, kept for the whole session
        self.tokens: list[int] = []  # the ids the cache holds
        self.pending: list[dict] = []  # image parts attached to the next message (`attach`)

    def image_part(self, image) -> dict:
        """An image (path, bytes or PIL image) decoded and processed now, as a message part; the
        processed patches ride along under "_pixels" (not shown to the template, not saved)."""
        check_vision(self.engine.model)
        processor, _ = vision_for(self.tokenizer)
        return {"type": "image", "image": str(image) if isinstance(image, (str, Path)) else None,
                "_pixels": processor(open_image(image))}

    def attach(self, image) -> int:
        """Attach an image to the next message; returns the tokens it takes."""
        part = self.image_part(image)
        self.pending.append(part)
        return part["_pixels"].tokens

    def _encode(self, msgs: list[dict]) -> tuple[list[int], list[int], list]:
        """(prompt ids, ids of the conversation without the generation prompt, image patches)."""
        pixels = [p["_pixels"] for m in msgs if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        if not pixels:
            ids = prompt_ids(self.tokenizer, msgs, think=self.think)
            return ids, self.tokenizer.encode(self.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=False, enable_thinking=self.think), add_special_tokens=False), []
        model = self.engine.model
        ids = encode_prompt(model, self.tokenizer, msgs, think=self.think, pixels=pixels).ids
        history = encode_prompt(model, self.tokenizer, msgs, think=self.think, pixels=pixels,
                                add_generation_prompt=False).ids
        return ids, history, pixels

    def conversation(self) -> list[dict]:
        msgs = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return ([{"role": "system", "content": self.system}] if self.system else []) + msgs

    def clear(self) -> None:
        self.messages, self.last, self.last_reused, self.tokens, self.pending = [], None, 0, [], []

    def cached_prefix(self, ids: list[int], reuse: bool | None = None) -> int:
        """Roll the cache back so that it holds ids[:n], n as large as it allows (0 when reuse is off:
        reuse=None means the session's reuse_cache); returns n."""
        if self.cache is None:
            self.cache = self.engine.new_cache(max_tokens=self.context)
        cache = self.cache
        reuse = self.reuse_cache if reuse is None else reuse
        n = min(common_prefix(self.tokens[:cache.length], ids), len(ids) - 1) if reuse else 0
        image_id = self.engine.config.image_token_id
        for a, b in spans(ids, image_id) if image_id is not None else []:
            if a < n < b:  # never keep half an image: its tokens are encoded together
                n = a
        if cache.truncate(n):
            return n
        if cache.marked_length is not None and cache.marked_length <= n:  # the last user message
            cache.rewind()
            return cache.length
        cache.reset()  # the sliding layers no longer reach back there
        return 0

    def turn(self, text: str, images=(), template=None) -> Iterator[Event]:
        """Add a user message (with the attached images, then `images`: paths, bytes or PIL images,
        placed before the text) and yield the answer's events. Closing it early (Ctrl-C) keeps the
        committed part in the transcript, marked interrupted; an error takes the message back.
        `template`: the answer fills it (see dgcli.api.stream_generate)."""
        parts, self.pending = self.pending, []
        try:
            parts = parts + [self.image_part(im) for im in images]
        except DgError:
            self.pending = parts
            raise
        self.messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text})
        committed, done = "", None
        try:
            ids, history, pixels = self._encode(self.conversation())
            events = self.generate(ids, history if self.reuse_cache else None, pixels=pixels, template=template)
            try:
                for ev in events:
                    if isinstance(ev, BlockEvent):
                        committed += ev.text
                    elif isinstance(ev, DoneEvent):
                        done = ev
                    yield ev
            finally:
                events.close()
        except (DgError, ValueError):
            self.messages.pop()
            self.pending = parts  # the images stay attached for the next try
            raise
        except BaseException:  # closed by the consumer, or Ctrl-C inside the engine
            self.messages.append({"role": "assistant", "content": committed, "interrupted": True})
            raise
        self.messages.append({"role": "assistant", "content": done.text if done else committed})
        self.last = done

    def generate(self, ids: list[int], history: list[int] | None = None, settings: dict | None = None,
                 reuse: bool | None = None, pixels=(), template=None) -> Iterator[Event]:
        """Yield the events of an answer to the prompt `ids` (a whole rendered conversation), with the
        session's cache: the prefix `ids` shares with the cached tokens is not encoded again (unless
        reuse=False: then the answer is computed as a one-off generation computes it, token for token).
        `history` (a prefix of ids: the conversation without the generation prompt) is encoded and
        marked first, so that a next turn, which starts with it, can come back to it. `pixels`: the
        processed images of the image spans in ids, in order; `template`: the answer fills it. dg
        chat's turns and dg serve's requests (settings per request) both come here."""
        settings = self.settings if settings is None else settings
        image_id = self.engine.config.image_token_id
        start = self.cached_prefix(ids, reuse)
        cache = self.cache
        # Refused before any compute (the conversation's prefill below included) if it cannot fit.
        check_context(self.engine, len(ids) - start, self.engine.sampler_settings(**settings).max_new_tokens, cache)
        self.last_reused, extra_s = start, 0.0
        blocks: list[int] = []  # the cache holds (ids + blocks)[:cache.length]
        try:
            if history is not None and start < len(history) < len(ids) and ids[:len(history)] == history:
                # The conversation so far, without the generation prompt: the next turn's prompt
                # starts with it, whatever this answer turns out to be.
                extra_s = prefill(self.engine, ids[start:len(history)], cache,
                                  images_between(ids, image_id, pixels, start, len(history))).seconds
                cache.mark()
                start = len(history)
            prompt = EncodedPrompt(ids[start:], images_between(ids, image_id, pixels, start, len(ids))) \
                if pixels else ids[start:]
            events = stream_generate(self.engine, self.tokenizer, prompt, cache=cache, template=template, **settings)
            try:
                for ev in events:
                    if isinstance(ev, PrefillEvent):
                        ev.prompt_tokens += start - self.last_reused  # what this turn encoded in both calls
                        ev.seconds += extra_s
                    elif isinstance(ev, BlockEvent):
                        blocks += ev.token_ids
                    elif isinstance(ev, DoneEvent):
                        ev.prompt_tokens += start - self.last_reused
                        ev.prefill_seconds += extra_s
                        ev.total_seconds += extra_s
                    yield ev
            finally:
                events.close()
        finally:
            self.tokens = (ids + blocks)[:cache.length]

    # ---- settings and transcript ----

    def set(self, key: str, value: str) -> str:
        """Change a sampling setting from text ('none' unsets it); returns the canonical name."""
        key = ALIASES.get(key, key)
        if key == "temperature":
            try:
                t = float(value)
            except ValueError:
                raise DgError(f"temperature needs a number, got '{value}'") from None
            new = {**self.settings, **temperature_shorthand(t)}
        elif key in TUNABLE_SETTINGS:
            new = dict(self.settings)
            if value.lower() in ("none", "default"):
                new.pop(key, None)
            else:
                try:
                    new[key] = TUNABLE_SETTINGS[key](value)
                except ValueError:
                    raise DgError(f"{key} needs a number, got '{value}'") from None
        else:
            raise DgError(f"unknown setting '{key}'; known: {', '.join([*TUNABLE_SETTINGS, 'temperature'])}")
        self.settings = self.checked(new)
        return key

    def checked(self, settings: dict) -> dict:
        """settings if the engine takes them (the one check /set and /load share), else a DgError."""
        self.engine.sampler_settings(**settings)  # raises ConfigError with the reason
        return settings

    def effective_settings(self) -> dict:
        s = self.engine.sampler_settings(**self.settings).__dict__
        return {k: s[k] for k in TUNABLE_SETTINGS}

    def to_json(self) -> dict:
        """The conversation as JSON; an image is kept as its path (one given as data: as "[image]")."""
        def saved(m):
            if not isinstance(m["content"], list):
                return m
            content = [{"type": "image", "image": p["image"]} if p.get("type") == "image" and p.get("image")
                       else {"type": "text", "text": "[image]"} if p.get("type") == "image" else p
                       for p in m["content"]]
            return {**m, "content": content}

        return {"system": self.system, "think": self.think, "settings": self.settings,
                "messages": [saved(m) for m in self.messages]}

    def load_json(self, d: dict) -> None:
        """Take a saved conversation (to_json's shape); everything is checked before anything changes."""
        msgs = d.get("messages") if isinstance(d, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and _content_ok(m.get("content"))
                for m in msgs):
            raise DgError("not a dg conversation: expected an object with a 'messages' list of {role, content}, "
                          "role user or assistant, content text (or text and image-path parts)")
        system, think, settings = d.get("system"), d.get("think", self.think), d.get("settings")
        if system is not None and not isinstance(system, str):
            raise DgError(f"system must be text or null, got {type(system).__name__}")
        if not isinstance(think, bool):
            raise DgError(f"think must be true or false, got {think!r}")
        if settings is None:
            settings = self.settings
        if not isinstance(settings, dict):
            raise DgError(f"settings must be an object, got {type(settings).__name__}")
        new = {}
        for key, value in settings.items():
            name = ALIASES.get(key, key)
            if name not in TUNABLE_SETTINGS:
                raise DgError(f"unknown setting '{key}'; known: {', '.join([*TUNABLE_SETTINGS])}")
            if value is None:
                continue
            whole = TUNABLE_SETTINGS[name] is int
            if not (isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)):
                raise DgError(f"{name} needs {'an integer' if whole else 'a number'}, got {json.dumps(value)[:40]}")
            new[name] = value
        new = self.checked(new)  # then the ranges, as /set checks them
        msgs = [{**m, "content": [self.image_part(p["image"]) if p["type"] == "image" else p for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in msgs]  # the images, decoded again
        self.clear()
        self.messages = msgs
        self.system = system or None
        self.think = think
        self.settings = new


def _content_ok(content) -> bool:
    """A saved message's content: text, or a list of text parts and image parts naming a file."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and ((p.get("type") == "text" and isinstance(p.get("text"), str))
                                 or (p.get("type") == "image" and isinstance(p.get("image"), str)))
        for p in content)
