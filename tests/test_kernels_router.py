"""kernels/router (the experts' router around its projection in two kernels) and kernels/fused_router
(the module swap the Engine installs on CUDA).

On CPU the Triton kernels run in Triton's interpreter (the `interpret` fixture): shapes are small.
The references must be `Router.forward`'s arithmetic exactly. The kernels: the norm differs only in
the order of the fp32 sum of squares (as kernels.rmsnorm); the top-k weights by the exp's and the
sums' rounding (~1e-7 relative), and its indices are torch.topk's except among equal probabilities,
where the kernel takes the lowest index first (CUDA's choice; the CPU's topk picks ties arbitrarily).
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgcli.config import ModelConfig
from dgcli.model import Router

pytest.importorskip("triton", reason="triton is not installed (the references run without it)")

R = importlib.import_module("kernels.router")
from kernels.fused_router import FusedRouter, install  # noqa: E402
from test_kernels_mix import EPS, config  # noqa: E402  (a one-layer config)
from test_kernels_norm import _Count  # noqa: E402


def random_router(dtype, H=64, E=16, A=4, seed=0) -> Router:
    g = torch.Generator().manual_seed(seed)
    router = Router(config(H, E, A))
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(E, H, generator=g) * H**-0.5 * 8)
        router.scale.copy_(1 + 0.3 * torch.randn(H, generator=g))
        router.per_expert_scale.copy_(1 + 0.2 * torch.randn(E, generator=g))
    return router.to(dtype)


def inputs(T, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, generator=g) * 3).to(dtype)


def tied_logits(T, E, dtype, seed=2):
    """Logits in steps of 1/8: ties in every row's top 8, at the 8th place in about half the rows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.round(torch.randn(T, E, generator=g) * 8) / 8).to(dtype)


def lowest_index_first(logits, k):
    """The top-k experts with ties taken lowest index first: a stable descending sort of the probabilities."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]


def oracle_weights(logits, pes, index):
    """Router's weights for the experts `index`, in float64."""
    p = torch.softmax(logits.double(), dim=-1).gather(1, index)
    return p / p.sum(-1, keepdim=True) * pes.double()[index]


# ---------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_references_are_the_routers_arithmetic(dtype):
    router = random_router(dtype)
    x = inputs(9, 64, dtype)
    h = R.router_norm_ref(x, router.scale, router.root_size, EPS)
    assert torch.equal(h, router.norm(x) * router.scale * router.root_size)
    want_w, want_i = router(x)
    got_w, got_i = R.router_topk_ref(router.proj(h), router.per_expert_scale, router.top_k)
    assert got_w.dtype == torch.float32 and got_i.dtype == torch.int64
    assert torch.equal(got_w, want_w) and torch.equal(got_i, want_i)


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,E,A", [(3, 16, 4), (7, 128, 8), (13, 40, 3)], ids=["16", "128", "40-ragged"])
def test_topk_matches_reference(interpret, T, E, A, dtype):
    g = torch.Generator().manual_seed(T)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    pes = (1 + 0.2 * torch.randn(E, generator=g)).to(dtype)
    got_w, got_i = R.router_topk(logits, pes, A)
    want_w, want_i = R.router_topk_ref(logits, pes, A)
    assert got_w.shape == got_i.shape == (T, A) and got_w.dtype == torch.float32 and got_i.dtype == torch.int64
    # where the top k+1 probabilities of a row are distinct, the indices are torch.topk's, in its order
    top = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), A + 1).values
    distinct = (top[:, :-1] != top[:, 1:]).all(-1)
    assert distinct.any()
    assert torch.equal(got_i[distinct], want_i[distinct])
    torch.testing.assert_close(got_w[distinct], want_w[distinct], rtol=1e-6, atol=0)
    assert torch.equal(got_i, lowest_index_first(logits, A))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_ties_lowest_index_first(interpret, dtype):
    T, E, A = 16, 128, 8
    logits = tied_logits(T, E, dtype)
    pes = (1 + 0.2 * torch.randn(E, generator=torch.Generator().manual_seed(3))).to(dtype)
    got_w, got_i = R.router_topk(logits, pes, A)
    assert torch.equal(got_i, lowest_index_first(logits, A))
    torch.testing.assert_close(got_w.double(), oracle_weights(logits, pes, got_i), rtol=1e-6, atol=0)
    # against torch.topk on the CPU: the same values, and the same experts wherever the k-th is not tied
    want_w, want_i = R.router_topk_ref(logits, pes, A)
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    assert torch.equal(probs.gather(1, got_i), probs.gather(1, want_i))
    kth, next_ = torch.topk(probs, A + 1).values[:, A - 1:].unbind(-1)
    clean = kth != next_
    assert clean.any() and not clean.all()  # the case has both
    assert torch.equal(got_i[clean].sort(-1).values, want_i[clean].sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 2816)], ids=["64", "2816"])
def test_norm_matches_reference(interpret, shape, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    scale = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    root = shape[-1] ** -0.5
    got, want = R.router_norm(x, scale, root, EPS), R.router_norm_ref(x, scale, root, EPS)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:  # the sum of squares' order moves every element by an ulp or so
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(got, want, rtol=1 / 128, atol=0)
        assert (got == want).float().mean() >= 0.97


def test_norm_rounds_three_times_as_the_router(interpret):
    """Folding scale·root_size into one fp32 weight (one rounding) would change a third of the
    values: the bit-identical share is what keeps the kernel to the model's three roundings."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 2816, generator=g) * 3).to(torch.bfloat16)
    scale = (1 + 0.3 * torch.randn(2816, generator=g)).to(torch.bfloat16)
    root = 2816**-0.5
    want = R.router_norm_ref(x, scale, root, EPS)
    folded = (R.rmsnorm_ref(x.float(), None, EPS) * (scale.float() * root)).to(torch.bfloat16)
    assert (folded == want).float().mean() < 0.9
    assert (R.router_norm(x, scale, root, EPS) == want).float().mean() >= 0.97


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="per_expert_scale"):
        R.router_topk_triton(torch.zeros(2, 8), torch.ones(4), 2)
    with pytest.raises(ValueError, match="top_k"):
        R.router_topk_triton(torch.zeros(2, 8), torch.ones(8), 9)
    with pytest.raises(ValueError, match="scale"):
        R.router_norm_triton(torch.zeros(2, 8), torch.ones(4), 0.5, EPS)


def test_aot_specs_are_the_released_config():
    names = {s.kernel: s for s in R.AOT}
    assert set(names) == {"router.norm", "router.topk"} and all(s.default for s in R.AOT)
    assert names["router.norm"].constexprs["BLOCK"] >= 2816
    assert names["router.topk"].constexprs["BLOCK_E"] == 128 and names["router.topk"].constexprs["TOP_K"] == 8
    M = importlib.import_module("kernels.moe_int4")
    align = [s for s in M.AOT if s.kernel == "moe_align"]
    assert len(align) == 1 and align[0].default and align[0].constexprs["BLOCK_E"] == 128


@pytest.mark.slow
def test_kernels_compile_without_spills():
    """router.norm, router.topk and moe_align for sm_89/90/120 (python -m kernels.aot, compiled for real)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.aot", "--kernel", "router", "--kernel", "moe_align",
                          "--configs", "default", "--jobs", "2"], cwd=Path(__file__).parent.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted({(r["kernel"], r["target"]) for r in rows}) == sorted(
        (k, t) for k in ("moe_align", "router.norm", "router.topk") for t in ("sm_89", "sm_90", "sm_120"))
    for r in rows:
        assert r["ok"] and r["spills"] == 0 and r["registers"] <= 255, r


# --------------------------------------------------------------------------------------- the module swap


def test_install_swaps_every_router_and_keeps_the_state_dict(tiny):
    model = copy.deepcopy(tiny[0].model)
    before = model.state_dict()
    routers = [n for n, m in model.named_modules() if isinstance(m, Router)]
    assert len(routers) == model.config.num_hidden_layers
    assert install(model) == len(routers)
    assert all(type(m) is FusedRouter for n, m in model.named_modules() if n in routers)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # the same parameters, not copies
    assert install(model) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_router_matches_router(interpret, dtype):
    router = random_router(dtype, H=64, E=16, A=4)
    fused = FusedRouter.replacing(copy.deepcopy(router))
    x = inputs(11, 64, dtype)
    want_w, want_i = router(x)
    got_w, got_i = fused(x)
    logits = router.proj(R.router_norm_ref(x, router.scale, router.root_size, EPS))
    assert torch.equal(got_i, lowest_index_first(logits, 4))
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    assert torch.equal(probs.gather(1, got_i), probs.gather(1, want_i))  # the same experts up to ties
    torch.testing.assert_close(got_w.double(), oracle_weights(logits, router.per_expert_scale, got_i),
                               rtol=1e-6, atol=0)
    assert fused(x.view(1, 11, 64))[1].shape == (1, 11, 4)  # leading dims as the parent's


def test_fused_model_logits_match(tiny, interpret, monkeypatch):
    engine, tok = tiny
    ref = engine.model
    fused = copy.deepcopy(ref)
    assert install(fused) == ref.config.num_hidden_layers
    launches = []
    real = R.launch
    monkeypatch.setattr(R, "launch", lambda kernel, *a, **k: launches.append(kernel) or real(kernel, *a, **k))
    ids = torch.tensor([tok.encode("the water is deep")], dtype=torch.long)
    cache = ref.new_cache()
    ref.encode(ids, cache)
    canvas = torch.tensor([[3, 17, 40, 9]])
    want = ref.logits(ref.decode(canvas, cache))
    assert not launches
    got = fused.logits(fused.decode(canvas, cache))
    assert len(launches) == 2 * ref.config.num_hidden_layers  # norm and top-k, each layer
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32 tiny model: summation order only


def test_ref_mode_runs_the_parents_forward(monkeypatch):
    monkeypatch.setenv("DG_KERNELS", "ref")
    monkeypatch.setattr(R, "launch", lambda *a, **k: pytest.fail("launched a kernel under DG_KERNELS=ref"))
    router = random_router(torch.float32)
    x = inputs(5, 64, torch.float32)
    got, want = FusedRouter.replacing(router)(x), Router.forward(router, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_real_shapes(monkeypatch):
    """The compiled kernels at the released router's shapes (a 256-token canvas), bf16."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    router = random_router(torch.bfloat16, H=2816, E=128, A=8).cuda()
    x = inputs(256, 2816, torch.bfloat16).cuda()
    h, want_h = (R.router_norm(x, router.scale, router.root_size, EPS),
                 R.router_norm_ref(x, router.scale, router.root_size, EPS))
    assert (h == want_h).float().mean() >= 0.97
    logits = router.proj(want_h)
    got_w, got_i = R.router_topk(logits, router.per_expert_scale, 8)
    want_w, want_i = R.router_topk_ref(logits, router.per_expert_scale, 8)
    # CUDA's topk takes tied experts lowest index first too, but may list equal values in another order
    got_i, order = got_i.sort(-1)
    want_i, want_order = want_i.sort(-1)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w.gather(1, order), want_w.gather(1, want_order), rtol=2e-6, atol=0)  # ex2.approx


# ----------------------------------------------------------------------------- kernels the routing takes


def released():
    from dgcli.known import DIFFUSIONGEMMA_26B_A4B

    return ModelConfig.from_dict(DIFFUSIONGEMMA_26B_A4B["text_config"])


def count_ops(fn, monkeypatch, *modules) -> list[str]:
    """The GPU kernels `fn()` runs on meta: aten ops writing a new tensor, and each Triton launch
    (the `launch` of `modules`) as one."""
    count = _Count()
    count.depth = 1
    for m in modules:
        monkeypatch.setattr(m, "launch", lambda *a, **k: count.ops.append("triton"))
    with count:
        fn()
    return count.ops


def routing_kernels(monkeypatch, fused: bool) -> tuple[list[str], list[str]]:
    """(the router's kernels, the int4 experts' kernels other than their two matmuls) of one layer
    of the released config on a 256-token canvas, bf16, on meta."""
    M = importlib.import_module("kernels.moe_int4")
    config = released()
    T, H, E, A, I = 256, config.hidden_size, config.num_experts, config.top_k_experts, config.moe_intermediate_size
    with torch.device("meta"):
        router = Router(config).to(torch.bfloat16)
        x = torch.empty(T, H, dtype=torch.bfloat16)
        index = torch.empty(T, A, dtype=torch.int64)
        weights = torch.empty(T, A, dtype=torch.float32)
        q1, s1 = torch.empty(E, 2 * I, H // 2, dtype=torch.uint8), torch.empty(E, 2 * I, H // 64, dtype=torch.float16)
        q2, s2 = torch.empty(E, H, I // 2, dtype=torch.uint8), torch.empty(E, H, I // 64, dtype=torch.float16)
    monkeypatch.setenv("DG_KERNELS", "triton")
    if fused:
        router = FusedRouter.replacing(router)
    else:
        monkeypatch.setattr(M, "moe_align", M.moe_align_ref)
    with monkeypatch.context() as m:
        routed = count_ops(lambda: router(x), m, R)
    with monkeypatch.context() as m:
        experts = count_ops(lambda: M.moe_int4_triton(x, index, weights, q1, s1, q2, s2, config=M.MoeConfig()), m, M)
    experts.remove("triton")  # gate_up
    experts.remove("triton")  # down
    return routed, experts


def test_a_layers_routing_takes_six_kernels(monkeypatch):
    """Router (its norm: 8 ops, or 1 with kernels.fused_norms; two multiplies, projection, cast,
    softmax, top-k, sum, divide, gather, multiply) and the int4 path's layout (25 ops) and slot sum
    (2): 37 kernels with the norms fused, 44 here; fused, the router is norm, projection and top-k,
    the layout one kernel, and the slot sum (sum, cast) stays."""
    with monkeypatch.context() as m:
        router_before, experts_before = routing_kernels(m, fused=False)
    with monkeypatch.context() as m:
        router_after, experts_after = routing_kernels(m, fused=True)
    assert len(router_before) >= 10 and len(experts_before) >= 25, (router_before, experts_before)
    assert router_after == ["triton", "mm", "triton"], router_after
    assert experts_after[0] == "triton" and len(experts_after) == 3, experts_after  # align, slot sum, cast
