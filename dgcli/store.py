"""Where models live, and the one resolver from a model name to a checkpoint directory.

A name is, in the order tried: the built-in `tiny`; a local directory (official layout or written
by `dg quantize`); a model under dg's own models directory; a Hugging Face repo id already in the
huggingface_hub cache (shared with other tools). Downloads go through `dg pull`.
dg's data directory is `$DG_HOME`, else `$XDG_DATA_HOME/dg`, else `~/.local/share/dg`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from . import tiny
from .config import MANIFEST_FILE
from .errors import DgError, ModelNotFoundError, first_line

DEFAULT_MODEL = "google/diffusiongemma-26B-A4B-it"
# What the runner needs from a repo: no vision-only extras, no other weight formats.
NEEDED_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "chat_template.json", "processor_config.json"]


class BadModelName(ModelNotFoundError):
    """A model name no model can have (empty, too long, a malformed repo id): bad usage (exit 2)."""

    exit_code = 2


def data_dir() -> Path:
    if os.environ.get("DG_HOME"):
        home = Path(os.environ["DG_HOME"]).expanduser()
        if home.exists() and not home.is_dir():
            raise DgError(f"DG_HOME={home} is not a directory: point it at a directory (or unset it)")
        return home
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "dg"


def models_dir() -> Path:
    return data_dir() / "models"


def writable_dir(path: Path, what: str = "") -> Path:
    """`path`, created if needed; an unwritable or non-directory place is a one-line DgError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DgError(f"cannot use {path}{what}: it is a file, not a directory") from None
    except OSError as e:
        raise DgError(f"cannot create {path}{what}: {e.strerror or first_line(e)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DgError(f"cannot write into {path}{what}: permission denied")
    return path


def writable_models_dir() -> Path:
    return writable_dir(models_dir(), " (dg's models directory; set DG_HOME to move it)")


# Hugging Face repo ids: ORG/NAME, each part letters, digits, '-', '_', '.', at most 96 characters,
# neither starting nor ending with '-' or '.', and no '--' or '..' (huggingface_hub's own rules).
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
NAME_MAX = 255  # bytes in one path component on common file systems (longer: "File name too long")


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(_REPO_PART.fullmatch(p) for p in parts)
            and "--" not in name and ".." not in name)


def check_name(name: str) -> str:
    """`name` if some model could be called that; else BadModelName (a usage error, exit 2)."""
    if not name or not name.strip():
        raise BadModelName("empty model name: give a Hugging Face repo id (ORG/NAME), a directory, or `tiny`")
    if "\0" in name:
        raise BadModelName("a model name cannot contain a NUL character")
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > 4096 or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise BadModelName(f"model name too long ({len(name):,} characters): no file or repo has such a name")
    return name


def hf_cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a repo in the huggingface_hub cache, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=NEEDED_FILES))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def resolve(name: str | os.PathLike | None = None) -> Path:
    """Checkpoint directory for a model name (None: the default model; an empty name is bad usage);
    ModelNotFoundError says what was tried."""
    name = check_name(str(DEFAULT_MODEL if name is None else name))
    if name == tiny.NAME:
        return _tiny()
    p = Path(name).expanduser()
    try:
        p.is_dir()
    except OSError as e:  # e.g. a name that is no valid path here
        raise BadModelName(f"'{name[:80]}' is not a usable model name: {e.strerror or first_line(e)}") from None
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


def _tiny() -> Path:
    """tiny's directory; the models directory must be writable only when tiny is still to be written."""
    written = (models_dir() / f"{tiny.NAME}-v{tiny.VERSION}" / "model.safetensors").is_file()
    return tiny.ensure(models_dir() if written else writable_models_dir())


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


def safetensors_problem(path: Path) -> str:
    """Why a .safetensors file cannot be read ("" if its header is sound and its size matches it).

    Reads the header only (8-byte length, JSON), in plain Python: `dg list` stays torch-free.
    """
    import json

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, 1 << 28):
                return f"{Path(path).name} is truncated or not a safetensors file"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{Path(path).name} cannot be read ({e.strerror or first_line(e)})"
    except ValueError:
        return f"{Path(path).name} has a corrupt header"
    try:
        end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] or [0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return f"{Path(path).name} has a corrupt header"
    if 8 + n + end != size:
        return f"{Path(path).name} is truncated ({size:,} bytes, its header describes {8 + n + end:,})"
    return ""


def checkpoint_problem(path: Path) -> str:
    """Why a checkpoint directory is broken ("" if it looks whole): no config.json, a shard missing,
    truncated or corrupt, a `dg quantize` output without its manifest or whose shards do not match it.
    Headers and sizes only: cheap enough for `dg list`."""
    import json

    path = Path(path)
    if not (path / "config.json").is_file():
        return "no config.json"
    index = path / "model.safetensors.index.json"
    shards = sorted(path.glob("*.safetensors"))
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            names = sorted(set(data["weight_map"].values()))
            written_by_dg = (data.get("metadata") or {}).get("format") == "dg-quant"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is corrupt"
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            return f"{len(missing)} shard(s) missing ({missing[0]}{', ...' if len(missing) > 1 else ''})"
        shards = [path / n for n in names]
        if written_by_dg and not (path / MANIFEST_FILE).is_file():
            return f"written by dg quantize but {MANIFEST_FILE} is missing (an unfinished output)"
    elif not shards:
        return "no *.safetensors weights"
    for shard in shards:
        why = safetensors_problem(shard)
        if why:
            return why
    if (path / MANIFEST_FILE).is_file():
        try:
            listed = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))["shards"]
            for name, info in listed.items():
                if not (path / name).is_file() or (path / name).stat().st_size != info["bytes"]:
                    return f"{name} does not match {MANIFEST_FILE}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST_FILE} is corrupt"
    return ""


def broken_note(path: Path) -> str:
    why = checkpoint_problem(path)
    return f"broken: {why}" if why else ""


# ---- what an interrupted write leaves behind -------------------------------------------------------

# Writers work in hidden `.NAME.partial-PID-XXXX` directories beside the final one (PID: the writer's
# process), and move replaced outputs aside into `.NAME.old-PID-XXXX`. A writer's own cleanup removes
# them; these are for what it could not clean (SIGKILL, power loss).
_TEMP = re.compile(r"\..+\.(?:partial|old)-(?:(\d+)-)?[^/]+")
_STARTED = time.time()


def temp_prefix(name: str, kind: str = "partial") -> str:
    return f".{name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(directory: Path) -> list[Path]:
    """Remove the partial/old directories in `directory` that no running writer owns (their PID is
    gone; or, without a PID, older than this process), and unheld `.NAME.lock` files; returns them."""
    import shutil

    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        try:
            if m and p.is_dir() and not p.is_symlink():
                pid = int(m.group(1)) if m.group(1) else None
                stale = (not _pid_alive(pid)) if pid is not None else p.stat().st_mtime < _STARTED
                if stale and pid != os.getpid():
                    shutil.rmtree(p)
                    removed.append(p)
            elif p.name.startswith(".") and p.name.endswith(".lock") and p.is_file():
                if _drop_unheld_lock(p):
                    removed.append(p)
        except OSError:  # not ours to delete, or gone meanwhile: leave it
            continue
    return removed


def _drop_unheld_lock(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        path.unlink()  # a writer that opened it meanwhile sees the inode gone and opens a new one
        return True
    finally:
        os.close(fd)


def tiny_entry() -> ModelEntry | None:
    p = models_dir() / f"{tiny.NAME}-v{tiny.VERSION}"
    if not p.is_dir():
        return None
    return ModelEntry(tiny.NAME, "builtin", dir_size(p), p, note=broken_note(p))


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
        note = (f"incomplete: {len(missing)} shard(s) missing, run `dg pull {repo.repo_id}`" if missing
                else broken_note(rev.snapshot_path))
        out.append(ModelEntry(repo.repo_id, kind_of(rev.snapshot_path), repo.size_on_disk, rev.snapshot_path,
                              root=repo.repo_path, note=note))
    return out


def list_models() -> list[ModelEntry]:
    """tiny (once written), checkpoint directories under models_dir(), then DiffusionGemma repos in the
    HF cache. A broken one is listed with a note saying why (so `dg rm` can delete it). Stale partial
    outputs of interrupted writers are swept first."""
    out = [e for e in [tiny_entry()] if e]
    if models_dir().is_dir():
        sweep_stale(models_dir())
        for d in sorted(models_dir().iterdir()):
            builtin = re.fullmatch(rf"{tiny.NAME}-v\d+", d.name)
            if d.name.startswith(".") or builtin or not d.is_dir() or not _looks_like_checkpoint(d):
                continue
            out.append(ModelEntry(d.name, kind_of(d), dir_size(d), d, note=broken_note(d)))
    return out + hf_cached_models()


def _looks_like_checkpoint(d: Path) -> bool:
    names = ("config.json", MANIFEST_FILE, "model.safetensors.index.json")
    return any((d / n).exists() for n in names) or any(d.glob("*.safetensors"))


def find_entry(name: str) -> ModelEntry:
    """The listed model called `name` (what `dg rm` may delete); arbitrary directories are never matched."""
    for e in list_models():
        if e.name == name:
            return e
    raise ModelNotFoundError(f"no model named '{name}' among dg's models (see `dg list`)")


def remove(entry: ModelEntry) -> None:
    """Delete entry.root; if that stops part-way, a DgError says what was deleted and what is left."""
    import shutil

    root = Path(entry.root)
    total = _count_files(root)
    failures: list[tuple[str, BaseException]] = []
    shutil.rmtree(root, onerror=lambda fn, path, exc: failures.append((path, exc[1])))
    if failures:
        left = _count_files(root) if root.exists() else 0
        path, exc = failures[0]
        why = getattr(exc, "strerror", None) or first_line(exc)
        raise DgError(f"{entry.name} was only partly deleted: {total - left} of {total} files deleted, {left} left "
                      f"in {root} (cannot delete {path}: {why})")


def _count_files(root: Path) -> int:
    n = 0
    for _, dirs, files in os.walk(root):
        n += len(files)
    return n


def pull(name: str) -> Path:
    """Download a repo's runner files into the huggingface_hub cache (resumable; HF_TOKEN respected).

    `tiny` is written locally instead. Every failure is a one-line DgError; a download that stops
    half-way leaves only huggingface_hub's own partial files, which the next pull resumes.
    """
    check_name(name)
    if name == tiny.NAME:
        path = _tiny()
        why = checkpoint_problem(path)
        if why:
            from .errors import CheckpointError

            raise CheckpointError(f"tiny at {path} is broken ({why}): run `dg rm tiny`, then `dg pull tiny` "
                                  f"writes it again")
        return path
    try:
        local = Path(name).expanduser().is_dir()
    except OSError:
        local = False
    if local:
        raise DgError(f"'{name}' is a local directory: it can be used as it is, there is nothing to pull")
    if not looks_like_repo_id(name):
        raise BadModelName(f"'{name}' is not a Hugging Face repo id (ORG/NAME: letters, digits, '-', '_', '.'; "
                           f"no '..' or '--') nor `tiny`")
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
    except hf.HFValidationError as e:
        raise BadModelName(f"'{name}' is not a valid Hugging Face repo id: {first_line(e)}") from None
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

    from safetensors import SafetensorError, safe_open

    from .config import ModelConfig, read_json
    from .errors import CheckpointError
    from .loader import load_sampler_defaults, shard_files
    from .model import VISION_PREFIXES
    from .tokenizer import find_chat_template

    path = Path(path)
    c = ModelConfig.from_file(path / "config.json")
    params = vision = weight_bytes = 0
    for shard in shard_files(path):
        try:  # headers only, checked as `dg run` checks them: a broken shard is one line, not a traceback
            weight_bytes += shard.stat().st_size
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for k in f.keys():
                    n = 1
                    for d in f.get_slice(k).get_shape():
                        n *= d
                    params += n
                    vision += n if k.startswith(VISION_PREFIXES) else 0
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is corrupt or truncated ({first_line(e)})") from None
    manifest = None
    if (path / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {"error": f"{MANIFEST_FILE} is not valid JSON"}
    packed = (manifest or {}).get("tensors")
    if isinstance(packed, dict) and packed:
        # A quantized directory stores packed codes and scales: count the source tensors' shapes it records.
        params = vision = 0
        for name, t in packed.items():
            if isinstance(t, dict) and isinstance(t.get("shape"), list):
                n = 1
                for d in t["shape"]:
                    n *= int(d)
                params += n
                vision += n if name.startswith(VISION_PREFIXES) else 0
    kv = c.kv_cache_bytes(context)["total"]  # what the static cache allocates, as the planner counts it
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
        "parameters": params,  # the source model's (a quantized one's from its manifest), the vision tower's too
        "vision_parameters": vision,
        "weight_bytes": weight_bytes,
        "quantization": manifest,
        "kv_cache_bytes": kv,
        "context": context,
        "sampler_defaults": {k: v for k, v in load_sampler_defaults(path).__dict__.items() if k != "seed"},
        "chat_template": find_chat_template(path, tok_cfg) is not None,
    }
