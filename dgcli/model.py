"""DiffusionGemma (google/diffusiongemma-26B-A4B-it) in plain PyTorch (its vision tower: dgcli/vision.py).

One set of weights run in two modes (reference: transformers 5.23.0 `models/diffusion_gemma`):
- encoder mode: causal over new tokens + the cache; writes K/V into the cache (prompt prefill and
  the commit of a finished canvas);
- decoder mode: bidirectional over the canvas + the whole cache, never writing it; the input is the
  canvas embedding mixed with a self-conditioning signal from the previous step's logits.
Architecture notes (what a re-implementation gets wrong):
- sliding layers (head_dim 256, 8 kv heads, default RoPE θ=1e4) and full layers (head_dim 512,
  2 kv heads, K=V: V is the weightless-RMSNormed raw k_proj output, "proportional" RoPE θ=1e6 with
  only the first 25% of frequency pairs non-zero); attention scaling 1.0, q/k RMSNorm instead;
- every layer runs a dense GeGLU MLP and a routed MoE (128 experts, top-8) in parallel; the router
  reads the un-normed residual; the whole residual is multiplied by `layer_scalar` at the end;
- RMSNorm multiplies by w (not 1+w); the embedding scale sqrt(H) is rounded to the weight dtype;
- tied LM head with a final tanh softcap of 30, computed in the model dtype then cast to fp32.
Module and parameter names mirror the official safetensors keys, so loading is a direct match.
Shapes: B batch, T tokens, L canvas, H hidden, Hq query heads, Hk kv heads, D head dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, StaticKVCache
from .config import FULL, SLIDING, ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm in fp32, `x * (mean(x²)+eps)^-0.5 * w`; some norms have no weight."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)  # pow, as the reference
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)

    # Two uses that a fused kernel does in the same pass (kernels.fused_norms swaps this module on CUDA):
    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The residual add after a sublayer: x + norm(h)."""
        return x + self(h)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The q/k norms: norm(x), then the rotary embedding (x: (B, T, Hx, D))."""
        return apply_rope(self(x), cos, sin)


def rope_inv_freq(config: ModelConfig, layer_type: str, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32. "proportional": only the first partial·D/2 pairs rotate,
    with the exponent divided by the full head dim; the rest have frequency 0 (identity)."""
    p = config.rope_parameters[layer_type]
    base = p["rope_theta"]
    if p.get("rope_type", "default") == "proportional":
        n_rot = int(p.get("partial_rotary_factor", 1.0) * head_dim // 2)
        arange = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float()
        inv = torch.cat([1.0 / (base ** (arange / head_dim)), torch.zeros(head_dim // 2 - n_rot, device="cpu")])
        return inv / p.get("factor", 1.0)
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, D] for absolute positions [T] (non-interleaved: dim i pairs with i+D/2)."""
    f = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, Hx, D); cos/sin: (T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        H, Hq = config.hidden_size, config.num_attention_heads
        self.head_dim = D = config.layer_head_dim[i]
        self.kv_heads = Hk = config.layer_kv_heads[i]
        self.sliding = config.is_sliding(i)
        self.window = config.sliding_window
        self.q_proj = nn.Linear(H, Hq * D, bias=False)
        self.k_proj = nn.Linear(H, Hk * D, bias=False)
        # Full layers have no v_proj: V is the raw k_proj output, normed without weight (K=V).
        self.v_proj = nn.Linear(H, Hk * D, bias=False) if self.sliding else None
        self.o_proj = nn.Linear(Hq * D, H, bias=False)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.v_norm = RMSNorm(D, config.rms_norm_eps, with_scale=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_into=None):
        """q, k, v (B, Hx, T, D). kv_into: the decoder's (keys, values, slots) from
        `cache.canvas_dest`, where a fused replacement may write K/V itself (returning them as None,
        see kernels.fused_attention); this one leaves them to the cache."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_norm.rope(self.q_proj(x).view(B, T, -1, D), cos, sin)
        k_raw = self.k_proj(x).view(B, T, -1, D)
        v = self.v_proj(x).view(B, T, -1, D) if self.v_proj is not None else k_raw
        k = self.k_norm.rope(k_raw, cos, sin)
        v = self.v_norm(v)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, Hx, T, D)

    def forward(self, x, cos, sin, cache: KVCache, i: int, encode: bool, kv_only: bool = False, blocks=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin, kv_into=None if encode else cache.canvas_dest(i))
        window = self.window if self.sliding else None
        if encode:  # the cache stores the new K/V and says what this pass attends to
            k, v, causal, mask = cache.encode_kv(i, k, v, window)
            if blocks is not None:
                mask, causal = with_blocks(mask, causal, blocks, k.shape[-2]), False
            if kv_only:  # the last encoder layer's output is never used, only its K/V
                return None
        else:  # the canvas attends to the cache and itself; the cache keeps nothing of it
            k, v, mask = cache.decode_kv(i, k, v, window)  # k, v None: qkv wrote them into their slots
            causal = False
        return self.project(self.attend(q, k, v, mask, causal))

    def project(self, heads: torch.Tensor) -> torch.Tensor:
        """o_proj over `attend`'s heads, flattened (a copy where SDPA's layout needs one; on CUDA
        kernels.fused_attention reads int8 o_proj's input heads in place)."""
        return self.o_proj(heads.flatten(2))

    def attend(self, q, k, v, mask, causal) -> torch.Tensor:
        """SDPA over (B, Hx, T, D) heads -> the output heads as views of SDPA's output: (B, T, Hq, D),
        or (B, T, Hk, groups, D) where query heads were folded (head h = kv head · groups + g). SDPA's
        output layout is the backend's choice (CUDA's memory-efficient kernel returns a transposed
        view of a [B, T, H, D] buffer), so this never `view`s it: it only splits a dim and permutes."""
        B, Hq, T, D = q.shape
        groups = Hq // k.shape[1]
        if groups > 1 and mask is not None and mask.shape[-2] == 1:
            # A mask over keys only (the static cache's decoder): fold each group of query heads into
            # the query length and attend once per kv head, instead of copying K/V `groups` times.
            # A view where q is head-major (kernels.fused_norms writes it so on CUDA), else a copy.
            y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], groups * T, D), k, v, attn_mask=mask,
                                               scale=1.0)  # (B, Hk, groups·T, D)
            return y.unflatten(2, (groups, T)).permute(0, 3, 1, 2, 4)
        # The same SDPA call as the reference makes, so results agree bit for bit: grouped-query
        # attention inside SDPA only without a mask and for head_dim <= 256, else repeated K/V.
        gqa = groups > 1 and mask is None and k.shape[-1] <= 256
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0, enable_gqa=gqa)
        return y.transpose(1, 2)


VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """Per token (T,): the index of the image span it belongs to (consecutive image tokens), -1 for text."""
    prev = torch.roll(is_image, 1)
    prev[0] = False
    starts = torch.cumsum((is_image & ~prev).int(), 0) - 1
    return torch.where(is_image, starts, -1)


def with_blocks(mask: torch.Tensor | None, causal: bool, blocks: tuple[torch.Tensor, bool], S: int) -> torch.Tensor:
    """The encoder's mask (T, S) for the new tokens, materialized as the reference does under
    use_bidirectional_attention="vision" (text only too), with each image span visible to itself in
    both directions. blocks: (image_blocks of the T new tokens, whether any is an image). The new
    tokens are the last T of the S keys (every cache returns them so)."""
    blocks, any_image = blocks
    T = blocks.shape[0]
    if mask is None:  # a plain causal flag (first prefill) or nothing to hide (one token)
        mask = torch.ones(T, S, dtype=torch.bool, device=blocks.device)
        if causal:
            mask = torch.tril(mask, diagonal=S - T)
    if not any_image:
        return mask
    keys = torch.cat([blocks.new_full((S - T,), -1), blocks])
    return mask | ((blocks[:, None] == keys[None, :]) & (blocks[:, None] >= 0))


class MLP(nn.Module):
    """GeGLU MLP (tanh GELU): the dense branch of every layer, and the self-conditioning MLP."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(self.gated(x))

    def gated(self, x):
        """gelu_tanh(gate(x)) · up(x): one kernel on CUDA for int8 weights (kernels.fused_mlp swaps it)."""
        return F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)


class Router(nn.Module):
    """Expert router: weightless norm -> scale·H^-½ -> project -> softmax -> top-k -> renormalise -> per-expert scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, E = config.hidden_size, config.num_experts
        self.top_k = config.top_k_experts
        self.root_size = H**-0.5
        self.norm = RMSNorm(H, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))

    def forward(self, x: torch.Tensor):
        return self.route(self.inputs(x))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the projection reads: the weightless norm of x, times scale, times H^-½ (each rounded)."""
        return self.norm(x) * self.scale * self.root_size

    def route(self, h: torch.Tensor):
        """`inputs(x)` (T, H) -> (routing weights (T, A) fp32, experts (T, A))."""
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # (T, E)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)  # (T, A)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """Routed experts as fused 3-D tensors, as stored: gate_up [E, 2I, H] (gate rows first), down [E, H, I].

    Reference implementation, the same arithmetic as the reference's default ("grouped_mm"):
    (token, slot) pairs sorted by expert, one grouped matmul per projection, routing weights applied
    per pair, then summed over the slots in fp32. `quant.QuantExperts` replaces this module with
    the same forward signature.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe(x, index, weights, self.gate_up_proj.shape[0], self.grouped_mlp)

    def slots(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` before the slot sum: each (token, slot)'s weighted output (T, A, H), which
        `Layer.mix_out` sums (a fused replacement sums it in the same kernel as the norms after it)."""
        return moe_slots(x, index, weights, self.gate_up_proj.shape[0], self.grouped_mlp)

    def grouped_mlp(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows xs sorted by expert (expert e's rows end at offsets[e]) -> each row's expert GeGLU."""
        gate, up = grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offsets).chunk(2, dim=-1)
        return grouped_mm(F.gelu(gate, approximate="tanh") * up, self.down_proj.transpose(-2, -1), offsets)


def moe(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, num_experts: int, mlp) -> torch.Tensor:
    """The reference's MoE arithmetic around an expert computation `mlp(rows, offsets)`: (token, slot)
    pairs sorted by expert, routing weight applied per pair, slots summed in fp32. x (T, H); index,
    weights (T, A) -> (T, H) in x.dtype. Shared by `Experts`, `quant.QuantExperts` and the kernels'
    reference, so the three differ only in how an expert's weights are read."""
    return sum_slots(moe_slots(x, index, weights, num_experts, mlp), x.dtype)


def sum_slots(slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The experts' output from their per-slot outputs (T, A, H): summed over the slots in fp32, then `dtype`."""
    return slots.sum(dim=1, dtype=torch.float32).to(dtype)


def moe_slots(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, num_experts: int, mlp) -> torch.Tensor:
    """`moe` before the slot sum: (T, A, H), each pair's expert output times its routing weight
    (fp32 when the weights are, as the router's are)."""
    T, H = x.shape
    A = index.shape[1]
    expert, perm = torch.sort(index.reshape(-1))  # (T·A,) grouped by expert
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device)
    counts.index_add_(0, expert, torch.ones_like(expert))  # unlike bincount, no host sync on a GPU
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    y = mlp(x[perm // A], offsets)
    y = y * weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inverse].view(T, A, H)


_grouped_mm_ok = True


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by group, group g ending at offsets[g]) times w[g] (G, K, N) -> (rows, N)."""
    global _grouped_mm_ok
    if _grouped_mm_ok and hasattr(F, "grouped_mm") and (x.device.type == "cpu" or w.dtype == torch.bfloat16):
        try:
            return F.grouped_mm(x.to(w.dtype), w, offs=offsets)
        except RuntimeError:  # e.g. a GPU generation the fused kernel does not support
            _grouped_mm_ok = False
    out = x.new_empty(x.shape[0], w.shape[-1], dtype=w.dtype)
    x = x.to(w.dtype)
    start = 0
    for g, end in enumerate(offsets.tolist()):  # fallback: one matmul per non-empty group
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, i: int):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, i)
        self.mlp = MLP(H, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)  # dense branch in
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)  # dense branch out
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)  # experts in
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)  # experts out
        self.post_feedforward_layernorm = RMSNorm(H, eps)  # both branches, summed
        self.register_buffer("layer_scalar", torch.ones(1))  # the decoder's copy

    def forward(self, x, cos, sin, cache, i, encode, scalar, kv_only=False, blocks=None, normed=None,
                next_norm=None):
        """-> (the new residual, next_norm of it or None). normed: input_layernorm(x) when the layer
        before made it; next_norm: the norm that reads this layer's output (the next layer's input
        norm, or the final one), applied in mix_out, where a fused kernel has the row at hand."""
        h = self.self_attn(self.input_layernorm(x) if normed is None else normed, cos, sin, cache, i, encode,
                           kv_only, blocks)
        if kv_only:
            return None, None
        x, dense_in, experts_in, router_in = self.mix_in(x, h)
        H = x.shape[-1]
        weights, index = self.router.route(router_in.reshape(-1, H))  # routes on the raw residual
        slots = self.experts.slots(experts_in.reshape(-1, H), index, weights)  # (B·T, A, H)
        return self.mix_out(x, self.mlp(dense_in), slots, scalar, next_norm)

    # The glue between the matmuls, as two methods that a fused kernel each does in one pass over a
    # row (kernels.fused_mix swaps them on CUDA):
    def mix_in(self, x: torch.Tensor, h: torch.Tensor):
        """The attention output h into the residual, and the three inputs read from it:
        (x + norm(h), the dense MLP's input, the experts' input, the router's input)."""
        x = self.post_attention_layernorm.add_to(x, h)
        return x, self.pre_feedforward_layernorm(x), self.pre_feedforward_layernorm_2(x), self.router.inputs(x)

    def mix_out(self, x: torch.Tensor, dense: torch.Tensor, slots: torch.Tensor, scalar: torch.Tensor,
                next_norm: RMSNorm | None = None):
        """Both branches back into the residual: the experts' slots (B·T, A, H) summed in fp32, each
        branch normed, their sum normed and added to x, all times the layer scalar.
        -> (that new residual, next_norm of it or None)."""
        moe = self.post_feedforward_layernorm_2(sum_slots(slots, x.dtype).reshape(x.shape))
        x = self.post_feedforward_layernorm.add_to(x, self.post_feedforward_layernorm_1(dense) + moe)
        x = x * scalar
        return x, (next_norm(x) if next_norm is not None else None)


class Embedding(nn.Module):
    """The tied embedding: input lookup (scaled by sqrt(H) rounded to the weight dtype), LM head, and
    the self-conditioning soft embedding. A quantized replacement implements the same three methods."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))
        self.scale = hidden**0.5

    def embed_scale(self) -> torch.Tensor:
        return torch.tensor(self.scale).to(self.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) * self.embed_scale()

    def soft(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, L, V) in the weight dtype -> (B, L, H), scaled like a lookup."""
        return torch.matmul(probs, self.weight) * self.embed_scale()

    def soft_logits(self, sc_logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
        """The self-conditioning input from logits (B, L, V): their fp32 softmax rounded to the weight
        (model) dtype, then `soft`. A quantized replacement may fuse the two (no probabilities written)
        and use `lse` (B, L), the logits' logsumexp when the sampler made it; this one ignores it."""
        return self.soft(F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(self.weight.dtype))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight [V, H], per-row scale or None) for kernels.lm_head; None if it cannot read this one."""
        return self.weight, None


class SelfConditioning(nn.Module):
    """Mixes the previous step's soft prediction into the canvas embedding: post_norm(e + MLP(pre_norm(soft))).
    The MLP's projections are this module's own (as the checkpoint names them); `gated` is MLP's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.pre_norm = RMSNorm(H, eps)
        self.post_norm = RMSNorm(H, eps, with_scale=False)
        self.gate_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, H, bias=False)

    gated = MLP.gated

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        signal = self.down_proj(self.gated(self.pre_norm(soft)))
        return self.post_norm(embeds + signal)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)


class ScalarHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("layer_scalar", torch.ones(1))


class EncoderText(nn.Module):
    """The encoder shares every weight with the decoder except `layer_scalar`, stored once per side."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(ScalarHolder() for _ in range(config.num_hidden_layers))


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig, vision: bool = True):
        super().__init__()
        self.language_model = EncoderText(config)
        if vision and config.vision_config is not None:  # the image encoder (dgcli/vision.py)
            from .vision import MultimodalEmbedder, VisionConfig, VisionTower

            vc = VisionConfig.from_dict(config.vision_config)
            self.vision_tower = VisionTower(vc)
            self.embed_vision = MultimodalEmbedder(vc, config.hidden_size)


class Inner(nn.Module):
    def __init__(self, config: ModelConfig, vision: bool = True):
        super().__init__()
        self.encoder = Encoder(config, vision)
        self.decoder = Decoder(config)


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig, vision: bool = True):
        """vision=False leaves the checkpoint's vision tower out (text-only use)."""
        super().__init__()
        self.config = config
        self.model = Inner(config, vision)
        D = {t: config.layer_head_dim[config.layer_types.index(t)] for t in set(config.layer_types)}
        self.inv_freq = {t: rope_inv_freq(config, t, D[t]) for t in (SLIDING, FULL) if t in D}
        self._inv_freq_on: dict[torch.device, dict] = {}  # copies per device: no upload per call

    @property
    def dtype(self) -> torch.dtype:
        return self.model.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.decoder.embed_tokens.weight.device

    @property
    def has_vision(self) -> bool:
        return hasattr(self.model.encoder, "vision_tower")

    def parameter_counts(self) -> dict[str, int]:
        """Text parameters in total, and active per token (all but the unrouted experts' share);
        `vision`: the vision tower's and projection's (counted in neither)."""
        vision = sum(p.numel() for n, p in self.named_parameters() if n.startswith(VISION_PREFIXES))
        total = sum(p.numel() for p in self.parameters()) - vision
        experts = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
        c = self.config
        return {"total": total, "active": total - experts + experts * c.top_k_experts // c.num_experts,
                "vision": vision}

    def new_cache(self, static: bool = False, max_tokens: int | None = None,
                  rollback: int = 0) -> KVCache | StaticKVCache:
        """The reference's cache, or (static=True) preallocated buffers for max_tokens that the
        decoder writes its canvas into instead of concatenating (see dgcli/cache.py)."""
        if not static:
            return KVCache(self.config)
        return StaticKVCache(self.config, max_tokens or self.config.max_position_embeddings, self.device, self.dtype,
                             rollback)

    def _rope(self, pos: torch.Tensor, dtype):
        """cos, sin per layer type for positions pos [T] (a device tensor: graph-capturable)."""
        if pos.device not in self._inv_freq_on:
            self._inv_freq_on[pos.device] = {t: f.to(pos.device) for t, f in self.inv_freq.items()}
        return {t: rope_cos_sin(f, pos, dtype) for t, f in self._inv_freq_on[pos.device].items()}

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Patches of a batch of images (dgcli/images.py) -> their soft tokens (n, H) in the text space."""
        enc = self.model.encoder
        return enc.embed_vision(enc.vision_tower(pixels.to(self.device), positions.to(self.device)))

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, cache: KVCache, image_embeds: torch.Tensor | None = None) -> None:
        """Encoder mode: run ids (B, T) causally at positions cache.length.. and append their K/V.
        image_embeds (n, H): the soft tokens of the images whose n placeholders (image_token_id) are in
        ids, in order; they replace those positions' embeddings."""
        dec = self.model.decoder
        x = dec.embed_tokens(ids)
        blocks = None
        image_id = self.config.image_token_id
        if self.config.bidirectional_vision:  # each image's tokens see each other (the reference's rule)
            is_image = ids[0] == image_id if image_id is not None else torch.zeros_like(ids[0], dtype=torch.bool)
            blocks = (image_blocks(is_image), image_embeds is not None)
        if image_embeds is not None:
            spots = (ids == image_id).unsqueeze(-1)
            x = x.masked_scatter(spots, image_embeds.to(x.device, x.dtype))
        rope = self._rope(torch.arange(cache.length, cache.length + ids.shape[1], device=self.device), x.dtype)
        scalars = self.model.encoder.language_model.layers
        last = len(dec.layers) - 1
        normed = None
        for i, layer in enumerate(dec.layers):
            cos, sin = rope[self.config.layer_types[i]]
            x, normed = layer(x, cos, sin, cache, i, True, scalars[i].layer_scalar, kv_only=i == last, blocks=blocks,
                              normed=normed, next_norm=dec.layers[i + 1].input_layernorm if i < last else None)
        cache.length += ids.shape[1]

    @torch.inference_mode()
    def decode(self, canvas: torch.Tensor, cache: KVCache | StaticKVCache, sc_logits: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, sc_lse: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mode: canvas (B, L) -> final-normed hidden states (B, L, H); the cache is only read.

        sc_logits: the previous step's processed logits (B, L, V) in the model dtype, or None on a
        canvas's first step (a zero self-conditioning signal). positions: the canvas positions as
        `cache.prepare_decode` returned them (a device tensor: no host sync, so the pass can be
        captured as a CUDA graph); None prepares the cache here. sc_lse: sc_logits' per-row logsumexp
        (B, L) fp32 when the sampler made it, for the soft embedding (Embedding.soft_logits)."""
        if positions is None:
            positions = cache.prepare_decode(canvas.shape[1], device=self.device)
        dec = self.model.decoder
        emb = dec.embed_tokens
        x = emb(canvas)
        if sc_logits is None:
            soft = torch.zeros_like(x)
        else:
            soft = emb.soft_logits(sc_logits) if sc_lse is None else emb.soft_logits(sc_logits, sc_lse)
        x = dec.self_conditioning(x, soft)
        rope = self._rope(positions, x.dtype)
        normed = None
        for i, layer in enumerate(dec.layers):
            cos, sin = rope[self.config.layer_types[i]]
            next_norm = dec.layers[i + 1].input_layernorm if i + 1 < len(dec.layers) else dec.norm
            x, normed = layer(x, cos, sin, cache, i, False, layer.layer_scalar, normed=normed, next_norm=next_norm)
        return normed  # dec.norm(x), made by the last layer

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tied LM head: hidden (B, L, H) -> tanh-softcapped logits (B, L, V) in fp32 (into `out`)."""
        cap = self.config.final_logit_softcapping
        logits = self.model.decoder.embed_tokens.head(hidden).float()
        return torch.mul(torch.tanh(logits / cap), cap, out=out)
