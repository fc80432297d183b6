"""Commit-order numbers from a trace (dgcli/trace.py), by the definitions in docs/trace.md.

Per committed block of S steps (steps numbered 1..S; only positions up to the block's first EOS, the
EOS included):
  commit step of p    the first step s with argmax_t[p] == argmax_S[p] for every t in s..S
  kendall_tau[g]      positions in consecutive windows of g, a window's commit step the mean of its
                      positions'; Kendall's tau-b between window index and window commit step
                      (1 strictly left to right, -1 right to left, 0 no order; None when undefined)
  commit_profile      fraction of positions whose commit step is s, for s = 1..S
  batch_sizes         positions settling at each step at which any settle, in step order
  late_burst          fraction whose commit step is in the last 25% of the steps (4s > 3S)
  revisions           positions whose argmax changed after the step they were first accepted
  confidence          exp(-entropy) at each position's commit step
A block the trace holds no block record for (interrupted) is not measured.
"""

from __future__ import annotations

import math

import numpy as np

from .trace import Trace

GRANULARITIES = (1, 4, 16, 64)


def kendall_tau_b(x, y) -> float | None:
    """Kendall's tau-b of two equal-length sequences; None when undefined (fewer than two values, or
    either sequence constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return None
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    untied_x, untied_y = int(np.count_nonzero(dx)), int(np.count_nonzero(dy))
    if untied_x == 0 or untied_y == 0:
        return None
    return float((dx * dy).sum() / math.sqrt(untied_x * untied_y))


def kept_length(final: list[int], eos_ids) -> int:
    """Positions up to and including the first EOS (all of them without one)."""
    for p, t in enumerate(final):
        if t in eos_ids:
            return p + 1
    return len(final)


def commit_steps(argmax: np.ndarray) -> np.ndarray:
    """argmax: [S, n] ids per step. The 1-based first step from which each position keeps its final id."""
    S = argmax.shape[0]
    same = argmax == argmax[-1]
    # the last step at which a position differs from its final id; it settles one step after that
    differs = ~same
    last_diff = np.where(differs.any(axis=0), S - 1 - np.argmax(differs[::-1], axis=0), -1)
    return last_diff + 2


def window_order(commit: np.ndarray, g: int) -> float | None:
    means = [commit[i:i + g].mean() for i in range(0, len(commit), g)]
    return kendall_tau_b(range(len(means)), means)


def block_metrics(steps: list[dict], eos_ids) -> dict:
    steps = sorted(steps, key=lambda s: s["step"])
    S = len(steps)
    argmax = np.array([s["argmax"] for s in steps])
    n = kept_length(steps[-1]["argmax"], eos_ids)
    argmax = argmax[:, :n]
    accepted = np.array([s["accepted"] for s in steps], dtype=bool)[:, :n]
    entropy = np.array([s["entropy"] for s in steps], dtype=float)[:, :n]
    commit = commit_steps(argmax)
    counts = np.bincount(commit, minlength=S + 1)[1:]
    revised = 0
    for p in range(n):
        first = np.flatnonzero(accepted[:, p])
        if len(first) and (argmax[first[0]:, p] != argmax[first[0], p]).any():
            revised += 1
    confidence = np.exp(-entropy[commit - 1, np.arange(n)])
    return {
        "block": steps[0]["block"],
        "steps": S,
        "positions": n,
        "commit_step": commit.tolist(),
        "kendall_tau": {str(g): window_order(commit, g) for g in GRANULARITIES},
        "commit_profile": (counts / n).tolist(),
        "batch_sizes": [int(c) for c in counts if c],
        "late_burst": float(np.mean(4 * commit > 3 * S)),
        "revisions": revised,
        "accepted_positions": int(accepted.any(axis=0).sum()),
        "confidence_at_commit": confidence.tolist(),
        "mean_confidence": float(confidence.mean()),
    }


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def metrics(trace: Trace) -> dict:
    """{"blocks": [per committed block], "summary": {means over blocks, the generation's stats}}."""
    eos = trace.header["settings"].get("eos_token_id") or []
    eos = {e for e in (eos if isinstance(eos, list) else [eos]) if type(e) is int}
    blocks = []
    for b in trace.blocks:
        steps = trace.block_steps(b["block"])
        if steps:
            blocks.append(block_metrics(steps, eos))
    batches = [c for b in blocks for c in b["batch_sizes"]]
    done = trace.done or {}
    summary = {
        "blocks": len(blocks),
        "steps_per_block": mean(b["steps"] for b in blocks),
        "positions": sum(b["positions"] for b in blocks),
        "kendall_tau": {str(g): mean(b["kendall_tau"][str(g)] for b in blocks) for g in GRANULARITIES},
        "late_burst": mean(b["late_burst"] for b in blocks),
        "mean_batch_size": mean(batches),
        "max_batch_size": max(batches) if batches else None,
        "revisions": sum(b["revisions"] for b in blocks),
        "mean_confidence": mean(c for b in blocks for c in b["confidence_at_commit"]),
        "generated_tokens": done.get("generated_tokens"),
        "tokens_per_second": done.get("tokens_per_second"),
        "interrupted": bool(trace.header.get("interrupted")),
    }
    return {"blocks": blocks, "summary": summary}
