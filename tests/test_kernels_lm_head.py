"""kernels/lm_head: the chunked reference and the Triton kernel (interpreter on CPU) against the
unfused arithmetic of the model's head and the sampler (dgcli.model.Embedding.head + softcap,
dgcli.sampler.entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgcli.sampler import entropy as sampler_entropy
from kernels.lm_head import lm_head, lm_head_ref

CUDA = torch.cuda.is_available()


def unfused(h, weight, temperature, softcap=30.0, weight_scale=None):
    if weight_scale is None:
        logits = F.linear(h, weight).float()
    else:
        logits = (F.linear(h.float(), weight.float()) * weight_scale.float()).to(h.dtype).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    proc = logits / torch.as_tensor(temperature, dtype=torch.float32)
    return proc, proc.argmax(-1), sampler_entropy(proc), proc.logsumexp(-1)


def make(L, H, V, dtype, int8=False, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(L, H, generator=g) * sharp).to(dtype)
    w = torch.randn(V, H, generator=g) * H**-0.5 * 4
    if int8:
        s = w.abs().amax(-1) / 127
        return h, torch.round(w / s[:, None]).to(torch.int8), s.to(torch.float16)
    return h, w.to(dtype), None


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=1e-2),
       torch.float16: dict(atol=1e-2, rtol=2e-3)}


def check(got, want, dtype):
    proc, argmax, ent, lse = want
    torch.testing.assert_close(got.proc.float(), proc, **TOL[dtype])
    ent_tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.entropy, ent, atol=ent_tol, rtol=ent_tol)
    torch.testing.assert_close(got.lse, lse, atol=ent_tol, rtol=ent_tol)
    if dtype == torch.float32:
        assert torch.equal(got.argmax, argmax)
    else:  # a different summation order may flip a near-tie after rounding to the model dtype
        picked = proc.gather(-1, got.argmax[:, None]).squeeze(-1)
        assert (picked >= proc.max(-1).values - 2 * TOL[dtype]["atol"]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("L,H,V", [(1, 64, 300), (70, 96, 1024)])
def test_reference_chunked_matches_unfused(L, H, V, dtype):
    h, w, _ = make(L, H, V, dtype, seed=L)
    got = lm_head_ref(h, w, torch.tensor(0.8), chunk=128)  # several chunks and a ragged last one
    assert got.proc.shape == (L, V) and got.proc.dtype == torch.float32 and got.argmax.dtype == torch.int64
    check(got, unfused(h, w, 0.8), dtype)


def test_reference_confident_rows_and_no_softcap():
    # near one-hot rows: the entropy must stay accurate near 0 (no catastrophic cancellation)
    h, w, _ = make(4, 64, 512, torch.float32, seed=2, sharp=20.0)
    want = unfused(h, w, 0.4, softcap=None)
    got = lm_head_ref(h, w, 0.4, softcap=None, chunk=100)
    assert want[2].min() < 1e-3
    torch.testing.assert_close(got.entropy, want[2], atol=1e-6, rtol=1e-4)
    assert torch.equal(got.argmax, want[1])


def test_reference_int8_weights_and_bf16_output():
    h, q, s = make(9, 64, 257, torch.bfloat16, int8=True, seed=3)
    got = lm_head_ref(h, q, 1.0, weight_scale=s, out_dtype=torch.bfloat16, chunk=64)
    assert got.proc.dtype == torch.bfloat16
    check(got, unfused(h, q, 1.0, weight_scale=s), torch.bfloat16)
    with pytest.raises(ValueError):
        lm_head_ref(h, q, 1.0)  # int8 without scales


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DG_KERNELS", "triton")


TILES = {"default": None, "bk32-bn64": (16, 64, 32, 4, 2)}


@pytest.mark.parametrize("tile", list(TILES), ids=list(TILES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("L,H,V", [(1, 64, 300), (70, 96, 520)])
def test_triton_matches_unfused(interpret, L, H, V, dtype, tile):
    from kernels.lm_head import lm_head_triton

    h, w, _ = make(L, H, V, dtype, seed=L)
    got = lm_head_triton(h, w, torch.tensor(0.8), tile=TILES[tile])
    check(got, unfused(h, w, 0.8), dtype)


def test_triton_int8_via_dispatcher(interpret):
    h, q, s = make(33, 64, 200, torch.float16, int8=True, seed=4)
    got = lm_head(h, q, 0.6, weight_scale=s, out_dtype=torch.float16)
    check(got, unfused(h, q, 0.6, weight_scale=s), torch.float16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_real_vocab(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    h, w, _ = make(256, 2816, 262144, torch.bfloat16, seed=5)
    h, w = h.cuda(), w.cuda()
    got = lm_head(h, w, torch.tensor(0.8, device="cuda"))
    want = unfused(h, w, torch.tensor(0.8, device="cuda"))
    check(got, want, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("int8", [False, True], ids=["bf16-embedding", "int8-embedding"])
def test_cuda_raw_logits_processed_are_the_proc_the_head_writes(monkeypatch, int8):
    """On a GPU, compiled (the PTX of the head, process and the fused draw make proc with the same
    instructions: div.full, ex2.approx, no contraction across them): process of the raw head's logits
    is, float for float, the proc the head writes without raw, with the same statistics."""
    from kernels.lm_head import DEFAULT_TILE, DEFAULT_TILE_INT8, lm_head_triton, process

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    h, w, s = (None if x is None else x.cuda() for x in make(256, 2816, 262144, torch.bfloat16, int8=int8, seed=6))
    temp = torch.tensor(0.7, device="cuda")
    tile = DEFAULT_TILE_INT8 if int8 else DEFAULT_TILE  # one tile for both: the statistics' order is the tile's
    want = lm_head_triton(h, w, temp, 30.0, s, tile=tile)
    got = lm_head_triton(h, w, temp, 30.0, s, tile=tile, raw=True)
    assert got.proc is None and got.logits.dtype == torch.bfloat16
    assert torch.equal(process(got.logits, 30.0, temp), want.proc)
    for a, b in zip(got[1:4], want[1:4]):
        assert torch.equal(a, b)


def partials(L, C, seed=0):
    """Partials as the head kernel writes them: m, s >= 1 (the max's own term), t <= 0, arg in its tile."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(L, C, generator=g) * 3
    s = 1 + torch.rand(L, C, generator=g) * 50
    t = -torch.rand(L, C, generator=g) * 20
    arg = (torch.arange(C) * 128 + torch.randint(0, 128, (L, C), generator=g)).int()
    return m, s, t, arg


def check_combine(got, want):
    # the two sums in another (fixed) order: a few ulps apart, no more
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.int64
    torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-6, equal_nan=True)
    torch.testing.assert_close(got[2], want[2], atol=2e-6, rtol=2e-6, equal_nan=True)


@pytest.mark.parametrize("L,C", [(1, 1), (5, 3), (17, 2048), (3, 1000)])
def test_triton_combine_matches_reference(interpret, L, C):
    from kernels.lm_head import combine, combine_triton

    m, s, t, arg = partials(L, C, seed=C)
    check_combine(combine_triton(m, s, t, arg), combine(m, s, t, arg))


def test_triton_combine_ties_inf_and_nan(interpret):
    from kernels.lm_head import combine, combine_triton

    m, s, t, arg = partials(6, 40, seed=1)
    m[0, [7, 3, 30]] = 50.0  # a tie: the first chunk (3) wins
    m[1, :] = 2.0  # all tied: chunk 0
    m[2, 5:] = float("-inf")  # chunks whose every logit is -inf (today: NaN entropy via 0 · -inf)
    m[3, :] = float("-inf")  # a row of nothing but -inf
    m[4, 9] = float("nan")  # a NaN max: NaN statistics, argmax from chunk 0 (torch's argmax of all-False)
    s[5, 2] = float("nan")  # a NaN sum: NaN statistics, the argmax unaffected
    want = combine(m, s, t, arg)
    got = combine_triton(m, s, t, arg)
    assert want[0][0] == arg[0, 3] and want[0][1] == arg[1, 0] and want[0][4] == arg[4, 0]
    assert want[1][[2, 3, 4, 5]].isnan().all() and want[2][[3, 4, 5]].isnan().all()
    check_combine(got, want)


def test_triton_combine_padded_partials(interpret):
    # the head kernel's buffers: [4, L, C] fp32 views and an int32 [L, C], as lm_head_triton passes them
    from kernels.lm_head import combine, combine_triton

    m, s, t, arg = partials(9, 24, seed=2)
    part = torch.stack([m, s, t, torch.zeros_like(m)])
    check_combine(combine_triton(part[0], part[1], part[2], arg), combine(m, s, t, arg))
    with pytest.raises(ValueError):
        combine_triton(m, s, t.t().contiguous().t(), arg)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_combine_real_tiles(monkeypatch):
    # compiled: fmax-style max (the explicit NaN check), the fast exp; C = 2048 tiles of 128
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kernels.lm_head import combine, combine_triton

    m, s, t, arg = (x.cuda() for x in partials(256, 2048, seed=3))
    m[0, [900, 100]] = 40.0
    m[1, 7] = float("nan")
    m[2, 1000:] = float("-inf")
    check_combine(combine_triton(m, s, t, arg), combine(m, s, t, arg))


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_raw_logits_processed_are_the_proc_the_head_writes(interpret, path, dtype):
    """raw=True writes the logits in h's dtype (half of fp32 proc's bytes) and the same statistics;
    `process` of them is, float for float, the proc the same path writes without raw (the kernels
    that read raw logits make proc with the same `process_logits`); without a softcap too."""
    from kernels.lm_head import lm_head_triton, process, process_ref, process_triton

    h, q, s = make(37, 64, 300, dtype, int8=True, seed=9)
    head, proc_fn = (lm_head_ref, process_ref) if path == "reference" else (lm_head_triton, process_triton)
    kw = dict(chunk=128) if path == "reference" else dict(tile=(16, 64, 32, 4, 1))
    for cap in (30.0, None):
        want = head(h, q, torch.tensor(0.7), cap, s, **kw)
        got = head(h, q, torch.tensor(0.7), cap, s, raw=True, **kw)
        assert got.proc is None and got.logits.dtype == dtype and got.logits.shape == (37, 300)
        for a, b in zip(got[1:4], want[1:4]):
            assert torch.equal(a, b)
        assert torch.equal(proc_fn(got.logits, cap, torch.tensor(0.7)), want.proc)
        # the logits are the model's own: h · (q · s) rounded to h's dtype
        logits = (F.linear(h.float(), q.float()) * s.float()).to(dtype)
        torch.testing.assert_close(got.logits.float(), logits.float(), atol=2e-2, rtol=1e-2)
    # the dispatcher: reference on CPU tensors unless DG_KERNELS says triton (set by `interpret`)
    assert torch.equal(process(got.logits, None, 0.7), process_triton(got.logits, None, 0.7))


@pytest.mark.parametrize("int8", [False, True], ids=["bf16-embedding", "int8-embedding"])
def test_aot_compiles_the_head_the_engine_launches(monkeypatch, int8):
    """The head as Engine.stats launches it at full size (raw=True: bf16 logits out, softcap 30),
    for either embedding, is an AOT spec (its constexprs and pointer dtypes): the compile test checks
    the kernel that runs."""
    import importlib

    mod = importlib.import_module("kernels.lm_head")  # the package re-exports the function
    launched = []
    monkeypatch.setenv("DG_KERNELS", "triton")
    monkeypatch.setattr(mod, "launch", lambda kernel, device, grid, *args, **kw: launched.append((kernel, args, kw)))
    L, H, V = 256, 2816, 262144
    meta = dict(device="meta")
    h = torch.empty(L, H, dtype=torch.bfloat16, **meta)
    w = torch.empty(V, H, dtype=torch.int8 if int8 else torch.bfloat16, **meta)
    scale = torch.empty(V, dtype=torch.float16, **meta) if int8 else None
    out = torch.empty(L, V, dtype=torch.bfloat16, **meta)
    mod.lm_head(h, w, torch.empty((), **meta), 30.0, scale, out=out, raw=True)
    (_, args, kw), = [x for x in launched if x[0] is mod._lm_head_kernel]
    names = mod._lm_head_kernel.arg_names
    dtypes = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
              torch.int8: "*i8"}
    pointers = {n: dtypes[a.dtype] for n, a in zip(names, args) if isinstance(a, torch.Tensor)}
    constexprs = {k: v for k, v in kw.items() if k in names}
    specs = [s for s in mod.AOT if s.fn is mod._lm_head_kernel]
    assert any(s.constexprs == constexprs and all(s.signature[n] == t for n, t in pointers.items()) for s in specs), (
        constexprs, pointers)
    assert constexprs["RAW"] and pointers["out_ptr"] == "*bf16"
