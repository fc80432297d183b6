"""The engine: a loaded model and how it is run. The sampler, chat sessions and the server hand it
their generations; the model stays plain PyTorch and speed is applied here, from outside it.

What the engine decides once, at construction (defaults: the fast paths on CUDA, the reference's
arithmetic elsewhere):
- the cache: the reference's `KVCache` (bit-identical to transformers) or a preallocated
  `StaticKVCache` (no per-step concatenation, capturable);
- CUDA graphs: each denoising step replayed from a captured graph (dgcli/graphs.py), only on a
  static cache; a capture that fails turns them off for this engine, with one warning;
- the fused LM head: `kernels.lm_head` writes the logits in the model dtype with the argmax, entropy
  and logsumexp of softcap(logits)/T in one pass over the vocabulary, instead of ~20 passes over
  [L, V] fp32 logits (the sampler's draw makes softcap(logits)/T from them in registers).
What it exposes: `new_cache`, `prefill(ids, cache)`, `step(canvas, cache, sc, temperature)` ->
`StepOut`, `commit(canvas, cache)`, and `sc_buffers(cache)`: where the sampler's draw writes the next
step's self-conditioning input so that a graph reads it in place (`StepOut.sample_sc`).
"""

from __future__ import annotations

import sys
import weakref
from typing import NamedTuple

import torch

from .cache import KVCache, StaticKVCache
from .config import SamplerSettings
from .errors import first_line
from .model import DiffusionGemma
from .settings import flag, kernels_mode

PREFILL_CHUNK = 2048  # tokens per encoder pass on a static cache: peak memory stays flat in prompt length


class SelfCond(NamedTuple):
    """A step's self-conditioning input: the previous step's proc in the model dtype (1, L, V), and
    its per-row logsumexp (1, L) fp32 when the sampler's fused draw made it (None: the step does)."""

    logits: torch.Tensor
    lse: torch.Tensor | None = None


class StepOut(NamedTuple):
    """What a denoising step gives the sampler. From a graph, these are buffers that the next step
    overwrites: keep a copy of anything kept across steps."""

    values: torch.Tensor  # (1, L, V): proc (fp32), or the raw logits (model dtype) when `process` is set
    argmax: torch.Tensor  # (1, L) int64
    entropy: torch.Tensor  # (1, L) fp32, nats, of softmax(proc)
    lse: torch.Tensor | None  # (1, L) fp32 logsumexp(proc) from the fused head; None: use softmax
    process: tuple | None = None  # (softcap, temperature): the fused head wrote raw logits, not proc

    @property
    def proc(self) -> torch.Tensor:
        """(1, L, V) fp32: processed logits / temperature (made from the raw logits when the fused head
        wrote those: kernels.lm_head.process, the same floats the head would have written)."""
        if self.process is None:
            return self.values
        from kernels.lm_head import process

        return process(self.values, *self.process)

    def probabilities(self) -> torch.Tensor:
        """softmax(proc) (1, L, V) fp32: the reference's own call, or exp(proc - lse) from the fused head."""
        if self.lse is None:
            return torch.softmax(self.proc, dim=-1, dtype=torch.float32)
        return torch.exp(self.proc - self.lse.unsqueeze(-1))

    def sample(self, g: torch.Generator) -> torch.Tensor:
        """One token per position (1, L): what `torch.multinomial(self.probabilities(), 1)` draws
        from g. From the fused head, `kernels.sample` reads the head's output and makes the Exp(1)
        draws in one pass, writing no vocabulary-sized tensor (the same expf and correctly rounded
        division as torch's)."""
        return self.sample_sc(g, None)[0]

    def sample_sc(self, g: torch.Generator, dtype: torch.dtype | None, into: SelfCond | None = None):
        """(`sample(g)`, the next step's SelfCond). Unfused: proc in `dtype` as a new tensor. From the
        fused head: kernels.sample's draw reads the raw logits once and writes proc in `dtype` with
        its logsumexp (into `into`'s buffers when given: a graph's static inputs, which the next step
        then reads in place). dtype None: the tokens only (and None)."""
        if self.lse is None:
            tokens = multinomial(self.probabilities().view(-1, self.values.shape[-1]), g).view(self.argmax.shape)
            return tokens, (None if dtype is None else SelfCond(self.proc.to(dtype)))
        from kernels.sample import sample_sc

        with torch.inference_mode():  # `into`: a graph's buffers, inference tensors, written in place
            tokens, sc, sc_lse = sample_sc(self.values, self.lse, g, dtype, *(into or (None, None)),
                                           process=self.process)
        return tokens, (None if sc is None else SelfCond(sc, sc_lse))


def multinomial(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (..., V): `torch.multinomial(probs, 1)`'s own algorithm (argmax of
    p / E with E ~ Exp(1), the same generator calls), so the same numbers, without its host reads."""
    q = torch.empty_like(probs).exponential_(1, generator=g)
    return torch.div(probs, q, out=q).argmax(dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dim, the same arithmetic as torch.distributions.Categorical."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(logp, dim=-1)
    return -(torch.clamp(logp, min=torch.finfo(logp.dtype).min) * probs).sum(-1)


class Engine:
    def __init__(self, model: DiffusionGemma, sampler_defaults: SamplerSettings | None = None, *,
                 static_cache: bool | None = None, cuda_graphs: bool | None = None, fused_head: bool | None = None,
                 capture=None, bucket: int | None = None):
        """None = the default policy: static cache, CUDA graphs (DG_CUDA_GRAPHS) and the fused head
        (DG_FUSED_HEAD) on CUDA, none of them elsewhere. `capture` replaces the CUDA graph backend
        (tests pass graphs.TracedCapture); `bucket` the graphs' span rounding (graphs.BUCKET)."""
        from . import graphs

        self.model = model
        self.sampler_defaults = sampler_defaults or SamplerSettings()
        cuda = model.device.type == "cuda"
        self.static_cache = cuda if static_cache is None else static_cache
        # The switches are read (and a bad value refused) on every device, used on CUDA only.
        fused_env, graphs_env = flag("DG_FUSED_HEAD", True), flag("DG_CUDA_GRAPHS", True)
        kernels_mode()  # DG_KERNELS too: a bad value fails here, not at the first kernel call
        if fused_head is None:
            fused_head = cuda and fused_env
        self.fused_head = fused_head and model.model.decoder.embed_tokens.head_weight() is not None
        if cuda:  # Triton: one kernel per RMSNorm (with its residual add or RoPE), two for the router, one
            # for each side of a layer's MLPs, one for an int8 MLP's gate, up, gelu and product, and
            # the int8 o_proj reading attention's heads in place
            from kernels import install_fused

            install_fused(model)
        if capture is None and (cuda and graphs_env if cuda_graphs is None else cuda_graphs):
            capture = graphs.CudaCapture()
        self.capture = capture if self.static_cache else None  # graphs need the static cache's fixed buffers
        self.bucket = bucket or (graphs.BUCKET if self.capture is not None else None)
        self._graphed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> GraphedStep
        self._captured_before = 0.0  # capture time of graphs whose caches are gone

    # ---- what the model is ----
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cuda_graphs(self) -> bool:
        return self.capture is not None

    @property
    def capture_seconds(self) -> float:
        """CUDA graph warm-up and capture time so far (reported apart from the steps)."""
        return self._captured_before + sum(g.capture_seconds for g in self._graphed.values())

    def sampler_settings(self, **overrides) -> SamplerSettings:
        """The checkpoint's generation defaults with `overrides` (the reference's names) applied."""
        return self.sampler_defaults.replace(**overrides)

    # ---- what the sampler calls ----
    def new_cache(self, max_tokens: int | None = None, rollback: int = 0) -> KVCache | StaticKVCache:
        """An empty cache of this engine's kind; a static one holds max_tokens (default: the model's context)."""
        return self.model.new_cache(static=self.static_cache, max_tokens=max_tokens, rollback=rollback)

    def prefill(self, ids: torch.Tensor, cache: KVCache | StaticKVCache, images=None) -> None:
        """Encode ids (1, T) after what the cache holds. A static cache takes them in chunks, so the
        pass's temporaries (masks, repeated K/V, fp32 norms) do not grow with the prompt; the
        reference cache takes them in one pass, as the reference does. `images`: the
        dgcli.images.Pixels of the image spans in ids, in order; the vision tower encodes them
        together (one batch, as the reference), and no chunk cuts an image span."""
        chunk = PREFILL_CHUNK if isinstance(cache, StaticKVCache) else ids.shape[1]
        feats, is_image = None, None
        if images:
            pixels = torch.stack([torch.from_numpy(p.pixels) for p in images])
            positions = torch.stack([torch.from_numpy(p.positions) for p in images])
            feats = self.model.image_features(pixels, positions)
            is_image = (ids[0] == self.config.image_token_id).tolist()
            if sum(is_image) != feats.shape[0]:
                raise ValueError(f"{sum(is_image)} image tokens in the prompt for {feats.shape[0]} image features")
        a, used = 0, 0
        while a < ids.shape[1]:
            b = min(a + max(chunk, 1), ids.shape[1])
            if is_image is not None:
                while b < len(is_image) and is_image[b - 1] and is_image[b]:  # finish the image span
                    b += 1
            n = 0 if is_image is None else sum(is_image[a:b])
            if n:
                self.model.encode(ids[:, a:b], cache, image_embeds=feats[used:used + n])
            else:
                self.model.encode(ids[:, a:b], cache)
            a, used = b, used + n

    def commit(self, canvas: torch.Tensor, cache: KVCache | StaticKVCache) -> None:
        """Encode a finished canvas (1, L) into the cache."""
        self.model.encode(canvas, cache)

    def sc_buffers(self, cache, processor=None) -> SelfCond | None:
        """Where the next step (on `cache`, with `processor`) reads its self-conditioning input when it
        replays a graph: the graph's static buffers, for the sampler's draw to write straight into
        (then `step` copies nothing); None when that step runs eagerly."""
        if self.capture is None or processor is not None:
            return None
        graphed = self._graphed.get(cache)
        return None if graphed is None else SelfCond(graphed.sc, graphed.sc_lse)

    @torch.inference_mode()
    def step(self, canvas: torch.Tensor, cache, sc: torch.Tensor | SelfCond | None, temperature: torch.Tensor,
             processor=None) -> StepOut:
        """One denoising step: the decoder pass over canvas (1, L) with self-conditioning sc (the
        previous step's proc in the model dtype, alone or as a SelfCond with its logsumexp; None on a
        canvas's first step), then the statistics at `temperature` (a 0-d fp32 device tensor). A
        logits `processor` must see the logits, so it turns the fused head and the graphs off for
        this step."""
        sc, sc_lse = sc if isinstance(sc, SelfCond) else (sc, None)
        fused = self.fused_head and processor is None
        if self.capture is not None and processor is None and isinstance(cache, StaticKVCache):
            graphed = self._graphed.get(cache)
            if graphed is None:
                from .graphs import GraphedStep

                graphed = self._graphed[cache] = GraphedStep(self, cache, self.capture)
            try:
                return graphed(canvas, sc, temperature, fused, sc_lse)
            except (RuntimeError, NotImplementedError, ValueError) as e:
                # Something in the step cannot be captured (a host sync, an unsupported kernel):
                # say so once and go on eagerly; the results are the same, only slower.
                print(f"dg: CUDA graphs off ({type(e).__name__}: {first_line(e)}); decoding eagerly", file=sys.stderr)
                self._captured_before = self.capture_seconds
                self.capture, self._graphed = None, weakref.WeakKeyDictionary()
        positions = cache.prepare_decode(canvas.shape[1], device=self.device, bucket=self.bucket)
        return self.stats(canvas, cache, sc, temperature, positions, fused, processor, sc_lse=sc_lse)

    @torch.inference_mode()
    def stats(self, canvas, cache, sc, temperature, positions, fused: bool, processor=None,
              out: StepOut | None = None, sc_lse: torch.Tensor | None = None) -> StepOut:
        """The step itself, with the cache already prepared (no host sync: this is what a graph
        captures). With `out`, the results are written into its buffers (out.values: the fused
        head's raw logits in the model dtype, or fp32 proc). `sc_lse`: sc's per-row logsumexp, when
        the sampler made it."""
        model = self.model
        if sc_lse is None:
            hidden = model.decode(canvas, cache, sc, positions)
        else:
            hidden = model.decode(canvas, cache, sc, positions, sc_lse=sc_lse)
        L, V = canvas.shape[1], self.config.vocab_size
        if fused:  # raw logits (half fp32 proc's bytes): the sampler's draw makes proc from them in registers
            from kernels.lm_head import lm_head

            weight, scale = model.model.decoder.embed_tokens.head_weight()
            softcap = self.config.final_logit_softcapping
            head = lm_head(hidden.reshape(L, -1), weight, temperature, softcap, scale,
                           out=None if out is None else out.values.view(L, V), raw=True)
            result = StepOut(head.logits.view(1, L, V), head.argmax.view(1, L), head.entropy.view(1, L),
                             head.lse.view(1, L), (softcap, temperature))
        else:
            logits = model.logits(hidden, out=None if out is None else out.values)
            if processor is not None:
                logits = processor(logits)
            proc = logits.div_(temperature) if out is not None else logits / temperature
            result = StepOut(proc, proc.argmax(dim=-1), entropy(proc), None)
        if out is None:
            return result
        for buf, value in zip(out[1:4], result[1:4]):
            if value is not None:
                buf.copy_(value)
        return out._replace(process=result.process)


def as_engine(model_or_engine) -> Engine:
    """An Engine as given, or one around a plain model with the default policy."""
    return model_or_engine if isinstance(model_or_engine, Engine) else Engine(model_or_engine)
