"""A tiny random DiffusionGemma checkpoint WITH a vision tower, and the reference's processor for it
(transformers 5.23.0), for the image parity tests.

Three snags of the reference, worked around here (issue 16's notes): its image processor accepts only
max_soft_tokens in {70, 140, 280, 560, 1120}; `Gemma4Processor` insists on an audio feature extractor
and a video processor (we pass None and relax `check_argument_for_proper_class`); and its input check
raises unless the tokenizer defines audio tokens too (so they are in `extra_special_tokens`).
"""

from __future__ import annotations

import json

import numpy as np
import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import (  # noqa: E402
    DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4ImageProcessorPil, Gemma4Processor,
    PreTrainedTokenizerFast,
)
from transformers.processing_utils import ProcessorMixin  # noqa: E402

from dgcli import tiny  # noqa: E402

S, F = "sliding_attention", "full_attention"
MEDIA = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>",
         "boa_token": "<|audio>", "audio_token": "<|audio|>", "eoa_token": "<audio|>"}
VIDEO = "<|video|>"  # Gemma4Processor adds it to the tokenizer: here from the start, so the vocabulary stays put
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '\\n\\n<|image|>\\n\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}"
    "{% if not enable_thinking %}{{ '<|channel>thought\\n<channel|>' }}{% endif %}"
    "{% endif %}"
)
PATCH, POOL, SOFT_TOKENS = 4, 2, 70  # 280 patches of 4x4 pixels, pooled 2x2: at most 70 tokens an image


def build_tokenizer():
    from tokenizers import AddedToken

    tok = tiny.build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*MEDIA.values(), VIDEO]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=dict(MEDIA))


def build_processor(tokenizer=None):
    tokenizer = tokenizer or build_tokenizer()
    images = Gemma4ImageProcessorPil(patch_size=PATCH, pooling_kernel_size=POOL, max_soft_tokens=SOFT_TOKENS)
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return Gemma4Processor(feature_extractor=None, image_processor=images, tokenizer=tokenizer,
                               video_processor=None, chat_template=CHAT_TEMPLATE, image_seq_length=SOFT_TOKENS)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def reference_config(tokenizer, clipped: bool = False, kv_heads: int = 2) -> DiffusionGemmaConfig:
    ids = {k: tokenizer.convert_tokens_to_ids(MEDIA[k]) for k in ("image_token", "boi_token", "eoi_token")}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                num_global_key_value_heads=1, sliding_window=16, layer_types=[S, F, S, F], num_experts=4,
                top_k_experts=2, moe_intermediate_size=16, max_position_embeddings=4096,
                use_bidirectional_attention="vision")
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, patch_size=PATCH,
                  pooling_kernel_size=POOL, position_embedding_size=160, standardize=True,
                  use_clipped_linears=clipped)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=8,
                                image_token_id=ids["image_token"], boi_token_id=ids["boi_token"],
                                eoi_token_id=ids["eoi_token"])


def build_reference(seed: int = 0, clipped: bool = False, kv_heads: int = 2, tokenizer=None):
    """A random tiny reference with vision (eval, fp32): every weight random, including the vision
    norms, position table and standardization; the projection into the text model scaled up so
    that an image visibly changes the answer."""
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(reference_config(tokenizer, clipped, kv_heads)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("router.scale") or "per_expert_scale" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding_table"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        model.model.encoder.embed_vision.embedding_projection.weight.mul_(4.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=g))
            elif name.endswith("std_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith(("input_min", "output_min")):
                b.fill_(-2.0)  # bounds that bite: clamping shows if it is skipped
            elif name.endswith(("input_max", "output_max")):
                b.fill_(2.0)
    return model, tokenizer


def save(model, tokenizer, processor, path, eos=(1, 5), pad=0):
    """The official layout: weights, config, generation config, tokenizer, processor configs."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    model.generation_config = DiffusionGemmaGenerationConfig(eos_token_id=list(eos), pad_token_id=pad)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"image_seq_length": SOFT_TOKENS,
                                                            "processor_class": "Gemma4Processor"}))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def picture(w: int, h: int, seed: int, mode: str = "RGB"):
    """A random-noise PIL image (smooth enough that resizing matters)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 3, 1), max(w // 3, 1), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    return img.convert(mode)
