"""The built-in `tiny` model: a deterministic random-init DiffusionGemma of a few hundred KB.

It lets anyone run the whole program (canvas included) on a laptop without a GPU or a download.
It is written on first use into dg's data directory in the official checkpoint layout (config.json,
generation_config.json, tokenizer.json, chat template, model.safetensors) and then loaded through the
normal loader, so it exercises the same code as the real model. Its tokenizer is a small English
word-piece vocabulary, so its (meaningless) output reads as words. Embeddings are large enough that
the random model is confident, so blocks stop early and commit in bursts like the real model's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import FULL, SLIDING, ModelConfig

NAME = "tiny"
VERSION = 1  # bump when the generated files change, so old copies are not reused

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
EOS_IDS = [1, 5]  # <eos>, <turn|>

WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among diffusion canvas token gemma noise denoise block step
""".split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"-()")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ message['content'] | trim }}{{ '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}"
    "{% if not enable_thinking %}{{ '<|channel>thought\\n<channel|>' }}{% endif %}"
    "{% endif %}"
)


def vocabulary() -> list[str]:
    words = list(dict.fromkeys(WORDS))
    pieces = CHARS + ["##" + c for c in CHARS]
    return SPECIALS + words + [p for p in pieces if p not in words]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def config_dict(vocab_size: int) -> dict:
    """Official layout: a top-level config with `text_config`, global attention fields as released."""
    text = dict(
        model_type="diffusion_gemma_text", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, sliding_window=128, layer_types=[SLIDING, SLIDING, FULL] * 2,
        num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=8192,
        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1,
        bos_token_id=2, tie_word_embeddings=True,
    )
    return dict(architectures=["DiffusionGemmaForBlockDiffusion"], model_type="diffusion_gemma",
                canvas_length=256, eos_token_id=EOS_IDS, tie_word_embeddings=True, dtype="float32",
                text_config=text)


GENERATION_CONFIG = dict(
    max_new_tokens=256, max_denoising_steps=48, sampler_config={"_cls_name": "EntropyBoundSamplerConfig",
                                                                "entropy_bound": 0.1},
    t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
    eos_token_id=EOS_IDS, pad_token_id=0,
)


def random_weights(config: ModelConfig, seed: int = 0) -> dict:
    import torch

    from .model import DiffusionGemma

    g = torch.Generator().manual_seed(seed)
    model = DiffusionGemma(config)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("embed_tokens.weight"):
            # Unit-variance rows make the head confident: blocks settle in a few steps.
            v = torch.randn(t.shape, generator=g)
            v[EOS_IDS] *= 0.8  # a little less likely to end at once
        elif t.dim() >= 2:
            v = torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5
        elif name.endswith("layer_scalar"):
            v = torch.ones(t.shape)
        else:  # norm weights and router scales
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        out[name] = v.contiguous()
    return out


def write(dest: Path) -> None:
    """Write the tiny checkpoint into `dest` (which must not exist)."""
    from safetensors.torch import save_file

    tok = build_tokenizer()
    cfg = config_dict(tok.get_vocab_size(with_added_tokens=True))
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
    (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    save_file(random_weights(ModelConfig.from_dict(cfg)), str(dest / "model.safetensors"), metadata={"format": "pt"})


def ensure(models_dir: Path) -> Path:
    """Path of the tiny checkpoint under models_dir, writing it atomically on first use."""
    final = models_dir / f"{NAME}-v{VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    # named as store.sweep_stale expects, so a copy cut short by SIGKILL is swept later
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=models_dir))
    try:
        write(tmp / "ckpt")
        try:
            os.rename(tmp / "ckpt", final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not just another process winning the race
                from .errors import CheckpointError

                raise CheckpointError(f"{final} is an incomplete copy of tiny: run `dg rm tiny`, then retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
