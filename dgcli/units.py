"""Byte counts for people: the one formatter for every size dg prints.

Decimal units (kB, MB, GB: powers of 1000) by default, as disks and `--budget 18GB` count; binary
units (KiB, MiB, GiB: powers of 1024) on request, as GPU memory is often quoted.
"""

from __future__ import annotations

import re

from .errors import DgError

PREFIXES = ("", "k", "M", "G", "T")


def _power(n: float, base: int) -> int:
    """The largest power of `base` (up to T) that |n| reaches."""
    p = 0
    while p < len(PREFIXES) - 1 and abs(n) >= base ** (p + 1):
        p += 1
    return p


def format_bytes(n: float, digits: int = 1, binary: bool = False, width: int = 0, power: int | None = None) -> str:
    """'2.5 GB' ('2.3 GiB' if binary); whole bytes below 1 kB. `width` pads the number (aligned
    columns); `power` fixes the unit (0 B, 1 k, 2 M, 3 G, 4 T) instead of choosing it from n."""
    base = 1024 if binary else 1000
    p = _power(n, base) if power is None else power
    if p == 0:
        return f"{n:{width}.0f} B"
    unit = f"{PREFIXES[p].upper()}iB" if binary else f"{PREFIXES[p]}B"
    return f"{n / base ** p:{width}.{digits}f} {unit}"


def format_bytes_both(n: float, digits: int = 2, width: int = 0) -> str:
    """Decimal and binary side by side with the same prefix, '18.00 GB 16.76 GiB', where "18 GB"
    alone would be ambiguous (VRAM budgets). Never below k."""
    p = max(_power(n, 1000), 1)
    return f"{format_bytes(n, digits, width=width, power=p)} {format_bytes(n, digits, True, width, power=p)}"


def parse_bytes(text: str | int) -> int:
    """'18GB' or '18G' -> 18e9, '18GiB' or '18Gi' -> 18 * 2^30, a plain number is bytes (any case, spaces allowed)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if not m or (m.group(3) and not m.group(2)):
        raise DgError(f"cannot read '{text}' as a size (examples: 18GB, 24GiB, 16000MB)")
    num, prefix, binary = float(m.group(1)), m.group(2), m.group(3)
    power = " kmgt".index(prefix) if prefix else 0
    return int(num * (1024 if binary else 1000) ** power)
