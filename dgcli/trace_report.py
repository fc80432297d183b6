"""Pictures and pages from a trace: matplotlib PNGs (Agg, no display needed), one self-contained HTML
page (a replay of the denoising drawn as the terminal's canvas, the commit heatmap, the metrics), and
a plain-text summary. The numbers come from dgcli/trace_metrics.py; nothing here needs the tokenizer
(the trace's header has the token strings).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .canvas_view import clean
from .errors import DgError
from .trace import Trace, write_atomic
from .trace_metrics import GRANULARITIES

NOISE, ACCEPTED, SETTLED, EXCLUDED = 0, 1, 2, 3
COLOURS = ["#d9d9d9", "#2ca02c", "#1f4e9c", "#ffffff"]  # noise, accepted this step, settled, after EOS
MAX_BLOCKS_DRAWN = 8


def label(trace: Trace) -> str:
    model = trace.header.get("model") or "unknown model"
    return f"{model} (a random-init model: its order means nothing)" if model == "tiny" else model


def states(steps: list[dict], block: dict | None) -> np.ndarray:
    """[S, L] per step and position: noise, accepted this step, settled (at or after the commit step),
    or after the block's first EOS. block: its metrics (None for an unfinished block: nothing settles)."""
    acc = np.array([s["accepted"] for s in sorted(steps, key=lambda s: s["step"])], dtype=bool)
    out = np.where(acc, ACCEPTED, NOISE)
    if block is not None:
        n = block["positions"]
        commit = np.array(block["commit_step"])
        out[:, :n][np.arange(1, len(out) + 1)[:, None] >= commit[None, :]] = SETTLED
        out[:, n:] = EXCLUDED
    return out


# ---- PNGs ---------------------------------------------------------------------------------------------

def write_pngs(trace: Trace, m: dict, out_dir: Path) -> list[Path]:
    """heatmap.png, profile.png, tau.png in out_dir (made if missing); each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DgError(f"cannot make {out_dir}: {e.strerror or e}") from None
    blocks = m["blocks"][:MAX_BLOCKS_DRAWN]
    written = []

    def save(fig, name):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        write_atomic(out_dir / name, buf.getvalue())
        written.append(out_dir / name)

    title = label(trace)
    rows = max(len(blocks), 1)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 1.0 + 1.6 * rows), squeeze=False)
    for ax, b in zip(axes[:, 0], blocks):
        grid = states(trace.block_steps(b["block"]), b)
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(COLOURS), vmin=0, vmax=3,
                  extent=(-0.5, grid.shape[1] - 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_ylabel(f"block {b['block'] + 1}\nstep")
    if not blocks:
        axes[0, 0].text(0.5, 0.5, "no committed block", ha="center", va="center")
    axes[-1, 0].set_xlabel("position in the canvas")
    fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(
        COLOURS[:3], ("noise", "accepted this step", "settled (final argmax from here on)"))],
        loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"commit heatmap: {title}", fontsize=9)
    fig.tight_layout(rect=(0, 0.2 / rows, 1, 1))
    save(fig, "heatmap.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for b in blocks:
        ax.plot(range(1, b["steps"] + 1), b["commit_profile"], marker="o", ms=3, label=f"block {b['block'] + 1}")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("fraction settling")
    ax.set_title(f"commit profile: {title}", fontsize=9)
    if blocks:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "profile.png")

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for b in blocks:
        ys = [b["kendall_tau"][str(g)] for g in GRANULARITIES]
        ax.plot(GRANULARITIES, [np.nan if y is None else y for y in ys], marker="o", ms=3, alpha=0.5,
                label=f"block {b['block'] + 1}")
    means = [m["summary"]["kendall_tau"][str(g)] for g in GRANULARITIES]
    ax.plot(GRANULARITIES, [np.nan if y is None else y for y in means], color="black", lw=2, marker="o",
            label="mean")
    tau_axes(ax, "Kendall tau-b (1 = left to right)")
    ax.set_title(f"commit order: {title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "tau.png")
    return written


# ---- text ---------------------------------------------------------------------------------------------

def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def text_summary(trace: Trace, m: dict) -> str:
    h, s = trace.header, m["summary"]
    lines = [f"{label(trace)} · prompt {h.get('prompt_tokens', 0)} tokens · seed {h.get('seed')}"
             + (" · interrupted" if h.get("interrupted") else ""),
             "block  steps  positions  tau@1  tau@4  tau@16  tau@64  late  batches(max)  revised  conf"]
    for b in m["blocks"]:
        t = b["kendall_tau"]
        lines.append(f"{b['block'] + 1:>5}  {b['steps']:>5}  {b['positions']:>9}  {fmt(t['1']):>5}  {fmt(t['4']):>5}"
                     f"  {fmt(t['16']):>6}  {fmt(t['64']):>6}  {fmt(b['late_burst']):>4}  "
                     f"{len(b['batch_sizes']):>7}({max(b['batch_sizes'])})  {b['revisions']:>7}  "
                     f"{fmt(b['mean_confidence'])}")
    t = s["kendall_tau"]
    lines.append(f"mean   {fmt(s['steps_per_block'], 1):>5}  {s['positions']:>9}  {fmt(t['1']):>5}  {fmt(t['4']):>5}"
                 f"  {fmt(t['16']):>6}  {fmt(t['64']):>6}  {fmt(s['late_burst']):>4}")
    return "\n".join(lines)


# ---- the HTML page ------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #555; }
.term { background: #111; color: #ddd; font: 13px/1.35 ui-monospace, monospace; padding: .8em;
        white-space: pre-wrap; word-break: break-all; border-radius: 4px; }
#canvas { min-height: 12em; margin: 0; }
#status { border-top: 1px solid #333; color: #888; padding-top: .3em; margin-top: 0; }
.acc { color: #4ec94e; font-weight: bold; } .noise { color: #666; } .draft { color: #777; font-style: italic; }
.controls { display: flex; gap: .8em; align-items: center; margin: .5em 0; }
#slider { flex: 1; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; }
.legend span { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 .3em 0 1em; }
canvas#heat { border: 1px solid #ccc; image-rendering: pixelated; }
"""

SCRIPT = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const slider = document.getElementById("slider"), play = document.getElementById("play");
const view = document.getElementById("canvas"), status = document.getElementById("status");
const noiseSel = document.getElementById("noise"), heat = document.getElementById("heat");
const COLOURS = D.colours;
function piece(id) {
  const s = D.tokens[String(id)];
  return s === undefined ? "<" + id + ">" : s.replace(/\n/g, "\u21b5").replace(/[\x00-\x1f\x7f]/g, " ");
}
function committedText(block) {
  let out = "";
  for (const b of D.blocks) {
    if (b.block >= block) break;
    for (const id of b.token_ids) {
      if (D.eos.includes(id)) return out;
      if (id !== D.pad) out += piece(id);
    }
  }
  return out;
}
function span(cls, text) {
  const e = document.createElement("span");
  e.className = cls; e.textContent = text; return e;
}
function drawCanvas(k) {
  const s = D.steps[k], mode = noiseSel.value;
  view.replaceChildren(document.createTextNode(committedText(s.block)));
  const shown = mode === "draft" ? s.argmax : s.canvas;
  const frag = document.createDocumentFragment();
  for (let p = 0; p < shown.length; p++) {
    const text = piece(shown[p]);
    if (s.accepted[p]) frag.appendChild(span("acc", text));
    else if (mode === "dots") frag.appendChild(span("noise", text.startsWith(" ") ? " \u00b7" : "\u00b7"));
    else frag.appendChild(span(mode === "draft" ? "draft" : "noise", text));
  }
  view.appendChild(frag);
  const n = s.accepted.filter(Boolean).length;
  status.textContent = "block " + (s.block + 1) + "   step " + s.step + "/" + s.max_steps + "   " + n + "/" +
    s.accepted.length + " accepted this step" + (s.stopped ? "   (stable and confident: commits)" : "");
}
function drawHeat(k) {
  const s = D.steps[k], rows = D.steps.filter(t => t.block === s.block);
  const L = s.canvas.length, cw = Math.max(2, Math.floor(1000 / L)), ch = Math.max(4, Math.floor(240 / rows.length));
  heat.width = L * cw; heat.height = rows.length * ch;
  const g = heat.getContext("2d"), commit = D.commit[String(s.block)];
  rows.forEach((r, i) => {
    for (let p = 0; p < L; p++) {
      let c = r.accepted[p] ? 1 : 0;
      if (commit) c = p >= commit.length ? 3 : (r.step >= commit[p] ? 2 : c);
      g.fillStyle = COLOURS[c];
      g.fillRect(p * cw, i * ch, cw, ch);
    }
  });
  const i = rows.indexOf(s);
  g.strokeStyle = "#d62728"; g.lineWidth = 2;
  g.strokeRect(1, i * ch + 1, heat.width - 2, ch - 2);
}
function draw() {
  const k = Number(slider.value);
  drawCanvas(k); drawHeat(k);
  document.getElementById("where").textContent = (k + 1) + " / " + D.steps.length;
}
let timer = null;
function stop() { clearInterval(timer); timer = null; play.textContent = "\u25b6 play"; }
play.addEventListener("click", () => {
  if (timer !== null) { stop(); return; }
  if (Number(slider.value) >= D.steps.length - 1) slider.value = 0;
  play.textContent = "\u23f8 pause";
  timer = setInterval(() => {
    if (Number(slider.value) >= D.steps.length - 1) { stop(); return; }
    slider.value = Number(slider.value) + 1; draw();
  }, 250);
});
slider.addEventListener("input", draw);
noiseSel.addEventListener("change", draw);
if (D.steps.length) draw(); else view.textContent = "(no steps recorded)";
document.body.dataset.ready = "1";
})();
"""


def page_data(trace: Trace, m: dict) -> dict:
    settings = trace.header.get("settings", {})
    eos = settings.get("eos_token_id") or []
    return {
        "tokens": trace.header["tokens"],
        "steps": [{k: s[k] for k in ("block", "step", "max_steps", "canvas", "accepted", "argmax", "stopped")}
                  for s in trace.steps],
        "blocks": [{"block": b["block"], "token_ids": b["token_ids"]} for b in trace.blocks],
        "commit": {str(b["block"]): b["commit_step"] for b in m["blocks"]},
        "eos": eos if isinstance(eos, list) else [eos],
        "pad": settings.get("pad_token_id"),
        "colours": COLOURS,
    }


def metrics_table(m: dict) -> str:
    head = ["block", "steps", "positions", *[f"tau@{g}" for g in GRANULARITIES], "late burst", "batches",
            "largest batch", "revisions", "mean confidence"]
    rows = []
    for b in m["blocks"]:
        rows.append([b["block"] + 1, b["steps"], b["positions"], *[fmt(b["kendall_tau"][str(g)]) for g in
                     GRANULARITIES], fmt(b["late_burst"]), len(b["batch_sizes"]), max(b["batch_sizes"]),
                     b["revisions"], fmt(b["mean_confidence"])])
    s = m["summary"]
    rows.append(["mean", fmt(s["steps_per_block"], 1), s["positions"], *[fmt(s["kendall_tau"][str(g)]) for g in
                 GRANULARITIES], fmt(s["late_burst"]), "", s["max_batch_size"], s["revisions"],
                 fmt(s["mean_confidence"])])
    return table(head, rows)


def table(head: list, rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def script_json(data) -> str:
    """JSON safe inside a <script> element: no '<' at all, so neither '</script' nor '<!--' can occur."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def html_page(trace: Trace, m: dict) -> str:
    h = trace.header
    s = h.get("settings", {})
    meta = (f"{label(trace)} · prompt {h.get('prompt_tokens', 0)} tokens · seed {h.get('seed')} · "
            f"steps ≤ {s.get('max_denoising_steps')} · entropy bound {s.get('entropy_bound')} · "
            f"temperature {s.get('t_max')}→{s.get('t_min')}" + (" · interrupted" if h.get("interrupted") else ""))
    prompt = f"<p class=meta>prompt: {html.escape(clean(h['prompt'])[:500])}</p>" if h.get("prompt") else ""
    legend = "".join(f'<span style="background:{c}"></span>{t}' for c, t in zip(
        COLOURS[:3], ("noise", "accepted this step", "settled (final argmax from here on)")))
    n = max(len(trace.steps) - 1, 0)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dg trace: {html.escape(h.get('model') or '')}</title>
<style>{STYLE}</style></head>
<body>
<h1>dg trace</h1>
<p class=meta>{html.escape(meta)}</p>{prompt}
<h2>Replay</h2>
<div class=controls><button id=play type=button>&#9654; play</button>
<input id=slider type=range min=0 max={n} value=0 aria-label="step">
<span id=where></span>
<label>noise <select id=noise><option>text</option><option>dots</option><option>draft</option></select></label></div>
<pre id=canvas class=term></pre>
<div id=status class=term></div>
<h2>Commit heatmap (the replay's block; rows are steps, the red box the replay's step)</h2>
<canvas id=heat></canvas>
<p class=legend>{legend}</p>
<h2>Commit order</h2>
{metrics_table(m)}
<p class=meta>Definitions: docs/trace.md. tau@g: Kendall tau-b between window index and mean commit step,
windows of g positions (1 = strictly left to right, 0 = no order, - = undefined). Late burst: fraction
settling in the last 25% of a block's steps.</p>
<script type="application/json" id="data">{script_json(page_data(trace, m))}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_html(trace: Trace, m: dict, path: Path) -> Path:
    write_atomic(path, html_page(trace, m).encode("utf-8"))
    return path


def tau_axes(ax, ylabel: str) -> None:
    """The axes of a tau-against-granularity plot (the report's and dg probe's)."""
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.7, 90)  # fixed: a plot whose taus are all undefined has no data to scale to
    ax.set_xticks(GRANULARITIES, [str(g) for g in GRANULARITIES])
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("granularity (positions per window)")
    ax.set_ylabel(ylabel)
