"""kernels/geglu_int8 (an int8 MLP's gate, up, gelu_tanh and product in one kernel) and
kernels/fused_mlp (the module swap the Engine installs on CUDA).

On CPU the kernel runs in Triton's interpreter. What is exact: with inputs whose dot products are
exact in fp32 (small integer multiples of 1/8 against int8 codes), the kernel's gate and up are the
int8_linear reference's bit for bit, and so is h when the interpreter is given torch's fp32 gelu
(`torch_gelu`: on CUDA the kernel calls libdevice's tanhf, the function torch's CUDA gelu calls; the
interpreter has none and uses an exp formula a few fp32 ulps off). Those tests compare with
torch.equal, so a kernel that skipped one of the unfused path's roundings (gate, up, gelu, product,
each to the dtype) would fail them. With random inputs and the interpreter's own tanh: within one
unit in the last place, nearly all elements bit-identical.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from dgcli.model import MLP, SelfConditioning
from quant.formats import quantize_int8_row
from quant.runtime import QuantLinear

pytest.importorskip("triton", reason="triton is not installed (the reference runs without it)")

G = importlib.import_module("kernels.geglu_int8")
from kernels.fused_mlp import FusedMLP, FusedSelfConditioning, install  # noqa: E402
from kernels.int8_linear import int8_linear_ref  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1 / 64, rtol=1 / 128),
       torch.float16: dict(atol=2e-3, rtol=1e-3)}


@pytest.fixture
def torch_gelu(monkeypatch):
    """The kernel's fp32 gelu_tanh replaced, under the interpreter, by torch's fp32 F.gelu (which,
    rounded to bf16, is torch's bf16 gelu bit for bit): the rest of the kernel can then be checked
    exactly."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def gelu(g, LIBDEVICE):
        out = F.gelu(torch.from_numpy(np.array(g.handle.data, dtype=np.float32)), approximate="tanh").numpy()
        return tl.core.tensor(interpreter.TensorHandle(out, tl.float32), g.type)

    monkeypatch.setattr(G, "_gelu_tanh", gelu)


def exact_case(M, K, N, dtype, seed=0):
    """x in multiples of 1/8 up to ±2, int8 codes: every product and partial sum is exact in fp32, so
    any summation order gives the same dot. Scales put the gate around ±3, where gelu bends."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-16, 17, (M, K), generator=g) / 8).to(dtype)
    qg, qu = (torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8) for _ in range(2))
    sg, su = ((torch.rand(N, generator=g) * 3 / (127 * K**0.5)).half() for _ in range(2))
    sg[0] = 0  # an all-zero output column
    return x, qg, sg, qu, su


def random_case(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    (qg, sg), (qu, su) = (quantize_int8_row(torch.randn(N, K, generator=g) * 2 * K**-0.5).values() for _ in range(2))
    return x, qg, sg, qu, su


# ---------------------------------------------------------------------------------------- reference


def test_reference_is_the_unfused_arithmetic():
    x, qg, sg, qu, su = exact_case(5, 64, 24, torch.bfloat16)
    gate, up = int8_linear_ref(x, qg, sg), int8_linear_ref(x, qu, su)
    assert torch.equal(G.geglu_int8_ref(x, qg, sg, qu, su), F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="same shape"):
        G.geglu_int8_ref(x, qg, sg, qu[:8], su[:8])


# ------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("tile", [None, (16, 32, 32, 4, 2)], ids=["default", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (33, 96, 130)])  # ragged M, N and K tails
def test_kernel_is_the_reference_bit_for_bit(interpret, torch_gelu, M, K, N, dtype, tile):
    x, qg, sg, qu, su = exact_case(M, K, N, dtype, seed=M)
    want = G.geglu_int8_ref(x, qg, sg, qu, su)
    got = G.geglu_int8_triton(x, qg, sg, qu, su, tile=tile)
    assert got.dtype == dtype and got.shape == (M, N)
    assert torch.equal(got, want)


def test_the_roundings_matter(interpret, torch_gelu):
    """The exact comparison can see a missing rounding: without rounding gate, up and the gelu to
    bf16 first, most elements of h come out different."""
    x, qg, sg, qu, su = exact_case(33, 96, 130, torch.bfloat16, seed=1)
    gate, up = (F.linear(x.float(), q.float()) * s.float() for q, s in ((qg, sg), (qu, su)))
    unrounded = (F.gelu(gate, approximate="tanh") * up).to(torch.bfloat16)
    want = G.geglu_int8_ref(x, qg, sg, qu, su)
    assert (unrounded != want).float().mean() > 0.2
    assert torch.equal(G.geglu_int8_triton(x, qg, sg, qu, su), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_with_the_interpreters_tanh(interpret, dtype):
    """Random inputs (fp32 dots in the tile's order) and the interpreter's exp-based tanh: within
    one unit in the last place of the reference, nearly every element the same bits."""
    x, qg, sg, qu, su = random_case(40, 128, 96, dtype, seed=3)
    got = G.geglu_int8(x, qg, sg, qu, su)
    want = G.geglu_int8_ref(x, qg, sg, qu, su)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype != torch.float32:
        assert (got == want).float().mean() >= 0.97


def test_dispatcher_keeps_leading_dims_and_cpu_takes_the_reference(monkeypatch):
    x, qg, sg, qu, su = exact_case(12, 64, 40, torch.float32)
    monkeypatch.setenv("DG_KERNELS", "auto")
    monkeypatch.setattr(G, "launch", lambda *a, **k: pytest.fail("launched a kernel on CPU tensors"))
    got = G.geglu_int8(x.view(3, 4, 64), qg, sg, qu, su)
    assert got.shape == (3, 4, 40) and torch.equal(got.view(12, 40), G.geglu_int8_ref(x, qg, sg, qu, su))


def test_aot_specs():
    assert sum(s.default for s in G.AOT) == 1
    assert {s.constexprs["LIBDEVICE"] for s in G.AOT} == {True}  # what CUDA runs
    assert {s.config["BLOCK_M"] for s in G.AOT} >= {64, 128}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tile", [(64, 64, 64, 4, 3), (128, 128, 64, 8, 3)])
def test_gpu_matches_the_unfused_kernels(monkeypatch, tile):
    """On CUDA, at the dense MLP's shapes: the fused kernel against int8_linear twice (the same
    tile, so the same dot order), torch's gelu and mul; libdevice's tanhf is torch's, so bit for bit
    (this checks that no compiler contracts the gelu differently)."""
    from kernels.int8_linear import int8_linear_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    x, qg, sg, qu, su = (t.cuda() for t in random_case(256, 2816, 2112, torch.bfloat16))
    unfused = (F.gelu(int8_linear_triton(x, qg, sg, tile=tile), approximate="tanh")
               * int8_linear_triton(x, qu, su, tile=tile))
    got = G.geglu_int8_triton(x, qg, sg, qu, su, tile=tile)
    assert torch.equal(got, unfused), (got != unfused).float().mean().item()


# --------------------------------------------------------------------------------------- the module swap


def int8_mlps(model) -> list[str]:
    """Make every MLP's (and self-conditioning's) gate, up and down int8-per-row QuantLinears, as
    quant.runtime loads them; returns the MLPs' names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, (MLP, SelfConditioning)):
            names.append(name)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                old = getattr(m, proj)
                new = QuantLinear(old.in_features, old.out_features, "int8_row")
                new.weight.qweight, new.weight.scales = quantize_int8_row(old.weight.detach()).values()
                new.weight.dtype = old.weight.dtype
                setattr(m, proj, new)
    return names


def test_install_swaps_every_mlp_and_keeps_the_state_dict(tiny):
    model = copy.deepcopy(tiny[0].model)
    before = model.state_dict()
    names = [n for n, m in model.named_modules() if isinstance(m, (MLP, SelfConditioning))]
    assert len(names) == model.config.num_hidden_layers + 1  # every layer's dense branch, self-conditioning
    assert install(model) == len(names)
    kinds = {type(m) for n, m in model.named_modules() if n in names}
    assert kinds == {FusedMLP, FusedSelfConditioning}
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert install(model) == 0  # idempotent


def test_plain_linears_and_ref_mode_take_the_parent(monkeypatch):
    monkeypatch.setattr(G, "launch", lambda *a, **k: pytest.fail("launched the fused kernel"))
    mlp = MLP(64, 32)
    x = torch.randn(3, 64)
    want = mlp.gated(x)
    mlp.__class__ = FusedMLP
    monkeypatch.setenv("DG_KERNELS", "triton")
    assert torch.equal(mlp.gated(x), want)  # bf16/fp32 Linear weights: nothing to fuse
    int8_mlps(mlp)
    monkeypatch.setenv("DG_KERNELS", "ref")  # int8 weights, but the reference path (decode + F.linear)
    assert torch.equal(mlp.gated(x), MLP.gated(mlp, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_model_is_the_unfused_model(tiny, interpret, torch_gelu, monkeypatch, dtype):
    """The tiny model with int8 MLPs on the Triton path (DG_KERNELS=triton), with and without the
    swap: the same logits, bit for bit (the same tile for both, so the same dots), and one fused
    launch per MLP instead of two int8_linear launches, a gelu and a mul."""
    engine, tok = tiny
    unfused = copy.deepcopy(engine.model).to(dtype)
    names = int8_mlps(unfused)
    fused = copy.deepcopy(unfused)
    install(fused)
    launches = []
    real = G.launch
    monkeypatch.setattr(G, "launch", lambda kernel, *a, **k: launches.append(kernel) or real(kernel, *a, **k))
    ids = torch.tensor([tok.encode("the water is deep")], dtype=torch.long)
    canvas = torch.tensor([[3, 17, 40, 9]])
    out = []
    for model in (unfused, fused):
        cache = model.new_cache()
        model.encode(ids, cache)
        hidden = model.decode(canvas, cache)
        out.append(model.logits(model.decode(canvas, cache, sc_logits=model.logits(hidden).to(dtype))))
    L = unfused.config.num_hidden_layers
    # unfused: no launches; fused: the prefill's layers (the last only writes K/V), two decodes'
    # layers, and self-conditioning in the second decode (the first has a zero signal: still run)
    assert len(launches) == (L - 1) + 2 * (L + 1) and len(names) == L + 1
    assert torch.equal(out[1], out[0])

