"""Routed experts on packed 4-bit weights: a Triton grouped matmul, its PyTorch reference, a dispatcher.

Semantics are those of `dgcli.model.Experts.forward`: for token t and slot j with expert e = index[t, j],
    [g; u] = W_gate_up[e] @ x[t]      (rows 0..I-1 gate, I..2I-1 up)
    y      = W_down[e] @ (gelu_tanh(g) * u)
    out[t] += weights[t, j] * y
Weight format (fixed; quant/ writes exactly this): W [E, N, K] is stored as
    q uint8 [E, N, K/2]: byte j of a row holds k=2j in the low nibble and k=2j+1 in the high nibble,
    s fp16  [E, N, K/g]: w[e, n, k] = (nibble - 8) * s[e, n, k // g], g = 64 (704 = 11·64, so not 128).
Shapes: T tokens, A slots per token (top-k), P = T·A (token, slot) pairs, E experts, H hidden, I expert width.

The Triton path (the design of vLLM's fused_moe / exllama, re-implemented):
1. `moe_align`: sort the P pairs by expert and pad each expert's run to a multiple of BLOCK_M, with a
   static upper bound on the padded length and no host sync (CUDA-graph friendly); one single-program
   Triton kernel (a counting sort, `_align_kernel`), `moe_align_ref` the same in ~25 PyTorch ops.
2. `_gate_up_kernel`: one program per (BLOCK_M rows of one expert, BLOCK_N columns of I). It computes
   the gate and up tiles together and writes h = gelu_tanh(g)·u once, in x's dtype.
3. `_down_kernel`: same tiling over H. It multiplies by the routing weight in the epilogue and writes
   y[pair], which is summed over the A slots in a fixed order (deterministic, no atomics).
h [cap, I] is laid out in sorted order, cap = P + E·(BLOCK_M-1) rounded up (3968 rows for 2048 pairs at
the full size), but only the P real pairs' rows of it are ever touched: gate_up stores only those (a
block's real pairs come first, so they are a prefix of it), and down reads the block's first row in
place of each padding row, so padding rows are never written nor read and h is left uninitialised.
Row blocks past the padded end (block_expert -1) return at once.
K is tiled by one scale group, split into its even (low-nibble) and odd (high-nibble) columns. So a
tile is two `tl.dot`s of the small integers (q - 8), exact in fp16/bf16, and the group's fp16 scale
multiplies the fp32 partial product per output column (the Marlin/exllama order). That is both
cheaper and more exact than scaling every weight before the dot.

Dequantisation (`_nibbles`) uses no int-to-float conversion (I2F is a quarter-rate instruction, and
the first version issued 64 of them per loop iteration per thread): the nibble is OR'd into the low
mantissa bits of a constant whose mantissa unit is 1 (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400,
fp32 2^23), so the bits read as constant + nibble, and one subtract of constant + 8 (the zero point
folded in) leaves nibble - 8 exactly. `python -m kernels.aot` shows the main loops without I2F.
A weight tile is dequantised once per BLOCK_M rows of its expert; the autotuner's BLOCK_M 32 and 64
serve experts with more rows from one conversion.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

from dgcli.model import moe, moe_slots

from ._dispatch import HAS_TRITON, launch, pick
from ._tuning import AotSpec, autotune_enabled, candidates, chosen, pick_fastest, remembered, rows_bucket, shared_limit

# --------------------------------------------------------------------------------------------------
# Format oracles: slow, obvious definitions of the format above. Tests check quant/'s packer
# (quant.formats.pack_int4 / quantize_int4_sym, the production code) and the kernels against them.


def pack_int4_oracle(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int4 of w [..., N, K] with one fp16 scale per group of K.

    Returns q uint8 [..., N, K/2] (low nibble = even k) and s fp16 [..., N, K/group_size]. The scale
    is absmax/7, so the code -8 is never produced; a zero group gets scale 0.
    """
    *lead, N, K = w.shape
    if K % group_size or group_size % 2:
        raise ValueError(f"K={K} must be a multiple of an even group_size={group_size}")
    g = w.float().reshape(*lead, N, K // group_size, group_size)
    s = (g.abs().amax(-1) / 7.0).to(torch.float16)
    div = torch.where(s == 0, torch.ones_like(s), s).float()[..., None]
    q = (torch.round(g / div).clamp(-8, 7) + 8).to(torch.uint8).reshape(*lead, N, K // 2, 2)
    return q[..., 0] | (q[..., 1] << 4), s


def unpack_int4_oracle(q: torch.Tensor, s: torch.Tensor, group_size: int = 64, dtype=torch.float32) -> torch.Tensor:
    """Dequantise: q uint8 [..., N, K/2], s [..., N, K/g] -> w [..., N, K] in `dtype`
    (computed in fp32, so the only rounding is the final cast)."""
    *lead, N, half = q.shape
    nib = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(*lead, N, 2 * half)
    w = (nib.float() - 8.0).reshape(*lead, N, -1, group_size) * s.float()[..., None]
    return w.reshape(*lead, N, 2 * half).to(dtype)


# --------------------------------------------------------------------------------------------------
# Reference


def _check(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size):
    T, H = x.shape
    E, two_i, half_h = gate_up_q.shape
    I = two_i // 2
    if index.shape != weights.shape or index.dim() != 2 or index.shape[0] != T:
        raise ValueError(f"index {tuple(index.shape)} and weights {tuple(weights.shape)} must both be [T={T}, A]")
    if two_i % 2 or half_h * 2 != H:
        raise ValueError(f"gate_up_q {tuple(gate_up_q.shape)} does not match [E, 2I, H/2] for H={H}")
    if H % group_size or I % group_size or group_size % 2:
        raise ValueError(f"H={H} and I={I} must be multiples of an even group_size={group_size}")
    if gate_up_s.shape != (E, two_i, H // group_size):
        raise ValueError(f"gate_up_s {tuple(gate_up_s.shape)} must be {(E, two_i, H // group_size)}")
    if down_q.shape != (E, H, I // 2) or down_s.shape != (E, H, I // group_size):
        raise ValueError(
            f"down_q {tuple(down_q.shape)} / down_s {tuple(down_s.shape)} must be {(E, H, I // 2)} / {(E, H, I // group_size)}"
        )
    if gate_up_q.dtype != torch.uint8 or down_q.dtype != torch.uint8:
        raise ValueError("packed weights must be uint8")
    return T, H, index.shape[1], E, I


def moe_int4_ref(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size: int = 64,
                 slots: bool = False):
    """Plain PyTorch, fp32 throughout: `dgcli.model.moe`'s arithmetic (pairs sorted by expert, routing
    weight per pair, slots summed in fp32) around each present expert dequantised once and applied
    with two matmuls. Returns [T, H] in x.dtype; slots=True: the per-slot outputs [T, A, H] (fp32)
    before the sum (`dgcli.model.moe_slots`).

    The per-expert loop reads the run boundaries back once (`offsets.tolist()`): a reference has to
    know which rows an expert owns, and the alternative, decoding all E experts, costs E× the memory.
    """
    T, H, A, E, I = _check(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size)

    def mlp(xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        xs = xs.float()
        ys = torch.empty_like(xs)
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                w1 = unpack_int4_oracle(gate_up_q[e], gate_up_s[e], group_size)  # (2I, H)
                w2 = unpack_int4_oracle(down_q[e], down_s[e], group_size)  # (H, I)
                gate, up = F.linear(xs[start:end], w1).chunk(2, dim=-1)
                ys[start:end] = F.linear(F.gelu(gate, approximate="tanh") * up, w2)
            start = end
        return ys

    return (moe_slots if slots else moe)(x, index, weights.float(), E, mlp)


# --------------------------------------------------------------------------------------------------
# Routing layout


def moe_align_ref(index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, each expert's run padded to a multiple of block_m
    (stable: an expert's pairs in their original order, then its padding; so in every row block the
    real pairs come first, which the kernels rely on).

    Returns sorted_ids int32 [cap] (pair id t·A+j, or P for padding) and block_expert int32
    [cap / block_m] (the expert of each row block, -1 for blocks past the end). cap is a static
    bound, so shapes depend only on (P, E, block_m), and nothing here syncs with the host
    (`bincount` would: it reads the max back, hence scatter_add).
    """
    flat = index.reshape(-1)
    P, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    cum_padded = padded.cumsum(0)
    order = flat.argsort(stable=True)
    e_sorted = flat[order]
    rank = torch.arange(P, device=dev) - (counts.cumsum(0) - counts)[e_sorted]
    dest = (cum_padded - padded)[e_sorted] + rank
    cap = _round_up(P + min(num_experts, P) * (block_m - 1), block_m)
    sorted_ids = torch.full((cap,), P, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, cap, block_m, device=dev)
    block_expert = torch.searchsorted(cum_padded, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def moe_align(index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align_ref`'s outputs; one Triton kernel on CUDA (instead of ~25), else the reference."""
    return pick(moe_align_triton, moe_align_ref, index)(index, num_experts, block_m)


def moe_align_triton(index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align_ref` in one single-program kernel (`_align_kernel`): same outputs, bit for bit."""
    if not 0 < num_experts <= MAX_ALIGN_EXPERTS:
        raise ValueError(f"num_experts={num_experts} must be in 1..{MAX_ALIGN_EXPERTS}")
    flat = index.reshape(-1)
    P, dev = flat.numel(), flat.device
    cap = _round_up(P + min(num_experts, P) * (block_m - 1), block_m)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=dev)
    block_expert = torch.empty(cap // block_m, dtype=torch.int32, device=dev)
    if cap == 0:
        return sorted_ids, block_expert
    if cap >= MAX_ALIGN_SLOTS:  # beyond the kernel's 16-bit counters (P over ~60k pairs): the reference
        return moe_align_ref(index, num_experts, block_m)
    launch(_align_kernel, dev, (1,), flat.contiguous(), sorted_ids, block_expert, P, num_experts, block_m, cap,
           cap // block_m, triton.cdiv(P, ALIGN_LANES), BLOCK_E=max(16, 1 << (num_experts - 1).bit_length()),
           LANES=ALIGN_LANES, BLOCK_B=ALIGN_BLOCK_B, BLOCK_W=ALIGN_BLOCK_W, num_warps=ALIGN_WARPS)
    return sorted_ids, block_expert


MAX_ALIGN_EXPERTS = 256  # E/2 counters a thread (compiled without spills at E = 128)
MAX_ALIGN_SLOTS = 1 << 16  # cap must stay below: the counters are 16 bits
ALIGN_WARPS = 4
ALIGN_LANES = 32 * ALIGN_WARPS  # a lane a thread; each walks P / LANES pairs in order
ALIGN_BLOCK_B = 32  # row blocks per step of the block-expert loop
ALIGN_BLOCK_W = 1024  # slots per step of the padding loop


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# --------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nibbles(b, HIGH: tl.constexpr, DT: tl.constexpr):
        """Packed bytes (uint8) -> their low or high nibble minus 8, in DT (see the module docstring)."""
        if DT == tl.bfloat16:
            v = b.to(tl.uint16)
            v = (v >> 4) if HIGH else (v & 0xF)
            w = (v | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0  # 128 + nibble - (128 + 8)
        elif DT == tl.float16:
            v = b.to(tl.uint16)
            v = (v >> 4) if HIGH else (v & 0xF)
            w = (v | 0x6400).to(tl.float16, bitcast=True) - 1032.0  # 1024 + nibble - (1024 + 8)
        else:
            v = b.to(tl.uint32)
            v = (v >> 4) if HIGH else (v & 0xF)
            w = (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + nibble - (2^23 + 8)
        return w

    @triton.jit
    def _align_kernel(index_ptr, sorted_ptr, block_expert_ptr, P, E, block_m, cap, num_blocks, run,
                      BLOCK_E: tl.constexpr, LANES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
        """moe_align_ref in one program, a counting sort over LANES lanes: lane c owns the `run`
        consecutive pairs from c·run, so ranks in lane order are ranks in pair order (stable).
        Tiles are [expert pairs, lanes]: a lane's column sits in one thread (LANES = 32 x warps), so
        the per-pair work needs no communication between threads; each int32 holds the 16-bit
        counters of experts 2r (low half) and 2r+1 (high half), as every count and slot is < 2^16
        (cap < 2^16; no half carries into the other), which halves the registers and the work.
        (1) counts[r, c]: lane c's pairs of experts 2r, 2r+1, one compare-and-add per step;
        (2) each expert's padded start, each lane's first slot for it (start + the lanes before it),
        each row block's expert (searchsorted over the padded ends), and padding everywhere;
        a barrier, so the padding is written before (3) writes pairs over it;
        (3) each lane walks its pairs again, writing each at its next slot for that expert."""
        HALF_E: tl.constexpr = BLOCK_E // 2
        lanes = tl.arange(0, LANES)
        rows = tl.arange(0, HALF_E)
        counts = tl.zeros((HALF_E, LANES), dtype=tl.int32)
        nxt = tl.load(index_ptr + lanes * run, mask=lanes * run < P, other=-1)  # -1 >> 1: no row
        for j in range(0, run):  # (1)
            e = nxt.to(tl.int32)
            pair = lanes * run + j + 1
            nxt = tl.load(index_ptr + pair, mask=pair < P, other=-1)  # a step ahead (last: unused)
            counts += tl.where(rows[:, None] == (e >> 1)[None, :], (1 << (e & 1) * 16)[None, :], 0)
        total = tl.sum(counts, axis=1)  # (2)
        total = tl.reshape(tl.join(total & 0xFFFF, (total >> 16) & 0xFFFF), (BLOCK_E,))  # expert order
        padded = (total + block_m - 1) // block_m * block_m
        ends = tl.cumsum(padded, axis=0)
        start_lo, start_hi = tl.split(tl.reshape(ends - padded, (HALF_E, 2)))
        slot = (start_lo | (start_hi << 16))[:, None] + tl.cumsum(counts, axis=1) - counts
        ends = tl.where(tl.arange(0, BLOCK_E) < E, ends, cap)  # past every block start
        for b in range(0, num_blocks, BLOCK_B):  # [blocks, experts]: the experts across threads
            blocks = b + tl.arange(0, BLOCK_B)
            be = tl.sum((ends[None, :] <= (blocks * block_m)[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + blocks, tl.where(be < E, be, -1), mask=blocks < num_blocks)
        for a in range(0, cap, BLOCK_W):
            offs = a + tl.arange(0, BLOCK_W)
            tl.store(sorted_ptr + offs, tl.zeros_like(offs) + P, mask=offs < cap)
        tl.debug_barrier()
        nxt = tl.load(index_ptr + lanes * run, mask=lanes * run < P, other=-1)
        for j in range(0, run):  # (3)
            e = nxt.to(tl.int32)
            pair = lanes * run + j
            ok = pair < P
            nxt = tl.load(index_ptr + pair + 1, mask=pair + 1 < P, other=-1)
            hit = rows[:, None] == (e >> 1)[None, :]
            shift = (e & 1) * 16
            dest = (tl.sum(tl.where(hit, slot, 0), axis=0) >> shift) & 0xFFFF
            tl.store(sorted_ptr + dest, pair, mask=ok)
            slot += tl.where(hit, (1 << shift)[None, :], 0)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, q_ptr, s_ptr, h_ptr, sorted_ptr, block_expert_ptr,
        num_pairs, top_k, I, K,
        stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_hm,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr, FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e < 0:  # a block past the padded end: idle (the grid has a static size)
            return
        HALF: tl.constexpr = GROUP // 2
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        # A block's real pairs come first (moe_align), so its real rows are a prefix: a test against
        # one scalar, which the epilogue redoes in its own layout (per-row flags carried across the
        # loop to the h store cost registers: spills in the 64-row tiles).
        n_real = tl.sum((pair < num_pairs).to(tl.int32), axis=0)
        row_ok = tl.arange(0, BLOCK_M) < n_real
        token = (pair // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        offs_j = tl.arange(0, HALF)

        x_ptrs = x_ptr + token[:, None] * stride_xt + 2 * offs_j[None, :]  # even columns of a group
        g_ptrs = q_ptr + e * stride_qe + offs_n[None, :] * stride_qn + offs_j[:, None]  # [HALF, BN] bytes
        u_ptrs = g_ptrs + I * stride_qn
        gs_ptrs = s_ptr + e * stride_se + offs_n * stride_sn
        us_ptrs = gs_ptrs + I * stride_sn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, GROUP):
            xe = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            xo = tl.load(x_ptrs + 1, mask=row_ok[:, None], other=0.0)
            if EVEN_N:
                bg = tl.load(g_ptrs)
                bu = tl.load(u_ptrs)
                sg = tl.load(gs_ptrs).to(tl.float32)
                su = tl.load(us_ptrs).to(tl.float32)
            else:
                bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0x88)
                bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0x88)
                sg = tl.load(gs_ptrs, mask=n_ok, other=0.0).to(tl.float32)
                su = tl.load(us_ptrs, mask=n_ok, other=0.0).to(tl.float32)
            g_lo = _nibbles(bg, False, xe.dtype)
            g_hi = _nibbles(bg, True, xe.dtype)
            u_lo = _nibbles(bu, False, xe.dtype)
            u_hi = _nibbles(bu, True, xe.dtype)
            if FP32:
                pg = tl.dot(xe, g_lo, input_precision="ieee")
                pg = tl.dot(xo, g_hi, pg, input_precision="ieee")
                pu = tl.dot(xe, u_lo, input_precision="ieee")
                pu = tl.dot(xo, u_hi, pu, input_precision="ieee")
            else:
                pg = tl.dot(xo, g_hi, tl.dot(xe, g_lo))
                pu = tl.dot(xo, u_hi, tl.dot(xe, u_lo))
            acc_g += pg * sg[None, :]
            acc_u += pu * su[None, :]
            x_ptrs += GROUP
            g_ptrs += HALF
            u_ptrs += HALF
            gs_ptrs += 1
            us_ptrs += 1

        # gelu_tanh(g) = g/2 · (1 + tanh(y)), y = √(2/π)(g + 0.044715 g³); tanh via exp(-2|y|), no overflow
        y = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        t = tl.exp(-2.0 * tl.abs(y))
        th = (1.0 - t) / (1.0 + t)
        th = tl.where(y >= 0, th, -th)
        h = 0.5 * acc_g * (1.0 + th) * acc_u
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        # the real pairs' rows only: padding rows of h are never written (nor read by _down_kernel)
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr, q_ptr, s_ptr, y_ptr, rw_ptr, sorted_ptr, block_expert_ptr,
        num_pairs, N, K,
        stride_hm, stride_qe, stride_qn, stride_se, stride_sn, stride_ym,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr, FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e < 0:
            return
        HALF: tl.constexpr = GROUP // 2
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_m)
        row_ok = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_j = tl.arange(0, HALF)

        # Padding rows of h are never written: each reads the block's first row (always a real pair's,
        # and loaded anyway) in its place, so the main loop needs no mask (a masked load costs ~8
        # instructions an iteration and spills in the 128-column tiles); their products are not stored.
        a_rows = tl.where(row_ok, offs_m, pid_m * BLOCK_M)
        a_ptrs = h_ptr + a_rows[:, None].to(tl.int64) * stride_hm + 2 * offs_j[None, :]
        b_ptrs = q_ptr + e * stride_qe + offs_n[None, :] * stride_qn + offs_j[:, None]
        s_ptrs = s_ptr + e * stride_se + offs_n * stride_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, GROUP):
            ae = tl.load(a_ptrs)
            ao = tl.load(a_ptrs + 1)
            if EVEN_N:
                b = tl.load(b_ptrs)
                s = tl.load(s_ptrs).to(tl.float32)
            else:
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0x88)
                s = tl.load(s_ptrs, mask=n_ok, other=0.0).to(tl.float32)
            lo = _nibbles(b, False, ae.dtype)
            hi = _nibbles(b, True, ae.dtype)
            if FP32:
                p = tl.dot(ae, lo, input_precision="ieee")
                p = tl.dot(ao, hi, p, input_precision="ieee")
            else:
                p = tl.dot(ao, hi, tl.dot(ae, lo))
            acc += p * s[None, :]
            a_ptrs += GROUP
            b_ptrs += HALF
            s_ptrs += 1

        rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * rw[:, None]
        y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes for one call. block_m sets the routing padding, so both kernels share it."""

    block_m: int = 16
    gu_block_n: int = 64
    gu_warps: int = 4
    gu_stages: int = 3
    dn_block_n: int = 64
    dn_warps: int = 4
    dn_stages: int = 3


DEFAULT_CONFIG = MoeConfig()  # known-good everywhere tl.dot works (M, N, K ≥ 16)


def _launch_gate_up(x, index, gate_up_q, gate_up_s, sorted_ids, block_expert, h, group_size, bn, warps, stages, bm,
                    warmup=False):
    T, H = x.shape
    I = gate_up_q.shape[1] // 2
    grid = (block_expert.numel(), triton.cdiv(I, bn))
    return launch(
        _gate_up_kernel, x.device, grid, x, gate_up_q, gate_up_s, h, sorted_ids, block_expert,
        index.numel(), index.shape[1], I, H,
        x.stride(0), gate_up_q.stride(0), gate_up_q.stride(1), gate_up_s.stride(0), gate_up_s.stride(1), h.stride(0),
        GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=I % bn == 0, FP32=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages, warmup=warmup,
    )


def _launch_down(h, weights, down_q, down_s, sorted_ids, block_expert, y, group_size, bn, warps, stages, bm,
                 warmup=False):
    H, I = down_q.shape[1], down_q.shape[2] * 2
    grid = (block_expert.numel(), triton.cdiv(H, bn))
    return launch(
        _down_kernel, h.device, grid, h, down_q, down_s, y, weights, sorted_ids, block_expert,
        weights.numel(), H, I,
        h.stride(0), down_q.stride(0), down_q.stride(1), down_s.stride(0), down_s.stride(1), y.stride(0),
        GROUP=group_size, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=H % bn == 0, FP32=h.dtype == torch.float32,
        num_warps=warps, num_stages=stages, warmup=warmup,
    )


def moe_int4_triton(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size: int = 64,
                    config: MoeConfig | None = None, slots: bool = False):
    """The Triton path; `config` fixes the tiles (else autotuned once per shape on CUDA). slots=True:
    the down kernel's per-slot outputs [T, A, H] in x.dtype, not yet summed (kernels.mix sums them)."""
    T, H, A, E, I = _check(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size)
    if group_size % 32:
        raise ValueError(f"the Triton kernel needs group_size a multiple of 32 (tl.dot K ≥ 16), got {group_size}")
    if T == 0:
        return x.new_zeros(T, index.shape[1], H) if slots else x.new_zeros(T, H)
    x = x.contiguous()
    index = index.contiguous()
    weights = weights.contiguous().float()
    gate_up_q, gate_up_s = gate_up_q.contiguous(), gate_up_s.contiguous()
    down_q, down_s = down_q.contiguous(), down_s.contiguous()
    args = (x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size)
    if config is None:
        config = _config_for(*args)
    y = _run(config, *args)
    return y if slots else y.sum(1, dtype=torch.float32).to(x.dtype)  # fixed-order sum over slots


def _run(cfg: MoeConfig, x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size):
    """The per-slot outputs [T, A, H] in x.dtype, each already times its routing weight."""
    T, H = x.shape
    A, E, I = index.shape[1], gate_up_q.shape[0], gate_up_q.shape[1] // 2
    sorted_ids, block_expert = moe_align(index, E, cfg.block_m)
    h = torch.empty(sorted_ids.numel(), I, dtype=x.dtype, device=x.device)
    y = torch.empty(T * A, H, dtype=x.dtype, device=x.device)
    _launch_gate_up(x, index, gate_up_q, gate_up_s, sorted_ids, block_expert, h, group_size,
                    cfg.gu_block_n, cfg.gu_warps, cfg.gu_stages, cfg.block_m)
    _launch_down(h, weights, down_q, down_s, sorted_ids, block_expert, y, group_size,
                 cfg.dn_block_n, cfg.dn_warps, cfg.dn_stages, cfg.block_m)
    return y.view(T, A, H)


# Candidates: M ≈ 16 rows per expert on a 256-token canvas, so small BLOCK_M first.
_BLOCK_M = (16, 32, 64)
_TILES = tuple((bn, w, s) for bn in (32, 64, 128) for (w, s) in ((4, 2), (4, 3), (4, 4), (8, 3)))
_LARGE = frozenset()  # (BLOCK_M, BLOCK_N, warps, stages) over a 99 KB part's shared memory (kernels.aot)


def _tune_key(x, index, gate_up_q, group_size):
    """What the choice depends on: dtype, the experts' shapes, and the (token, slot) pairs per expert
    in a clamped power-of-two bucket (BLOCK_M ≤ 64 candidates: beyond 128 pairs only the grid grows)."""
    T, H = x.shape
    A, E, I = index.shape[1], gate_up_q.shape[0], gate_up_q.shape[1] // 2
    return (x.dtype, H, I, E, A, group_size, rows_bucket(-(-T * A // E), 1, 128))


def _config_for(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size) -> MoeConfig:
    if not autotune_enabled(x.device):
        return DEFAULT_CONFIG
    return remembered(
        "moe_int4", _tune_key(x, index, gate_up_q, group_size), x.device,
        lambda: _autotune(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size),
        DEFAULT_CONFIG, encode=lambda c: list(astuple(c)), decode=lambda v: MoeConfig(*v), valid=_valid,
    )


def _valid(c: MoeConfig) -> bool:
    return (c.block_m in _BLOCK_M and (c.gu_block_n, c.gu_warps, c.gu_stages) in _TILES
            and (c.dn_block_n, c.dn_warps, c.dn_stages) in _TILES)


def _autotune(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size) -> tuple[MoeConfig, float]:
    """Per BLOCK_M: best gate_up tile, best down tile; then the BLOCK_M with the least total time."""
    T, H = x.shape
    A, E, I = index.shape[1], gate_up_q.shape[0], gate_up_q.shape[1] // 2
    pairs_per_expert = T * A / E
    limit = shared_limit(x.device)
    best, best_ms = DEFAULT_CONFIG, math.inf
    for bm in _BLOCK_M:
        if bm > 16 and bm > 2 * pairs_per_expert:  # mostly padding: never faster
            continue
        sorted_ids, block_expert = moe_align(index, E, bm)
        h = torch.empty(sorted_ids.numel(), I, dtype=x.dtype, device=x.device)
        y = torch.empty(T * A, H, dtype=x.dtype, device=x.device)
        d = DEFAULT_CONFIG
        tiles = tuple(t[1:] for t in candidates(tuple((bm, *t) for t in _TILES), _LARGE, limit))
        gu, gu_ms = pick_fastest(
            tiles,
            lambda c, warmup=False: _launch_gate_up(x, index, gate_up_q, gate_up_s, sorted_ids, block_expert, h,
                                                    group_size, *c, bm, warmup=warmup),
            (d.gu_block_n, d.gu_warps, d.gu_stages), f"moe_int4 gate_up BLOCK_M={bm}", limit,
        )
        dn, dn_ms = pick_fastest(
            tiles,
            lambda c, warmup=False: _launch_down(h, weights, down_q, down_s, sorted_ids, block_expert, y,
                                                 group_size, *c, bm, warmup=warmup),
            (d.dn_block_n, d.dn_warps, d.dn_stages), f"moe_int4 down BLOCK_M={bm}", limit,
        )
        ms = gu_ms + dn_ms
        if ms < best_ms:  # NaN (all failed) never wins
            best, best_ms = MoeConfig(bm, *gu, *dn), ms
    return best, best_ms


def tuned_configs() -> dict:
    """What the autotuner chose so far in this process, for benchmark reports."""
    return chosen("moe_int4")


def _aot():
    """Compile specs for `python -m kernels.aot`: bf16 activations at the real shapes (H 2816, I 704,
    E 128, top-8; every size and stride a multiple of 16 except top_k and the scales' row stride),
    both kernels at every BLOCK_M and tile; the routing layout (moe_align) for 128 experts."""
    common = {"GROUP": 64, "EVEN_N": True, "FP32": False}
    gate_up = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp16", "h_ptr": "*bf16", "sorted_ptr": "*i32",
               "block_expert_ptr": "*i32", "num_pairs": "i32", "top_k": "i32", "I": "i32", "K": "i32",
               "stride_xt": "i32", "stride_qe": "i32", "stride_qn": "i32", "stride_se": "i32", "stride_sn": "i32",
               "stride_hm": "i32"}
    down = {"h_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp16", "y_ptr": "*bf16", "rw_ptr": "*fp32",
            "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "num_pairs": "i32", "N": "i32", "K": "i32",
            "stride_hm": "i32", "stride_qe": "i32", "stride_qn": "i32", "stride_se": "i32", "stride_sn": "i32",
            "stride_ym": "i32"}
    d = DEFAULT_CONFIG
    for name, fn, sig, default, divisible in (
        ("moe_int4.gate_up", _gate_up_kernel, gate_up, (d.block_m, d.gu_block_n, d.gu_warps, d.gu_stages),
         ("num_pairs", "I", "K", "stride_xt", "stride_qe", "stride_qn", "stride_se", "stride_hm")),
        ("moe_int4.down", _down_kernel, down, (d.block_m, d.dn_block_n, d.dn_warps, d.dn_stages),
         ("num_pairs", "N", "K", "stride_hm", "stride_qe", "stride_qn", "stride_se", "stride_ym")),
    ):
        for cfg in dict.fromkeys((default, *((bm, *t) for bm in _BLOCK_M for t in _TILES))):
            bm, bn, warps, stages = cfg
            yield AotSpec(name, fn, sig, dict(common, BLOCK_M=bm, BLOCK_N=bn), warps, stages,
                          dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages),
                          default=cfg == default, large=cfg in _LARGE, divisible=divisible)
    # the routing layout: block_m is an argument, so one compile serves every BLOCK_M
    align = dict(BLOCK_E=128, LANES=ALIGN_LANES, BLOCK_B=ALIGN_BLOCK_B, BLOCK_W=ALIGN_BLOCK_W)
    yield AotSpec("moe_align", _align_kernel,
                  {"index_ptr": "*i64", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "P": "i32", "E": "i32",
                   "block_m": "i32", "cap": "i32", "num_blocks": "i32", "run": "i32"},
                  align, ALIGN_WARPS, 1, dict(align, num_warps=ALIGN_WARPS), default=True,
                  divisible=("P", "E", "block_m", "cap"))


AOT = list(_aot()) if HAS_TRITON else []


# --------------------------------------------------------------------------------------------------
# Dispatcher


def moe_int4(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size: int = 64, slots: bool = False):
    """Routed experts on packed int4 weights: x [T, H], index/weights [T, A] -> [T, H] in x.dtype
    (slots=True: the weighted per-slot outputs [T, A, H] before their fp32 sum).

    Triton on CUDA, the reference elsewhere; `DG_KERNELS=ref|triton` overrides (see kernels/__init__).
    """
    return pick(moe_int4_triton, moe_int4_ref, x)(x, index, weights, gate_up_q, gate_up_s, down_q, down_s, group_size,
                                                 slots=slots)
