"""kernels/cuda_rng: torch's CUDA exponential_ stream reproduced. On the CPU: the numpy reference's
Philox against Random123's published known answers, its element mapping against a literal
transcription of torch's grid-stride kernel, and the Triton kernel (interpreter) against the
reference bit for bit (the log aside: both sides are given the same one). On a GPU: the kernel
against torch's own exponential_, bits and generator offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels.cuda_rng as rng

# Random123's kat_vectors, "philox4x32 10": counter (4 words), key (2 words), expected (4 words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def f32_log(u):
    """A stand-in for the device's __logf on both sides: numpy's log in float64, rounded to fp32
    (it differs from numpy's fp32 log and from the interpreter's, so a side that used its own would fail)."""
    return np.log(np.asarray(u, dtype=np.float64)).astype(np.float32)


try:
    import triton
    import triton.language as tl
    from triton.language.random import philox_impl

    @triton.jit
    def _kat_kernel(ctr_ptr, key_ptr, out_ptr):
        c0, c1 = tl.load(ctr_ptr).to(tl.uint32), tl.load(ctr_ptr + 1).to(tl.uint32)
        c2, c3 = tl.load(ctr_ptr + 2).to(tl.uint32), tl.load(ctr_ptr + 3).to(tl.uint32)
        k0, k1 = tl.load(key_ptr).to(tl.uint32), tl.load(key_ptr + 1).to(tl.uint32)
        w0, w1, w2, w3 = philox_impl(c0, c1, c2, c3, k0, k1, 10)
        tl.store(out_ptr, w0.to(tl.int64))
        tl.store(out_ptr + 1, w1.to(tl.int64))
        tl.store(out_ptr + 2, w2.to(tl.int64))
        tl.store(out_ptr + 3, w3.to(tl.int64))
except ImportError:  # no triton: the interpreter tests skip
    pass


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_log", lambda self, arg: self.unary_op(arg, f32_log))


# ------------------------------------------------------------------------------------------ reference


def test_reference_philox_gives_random123s_known_answers():
    for ctr, key, want in KAT:
        got = rng.philox4x32_10([np.array([c], np.uint64) for c in ctr], key)
        assert [int(w[0]) for w in got] == list(want)


def _torch_kernel_transcribed(n, seed, offset, threads, log):
    """distribution_elementwise_grid_stride_kernel with curand_init / curand_uniform4 and
    transformation::exponential, written out thread by thread (blockDim.x · gridDim.x = threads)."""
    out = np.full(n, np.nan, np.float32)
    unroll = 4
    rounded = ((n - 1) // (threads * unroll) + 1) * threads * unroll
    for idx in range(threads):
        ctr = offset // 4  # curand_init: skipahead_sequence(idx) -> (z, w); skipahead(offset) -> (x, y)
        for linear in range(idx, rounded, threads * unroll):
            words = rng.philox4x32_10([np.array([ctr & 0xFFFFFFFF], np.uint64), np.array([ctr >> 32], np.uint64),
                                       np.array([idx], np.uint64), np.array([0], np.uint64)],
                                      (seed & 0xFFFFFFFF, seed >> 32))
            ctr += 1  # curand4: Philox_State_Incr
            for ii in range(unroll):
                li = linear + threads * ii
                if li < n:
                    u = rng.uniform_ref(words[ii])[0]
                    out[li] = np.float32(rng.TWO_M24) if u >= np.float32(1 - rng.TWO_M24) else -log(u)
    return out


@pytest.mark.parametrize("n,threads,offset", [(700, 64, 0), (1000, 256, 12), (300, 512, 2**34 + 8)])
def test_reference_is_torchs_grid_stride_kernel(n, threads, offset):
    """Element li is thread li % N's word (li // N) % 4 of its call li // (4N); the counter is 64-bit."""
    seed = 0xDEADBEEF12345678
    want = _torch_kernel_transcribed(n, seed, offset, threads, f32_log)
    got = rng.exponential_ref(n, seed, offset, threads, log=f32_log)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_layout_is_torchs_execution_policy():
    """calc_execution_policy: grid = min(ceil(n / 256), SMs · threads-per-SM / 256); the offset moves
    by 4 per grid-stride iteration (4 draws a thread per iteration)."""
    n = 256 * 262144  # the step's [L, V]
    assert rng.layout(n, 132, 2048) == (270336, 63 * 4)  # H100 / H200: 1056 blocks
    assert rng.layout(n, 128, 1536) == (196608, 86 * 4)  # RTX 4090: 768 blocks
    assert rng.layout(1000, 132, 2048) == (1024, 4)  # few elements: ceil(n / 256) blocks, one iteration
    assert rng.layout(4096 * 5 + 1, 1, 1024) == (1024, 24)  # 4 blocks; 6 iterations of 4096
    assert rng.device_threads(torch.device("meta")) == rng.ASSUMED_DEVICE


def test_uniform_and_clamp():
    """u = word · 2^-32 + 2^-33 in fp32: in (0, 1]; the words that round to u >= 1 - 2^-24 (the float
    conversion rounds to multiples of 256 up there) give E = 2^-24."""
    words = np.array([0, 1, 2**31, 2**32 - 2**9 - 1, 2**32 - 2**8 - 1, 2**32 - 129, 2**32 - 1], np.uint32)
    u = rng.uniform_ref(words)
    assert u[0] == np.float32(2.0**-33) and u[-1] == np.float32(1.0) and (u > 0).all() and (u <= 1).all()
    assert u[2] == np.float32(0.5 + 2.0**-33)
    clamped = u >= np.float32(1 - 2.0**-24)
    assert clamped.tolist() == [False, False, False, False, True, True, True]


# ------------------------------------------------------------------------------------ Triton (interpreter)


def test_triton_philox_gives_random123s_known_answers(interpret):
    """Triton's philox_impl (the one exp_draws calls) has curand's round and key order."""
    from kernels._dispatch import launchable

    for ctr, key, want in KAT:
        out = torch.zeros(4, dtype=torch.int64)
        launchable(_kat_kernel, torch.device("cpu"))[(1,)](torch.tensor(ctr), torch.tensor(key), out)
        assert [w % 2**32 for w in out.tolist()] == list(want)


@pytest.mark.parametrize("n,threads,seed,offset", [
    (5000, 512, 2**63 + 12345, 36),  # a seed past 2^63, several calls a thread
    (3000, 256, 7, (2**32 - 2) * 4),  # the counter's low word wraps between calls: the carry
    (700, 1024, 0, 0),  # fewer elements than threads: one call, lanes 0 only
    (64, 256, 123456789, 2**40),  # a 64-bit offset
])
def test_triton_draws_match_the_reference(interpret, n, threads, seed, offset):
    got = rng.exponential_triton(n, seed, offset, threads, "cpu")
    want = rng.exponential_ref(n, seed, offset, threads, log=f32_log)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))
    assert np.isfinite(want).all() and (want > 0).all()


def test_count_mismatches_counts_differing_bits(interpret):
    n, threads, seed, offset = 3000, 256, 99, 8
    q = torch.from_numpy(rng.exponential_ref(n, seed, offset, threads, log=f32_log))
    assert int(rng.count_mismatches(q, seed, offset, threads)) == 0
    q[[5, 1000, 2999]] = torch.from_numpy(np.nextafter(q[[5, 1000, 2999]].numpy(), np.float32(9)))  # one ulp
    assert int(rng.count_mismatches(q, seed, offset, threads)) == 3
    assert int(rng.count_mismatches(q, seed, offset + 4, threads)) > 2900  # another offset: another stream


def test_kernel_arguments_are_always_32_bit():
    """Seeds and offsets travel as the int32 bits of their halves (one compiled kernel for all)."""
    for v in (0, 1, 2**31, 2**32 - 1, 2**63 + 5, 2**64 - 1, -1):
        lo, hi = rng.i32_halves(v)
        assert -2**31 <= lo < 2**31 and -2**31 <= hi < 2**31
        assert (lo % 2**32) + ((hi % 2**32) << 32) == v % 2**64


# ------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(256, 262144), (3, 1000), (1, 7)])
def test_cuda_draws_are_torchs_exponential(shape):
    """On a GPU: the kernel's draws are torch's exponential_ bit for bit, the offset step is torch's."""
    g = torch.Generator(device="cuda").manual_seed(1234)
    torch.empty(100, device="cuda").exponential_(generator=g)  # a non-zero offset
    seed, offset = g.initial_seed(), g.get_offset()
    q = torch.empty(shape, device="cuda").exponential_(1, generator=g)
    N, step = rng.layout(q.numel(), *rng.device_threads(q.device))
    assert g.get_offset() - offset == step
    got = rng.exponential_triton(q.numel(), seed, offset, N, q.device)
    assert torch.equal(got.view(torch.int32), q.view(-1).view(torch.int32))
    assert int(rng.count_mismatches(q, seed, offset, N)) == 0


@pytest.mark.slow
def test_aot_specs_compile_the_fast_log_without_spills():
    """Both kernels compile for sm_89/90/120 without spills; each draw costs one MUFU (lg2.approx:
    __logf, not logf's polynomial), 4 threads' 4 words a lane."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "kernels.aot", "--kernel", "cuda_rng", "--jobs", "2"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted((r["kernel"], r["target"]) for r in rows) == sorted(
        (k, t) for k in ("cuda_rng.check", "cuda_rng.write") for t in ("sm_89", "sm_90", "sm_120"))
    per_lane = 4 * rng.SPAN // (rng.WARPS * 32)
    for r in rows:
        assert r["ok"] and r["spills"] == 0 and r["shared_bytes"] <= r["shared_limit"], r
        assert r["sass"]["MUFU"] == per_lane, r
