#!/usr/bin/env python
"""What `dg serve` adds per request: the same seeded generation timed in-process (`dgcli.generate`,
what `dg run` calls) and through a `dg serve` subprocess on loopback (OpenAI JSON, OpenAI SSE,
Ollama JSON), one request at a time. Prints a JSON report; docs/benchmarks.md quotes it.

    python scripts/serve_overhead.py                      # tiny, 32 tokens, 4 steps, 30 requests each
    python scripts/serve_overhead.py -m MODEL --n 10 --max-tokens 256 --steps 48

Both sides run with the same OMP_NUM_THREADS (1 unless set), so the difference is the server's:
HTTP, JSON, the chat template and tokenizer in the handler, the queue and the hop to its worker
thread. Requests go in rounds (one each way), so load from other processes falls on every way alike;
the overhead is the median of the per-round differences. Each way's first request is a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, n: int) -> list[float]:
    fn()  # warm-up
    return [_once(fn)[0] for _ in range(n)]


def _once(fn) -> list[float]:
    t0 = time.perf_counter()
    fn()
    return [time.perf_counter() - t0]


def summary(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times) * 1e3, 2), "min_ms": round(min(times) * 1e3, 2),
            "max_ms": round(max(times) * 1e3, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="tiny")
    p.add_argument("--n", type=int, default=30, help="timed requests per way")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompt", default="hello there")
    a = p.parse_args(argv)

    import httpx

    import dgcli

    settings = {"max_new_tokens": a.max_tokens, "max_denoising_steps": a.steps, "seed": 1}
    engine, tok = dgcli.load(a.model)
    want = dgcli.generate(engine, tok, a.prompt, **settings)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dgcli", "serve", "-m", a.model, "--port", "0"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = next(line.split()[4] for line in proc.stderr if line.startswith("dg serve: "))
        messages = [{"role": "user", "content": a.prompt}]
        body = {"model": a.model, "messages": messages, "seed": 1, "max_tokens": a.max_tokens,
                "max_denoising_steps": a.steps}
        ollama = {"model": a.model, "messages": messages, "stream": False,
                  "options": {"seed": 1, "num_predict": a.max_tokens, "max_denoising_steps": a.steps}}
        with httpx.Client(timeout=600) as h:
            def openai_json():
                r = h.post(url + "/v1/chat/completions", json=body)
                assert r.json()["choices"][0]["message"]["content"] == want

            def openai_sse():
                with h.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    assert [x for x in r.iter_lines() if x][-1] == "data: [DONE]"

            direct = []  # a request's wall time minus the engine's own (Ollama's durations say it)

            def ollama_json():
                t0 = time.perf_counter()
                r = h.post(url + "/api/chat", json=ollama).json()
                direct.append(time.perf_counter() - t0 - (r["prompt_eval_duration"] + r["eval_duration"]) / 1e9)
                assert r["message"]["content"] == want

            ways = {"in_process": lambda: dgcli.generate(engine, tok, a.prompt, **settings),
                    "openai_json": openai_json, "openai_sse": openai_sse, "ollama_json": ollama_json}
            # Rounds of one request each way, so that load from other processes falls on all of them.
            times = {name: timed(fn, 0) for name, fn in ways.items()}
            for _ in range(a.n):
                for name, fn in ways.items():
                    times[name] += _once(fn)
    finally:
        proc.terminate()
        proc.wait(30)

    base = times.pop("in_process")
    report = {"model": a.model, "settings": settings, "n": a.n, "omp_threads": os.environ["OMP_NUM_THREADS"],
              "in_process": summary(base)}
    direct = direct[1:]  # the warm-up
    report["ollama_json_minus_engine_time"] = {**summary(direct), "n": len(direct)}
    for name, t in times.items():
        diffs = [x - y for x, y in zip(t, base)]  # paired by round
        report[name] = {**summary(t), "overhead_median_ms": round(statistics.median(diffs) * 1e3, 2),
                        "overhead_of_mins_ms": round((min(t) - min(base)) * 1e3, 2)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
