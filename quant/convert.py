"""The offline half: `dg quantize SRC [OUT]`, streaming a checkpoint into packed weights.

Reads the source tensor by tensor, and big tensors a block of rows (or experts) at a time, each
through its own short-lived memory map, so resident memory stays near one block plus the output
shard being filled (shards of at most ~2 GB, written as they fill). Quantizes on the GPU when
there is one, else on the CPU. Everything is written into `.OUT.partial-XXXX` beside OUT, in an
order that leaves it unloadable until the end: shards, index, tokenizer files, the manifest (with
every shard's sha256), then config.json; only then is it renamed to OUT. The temporary directory
is removed on any error, Ctrl-C, SIGTERM or SIGHUP (SIGKILL cannot be caught: what it leaves is
swept by the next `dg quantize` or `dg list`, see store.sweep_stale). A lock file `.OUT.lock` beside
OUT keeps a second run from writing the same OUT; --force replaces only a `dg quantize` output.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dgcli import __version__, store
from dgcli.config import ModelConfig
from dgcli.errors import CheckpointError, DgError, first_line
from dgcli.model import VISION_PREFIXES
from dgcli.loader import INDEX_FILE, has_vision_weights, shard_files
from dgcli.units import format_bytes

from .formats import FORMATS, SYM_DIVISORS, ASYM_SHRINK
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file, write_json
from .planner import DEFAULT_BUDGET, DEFAULT_CONTEXT, model_shapes, plan
from .schemes import tensor_formats

MAX_SHARD_BYTES = 2_000_000_000
BLOCK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}  # source elements read and quantized at a time
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
QUANTIZER = {
    "int4_sym_g64": f"round to nearest; per group the scale -m/d (m: the value of largest magnitude) "
                    f"with the least squared error over d in {list(SYM_DIVISORS)}",
    "int4_asym_g64": f"round to nearest; per group the [min*a, max*b] range with the least squared error "
                     f"over a, b in {list(ASYM_SHRINK)}",
    "int8_row": "round to nearest, scale = row absmax / 127",
    "nf4_g64": "bitsandbytes quantize_4bit(quant_type='nf4', blocksize=64, compress_statistics=False)",
}


class OutputExistsError(DgError):
    """The output directory exists and --force was not given."""


def quantize_checkpoint(src: str | Path, out: Path | None = None, scheme: str = "int4",
                        budget_bytes: int | None = DEFAULT_BUDGET, context: int = DEFAULT_CONTEXT,
                        force: bool = False, progress: bool = True) -> Path:
    """Quantize the checkpoint `src` (a directory or a model name) into `out`; returns `out`.

    out defaults to <dg models dir>/<source name>-<scheme>. The planner picks the formats within
    `budget_bytes` at `context` tokens (None: the scheme's smallest formats, no budget check) and
    its table is printed first when `progress` is on. Raises DgError subclasses for user errors.
    """
    src_path = store.resolve(str(src))
    if (src_path / MANIFEST).exists():
        raise DgError(f"{src_path} is already quantized by dg quantize; quantize the original checkpoint")
    source = describe_source(src_path)
    config = ModelConfig.from_file(src_path / "config.json")
    vision = config.vision_config is not None and has_vision_weights(src_path)  # carried over when there
    try:
        groups, estimate = plan(config, scheme, context, budget_bytes=budget_bytes, vision=vision)
    except DgError as e:
        if progress and getattr(e, "hint", ""):
            print(e.hint, file=sys.stderr)
        raise
    out = Path(out) if out is not None else store.models_dir() / f"{source['name'].split('/')[-1]}-{scheme}"
    if out.resolve() == src_path.resolve():
        raise DgError("the output directory cannot be the source directory")
    store.writable_dir(out.parent)
    with _terminating_signals_raise(), _output_lock(out):
        store.sweep_stale(out.parent)  # what interrupted runs left (see store.sweep_stale)
        try:
            store.sweep_stale(store.models_dir())
        except DgError:  # an unusable DG_HOME is not this run's concern when OUT lies elsewhere
            pass
        _check_replaceable(out, force)
        return _write(src_path, out, config, scheme, groups, estimate, source, budget_bytes, context, progress,
                      vision)


def _check_replaceable(out: Path, force: bool) -> None:
    """An existing OUT is replaced only with --force, and only if it is a `dg quantize` output."""
    if not (out.exists() or out.is_symlink()):
        return
    if not (out.is_dir() and (out / MANIFEST).is_file()):
        what = "a directory" if out.is_dir() else "a file" if out.exists() else "a dangling link"
        raise OutputExistsError(f"{out} already exists and is {what} that dg quantize did not write: "
                                f"it is never replaced, not even with --force (choose another OUT)")
    if not force:
        raise OutputExistsError(f"{out} already exists (pass --force to replace it)")


def _write(src_path, out, config, scheme, groups, estimate, source, budget_bytes, context, progress,
           vision: bool = True) -> Path:
    if progress:
        print(estimate.table(), file=sys.stderr)

    shapes = model_shapes(config, vision)
    tensors = source_tensors(src_path, shapes)
    formats = tensor_formats({name: shapes[name] for name, *_ in tensors}, groups)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=store.temp_prefix(out.name), dir=out.parent))
        writer = ShardWriter(tmp, MAX_SHARD_BYTES)
        with _progress(progress, sum(t[3] for t in tensors), len(tensors)) as bar:
            for name, shard, dtype, nbytes in tensors:
                writer.add(convert_tensor(shard, name, shapes[name], dtype, FORMATS[formats[name]], device, bar))
                bar.tensor_done(writer.bytes_added)
        shards, weight_map = writer.finish()
        write_json(tmp / INDEX_FILE, {"metadata": {"total_size": writer.bytes_added, "format": FORMAT},
                                      "weight_map": weight_map})
        copy_side_files(src_path, tmp)
        write_json(tmp / MANIFEST, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dg_version": __version__, "scheme": scheme,
            "groups": groups, "group_size": 64, "source": source,
            "plan": {"budget_bytes": budget_bytes, "context": context, "estimate": estimate.to_dict()},
            "quantizer": {f: QUANTIZER[f] for f in sorted(set(formats.values())) if f in QUANTIZER},
            "tensors": {name: {"format": formats[name], "shape": list(shapes[name]), "source_dtype": str(dtype)[6:]}
                        for name, _, dtype, _ in tensors},
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        shutil.copyfile(src_path / "config.json", tmp / "config.json")  # last: only now is tmp a checkpoint
        _fsync_dir(tmp)
        _replace(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DgError(f"no space left on the device holding {out.parent} "
                          f"(the output needs about {format_bytes(estimate.weights)})") from None
        raise DgError(f"dg quantize stopped, nothing written to {out}: {first_line(e)}") from None
    except SafetensorError as e:
        raise DgError(f"could not write a shard into {out.parent}: {e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextmanager
def _terminating_signals_raise():
    """SIGTERM and SIGHUP end the run as Ctrl-C does, by an exception (SystemExit 128+N), so that the
    cleanup on the way out runs; a second such signal during that cleanup is ignored, not obeyed."""
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def stop(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _output_lock(out: Path):
    """Hold `.OUT.lock` (flock) beside OUT for the whole run; another run holding it is a DgError.

    The file is deleted while still held on the way out; a run that locked a file already deleted
    (its inode no longer at the path) opens the new one instead.
    """
    import fcntl

    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DgError(f"cannot write into {out.parent}: {e.strerror or first_line(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DgError(f"another dg quantize is writing {out} (it holds {path}); wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)


def describe_source(path: Path) -> dict:
    """Name, repo id and revision (for a huggingface_hub snapshot) and path of a source checkpoint."""
    path = Path(path)
    info = {"name": path.name, "path": str(path.resolve())}
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent.name[len("models--"):].replace("--", "/")
        info.update(name=repo, repo=repo, revision=path.name)
    return info


def source_tensors(path: Path, shapes: dict) -> list[tuple[str, Path, torch.dtype, int]]:
    """(name, shard, dtype, bytes) of every tensor, checked against the model's names and shapes
    (`shapes` has the vision tower's when it is carried over)."""
    found = []
    skip = () if any(k.startswith(VISION_PREFIXES) for k in shapes) else VISION_PREFIXES
    for shard in shard_files(path):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if skip and key.startswith(skip):
                        continue
                    if key not in shapes:
                        raise CheckpointError(f"{shard.name}: unexpected tensor '{key}' (not a DiffusionGemma weight)")
                    sl = f.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype())
                    if shape != shapes[key]:
                        raise CheckpointError(f"{shard.name}: tensor '{key}' has shape {list(shape)}, "
                                              f"expected {list(shapes[key])}")
                    if dtype is None:
                        raise CheckpointError(f"{shard.name}: tensor '{key}' has unsupported dtype {sl.get_dtype()}")
                    found.append((key, shard, dtype, math.prod(shape) * dtype.itemsize))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard} is corrupt or truncated ({first_line(e)})") from None
    missing = sorted(set(shapes) - {t[0] for t in found})
    if missing:
        raise CheckpointError(f"{path} is missing tensor(s): {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return found


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def convert_tensor(shard: Path, name: str, shape, dtype, fmt, device, bar) -> dict[str, torch.Tensor]:
    """One source tensor -> {output name: tensor}, read and quantized a block of dim-0 slices at a time."""
    layout = fmt.layout(shape, dtype)
    outs = {s: torch.empty(shp, dtype=dt) for s, (shp, dt) in layout.items()}
    rows = shape[0] if len(shape) >= 2 else 1
    per_row = math.prod(shape) // rows
    step = max(1, BLOCK_ELEMS["cpu" if device.type == "cpu" else "cuda"] // per_row)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        with safe_open(str(shard), framework="pt", device="cpu") as f:  # a fresh map per block: see above
            block = f.get_slice(name)[a:b] if len(shape) >= 2 else f.get_tensor(name)
        for s, t in fmt.quantize(block.to(device)).items():
            if len(shape) >= 2:
                outs[s][a:b] = t.to("cpu")
            else:
                outs[s].copy_(t.to("cpu"))
        bar.advance((b - a) * per_row * dtype.itemsize)
    return {(f"{name}.{s}" if s else name): t for s, t in outs.items()}


class ShardWriter:
    """Collects output tensors and writes a shard whenever adding one would pass max_bytes."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.bytes_added = 0
        self.files: list[tuple[str, list[str], str, int]] = []  # name, tensors, sha256, bytes

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.buffer and self.buffered + n > self.max_bytes:
            self.flush()
        self.buffer.update(tensors)
        self.buffered += n
        self.bytes_added += n

    def flush(self) -> None:
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        path = self.dir / name
        save_file({k: v.contiguous() for k, v in self.buffer.items()}, str(path), metadata={"format": "pt"})
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        self.files.append((name, list(self.buffer), sha256_file(path), path.stat().st_size))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> tuple[dict, dict]:
        """Write what is left, name the shards -of-N; returns ({shard: {sha256, bytes}}, weight_map)."""
        if self.buffer or not self.files:
            self.flush()
        n = len(self.files)
        shards, weight_map = {}, {}
        for i, (name, keys, digest, size) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(self.dir / name, self.dir / final)
            shards[final] = {"sha256": digest, "bytes": size}
            weight_map.update({k: final for k in keys})
        return shards, weight_map


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config...: every top-level file but weights and config.json."""
    for p in sorted(src.iterdir()):
        if (p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
                and p.name not in (INDEX_FILE, "config.json", MANIFEST)):
            shutil.copyfile(p, dst / p.name)  # follows the huggingface_hub cache's symlinks


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (with --force) is moved aside first and deleted after."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=store.temp_prefix(out.name, "old"), dir=out.parent))
        os.rename(out, old / "x")
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _NoBar:
    def advance(self, n: int) -> None:
        pass

    def tensor_done(self, written: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Bar(_NoBar):
    """rich.progress on stderr: source bytes done (drives time left), tensors done, bytes written."""

    def __init__(self, total_bytes: int, n_tensors: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.n, self.done = n_tensors, 0
        self.progress = Progress(
            TextColumn("quantizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[tensors]} tensors"), TextColumn("{task.fields[written]} written"),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task("quantize", total=total_bytes, tensors=f"0/{n_tensors}", written="0 B")

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def tensor_done(self, written: int) -> None:
        self.done += 1
        self.progress.update(self.task, tensors=f"{self.done}/{self.n}", written=format_bytes(written, 2))

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False


def _progress(on: bool, total_bytes: int, n_tensors: int):
    return _Bar(total_bytes, n_tensors) if on else _NoBar()
