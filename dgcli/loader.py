"""Load a checkpoint directory in the official layout into a `DiffusionGemma`.

Layout: config.json, generation_config.json, tokenizer files, and `*.safetensors` shards (with
`model.safetensors.index.json` when there are several). The model is built on the `meta` device,
then each tensor is read from a memory-mapped shard straight to the target device and dtype and
assigned: the weights exist once, never twice. Only safetensors are ever read; nothing is unpickled.
The vision tower (dgcli/vision.py) is loaded when config.json describes one and the shards hold it;
`vision=False` skips its tensors (text-only use), as does a checkpoint saved without them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import MANIFEST_FILE, ModelConfig, SamplerSettings, read_json
from .errors import CheckpointError, DgError, first_line
from .model import VISION_PREFIXES, DiffusionGemma

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shard_files(path: Path) -> list[Path]:
    """The shards a checkpoint consists of; a missing shard named in the index is an error."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        names = sorted(set(weight_map.values()), key=str)
        for n in names:  # by name, not resolved: the hub's cache links shards to blobs outside the folder
            if not isinstance(n, str) or not n or Path(n).is_absolute() or ".." in Path(n).parts or "\\" in n:
                raise CheckpointError(f"{index}: shard {n!r} is not a file inside {path} (refused)")
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


LAYER_KEY = re.compile(r"^model\.decoder\.layers\.(\d+)\.")
EMBEDDING = "model.decoder.embed_tokens.weight"


def check_sizes(path: Path, config: ModelConfig) -> None:
    """The config's layer count and embedding against the shard headers, before anything is built
    from the config: a crafted config.json (a billion layers) is refused here, not by the allocator.
    Every other shape is checked against the built (meta) model by index_shards."""
    layers, embedding = set(), None
    for shard in shard_files(path):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    m = LAYER_KEY.match(key)
                    if m:
                        layers.add(int(m.group(1)))
                    elif key.startswith(EMBEDDING) and (embedding is None or key == EMBEDDING):
                        embedding = (key, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is corrupt or truncated ({first_line(e)})") from None
    n = config.num_hidden_layers
    if layers != set(range(n)):
        found = f"{len(layers)} (numbered up to {max(layers)})" if layers else "no"
        raise CheckpointError(f"{path}: config.json says num_hidden_layers={n} but the weights hold {found} "
                              f"decoder layers (a config.json that does not belong to these weights)")
    want = (config.vocab_size, config.hidden_size)
    if embedding is None:
        raise CheckpointError(f"{path} is missing tensor(s): {EMBEDDING}")
    key, shape = embedding
    # A packed quantized embedding (key.qweight) keeps one row per token; the plain one is exactly [V, H].
    if (shape != want) if key == EMBEDDING else (not shape or shape[0] != config.vocab_size):
        raise CheckpointError(f"{path}: config.json says vocab_size={want[0]}, hidden_size={want[1]} but the "
                              f"embedding '{key}' has shape {list(shape)}")


def default_dtype(path: Path, device: torch.device) -> torch.dtype:
    """The dtype the checkpoint declares, else bf16 on a GPU and fp32 on the CPU."""
    d = read_json(path / "config.json")
    name = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype")
    if name in DTYPES:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device) -> torch.device:
    """The device to load onto; a clear error for one this torch cannot use."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise DgError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DgError(f"device {device!r}: no CUDA GPU is usable by this torch build ({torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DgError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif d.type != "cpu":
        raise DgError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return d


def keeps_stored_dtype(key: str, is_float: bool) -> bool:
    """Integer tensors and dg quantize's packed .scales/.zeros keep their stored dtype."""
    return not is_float or key.endswith((".scales", ".zeros"))


def has_vision_weights(path: Path) -> bool:
    """Whether the shards hold vision-tower tensors (a text-only export may have dropped them)."""
    for shard in shard_files(path):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                if any(k.startswith(VISION_PREFIXES) for k in f.keys()):
                    return True
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is corrupt or truncated ({first_line(e)})") from None
    return False


def index_shards(path: Path, expected: dict[str, torch.Size]) -> list[tuple[Path, list[str]]]:
    """Check every shard's header against the model (names, shapes, nothing missing) before any
    tensor is read; returns the keys to load per shard. Corrupt headers are caught here. Vision
    tensors are skipped when the model was built without its tower."""
    plan, seen = [], set()
    skip = () if any(k.startswith(VISION_PREFIXES) for k in expected) else VISION_PREFIXES
    for shard in shard_files(path):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if not (skip and k.startswith(skip))]
                for key in keys:
                    if key not in expected:
                        raise CheckpointError(
                            f"{shard.name}: unexpected tensor '{key}' (not a DiffusionGemma weight)"
                        )
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(expected[key]):
                        raise CheckpointError(
                            f"{shard.name}: tensor '{key}' has shape {list(shape)}, expected {list(expected[key])}"
                        )
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is corrupt or truncated ({first_line(e)})") from None
        plan.append((shard, keys))
        seen.update(keys)
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path} is missing tensor(s): {', '.join(missing[:3])}{more}")
    return plan


def weight_bytes(plan, dtype: torch.dtype) -> int:
    """Bytes the weights will take once loaded in dtype."""
    total = 0
    for shard, keys in plan:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in keys:
                sl = f.get_slice(key)
                numel = math.prod(sl.get_shape())
                stored = sl.get_dtype()
                is_float = stored.startswith(("F", "BF"))
                size = SAFETENSORS_SIZES.get(stored, 4) if keeps_stored_dtype(key, is_float) else dtype.itemsize
                total += numel * size
    return total


SAFETENSORS_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
HEADROOM = int(1.5e9)  # KV cache at a few thousand tokens, one canvas step's activations, CUDA context


def check_fits(need: int, device: torch.device) -> None:
    """Refuse early, with numbers, when the weights cannot fit in the GPU's free memory."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if need + HEADROOM > free:
        raise DgError(
            f"this model needs about {(need + HEADROOM) / 1e9:.1f} GB of GPU memory ({need / 1e9:.1f} GB of weights), "
            f"but {torch.cuda.get_device_name(device)} has {free / 1e9:.1f} of {total / 1e9:.1f} GB free; "
            f"a 4-bit copy from `dg quantize` needs about 15 GB"
        )


def read_state_dict(plan, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the planned tensors one at a time from the memory-mapped shards onto device/dtype."""
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in plan:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in keys:
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{shard} is corrupt or truncated at '{key}' ({first_line(e)})") from None
                keep = keeps_stored_dtype(key, t.is_floating_point())
                # Always a fresh copy: tensors read from a shard can sit at unaligned addresses, which
                # sends CPU kernels down other (differently rounded) paths than the reference's.
                tensors[key] = t.to(device=device, dtype=t.dtype if keep else dtype, copy=True)
    return tensors


def load_model(path: str | Path, device=None, dtype=None, prepare=None, vision: bool = True) -> DiffusionGemma:
    """The checkpoint at `path` as a DiffusionGemma on device/dtype (inference only); vision=False
    leaves out its vision tower.

    prepare(model, path): called on the meta-built model before any weight is read, when the
    directory is a `dg quantize` output (has MANIFEST_FILE); the quantized runtime plugs in here
    (`quant.runtime.prepare_quantized`, passed by dgcli.load), so the loader knows nothing of it."""
    path = Path(path)
    config = ModelConfig.from_file(path / "config.json")
    device = resolve_device(device)
    dtype = dtype or default_dtype(path, device)
    check_sizes(path, config)
    vision = vision and config.vision_config is not None and has_vision_weights(path)
    with torch.device("meta"):
        model = DiffusionGemma(config, vision=vision)
    if (path / MANIFEST_FILE).exists():
        if prepare is None:
            raise CheckpointError(f"{path} is a dg quantize output: load it with dgcli.load")
        prepare(model, path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    plan = index_shards(path, expected)
    check_fits(weight_bytes(plan, dtype), device)
    model.load_state_dict(read_state_dict(plan, device, dtype), assign=True, strict=True)
    return model.eval().requires_grad_(False)  # inference only: no autograd bookkeeping


def load_sampler_defaults(path: Path) -> SamplerSettings:
    gen = path / "generation_config.json"
    return SamplerSettings.from_generation_config(read_json(gen)) if gen.exists() else SamplerSettings()


__all__ = ["load_model", "shard_files"]
