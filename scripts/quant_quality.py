"""How much quantization changes the decoder: KL, top-1 agreement and steps per block, per scheme.

    python scripts/quant_quality.py                       # random-init model of reduced width (CPU)
    python scripts/quant_quality.py --model DIR --device cuda --dtype bfloat16   # a real checkpoint

1. The reference (fp32 by default) samples a few blocks for each prompt through
   `dgcli.sampler.denoise`; every decoder call is recorded: the canvas it saw (noisy at early
   steps, nearly clean at the end; the canvases StepEvent.canvas reports), the self-conditioning
   logits it got, and its logits.
2. Each quantized model replays those trajectories teacher-forced: it encodes the same prefix
   into its own cache and decodes the same canvases with the same self-conditioning input.
   Per position: KL(reference || quantized) of the softmax of the logits, and whether the
   argmax agrees.
   Also: how often the sampler's accept decision (entropy bound at that step's temperature) agrees.
3. Each model also samples freely with the same seeds: mean denoising steps per block. (A random
   model never settles, so every block runs to the step cap: this one needs a real checkpoint.)
A "bf16 weights" row (the reference rounded to bf16) gives the scale: trained models tolerate it.
Writes JSON (--json) and prints a table. The random model is built with realistic-ish widths
(hidden 512, 4 layers, 16 experts of 128, vocab 4096) in the official safetensors layout.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgcli.config import FULL, SLIDING, ModelConfig, SamplerSettings  # noqa: E402
from dgcli.loader import load_model, load_sampler_defaults  # noqa: E402
from dgcli.events import BlockEvent, StepEvent  # noqa: E402
from dgcli.sampler import accept_mask, denoise, entropy  # noqa: E402
from quant.convert import quantize_checkpoint  # noqa: E402
from quant.runtime import prepare_quantized  # noqa: E402

VARIANTS = {  # name -> (scheme, budget): no budget = the scheme's smallest formats
    "int4 (S3: experts int4 sym, dense+emb int8)": ("int4", None),
    "int4-asym (experts int4 asym, dense+emb int8)": ("int4-asym", None),
    "nf4 (S6: experts int4 sym, dense NF4, emb int8)": ("nf4", None),
    "experts int4 sym only (S1: dense+emb bf16)": ("int4", 10**15),
}


def random_config(hidden=512, layers=4, experts=16, moe=128, vocab=4096, canvas=256) -> dict:
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * moe * 2, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                num_global_key_value_heads=1, sliding_window=256, layer_types=[SLIDING] * (layers - 1) + [FULL],
                num_experts=experts, top_k_experts=4, moe_intermediate_size=moe, max_position_embeddings=8192,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return dict(architectures=["DiffusionGemmaForBlockDiffusion"], model_type="diffusion_gemma",
                canvas_length=canvas, eos_token_id=[1], dtype="float32", text_config=text)


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled like a trained model's where it matters: logits with std ~4, q/k norms
    giving attention logits of std ~1, a router that prefers some experts, and layers that write
    more than the embedding into the residual (so the model does not simply copy its input)."""
    from dgcli.model import DiffusionGemma

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiffusionGemma(config).state_dict().items()}
    H = config.hidden_size
    out = {}
    for k, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if k.endswith("embed_tokens.weight"):
            v = noise * 4.0 / H**0.5
        elif k.endswith("router.proj.weight"):
            v = noise * 2.0
        elif len(shape) >= 2:
            v = noise * shape[-1] ** -0.5
        elif k.endswith("layer_scalar"):
            v = torch.ones(shape)
        elif k.endswith(("q_norm.weight", "k_norm.weight")):
            v = shape[0] ** -0.25 * (1 + 0.1 * noise)
        elif k.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            v = 3.0 * (1 + 0.1 * noise)
        else:
            v = 1.0 + 0.1 * noise
        out[k] = v.contiguous()
    return out


def write_random_checkpoint(dest: Path, seed: int) -> Path:
    cfg = random_config()
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    save_file(random_weights(ModelConfig.from_dict(cfg), seed), str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest


class Recorder:
    """Wraps a model for `denoise`, recording each new cache, encode (ids) and decode (canvas, sc, logits)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self, *args, **kwargs):
        self.calls.append(("new_cache", args, kwargs))
        return self.model.new_cache(*args, **kwargs)

    def encode(self, ids, cache):
        self.calls.append(("encode", ids.clone()))
        return self.model.encode(ids, cache)

    def decode(self, canvas, cache, sc_logits=None, positions=None, sc_lse=None):
        self.seen = (canvas.clone(), None if sc_logits is None else sc_logits.clone())
        return self.model.decode(canvas, cache, sc_logits, positions, sc_lse=sc_lse)

    def logits(self, hidden, out=None):
        logits = self.model.logits(hidden, out=out)
        self.calls.append(("decode", *self.seen, logits.float().cpu()))
        return logits


def replay(model, calls, temps, bound) -> dict:
    """Teacher-forced replay: per-position KL(ref || model), argmax agreement, and agreement of the
    sampler's accept decisions (entropy bound on the step's temperature-scaled logits)."""
    cache = None
    kls, agree, accept = [], [], []
    temps = iter(temps)
    for call in calls:
        if call[0] == "new_cache":  # a new prompt
            cache = model.new_cache(*call[1], **call[2])
            continue
        if call[0] == "encode":
            model.encode(call[1], cache)
            continue
        _, canvas, sc, ref = call
        logits = model.logits(model.decode(canvas, cache, None if sc is None else sc.to(model.dtype))).float().cpu()
        p_ref, p_q = ref.log_softmax(-1), logits.log_softmax(-1)
        kls.append((p_ref.exp() * (p_ref - p_q)).sum(-1).flatten())
        agree.append((ref.argmax(-1) == logits.argmax(-1)).flatten())
        t = next(temps)
        a_ref, a_q = (accept_mask(entropy(x / t), bound) for x in (ref, logits))
        accept.append((a_ref == a_q).flatten())
    kl, ag, ac = torch.cat(kls).clamp(min=0), torch.cat(agree).float(), torch.cat(accept).float()
    return {"kl_mean": kl.mean().item(), "kl_p50": kl.quantile(0.5).item(), "kl_p99": kl.quantile(0.99).item(),
            "top1_agreement": ag.mean().item(), "accept_agreement": ac.mean().item(), "positions": kl.numel()}


def sample(model, prompts, settings) -> tuple[list[int], list[list[int]]]:
    """Steps per block and committed blocks of free-running generations."""
    steps, blocks = [], []
    for i, p in enumerate(prompts):
        for ev in denoise(model, p, settings.replace(seed=1000 + i)):
            if isinstance(ev, BlockEvent):
                steps.append(ev.steps)
                blocks.append(ev.token_ids)
    return steps, blocks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: build a random-init model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--blocks", type=int, default=2, help="canvases per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="dg-quant-quality-"))
    t0 = time.time()
    try:
        src = Path(args.model) if args.model else write_random_checkpoint(work / "ref", args.seed)
        ref = load_model(src, device=args.device, dtype=dtype)
        cfg = ref.config
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.prompts)]
        settings = load_sampler_defaults(src).replace(max_new_tokens=args.blocks * cfg.canvas_length)
        settings = SamplerSettings(**{**settings.__dict__, "eos_token_id": None})  # fixed number of blocks

        rec = Recorder(ref)
        ref_steps, ref_blocks, temps = [], [], []
        for i, p in enumerate(prompts):
            for ev in denoise(rec, p, settings.replace(seed=1000 + i)):
                if isinstance(ev, StepEvent):
                    temps.append(ev.temperature)
                elif isinstance(ev, BlockEvent):
                    ref_steps.append(ev.steps)
                    ref_blocks.append(ev.token_ids)
        results = {"reference": {"steps_per_block_mean": sum(ref_steps) / len(ref_steps), "steps": ref_steps}}

        variants = {"bf16 weights (scale)": None, **VARIANTS}
        for name, spec in variants.items():
            if spec is None:
                if dtype != torch.float32:
                    continue
                model = load_model(src, device=args.device, dtype=torch.bfloat16).to(torch.float32)
            else:
                scheme, budget = spec
                out = work / f"q-{len(results)}"
                quantize_checkpoint(src, out, scheme=scheme, budget_bytes=budget, progress=False)
                model = load_model(out, device=args.device, dtype=dtype, prepare=prepare_quantized)
            r = replay(model, rec.calls, temps, settings.entropy_bound)
            steps, blocks = sample(model, prompts, settings)
            same = sum(a == b for a, b in zip(blocks, ref_blocks))
            r.update(steps_per_block_mean=sum(steps) / len(steps), steps=steps,
                     blocks_identical=f"{same}/{len(blocks)}")
            if spec is not None:
                r["formats"] = json.loads((out / "dg_manifest.json").read_text())["groups"]
            results[name] = r
            print(f"{name:50s} KL {r['kl_mean']:.5f} (p99 {r['kl_p99']:.4f})  top-1 {r['top1_agreement']:.4f}  "
                  f"accept {r['accept_agreement']:.4f}  "
                  f"steps/block {r['steps_per_block_mean']:.2f} (ref {results['reference']['steps_per_block_mean']:.2f})",
                  flush=True)
            del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"model": args.model or "random-init " + json.dumps(random_config()["text_config"]),
            "device": args.device, "dtype": args.dtype, "prompts": args.prompts, "prompt_len": args.prompt_len,
            "blocks_per_prompt": args.blocks, "decoder_calls": sum(c[0] == "decode" for c in rec.calls),
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
