"""Template filling (`dg fill`, docs/fill.md): a template laid out on canvases, filled, and read back.
(Named filling, not fill, so that `dgcli.fill` stays the function.)

    engine, tok = dgcli.load("tiny")
    r = dgcli.fill(engine, tok, "Describe a cat.", "Name: {{name:text:4}}, age {{age:int:2}}", seed=0)
    r.text, r.holes  # 'Name: ..., age 7', {'name': '...', 'age': 7}   (dgcli.api.fill)

`template_from(template=, schema=, seed_canvas=, pinned=)` is the one entry point for every form a
caller may send (template text, a JSON Schema, vLLM's token arrays); `Plan` lays a Template out:
fixed text is tokenized and pinned, holes get positions, typed holes an allowed-token mask (int,
JSON-safe string) or a joint choice over their options, and a template shorter than its last canvas
pins an end-of-turn and pads after itself. The sampler (dgcli/sampler.py) takes one TemplateBlock per
canvas; `Plan.read(token_ids)` gives the text and the holes' values.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

import torch

from .events import DoneEvent
from .sampler import TemplateBlock
from .template import Fixed, Hole, Template, TemplateError, from_tokens, parse

_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> each token's text
_SETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {set key: allowed (V,) bool}


def template_from(template=None, *, schema=None, seed_canvas=None, pinned=None) -> Template:
    """A Template from exactly one of: template text (or a Template), a JSON Schema (dict), or vLLM's
    `diffusion_seed_canvas` + `diffusion_pinned` arrays. A TemplateError (exit 2 / HTTP 400) otherwise."""
    given = [x for x in (template, schema, seed_canvas) if x is not None]
    if len(given) != 1:
        raise TemplateError("give one of: a template, a JSON schema, or diffusion_seed_canvas with diffusion_pinned")
    if isinstance(template, Template):
        return template
    if template is not None:
        return parse(template)
    if schema is not None:
        from .schema import to_template

        return to_template(schema)
    return from_tokens(seed_canvas, pinned)


def token_pieces(tokenizer, size: int) -> list[str]:
    """Each token id's text on its own (special tokens ''), for ids below `size`; cached per tokenizer."""
    pieces = _PIECES.get(tokenizer)
    if pieces is None:
        n = tokenizer.tok.get_vocab_size(with_added_tokens=True)
        pieces = _PIECES[tokenizer] = tokenizer.tok.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
    return pieces[:size]


@dataclass
class Slot:
    part: Fixed | Hole
    start: int  # first position (in the answer, across canvases)
    width: int
    ids: list[int] = field(default_factory=list)  # Fixed: its tokens
    options: list[list[int]] = field(default_factory=list)  # choice: each option's tokens
    key: str = ""  # the holes dict key
    ended: bool = False  # a text hole's EOS was committed (in an earlier canvas)


class Plan:
    """A template laid out on canvases for one engine and tokenizer."""

    def __init__(self, template: Template, tokenizer, engine, eos_ids: list[int] | None, pad_id: int | None):
        cfg = engine.config
        self.template, self.tok = template, tokenizer
        self.L, self.V, self.device = cfg.canvas_length, cfg.vocab_size, engine.device
        if pad_id is None:
            raise TemplateError("this model has no pad token id (generation_config.json): templates need one")
        self.pad, self.eos = pad_id, list(eos_ids or [])
        self._set_ids: dict[tuple, int] = {}  # allowed-token sets, made as the layout asks for them
        self._sets: list[torch.Tensor] = []
        self.slots: list[Slot] = []
        pos, n_holes = 0, 0
        for part in template.parts:
            if isinstance(part, Fixed):
                ids = list(part.ids) if part.ids is not None else tokenizer.encode(part.text, add_special_tokens=False)
                bad = next((i for i in ids if not 0 <= i < self.V), None)
                if bad is not None:
                    raise TemplateError(f"token id {bad} is outside the vocabulary (0..{self.V - 1})")
                self.slots.append(Slot(part, pos, len(ids), ids))
                pos += len(ids)
                self.check_room(pos, cfg)
                continue
            key = part.name or str(n_holes)
            n_holes += 1
            if part.kind == "choice":
                options = self.choice_options(part)
                width = max(len(o) for o in options)
                if width > self.L:
                    raise TemplateError(f"a choice option of {width} tokens does not fit a {self.L}-token canvas")
                if pos % self.L + width > self.L:  # a choice is scored within one canvas: start the next
                    gap = self.L - pos % self.L
                    self.slots.append(Slot(Fixed(""), pos, gap, [self.pad] * gap))
                    pos += gap
                self.slots.append(Slot(part, pos, width, options=options, key=key))
                pos += width
            else:
                self.slots.append(Slot(part, pos, part.size, key=key))
                pos += part.size
            self.check_room(pos, cfg)
        if pos == 0:
            raise TemplateError("the template has no tokens")
        self.length = pos  # template positions; the rest of the last canvas is the tail
        self.n_blocks = -(-pos // self.L)
        self.blocks = [self.block(b) for b in range(self.n_blocks)]

    def check_room(self, pos: int, cfg) -> None:
        if pos > cfg.max_position_embeddings:
            raise TemplateError(f"the template is longer than the model's context ({cfg.max_position_embeddings} "
                                f"tokens), at least {pos} tokens")

    def choice_options(self, hole: Hole) -> list[list[int]]:
        options = [self.tok.encode(o, add_special_tokens=False) for o in hole.options]
        seen: dict[tuple, str] = {}
        for text, ids in zip(hole.options, options):
            if not ids:
                raise TemplateError(f"choice option '{text}' has no tokens")
            if tuple(ids) in seen:
                raise TemplateError(f"choice options '{seen[tuple(ids)]}' and '{text}' are the same tokens "
                                    "for this tokenizer")
            seen[tuple(ids)] = text
        return options

    # ---- what the sampler gets ----
    def block(self, b: int) -> TemplateBlock:
        """Pins, typed-hole processor and commit rule of canvas b."""
        L, lo = self.L, b * self.L
        tokens = [0] * L
        pinned = [False] * L
        masks: dict[int, int] = {}  # position -> allowed set id
        choices = []
        for s in self.slots:
            a, z = max(s.start, lo), min(s.start + s.width, lo + L)
            if a >= z:
                continue
            if isinstance(s.part, Fixed):
                for p in range(a, z):
                    tokens[p - lo], pinned[p - lo] = s.ids[p - s.start], True
            elif s.part.kind == "choice":
                choices.append((s.start - lo, s.options))
            elif s.part.kind in ("int", "string"):
                for p in range(a, z):
                    masks[p - lo] = self.allowed_set(s.part, p - s.start)
        if b == self.n_blocks - 1 and self.length < lo + L:  # the tail: an end of turn, then pads
            t = self.length - lo
            for p in range(t, L):
                tokens[p], pinned[p] = self.pad, True
            if self.eos:
                tokens[t] = self.eos[-1]
        dev = self.device
        processor = None
        if masks or choices:
            processor = HoleProcessor(sorted(masks), [masks[p] for p in sorted(masks)], self.sets, choices,
                                      self.pad, dev)
        return TemplateBlock(torch.tensor(pinned, device=dev), torch.tensor(tokens, dtype=torch.long, device=dev),
                             processor, lambda committed, b=b: self.finish(b, committed))

    @property
    def sets(self) -> torch.Tensor:
        """The allowed-token sets as one (S, V) bool tensor, built as layout asks for them."""
        return torch.stack(self._sets) if self._sets else torch.zeros(0, self.V, dtype=torch.bool, device=self.device)

    def allowed_set(self, hole: Hole, offset: int) -> int:
        """Index of the set of tokens allowed at a typed hole's position `offset`."""
        if hole.kind == "int":
            key = ("int", offset == 0)  # the first position holds a digit: an int is never empty
        else:
            key = ("string", hole.chars)
        if key not in self._set_ids:
            cache = _SETS.setdefault(self.tok, {})
            full = (*key, self.V, self.pad, tuple(self.eos))
            if full not in cache:  # a vocabulary-long Python loop: once per tokenizer, not per request
                cache[full] = self.make_set(key)
            self._set_ids[key] = len(self._sets)
            self._sets.append(cache[full].to(self.device))
        return self._set_ids[key]

    def make_set(self, key: tuple) -> torch.Tensor:
        pieces = token_pieces(self.tok, self.V)
        ok = torch.zeros(self.V, dtype=torch.bool)
        if key[0] == "int":
            first = key[1]
            digits = [i for i, p in enumerate(pieces) if p.isascii() and (p.lstrip() if first else p).isdigit()
                      and p.rstrip() == p]
            if not digits:
                raise TemplateError("this tokenizer has no digit tokens: int holes cannot be filled")
            ok[digits] = True
            ok[self.pad] = not first
        else:
            specials, chars = {self.pad, *self.eos}, key[1]
            for i, p in enumerate(pieces):
                if p == "":
                    ok[i] = i in specials  # pads end a string early, an EOS ends it; other specials never
                elif json_safe(p) and (chars is None or len(p) <= chars):
                    ok[i] = True
            if not ok.any():
                raise TemplateError("no token of this tokenizer fits a string hole")
        return ok

    def finish(self, b: int, committed: torch.Tensor) -> torch.Tensor:
        """The committed canvas b: in a text or string hole, every position after its first EOS is a pad
        (an EOS ends the hole, not the template)."""
        if not self.eos:
            return committed
        if b == 0:  # a new generation with this plan
            for s in self.slots:
                s.ended = False
        ids = committed[0].tolist()
        lo, eos, changed = b * self.L, set(self.eos), False
        for s in self.slots:
            if isinstance(s.part, Fixed) or s.part.kind not in ("text", "string"):
                continue
            a, z = max(s.start, lo), min(s.start + s.width, lo + self.L)
            if a >= z:
                continue
            ended = s.ended
            for p in range(a, z):
                if ended and ids[p - lo] != self.pad:
                    ids[p - lo], changed = self.pad, True
                elif ids[p - lo] in eos:
                    ended = True
            s.ended = ended
        return torch.tensor([ids], dtype=committed.dtype, device=committed.device) if changed else committed

    # ---- reading the result ----
    def read(self, token_ids: list[int], upto: int | None = None) -> tuple[str, dict]:
        """(text, holes) from the answer's token ids; only the parts that end within `upto` positions."""
        upto = len(token_ids) if upto is None else upto
        text, holes = [], {}
        for s in self.slots:
            if s.start + s.width > upto:
                break
            ids = token_ids[s.start:s.start + s.width]
            if isinstance(s.part, Fixed):
                text.append(s.part.text if s.part.ids is None else self.tok.decode(ids, skip_special_tokens=True))
                continue
            shown, value = self.hole_value(s, ids)
            text.append(shown)
            holes[s.key] = value
        return "".join(text), holes

    def hole_value(self, s: Slot, ids: list[int]):
        hole = s.part
        if hole.kind == "choice":
            padded = [o + [self.pad] * (s.width - len(o)) for o in s.options]
            k = max(range(len(padded)), key=lambda j: sum(x == y for x, y in zip(padded[j], ids)))
            option = hole.options[k]
            if hole.value == "bool":
                return option, option == "true"
            return option, json.loads(option) if hole.value == "json" else option
        if hole.kind == "int":
            pieces = token_pieces(self.tok, self.V)
            digits = "".join(c for i in ids if i != self.pad and i < len(pieces) for c in pieces[i] if c.isdigit())
            number = int(digits) if digits else 0
            return str(number), number
        cut = next((j for j, t in enumerate(ids) if t in self.eos), len(ids))
        value = self.tok.decode(ids[:cut], skip_special_tokens=True)
        return value, value


def json_safe(piece: str) -> bool:
    """Text that may stand inside a JSON string as it is: no quote, backslash or control character."""
    return not any(c in '"\\' or ord(c) < 0x20 for c in piece)


class HoleProcessor:
    """The typed holes of one canvas, applied to its logits (1, L, V) before the statistics:
    masked positions keep only their allowed tokens; a choice scores each option over its positions
    (mean log-probability of the option's own tokens) and keeps only the best one's tokens, pads after
    a shorter option. No host reads, so it runs inside the step as it is."""

    def __init__(self, positions: list[int], set_ids: list[int], sets: torch.Tensor, choices, pad: int, device):
        self.refused = ~sets  # (S, V): what each allowed set refuses
        self.runs = []  # [a, b, set]: contiguous positions with one set, masked in place through a slice
        for p, k in zip(positions, set_ids):
            if self.runs and self.runs[-1][1] == p and self.runs[-1][2] == k:
                self.runs[-1][1] += 1
            else:
                self.runs.append([p, p + 1, k])
        self.choices = []
        for start, options in choices:
            width = max(len(o) for o in options)
            ids = torch.tensor([o + [pad] * (width - len(o)) for o in options], dtype=torch.long, device=device)
            own = torch.tensor([[j < len(o) for j in range(width)] for o in options], device=device)
            self.choices.append((torch.arange(start, start + width, device=device), ids, own,
                                 own.sum(dim=1).to(torch.float32)))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        for a, b, k in self.runs:
            logits[0, a:b].masked_fill_(self.refused[k], float("-inf"))  # one (V,) row for all b - a positions
        for pos, ids, own, lengths in self.choices:
            rows = logits[0, pos]  # (W, V)
            logp = torch.log_softmax(rows.float(), dim=-1)
            scores = (logp.gather(1, ids.T) * own.T).sum(dim=0) / lengths  # (K,)
            chosen = ids.index_select(0, scores.argmax().reshape(1))[0]  # (W,), on the device: no host read
            keep = torch.full_like(rows, float("-inf"))
            logits[0, pos] = keep.scatter_(1, chosen[:, None], rows.gather(1, chosen[:, None]))
        return logits


def layout(template, tokenizer, engine, settings) -> Plan:
    """A Plan for a Template, template text or schema dict, with the settings' EOS and pad ids."""
    if isinstance(template, Plan):
        return template
    if isinstance(template, dict):
        template = template_from(schema=template)
    elif not isinstance(template, Template):
        template = template_from(template)
    return Plan(template, tokenizer, engine, settings.eos_token_id, settings.pad_token_id)


@dataclass
class FillResult:
    text: str
    holes: dict
    done: DoneEvent | None = None  # the generation's statistics
