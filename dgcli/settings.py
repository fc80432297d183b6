"""Environment switches: every DG_* variable dg reads, read here with one rule.

A switch is on for 1/true/yes/on and off for 0/false/no/off (any case); unset or empty means its
default; anything else is a one-line error naming the variable. The README's table is `SWITCHES`.
"""

from __future__ import annotations

import functools
import os

from .errors import ConfigError

SWITCHES = {  # name: (default, what it does) — the README lists exactly these
    "DG_HOME": ("~/.local/share/dg", "where dg keeps quantized models, the tiny model, chat history and tuning"),
    "DG_DEBUG": ("off", "show the traceback behind an `error:` line"),
    "DG_CUDA_GRAPHS": ("on", "replay each denoising step from a captured CUDA graph (CUDA only)"),
    "DG_FUSED_HEAD": ("on", "LM head fused with the sampler's statistics, one pass over the vocabulary (CUDA only)"),
    "DG_KERNELS": ("auto", "ref: plain PyTorch everywhere; triton: Triton kernels (also on the CPU interpreter); "
                           "auto: Triton on CUDA"),
    "DG_AUTOTUNE": ("on", "time the Triton kernels' tile candidates once per shape and device, and keep the choice"),
    "DG_API_KEY": ("none", "the key `dg serve` requires (as --api-key): `Authorization: Bearer KEY`"),
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
KERNEL_MODES = ("ref", "triton", "auto")


def flag(name: str, default: bool) -> bool:
    """The on/off switch `name` (see the module docstring for the rule)."""
    return _parse_flag(name, os.environ.get(name, ""), default)


@functools.cache
def _parse_flag(name: str, raw: str, default: bool) -> bool:
    value = raw.strip().lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected on or off (1/0, true/false, yes/no, on/off)")


def kernels_mode() -> str:
    """DG_KERNELS: ref | triton | auto (default)."""
    return _parse_kernels(os.environ.get("DG_KERNELS", ""))


@functools.cache
def _parse_kernels(raw: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in KERNEL_MODES:
        raise ConfigError(f"DG_KERNELS={raw!r}: expected one of {', '.join(KERNEL_MODES)}")
    return value


def debug() -> bool:
    return flag("DG_DEBUG", False)
