"""kernels/int8_linear: the reference against dequantise-then-matmul, and Triton (interpreter on CPU)
against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels.int8_linear import int8_linear, int8_linear_ref, quantize_int8_oracle

CUDA = torch.cuda.is_available()
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) * K**-0.5
    w[0] = 0  # an all-zero row: scale 0
    q, s = quantize_int8_oracle(w)
    return x, q, s, w


def test_quantize_round_trip():
    _, q, s, w = make(1, 96, 33, torch.float32)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s[0] == 0 and (q[0] == 0).all()
    err = (q.float() * s.float()[:, None] - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_matches_dequantised_matmul(dtype):
    x, q, s, _ = make(7, 96, 50, dtype)
    want = (x.float() @ (q.float() * s.float()[:, None]).T).to(dtype)
    got = int8_linear_ref(x, q, s)
    assert got.dtype == dtype and got.shape == (7, 50)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_reference_validates():
    x, q, s, _ = make(2, 64, 8, torch.float32)
    with pytest.raises(ValueError):
        int8_linear_ref(x, q.float(), s)
    with pytest.raises(ValueError):
        int8_linear_ref(x[:, :32], q, s)


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DG_KERNELS", "triton")


@pytest.mark.parametrize("tile", [None, (16, 32, 32, 4, 2)], ids=["default", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (33, 96, 130)])  # ragged M, N and K tails
def test_triton_matches_reference(interpret, M, K, N, dtype, tile):
    from kernels.int8_linear import int8_linear_triton

    x, q, s, _ = make(M, K, N, dtype, seed=M)
    got = int8_linear_triton(x, q, s, tile=tile)
    torch.testing.assert_close(got.float(), int8_linear_ref(x, q, s).float(), **TOL[dtype])


def test_dispatcher_keeps_leading_dims(interpret):
    x, q, s, _ = make(12, 64, 40, torch.float32)
    got = int8_linear(x.view(3, 4, 64), q, s)
    assert got.shape == (3, 4, 40)
    torch.testing.assert_close(got.view(12, 40), int8_linear_ref(x, q, s), **TOL[torch.float32])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("K,N", [(2816, 4096), (2112, 2816), (2816, 2112)])
def test_gpu_real_shapes(monkeypatch, K, N):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    x, q, s, _ = make(256, K, N, torch.bfloat16)
    x, q, s = x.cuda(), q.cuda(), s.cuda()
    torch.testing.assert_close(int8_linear(x, q, s).float(), int8_linear_ref(x, q, s).float(), **TOL[torch.bfloat16])
