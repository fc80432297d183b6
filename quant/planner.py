"""VRAM planner: what a model needs on the GPU at a given context, and which formats fit a budget.

Counts, for one sequence and one canvas of L tokens on CUDA as the engine runs it (static cache,
CUDA graphs, fused LM head), every buffer the code allocates, itemised:
- weights, per tensor, from the model built on the `meta` device and the format each tensor gets
  (unquantized tensors at 16 bits, as they run on a GPU);
- the static KV cache in bf16: sliding layers a ring of W-1+L slots, full layers max_tokens+L;
- the larger of two peaks, which never coincide:
  - a denoising step: the CUDA graph's fixed buffers (the fused head's raw logits and the
    self-conditioning input, both bf16 [L x V]), the graph's memory pool (the step's temporaries; at
    most the self-conditioning softmax, fp32 then bf16 [L x V]), and the sampler's buffers at their
    largest, its first step of a shape (kernels.sample's check: the sampling noise fp32, proc made
    from the raw logits in fp32 and copied to bf16 [L x V]; later steps draw the noise and make proc
    in the kernel, and write the bf16 input into the graph's buffer);
  - the prefill's last chunk (the engine prefills PREFILL_CHUNK tokens at a time), at its largest:
    at long context a full layer's attention (keys and values repeated over the query heads for
    the whole context; the mask, its negation and the additive bias [chunk x context] that
    attention turns it into), else a sliding layer's, or the routed experts over the chunk;
  (with CUDA graphs off a step holds less: no graph buffers or pool, so this stays an upper bound);
- chat's snapshot of the sliding rings (`StaticKVCache.mark`), held while a turn runs;
- CUDA context and cuBLAS/Triton workspace, 0.5 GiB outside torch's allocator (an assumption).
scripts/step_model.py traces the same step and prefill on meta tensors and records what is live;
tests/test_quant_planner.py holds this count to it (within 5%).
GB = 1e9 bytes, GiB = 2^30. The budget is compared in bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgcli.config import ModelConfig
from dgcli.model import VISION_PREFIXES
from dgcli.errors import DgError
from dgcli.units import format_bytes_both

from .formats import FORMATS
from .schemes import FORMAT_GROUP, UPGRADE_ORDER, get_scheme, smallest, tensor_formats, tensor_group

GiB = 2**30
CUDA_CONTEXT_BYTES = GiB // 2
EMBED_CHUNK_ROWS = 4096  # rows of a packed embedding dequantized at a time (quant.runtime)
PREFILL_CHUNK = 2048  # tokens per prefill pass: dgcli.engine.PREFILL_CHUNK (a test keeps them equal)
PEAKS = ("decode step", "prefill")  # sections of which only the larger counts
MOE_BLOCK_M = 16  # kernels.moe_int4's default row block: each expert's rows are padded to it
RUNTIME_16BIT = torch.bfloat16  # what unquantized tensors cost at run time
DEFAULT_BUDGET = 18_000_000_000
DEFAULT_CONTEXT = 32768
# An upgrade must leave this share of the budget spare: the caching allocator fragments, and the
# estimate is an estimate. The smallest formats are only refused when they exceed the budget itself.
UPGRADE_HEADROOM = 0.05

WEIGHT_LABELS = {"experts": "routed experts", "attention": "attention q/k/v/o", "mlp": "dense MLP",
                 "self_cond": "self-conditioning MLP", "embedding": "embedding (lookup, LM head, soft)",
                 "vision": "vision tower (all its tensors)", "other": "router, norms, scalars"}


class BudgetError(DgError):
    """The model does not fit the budget in any format the scheme allows. `hint` holds the table."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


@dataclass
class Row:
    section: str  # weights | kv cache | decode step | prefill | chat | runtime
    label: str
    nbytes: int


@dataclass
class Estimate:
    rows: list[Row]
    context: int
    canvas: int
    groups: dict[str, str]  # format group -> format ("mixed" when a checkpoint's tensors differ)
    budget_bytes: int | None = None
    scheme: str | None = None
    notes: list[str] = field(default_factory=list)

    def section(self, name: str) -> int:
        return sum(r.nbytes for r in self.rows if r.section == name)

    @property
    def weights(self) -> int:
        return self.section("weights")

    @property
    def peak_section(self) -> str:
        """The larger of the decode step's and the prefill's peaks: only that one counts."""
        return max(PEAKS, key=self.section)

    @property
    def total(self) -> int:
        return sum(r.nbytes for r in self.rows if r.section not in PEAKS) + self.section(self.peak_section)

    @property
    def total_bytes(self) -> int:
        return self.total

    @property
    def vision(self) -> int:
        """The vision tower's weights (loaded unless --no-vision)."""
        label = WEIGHT_LABELS["vision"]
        return sum(r.nbytes for r in self.rows if r.section == "weights" and r.label.startswith(label))

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.total <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "groups": self.groups, "context": self.context, "canvas": self.canvas,
                "budget_bytes": self.budget_bytes, "total_bytes": self.total, "weights_bytes": self.weights,
                "peak": self.peak_section, "fits": self.fits, "rows": [r.__dict__ for r in self.rows],
                "notes": self.notes}

    def table(self) -> str:
        """A plain-text table (GB and GiB per row), for `dg quantize` and `dg show`."""
        head = f"VRAM estimate at context {self.context:,}, canvas {self.canvas}"
        if self.scheme:
            head += f", scheme {self.scheme}"
        lines = [head + ":"]
        width = max(len(r.label) for r in self.rows) + 2
        last = None
        for r in self.rows:
            sec = r.section if r.section != last else ""
            last = r.section
            lines.append(f"  {sec:<12}{r.label:<{width}}{_gb(r.nbytes)}")
        for name in ("weights", "kv cache", *PEAKS):
            counted = "" if name not in PEAKS else ("   (the larger peak: counted)" if name == self.peak_section
                                                     else "   (the smaller peak: not counted)")
            lines.append(f"  {'':<12}{'= ' + name:<{width}}{_gb(self.section(name))}{counted}")
        total = f"  {'total':<12}{'':<{width}}{_gb(self.total)}"
        if self.budget_bytes is not None:
            spare = self.budget_bytes - self.total
            verdict = f"fits, {spare / 1e9:.2f} GB spare" if spare >= 0 else f"over by {-spare / 1e9:.2f} GB"
            total += f"   budget {self.budget_bytes / 1e9:.2f} GB: {verdict}"
        lines.append(total)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gb(n: int) -> str:
    """Decimal and binary units side by side ("18 GB" is ambiguous between 10^9 and 2^30)."""
    return format_bytes_both(n, 2, width=8)


def model_shapes(config: ModelConfig, vision: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape (the vision tower's too, unless vision=False), from the model
    built on the meta device."""
    from dgcli.model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(config, vision=vision)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def estimate(config: ModelConfig, formats: dict[str, str] | None = None, context: int = DEFAULT_CONTEXT,
             canvas: int | None = None, budget_bytes: int | None = None, groups: dict[str, str] | None = None,
             scheme: str | None = None, shapes: dict | None = None) -> Estimate:
    """The footprint with per-tensor `formats` ({name: format}; missing names run in 16 bits)."""
    L = canvas or config.canvas_length
    shapes = shapes or model_shapes(config)
    formats = formats or {}
    rows: list[Row] = []

    per_group: dict[str, int] = {}
    fmts_of: dict[str, set[str]] = {}
    for name, shape in shapes.items():
        fmt = formats.get(name, "bf16")
        if fmt == "keep":
            fmt = "bf16"  # kept tensors run in the model dtype, 16 bits on a GPU
        g = "vision" if name.startswith(VISION_PREFIXES) else tensor_group(name)  # the whole tower, one row
        per_group[g] = per_group.get(g, 0) + FORMATS[fmt].nbytes(shape, RUNTIME_16BIT)
        fmts_of.setdefault(g, set()).add(fmt)
    for g in WEIGHT_LABELS:
        if g in per_group:
            f = "/".join(sorted(fmts_of[g]))
            rows.append(Row("weights", f"{WEIGHT_LABELS[g]} [{f}]", per_group[g]))

    # KV cache, bf16: 2 (K and V) x kv heads x head dim x 2 bytes per position and layer, as
    # dgcli.cache.StaticKVCache allocates it, with its int64 maps of slot positions.
    kvb = config.kv_cache_bytes(context)
    ring = kvb["ring"]
    if kvb["sliding_layers"]:
        rows.append(Row("kv cache", f"sliding: {kvb['sliding_layers']} layers x ring of {ring:,}", kvb["sliding"]))
    if kvb["full_layers"]:
        rows.append(Row("kv cache", f"full: {kvb['full_layers']} layers x {kvb['span']:,} positions", kvb["full"]))
    rows.append(Row("kv cache", "slot and canvas positions (int64)", kvb["maps"]))

    V, H, Hq = config.vocab_size, config.hidden_size, config.num_attention_heads
    A, I = config.top_k_experts, config.moe_intermediate_size
    LV = L * V
    # A denoising step (graphs on, the CUDA default).
    rows.append(Row("decode step", f"CUDA graph buffers [{L} x {V:,}]: raw logits and self-conditioning, bf16",
                    LV * 4))
    layer_stage = 8 * L * H * 4 + 4 * L * Hq * max(config.layer_head_dim) * 2 + 2 * L * A * (3 * I + H) * 2
    if formats.get("model.decoder.embed_tokens.weight") == "int8_row":
        # kernels.int8_soft reads the logits in place: only its split-K partial sums [<=16, L, H] fp32
        soft_stage, soft_label = 16 * L * H * 4, "the soft embedding's partial sums"
    else:  # the softmax of proc in fp32 and its bf16 copy, then a decoded chunk of the embedding
        soft_stage, soft_label = max(LV * 6, LV * 2 + _dequant_scratch(shapes, formats)), "the softmax of proc"
    rows.append(Row("decode step", f"graph pool: the step's temporaries (a layer's, or {soft_label})",
                    max(soft_stage, layer_stage)))
    # kernels.sample's first draw of a shape checks its Exp(1) draws against torch's: q fp32, proc
    # made from the raw logits (fp32) and copied to bf16, once; after it the draw writes the graph's
    # input in place (partials only).
    rows.append(Row("decode step", "sampler's first step: the Exp(1) draws and proc fp32, proc bf16 "
                    "(kernels.sample's check)", LV * 10))
    # The prefill's last chunk: its largest temporaries (a full layer's masked attention at long
    # context, else a sliding layer's, or the routed experts over the chunk), with the residual.
    chunk = min(context, PREFILL_CHUNK)
    stages = [_prefill_attention(config, chunk, context, i) for i in range(config.num_hidden_layers - 1)]  # the last: K/V only
    E, pairs = config.num_experts, chunk * A
    stages.append((pairs * H * 2 + (pairs + E * (MOE_BLOCK_M - 1)) * I * 2 + chunk * H * 4 + 5 * chunk * H * 2,
                   f"experts over the chunk: {pairs:,} slot outputs and intermediates, slot sum, dense branch"))
    nbytes, label = max(stages)
    rows.append(Row("prefill", label, nbytes))
    rows.append(Row("prefill", f"residual and normed input [{chunk:,} x {H:,}]", 2 * chunk * H * 2))
    if kvb["sliding_layers"]:
        rows.append(Row("chat", "sliding rings' snapshot for a turn's rewind",
                        kvb["sliding"] + 8 * ring))  # the sliding layers share one position map
    rows.append(Row("runtime", "CUDA context + cuBLAS/Triton workspace", CUDA_CONTEXT_BYTES))

    has_vision = any(tensor_group(n) == "vision" for n in shapes)
    notes = ["the vision tower included (`--no-vision` leaves it out)" if has_vision else "text weights only",
             "the chat snapshot is only held by `dg chat`; `dg run` needs that much less"]
    return Estimate(rows, context, L, groups or _groups_of(formats, shapes), budget_bytes, scheme, notes)


def _prefill_attention(config: ModelConfig, chunk: int, context: int, i: int) -> tuple[int, str]:
    """(bytes, label) of what layer i's attention holds in the prefill's last chunk
    (dgcli.cache.StaticKVCache.encode_kv, Attention.attend, and CUDA's SDPA with a mask).

    A full layer attends over the cache's first `context` slots (views); a sliding layer over its
    ring concatenated with the chunk (new K/V tensors). With a mask, K/V are repeated over the
    query heads; the bool mask [chunk x keys] is negated and turned into a bf16 bias (mask,
    negation and bias live together: 4 bytes per element), which the memory-efficient kernel pads
    into a copy when the keys are not a multiple of 8 (mask, bias and copy: 5 bytes). The chunk's
    queries and new K/V are alive too."""
    Hq, Hk, D = config.num_attention_heads, config.layer_kv_heads[i], config.layer_head_dim[i]
    sliding = config.is_sliding(i)
    keys = config.sliding_window - 1 + config.canvas_length + chunk if sliding else context
    kv = 2 * Hq * keys * D * 2 if Hq > Hk else 0
    kv += 2 * Hk * keys * D * 2 if sliding else 0  # the concatenated ring + chunk
    mask = (5 if keys % 8 else 4) * chunk * keys
    own = Hq * chunk * D * 2 + 2 * Hk * chunk * D * 2
    kind = "sliding" if sliding else "full"
    return kv + mask + own, f"{kind} layer attention: K/V over {Hq} heads, mask and bias [{chunk:,} x {keys:,}]"


def _dequant_scratch(shapes, formats) -> int:
    """Largest temporary of the plain-PyTorch path: one expert, one dense weight, or an embedding chunk,
    decoded through fp32 (4 bytes) into 16 bits (2 bytes)."""
    most = 0
    for name, shape in shapes.items():
        fmt = formats.get(name, "bf16")
        if not FORMATS[fmt].packed:
            continue
        n = 1
        for d in shape[-2:]:
            n *= d
        if tensor_group(name) == "embedding":
            n = min(shape[0], EMBED_CHUNK_ROWS) * shape[1]
        most = max(most, n * 6)
    return most


def _groups_of(formats, shapes) -> dict[str, str]:
    seen: dict[str, set[str]] = {}
    for name in shapes:
        g = FORMAT_GROUP[tensor_group(name)]
        if g != "other":
            seen.setdefault(g, set()).add(formats.get(name, "bf16"))
    return {g: (f.pop() if len(f) == 1 else "mixed") for g, f in seen.items()}


def plan(config: ModelConfig, scheme: str = "int4", context: int = DEFAULT_CONTEXT, canvas: int | None = None,
         budget_bytes: int | None = DEFAULT_BUDGET, vision: bool = True) -> tuple[dict[str, str], Estimate]:
    """(format per group, estimate) for a scheme under a budget.

    Starts from the scheme's smallest formats; refuses (BudgetError) if even those do not fit; then
    upgrades dense, then embedding, to their preferred formats while 5% of the budget stays spare.
    Without a budget the smallest formats are used as they are. The text model decides the fit
    and those upgrades; the vision tower (vision=True: counted, carried over) goes to bf16 only if
    everything then fits with the headroom, and a note says when it does not fit at all (text
    use: --no-vision).
    """
    allowed = get_scheme(scheme)
    shapes = model_shapes(config, vision)
    has_vision = any(tensor_group(n) == "vision" for n in shapes)
    choice = {g: f for g, f in smallest(allowed).items() if g != "vision" or has_vision}

    def est(c):
        return estimate(config, tensor_formats(shapes, c), context, canvas, budget_bytes, dict(c), scheme, shapes)

    e = est(choice)
    if budget_bytes is None:
        return choice, e
    text = e.total - e.vision
    if text > budget_bytes:
        raise BudgetError(
            f"scheme {scheme} needs {text / 1e9:.2f} GB at context {context:,}, over the "
            f"{budget_bytes / 1e9:.2f} GB budget (lower --context or raise --budget)", hint=e.table())
    if text > budget_bytes * (1 - UPGRADE_HEADROOM):
        e.notes.append("less than 5% of the budget spare: allocator fragmentation may not fit")
    for group in (g for g in UPGRADE_ORDER if g in choice):
        for fmt in allowed.get(group, [])[:-1]:  # preferred first; the last is the floor we have
            trial = est({**choice, group: fmt})
            need = trial.total if group == "vision" else trial.total - trial.vision
            if need <= budget_bytes * (1 - UPGRADE_HEADROOM):
                choice, e = dict(trial.groups), trial
                break
    if not e.fits:
        e.notes.append(f"with the vision tower ({e.vision / 1e9:.2f} GB) the total is over the budget: "
                       f"load with --no-vision for text, or lower --context")
    return choice, e


def estimate_for_dir(path: str | Path, context: int = DEFAULT_CONTEXT, budget_bytes: int | None = None) -> Estimate:
    """The estimate for a checkpoint directory (for `dg show`): its manifest's formats if it was written
    by `dg quantize`, else every tensor in 16 bits."""
    path = Path(path)
    config = ModelConfig.from_file(path / "config.json")
    formats, scheme = {}, None
    manifest = path / "dg_manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            formats = {k: v["format"] for k, v in m["tensors"].items()}
            scheme = m.get("scheme")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            from dgcli.errors import CheckpointError

            raise CheckpointError(f"{manifest} is not a valid dg manifest") from None
    from dgcli.loader import has_vision_weights

    shapes = model_shapes(config, vision=config.vision_config is not None and has_vision_weights(path))
    return estimate(config, formats, context, budget_bytes=budget_bytes, scheme=scheme, shapes=shapes)
