"""kernels/mix (a layer's glue between its matmuls, one kernel each way) and kernels/fused_mix (the
layer swap the Engine installs on CUDA); the model's split of that glue (Layer.mix_in / mix_out,
Router.inputs / route, Experts.slots) keeps its arithmetic.

On CPU the Triton kernels run in Triton's interpreter (slow: few rows). Tolerances: the kernels
differ from the references only in the order of the fp32 sums of squares and of the slot sum, so
fp32 agrees to ~1e-6 relative (no bit-exact share asked: one ulp in a row's scale moves every
element) and bf16/fp16 to one unit in the last place, with nearly every element bit for bit
(which a kernel that skipped one of the model's roundings would not reach).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from dgcli import model as dgmodel
from dgcli.config import ModelConfig
from dgcli.model import Layer

pytest.importorskip("triton", reason="triton is not installed (the references run without it)")

X = importlib.import_module("kernels.mix")  # the module
from kernels.fused_mix import FusedLayer, install  # noqa: E402
from test_kernels_norm import _Count  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1 / 32, rtol=1 / 128),
       torch.float16: dict(atol=4e-3, rtol=1e-3)}
EXACT = {torch.float32: 0.0, torch.bfloat16: 0.97, torch.float16: 0.97}
EPS = 1e-6


def check(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    same = (got == want).float().mean().item()
    assert same >= EXACT[dtype], f"only {same:.1%} bit-identical"


def config(H=64, E=8, A=3) -> ModelConfig:
    return ModelConfig.from_dict(dict(vocab_size=32, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=E,
                                      top_k_experts=A, moe_intermediate_size=32, rms_norm_eps=EPS))


def random_layer(dtype, H=64, E=8, A=3, seed=0) -> Layer:
    """A layer whose glue parameters (the norms, the router's scale, the layer scalar) are random."""
    g = torch.Generator().manual_seed(seed)
    layer = Layer(config(H, E, A), 0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name or "scale" in name
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        layer.layer_scalar.fill_(0.6)
    return layer.to(dtype)


def inputs(shape, dtype, seed=1, A=3):
    """x (a residual larger than the sublayers' outputs: the adds' rounding shows), h, dense, slots."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 8).to(dtype)
    h, dense = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    slots = torch.randn(x.numel() // shape[-1], A, shape[-1], generator=g) * 0.3  # fp32, as the reference path's
    return x, h, dense, slots


def in_args(layer: Layer):
    r = layer.router
    return (layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
            layer.pre_feedforward_layernorm_2.weight, r.scale, r.root_size, EPS)


def out_args(layer: Layer):
    return (layer.post_feedforward_layernorm_1.weight, layer.post_feedforward_layernorm_2.weight,
            layer.post_feedforward_layernorm.weight)


def check_out(got, want, dtype):
    """mix_out's pairs: the new residual, and the next norm of it (or None in both)."""
    check(got[0], want[0], dtype)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        check(got[1], want[1], dtype)


# ---------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_references_are_the_layers_arithmetic(dtype):
    layer = random_layer(dtype)
    x, h, dense, slots = inputs((2, 5, 64), dtype)
    for got, want in zip(X.mix_in_ref(x, h, *in_args(layer)), layer.mix_in(x, h), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    got = X.mix_out_ref(x, dense, slots, *out_args(layer), layer.layer_scalar, EPS)
    want = layer.mix_out(x, dense, slots, layer.layer_scalar)
    assert torch.equal(got[0], want[0]) and got[1] is None and want[1] is None
    got = X.mix_out_ref(x, dense, slots, *out_args(layer), layer.layer_scalar, EPS, layer.input_layernorm.weight)
    want = layer.mix_out(x, dense, slots, layer.layer_scalar, layer.input_layernorm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(want[1], layer.input_layernorm(want[0]))


def test_the_split_layer_is_the_unsplit_arithmetic():
    """Layer.forward through mix_in / route / slots / mix_out equals the pre-split forward (router on
    the raw residual, experts summed, norms applied in turn), bit for bit."""
    from dgcli.cache import KVCache

    layer = random_layer(torch.bfloat16, H=64, E=8, A=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 64, generator=g).to(torch.bfloat16)
    D = layer.self_attn.head_dim
    cos, sin = torch.ones(6, D, dtype=torch.bfloat16), torch.zeros(6, D, dtype=torch.bfloat16)
    scalar = layer.layer_scalar

    def unsplit(self, x, cos, sin, cache, i, encode, scalar):
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, i, encode)
        x = self.post_attention_layernorm.add_to(x, h)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), index, weights)
        moe = self.post_feedforward_layernorm_2(moe.reshape(x.shape))
        return self.post_feedforward_layernorm.add_to(x, dense + moe) * scalar

    with torch.inference_mode():
        got, none = layer(x, cos, sin, KVCache(config()), 0, True, scalar)
        want = unsplit(layer, x, cos, sin, KVCache(config()), 0, True, scalar)
        # given the input norm it would have made, and the norm of its output: the same, and that norm
        again, normed = layer(x, cos, sin, KVCache(config()), 0, True, scalar, normed=layer.input_layernorm(x),
                              next_norm=layer.post_attention_layernorm)
    assert torch.equal(got, want) and none is None
    assert torch.equal(again, want) and torch.equal(normed, layer.post_attention_layernorm(want))


def test_slots_summed_are_the_experts_forward():
    from quant.runtime import QuantExperts

    layer = random_layer(torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 64, generator=g)
    weights, index = layer.router(x)
    slots = layer.experts.slots(x, index, weights)
    assert slots.shape == (7, 3, 64) and slots.dtype == torch.float32
    assert torch.equal(dgmodel.sum_slots(slots, x.dtype), layer.experts(x, index, weights))
    quant = QuantExperts(layer.experts, {})  # unpacked weights: the parent's path, decoded per expert
    quant.load_state_dict(layer.experts.state_dict())
    assert torch.equal(quant.slots(x, index, weights), slots)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_int4_experts_hand_back_their_slots(impl, monkeypatch):
    M = importlib.import_module("kernels.moe_int4")
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    T, H, I, E, A = 5, 128, 64, 4, 2
    q1, s1 = M.pack_int4_oracle(torch.randn(E, 2 * I, H, generator=g) * H**-0.5)
    q2, s2 = M.pack_int4_oracle(torch.randn(E, H, I, generator=g) * I**-0.5)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    weights, index = torch.topk(torch.randn(T, E, generator=g).softmax(-1), A)
    run = M.moe_int4_ref if impl == "ref" else M.moe_int4_triton
    slots = run(x, index, weights, q1, s1, q2, s2, slots=True)
    assert slots.shape == (T, A, H)
    assert slots.dtype == (torch.float32 if impl == "ref" else torch.bfloat16)  # the down kernel writes x's dtype
    assert torch.equal(dgmodel.sum_slots(slots, x.dtype), run(x, index, weights, q1, s1, q2, s2))
    assert run(x[:0], index[:0], weights[:0], q1, s1, q2, s2, slots=True).shape == (0, A, H)


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 48), (1, 2816)], ids=["48", "2816"])
def test_mix_in(interpret, shape, dtype):
    layer = random_layer(dtype, H=shape[-1])
    x, h, _, _ = inputs(shape, dtype)
    got, want = X.mix_in(x, h, *in_args(layer)), X.mix_in_ref(x, h, *in_args(layer))
    for a, b in zip(got, want, strict=True):
        check(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 48), (1, 2816)], ids=["48", "2816"])
def test_mix_out(interpret, shape, dtype):
    layer = random_layer(dtype, H=shape[-1])
    x, _, dense, slots = inputs(shape, dtype)
    for s, w_next in ((slots, None), (slots.to(dtype), layer.input_layernorm.weight)):  # the reference
        # experts' fp32 slots, the int4 kernel's in x's dtype; without and with the next norm folded in
        args = (x, dense, s, *out_args(layer), layer.layer_scalar, EPS, w_next)
        check_out(X.mix_out(*args), X.mix_out_ref(*args), dtype)


def test_mix_out_sums_the_slots_in_fp32_and_rounds_once(interpret):
    """Summing the bf16 slots in bf16 (a rounding a step) would miss the exact-share bar."""
    layer = random_layer(torch.bfloat16, H=64, A=8)
    x, _, dense, slots = inputs((4, 64), torch.bfloat16, A=8)
    slots = slots.to(torch.bfloat16)
    args = (*out_args(layer), layer.layer_scalar, EPS)
    want = X.mix_out_ref(x, dense, slots, *args)[0]
    in_bf16 = slots[:, 0]
    for j in range(1, 8):
        in_bf16 = in_bf16 + slots[:, j]
    rounded_each_step = X.mix_out_ref(x, dense, in_bf16[:, None], *args)[0]
    assert (rounded_each_step == want).float().mean() < EXACT[torch.bfloat16]  # the two orders do differ
    check(X.mix_out(x, dense, slots, *args)[0], want, torch.bfloat16)


def test_mix_in_rounds_the_router_input_three_times(interpret):
    """The router's input rounded after the norm, after ·scale and after ·H^-½, as Router.inputs
    (H = 48: 64^-½ is a power of two, whose product rounds the same whenever it is rounded)."""
    layer = random_layer(torch.bfloat16, H=48)
    x, h, _, _ = inputs((8, 48), torch.bfloat16)
    want = X.mix_in_ref(x, h, *in_args(layer))
    n = want[0].float() * torch.rsqrt(want[0].float().pow(2).mean(-1, keepdim=True) + EPS)
    once = (n * layer.router.scale.float() * layer.router.root_size).to(torch.bfloat16)
    assert (once == want[3]).float().mean() < EXACT[torch.bfloat16]
    check(X.mix_in(x, h, *in_args(layer))[3], want[3], torch.bfloat16)


def test_strided_rows(interpret):
    layer = random_layer(torch.bfloat16, H=40)
    x, h, dense, slots = inputs((6, 4, 40), torch.bfloat16)
    xs, hs, ds = x[:, 1], h[:, 2], dense[:, 3]  # evenly strided rows: read in place
    for a, b in zip(X.mix_in(xs, hs, *in_args(layer)), X.mix_in_ref(xs, hs, *in_args(layer)), strict=True):
        assert a.is_contiguous()
        check(a, b, torch.bfloat16)
    s = slots[:6].transpose(0, 1).contiguous().transpose(0, 1)  # slots (6, 3, 40) with slot-major strides
    args = (xs, ds, s, *out_args(layer), layer.layer_scalar, EPS, layer.input_layernorm.weight)
    check_out(X.mix_out(*args), X.mix_out_ref(*args), torch.bfloat16)


def test_bad_shapes_are_one_line_errors():
    layer = random_layer(torch.float32, H=16)
    x = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="h "):
        X.mix_in_triton(x, x[:1], *in_args(layer))
    with pytest.raises(ValueError, match="weight"):
        X.mix_in_triton(x, x, torch.ones(8), *in_args(layer)[1:])
    with pytest.raises(ValueError, match="slots"):
        X.mix_out_triton(x, x, torch.zeros(3, 2, 16), *out_args(layer), layer.layer_scalar, EPS)
    with pytest.raises(ValueError, match="scalar"):
        X.mix_out_triton(x, x, torch.zeros(2, 2, 16), *out_args(layer), torch.ones(2), EPS)


def test_aot_specs_are_the_released_width():
    specs = {s.kernel: s for s in X.AOT}
    assert set(specs) == {"mix.in", "mix.out"}
    assert all(s.default and s.constexprs["BLOCK"] >= 2816 for s in specs.values())


# --------------------------------------------------------------------------------------- the module swap


def test_install_swaps_every_layer_and_keeps_the_state_dict(tiny):
    model = copy.deepcopy(tiny[0].model)
    before = model.state_dict()
    assert install(model) == model.config.num_hidden_layers
    assert all(type(m) is FusedLayer for m in model.model.decoder.layers)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert install(model) == 0


def decode_logits(model, tok):
    ids = torch.tensor([tok.encode("the water is deep")], dtype=torch.long)
    cache = model.new_cache()
    model.encode(ids, cache)
    return model.logits(model.decode(torch.tensor([[3, 17, 40, 9]]), cache))


def test_fused_model_in_ref_mode_is_the_model_bit_for_bit(tiny, monkeypatch):
    engine, tok = tiny
    fused = copy.deepcopy(engine.model)
    install(fused)
    monkeypatch.setenv("DG_KERNELS", "ref")
    monkeypatch.setattr(X, "launch", lambda *a, **k: pytest.fail("launched a kernel under DG_KERNELS=ref"))
    assert torch.equal(decode_logits(fused, tok), decode_logits(engine.model, tok))


def recorded(module, monkeypatch) -> list:
    """The kernels `module` launches from now on (still launched)."""
    seen, real = [], module.launch
    monkeypatch.setattr(module, "launch", lambda kernel, *a, **k: seen.append(kernel) or real(kernel, *a, **k))
    return seen


def test_fused_model_decode_matches(tiny, interpret, monkeypatch):
    """Every CUDA swap (norms, router, mix) under the interpreter against the plain model: encode and
    decode, two mix kernels a layer in each; the norms' own kernels only for the first layer's input
    norm (the other input norms and the final norm come out of mix_out) and the attention's q/k/v norms."""
    from kernels import fused_norms, fused_router

    engine, tok = tiny
    ref = engine.model
    fused = copy.deepcopy(ref)
    for module in (fused_norms, fused_router):
        module.install(fused)
    install(fused)
    launches = recorded(X, monkeypatch)
    norms = recorded(importlib.import_module("kernels.rmsnorm"), monkeypatch)
    want = decode_logits(ref, tok)
    assert not launches and not norms
    got = decode_logits(fused, tok)
    L = ref.config.num_hidden_layers
    assert len(launches) == 2 * L + 2 * (L - 1)  # the encoder's last layer only writes its K/V
    assert len(norms) == 2 * (1 + 3 * L) + 2  # a pass: the first input norm, v and q/k a layer; + self-conditioning's
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32 tiny model: summation order only
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fits_only_the_models_shape_of_layer(monkeypatch):
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(X, "launch", lambda *a, **k: pytest.fail("launched a kernel it does not fit"))
    layer = random_layer(torch.float32, H=16)
    install(layer)
    x, h, dense, slots = inputs((3, 16), torch.float32)
    layer.pre_feedforward_layernorm.eps = 1e-5  # not the other norms' eps
    assert all(torch.equal(a, b) for a, b in zip(layer.mix_in(x, h), Layer.mix_in(layer, x, h), strict=True))
    layer.pre_feedforward_layernorm.eps = EPS
    half = layer.layer_scalar.half()  # a scalar of another dtype: the reference's promotion
    got, want = layer.mix_out(x, dense, slots, half), Layer.mix_out(layer, x, dense, slots, half)
    assert torch.equal(got[0], want[0]) and got[1] is None


def test_a_next_norm_the_kernel_does_not_fold_runs_on_its_own(interpret):
    layer = random_layer(torch.bfloat16, H=48)
    install(layer)
    x, _, dense, slots = inputs((3, 48), torch.bfloat16)
    weightless = dgmodel.RMSNorm(48, EPS, with_scale=False)
    got = layer.mix_out(x, dense, slots, layer.layer_scalar, weightless)
    want = Layer.mix_out(layer, x, dense, slots, layer.layer_scalar, weightless)
    check_out(got, want, torch.bfloat16)


def glue_kernels(fused: bool, monkeypatch) -> list[str]:
    """The kernels of mix_in and mix_out of one layer of the released config, bf16, 256 canvas tokens
    on meta, the norms and router already swapped (kernels.fused_norms / fused_router), as on CUDA."""
    from dgcli.known import DIFFUSIONGEMMA_26B_A4B
    from kernels import fused_norms, fused_router

    c = ModelConfig.from_dict(DIFFUSIONGEMMA_26B_A4B["text_config"])
    T, H, A = 256, c.hidden_size, c.top_k_experts
    with torch.device("meta"):
        layer = Layer(c, 0).to(torch.bfloat16)
        x = torch.empty(1, T, H, dtype=torch.bfloat16)
        slots = torch.empty(T, A, H, dtype=torch.bfloat16)
    fused_norms.install(layer)
    fused_router.install(layer)
    if fused:
        install(layer)
    monkeypatch.setenv("DG_KERNELS", "triton")
    count = _Count()
    count.depth = 1
    for name in ("kernels.mix", "kernels.rmsnorm", "kernels.router"):
        monkeypatch.setattr(importlib.import_module(name), "launch", lambda *a, **k: count.ops.append("triton"))
    with count:
        layer.mix_out(layer.mix_in(x, x)[0], x, slots, layer.layer_scalar, layer.input_layernorm)
    return count.ops


def test_a_layers_glue_is_two_kernels_not_twelve(monkeypatch):
    """With the norms fused: 6 norm kernels, the router's norm, the slot sum and its cast, the
    branches' add, the scalar's multiply and the next layer's input norm; here one kernel each way."""
    with monkeypatch.context() as m:
        before = glue_kernels(False, m)
    with monkeypatch.context() as m:
        after = glue_kernels(True, m)
    assert len(before) == 12, before
    assert after == ["triton", "triton"], after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_real_shapes(monkeypatch):
    """The compiled kernels at the released layer's shapes (a 256-token canvas, top-8 bf16 slots)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    dt = torch.bfloat16
    layer = random_layer(dt, H=2816, E=128, A=8).cuda()
    x, h, dense, slots = (t.cuda() for t in inputs((1, 256, 2816), dt, A=8))
    for a, b in zip(X.mix_in(x, h, *in_args(layer)), X.mix_in_ref(x, h, *in_args(layer)), strict=True):
        check(a, b, dt)
    args = (x, dense, slots.to(dt), *out_args(layer), layer.layer_scalar, EPS, layer.input_layernorm.weight)
    check_out(X.mix_out(*args), X.mix_out_ref(*args), dt)
