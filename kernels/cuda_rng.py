"""torch's CUDA `exponential_` stream, reproduced inside a kernel: the sampler's Exp(1) draws made in
registers (kernels.sample's fused draw) instead of a [L, V] fp32 tensor written and read back.

What torch 2.13 does for `torch.empty(n, device="cuda").exponential_(1, generator=g)` (fp32,
contiguous; aten/src/ATen/native/cuda/DistributionTemplates.h, TransformationHelper.h,
NumericUtils.h, CUDAGeneratorImpl.cpp; curand_kernel.h, curand_philox4x32_x.h, curand_uniform.h):
- launch (`calc_execution_policy`): 256 threads a block, grid = min(ceil(n / 256),
  SMs · (max threads per SM / 256)) blocks, so N = 256 · grid threads;
- generator: (seed, offset) = (g's seed, g's philox offset), then offset += counter_offset =
  ((n - 1) // (4 N) + 1) · 4 (`philox_cuda_state`, a multiple of 4 already);
- thread idx (`curand_init(seed, idx, offset)`): Philox4x32-10 with key (seed lo, seed hi) and the
  128-bit counter (offset / 4 + k, idx) in 32-bit words (x, y | z, w), k its k-th `curand_uniform4`
  call; the grid-stride loop gives element li = 4 N k + N ii + idx the word ii of call k;
- uniform (`_curand_uniform4`): u = float(word) · 2^-32 + 2^-33 in fp32 (the product is exact, so an
  FMA gives the same), in (0, 1];
- exponential (`transformation::exponential`, CUDA branch): E = -log(u), where log is `at::log`,
  i.e. `__logf` on the device (the fast lg2.approx.f32 times ln 2, not logf), and u >= 1 - 2^-24
  gives E = 2^-24.

`exponential_ref(n, seed, offset, threads)` is that in numpy (an independent implementation, with
Philox checked against Random123's published known answers in the tests); `exp_draws` (the Triton
helper) makes a thread's four draws, and `exponential_triton` writes them (tests, and the runtime
check in kernels.sample that compares them with torch's own on the real device). The log: compiled,
libdevice's `__nv_fast_logf` (lg2.approx.f32 without FTZ, times ln 2, as nvcc's `__logf`); the
interpreter has no libdevice and uses its own fp32 log, so CPU tests fix the log both sides use.
"""

from __future__ import annotations

import numpy as np
import torch

from ._dispatch import HAS_TRITON, interpreting, launch
from ._tuning import AotSpec

THREADS = 256  # torch's block size for its distribution kernels (block_size_bound)
SPAN = 256  # threads (counter subsequences) a program of ours draws for: a divisor of N = 256 · grid
WARPS = 2  # 64 lanes, 4 neighbouring threads' draws each
ASSUMED_DEVICE = (132, 2048)  # (SMs, max threads per SM) when there is no device to ask (meta): an H100's

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (curand's PHILOX_M4x32_0, _1)
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments (PHILOX_W32_0, _1)
TWO_M32, TWO_M33, TWO_M24 = 2.0**-32, 2.0**-33, 2.0**-24


def device_threads(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, max resident threads per multiprocessor) of `device`, as torch's launch reads them."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return p.multi_processor_count, p.max_threads_per_multi_processor
    return ASSUMED_DEVICE


def layout(n: int, sms: int, threads_per_sm: int) -> tuple[int, int]:
    """(N threads, counter_offset) of torch's exponential_ on n elements (see the module docstring)."""
    grid = min(-(-n // THREADS), sms * (threads_per_sm // THREADS))
    N = THREADS * grid
    return N, ((n - 1) // (4 * N) + 1) * 4


# --------------------------------------------------------------------------------------------------
# Reference (numpy, independent of Triton)


def philox4x32_10(ctr, key):
    """Philox4x32-10 (Random123; curand's `curand_Philox4x32_10`) on arrays: ctr 4 uint32 arrays
    (x, y, z, w), key 2 uint32 -> 4 uint32 arrays."""
    x, y, z, w = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    mask = np.uint64(0xFFFFFFFF)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(W0)) & mask, (k1 + np.uint64(W1)) & mask
        p0, p1 = np.uint64(M0) * x, np.uint64(M1) * z  # < 2^64: exact
        x, y, z, w = (p1 >> np.uint64(32)) ^ y ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ w ^ k1, p0 & mask
    return tuple(v.astype(np.uint32) for v in (x, y, z, w))


def uniform_ref(words: np.ndarray) -> np.ndarray:
    """curand_uniform: float(word) · 2^-32 + 2^-33 in fp32."""
    return words.astype(np.float32) * np.float32(TWO_M32) + np.float32(TWO_M33)


def exponential_ref(n: int, seed: int, offset: int, threads: int, log=None) -> np.ndarray:
    """torch's CUDA exponential_(1) on n fp32 elements at generator (seed, offset) with N = `threads`
    (see `layout`), as an fp32 numpy array. `log`: the fp32 log (default numpy's; the device's is
    __logf, which no CPU function reproduces bit for bit)."""
    log = log or np.log
    li = np.arange(n, dtype=np.int64)
    idx, k, lane = li % threads, li // (4 * threads), (li // threads) % 4
    ctr = np.uint64(offset // 4) + k.astype(np.uint64)  # 64-bit counter in (x, y)
    seed = int(seed) % 2**64
    words = philox4x32_10((ctr & np.uint64(0xFFFFFFFF), ctr >> np.uint64(32), idx.astype(np.uint64),
                           np.zeros(n, np.uint64)), (seed & 0xFFFFFFFF, seed >> 32))
    word = np.choose(lane, words)
    u = uniform_ref(word)
    with np.errstate(divide="ignore"):
        e = -log(u).astype(np.float32)
    return np.where(u >= np.float32(1.0 - TWO_M24), np.float32(TWO_M24), e).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Triton

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.language.random import philox_impl

    @triton.jit
    def counter(base_lo, base_hi, k):
        """The 64-bit Philox counter offset / 4 + k as (lo, hi) uint32, from offset / 4's halves (i32 bits)."""
        lo0 = base_lo.to(tl.uint32, bitcast=True)
        lo = lo0 + k.to(tl.uint32)
        hi = base_hi.to(tl.uint32, bitcast=True) + (lo < lo0).to(tl.uint32)
        return lo, hi

    @triton.jit
    def to_exp(word, LIBDEVICE: tl.constexpr):
        """One Philox word -> curand_uniform's u -> torch's Exp(1) draw (fp32)."""
        u = word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # 2^-32, 2^-33
        if LIBDEVICE:
            lg = libdevice.fast_logf(u)  # __logf: lg2.approx.f32 times ln 2
        else:
            lg = tl.log(u)  # the interpreter's (tests fix it)
        return tl.where(u >= 0.99999994039535522, 5.960464477539063e-08, -lg)  # 1 - 2^-24 -> 2^-24

    @triton.jit
    def exp_draws(key0, key1, ctr_lo, ctr_hi, idx, LIBDEVICE: tl.constexpr):
        """The four Exp(1) draws of torch's threads `idx` ([S] uint32) at counter (ctr_lo, ctr_hi):
        Philox4x32-10 (curand's round and key order) on (ctr_lo, ctr_hi, idx, 0), key (key0, key1)."""
        z = idx * 0
        w0, w1, w2, w3 = philox_impl(z + ctr_lo, z + ctr_hi, idx, z, key0.to(tl.uint32, bitcast=True),
                                     key1.to(tl.uint32, bitcast=True), 10)
        return to_exp(w0, LIBDEVICE), to_exp(w1, LIBDEVICE), to_exp(w2, LIBDEVICE), to_exp(w3, LIBDEVICE)

    @triton.jit
    def _lane(out_ptr, bad_ptr, e, base, t, n, CHECK: tl.constexpr):
        li = base + t
        ok = li < n
        if CHECK:  # count the draws whose bits differ from torch's (in out_ptr)
            q = tl.load(out_ptr + li, mask=ok, other=0.0)
            diff = (q.to(tl.int32, bitcast=True) != e.to(tl.int32, bitcast=True)) & ok
            tl.atomic_add(bad_ptr, tl.sum(diff.to(tl.int32), 0))
        else:
            tl.store(out_ptr + li, e, mask=ok)

    @triton.jit(do_not_specialize=["key0", "key1", "base_lo", "base_hi"])
    def _exp_kernel(out_ptr, bad_ptr, n, N, key0, key1, base_lo, base_hi, CHECK: tl.constexpr,
                    LIBDEVICE: tl.constexpr, S: tl.constexpr):
        """Program (b, k): torch's threads [b·S, (b+1)·S) at their call k, four draws each, written to
        (or, CHECK, compared with) out[4 N k + N ii + idx]."""
        b = tl.program_id(0)
        k = tl.program_id(1)
        t = tl.arange(0, S)
        idx = (b * S + t).to(tl.uint32)
        lo, hi = counter(base_lo, base_hi, k)
        e0, e1, e2, e3 = exp_draws(key0, key1, lo, hi, idx, LIBDEVICE)
        first = k.to(tl.int64) * 4 * N + b * S
        _lane(out_ptr, bad_ptr, e0, first, t, n, CHECK)
        _lane(out_ptr, bad_ptr, e1, first + N, t, n, CHECK)
        _lane(out_ptr, bad_ptr, e2, first + 2 * N, t, n, CHECK)
        _lane(out_ptr, bad_ptr, e3, first + 3 * N, t, n, CHECK)


def i32_halves(v: int) -> tuple[int, int]:
    """A uint64 as two int32 kernel arguments (their bits): always typed i32, never specialised."""
    v %= 2**64
    lo, hi = v & 0xFFFFFFFF, v >> 32
    return tuple(x - 2**32 if x >= 2**31 else x for x in (lo, hi))


def libdevice_log() -> bool:
    return not interpreting()


def grid(n: int, threads: int, span: int = SPAN) -> tuple[int, int]:
    """Programs (thread blocks of `span`, calls) covering n draws."""
    return threads // span, (n - 1) // (4 * threads) + 1


def _launch_exp(q: torch.Tensor, bad, seed: int, offset: int, threads: int, check: bool):
    n = q.numel()
    key0, key1 = i32_halves(seed)
    base_lo, base_hi = i32_halves(offset // 4)
    exact = libdevice_log()
    options = dict(enable_reflect_ftz=False) if exact else {}
    launch(_exp_kernel, q.device, grid(n, threads), q, bad, n, threads, key0, key1, base_lo, base_hi, CHECK=check,
           LIBDEVICE=exact, S=SPAN, num_warps=WARPS, num_stages=1, **options)


def exponential_triton(n: int, seed: int, offset: int, threads: int, device) -> torch.Tensor:
    """torch's CUDA exponential_(1) stream on n fp32 elements at (seed, offset), threads N (`layout`)."""
    q = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _launch_exp(q, q, seed, offset, threads, check=False)
    return q


def count_mismatches(q: torch.Tensor, seed: int, offset: int, threads: int) -> torch.Tensor:
    """How many of q's elements (contiguous fp32, torch's exponential_ at (seed, offset)) differ in
    their bits from this module's draws: a 0-d int32 device tensor (no host read here)."""
    bad = torch.zeros((), dtype=torch.int32, device=q.device)
    if q.numel():
        _launch_exp(q.view(-1), bad, seed, offset, threads, check=True)
    return bad


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m kernels.aot)


def _aot():
    """The runtime check's kernel (CHECK) at the step's [256, 262,144], and the writing one (tests)."""
    if not HAS_TRITON:
        return
    sig = {"out_ptr": "*fp32", "bad_ptr": "*i32", "n": "i32", "N": "i32", "key0": "i32", "key1": "i32",
           "base_lo": "i32", "base_hi": "i32"}
    for check in (True, False):
        name = "cuda_rng.check" if check else "cuda_rng.write"
        yield AotSpec(name, _exp_kernel, sig, dict(CHECK=check, LIBDEVICE=True, S=SPAN), WARPS, 1,
                      dict(S=SPAN, num_warps=WARPS, num_stages=1), default=True, divisible=("n", "N"))


AOT = list(_aot())
