"""`python -m kernels.aot`: compile every Triton kernel for the GPUs dg targets, without a GPU.

Each kernels module declares what to compile in a module-level `AOT` list of `_tuning.AotSpec`
(kernel name, jit function, runtime signature, constexprs and warps/stages of one config, whether it
is the default config, whether it is too large for a 99 KB part), so a new kernel adds its own
entries. This collects them, compiles each for sm_89, sm_90 and sm_120 with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32))` (real
PTX and cubin; the triton wheel bundles ptxas and cuobjdump) and prints one JSON object
per (kernel, target, config):

    kernel, target ("sm_89"), config, default, candidate (offered by the autotuner on that target),
    ok (compiled), error (first line, when not ok), shared_bytes (dynamic shared memory per block),
    shared_limit (the target's opt-in maximum), registers (per thread), spills (local memory bytes
    per thread, stack frame plus local memory: where ptxas spills registers, as these kernels have no
    local arrays; 0 means none), sass (opcode counts, e.g. {"HMMA": 16}),
    sass_scope ("loop" or "kernel").

`sass` counts the opcodes (mnemonic up to the first dot: I2F.BF16 and I2FP.F32.S32 count as I2F and
I2FP) of the main loop: the body of the innermost backward branch, i.e. the instructions from a
backward `BRA`'s target up to the branch, where no other backward branch lies inside; if a kernel
has several such loops, the longest. A kernel without one (sass_scope "kernel") is counted whole.

Options: --target sm_90 (repeatable), --kernel moe_int4 (a kernel name or its prefix before a dot;
repeatable), --configs default,large (which configs; default all), --jobs N (parallel compiles;
default: the CPU count). Compiles go through Triton's cache (TRITON_CACHE_DIR), so a second run is fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from ._tuning import SMEM_LIMIT, AotSpec

TARGETS = {f"sm_{cap}": cap for cap in SMEM_LIMIT}


CONFIGS = ("default", "large", "other")  # the default config, tiles declared too large for 99 KB parts, the rest


def specs(kernels: list[str] | None = None, configs=CONFIGS) -> list[AotSpec]:
    """Every kernels module's `AOT` entries, filtered by kernel-name prefix and kind of config."""
    import kernels as package

    out = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"kernels.{info.name}")  # by name: the package re-exports functions
        for spec in getattr(module, "AOT", ()):
            if kernels and not any(spec.kernel == k or spec.kernel.startswith(k + ".") for k in kernels):
                continue
            kind = "default" if spec.default else "large" if spec.large else "other"
            if kind in configs:
                out.append(spec)
    return out


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def compile_spec(spec: AotSpec, target: str) -> dict:
    """Compile one spec for one target and describe the result (one JSON row)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction

    cap = TARGETS[target]
    limit = SMEM_LIMIT[cap]
    row = dict(kernel=spec.kernel, target=target, config=spec.config, default=spec.default,
               candidate=spec.candidate(limit), ok=False, shared_limit=limit)
    fn = spec.fn
    if not isinstance(fn, JITFunction):  # @triton.jit gave an InterpretedFunction
        raise RuntimeError("the kernels were imported with TRITON_INTERPRET set: run python -m kernels.aot without it")
    names = fn.arg_names
    missing = [n for n in names if n not in spec.signature and n not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.kernel}: no type or constexpr value for {', '.join(missing)}")
    signature = {n: spec.signature.get(n, "constexpr") for n in names}
    gpu = GPUTarget("cuda", cap, 32)
    backend = make_backend(gpu)
    aligned = [n for n, t in spec.signature.items() if t.startswith("*")] + list(spec.divisible)
    attrs = {(names.index(n),): backend.parse_attr("D") for n in aligned}  # 16-byte / multiple-of-16
    try:
        kernel = triton.compile(ASTSource(fn, signature, spec.constexprs, attrs), target=gpu,
                                options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a result, not a crash
        lines = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"
        return row
    row.update(ok=True, shared_bytes=kernel.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = subprocess.run([_bin("cuobjdump"), "-res-usage", "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    row["registers"] = int(re.search(r"REG:(\d+)", dump).group(1))
    # ptxas spills to the stack frame (STACK) or local memory (LOCAL); these kernels have no local arrays
    row["spills"] = sum(int(re.search(rf"{f}:(\d+)", dump).group(1)) for f in ("STACK", "LOCAL"))
    row["sass_scope"], row["sass"] = main_loop_opcodes(dump)
    return row


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def main_loop_opcodes(sass: str) -> tuple[str, dict]:
    """("loop", opcode counts of the innermost loop) or ("kernel", counts of every instruction), from
    `cuobjdump -sass` text (branch targets are addresses); see the module docstring for which loop."""
    insns = [(int(m.group(1), 16), m.group(2), m.group(4)) for m in _INSN.finditer(sass)]
    loops = []
    for addr, op, operands in insns:
        target = re.search(r"0x([0-9a-f]+)\s*$", operands.strip())
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not innermost:
        return "kernel", dict(Counter(op for _, op, _ in insns))
    a, b = max(innermost, key=lambda r: r[1] - r[0])
    return "loop", dict(Counter(op for addr, op, _ in insns if a <= addr <= b))


_JOBS: list = []


def _compile_job(i: int) -> dict:
    spec, target = _JOBS[i]
    return compile_spec(spec, target)


def rows(targets=None, kernels=None, configs=CONFIGS, jobs: int | None = None):
    """Yield a JSON-ready row per (spec, target), in spec order; `jobs` processes compile in parallel."""
    global _JOBS
    targets = list(targets or TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target {', '.join(unknown)}: expected {', '.join(TARGETS)}")
    _JOBS = [(spec, t) for spec in specs(kernels, configs) for t in targets]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(_JOBS)))
    if jobs == 1:
        yield from map(_compile_job, range(len(_JOBS)))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile_job, range(len(_JOBS)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", choices=list(TARGETS), help="a target (repeatable; default all)")
    p.add_argument("--kernel", action="append", help="a kernel name or its prefix before a dot (repeatable)")
    p.add_argument("--configs", default="all",
                   help="all, or a comma list of: default (used without autotuning), large (declared too "
                        "large for 99 KB parts), other")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    a = p.parse_args(argv)
    configs = CONFIGS if a.configs == "all" else tuple(a.configs.split(","))
    if not set(configs) <= set(CONFIGS):
        p.error(f"--configs {a.configs}: expected all or a comma list of {', '.join(CONFIGS)}")
    try:
        for row in rows(a.target, a.kernel, configs, a.jobs):
            print(json.dumps(row), flush=True)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
