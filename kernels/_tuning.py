"""Autotuning for the Triton kernels: candidates that fit the device, timing, and choices kept on disk.

A kernel offers a list of tiles. On CUDA (DG_AUTOTUNE on, not under the interpreter) the first call
for a shape key compiles every candidate without launching it, drops those whose shared memory
exceeds the device's per-block limit or that the compiler rejects, times the rest and keeps the
fastest. The choice is written to `$DG_HOME/tuning/<kernel>.json` under the device's name, the
Triton version and the shape key, so a later process (a new chat, the next `dg run`) reuses it.

Shape keys hold only what changes the choice: the row count goes in a clamped power-of-two bucket
(`rows_bucket`), so a chat whose prompts vary in length does not re-tune for each new length.

Tiles that need more shared memory than a 99 KB part has (sm_86/sm_89/sm_120: 101376 bytes per block)
are declared `large` by their kernel and are never candidates there; `python -m kernels.aot` and its
test prove, per target, that every remaining candidate compiles within the limit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dgcli import settings

from ._dispatch import HAS_TRITON, _build_error, interpreting, probing

SMALL_SMEM = 101376  # bytes per block (opt-in) on sm_86, sm_89 and sm_120; sm_80 has 166912, sm_90 232448
SMEM_LIMIT = {89: SMALL_SMEM, 90: 232448, 120: SMALL_SMEM}  # the targets `python -m kernels.aot` builds


def autotune_enabled(device: torch.device) -> bool:
    """DG_AUTOTUNE (on by default; any of settings' off words turns it off), compiled CUDA only."""
    return device.type == "cuda" and not interpreting() and settings.flag("DG_AUTOTUNE", True)


def rows_bucket(n: int, lo: int = 16, hi: int = 256) -> int:
    """n rounded up to a power of two and clamped to [lo, hi]: below `lo` rows a tile is mostly
    padding whatever n is, above `hi` only the grid grows, so neither changes which tile wins."""
    return min(max(1 << max(n - 1, 0).bit_length(), lo), hi)


def candidates(tiles, large, limit: int) -> tuple:
    """`tiles` minus the `large` ones on a device whose per-block shared memory is a 99 KB part's."""
    return tuple(t for t in tiles if limit > SMALL_SMEM or t not in large)


@dataclass(frozen=True)
class AotSpec:
    """One compile of a Triton kernel for `python -m kernels.aot` (see kernels/aot.py).

    `signature` lists the runtime (non-constexpr) arguments with their Triton types; every other
    argument of `fn` is a constexpr and takes its value from `constexprs`. `divisible` names the
    integer arguments that are multiples of 16 at the production shapes (the JIT specialises on
    that, and so does the code it generates). `candidate(limit)`: whether the autotuner offers this
    config on a device with that much shared memory per block."""

    kernel: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    config: dict
    default: bool
    large: bool = False
    divisible: tuple = field(default=())

    def candidate(self, limit: int) -> bool:
        return not self.large or limit > SMALL_SMEM


# ---------------------------------------------------------------------------------------------- timing


if HAS_TRITON:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    # Compiling a candidate may fail without harm: a tile the compiler rejects (CompilationError, a
    # ptxas error, a resource limit) or an MLIR pass that crashes on it (RuntimeError "PassManager::run
    # failed", as make_ttgir does for some tiles on sm_120).
    COMPILE_ERRORS: tuple = (CompilationError, PTXASError, OutOfResources, RuntimeError)
else:  # pragma: no cover - nothing to tune without triton
    OutOfResources = RuntimeError
    COMPILE_ERRORS = (RuntimeError,)

FATAL = (torch.cuda.OutOfMemoryError,) + ((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ())


def shared_limit(device: torch.device) -> int:
    """Shared memory a block may opt into on `device`, in bytes."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _time(fn: Callable[[], Any]) -> float:
    """Milliseconds per call of fn (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25)


def pick_fastest(candidates, run, default, label: str, limit: int):
    """(best config, ms) of `candidates` by timing `run(cfg)`; `run(cfg, warmup=True)` must compile
    without launching and return the compiled kernel.

    Candidates the compiler rejects, or whose compiled shared memory (`kernel.metadata.shared`)
    exceeds `limit`, are dropped before anything is timed; a launch refused for resources drops its
    candidate too. Running out of GPU memory, or a CUDA error (the context is lost after one), is
    raised. If nothing is left, `default` comes back untimed (ms NaN). Never call under CUDA-graph
    capture.
    """
    with probing():  # a candidate that fails is dropped, not the kernel marked unavailable
        fits = []
        for cfg in candidates:
            try:
                compiled = run(cfg, warmup=True)
            except FATAL:
                raise
            except COMPILE_ERRORS:
                continue
            if compiled.metadata.shared <= limit:
                fits.append(cfg)
        best, best_ms = None, math.inf
        for cfg in fits:
            try:
                ms = _time(lambda: run(cfg))
            except Exception as e:  # registers or threads, or the module refused: only the launch finds out
                if not _build_error(e):
                    raise
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
    if best is None:
        warnings.warn(f"{label}: no autotune candidate compiled within the device's limits; using the default",
                      stacklevel=3)
        return default, math.nan
    return best, best_ms


# ------------------------------------------------------------------------------------------ persistence

_memo: dict = {}  # (kernel, device name, key) -> config, this process's choices
_files: dict = {}  # kernel -> {entry: stored value}, what its file held when first read


def tuning_dir() -> Path:
    from dgcli.store import data_dir

    return data_dir() / "tuning"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _triton_version() -> str:
    import triton

    return triton.__version__


def _entry(device_name: str, key) -> str:
    return f"{device_name} | triton {_triton_version()} | {'/'.join(map(str, key))}"


def _read(kernel: str) -> dict:
    """The kernel's stored choices; a missing, unreadable or corrupt file is an empty one (re-tuned)."""
    try:
        data = json.loads((tuning_dir() / f"{kernel}.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(kernel: str, entry: str, value) -> None:
    """Add one choice to the kernel's file, atomically (temp file + os.replace): a reader sees the old
    file or the new one, and another process's choices written meanwhile are kept."""
    path = tuning_dir() / f"{kernel}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(kernel)
        data[entry] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{kernel}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only home only costs re-tuning next time
        warnings.warn(f"could not save the {kernel} tuning to {path}: {e}", stacklevel=3)


def remembered(kernel: str, key, device: torch.device, tune: Callable[[], tuple[Any, float]], default,
               encode: Callable = list, decode: Callable = tuple, valid: Callable[[Any], bool] = lambda c: True):
    """The config for (kernel, key) on `device`: this process's choice, else the stored one, else
    `tune()` -> (config, ms), stored when ms is finite. `default` when autotuning is off. Under CUDA
    graph capture nothing is tuned: the choice made by the warm-up run before it (that config is
    compiled and loaded, and the graph computes what eager does), else `default`, not remembered.
    A stored value that no longer decodes or is not `valid` (the candidate list changed) is re-tuned."""
    if not autotune_enabled(device):
        return default
    name = _device_name(device)
    memo_key = (kernel, name, key)
    if memo_key in _memo:
        return _memo[memo_key]
    entry = _entry(name, key)
    if kernel not in _files:
        _files[kernel] = _read(kernel)
    cfg = None
    if entry in _files[kernel]:
        try:
            cfg = decode(_files[kernel][entry])
        except (TypeError, ValueError):
            cfg = None
        if cfg is not None and not valid(cfg):
            cfg = None
    if cfg is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return default
        cfg, ms = tune()
        if math.isfinite(ms):
            _files[kernel][entry] = encode(cfg)
            _write(kernel, entry, encode(cfg))
    _memo[memo_key] = cfg
    return cfg


def tuned_tile(kernel: str, key, tiles, large, run, default, device: torch.device):
    """The tile for a call: autotuned once per (device, key) and remembered (see `remembered`), or
    `default` when autotuning is off. `large`: tiles that need more than a 99 KB part's shared memory."""

    def tune():
        limit = shared_limit(device)
        return pick_fastest(candidates(tiles, large, limit), run, default, kernel, limit)

    return remembered(kernel, key, device, tune, default, valid=lambda t: t in tiles)


def chosen(kernel: str) -> dict:
    """This process's choices for `kernel`, {key: config}, for benchmark reports."""
    return {str(k[2]): v for k, v in _memo.items() if k[0] == kernel}
