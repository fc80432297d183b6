"""Where models live, and the one resolver from a model name to a checkpoint directory.

A name is, in the order tried: the built-in `tiny`; a local directory (official layout or written
by `dg quantize`); a model under dg's own models directory; a Hugging Face repo id already in the
huggingface_hub cache (shared with other tools). Downloads go through `dg pull`.
dg's data directory is `$DG_HOME`, else `$XDG_DATA_HOME/dg`, else `~/.local/share/dg`.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import tiny
from .errors import ModelNotFoundError

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
