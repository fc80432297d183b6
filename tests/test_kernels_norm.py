"""kernels/rmsnorm (RMSNorm, + residual add, + RoPE in one kernel) and kernels/fused_norms (the module
swap the Engine installs on CUDA).

On CPU the Triton kernels run in Triton's interpreter (the `interpret` fixture), which is slow:
shapes are small, one row at the real hidden width. Tolerances: the kernels differ from the
reference only in the order of the fp32 sum of squares, so fp32 agrees to ~1e-6 relative and
bf16/fp16 to one unit in the last place; in bf16/fp16 nearly every element must agree bit for bit
(which a kernel that rounded in another order, e.g. added the residual before rounding the norm,
would not).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dgcli import model as dgmodel
from dgcli.model import RMSNorm, apply_rope, rope_cos_sin

pytest.importorskip("triton", reason="triton is not installed (the references run without it)")

R = importlib.import_module("kernels.rmsnorm")  # the module (kernels re-exports functions by name)
from kernels.fused_norms import FusedRMSNorm, install  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1 / 64, rtol=1 / 128),
       torch.float16: dict(atol=2e-3, rtol=1e-3)}
EXACT = {torch.float32: 0.0, torch.bfloat16: 0.97, torch.float16: 0.97}  # bit-identical share at least
# (fp32: one ulp in the row's scale moves every element, so only the tolerance applies)
EPS = 1e-6


def _round_bf16_casts(monkeypatch):
    """Triton 3.9's interpreter truncates fp32 -> bf16 casts (its cast ignores the rounding mode);
    compiled kernels round to nearest even. Round here too, so bf16 results can be compared bit for bit."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    B = interpreter.InterpreterBuilder
    original = B.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return interpreter.TensorHandle(bits.astype(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(B, "create_fp_trunc", create_fp_trunc)


def check(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    same = (got == want).float().mean().item()
    assert same >= EXACT[dtype], f"only {same:.1%} bit-identical"


def case(shape, dtype, seed=0, weight=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype) if weight else None
    return x, w, g


def rope_tables(T, D, dtype, offset=5):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return rope_cos_sin(inv, torch.arange(offset, offset + T), dtype)


# ---------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("weight", [True, False])
def test_references_are_the_models_arithmetic(weight):
    x, w, g = case((2, 3, 4, 16), torch.bfloat16, weight=weight)
    norm = RMSNorm(16, EPS, with_scale=weight).to(torch.bfloat16)
    if weight:
        norm.weight.data.copy_(w)
    h = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    cos, sin = rope_tables(3, 16, torch.bfloat16)
    assert torch.equal(R.rmsnorm_ref(x, w, EPS), norm(x))
    assert torch.equal(R.rmsnorm_add_ref(x, h, w, EPS), norm.add_to(x, h))
    assert torch.equal(R.rmsnorm_rope_ref(x, w, EPS, cos, sin), norm.rope(x, cos, sin))


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,weight", [((1, 7, 48), True), ((2, 3, 256), False), ((1, 2816), True)],
                         ids=["48", "256-noweight", "2816"])
def test_norm(interpret, shape, weight, dtype):
    x, w, _ = case(shape, dtype, weight=weight)
    check(R.rmsnorm(x, w, EPS), R.rmsnorm_ref(x, w, EPS), dtype)


def test_norm_strided_rows_and_fp32_weight(interpret):
    x, _, g = case((6, 4, 40), torch.bfloat16)
    w = 1 + 0.3 * torch.randn(40, generator=g)  # fp32 weight on bf16 activations
    xt = x.transpose(0, 1)  # rows not evenly strided: taken as a copy
    check(R.rmsnorm(xt, w, EPS), R.rmsnorm_ref(xt, w, EPS), torch.bfloat16)
    xs = x[:, 1]  # evenly strided rows: read in place
    check(R.rmsnorm(xs, w, EPS), R.rmsnorm_ref(xs, w, EPS), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 48), (3, 96)], ids=["48", "96"])
def test_add(interpret, shape, dtype):
    h, w, g = case(shape, dtype, seed=1)
    x = (torch.randn(shape, generator=g) * 10).to(dtype)  # a residual larger than the norm: rounding shows
    check(R.rmsnorm_add(x, h, w, EPS), R.rmsnorm_add_ref(x, h, w, EPS), dtype)


def test_add_rounds_the_norm_before_the_add(interpret):
    """The exact-share bar is what catches a kernel that adds in fp32 before rounding the norm."""
    h, w, g = case((4, 64), torch.bfloat16, seed=2)
    x = (torch.randn(4, 64, generator=g) * 10).to(torch.bfloat16)
    unrounded = (x.float() + R.rmsnorm_ref(h.float(), w.float(), EPS)).to(torch.bfloat16)
    want = R.rmsnorm_add_ref(x, h, w, EPS)
    assert (unrounded == want).float().mean() < EXACT[torch.bfloat16]  # the two orders do differ
    check(R.rmsnorm_add(x, h, w, EPS), want, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,Hx,D", [(1, 3, 2, 32), (2, 2, 3, 20), (1, 2, 1, 256)], ids=["32", "20", "256"])
def test_rope(interpret, B, T, Hx, D, dtype):
    x, w, _ = case((B, T, Hx, D), dtype, seed=D)
    cos, sin = rope_tables(T, D, dtype)
    check(R.rmsnorm_rope(x, w, EPS, cos, sin), R.rmsnorm_rope_ref(x, w, EPS, cos, sin), dtype)


def test_rope_strided_heads_and_no_weight(interpret):
    x, _, _ = case((1, 4, 6, 32), torch.bfloat16, seed=3)
    xs = x[:, :, ::2]  # every other head: strides (768, 192, 64, 1), read in place
    cos, sin = rope_tables(4, 32, torch.bfloat16)
    got = R.rmsnorm_rope(xs, None, EPS, cos, sin)
    assert got.is_contiguous()
    check(got, apply_rope(R.rmsnorm_ref(xs, None, EPS), cos, sin), torch.bfloat16)


def test_rope_head_major(interpret):
    """head_major=True: the same values, as a (B, T, Hx, D) view of a (B, Hx, T, D) buffer, which is
    what FusedRMSNorm.rope returns: attention's (B, Hx, T, D) heads are then contiguous, and the static
    cache decoder's fold of grouped query heads into the query length (Attention.attend) is a view."""
    B, T, Hq, Hk, D = 1, 3, 4, 2, 32
    x, w, _ = case((B, T, Hq, D), torch.bfloat16, seed=4)
    cos, sin = rope_tables(T, D, torch.bfloat16)
    got = R.rmsnorm_rope_triton(x, w, EPS, cos, sin, head_major=True)
    assert got.shape == (B, T, Hq, D) and got.transpose(1, 2).is_contiguous()
    assert torch.equal(got, R.rmsnorm_rope_triton(x, w, EPS, cos, sin))
    check(got, R.rmsnorm_rope_ref(x, w, EPS, cos, sin), torch.bfloat16)
    norm = FusedRMSNorm.replacing(RMSNorm(D, EPS).to(torch.bfloat16))
    norm.weight.data.copy_(w)
    q = norm.rope(x, cos, sin).transpose(1, 2)  # as Attention.qkv hands it to attend
    assert torch.equal(q, got.transpose(1, 2))
    folded = q.reshape(B, Hk, Hq // Hk * T, D)
    assert folded.data_ptr() == q.data_ptr() and folded._base is not None  # a view, no copy


def test_bad_shapes_are_one_line_errors():
    x = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        R.rmsnorm_rope_triton(x, None, EPS, torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="weight"):
        R.rmsnorm_triton(x, torch.ones(4), EPS)
    with pytest.raises(ValueError, match="same shape"):
        R.rmsnorm_add_triton(x, x[0], None, EPS)


def test_aot_specs_cover_every_production_width():
    names = {s.kernel: s for s in R.AOT}
    assert set(names) == {"rmsnorm.h2816", "rmsnorm.h2816_noweight", "rmsnorm.v256", "rmsnorm.v512",
                          "rmsnorm.add", "rmsnorm.rope256", "rmsnorm.rope512"}
    assert all(s.default for s in R.AOT)
    assert names["rmsnorm.h2816"].constexprs["BLOCK"] >= 2816 and names["rmsnorm.rope512"].constexprs["BLOCK"] == 256


# --------------------------------------------------------------------------------------- the module swap


def norm_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, RMSNorm))


def test_install_swaps_every_norm_and_keeps_the_state_dict(tiny):
    model = copy.deepcopy(tiny[0].model)
    before = model.state_dict()
    names = norm_names(model)
    L = model.config.num_hidden_layers
    assert len(names) == 11 * L + 3  # 11 a layer; the final norm; self-conditioning's two
    assert install(model) == len(names)
    assert all(type(m) is FusedRMSNorm for n, m in model.named_modules() if n in names)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # the same parameters, not copies
    assert install(model) == 0  # idempotent


def test_fused_model_logits_match(tiny, interpret, monkeypatch):
    engine, tok = tiny
    ref = engine.model
    fused = copy.deepcopy(ref)
    install(fused)
    launches = []
    real_launch = R.launch
    monkeypatch.setattr(R, "launch", lambda kernel, *a, **k: launches.append(kernel) or real_launch(kernel, *a, **k))
    ids = torch.tensor([tok.encode("the water is deep")], dtype=torch.long)
    cache = ref.new_cache()
    ref.encode(ids, cache)
    want = ref.logits(ref.decode(torch.tensor([[3, 17, 40, 9]]), cache))
    assert not launches  # the plain model's norms are untouched
    got = fused.logits(fused.decode(torch.tensor([[3, 17, 40, 9]]), cache))
    assert len(launches) == 11 * ref.config.num_hidden_layers + 3  # every norm, each once
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32 tiny model: summation order only


def test_ref_mode_runs_the_parents_methods(monkeypatch):
    monkeypatch.setenv("DG_KERNELS", "ref")
    monkeypatch.setattr(R, "launch", lambda *a, **k: pytest.fail("launched a kernel under DG_KERNELS=ref"))
    norm = FusedRMSNorm.replacing(RMSNorm(16, EPS))
    x, _, _ = case((1, 2, 3, 16), torch.float32)
    cos, sin = rope_tables(2, 16, torch.float32)
    assert torch.equal(norm(x), R.rmsnorm_ref(x, norm.weight, EPS))
    assert torch.equal(norm.add_to(x, x), R.rmsnorm_add_ref(x, x, norm.weight, EPS))
    assert torch.equal(norm.rope(x, cos, sin), R.rmsnorm_rope_ref(x, norm.weight, EPS, cos, sin))


def test_rows_wider_than_the_kernel_take_the_reference(monkeypatch):
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(R, "launch", lambda *a, **k: pytest.fail("launched a kernel on a row too wide for it"))
    norm = FusedRMSNorm.replacing(RMSNorm(R.MAX_WIDTH + 2, EPS))
    x, _, _ = case((2, R.MAX_WIDTH + 2), torch.float32)
    assert torch.equal(norm(x), R.rmsnorm_ref(x, norm.weight, EPS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_real_shapes(monkeypatch):
    """The compiled kernels at the released model's shapes (a 256-token canvas), bf16."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    dt, dev = torch.bfloat16, "cuda"
    x, w, g = case((1, 256, 2816), dt)
    h = torch.randn(x.shape, generator=g).to(dt)
    x, w, h = x.to(dev), w.to(dev), h.to(dev)
    check(R.rmsnorm(x, w, EPS), R.rmsnorm_ref(x, w, EPS), dt)
    check(R.rmsnorm(x, None, EPS), R.rmsnorm_ref(x, None, EPS), dt)
    check(R.rmsnorm_add(x, h, w, EPS), R.rmsnorm_add_ref(x, h, w, EPS), dt)
    for heads, D in ((16, 256), (2, 512)):
        q, wq, _ = case((1, 256, heads, D), dt, seed=D)
        cos, sin = rope_tables(256, D, dt, offset=4000)
        q, wq, cos, sin = q.to(dev), wq.to(dev), cos.to(dev), sin.to(dev)
        check(R.rmsnorm_rope(q, wq, EPS, cos, sin), R.rmsnorm_rope_ref(q, wq, EPS, cos, sin), dt)
        check(R.rmsnorm(q, None, EPS), R.rmsnorm_ref(q, None, EPS), dt)


# ----------------------------------------------------------------------------- kernels a layer's norms take


class _Count(TorchDispatchMode):
    """Aten ops that write a new tensor while `depth` > 0 (inside a norm's method): each a GPU kernel.
    Views and allocations are not kernels; the norms mutate nothing, so in-place ops are not looked for."""

    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias"}

    def __init__(self):
        super().__init__()
        self.depth, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth:
            ins = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            fresh = any(t.untyped_storage()._cdata not in ins for t in outs)
            if fresh and func.overloadpacket.__name__ not in self.FREE:
                self.ops.append(func.overloadpacket.__name__)
        return out


def layer_norm_kernels(config, i: int, fused: bool, monkeypatch) -> list[str]:
    """The kernels that layer i's RMSNorms (their residual adds and RoPE included) launch in one
    decoder pass over 8 canvas tokens on meta; a Triton launch is one ("triton")."""
    from dgcli.cache import KVCache

    with torch.device("meta"):
        layer = dgmodel.Layer(config, i).to(torch.bfloat16)
    count = _Count()
    if fused:
        install(layer)
        monkeypatch.setenv("DG_KERNELS", "triton")
        monkeypatch.setattr(R, "launch", lambda *a, **k: count.ops.append("triton"))
    for cls in (RMSNorm, FusedRMSNorm):
        for name in ("forward", "add_to", "rope"):
            def counted(self, *a, _f=cls.__dict__[name], **k):
                count.depth += 1
                try:
                    return _f(self, *a, **k)
                finally:
                    count.depth -= 1
            monkeypatch.setattr(cls, name, counted)
    T, D = 8, layer.self_attn.head_dim
    x = torch.empty(1, T, config.hidden_size, device="meta", dtype=torch.bfloat16)
    cos = sin = torch.empty(T, D, device="meta", dtype=torch.bfloat16)
    with count:
        layer(x, cos, sin, KVCache(config), i, True, torch.ones(1, device="meta", dtype=torch.bfloat16))
    return count.ops


def test_a_layers_norms_are_eleven_kernels_not_a_hundred(monkeypatch):
    """The released config, one sliding and one full layer: ~107 kernels of norm arithmetic
    (casts, pow, mean, add, mul; RoPE's neg/cat/mul/add; the residual adds) become one launch per use."""
    from dgcli.config import ModelConfig
    from dgcli.known import DIFFUSIONGEMMA_26B_A4B

    config = ModelConfig.from_dict(DIFFUSIONGEMMA_26B_A4B["text_config"])
    full = next(i for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    for i in (0, full):
        with monkeypatch.context() as m:
            unfused = layer_norm_kernels(config, i, False, m)
        with monkeypatch.context() as m:
            fused = layer_norm_kernels(config, i, True, m)
        assert len(unfused) >= 8 * 11, unfused
        assert fused == ["triton"] * 11, fused
