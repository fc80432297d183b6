"""Packed formats against slow, obvious references; quantized modules against their originals."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from quant import formats
from quant.formats import FORMATS, GROUP, SYM_DIVISORS
from quant.runtime import Packed, QuantEmbedding, QuantExperts, QuantLinear

from dgcli.config import ModelConfig
from dgcli.model import Embedding, Experts


def weights(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 6  # a few outliers, as trained weights have
    return w


def nibble(p, k):
    """Element k of a packed uint8 row, per the format's definition (k=2j low, 2j+1 high)."""
    b = int(p[k // 2])
    return b & 0xF if k % 2 == 0 else b >> 4


def test_pack_int4_layout_and_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (3, 5, 128), generator=g, dtype=torch.uint8)
    p = formats.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 5, 64)
    assert int(p[0, 0, 0]) == int(q[0, 0, 0]) | (int(q[0, 0, 1]) << 4)
    for k in (0, 1, 2, 63, 127):
        assert nibble(p[1, 2], k) == int(q[1, 2, k])
    assert torch.equal(formats.unpack_int4(p), q)


@pytest.mark.parametrize("shape", [(4, 16, 128), (40, 192)])
def test_int4_sym_matches_its_definition(shape):
    w = weights(*shape)
    t = formats.quantize_int4_sym(w)
    K = shape[-1]
    assert t["qweight"].shape == (*shape[:-1], K // 2) and t["qweight"].dtype == torch.uint8
    assert t["scales"].shape == (*shape[:-1], K // GROUP) and t["scales"].dtype == torch.float16
    groups = w.reshape(-1, GROUP)
    q = formats.unpack_int4(t["qweight"]).reshape(-1, GROUP).float()
    s = t["scales"].reshape(-1).float()
    for i in range(groups.shape[0]):  # slow reference, one group at a time
        x = groups[i]
        m = x[x.abs().argmax()]
        cands = [float((-m / d).half()) for d in SYM_DIVISORS]
        errs = [float((((x / c).round().clamp(-8, 7)) * c - x).square().sum()) for c in cands]
        assert float(s[i]) in cands
        assert errs[cands.index(float(s[i]))] <= min(errs) * (1 + 1e-5)
        assert torch.equal(q[i], (x / s[i]).round().clamp(-8, 7) + 8)
    # dequantize: (q - 8) * scale; within half a step where w/scale is inside the levels' range,
    # within 2 steps where the searched scale clips (|w| <= 9 steps, the nearest level is 7)
    d = formats.dequantize_int4(t["qweight"], t["scales"])
    ref = ((q - 8) * s[:, None]).reshape(shape)
    assert torch.equal(d, ref)
    signed_step = s[:, None].expand(-1, GROUP).reshape(shape)
    step = signed_step.abs()
    inside = ((w / signed_step) >= -8.5) & ((w / signed_step) <= 7.5)
    assert inside.float().mean() > 0.97  # about one value per group at most
    assert ((d - w).abs()[inside] <= step[inside] * 0.5001).all()
    assert ((d - w).abs() <= step * 2.0001).all()


def test_int4_asym_within_step_and_decodes_with_zeros():
    w = weights(6, 256) + 0.01  # off-centre groups, where a zero point helps
    t = formats.quantize_int4_asym(w)
    assert t["zeros"].shape == t["scales"].shape == (6, 4) and t["zeros"].dtype == torch.float16
    q = formats.unpack_int4(t["qweight"]).float().view(6, 4, GROUP)
    ref = ((q - t["zeros"].float()[..., None]) * t["scales"].float()[..., None]).view(6, 256)
    d = formats.dequantize_int4(t["qweight"], t["scales"], t["zeros"])
    assert torch.equal(d, ref)
    step = t["scales"].float().repeat_interleave(GROUP, -1)
    level = w / step + t["zeros"].float().repeat_interleave(GROUP, -1)
    inside = (level >= -0.5) & (level <= 15.5)  # outside: the searched range clipped the extremes
    assert inside.float().mean() > 0.97  # about one value per group at most
    assert ((d - w).abs()[inside] <= step[inside] * 0.5001).all()
    sym = formats.dequantize_int4(**formats.quantize_int4_sym(w))
    assert (d - w).square().sum() < (sym - w).square().sum()


def test_int8_row_exact():
    w = weights(3, 7, 100)
    t = formats.quantize_int8_row(w)
    assert t["qweight"].dtype == torch.int8 and t["scales"].shape == (3, 7) and t["scales"].dtype == torch.float16
    s = (w.abs().amax(-1) / 127).half().float()
    assert torch.equal(t["scales"].float(), s)
    assert torch.equal(t["qweight"], (w / s[..., None]).round().clamp(-127, 127).to(torch.int8))
    d = formats.dequantize_int8_row(t["qweight"], t["scales"])
    assert torch.equal(d, t["qweight"].float() * s[..., None])
    assert ((d - w).abs() <= s[..., None] * 0.5001).all()


def test_nf4_torch_decoder_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = weights(32, 192)
    t = formats.quantize_nf4(w)
    assert t["qweight"].shape == (32, 96) and t["scales"].shape == (32, 3) and t["scales"].dtype == torch.float32
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(t["qweight"].reshape(-1), packed.reshape(-1))
    ref = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(formats.dequantize_nf4(t["qweight"], t["scales"]), ref)
    assert torch.tensor(formats.NF4_CODE).equal(bnbf.get_4bit_type("nf4", device="cpu").cpu())
    gap = max(b - a for a, b in zip(formats.NF4_CODE, formats.NF4_CODE[1:]))
    assert ((ref - w).abs() <= t["scales"].repeat_interleave(GROUP, -1) * gap / 2 + 1e-7).all()


@pytest.mark.parametrize("fmt", ["int4_sym_g64", "int4_asym_g64", "int8_row", "nf4_g64", "bf16"])
def test_layout_and_nbytes_match_what_quantize_writes(fmt):
    if fmt == "nf4_g64":
        pytest.importorskip("bitsandbytes")
    f = FORMATS[fmt]
    shape = (128, 192)
    out = f.quantize(weights(*shape))
    layout = f.layout(shape, torch.float32)
    assert {s: (tuple(t.shape), t.dtype) for s, t in out.items()} == layout
    assert f.nbytes(shape, torch.float32) == sum(t.numel() * t.element_size() for t in out.values())


def test_group_formats_refuse_k_not_multiple_of_64():
    assert not FORMATS["int4_sym_g64"].supports((4, 16, 704 - 32))
    assert FORMATS["int4_sym_g64"].supports((128, 2816, 704))  # 704 = 11 x 64
    assert FORMATS["int8_row"].supports((4, 16, 33))


# ---------------------------------------------------------------------------- modules


def packed_from(fmt, w):
    p = Packed(fmt, w.shape)
    for s, t in FORMATS[fmt].quantize(w).items():
        setattr(p, s, t)
    return p


@pytest.mark.parametrize("fmt", ["int8_row", "int4_sym_g64", "nf4_g64"])
def test_quant_linear_equals_linear_on_dequantized_weight(fmt):
    if fmt == "nf4_g64":
        pytest.importorskip("bitsandbytes")
    w = weights(96, 128)
    ql = QuantLinear(128, 96, fmt)
    ql.weight = packed_from(fmt, w)
    x = torch.randn(2, 5, 128)
    ref = F.linear(x, ql.weight.dequantize(torch.float32))
    assert torch.equal(ql(x), ref)
    exact = F.linear(x, w)
    bound = 0.02 if fmt == "int8_row" else 0.2  # relative error of the output, 8 and 4 bits
    assert (ref - exact).norm() < bound * exact.norm()



def test_nf4_code_is_made_once_per_device(monkeypatch):
    """bitsandbytes' get_4bit_type builds its code from a list on every call: a host copy and a sync
    per projection on CUDA (~210 a step), which graph capture refuses. The bnb path (run here on the
    CPU) and the torch decoder make the code tensor once per device."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from quant import runtime

    p = packed_from("nf4_g64", weights(96, 128))
    x = torch.randn(3, 128)
    ref = F.linear(x, formats.dequantize_nf4(p.qweight, p.scales))
    built = []
    real_tensor, real_code = torch.tensor, bnbf.get_4bit_type
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append("tensor") or real_tensor(*a, **k))
    monkeypatch.setattr(bnbf, "get_4bit_type", lambda *a, **k: built.append("bnb") or real_code(*a, **k))
    formats.nf4_code.cache_clear()
    for _ in range(3):
        assert torch.equal(runtime._bnb_linear(x, p), ref)
        assert torch.equal(p.dequantize(), formats.dequantize_nf4(p.qweight, p.scales))
    assert built == ["tensor"]

def test_quant_experts_match_experts_on_dequantized_weights():
    cfg = ModelConfig.from_dict(dict(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=6,
                                     top_k_experts=2, moe_intermediate_size=64))
    ref = Experts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.copy_(weights(6, 128, 128, seed=1))
        ref.down_proj.copy_(weights(6, 128, 64, seed=2))
    q = QuantExperts(ref, {"gate_up_proj": "int4_sym_g64", "down_proj": "int8_row"})
    q.gate_up_proj = packed_from("int4_sym_g64", ref.gate_up_proj.data)
    q.down_proj = packed_from("int8_row", ref.down_proj.data)
    fake = Experts(cfg)
    with torch.no_grad():
        fake.gate_up_proj.copy_(q.gate_up_proj.dequantize())
        fake.down_proj.copy_(q.down_proj.dequantize())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 128, generator=g)
    index = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10)])
    w = torch.rand(10, 2, generator=g)
    torch.testing.assert_close(q(x, index, w), fake(x, index, w), rtol=1e-5, atol=1e-6)


def test_quant_experts_share_the_model_moe_arithmetic(monkeypatch):
    """Only the per-expert decoding is QuantExperts' own: the sort, routing weights and unpermute are
    dgcli.model.moe's, with its offsets (no bincount of its own)."""
    import dgcli.model as model

    cfg = ModelConfig.from_dict(dict(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                                     top_k_experts=2, moe_intermediate_size=64))
    q = QuantExperts(Experts(cfg), {"gate_up_proj": "int4_asym_g64", "down_proj": "int4_asym_g64"})
    q.gate_up_proj = packed_from("int4_asym_g64", weights(4, 128, 128, seed=1))
    q.down_proj = packed_from("int4_asym_g64", weights(4, 128, 64, seed=2))
    calls = []
    real = model.moe
    monkeypatch.setattr(model, "moe", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("QuantExperts counts experts itself"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 128, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    out = q(x, index, torch.rand(7, 2, generator=g))
    assert calls == [4] and out.shape == (7, 128)


def test_quant_embedding_three_uses_and_dtype():
    emb = Embedding(300, 64)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(300, 64))
    qe = QuantEmbedding(300, 64, "int8_row")
    qe.weight = packed_from("int8_row", emb.weight.data)
    fake = Embedding(300, 64)
    with torch.no_grad():
        fake.weight.copy_(qe.weight.dequantize())
    ids = torch.tensor([[0, 5, 299, 5]])
    torch.testing.assert_close(qe(ids), fake(ids), rtol=0, atol=0)
    h = torch.randn(1, 4, 64)
    torch.testing.assert_close(qe.head(h), fake.head(h), rtol=1e-5, atol=1e-5)
    probs = torch.softmax(torch.randn(1, 4, 300), -1)
    torch.testing.assert_close(qe.soft(probs), fake.soft(probs), rtol=1e-5, atol=1e-5)
    # .to(dtype) changes what it decodes to, never the stored scales
    qe.to(torch.bfloat16)
    assert qe.weight.dtype == torch.bfloat16 and qe.weight.scales.dtype == torch.float16
    assert qe(ids).dtype == torch.bfloat16 and qe.embed_scale().dtype == torch.bfloat16



class Traffic(TorchDispatchMode):
    """Bytes each (non-view) op reads and writes: its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.bytes += sum(t.nbytes for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        return out


def test_int8_soft_embedding_reads_the_codes_once():
    """The self-conditioning input at full vocabulary size (on meta: shapes only). The codes are read
    once and converted to bf16 (1 + 2 + 2 bytes per weight with the matmul's read); decoding through
    fp32, as before, moved ~21 bytes per weight (15 GB a step)."""
    V, H = 262144, 2816
    qe = QuantEmbedding(V, H, "int8_row", device="meta").to(torch.bfloat16)
    probs = torch.empty(1, 4, V, dtype=torch.bfloat16, device="meta")
    with Traffic() as t:
        out = qe.soft(probs)
    assert out.shape == (1, 4, H) and out.dtype == torch.bfloat16
    assert t.bytes < 6 * V * H, t.bytes / (V * H)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_soft_embedding_in_half_precision(dtype):
    """p * scale is tiny (1/V times ~1e-4): folded into fp16 probabilities as is, it would fall into
    the subnormals. All-zero rows (pad tokens) get the placeholder scale 1, which must not set the
    reference either (relative to the largest scale, everything else would underflow)."""
    V, H = 4096, 64
    qe = QuantEmbedding(V, H, "int8_row")
    w = weights(V, H, seed=5) * (0.1 + torch.rand(V, 1, generator=torch.Generator().manual_seed(7)))
    w[::512] = 0
    qe.weight = packed_from("int8_row", w)
    assert qe.weight.scales.max() == 1
    qe.to(dtype)
    probs = torch.softmax(torch.randn(2, 3, V, generator=torch.Generator().manual_seed(6)), -1).to(dtype)
    ref = torch.matmul(probs.float(), qe.weight.dequantize(torch.float32)) * qe.embed_scale().float()
    got = qe.soft(probs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=ref.abs().max().item() * 1e-2)

def test_packed_experts_are_what_the_moe_kernel_reads():
    """quant's int4 tensors through kernels.moe_int4's reference equal QuantExperts' own path."""
    moe = pytest.importorskip("kernels.moe_int4")
    cfg = ModelConfig.from_dict(dict(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                                     top_k_experts=2, moe_intermediate_size=64))
    q = QuantExperts(Experts(cfg), {"gate_up_proj": "int4_sym_g64", "down_proj": "int4_sym_g64"})
    q.gate_up_proj = packed_from("int4_sym_g64", weights(4, 128, 128, seed=1))
    q.down_proj = packed_from("int4_sym_g64", weights(4, 128, 64, seed=2))
    assert torch.equal(moe.unpack_int4_oracle(q.down_proj.qweight, q.down_proj.scales), q.down_proj.dequantize())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 128, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g)
    ref = moe.moe_int4_ref(x, index, w, q.gate_up_proj.qweight, q.gate_up_proj.scales, q.down_proj.qweight,
                           q.down_proj.scales, group_size=GROUP)
    torch.testing.assert_close(q(x, index, w), ref, rtol=1e-5, atol=1e-6)


def test_int8_projections_and_head_take_the_int8_kernel_when_triton_runs(monkeypatch):
    """With Triton (CUDA; here its interpreter), int8 weights go through kernels.int8_linear, which
    reads the codes directly: same result as decoding the weight first, within fp32 rounding."""
    pytest.importorskip("triton")
    import importlib

    k8 = importlib.import_module("kernels.int8_linear")  # the module, not the function kernels exports

    calls = []
    real = k8.int8_linear_triton
    monkeypatch.setattr(k8, "int8_linear_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ql = QuantLinear(128, 96, "int8_row")
    ql.weight = packed_from("int8_row", weights(96, 128))
    qe = QuantEmbedding(300, 64, "int8_row")
    qe.weight = packed_from("int8_row", weights(300, 64, seed=4))
    x, h = torch.randn(2, 5, 128), torch.randn(1, 4, 64)
    plain = ql(x), qe.head(h)
    assert calls == []  # on the CPU by default: the plain path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DG_KERNELS", "triton")
    fast = ql(x), qe.head(h)
    assert len(calls) == 2
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
