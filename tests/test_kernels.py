"""kernels/moe_int4: the packed format, the reference against a slow obvious oracle and against the
model's own `Experts`, and the Triton kernels against the reference.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set for this module only
by the `interpret` fixture), which is slow: shapes are tiny (H, I multiples of 64; E=4). GPU cases
run the real shapes and are skipped with a reason when there is no CUDA device.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from dgcli.errors import ConfigError

pytest.importorskip("triton", reason="triton is not installed (the references are tested without it elsewhere)")

M = importlib.import_module("kernels.moe_int4")  # the module: kernels.moe_int4 is also the function
from kernels.moe_int4 import (  # noqa: E402
    MoeConfig, moe_align, moe_int4, moe_int4_ref, moe_int4_triton, pack_int4_oracle, unpack_int4_oracle,
)

CUDA = torch.cuda.is_available()
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# |triton - reference| bounds. fp32: only the summation order differs. fp16/bf16: x is already in that
# dtype, the kernel rounds h = gelu(g)·u and each weighted slot output y once to it (the model does the
# same), the reference stays in fp32.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in the interpreter for this test only (the launcher wraps them on demand)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DG_KERNELS", raising=False)


def make_case(T, H, I, E, A, seed=0, group_size=64, skew=False):
    """Random packed experts and a router-like routing: A distinct experts per token, weights summing to 1."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    q1, s1 = pack_int4_oracle(w1, group_size)
    q2, s2 = pack_int4_oracle(w2, group_size)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    if skew:  # every token picks the same A experts: long runs spanning several row blocks
        logits[:, :A] += 100.0
    weights, index = torch.topk(logits.softmax(-1), A)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, index, weights, q1, s1, q2, s2


def oracle(x, index, weights, q1, s1, q2, s2, group_size=64):
    """The slow obvious version: dequantise everything, gather each pair's expert, einsum."""
    w1 = unpack_int4_oracle(q1, s1, group_size)[index]  # (T, A, 2I, H)
    w2 = unpack_int4_oracle(q2, s2, group_size)[index]  # (T, A, H, I)
    gate, up = torch.einsum("th,tanh->tan", x.float(), w1).chunk(2, dim=-1)
    y = torch.einsum("tai,tahi->tah", F.gelu(gate, approximate="tanh") * up, w2)
    return (y * weights[..., None]).sum(1)


# ---------------------------------------------------------------------------------------------------
# Format


def test_unpack_nibble_order_and_offset():
    # Byte 0x3A: low nibble 0xA -> k=0 -> 10-8 = 2; high nibble 0x3 -> k=1 -> 3-8 = -5.
    q = torch.tensor([[0x3A, 0xF0] + [0x88] * 30], dtype=torch.uint8)  # one row, K=64
    s = torch.tensor([[0.5]], dtype=torch.float16)
    w = unpack_int4_oracle(q, s)
    assert w.shape == (1, 64)
    assert w[0, :4].tolist() == [1.0, -2.5, -4.0, 3.5]
    assert (w[0, 4:] == 0).all()


def test_pack_layout_and_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, 192, generator=g)
    w[0, 0, :64] = 0  # an all-zero group gets scale 0 and decodes to exact zeros
    q, s = pack_int4_oracle(w)
    assert q.dtype == torch.uint8 and q.shape == (3, 5, 96)
    assert s.dtype == torch.float16 and s.shape == (3, 5, 3)
    deq = unpack_int4_oracle(q, s)
    err = (deq - w).abs().reshape(3, 5, 3, 64)
    assert (err <= s.float()[..., None] / 2 + 1e-6).all()  # round to nearest
    assert (deq[0, 0, :64] == 0).all() and s[0, 0, 0] == 0
    q2, s2 = pack_int4_oracle(deq)  # packing the decoded weights is lossless
    assert torch.equal(q2, q) and torch.equal(s2, s)
    # low nibble holds the even element: recompute codes by hand for one byte
    codes = torch.round(w[1, 2, :2] / s[1, 2, 0].float()).clamp(-8, 7) + 8
    assert q[1, 2, 0].item() == int(codes[0]) | (int(codes[1]) << 4)


def test_pack_rejects_bad_group():
    with pytest.raises(ValueError):
        pack_int4_oracle(torch.zeros(2, 96), 64)


# ---------------------------------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("T,H,I,E,A,group_size", [(1, 128, 64, 4, 2, 64), (7, 128, 192, 4, 2, 64),
                                                    (33, 64, 128, 8, 3, 32), (9, 128, 64, 4, 4, 64)])
def test_reference_matches_oracle(T, H, I, E, A, group_size):
    case = make_case(T, H, I, E, A, seed=T, group_size=group_size)
    got = moe_int4_ref(*case, group_size=group_size)
    torch.testing.assert_close(got, oracle(*case, group_size=group_size), atol=1e-5, rtol=1e-5)


def test_reference_matches_model_experts():
    """Same semantics as dgcli.model.Experts given the dequantised weights."""
    from dgcli.config import ModelConfig
    from dgcli.model import Experts

    T, H, I, E, A = 11, 128, 64, 4, 2
    config = ModelConfig.from_dict(dict(vocab_size=32, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=E,
                                        top_k_experts=A, moe_intermediate_size=I))
    x, index, weights, q1, s1, q2, s2 = make_case(T, H, I, E, A, seed=3)
    experts = Experts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(unpack_int4_oracle(q1, s1))
        experts.down_proj.copy_(unpack_int4_oracle(q2, s2))
        want = experts(x, index, weights)
    torch.testing.assert_close(moe_int4_ref(x, index, weights, q1, s1, q2, s2), want, atol=1e-5, rtol=1e-5)


def test_reference_validates_shapes():
    x, index, weights, q1, s1, q2, s2 = make_case(3, 128, 64, 4, 2)
    with pytest.raises(ValueError):
        moe_int4_ref(x[:, :64], index, weights, q1, s1, q2, s2)
    with pytest.raises(ValueError):
        moe_int4_ref(x, index, weights[:, :1], q1, s1, q2, s2)
    with pytest.raises(ValueError):
        moe_int4_ref(x, index, weights, q1, s1, q2, s2[:, :, :0])


# ---------------------------------------------------------------------------------------------------
# Routing layout


@pytest.mark.parametrize("T,E,A,block_m", [(1, 4, 2, 16), (33, 4, 2, 16), (33, 8, 3, 32), (5, 128, 8, 16)])
def test_moe_align(T, E, A, block_m):
    g = torch.Generator().manual_seed(T)
    index = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    sorted_ids, block_expert = moe_align(index, E, block_m)
    P = T * A
    assert sorted_ids.numel() % block_m == 0 and block_expert.numel() == sorted_ids.numel() // block_m
    real = sorted_ids[sorted_ids < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    assert (sorted_ids[sorted_ids >= P] == P).all()
    flat = index.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        ids = sorted_ids[b * block_m:(b + 1) * block_m]
        ids = ids[ids < P]
        if e < 0:
            assert ids.numel() == 0  # blocks past the end are idle
        else:
            assert ids.numel() > 0 and (flat[ids.long()] == e).all()
    used = block_expert[block_expert >= 0]
    assert torch.equal(used, used.sort().values)  # experts in order, one run each


# ---------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU)

SHAPES = [(1, 128, 64, 4, 2), (7, 128, 192, 4, 2), (33, 128, 64, 4, 2)]
CONFIGS = {
    "default": MoeConfig(),
    # BLOCK_M 32, and BLOCK_N 128 over I=64/192 and H=128: masked column tails on both kernels
    "bm32-bn128": MoeConfig(block_m=32, gu_block_n=128, dn_block_n=128),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("T,H,I,E,A", SHAPES)
def test_triton_matches_reference(interpret, T, H, I, E, A, cfg, dtype):
    x, *rest = make_case(T, H, I, E, A, seed=T)
    x = x.to(dtype)
    got = moe_int4_triton(x, *rest, config=CONFIGS[cfg])
    assert got.dtype == dtype and got.shape == (T, H)
    want = moe_int4_ref(x, *rest)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_triton_skewed_routing_and_group_32(interpret):
    """All tokens on the same experts (runs of 33 rows over 3 blocks of 16), other experts empty."""
    x, *rest = make_case(33, 64, 128, 8, 2, seed=5, group_size=32, skew=True)
    got = moe_int4_triton(x, *rest, group_size=32, config=MoeConfig())
    torch.testing.assert_close(got, moe_int4_ref(x, *rest, group_size=32), **TOL[torch.float32])


def test_triton_no_tokens(interpret):
    x, index, weights, *w = make_case(4, 128, 64, 4, 2)
    got = moe_int4_triton(x[:0], index[:0], weights[:0], *w)
    assert got.shape == (0, 128)


# ---------------------------------------------------------------------------------------------------
# Dispatcher


def test_dispatch_env(monkeypatch):
    case = make_case(3, 128, 64, 4, 2)
    calls = []
    monkeypatch.setattr(M, "moe_int4_triton", lambda *a, **k: calls.append("triton") or moe_int4_ref(*a))
    monkeypatch.setattr(M, "moe_int4_ref", lambda *a, **k: calls.append("ref") or torch.zeros(3, 128))
    monkeypatch.delenv("DG_KERNELS", raising=False)
    moe_int4(*case)  # CPU tensors, auto: the reference
    monkeypatch.setenv("DG_KERNELS", "triton")
    moe_int4(*case)
    monkeypatch.setenv("DG_KERNELS", "ref")
    moe_int4(*case)
    assert calls == ["ref", "triton", "ref"]
    monkeypatch.setenv("DG_KERNELS", "fast")
    with pytest.raises(ConfigError, match="DG_KERNELS"):
        moe_int4(*case)


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("on", True), ("0", False), ("false", False),
                                      ("no", False), ("OFF", False)])
def test_autotune_switch(monkeypatch, value, on):
    """DG_AUTOTUNE follows dgcli.settings' on/off words (DG_AUTOTUNE=false used to leave it on)."""
    from kernels import _dispatch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DG_AUTOTUNE", value)
    assert _dispatch.autotune_enabled(torch.device("cuda")) is on
    assert not _dispatch.autotune_enabled(torch.device("cpu"))
    monkeypatch.setenv("DG_AUTOTUNE", "maybe")
    with pytest.raises(ConfigError, match="DG_AUTOTUNE"):
        _dispatch.autotune_enabled(torch.device("cuda"))


def test_dispatch_forced_triton_on_cpu(interpret, monkeypatch):
    monkeypatch.setenv("DG_KERNELS", "triton")
    x, *rest = make_case(7, 128, 64, 4, 2, seed=2)
    torch.testing.assert_close(moe_int4(x, *rest), moe_int4_ref(x, *rest), **TOL[torch.float32])


def test_cpu_triton_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if INTERPRETED_AT_IMPORT:
        pytest.skip("kernels were imported in interpreter mode")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        moe_int4_triton(*make_case(2, 128, 64, 4, 2))


# ---------------------------------------------------------------------------------------------------
# GPU: the real shapes, compiled kernels


gpu = pytest.mark.skipif(not CUDA or INTERPRETED_AT_IMPORT,
                         reason="needs a CUDA device (and TRITON_INTERPRET unset at import)")


@gpu
@pytest.mark.parametrize("T", [1, 37, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_real_shapes(T, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    H, I, E, A = 2816, 704, 128, 8
    case = [t.cuda() for t in make_case(T, H, I, E, A, seed=T)]
    case[0] = case[0].to(dtype)
    want = moe_int4_ref(*case).float()
    for cfg in (MoeConfig(), MoeConfig(block_m=32, gu_block_n=128, dn_block_n=128, dn_warps=8)):
        got = moe_int4_triton(*case, config=cfg).float()
        torch.testing.assert_close(got, want, **TOL[dtype])
    got = moe_int4(*case).float()  # autotuned
    torch.testing.assert_close(got, want, **TOL[dtype])
