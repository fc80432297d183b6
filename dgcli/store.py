"""Where models live, and the one resolver from a model name to a checkpoint directory.

A name is, in the order tried: the built-in `tiny`; a local directory (official layout or written
by `dg quantize`); a model under dg's own models directory; a Hugging Face repo id already in the
huggingface_hub cache (shared with other tools). Downloads go through `dg pull`.
dg's data directory is `$DG_HOME`, else `$XDG_DATA_HOME/dg`, else `~/.local/share/dg`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import tiny
from .config import MANIFEST_FILE
from .errors import DgError, ModelNotFoundError, first_line

DEFAULT_MODEL = "google/diffusiongemma-26B-A4B-it"
# What the runner needs from a repo: no vision-only extras, no other weight formats.
NEEDED_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "chat_template.json", "processor_config.json"]


def data_dir() -> Path:
    if os.environ.get("DG_HOME"):
        return Path(os.environ["DG_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "dg"


def models_dir() -> Path:
    return data_dir() / "models"


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def hf_cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a repo in the huggingface_hub cache, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=NEEDED_FILES))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def resolve(name: str | os.PathLike | None = None) -> Path:
    """Checkpoint directory for a model name; ModelNotFoundError says what was tried."""
    name = str(name or DEFAULT_MODEL)
    if name == tiny.NAME:
        return tiny.ensure(models_dir())
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p} is a directory but has no config.json: not a model checkpoint")
        return p
    if (models_dir() / name / "config.json").is_file():
        return models_dir() / name
    if looks_like_repo_id(name):
        snap = hf_cached_snapshot(name)
        if snap is not None and (snap / "config.json").is_file():
            return snap
        raise ModelNotFoundError(f"model '{name}' is not downloaded; run `dg pull {name}` first")
    raise ModelNotFoundError(
        f"no model named '{name}': not a directory, not in {models_dir()}, and not a Hugging Face repo id "
        f"(use `dg pull ORG/NAME`, a checkpoint directory, or `tiny`)"
    )


# ---- managing models (`dg pull`, `dg list`, `dg show`, `dg rm`) -------------------------------------

MODEL_TYPE = "diffusion_gemma"


class ModelEntry:
    """One model `dg list` shows: its name, kind (builtin | bf16 | quantized), bytes on disk and place.

    `root` is what `dg rm` deletes: the checkpoint directory, or the whole repo folder in the HF cache.
    """

    def __init__(self, name: str, kind: str, size: int, path: Path, root: Path | None = None, note: str = ""):
        self.name, self.kind, self.size, self.path, self.root, self.note = name, kind, size, path, root or path, note

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bytes": self.size, "path": str(self.path), "note": self.note}


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def kind_of(path: Path) -> str:
    if Path(path) == models_dir() / f"{tiny.NAME}-v{tiny.VERSION}":
        return "builtin"
    return "quantized" if (Path(path) / MANIFEST_FILE).is_file() else "bf16"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def missing_shards(path: Path) -> list[str]:
    """Shards that model.safetensors.index.json names but the directory lacks (an unfinished download)."""
    index = Path(path) / "model.safetensors.index.json"
    if not index.is_file():
        return [] if any(Path(path).glob("*.safetensors")) else ["*.safetensors"]
    try:
        import json

        names = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return [index.name]
    return sorted(n for n in names if not (Path(path) / n).is_file())


def tiny_entry() -> ModelEntry | None:
    p = models_dir() / f"{tiny.NAME}-v{tiny.VERSION}"
    return ModelEntry(tiny.NAME, "builtin", dir_size(p), p) if (p / "model.safetensors").is_file() else None


def hf_cached_models() -> list[ModelEntry]:
    """DiffusionGemma repos in the huggingface_hub cache (config.json model_type diffusion_gemma)."""
    import json

    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, OSError, ValueError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = next((r for r in repo.revisions if "main" in r.refs), None) or max(
            repo.revisions, key=lambda r: r.last_modified)
        try:
            cfg = json.loads((rev.snapshot_path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE:
            continue
        missing = missing_shards(rev.snapshot_path)
        note = f"incomplete: {len(missing)} shard(s) missing, run `dg pull {repo.repo_id}`" if missing else ""
        out.append(ModelEntry(repo.repo_id, kind_of(rev.snapshot_path), repo.size_on_disk, rev.snapshot_path,
                              root=repo.repo_path, note=note))
    return out


def list_models() -> list[ModelEntry]:
    """tiny (once written), checkpoint directories under models_dir(), then DiffusionGemma repos in the HF cache."""
    out = [e for e in [tiny_entry()] if e]
    if models_dir().is_dir():
        for d in sorted(models_dir().iterdir()):
            builtin = re.fullmatch(rf"{tiny.NAME}-v\d+", d.name)
            if d.name.startswith(".") or builtin or not (d / "config.json").is_file():
                continue
            out.append(ModelEntry(d.name, kind_of(d), dir_size(d), d))
    return out + hf_cached_models()


def find_entry(name: str) -> ModelEntry:
    """The listed model called `name` (what `dg rm` may delete); arbitrary directories are never matched."""
    for e in list_models():
        if e.name == name:
            return e
    raise ModelNotFoundError(f"no model named '{name}' among dg's models (see `dg list`)")


def remove(entry: ModelEntry) -> None:
    import shutil

    shutil.rmtree(entry.root)


def pull(name: str) -> Path:
    """Download a repo's runner files into the huggingface_hub cache (resumable; HF_TOKEN respected).

    `tiny` is written locally instead. Every failure is a one-line DgError; a download that stops
    half-way leaves only huggingface_hub's own partial files, which the next pull resumes.
    """
    if name == tiny.NAME:
        return tiny.ensure(models_dir())
    if Path(name).expanduser().is_dir():
        raise DgError(f"'{name}' is a local directory: it can be used as it is, there is nothing to pull")
    if not looks_like_repo_id(name):
        raise DgError(f"'{name}' is not a Hugging Face repo id (ORG/NAME) nor `tiny`")
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    net_errors: tuple = (OSError,)
    for mod in ("httpx2", "httpx"):
        try:
            net_errors += (__import__(mod).HTTPError,)
        except (ImportError, AttributeError):
            pass
    try:
        path = Path(snapshot_download(name, allow_patterns=NEEDED_FILES, cache_dir=hf_cache_dir()))
    except hf.GatedRepoError:
        raise DgError(f"{name} is gated: accept its terms on huggingface.co, then set HF_TOKEN "
                      f"(or run `hf auth login`) and retry") from None
    except hf.RepositoryNotFoundError:
        raise DgError(f"no repo '{name}' on the Hugging Face Hub (if it is private, set HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise DgError(f"{name} has no 'main' revision on the Hub") from None
    except hf.LocalEntryNotFoundError as e:
        from huggingface_hub import constants  # the hub's own reading of HF_HUB_OFFLINE

        why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE \
            else "the Hugging Face Hub could not be reached"
        if isinstance(e, hf.IncompleteSnapshotError):
            why += "; the partial download is kept and resumes next time"
        raise DgError(f"cannot download {name}: {why}") from None
    except hf.HfHubHTTPError as e:
        raise DgError(f"download of {name} failed: {first_line(e)}") from None
    except net_errors as e:
        raise DgError(f"cannot download {name}: {first_line(e)} (check the connection, then re-run "
                      f"`dg pull {name}`: it resumes)") from None
    missing = missing_shards(path)
    if not (path / "config.json").is_file() or missing:
        raise DgError(f"download of {name} is incomplete ({', '.join(missing) or 'config.json'} missing); "
                      f"re-run `dg pull {name}` to resume")
    return path


def describe(path: Path, context: int = 8192) -> dict:
    """What `dg show` prints about a checkpoint directory: architecture, weights, quantization,
    estimated memory at `context` tokens, sampler defaults, chat template. Reads headers, not weights."""
    import json

    from safetensors import safe_open

    from .config import ModelConfig, read_json
    from .loader import SKIPPED_PREFIXES, load_sampler_defaults, shard_files
    from .tokenizer import find_chat_template

    path = Path(path)
    c = ModelConfig.from_file(path / "config.json")
    params = weight_bytes = 0
    for shard in shard_files(path):
        weight_bytes += shard.stat().st_size
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for k in f.keys():
                if not k.startswith(SKIPPED_PREFIXES):
                    n = 1
                    for d in f.get_slice(k).get_shape():
                        n *= d
                    params += n
    manifest = None
    if (path / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {"error": f"{MANIFEST_FILE} is not valid JSON"}
    # KV cache in bf16: full layers keep every token, sliding layers at most the window.
    kv = sum(2 * c.layer_kv_heads[i] * c.layer_head_dim[i] * 2 * (min(context, c.sliding_window - 1)
             if c.is_sliding(i) else context) for i in range(c.num_hidden_layers))
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    return {
        "path": str(path),
        "kind": kind_of(path),
        "architecture": {
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "attention_heads": c.num_attention_heads,
            "kv_heads": sorted(set(c.layer_kv_heads)), "head_dims": sorted(set(c.layer_head_dim)),
            "sliding_window": c.sliding_window, "full_attention_layers": c.layer_types.count("full_attention"),
            "experts": c.num_experts, "experts_per_token": c.top_k_experts,
            "expert_size": c.moe_intermediate_size, "dense_mlp_size": c.intermediate_size,
            "vocab_size": c.vocab_size, "canvas_length": c.canvas_length,
            "max_position_embeddings": c.max_position_embeddings,
        },
        "parameters": params,
        "weight_bytes": weight_bytes,
        "quantization": manifest,
        "kv_cache_bytes": kv,
        "context": context,
        "sampler_defaults": {k: v for k, v in load_sampler_defaults(path).__dict__.items() if k != "seed"},
        "chat_template": find_chat_template(path, tok_cfg) is not None,
    }
