"""kernels/qkv_int8 (attention's q/k/v projections, norms and RoPE in one kernel) and its use by
kernels/fused_attention's `FusedAttention.qkv` (the module swap the Engine installs on CUDA).

On CPU the kernel runs in Triton's interpreter. What is exact: with inputs whose dots and sums of
squares are exact in fp32 (small integers against small int8 codes, power-of-two scales), any
summation order gives the same sums, so the kernel must equal the unfused CUDA path (int8_linear, then
kernels.rmsnorm's rope and plain norms) and the PyTorch reference bit for bit: every rounding (the
projection to the dtype, the norm's, each RoPE product and sum) is checked with torch.equal. At the
model level the fp32 sums are made order-free (`exact_sums`: the interpreter sums and multiplies
matrices in fp64 and rounds once), since the fused kernel sums a v row as two halves and
kernels.rmsnorm as one, and numpy's matmul sums in an order that depends on the tile's shape.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dgcli.model import Attention, rope_cos_sin
from quant.formats import quantize_int8_row
from quant.runtime import QuantLinear

pytest.importorskip("triton", reason="triton is not installed (the reference runs without it)")

Q = importlib.import_module("kernels.qkv_int8")
I8 = importlib.import_module("kernels.int8_linear")
R = importlib.import_module("kernels.rmsnorm")
from kernels import fused_attention, fused_norms  # noqa: E402
from test_kernels_int8_heads import prefill_then_decode  # noqa: E402

EPS = 1e-6


class _Fp64Sums:
    """numpy for Triton's interpreter, with fp32 sums and matmuls computed in fp64 and rounded once."""

    def __getattr__(self, name):
        import numpy as np

        return getattr(np, name)

    def sum(self, a, *args, **kwargs):
        import numpy as np

        if getattr(a, "dtype", None) == np.float32:
            return np.sum(a.astype(np.float64), *args, **kwargs).astype(np.float32)
        return np.sum(a, *args, **kwargs)

    def matmul(self, a, b, dtype=None):
        import numpy as np

        if dtype == np.float32:
            return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)
        return np.matmul(a, b, dtype=dtype)


@pytest.fixture
def exact_sums(monkeypatch):
    """The interpreter's fp32 tl.sum and tl.dot computed in fp64 and rounded once: the same result in
    any order (numpy's matmul sums a tile in an order that depends on its shape), so kernels that sum
    a row or a dot in different orders or tiles can be compared bit for bit."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter, "np", _Fp64Sums())


def exact_case(B, T, K, Hq, Hk, D, dtype, separate_v, seed=0, sparse=False):
    """x in {-1, 0, 1}, codes in [-2, 2], power-of-two scales: every dot and sum of squares is exact.
    sparse: 95% of x zero and unit scales, so that sums stay exact at the released width (K 2816)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (B, T, K), generator=g)
    if sparse:
        x = x * (torch.rand(B, T, K, generator=g) < 0.05)
    x = x.to(dtype)

    def proj(H):
        scales = torch.zeros(H * D) if sparse else -torch.randint(0, 4, (H * D,), generator=g)
        return torch.randint(-2, 3, (H * D, K), generator=g, dtype=torch.int8), (2.0**scales).half()

    (wq, sq), (wk, sk) = proj(Hq), proj(Hk)
    wv, sv = proj(Hk) if separate_v else (None, None)
    qw, kw = ((1 + 0.3 * torch.randn(D, generator=g)).to(dtype) for _ in range(2))
    cos, sin = tables(T, D, dtype)
    return x, wq, sq, wk, sk, wv, sv, qw, kw, EPS, cos, sin, D


def tables(T, D, dtype, partial=1.0):
    """RoPE tables at positions 3.. ; `partial` < 1: only the first pairs rotate (the full layers')."""
    n = int(partial * D // 2)
    inv = torch.cat([1.0 / (10000 ** (torch.arange(0, 2 * n, 2).float() / D)), torch.zeros(D // 2 - n)])
    return rope_cos_sin(inv, torch.arange(3, 3 + T), dtype)


def unfused_triton(x, wq, sq, wk, sk, wv, sv, qw, kw, eps, cos, sin, D):
    """What the CUDA path runs without the swap: int8_linear per projection, then the fused_norms kernels."""
    B, T, K = x.shape
    flat = x.reshape(B * T, K)

    def proj(w, s):
        return I8.int8_linear_triton(flat, w, s).view(B, T, -1, D)

    q = R.rmsnorm_rope_triton(proj(wq, sq), qw, eps, cos, sin, head_major=True)
    k_raw = proj(wk, sk)
    v = R.rmsnorm_triton(proj(wv, sv) if wv is not None else k_raw, None, eps)
    k = R.rmsnorm_rope_triton(k_raw, kw, eps, cos, sin, head_major=True)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


# The released shapes, shrunk: sliding (8 kv heads of 256, separate V) -> (2 of 32); full (2 of 512,
# K=V, partial RoPE) -> (1 of 64); a 16-wide head (half 8: padded to the 16-wide tile).
SHAPES = {"sliding": (4, 2, 32, True, 1.0), "full": (4, 1, 64, False, 0.25), "narrow": (2, 1, 16, True, 1.0)}


@pytest.mark.parametrize("layer", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_is_the_unfused_path_bit_for_bit(interpret, layer, dtype):
    Hq, Hk, D, separate_v, partial = SHAPES[layer]
    args = list(exact_case(2, 5, 96, Hq, Hk, D, dtype, separate_v, seed=D))
    args[10:12] = tables(5, D, dtype, partial)
    got = Q.qkv_int8_triton(*args, tile=(16, 32, 4, 2))  # K 96: three K blocks
    ref = Q.qkv_int8_ref(*args)
    unfused = unfused_triton(*args)
    for name, g, r, u, H in zip("qkv", got, ref, unfused, (Hq, Hk, Hk)):
        assert g.shape == (2, H, 5, D) and g.dtype == dtype and g.is_contiguous(), name  # head-major
        assert torch.equal(g, u), name
        assert torch.equal(g, r), name
    if not separate_v:  # K=V: v is the raw k projection normed without weight, not k
        assert not torch.equal(got[1], got[2])


def test_every_rounding_matters(interpret):
    """The projection rounded to bf16 before the norm: skipping it (the fp32 projection) changes the
    result, so the equality above could fail."""
    args = exact_case(1, 4, 64, 2, 1, 32, torch.bfloat16, True, seed=7)
    x, wq, sq = args[:3]
    q = Q.qkv_int8_triton(*args, tile=(16, 64, 4, 1))[0]
    p = (x.reshape(4, 64).float() @ wq.float().T * sq.float()).view(1, 4, 2, 32)  # not rounded to bf16
    unrounded = R.rmsnorm_rope_ref(p, args[7].float(), EPS, args[10].float(), args[11].float()).to(torch.bfloat16)
    assert not torch.equal(q, unrounded.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_inputs_within_a_unit_in_the_last_place(interpret, dtype):
    g = torch.Generator().manual_seed(3)
    B, T, K, Hq, Hk, D = 1, 7, 64, 4, 2, 32
    x = torch.randn(B, T, K, generator=g).to(dtype)
    w = [quantize_int8_row(torch.randn(H * D, K, generator=g) * K**-0.5).values() for H in (Hq, Hk, Hk)]
    qw, kw = ((1 + 0.3 * torch.randn(D, generator=g)).to(dtype) for _ in range(2))
    cos, sin = tables(T, D, dtype)
    args = (x, *w[0], *w[1], *w[2], qw, kw, EPS, cos, sin, D)
    for got, want in zip(Q.qkv_int8_triton(*args, tile=(16, 64, 4, 1)), Q.qkv_int8_ref(*args)):
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1 / 32, rtol=1 / 64)
        torch.testing.assert_close(got, want, **tol)
        if dtype == torch.bfloat16:  # fp32 dots in another order than F.linear's: fp32 rarely agrees to the bit
            assert (got == want).float().mean() > 0.9


def test_bad_input_is_a_one_line_error():
    args = list(exact_case(1, 2, 32, 2, 1, 16, torch.float32, True))
    with pytest.raises(ValueError, match="cos/sin"):
        Q.qkv_int8_ref(*args[:10], args[10][:1], args[11], 16)
    args[3] = args[3].float()
    with pytest.raises(ValueError, match="k: codes"):
        Q.qkv_int8_ref(*args)


def test_dispatcher_takes_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("DG_KERNELS", raising=False)
    monkeypatch.setattr(Q, "launch", lambda *a, **k: pytest.fail("launched a kernel for CPU tensors"))
    args = exact_case(1, 3, 32, 2, 1, 16, torch.float32, False)
    assert all(torch.equal(a, b) for a, b in zip(Q.qkv_int8(*args), Q.qkv_int8_ref(*args)))


@pytest.mark.parametrize("layer", ["sliding", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_into_writes_each_row_into_its_cache_slot(interpret, layer, dtype):
    """kv_into = (keys, values, slots): row t of K/V head h lands in buffer[0, h, slots[t]] (the
    decoder's canvas slots, here wrapping round a ring), exactly the rows the plain launch returns,
    every other slot untouched; q is the plain launch's. The reference does the same with copies."""
    Hq, Hk, D, separate_v, partial = SHAPES[layer]
    args = list(exact_case(1, 5, 96, Hq, Hk, D, dtype, separate_v, seed=D))
    args[10:12] = tables(5, D, dtype, partial)
    q, k, v = Q.qkv_int8_triton(*args, tile=(16, 32, 4, 2))
    slots = torch.tensor([9, 10, 11, 0, 1])
    filler = torch.randn(2, 1, Hk, 12, D).to(dtype)
    want = [f.clone().index_copy_(2, slots, t) for f, t in zip(filler, (k, v))]
    for fn in (lambda *a, **kw: Q.qkv_int8_triton(*a, tile=(16, 32, 4, 2), **kw), Q.qkv_int8_ref, Q.qkv_int8):
        keys, values = filler.clone()
        got = fn(*args, kv_into=(keys, values, slots))
        assert got[1] is None and got[2] is None and torch.equal(got[0], q)
        assert torch.equal(keys, want[0]) and torch.equal(values, want[1])
    with pytest.raises(ValueError, match="kv_into keys"):  # one sequence only
        two = [torch.cat([args[0], args[0]])] + args[1:]
        Q.qkv_int8_triton(*two, kv_into=(keys, values, slots))
    with pytest.raises(ValueError, match="kv_into slots"):
        Q.qkv_int8_ref(*args, kv_into=(keys, values, slots[:4]))


def test_aot_specs():
    for D, k_is_v in ((256, False), (512, True)):
        for name, scatter in ((f"qkv_int8.d{D}", True), (f"qkv_int8.d{D}.prefill", False)):
            specs = [s for s in Q.AOT if s.kernel == name]
            assert sum(s.default for s in specs) == 1 and len(specs) == len(Q.tiles(D))
            assert all(s.constexprs["BLOCK_H"] == D // 2 and s.constexprs["K_IS_V"] == k_is_v
                       and s.constexprs["SCATTER"] == scatter for s in specs)


@pytest.mark.parametrize("scatter", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("Hk,D,separate_v", [(8, 256, True), (2, 512, False)])  # sliding and full layers
def test_aot_compiles_the_qkv_the_engine_launches(monkeypatch, scatter, Hk, D, separate_v):
    """The kernel as the released model launches it (hidden 2816, 16 query heads, bf16, fp16 scales;
    the decoder's 256-row canvas into the cache's slots, or a prefill chunk's fresh K/V) is an AOT
    spec: its constexprs and pointer dtypes, so the compile test checks what runs."""
    launched = []
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(Q, "launch", lambda kernel, device, grid, *args, **kw: launched.append((args, kw)))
    meta = dict(device="meta")
    T, K, Hq = 256, 2816, 16
    x = torch.empty(1, T, K, dtype=torch.bfloat16, **meta)

    def proj(H):
        return torch.empty(H * D, K, dtype=torch.int8, **meta), torch.empty(H * D, dtype=torch.float16, **meta)

    v = proj(Hk) if separate_v else (None, None)
    norm = torch.empty(D, dtype=torch.bfloat16, **meta)
    cos = torch.empty(T, D, dtype=torch.bfloat16, **meta)
    kv_into = None
    if scatter:
        kv_into = (*(torch.empty(1, Hk, 8448, D, dtype=torch.bfloat16, **meta) for _ in range(2)),
                   torch.empty(T, dtype=torch.int64, **meta))
    Q.qkv_int8_triton(x, *proj(Hq), *proj(Hk), *v, norm, norm, EPS, cos, cos, D, kv_into=kv_into)
    (args, kw), = launched
    names = Q._qkv_int8_kernel.arg_names
    dtypes = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int8: "*i8", torch.int64: "*i64"}
    pointers = {n: dtypes[a.dtype] for n, a in zip(names, args) if isinstance(a, torch.Tensor)}
    constexprs = {k: v for k, v in kw.items() if k in names}
    specs = [s for s in Q.AOT if s.kernel == f"qkv_int8.d{D}" + ("" if scatter else ".prefill")]
    assert any(s.constexprs == constexprs and pointers.keys() == {n for n, t in s.signature.items() if t[0] == "*"}
               and all(s.signature[n] == t for n, t in pointers.items()) for s in specs), (constexprs, pointers)
    assert constexprs["SCATTER"] == scatter and constexprs["K_IS_V"] == (not separate_v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("Hk,D,separate_v", [(8, 256, True), (2, 512, False)])  # sliding and full layers
def test_gpu_real_shapes(monkeypatch, Hk, D, separate_v):
    """Compiled, at a 256-token canvas, every candidate tile: the unfused kernels' results, bit for bit
    with exact inputs, and within a unit in the last place (nearly all identical) with random ones
    (the sums of squares may add in another order)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    args = [t.cuda() if isinstance(t, torch.Tensor) else t
            for t in exact_case(1, 256, 2816, 16, Hk, D, torch.bfloat16, separate_v, sparse=True)]
    for tile in Q.tiles(D):
        for got, want in zip(Q.qkv_int8_triton(*args, tile=tile), unfused_triton(*args)):
            assert torch.equal(got, want), tile
    g = torch.Generator().manual_seed(1)
    args[0] = torch.randn(1, 256, 2816, generator=g).to(torch.bfloat16).cuda()
    for i, H in ((1, 16), (3, Hk)) + (((5, Hk),) if separate_v else ()):
        w = quantize_int8_row(torch.randn(H * D, 2816, generator=g) / 53)
        args[i], args[i + 1] = w["qweight"].cuda(), w["scales"].cuda()
    for got, want in zip(Q.qkv_int8_triton(*args), unfused_triton(*args)):
        torch.testing.assert_close(got, want, atol=1 / 32, rtol=1 / 64)
        assert (got == want).float().mean() > 0.99
    # the decoder's launch: K/V written into a cache's rows (slots wrapping a ring), the same values
    q, k, v = Q.qkv_int8_triton(*args)
    keys = torch.full((1, Hk, 1279, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    values = keys.clone()
    slots = (torch.arange(256, device="cuda") + 1279 - 100) % 1279
    q2, k2, v2 = Q.qkv_int8_triton(*args, kv_into=(keys, values, slots))
    assert k2 is None and v2 is None and torch.equal(q2, q)
    assert torch.equal(keys[:, :, slots], k) and torch.equal(values[:, :, slots], v)
    untouched = torch.ones(1279, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert keys[:, :, untouched].isnan().all() and values[:, :, untouched].isnan().all()


# --------------------------------------------------------------------------------------- the module swap


def int8_qkv(model) -> int:
    """q/k/v_proj of every attention module as int8-per-row QuantLinears; returns how many modules."""
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(m, name)
                if old is None:
                    continue
                new = QuantLinear(old.in_features, old.out_features, "int8_row")
                new.weight.qweight, new.weight.scales = quantize_int8_row(old.weight.detach()).values()
                new.weight.dtype = old.weight.dtype
                setattr(m, name, new)
            n += 1
    return n


def test_plain_projections_and_ref_mode_take_the_parent(tiny, monkeypatch):
    model = copy.deepcopy(tiny[0].model)
    fused_attention.install(model)
    attn = model.model.decoder.layers[0].self_attn
    x = torch.randn(1, 3, model.config.hidden_size).to(model.dtype)
    cos, sin = tables(3, attn.head_dim, model.dtype)
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(Q, "launch", lambda *a, **k: pytest.fail("launched a kernel for plain projections"))
    want = Attention.qkv(attn, x, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(attn.qkv(x, cos, sin), want))
    int8_qkv(model)
    monkeypatch.setenv("DG_KERNELS", "ref")  # int8 weights, but the reference path
    want = Attention.qkv(attn, x, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(attn.qkv(x, cos, sin), want))


def fused_pair(tiny, dtype, norms=True):
    """The tiny model with int8 q/k/v and (norms) the norms' kernels (the CUDA path before this
    swap), and a copy with FusedAttention too."""
    unfused = copy.deepcopy(tiny[0].model).to(dtype)
    int8_qkv(unfused)
    if norms:
        fused_norms.install(unfused)
    fused = copy.deepcopy(unfused)
    fused_attention.install(fused)
    return unfused, fused


@pytest.mark.usefixtures("sdpa_layout")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_model_is_the_unfused_model(tiny, interpret, exact_sums, monkeypatch, dtype):
    """Static cache: prefill, then a decode (whose grouped query heads fold into the query length as a
    view of the head-major q), with and without the swap: the same logits bit for bit (the same K
    blocks for every dot), one launch a layer."""
    monkeypatch.setattr(I8, "DEFAULT_TILE", (64, 64, 32, 4, 3))
    monkeypatch.setattr(Q, "_TILES", {256: ((32, 32, 4, 3),), 512: ((32, 32, 4, 3),)})
    unfused, fused = fused_pair(tiny, dtype)
    tok = tiny[1]
    launches = []
    real = Q.launch
    monkeypatch.setattr(Q, "launch", lambda kernel, *a, **k: launches.append(kernel) or real(kernel, *a, **k))
    out = prefill_then_decode((unfused, fused), tok)
    L = unfused.config.num_hidden_layers
    assert len(launches) == L + L  # every prefill layer (the last's K/V), every decoder layer
    assert torch.equal(out[1], out[0])


class _CacheCopies(TorchDispatchMode):
    """Records the target shape of every index_copy_ (the static cache's copies of the canvas K/V into
    its [1, Hk, S, D] buffers, and of the canvas positions into the rings' [S] position map)."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.index_copy_:
            self.targets.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("sdpa_layout")
def test_decoder_writes_the_canvas_kv_straight_into_the_cache(tiny, interpret, exact_sums, monkeypatch):
    """On the static cache's decoder the fused kernel writes the canvas K/V into their cache slots
    itself (full layers: the canvas positions; sliding layers: the ring slots, here wrapping past the
    ring's end), so `decode_kv` launches no copy into a K/V buffer; the cache then holds, bit for bit,
    what the copies wrote (the same model with `canvas_dest` None: the path before), and the logits
    and, after the canvas's commit, the whole cache are the same too."""
    monkeypatch.setattr(I8, "DEFAULT_TILE", (64, 64, 32, 4, 3))
    monkeypatch.setattr(Q, "_TILES", {256: ((32, 32, 4, 3),), 512: ((32, 32, 4, 3),)})
    _, fused = fused_pair(tiny, torch.bfloat16)
    config = fused.config
    ring = config.sliding_window - 1 + config.canvas_length
    prompt = torch.randint(5, 200, (1, ring - 3), generator=torch.Generator().manual_seed(0))
    canvas = torch.tensor([[3, 17, 40, 9, 5, 8]])  # positions ring-3.., ring slots ring-3, -2, -1, 0, 1, 2
    out = {}
    for direct in (False, True):
        cache = fused.new_cache(static=True, max_tokens=512)
        monkeypatch.setenv("DG_KERNELS", "ref")  # the prompt's prefill on PyTorch: the same for both, and fast
        fused.encode(prompt, cache)
        monkeypatch.setenv("DG_KERNELS", "triton")
        before = [t.clone() for t in cache.keys + cache.values]
        if not direct:  # the copies, as before the kernel wrote into the cache
            monkeypatch.setattr(cache, "canvas_dest", lambda i: None, raising=False)
        with _CacheCopies() as copies:
            logits = fused.logits(fused.decode(canvas, cache))
        decoded = [t.clone() for t in cache.keys + cache.values]
        fused.encode(canvas, cache)  # the commit rewrites the canvas's slots
        out[direct] = logits, before, decoded, [t.clone() for t in cache.keys + cache.values], copies.targets
    (logits, before, decoded, committed, copies), old = out[True], out[False]
    n = config.num_hidden_layers
    assert sorted(copies) == [(ring,)]  # the rings' position map, once a pass; no K/V copy
    assert len(old[4]) == 2 * n + 1 and sorted(old[4])[-1] == (ring,)  # before: K and V every layer
    assert torch.equal(logits, old[0])
    assert all(torch.equal(a, b) for a, b in zip(before, old[1]))
    assert all(torch.equal(a, b) for a, b in zip(decoded, old[2]))  # the canvas slots hold the copies' K/V
    assert all(torch.equal(a, b) for a, b in zip(committed, old[3]))
    pos = torch.arange(ring - 3, ring + 3)
    for i, (b, d) in enumerate(zip(before, decoded)):  # the check has teeth: the decoder did write them
        slots = pos % ring if config.is_sliding(i % n) else pos
        assert not torch.equal(b[:, :, slots], d[:, :, slots]), i


def _as_custom_op(monkeypatch):
    """qkv_int8_triton as one torch op, so make_fx (graphs.TracedCapture) records the launch and its
    replays re-run it, as a CUDA graph replays a recorded kernel (the interpreter itself is numpy,
    invisible to a trace). With kv_into (the decoder's scatter into the cache) an op that mutates
    the cache's buffers and returns q. -> the kinds of call made ("plain", "into"), in order."""
    real = Q.qkv_int8_triton

    @torch.library.custom_op("dgtest::qkv_int8", mutates_args=())
    def op(x: torch.Tensor, wq: torch.Tensor, sq: torch.Tensor, wk: torch.Tensor, sk: torch.Tensor,
           wv: torch.Tensor | None, sv: torch.Tensor | None, qw: torch.Tensor, kw: torch.Tensor, eps: float,
           cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return real(x, wq, sq, wk, sk, wv, sv, qw, kw, eps, cos, sin, head_dim)

    @op.register_fake
    def _(x, wq, sq, wk, sk, wv, sv, qw, kw, eps, cos, sin, head_dim):
        B, T, _ = x.shape
        return tuple(x.new_empty(B, w.shape[0] // head_dim, T, head_dim) for w in (wq, wk, wk))

    @torch.library.custom_op("dgtest::qkv_int8_into", mutates_args=("keys", "values"))
    def op_into(x: torch.Tensor, wq: torch.Tensor, sq: torch.Tensor, wk: torch.Tensor, sk: torch.Tensor,
                wv: torch.Tensor | None, sv: torch.Tensor | None, qw: torch.Tensor, kw: torch.Tensor, eps: float,
                cos: torch.Tensor, sin: torch.Tensor, head_dim: int, keys: torch.Tensor, values: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        return real(x, wq, sq, wk, sk, wv, sv, qw, kw, eps, cos, sin, head_dim, kv_into=(keys, values, slots))[0]

    @op_into.register_fake
    def _(x, wq, sq, wk, sk, wv, sv, qw, kw, eps, cos, sin, head_dim, keys, values, slots):
        B, T, _ = x.shape
        return x.new_empty(B, wq.shape[0] // head_dim, T, head_dim)

    def traced(*a, kv_into=None, **k):
        kinds.append("plain" if kv_into is None else "into")
        return op(*a, **k) if kv_into is None else (op_into(*a, *kv_into, **k), None, None)

    kinds = []
    monkeypatch.setattr(Q, "qkv_int8_triton", traced)
    return kinds


@pytest.mark.usefixtures("sdpa_layout")
def test_traced_capture_generates_what_the_unfused_model_does(tiny, interpret, monkeypatch):
    """graphs.TracedCapture (a CUDA graph's semantics on the CPU: a frozen trace replayed on reused
    buffers) over several blocks with the swap: the same steps and blocks as eager decoding without it.
    The norms stay PyTorch's (kernels.rmsnorm's interpreted launches would not be traced), so the
    unfused q/k/v norms sum in torch's order: the tokens agree, not necessarily every logit's last bit.
    The decoder's kernel writes the canvas K/V into the cache's slots (the ring wraps in the second
    block): the same steps, blocks and cache, bit for bit, as the graphs of the copies it replaced."""
    from dgcli import graphs
    from dgcli.cache import StaticKVCache
    from dgcli.config import SamplerSettings
    from dgcli.engine import Engine
    from test_graphs import run

    monkeypatch.setattr(I8, "DEFAULT_TILE", (64, 64, 32, 4, 3))
    monkeypatch.setattr(Q, "_TILES", {256: ((64, 32, 4, 3),), 512: ((64, 32, 4, 3),)})
    kinds = _as_custom_op(monkeypatch)
    unfused, fused = fused_pair(tiny, torch.float32, norms=False)
    calls = []
    real = Q.launch
    monkeypatch.setattr(Q, "launch", lambda kernel, *a, **k: calls.append(kernel) or real(kernel, *a, **k))
    L = unfused.config.canvas_length
    settings = SamplerSettings(max_new_tokens=2 * L, max_denoising_steps=2, seed=3, eos_token_id=None)
    prompt = list(range(5, 45))
    eager = run(Engine(unfused, static_cache=True, cuda_graphs=False, fused_head=False, bucket=256), prompt, settings)
    engine = Engine(fused, static_cache=True, fused_head=False, capture=graphs.TracedCapture(), bucket=256)
    graphed = run(engine, prompt, settings)
    assert calls  # the fused kernel ran
    assert engine.cuda_graphs and "into" in kinds  # captured, the decoder's K/V written into the cache
    assert graphed[0] == eager[0] and graphed[1] == eager[1] and len(graphed[1]) == 2
    assert graphed[2].token_ids == eager[2].token_ids
    kinds.clear()
    with monkeypatch.context() as m:  # the path before: K/V returned, then copied by decode_kv
        m.setattr(StaticKVCache, "canvas_dest", lambda self, i: None, raising=False)
        engine = Engine(fused, static_cache=True, fused_head=False, capture=graphs.TracedCapture(), bucket=256)
        copied = run(engine, prompt, settings)
    assert engine.cuda_graphs and "into" not in kinds
    assert graphed[:2] == copied[:2] and graphed[2].token_ids == copied[2].token_ids
    for a, b in zip(graphed[3].keys + graphed[3].values, copied[3].keys + copied[3].values):
        assert torch.equal(a, b)

