"""kernels/int8_linear's int8_linear_heads (o_proj over attention's output heads read in place) and
kernels/fused_attention (the module swap the Engine installs on CUDA).

The heads kernel reads the same K blocks in the same order as int8_linear on the flattened copy, so
with the same tile the two agree bit for bit, whatever the heads' strides: checked under Triton's
interpreter on the layouts the model produces (CUDA's memory-efficient SDPA output, imitated by the
`sdpa_layout` fixture, and the CPU's).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from dgcli import model as dgmodel
from dgcli.model import Attention
from quant.formats import quantize_int8_row
from quant.runtime import QuantLinear

pytest.importorskip("triton", reason="triton is not installed (the reference runs without it)")

I8 = importlib.import_module("kernels.int8_linear")
from kernels.fused_attention import FusedAttention, install  # noqa: E402


def folded_heads(B, T, Hk, groups, D, dtype, cuda_layout, seed=0):
    """The grouped decoder's output heads (B, T, Hk, groups, D), as Attention.attend returns them: a
    view of SDPA's (B, Hk, groups·T, D) output, laid out as CUDA's memory-efficient kernel writes it
    ([B, groups·T, Hk, D]) or as the CPU's (contiguous)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, Hk, groups * T, D, generator=g).to(dtype)
    if cuda_layout:
        y = y.transpose(1, 2).contiguous().transpose(1, 2)
    return y.unflatten(2, (groups, T)).permute(0, 3, 1, 2, 4)


def weights(N, K, seed=1):
    return tuple(quantize_int8_row(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * K**-0.5).values())


@pytest.mark.parametrize("tile", [I8.DEFAULT_TILE, (16, 32, 32, 4, 2)], ids=["default", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cuda_layout", [True, False], ids=["cuda-layout", "cpu-layout"])
def test_heads_in_place_are_the_flat_copy_bit_for_bit(interpret, cuda_layout, dtype, tile):
    B, T, Hk, groups, D, N = 2, 9, 2, 3, 32, 40  # ragged rows and columns; D = one or two K blocks
    heads = folded_heads(B, T, Hk, groups, D, dtype, cuda_layout)
    q, s = weights(N, Hk * groups * D)
    flat = heads.reshape(B * T, -1)  # the copy Attention.project makes
    assert flat.data_ptr() != heads.data_ptr()
    same_blocks = tile[:2] + (32,) + tile[3:]  # the heads kernel cuts BLOCK_K to a divisor of D
    want = I8.int8_linear_triton(flat, q, s, tile=same_blocks).view(B, T, N)
    got = I8.int8_linear_heads_triton(heads, q, s, tile=tile)
    assert got.shape == (B, T, N) and got.dtype == dtype
    assert torch.equal(got, want)
    torch.testing.assert_close(got, I8.int8_linear_heads_ref(heads, q, s), atol=2e-2, rtol=1e-2)


def test_four_dim_heads_and_bad_input(interpret):
    heads = torch.randn(1, 5, 4, 16).transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D), strided
    q, s = weights(24, 64)
    want = I8.int8_linear_triton(heads.reshape(5, 64), q, s, tile=(64, 64, 16, 4, 3))[None]
    assert torch.equal(I8.int8_linear_heads_triton(heads, q, s), want)
    with pytest.raises(ValueError, match="multiple of 16"):
        I8.int8_linear_heads_triton(torch.randn(1, 2, 3, 8), *weights(4, 24))
    with pytest.raises(ValueError, match="unit stride"):
        I8.int8_linear_heads_triton(torch.randn(1, 2, 16, 3).transpose(2, 3), q, s)


def test_aot_specs():
    heads = [s for s in I8.AOT if s.kernel == "int8_linear.heads"]
    assert sum(s.default for s in heads) == 1
    assert all(256 % s.constexprs["BLOCK_K"] == 0 for s in heads)  # each K block within one head


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("Hk,D", [(8, 256), (2, 512)])  # the released model's sliding and full layers
def test_gpu_real_shapes(monkeypatch, Hk, D):
    """Compiled, at a 256-token canvas: the folded heads of CUDA's SDPA read in place equal int8_linear
    on the flat copy with the same tile, bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    groups = 16 // Hk
    q, s = (t.cuda() for t in weights(2816, 16 * D))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, Hk, groups * 256, D, generator=g).to(torch.bfloat16).cuda()
    bias = torch.zeros(1, groups * 256, device="cuda", dtype=torch.bfloat16)  # a mask: the memory-efficient kernel
    out = torch.nn.functional.scaled_dot_product_attention(y, y, y, attn_mask=bias)  # its output layout
    heads = out.unflatten(2, (groups, 256)).permute(0, 3, 1, 2, 4)
    for tile in (I8.DEFAULT_TILE, (128, 128, 64, 8, 3)):
        want = I8.int8_linear_triton(heads.reshape(256, -1), q, s, tile=tile)
        assert torch.equal(I8.int8_linear_heads_triton(heads, q, s, tile=tile)[0], want)


# --------------------------------------------------------------------------------------- the module swap


def int8_o_proj(model) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            old = m.o_proj
            new = QuantLinear(old.in_features, old.out_features, "int8_row")
            new.weight.qweight, new.weight.scales = quantize_int8_row(old.weight.detach()).values()
            new.weight.dtype = old.weight.dtype
            m.o_proj = new
            n += 1
    return n


def test_install_keeps_the_state_dict_and_plain_projections_take_the_parent(tiny, monkeypatch):
    model = copy.deepcopy(tiny[0].model)
    before = model.state_dict()
    assert install(model) == model.config.num_hidden_layers and install(model) == 0
    assert all(type(layer.self_attn) is FusedAttention for layer in model.model.decoder.layers)
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(I8, "launch", lambda *a, **k: pytest.fail("launched a kernel for a bf16/fp32 o_proj"))
    attn = model.model.decoder.layers[0].self_attn
    heads = torch.randn(1, 3, 4, 16)
    assert torch.equal(attn.project(heads), Attention.project(attn, heads))


def prefill_then_decode(models, tok) -> list:
    """Each model's logits for a decode of a short canvas after a prompt's prefill, on a static cache."""
    ids = torch.tensor([tok.encode("the water is deep and the sky is wide")], dtype=torch.long)
    canvas = torch.tensor([[3, 17, 40, 9, 5, 8]])
    out = []
    for model in models:
        cache = model.new_cache(static=True, max_tokens=256)
        model.encode(ids, cache)
        out.append(model.logits(model.decode(canvas, cache)))
    return out


@pytest.mark.usefixtures("sdpa_layout")
def test_fused_model_is_the_unfused_model(tiny, interpret, monkeypatch):
    """The tiny model (grouped query heads: 4 over 2 or 1) with int8 o_proj on the Triton path, on
    the static cache (its decoder folds the heads), with and without the swap: the same logits bit for
    bit, and the o_proj of every decoder layer reads the heads in place. BLOCK_K 16 for both paths:
    the tiny heads (16, 32) would cut the heads kernel's 64 to 16, and another order of the fp32 sums
    is another result (at the released model's heads, 256 and 512, every tile's BLOCK_K divides)."""
    monkeypatch.setattr(I8, "DEFAULT_TILE", (64, 64, 16, 4, 3))
    engine, tok = tiny
    unfused = copy.deepcopy(engine.model)
    L = int8_o_proj(unfused)
    fused = copy.deepcopy(unfused)
    install(fused)
    launches = []
    real = I8.launch
    monkeypatch.setattr(I8, "launch", lambda kernel, *a, **k: launches.append((kernel, a[2])) or real(kernel, *a, **k))
    out = prefill_then_decode((unfused, fused), tok)
    heads = [x for k, x in launches if k is I8._int8_linear_heads_kernel]
    assert len(heads) == (L - 1) + L  # the prefill's layers (the last writes only K/V), the decoder's
    sliding = sum(dgmodel.SLIDING == t for t in unfused.config.layer_types)
    folded = [x for x in heads if x.shape[3] > 1]  # (B, T, Hk, groups, D): the decoder's sliding layers
    assert len(folded) == sliding and not any(x.is_contiguous() for x in folded)
    assert torch.equal(out[1], out[0])

