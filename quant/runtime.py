"""The runtime half: quantized modules with the forward signatures of the ones they replace.

`prepare_quantized(model, path)` is the loader's `prepare` hook (`dgcli.loader.load_model(..., prepare=)`),
called on a model still on the `meta` device when the directory has a `dg_manifest.json` (the loader
never imports quant): it verifies the manifest and the shards' checksums, then
swaps modules in place so that the model's state dict names the packed tensors
(`<weight name>.qweight`, `.scales`, `.zeros`); `load_state_dict(assign=True)` then fills them.

- `Packed` holds one packed weight and decodes it: whole, one expert, or a range of rows.
- `QuantLinear` replaces a bias-free `nn.Linear`; `QuantExperts` replaces `Experts`;
  `QuantEmbedding` replaces the tied `Embedding` (lookup, LM head, soft embedding).
The plain-PyTorch path dequantizes per expert / per weight / per vocabulary chunk, in the
activations' dtype, and runs everywhere. On CUDA symmetric int4 experts go through
`kernels.moe_int4` (its dispatcher picks Triton; DG_KERNELS=ref forces its reference), int8 projections and
the int8 LM head through `kernels.int8_linear` (Triton only: the codes are read once, never decoded
into a bf16 copy), and NF4 weights use bitsandbytes. The int8 soft embedding goes through
`kernels.int8_soft` on every device (its reference off CUDA), from the logits when they are in
the model dtype (`soft_logits`: the softmax is made inside the kernel).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dgcli.errors import CheckpointError
from dgcli.model import VISION_PREFIXES, Embedding, Experts
from kernels._dispatch import use_triton
from kernels.int8_linear import int8_linear
from kernels.int8_soft import int8_soft, int8_soft_logits, lse_rows
from kernels.moe_int4 import moe_int4

from .formats import FORMATS, GROUP, nf4_code
from .manifest import read_manifest, verify_shards

EMBED_CHUNK_ROWS = 4096  # vocabulary rows decoded at a time by QuantEmbedding (quant.planner counts it)


class Packed(nn.Module):
    """One packed weight of logical shape `shape`, with its format's buffers (qweight, scales, zeros).

    `dtype` is what it decodes to by default: the model's dtype, set after loading (like a
    Parameter's dtype). `.to(dtype)` changes only that; `.to(device)` moves the buffers, whose
    stored dtypes never change (fp16 scales stay fp16).
    """

    def __init__(self, fmt: str, shape, device=None):
        super().__init__()
        self.format = FORMATS[fmt]
        if not self.format.packed:
            raise ValueError(f"{fmt} is not a packed format")
        self.shape = tuple(shape)
        for suffix, (shp, dt) in self.format.layout(self.shape).items():
            self.register_buffer(suffix, torch.empty(shp, dtype=dt, device=device))
        self.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def extra_repr(self) -> str:
        return f"{self.format.name}, shape={list(self.shape)}"

    def dequantize(self, dtype=None, index=None) -> torch.Tensor:
        """The weight (or weight[index], index along dim 0: an expert, rows, a slice) in `dtype`."""
        t = {s: getattr(self, s) for s in self.format.suffixes}
        if index is not None:
            t = {s: v[index] for s, v in t.items()}
        return self.format.dequantize(t, dtype or self.dtype)

    def _apply(self, fn, recurse=True):
        # Probe what fn does to a floating tensor: follow its device, adopt its dtype for decoding.
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.qweight.device))
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(probe.device)
        self.dtype = probe.dtype
        return self


class QuantLinear(nn.Module):
    """A bias-free nn.Linear whose weight is packed (int8 per row, int4 g64 or NF4)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Packed(fmt, (out_features, in_features), device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.format.name == "nf4_g64" and x.is_cuda and _bnb() is not None:
            return _bnb_linear(x, self.weight)
        if (kernel := _int8_kernel(self.weight, x)) is not None:
            return kernel(x, self.weight.qweight, self.weight.scales)
        return F.linear(x, self.weight.dequantize(x.dtype))


class QuantExperts(Experts):
    """`Experts` with packed gate_up [E, 2I, H] and down [E, H, I] (either may stay a Parameter).

    Same arithmetic as `Experts.forward` (dgcli.model.moe: pairs sorted by expert, routing weight per
    pair, slots summed in fp32); only `grouped_mlp` differs: one expert's weights are decoded at a
    time, never the whole tensor. Symmetric int4 on CUDA goes to kernels.moe_int4 instead.
    """

    def __init__(self, experts: Experts, formats: dict[str, str]):
        nn.Module.__init__(self)
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)
            fmt = formats.get(name, "keep")
            if FORMATS[fmt].packed:
                setattr(self, name, Packed(fmt, p.shape, p.device))
            else:
                setattr(self, name, nn.Parameter(torch.empty_like(p)))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gu, dn = self.gate_up_proj, self.down_proj
        if x.is_cuda and _int4_sym(gu) and _int4_sym(dn):
            return moe_int4(x, index, weights, gu.qweight, gu.scales, dn.qweight, dn.scales, group_size=GROUP)
        return super().forward(x, index, weights)  # dgcli.model.moe around grouped_mlp below

    def slots(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gu, dn = self.gate_up_proj, self.down_proj
        if x.is_cuda and _int4_sym(gu) and _int4_sym(dn):
            return moe_int4(x, index, weights, gu.qweight, gu.scales, dn.qweight, dn.scales, group_size=GROUP,
                            slots=True)
        return super().slots(x, index, weights)

    def grouped_mlp(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`Experts.grouped_mlp`, decoding one present expert's weights at a time.

        The loop needs each expert's rows on the host: `offsets.tolist()` is free on the CPU; on
        CUDA only the formats kernels.moe_int4 does not read (int4 asym, int8 experts) get here, at
        one sync per layer. Decoding every expert up front instead would cost E times the memory.
        """
        gu, dn = self.gate_up_proj, self.down_proj
        ys = torch.empty_like(xs)
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                gate, up = F.linear(xs[start:end], _expert(gu, e, xs.dtype)).chunk(2, dim=-1)
                ys[start:end] = F.linear(F.gelu(gate, approximate="tanh") * up, _expert(dn, e, xs.dtype))
            start = end
        return ys


def _expert(w, e: int, dtype) -> torch.Tensor:
    return w.dequantize(dtype, e) if isinstance(w, Packed) else w[e].to(dtype)


class QuantEmbedding(Embedding):
    """The tied embedding, packed (int8 per row by default): one copy serves all three uses."""

    def __init__(self, vocab: int, hidden: int, fmt: str, device=None):
        nn.Module.__init__(self)
        self.weight = Packed(fmt, (vocab, hidden), device)
        self.scale = hidden**0.5

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(index=ids) * self.embed_scale()

    def chunks(self, dtype):
        for a, b in _spans(self.weight.shape[0]):
            yield a, b, self.weight.dequantize(dtype, slice(a, b))

    def soft(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, L, V) -> (B, L, H), accumulated in fp32.

        int8 rows: kernels.int8_soft (Triton on CUDA reads each code once; elsewhere its reference
        converts each chunk of codes once to the dtype), never a decode of the table through fp32
        (which moved ~21 bytes per weight, 15 GB a step at full size). Other formats: decoded a
        chunk of rows at a time."""
        w, dtype = self.weight, probs.dtype
        if w.format.name == "int8_row":
            return int8_soft(probs, w.qweight, w.scales).to(dtype) * self.embed_scale()
        acc = torch.zeros(*probs.shape[:-1], w.shape[1], dtype=torch.float32, device=probs.device)
        for a, b, chunk in self.chunks(dtype):
            acc += torch.matmul(probs[..., a:b], chunk).float()
        return acc.to(dtype) * self.embed_scale()

    def soft_logits(self, sc_logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(sc_logits (B, L, V)) -> `soft` of it, fused for int8 rows: kernels.int8_soft's
        lse_rows reads the logits once for each row's logsumexp, int8_soft_logits reads them again
        and makes the probabilities in registers (no fp32 softmax, no probabilities written: ~0.27 GB
        where the unfused input moved ~0.94 GB a step at full size). Logits in another dtype than the
        model's, and other formats: the unfused `Embedding.soft_logits`. `lse` (B, L): the logits'
        logsumexp when the sampler's fused draw made it (kernels.sample): then lse_rows is skipped."""
        w = self.weight
        if w.format.name != "int8_row" or sc_logits.dtype != w.dtype:
            return super().soft_logits(sc_logits)
        if lse is None:
            lse = lse_rows(sc_logits)
        return int8_soft_logits(sc_logits, lse, w.qweight, w.scales, out_dtype=w.dtype, factor=self.embed_scale())

    def head_weight(self):
        if self.weight.format.name != "int8_row":  # kernels.lm_head reads int8 rows, not 4-bit groups
            return None
        return self.weight.qweight, self.weight.scales

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if (kernel := _int8_kernel(self.weight, h)) is not None:  # codes read once, no decoded copy
            return kernel(h, self.weight.qweight, self.weight.scales)
        out = torch.empty(*h.shape[:-1], self.weight.shape[0], dtype=h.dtype, device=h.device)
        for a, b, w in self.chunks(h.dtype):
            out[..., a:b] = F.linear(h, w)
        return out


def _spans(rows: int):
    return ((a, min(a + EMBED_CHUNK_ROWS, rows)) for a in range(0, rows, EMBED_CHUNK_ROWS))


# ---------------------------------------------------------------------------- module swap


def quantize_modules(model: nn.Module, formats: dict[str, str]) -> None:
    """Replace, in place, each module that has a weight in a packed format ({tensor name: format})."""
    by_module: dict[str, dict[str, str]] = {}
    for name, fmt in formats.items():
        if FORMATS[fmt].packed:
            module, param = name.rsplit(".", 1)
            by_module.setdefault(module, {})[param] = fmt
    vision = hasattr(getattr(getattr(model, "model", None), "encoder", None), "vision_tower")
    for path, fmts in by_module.items():
        if not vision and path.startswith(VISION_PREFIXES):  # loaded without its tower (--no-vision)
            continue
        parent_path, child = path.rsplit(".", 1)
        try:
            parent = model.get_submodule(parent_path)
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(f"the manifest names a packed tensor of '{path}', which this model lacks") from None
        setattr(parent, child, _replacement(path, old, fmts))


def _replacement(path: str, old: nn.Module, fmts: dict[str, str]) -> nn.Module:
    device = next(iter(old.parameters()), torch.empty(0)).device
    if isinstance(old, nn.Linear) and old.bias is None and set(fmts) == {"weight"}:
        return QuantLinear(old.in_features, old.out_features, fmts["weight"], device)
    if isinstance(old, Experts) and set(fmts) <= {"gate_up_proj", "down_proj"}:
        return QuantExperts(old, fmts)
    if isinstance(old, Embedding) and set(fmts) == {"weight"}:
        V, H = old.weight.shape
        return QuantEmbedding(V, H, fmts["weight"], device)
    raise CheckpointError(f"cannot load '{path}' ({type(old).__name__}) with packed {sorted(fmts.items())}")


def prepare_quantized(model: nn.Module, path: str | Path) -> dict:
    """Verify a quantized directory and swap the model's modules (on meta) to match it; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_shards(path, manifest)
    quantize_modules(model, {name: t["format"] for name, t in manifest["tensors"].items()})
    model.register_load_state_dict_post_hook(_adopt_model_dtype)
    model.quantization = {"scheme": manifest.get("scheme"), "groups": manifest.get("groups", {})}
    return manifest


def _adopt_model_dtype(model: nn.Module, incompatible_keys) -> None:
    """After loading: packed weights decode to the dtype the loader gave every other floating weight."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for m in model.modules():
        if isinstance(m, Packed):
            m.dtype = dtype


# ---------------------------------------------------------------------------- fast paths


def _int4_sym(w) -> bool:
    return isinstance(w, Packed) and w.format.name == "int4_sym_g64"


def _int8_kernel(w: Packed, x: torch.Tensor):
    """kernels.int8_linear for an int8_row weight when it runs as Triton (CUDA, or DG_KERNELS=triton),
    else None: the plain path (decode the weight, then F.linear) is the reference."""
    return int8_linear if w.format.name == "int8_row" and use_triton(x) else None


@functools.cache
def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def _bnb_linear(x: torch.Tensor, w: Packed) -> torch.Tensor:
    bnb = _bnb()
    from bitsandbytes.functional import QuantState

    # nf4_code, not bnb's get_4bit_type: that builds the code from a list on every call (a sync)
    state = QuantState(absmax=w.scales.reshape(-1), shape=torch.Size(w.shape), blocksize=GROUP, quant_type="nf4",
                       code=nf4_code(x.device), dtype=x.dtype)
    return bnb.matmul_4bit(x, w.qweight.reshape(-1, 1).t(), quant_state=state)
