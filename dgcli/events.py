"""The events a generation yields: one stream that the CLI, the canvas view, `--json` and tests all consume.

Plain dataclasses of Python lists and numbers, so consumers need no torch. Order of a generation:
PrefillEvent, then per block: StepEvent × steps, BlockEvent; then one DoneEvent.
Closing the generator (e.g. on Ctrl-C) cancels the generation; no DoneEvent follows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PrefillEvent:
    prompt_tokens: int  # tokens encoded into the cache by this call
    cached_tokens: int  # tokens in the cache afterwards
    seconds: float


@dataclass
class StepEvent:
    block: int  # 0-based canvas index
    step: int  # 1-based denoising steps done in this block
    max_steps: int
    canvas: list[int]  # the canvas for the next step: accepted samples, fresh noise elsewhere
    accepted: list[bool]  # positions the entropy bound accepted this step
    argmax: list[int]  # the draft: argmax of this step's logits (what a commit would keep)
    entropy: list[float]  # per-position entropy (nats) of the temperature-scaled logits
    temperature: float
    stopped: bool  # stable and confident: this block commits after this step
    seconds: float  # time of this step
    pinned: list[bool] | None = None  # a template's pinned positions (entropy 0, always accepted); None: no template


@dataclass
class BlockEvent:
    block: int
    token_ids: list[int]  # the committed canvas (argmax), with pads after EOS
    steps: int  # denoising steps it took
    finished: bool  # EOS inside it, or the token budget reached
    text: str = ""  # decoded text of this block up to EOS (filled by the tokenizer layer)


@dataclass
class DoneEvent:
    token_ids: list[int]  # every new id, whole canvases, pads included (the reference's sequences[prompt_len:])
    finish_reason: str  # "eos", "length", or "template" (a filled template: it sets the length)
    prompt_tokens: int
    generated_tokens: int  # up to the first EOS and at most max_new_tokens
    blocks: int
    steps_per_block: list[int]
    prefill_seconds: float
    denoise_seconds: float
    commit_seconds: float
    total_seconds: float
    seed: int
    settings: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    text: str = ""
    warmup_seconds: float = 0.0  # CUDA graph warm-up and capture, not counted in denoise_seconds

    @property
    def tokens_per_second(self) -> float:
        gen = self.denoise_seconds + self.commit_seconds
        return self.generated_tokens / gen if gen > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        steps = sum(self.steps_per_block)
        return self.generated_tokens / steps if steps else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        d["tokens_per_forward"] = self.tokens_per_forward
        return d


Event = PrefillEvent | StepEvent | BlockEvent | DoneEvent
