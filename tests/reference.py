"""Tiny DiffusionGemma checkpoints built with the transformers reference, for parity tests.

Every weight is random, including norm weights, router scales and the per-side layer scalars
(which the reference initialises to ones and would otherwise hide mistakes).
"""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: E402

S, F = "sliding_attention", "full_attention"

# Several shapes: sliding and full layers, GQA groups of 2 and 4, a window smaller than the prompts.
CONFIGS = {
    "small": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                  num_global_key_value_heads=1, sliding_window=8, layer_types=[S, S, F, S, S, F],
                  num_experts=4, top_k_experts=2, moe_intermediate_size=16, canvas_length=8),
    "wide": dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=16, global_head_dim=32,
                 num_global_key_value_heads=2, sliding_window=6, layer_types=[S, F, S, F],
                 num_experts=6, top_k_experts=3, moe_intermediate_size=8, canvas_length=12),
}


def reference_config(text_config: dict, max_positions: int = 4096) -> DiffusionGemmaConfig:
    """The reference's config for a text config that also holds canvas_length (as CONFIGS do), with
    a tiny vision tower (dg has none). scripts/bench.py builds its reference with it too."""
    tc = dict(text_config)
    canvas = tc.pop("canvas_length")
    tc.setdefault("max_position_embeddings", max_positions)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    return DiffusionGemmaConfig(text_config=tc, vision_config=vision, canvas_length=canvas)


def build_reference(name: str = "small", seed: int = 0, dtype=torch.float32):
    """A random tiny reference model (eval mode)."""
    config = reference_config(CONFIGS[name])
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "vision" in name_:
                continue
            if name_.endswith("norm.weight") or name_.endswith("router.scale") or "per_expert_scale" in name_:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name_, b in model.named_buffers():
            if name_.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))
    return model.to(dtype)


def save_reference(model, path, eos=(1, 5), pad=0):
    """Save in the official layout, with a generation_config.json that sets EOS and pad ids."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    model.generation_config = DiffusionGemmaGenerationConfig(eos_token_id=list(eos), pad_token_id=pad)
    model.save_pretrained(path)
    return path
