"""The released checkpoint's config.json (google/diffusiongemma-26B-A4B-it), as published.

Used where dg must reason about the real model without its weights: the conformance test, the VRAM
planner and the full-size benchmark (built on the `meta` device or with random weights).
This is the one copy in the repository: import it, and deep-copy it before changing anything in it.
"""

_S, _F = "sliding_attention", "full_attention"

DIFFUSIONGEMMA_26B_A4B = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "model_type": "diffusion_gemma",
    "canvas_length": 256,
    "boi_token_id": 255999,
    "eoi_token_id": 258882,
    "image_token_id": 258880,
    "eos_token_id": [1, 106],
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "vocab_size": 262144,
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "num_hidden_layers": 30,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 2,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-06,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": 1024,
        "layer_types": ([_S] * 5 + [_F]) * 5,
        "use_bidirectional_attention": "vision",
        "num_experts": 128,
        "top_k_experts": 8,
        "moe_intermediate_size": 704,
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 72,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "standardize": True,
        "use_clipped_linears": False,
    },
}

DIFFUSIONGEMMA_26B_A4B_GENERATION = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
}


def text_config() -> dict:
    """A fresh flat copy of the text config with `canvas_length`, the form the benchmarks' presets
    override field by field (the top level's EOS list is not in it: the text config's own id is)."""
    import copy

    top = DIFFUSIONGEMMA_26B_A4B
    return {**copy.deepcopy(top["text_config"]), "canvas_length": top["canvas_length"]}
