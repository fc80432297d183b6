"""Load a checkpoint directory in the official layout into a `DiffusionGemma`.

Layout: config.json, generation_config.json, tokenizer files, and `*.safetensors` shards (with
`model.safetensors.index.json` when there are several). The model is built on the `meta` device,
then each tensor is read from a memory-mapped shard straight to the target device and dtype and
assigned: the weights exist once, never twice. Only safetensors are ever read; nothing is unpickled.
Vision-tower tensors are skipped: dg is text only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, SamplerSettings, read_json
from .errors import CheckpointError
from .model import DiffusionGemma

INDEX_FILE = "model.safetensors.index.json"
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shard_files(path: Path) -> list[Path]:
    """The shards a checkpoint consists of; a missing shard named in the index is an error."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{path} is incomplete: missing shard(s) {', '.join(missing)} (re-run `dg pull` to resume the download)"
            )
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return shards


def default_dtype(path: Path, device: torch.device) -> torch.dtype:
    """The dtype the checkpoint declares, else bf16 on a GPU and fp32 on the CPU."""
    d = read_json(path / "config.json")
    name = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype")
    if name in DTYPES:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_state_dict(path: Path, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype):
    """Read every expected tensor from the shards, checked by name and shape, onto device/dtype."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_files(path):
        try:
            f = safe_open(str(shard), framework="pt", device="cpu")
            keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is corrupt or truncated ({_first_line(e)})") from None
        for key in keys:
            if key.startswith(SKIPPED_PREFIXES):
                continue
            if key not in expected:
                raise CheckpointError(f"{shard.name}: unexpected tensor '{key}' (not a DiffusionGemma text weight)")
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(expected[key]):
                raise CheckpointError(
                    f"{shard.name}: tensor '{key}' has shape {list(shape)}, expected {list(expected[key])}"
                )
            try:
                t = f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{shard} is corrupt or truncated at '{key}' ({_first_line(e)})") from None
            # Always a fresh copy: tensors read from a shard can sit at unaligned addresses, which
            # sends CPU kernels down other (differently rounded) paths than the reference's.
            # dg quantize output: packed .scales/.zeros keep their stored dtype (fp16/fp32), as int tensors do.
            keep = not t.is_floating_point() or key.endswith((".scales", ".zeros"))
            tensors[key] = t.to(device=device, dtype=t.dtype if keep else dtype, copy=True)
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path} is missing tensor(s): {', '.join(missing[:3])}{more}")
    return tensors


def load_model(path: str | Path, device=None, dtype=None) -> DiffusionGemma:
    path = Path(path)
    config = ModelConfig.from_file(path / "config.json")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(path, device)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    if (path / "dg_manifest.json").exists():  # dg quantize output: verify it, swap in packed modules
        from quant.runtime import prepare_quantized
        prepare_quantized(model, path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(read_state_dict(path, expected, device, dtype), assign=True, strict=True)
    model.sampler_defaults = load_sampler_defaults(path)
    model.source = str(path)
    return model.eval().requires_grad_(False)  # inference only: no autograd bookkeeping


def load_sampler_defaults(path: Path) -> SamplerSettings:
    gen = path / "generation_config.json"
    return SamplerSettings.from_generation_config(read_json(gen)) if gen.exists() else SamplerSettings()


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def checkpoint_summary(path: Path) -> dict:
    """Shard names and total bytes, for `dg show`/`dg list`."""
    shards = shard_files(path)
    return {"shards": [s.name for s in shards], "bytes": sum(s.stat().st_size for s in shards)}


__all__ = ["load_model", "shard_files", "checkpoint_summary"]
