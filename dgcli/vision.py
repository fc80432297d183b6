"""The checkpoint's Gemma-4 vision tower in plain PyTorch (reference: transformers 5.23.0
`models/gemma4/modeling_gemma4.py`, Gemma4VisionModel + Gemma4MultimodalEmbedder).

Image patches (from dgcli/images.py: every image padded to `max_patches` rows of 3·p² pixels,
with (x, y) patch positions, (-1, -1) for padding) -> soft tokens in the text model's space:
- patch embedder: 2·(pixels − ½) -> linear, plus a learned 2-D position table (x row + y row);
- encoder layers: bidirectional attention over the image's patches (padding masked as keys),
  q/k RMSNorm, weightless v norm, attention scale 1, axial RoPE (the first half of each head
  rotates with x, the second with y); GeGLU MLP; "sandwich" norms around both;
  the linears clamp their inputs and outputs when the config asks (`use_clipped_linears`);
- pooling: the mean of each k×k block of patches (k = pooling_kernel_size), times sqrt(hidden),
  padding dropped, optionally standardized (std_bias, std_scale);
- `embed_vision`: weightless RMSNorm, then a projection to the text hidden size.
Module names are the checkpoint's keys under `model.encoder.vision_tower.` / `model.encoder.embed_vision.`.
The calls are the reference's own (same padding, masks, shapes), so features agree bit for bit on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """From config.json's `vision_config` (the reference's defaults for absent fields)."""
        if not isinstance(d, dict):
            raise ConfigError("config.json: 'vision_config' must be an object")
        if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(f"config.json: vision hidden_activation {d['hidden_activation']!r} is not supported")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"config.json: vision rope_type {rope['rope_type']!r} is not supported (axial only)")
        c = cls()
        kw = {}
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "pooling_kernel_size", "patch_size",
                     "position_embedding_size"):
            v = d.get(name, getattr(c, name))
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1 << 20:
                raise ConfigError(f"config.json: vision_config.{name} must be a positive integer, got {v!r}")
            kw[name] = v
        if kw["num_attention_heads"] % kw["num_key_value_heads"]:
            raise ConfigError("config.json: vision_config.num_key_value_heads must divide num_attention_heads")
        if kw["head_dim"] % 4:
            raise ConfigError("config.json: vision_config.head_dim must be a multiple of 4 (2-D RoPE)")
        return cls(**kw, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   rope_theta=float(rope.get("rope_theta", 100.0)),
                   use_clipped_linears=bool(d.get("use_clipped_linears", False)),
                   standardize=bool(d.get("standardize", False)))


class RMSNorm(nn.Module):
    """Gemma's RMSNorm in fp32 (the text model's arithmetic): x·(mean(x²)+eps)^-½·w. A class of its
    own: kernels.fused_norms swaps the text model's RMSNorm for Triton kernels on CUDA, and the
    tower's shapes (head dim 72) have not been tried with them."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


class ClippableLinear(nn.Module):
    """A bias-free linear (`.linear`), with its input and output clamped to stored bounds when clipped."""

    def __init__(self, config: VisionConfig, n_in: int, n_out: int):
        super().__init__()
        self.clipped = config.use_clipped_linears
        self.linear = nn.Linear(n_in, n_out, bias=False)
        if self.clipped:
            for name, v in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.tensor(v * float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        pixels = 2 * (pixels - 0.5)  # trained on [-1, 1]
        h = self.input_proj(pixels.to(self.input_proj.weight.dtype))
        pos = positions.clamp(min=0)  # padding (-1) looks up row 0, then is zeroed
        table = self.position_embedding_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        return h + torch.where(padding.unsqueeze(-1), 0.0, pe)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.head_dim, self.groups = D, config.num_attention_heads // config.num_key_value_heads
        self.q_proj = ClippableLinear(config, H, config.num_attention_heads * D)
        self.k_proj = ClippableLinear(config, H, config.num_key_value_heads * D)
        self.v_proj = ClippableLinear(config, H, config.num_key_value_heads * D)
        self.o_proj = ClippableLinear(config, config.num_attention_heads * D, H)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.v_norm = RMSNorm(D, config.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, mask):
        B, N, _ = x.shape
        D = self.head_dim
        q = axial_rope(self.q_norm(self.q_proj(x).view(B, N, -1, D)), cos, sin).transpose(1, 2)
        k = axial_rope(self.k_norm(self.k_proj(x).view(B, N, -1, D)), cos, sin).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(B, N, -1, D)).transpose(1, 2)
        gqa = self.groups > 1 and mask is None and D <= 256  # the reference's SDPA call
        if self.groups > 1 and not gqa:
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = ClippableLinear(config, H, I)
        self.up_proj = ClippableLinear(config, H, I)
        self.down_proj = ClippableLinear(config, I, H)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, Hx, D): the first half of D rotates with the x position, the second with y, each
    half as a standard non-interleaved RoPE; cos/sin (B, N, D)."""
    half = x.shape[-1] // 2
    out = []
    for part, c, s in zip(x.split(half, -1), cos.split(half, -1), sin.split(half, -1)):
        c, s = c.unsqueeze(2), s.unsqueeze(2)
        a, b = part[..., : half // 2], part[..., half // 2:]
        out.append(part * c + torch.cat((-b, a), dim=-1) * s)
    return torch.cat(out, dim=-1)


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class VisionTower(nn.Module):
    """`model.encoder.vision_tower`: patches -> pooled soft tokens (vision hidden size)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = Encoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))
        D = config.head_dim // 2
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float, device="cpu") / D))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pixels (B, P, 3·p²) in [0, 1], positions (B, P, 2) -> soft tokens (n, H) of every image in
        order, padding dropped (P = max_patches; each image gives its valid patches / k² tokens)."""
        k = self.config.pooling_kernel_size
        out_len = pixels.shape[-2] // (k * k)
        padding = (positions == -1).all(dim=-1)  # (B, P)
        x = self.patch_embedder(pixels, positions, padding)
        # Padding patches are masked as keys; with none, no mask at all (as the reference).
        mask = None if not bool(padding.any()) else (~padding)[:, None, None, :].expand(-1, 1, x.shape[1], -1)
        f = positions[..., None].float() * self.inv_freq.to(x.device)  # (B, P, 2, D/4)
        cos, sin = f.cos() * 1.0, f.sin() * 1.0
        cos = torch.cat([cos[:, :, 0], cos[:, :, 0], cos[:, :, 1], cos[:, :, 1]], dim=-1).to(x.dtype)
        sin = torch.cat([sin[:, :, 0], sin[:, :, 0], sin[:, :, 1], sin[:, :, 1]], dim=-1).to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, mask)
        h, keep = pool(x.masked_fill(padding.unsqueeze(-1), 0.0), positions, padding, out_len)
        h = h.float() * self.config.hidden_size**0.5
        h = h[keep]
        if self.config.standardize:
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(x.dtype)


def pool(h: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor, length: int):
    """Mean over each k×k block of patches by position -> (B, length, H) and which outputs are real."""
    if h.shape[1] == length:
        return h, ~padding
    k = int((h.shape[1] // length) ** 0.5)
    pos = positions.clamp(min=0)
    width = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1
    idx = torch.div(pos, k, rounding_mode="floor")
    idx = idx[..., 0] + (width // k) * idx[..., 1]
    weights = F.one_hot(idx.long(), length).float() / (k * k)
    out = weights.transpose(1, 2) @ h.float()
    return out.to(h.dtype), torch.logical_not((weights == 0).all(dim=1))


class MultimodalEmbedder(nn.Module):
    """`model.encoder.embed_vision`: weightless RMSNorm, then a projection into the text hidden size."""

    def __init__(self, config: VisionConfig, text_hidden: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
