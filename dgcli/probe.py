"""`dg probe`: run a set of prompts at one or more step budgets, trace every run, and aggregate the
commit-order numbers (dgcli/trace_metrics.py) per regime into DIR/summary.json and DIR/report.html.

Prompts are JSON Lines, one object a line: {"prompt": text, "regime"?: name (default: the file's
stem), "answer"?: text or a list of texts}. A run is right when one of its answers appears in the
generated text as a whole word or phrase (case and spacing ignored). Traces go to
DIR/traces/REGIME-NNN-sS.jsonl.gz. Ctrl-C stops the run in progress (its trace is dropped) and keeps
what finished: the summary and report say `interrupted`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import stream_generate
from .canvas_view import consume
from .config import MAX_DENOISING_STEPS
from .errors import DgError, first_line
from .files import check_not_special, read_file_limited
from .trace import write_atomic, writer
from .trace_metrics import GRANULARITIES, mean, metrics
from .trace_report import fmt, table, tau_axes

SUMMARY_FORMAT, SUMMARY_VERSION = "dg-probe-summary", 1


class ProbeInputError(DgError):
    """A prompts file or flag the user has to change (exit code 2)."""

    exit_code = 2


@dataclass
class Prompt:
    prompt: str
    regime: str
    answers: list[str]  # empty: no answer to check
    source: str  # file:line


def read_prompts(paths: list[Path]) -> list[Prompt]:
    out = []
    for path in paths:
        try:
            text = read_file_limited(path, 256 * 2**20).decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ProbeInputError(f"cannot read {path}: {getattr(e, 'strerror', None) or first_line(e)}") from None
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except ValueError:
                raise ProbeInputError(f"{where}: not JSON (expected {{\"prompt\", \"regime\"?, \"answer\"?}})") from None
            if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
                raise ProbeInputError(f"{where}: needs a non-empty \"prompt\" text")
            regime = d.get("regime", Path(path).name.split(".")[0])
            if not isinstance(regime, str) or not re.fullmatch(r"[\w.-]{1,40}", regime):
                raise ProbeInputError(f"{where}: \"regime\" must be a short name (letters, digits, - _ .)")
            answer = d.get("answer")
            answers = [answer] if isinstance(answer, str) else answer if answer is not None else []
            if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
                raise ProbeInputError(f"{where}: \"answer\" must be a text or a list of texts")
            out.append(Prompt(d["prompt"], regime, answers, where))
    if not out:
        raise ProbeInputError("no prompts: the files hold no {\"prompt\": ...} lines")
    return out


def parse_steps(text: str | None) -> list[int | None]:
    """'16,32,48' -> [16, 32, 48]; None -> [None] (the model's default)."""
    if text is None:
        return [None]
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        raise ProbeInputError(f"--steps takes step budgets separated by commas (e.g. 16,32,48), got '{text}'") \
            from None
    bad = [s for s in steps if not 1 <= s <= MAX_DENOISING_STEPS]
    if bad:
        raise ProbeInputError(f"--steps: each budget must be from 1 to {MAX_DENOISING_STEPS}, got {bad[0]}")
    return list(dict.fromkeys(steps))


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def is_right(text: str, answers: list[str]) -> bool | None:
    if not answers:
        return None
    t = normalise(text)
    return any(re.search(r"(?<!\w)" + re.escape(normalise(a)) + r"(?!\w)", t) for a in answers)


def run_one(engine, tok, p: Prompt, index: int, settings: dict, steps, out_dir: Path, model: str) -> dict:
    s = dict(settings)
    if steps is not None:
        s["max_denoising_steps"] = steps
    budget = engine.sampler_settings(**s).max_denoising_steps
    name = f"traces/{p.regime}-{index:03d}-s{budget}.jsonl.gz"
    w = writer(out_dir / name, engine, tok, model=model, settings=s, prompt=p.prompt, keep_partial=False,
               meta={"regime": p.regime, "answer": p.answers or None, "source": p.source})
    with w:
        done = consume(stream_generate(engine, tok, p.prompt, **s), [w])
        # The row comes from the trace in memory, before the file is written: a Ctrl-C/SIGTERM here
        # writes no file (keep_partial=False), so every trace on disk is a run the summary counts.
        result = row(w, done, p, index, budget, name)
    return result


def row(w, done, p: Prompt, index: int, budget: int, name: str) -> dict:
    m = metrics(w.trace)
    blocks = m["blocks"]
    return {
        "index": index, "regime": p.regime, "steps": budget, "trace": name, "text": done.text,
        "right": is_right(done.text, p.answers),
        "kendall_tau": m["summary"]["kendall_tau"],
        "block_taus": [b["kendall_tau"] for b in blocks],
        "late_burst": [b["late_burst"] for b in blocks],
        "batch_sizes": [c for b in blocks for c in b["batch_sizes"]],
        "steps_per_block": [b["steps"] for b in blocks],
        "mean_confidence": m["summary"]["mean_confidence"],
        "generated_tokens": done.generated_tokens,
        "tokens_per_second": done.tokens_per_second,
    }


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def aggregate(rows: list[dict]) -> dict:
    """The numbers for one regime at one step budget."""
    batches = [c for r in rows for c in r["batch_sizes"]]
    judged = [r for r in rows if r["right"] is not None and r["mean_confidence"] is not None]
    right = [r["mean_confidence"] for r in judged if r["right"]]
    wrong = [r["mean_confidence"] for r in judged if not r["right"]]
    return {
        "runs": len(rows),
        "kendall_tau": {str(g): mean(t[str(g)] for r in rows for t in r["block_taus"]) for g in GRANULARITIES},
        "late_burst": mean(v for r in rows for v in r["late_burst"]),
        "mean_batch_size": mean(batches),
        "max_batch_size": max(batches) if batches else None,
        "steps_per_block": mean(v for r in rows for v in r["steps_per_block"]),
        "tokens_per_second": mean(r["tokens_per_second"] for r in rows),
        "answered": len(judged),
        "accuracy": (len(right) / len(judged)) if judged else None,
        "confidence_right": mean(right),
        "confidence_wrong": mean(wrong),
        "confidence_correctness_r": pearson([r["mean_confidence"] for r in judged], [r["right"] for r in judged]),
    }


def summarise(rows: list[dict], *, model: str, settings: dict, steps: list, interrupted: bool,
              planned: int) -> dict:
    regimes: dict[str, dict] = {}
    for r in rows:
        regimes.setdefault(r["regime"], {}).setdefault(str(r["steps"]), []).append(r)
    return {
        "format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "model": model, "settings": settings,
        "steps": steps, "interrupted": interrupted, "runs_planned": planned, "runs_done": len(rows),
        "regimes": {name: {"prompts": len({r["index"] for rs in by.values() for r in rs}),
                           "by_steps": {k: aggregate(v) for k, v in by.items()}}
                    for name, by in regimes.items()},
        "runs": rows,
    }


def make_out_dir(out_dir: Path) -> None:
    """DIR and DIR/traces, or one usage line (the CLI calls it before the weights load)."""
    for name in ("summary.json", "report.html"):  # refused now, not after every run
        check_not_special(out_dir / name)
    try:
        (out_dir / "traces").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProbeInputError(f"cannot use {out_dir} as the output directory: {e.strerror or first_line(e)}") \
            from None


def probe(engine, tok, prompts: list[Prompt], out_dir: Path, *, settings: dict, steps: list, model: str,
          progress=None) -> dict:
    """Run every prompt at every step budget; write the traces, summary.json and report.html. On Ctrl-C
    the summary covers the runs that finished (and says interrupted)."""
    make_out_dir(out_dir)
    rows, interrupted = [], False
    planned = len(prompts) * len(steps)
    try:
        for budget in steps:
            for i, p in enumerate(prompts):
                rows.append(run_one(engine, tok, p, i, settings, budget, out_dir, model))
                if progress:
                    progress(len(rows), planned)
    except KeyboardInterrupt:
        interrupted = True
    summary = summarise(rows, model=model, settings=settings, steps=steps, interrupted=interrupted,
                        planned=planned)
    write_atomic(out_dir / "summary.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    write_atomic(out_dir / "report.html", html_report(summary).encode("utf-8"))
    return summary


# ---- the aggregated page ------------------------------------------------------------------------------

def tau_figure(summary: dict) -> str:
    """A PNG (data URL) of mean tau against granularity, one line per regime and step budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name, reg in summary["regimes"].items():
        for budget, a in reg["by_steps"].items():
            ys = [a["kendall_tau"][str(g)] for g in GRANULARITIES]
            ax.plot(GRANULARITIES, [math.nan if y is None else y for y in ys], marker="o", ms=3,
                    label=f"{name} ({budget} steps)")
    tau_axes(ax, "mean Kendall tau-b")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def html_report(summary: dict) -> str:
    import html

    model = summary["model"]
    who = f"{model} (a random-init model: its numbers mean nothing)" if model == "tiny" else model
    head = ["steps", "runs", *[f"tau@{g}" for g in GRANULARITIES], "late burst", "mean batch", "largest batch",
            "steps/block", "tok/s", "accuracy", "conf. right", "conf. wrong", "r(conf, right)"]
    sections = []
    for name, reg in summary["regimes"].items():
        rows = [[b, a["runs"], *[fmt(a["kendall_tau"][str(g)]) for g in GRANULARITIES], fmt(a["late_burst"]),
                 fmt(a["mean_batch_size"], 1), fmt(a["max_batch_size"]), fmt(a["steps_per_block"], 1),
                 fmt(a["tokens_per_second"], 1), fmt(a["accuracy"]), fmt(a["confidence_right"]),
                 fmt(a["confidence_wrong"]), fmt(a["confidence_correctness_r"])] for b, a in reg["by_steps"].items()]
        sections.append(f"<h2>{html.escape(name)} · {reg['prompts']} prompts</h2>{table(head, rows)}")
    state = (f"interrupted: {summary['runs_done']} of {summary['runs_planned']} runs finished"
             if summary["interrupted"] else f"{summary['runs_done']} runs")
    figure = f'<img alt="mean tau against granularity" src="{tau_figure(summary)}">' if summary["runs"] else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dg probe: {html.escape(model)}</title>
<style>body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px;
text-align: right; }} th {{ background: #f3f3f3; }} .meta {{ color: #555; }}</style></head>
<body><h1>dg probe</h1>
<p class=meta>{html.escape(who)} · {html.escape(state)} · written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>
{figure}
{''.join(sections)}
<p class=meta>Definitions: docs/trace.md. Numbers are means over the regime's committed blocks (tau, late
burst, batch sizes, steps) or runs (tok/s, confidence). A run is right when an answer appears in its text;
conf. is the run's mean confidence at commit, exp(-entropy); r is their Pearson (point-biserial)
correlation with being right.</p>
</body></html>
"""
