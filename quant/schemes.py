"""Which tensor gets which format: the one path predicate, and the named schemes.

Tensors fall into groups by name (official checkpoint keys):
- experts     `...experts.gate_up_proj`, `...experts.down_proj` (90% of the parameters)
- attention   `...self_attn.{q,k,v,o}_proj.weight`
- mlp         `...mlp.{gate,up,down}_proj.weight` (the dense branch of every layer)
- self_cond   `...self_conditioning.{gate,up,down}_proj.weight`
- embedding   `model.decoder.embed_tokens.weight` (tied: lookup, LM head, soft embedding)
- vision      the vision tower's linears `...vision_tower....linear.weight` and the projection
              `model.encoder.embed_vision.embedding_projection.weight`
- other       router, norms, scalars: always kept as they are (sensitive and tiny).
A scheme lists, per format group (experts, dense = attention + mlp + self_cond, embedding), the
formats allowed, most preferred first; the planner takes the most preferred that fits the budget,
and without a budget the last (smallest) one.
"""

from __future__ import annotations

import re

from dgcli.errors import DgError

from .formats import FORMATS

GROUP_OF = [
    (re.compile(r"^model\.encoder\.(vision_tower\..*\.linear|embed_vision\.embedding_projection)\.weight$"),
     "vision"),
    (re.compile(r"\.experts\.(gate_up_proj|down_proj)$"), "experts"),
    (re.compile(r"\.self_attn\.[qkvo]_proj\.weight$"), "attention"),
    (re.compile(r"\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$"), "mlp"),
    (re.compile(r"\.self_conditioning\.(gate|up|down)_proj\.weight$"), "self_cond"),
    (re.compile(r"^model\.decoder\.embed_tokens\.weight$"), "embedding"),
]
FORMAT_GROUP = {"experts": "experts", "attention": "dense", "mlp": "dense", "self_cond": "dense",
                "embedding": "embedding", "vision": "vision", "other": "other"}

# name -> {format group: allowed formats, most preferred first}. Upgrade order: dense, then embedding.
SCHEMES: dict[str, dict[str, list[str]]] = {
    # The default: experts int4 sym g64; dense and embedding int8 per row unless the
    # budget allows bf16 (S2/S1).
    # The vision tower likewise: bf16 when the budget allows, else int8 per row.
    "int4": {"experts": ["int4_sym_g64"], "dense": ["bf16", "int8_row"], "embedding": ["bf16", "int8_row"],
             "vision": ["bf16", "int8_row"]},
    # The same with asymmetric experts (+0.25 bpw), kept for measurement.
    "int4-asym": {"experts": ["int4_asym_g64"], "dense": ["bf16", "int8_row"],
                  "embedding": ["bf16", "int8_row"], "vision": ["bf16", "int8_row"]},
    # For comparison: dense projections in bitsandbytes NF4; fixed, no upgrades.
    "nf4": {"experts": ["int4_sym_g64"], "dense": ["nf4_g64"], "embedding": ["int8_row"], "vision": ["int8_row"]},
}
UPGRADE_ORDER = ("dense", "embedding", "vision")


def tensor_group(name: str) -> str:
    for pattern, group in GROUP_OF:
        if pattern.search(name):
            return group
    return "other"


def get_scheme(name: str) -> dict[str, list[str]]:
    if name not in SCHEMES:
        raise DgError(f"unknown quantization scheme '{name}' (known: {', '.join(SCHEMES)})")
    return SCHEMES[name]


def smallest(scheme: dict[str, list[str]]) -> dict[str, str]:
    """The most compressed choice of every group: what a scheme means without a budget."""
    return {g: fmts[-1] for g, fmts in scheme.items()}


def tensor_format(name: str, shape, choice: dict[str, str]) -> str:
    """The format a tensor gets under a per-group choice; a group format the shape cannot take
    (K not a multiple of 64) falls back to int8 per row."""
    fmt = choice.get(FORMAT_GROUP[tensor_group(name)], "keep")
    if not FORMATS[fmt].supports(shape):
        fmt = "int8_row"
    return fmt


def tensor_formats(shapes: dict[str, tuple[int, ...]], choice: dict[str, str]) -> dict[str, str]:
    return {name: tensor_format(name, shape, choice) for name, shape in shapes.items()}
