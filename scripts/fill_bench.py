"""The per-step cost of typed holes (dg fill's logit masking), on a random-init preset of scripts/bench.py.

    python scripts/fill_bench.py                        # reduced config, CPU, 8 rounds
    python scripts/fill_bench.py --rounds 16 --threads 1 --out fill.json

Times `Engine.step` (what the sampler calls: decoder pass, LM head, statistics) on one canvas with the
same cache, canvas and self-conditioning, three ways, interleaved round by round so that load on a
shared machine hits all alike: no processor; every position masked to an allowed-token set (what
int and JSON-string holes do); and choice holes (bool and enum holes scored jointly over their
positions). Also the processors alone on a random (1, L, V) logits tensor. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench  # noqa: E402  (scripts/bench.py: the presets and the random model builder)

from dgcli.engine import Engine  # noqa: E402
from dgcli.filling import HoleProcessor  # noqa: E402


def processors(L: int, V: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    sets = torch.stack([torch.rand(V, generator=g) < 0.5, torch.rand(V, generator=g) < 0.01]).to(device)
    # every position typed: 16 holes of 16 positions, two allowed sets in turn (as JSON strings and ints)
    masked = HoleProcessor(list(range(L)), [i // 16 % 2 for i in range(L)], sets, [], pad=0, device=device)
    choices, pos = [], 0
    for k in range(16):  # 8 bool holes (2 one-token options), 8 enums (5 options of 1-3 tokens)
        n, width = (2, 1) if k < 8 else (5, 3)
        options = [[int(x) for x in torch.randint(1, V, (1 + j % width,), generator=g)] for j in range(n)]
        choices.append((pos, options))
        pos += width + 4
    choice = HoleProcessor([], [], sets[:0], choices, pad=0, device=device)
    return {"none": None, "mask_all_positions": masked, "choice_16_holes": choice}


def ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(bench.PRESETS), default="reduced")
    p.add_argument("--device", default=None)
    p.add_argument("--rounds", type=int, default=8, help="timed steps per variant (interleaved)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tc = bench.text_config(a.config)
    engine = Engine(bench.build_model(tc, device, dtype))
    L, V = engine.config.canvas_length, engine.config.vocab_size
    g = torch.Generator(device=device).manual_seed(1)
    cache = engine.new_cache(max_tokens=a.prompt_len + L)
    engine.prefill(torch.randint(0, V, (1, a.prompt_len), device=device, generator=g), cache)
    canvas = torch.randint(0, V, (1, L), device=device, generator=g)
    temperature = torch.ones((), device=device)
    sc = engine.step(canvas, cache, None, temperature).proc.to(dtype, copy=True)
    procs = processors(L, V, device)
    for proc in procs.values():  # warm-up
        engine.step(canvas, cache, sc, temperature, proc)
    steps = {name: [] for name in procs}
    for _ in range(a.rounds):
        for name, proc in procs.items():
            steps[name].append(ms(lambda: engine.step(canvas, cache, sc, temperature, proc), device))
    logits = torch.randn(1, L, V, device=device, generator=g)
    alone = {}
    for name, proc in procs.items():
        if proc is not None:
            copies = [logits.clone() for _ in range(20)]  # the processor writes into its input
            alone[name] = [ms(lambda x=x: proc(x), device) for x in copies]
    summary = lambda xs: {"median_ms": round(statistics.median(xs), 2), "min_ms": round(min(xs), 2)}
    report = {
        "config": a.config, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "canvas": L, "vocab": V, "rounds": a.rounds,
        "step": {name: summary(xs) for name, xs in steps.items()},
        "processor_alone": {name: summary(xs) for name, xs in alone.items()},
    }
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
