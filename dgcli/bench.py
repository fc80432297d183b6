"""`dg bench`: runs scripts/bench.py of a source checkout.

The benchmark is a developer tool: it builds the transformers reference through tests/reference.py,
so it is not part of an installed dg. Without the script, importing this module fails (ImportError),
which `dg bench` reports as "not part of this install".
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
if not SCRIPT.is_file():
    raise ImportError(f"{SCRIPT} is missing: dg bench runs from a source checkout")


def load():
    """scripts/bench.py as a module (once per process)."""
    name = "dg_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    return load().main(argv)
