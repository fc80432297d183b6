#!/usr/bin/env python
"""Benchmark dg on a random-init model of the DiffusionGemma shape (or a loaded one); prints JSON.

Examples:
    python scripts/bench.py --config full                        # GPU: 26B-A4B shape, bf16 experts
    python scripts/bench.py --config full --experts int4         # ... experts through the int4 MoE kernel
    python scripts/bench.py --config full --moe-only             # MoE kernel GB/s vs device bandwidth
    python scripts/bench.py --config reduced --reference --threads 1 --out cpu.json   # CPU, vs transformers
    python scripts/bench.py -m tiny                              # a model as loaded by dg
The logic lives in dgcli/bench.py (`run_bench`, `main`), which `dg bench` also calls. See docs/benchmarks.md.
"""

import sys

from dgcli.bench import main

if __name__ == "__main__":
    sys.exit(main())
