"""`dg_manifest.json`: what makes a directory a `dg quantize` output, and how it is verified.

    {"format": "dg-quant", "format_version": 1, "dg_version": ..., "scheme": "int4",
     "groups": {"experts": "int4_sym_g64", "dense": "int8_row", "embedding": "int8_row"},
     "tensors": {"<source tensor name>": {"format": ..., "shape": [...], "source_dtype": ...}, ...},
     "shards": {"model-00001-of-00002.safetensors": {"sha256": ..., "bytes": ...}, ...},
     "source": {"name", "repo", "revision", "path"}, "plan": {...}, "quantizer": {...}, "created": ...}

A packed tensor is stored as `<source tensor name>.<suffix>` (see quant/formats.py); unpacked ones
under their own name. The manifest is written after every shard, so a directory without one (or
whose shards do not match it) is never loaded as a quantized model.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dgcli.errors import CheckpointError
from dgcli.config import MANIFEST_FILE as MANIFEST  # one name for dg, store and the loader

from .formats import FORMATS

FORMAT = "dg-quant"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    """The manifest of a quantized directory, checked for format, version and structure."""
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} cannot be read ({type(e).__name__}); re-run `dg quantize`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not a dg quantization manifest")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses quantized format version {version!r}, this dg reads version {FORMAT_VERSION} "
            f"(upgrade dg, or re-run `dg quantize` with this one)")
    tensors, shards = m.get("tensors"), m.get("shards")
    if not isinstance(tensors, dict) or not isinstance(shards, dict) or not shards:
        raise CheckpointError(f"{f} has no 'tensors' or 'shards'")
    for name, t in tensors.items():
        fmt = t.get("format") if isinstance(t, dict) else None
        if fmt not in FORMATS:
            raise CheckpointError(f"{f}: tensor '{name}' has format {fmt!r}, unknown to this dg")
    return m


def verify_shards(path: Path, manifest: dict) -> None:
    """Check every shard the manifest lists against its size and sha256 (hashed in parallel)."""
    path = Path(path)
    items = sorted(manifest["shards"].items())
    for name, info in items:
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{path} is incomplete: shard {name} is missing (re-run `dg quantize`)")
        if p.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{p} has {p.stat().st_size} bytes, the manifest says {info.get('bytes')}: "
                                  f"the file is damaged (re-run `dg quantize`)")
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda it: sha256_file(path / it[0]), items))
    for (name, info), digest in zip(items, digests):
        if digest != info.get("sha256"):
            raise CheckpointError(f"{path / name} does not match its checksum in {MANIFEST}: the file is "
                                  f"damaged (re-run `dg quantize`)")
    others = {p.name for p in path.glob("*.safetensors")} - set(manifest["shards"])
    if others:
        raise CheckpointError(f"{path} holds shards the manifest does not list: {', '.join(sorted(others))}")


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
