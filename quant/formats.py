"""Packed weight formats: quantize (offline) and dequantize (runtime reference), in plain PyTorch.

A weight W [..., N, K] (N output rows, K inputs; experts add a leading E) is stored as a few tensors
named `<weight name>.<suffix>`:

- int4_sym_g64   qweight uint8 [..., N, K/2]: k=2j in the LOW nibble of byte j, k=2j+1 in the HIGH one;
                 scales float16 [..., N, K/64]; w = (q - 8) * scale, q in [0, 15]. The scale may be
                 negative: its sign is chosen so that the largest-magnitude weight of a group can use
                 level -8 (as GGML Q4_0 does), which keeps all 16 levels in play.
- int4_asym_g64  the same plus zeros float16 [..., N, K/64]; w = (q - zero) * scale (zero fractional).
- int8_row       qweight int8 [..., N, K], scales float16 [..., N]; w = q * scale, q in [-127, 127].
- nf4_g64        bitsandbytes NF4, blocksize 64, no double quantization, as bnb lays it out:
                 qweight uint8 [N, K/2] with element 2j in the HIGH nibble (bnb's order, unlike int4);
                 scales = bnb's absmax, float32 [N, K/64]; w = NF4_CODE[q] * absmax.
- bf16 / keep    not packed: stored under the original name (bf16, or the source dtype).

Group formats need K % 64 == 0 (704 and 2112, the released config's widths, are multiples of 64, not of 128).
Quantizers are round-to-nearest with a per-group scale search (see quantize_int4_sym); they run
on any device and never hold more than a small block of a tensor in fp32 on the CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

GROUP = 64

# bitsandbytes' NF4 code (bitsandbytes.functional.get_4bit_type("nf4")), for the torch reference.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@functools.cache
def nf4_code(device: torch.device) -> torch.Tensor:
    """NF4_CODE as an fp32 tensor on `device`, made once per device: a tensor built from a Python list
    is a host copy (a sync on CUDA, refused under graph capture). Shared: never write to it."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


# Scale candidates for symmetric int4: the group's signed absmax m maps to level -d.
# d=8 is Q4_0; d>8 clips the extreme a little, which lowers the MSE of the rest (measured: docs).
SYM_DIVISORS = (8.0, 8.5, 9.0)
# Asymmetric int4: shrink the group's [min, max] range independently at each end.
ASYM_SHRINK = (1.0, 0.9, 0.8)
CPU_BLOCK_GROUPS = 16384  # groups per block on the CPU: 4 MB of fp32, stays in cache


# ---------------------------------------------------------------------------- int4 packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] of values 0..15 -> uint8 [..., K/2], even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 [..., K] (inverse of pack_int4)."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------- quantizers


def _blocks(n: int, device: torch.device):
    step = CPU_BLOCK_GROUPS if device.type == "cpu" else max(n, 1)
    return ((a, min(a + step, n)) for a in range(0, n, step))


def quantize_int4_sym(w: torch.Tensor, divisors=SYM_DIVISORS) -> dict[str, torch.Tensor]:
    """w [..., K] -> {qweight uint8 [..., K/2], scales fp16 [..., K/64]}, on w's device.

    Per group of 64: try scale = -m/d for each d (m = the group's value of largest magnitude) and keep
    the one with the least squared error, measured with the fp16-rounded scale that is stored.
    """
    K = w.shape[-1]
    g = w.reshape(-1, GROUP)
    n = g.shape[0]
    q = torch.empty((n, GROUP), dtype=torch.uint8, device=w.device)
    s = torch.empty(n, dtype=torch.float16, device=w.device)
    for a, b in _blocks(n, w.device):
        x = g[a:b].float()
        m = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        best_s = best_e = None
        for d in divisors:
            sc = _safe((-m / d).half().float())
            r = torch.div(x, sc).round_().clamp_(-8, 7).mul_(sc).sub_(x)
            e = r.square_().sum(-1, keepdim=True)
            if best_s is None:
                best_s, best_e = sc, e
            else:
                better = e < best_e
                best_s, best_e = torch.where(better, sc, best_s), torch.where(better, e, best_e)
        q[a:b] = torch.div(x, best_s).round_().clamp_(-8, 7).add_(8).to(torch.uint8)
        s[a:b] = best_s.squeeze(-1).half()
    return {"qweight": pack_int4(q.view(*w.shape)), "scales": s.view(*w.shape[:-1], K // GROUP)}


def quantize_int4_asym(w: torch.Tensor, shrink=ASYM_SHRINK) -> dict[str, torch.Tensor]:
    """w [..., K] -> {qweight, scales, zeros}: per group, a searched [lo, hi] range mapped onto 0..15."""
    K = w.shape[-1]
    g = w.reshape(-1, GROUP)
    n = g.shape[0]
    q = torch.empty((n, GROUP), dtype=torch.uint8, device=w.device)
    s = torch.empty(n, dtype=torch.float16, device=w.device)
    z = torch.empty(n, dtype=torch.float16, device=w.device)
    for a, b in _blocks(n, w.device):
        x = g[a:b].float()
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        best = None
        for ra in shrink:
            for rb in shrink:
                lo, hi = mn * ra, mx * rb
                sc = _safe(((hi - lo) / 15).half().float())
                zp = (-lo / sc).half().float()
                r = torch.div(x, sc).add_(zp).round_().clamp_(0, 15).sub_(zp).mul_(sc).sub_(x)
                e = r.square_().sum(-1, keepdim=True)
                if best is None:
                    best = [sc, zp, e]
                else:
                    better = e < best[2]
                    best = [torch.where(better, t, bt) for t, bt in zip((sc, zp, e), best)]
        sc, zp, _ = best
        q[a:b] = torch.div(x, sc).add_(zp).round_().clamp_(0, 15).to(torch.uint8)
        s[a:b], z[a:b] = sc.squeeze(-1).half(), zp.squeeze(-1).half()
    shape = (*w.shape[:-1], K // GROUP)
    return {"qweight": pack_int4(q.view(*w.shape)), "scales": s.view(shape), "zeros": z.view(shape)}


def quantize_int8_row(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [..., K] -> {qweight int8 [..., K], scales fp16 [...]}: scale = absmax/127 per row."""
    x = w.float()
    s = _safe((x.abs().amax(-1, keepdim=True) / 127).half().float())
    q = torch.div(x, s).round_().clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": s.squeeze(-1).half()}


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] -> bitsandbytes NF4 (blocksize 64, fp32 absmax), reshaped to [N, K/2] and [N, K/64]."""
    F = _bnb_functional()
    N, K = w.shape
    packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=GROUP, quant_type="nf4",
                                    compress_statistics=False)
    return {"qweight": packed.reshape(N, K // 2), "scales": state.absmax.float().reshape(N, K // GROUP)}


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero group gets scale 1 (its levels all decode to 0 either way)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _bnb_functional():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        from dgcli.errors import DgError

        raise DgError("the nf4 scheme needs bitsandbytes (pip install bitsandbytes)") from None
    return F


# ---------------------------------------------------------------------------- dequantizers


def dequantize_int4(qweight, scales, zeros=None, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight).float()
    q = q.view(*q.shape[:-1], -1, GROUP)  # [..., K/64, 64]
    zero = 8.0 if zeros is None else zeros.float()[..., None]
    w = (q - zero) * scales.float()[..., None]
    return w.flatten(-2).to(dtype)


def dequantize_int8_row(qweight, scales, dtype=torch.float32) -> torch.Tensor:
    return (qweight.float() * scales.float()[..., None]).to(dtype)


def dequantize_nf4(qweight, scales, dtype=torch.float32) -> torch.Tensor:
    """Plain-torch NF4 decode of bnb's layout (element 2j in the high nibble)."""
    idx = torch.stack([qweight >> 4, qweight & 0xF], dim=-1).flatten(-2).long()  # [N, K]
    w = nf4_code(qweight.device)[idx].view(*scales.shape, GROUP) * scales.float()[..., None]
    return w.flatten(-2).to(dtype)


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]  # packed tensors, in file order; () = stored unpacked
    group: int  # 0: per row (or unpacked)
    describe: str

    @property
    def packed(self) -> bool:
        return bool(self.suffixes)

    def supports(self, shape) -> bool:
        """Whether a weight of this shape can use the format (group formats need K % 64 == 0)."""
        if not self.packed:
            return True
        if len(shape) < 2 or (self.name == "nf4_g64" and len(shape) != 2):
            return False
        return self.group == 0 or shape[-1] % self.group == 0

    def layout(self, shape, source_dtype=torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{suffix or '': (shape, dtype)} of the tensors this format stores for a weight of `shape`."""
        *lead, N, K = shape if len(shape) >= 2 else (1, *shape)
        lead = tuple(lead)
        if self.name in ("int4_sym_g64", "int4_asym_g64"):
            out = {"qweight": ((*lead, N, K // 2), torch.uint8),
                   "scales": ((*lead, N, K // GROUP), torch.float16)}
            if self.name == "int4_asym_g64":
                out["zeros"] = ((*lead, N, K // GROUP), torch.float16)
            return out
        if self.name == "int8_row":
            return {"qweight": ((*lead, N, K), torch.int8), "scales": ((*lead, N), torch.float16)}
        if self.name == "nf4_g64":
            return {"qweight": ((N, K // 2), torch.uint8), "scales": ((N, K // GROUP), torch.float32)}
        dtype = torch.bfloat16 if self.name == "bf16" else source_dtype
        return {"": (tuple(shape), dtype)}

    def nbytes(self, shape, source_dtype=torch.bfloat16) -> int:
        return sum(math.prod(shp) * dtype.itemsize for shp, dtype in self.layout(shape, source_dtype).values())

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A block of whole rows of a weight -> {suffix: tensor} (suffix '' for unpacked formats)."""
        if self.name == "int4_sym_g64":
            return quantize_int4_sym(w)
        if self.name == "int4_asym_g64":
            return quantize_int4_asym(w)
        if self.name == "int8_row":
            return quantize_int8_row(w)
        if self.name == "nf4_g64":
            return quantize_nf4(w)
        return {"": w.to(torch.bfloat16) if self.name == "bf16" else w}

    def dequantize(self, t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
        if self.name in ("int4_sym_g64", "int4_asym_g64"):
            return dequantize_int4(t["qweight"], t["scales"], t.get("zeros"), dtype)
        if self.name == "int8_row":
            return dequantize_int8_row(t["qweight"], t["scales"], dtype)
        if self.name == "nf4_g64":
            return dequantize_nf4(t["qweight"], t["scales"], dtype)
        return t[""].to(dtype)


FORMATS = {f.name: f for f in (
    Format("int4_sym_g64", ("qweight", "scales"), GROUP, "int4 symmetric, group 64, fp16 scales (4.25 bpw)"),
    Format("int4_asym_g64", ("qweight", "scales", "zeros"), GROUP,
           "int4 asymmetric, group 64, fp16 scales and zeros (4.5 bpw)"),
    Format("int8_row", ("qweight", "scales"), 0, "int8 per output row, fp16 scale (~8 bpw)"),
    Format("nf4_g64", ("qweight", "scales"), GROUP, "bitsandbytes NF4, blocksize 64, fp32 absmax (4.5 bpw)"),
    Format("bf16", (), 0, "bfloat16, unquantized"),
    Format("keep", (), 0, "unquantized, as stored in the source"),
)}
