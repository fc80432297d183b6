"""A Triton kernel that cannot compile or load on the user's device (issue 11): its calls run the
PyTorch reference instead, with one line on stderr per kernel, and are not retried; OOM and our own
argument checks still raise; a failing autotune candidate is only dropped.

The failures are simulated on the CPU: `_dispatch.launchable` (the step every interpreted launch
takes) raises triton's real exception types for the kernels named broken. The interpreter itself
never raises them, so the rest runs as under TRITON_INTERPRET."""

import types

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

import kernels._dispatch as D
import kernels._tuning as T
from kernels.rmsnorm import rmsnorm, rmsnorm_ref


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DG_KERNELS", "triton")
    D._unavailable.clear()  # cleared in place: the fused modules hold the same set objects
    D._skipped.clear()
    yield
    D._unavailable.clear()
    D._skipped.clear()


def _name(kernel):
    return kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__


@pytest.fixture
def broken(monkeypatch):
    """broken(name, error) makes every launch of the kernel `name` raise `error`; returns the list
    of kernel names whose launch was attempted (broken or not)."""
    errors, tried = {}, []
    real = D.launchable

    def launchable(kernel, device):
        tried.append(_name(kernel))
        if _name(kernel) in errors:
            def fail(*a, **k):
                raise errors[_name(kernel)]
            return _Failing(fail)
        return real(kernel, device)

    monkeypatch.setattr(D, "launchable", launchable)

    def add(name, error):
        errors[name] = error
        return tried

    return add


class _Failing:
    def __init__(self, fail):
        self.fail = fail

    def __getitem__(self, grid):
        return self.fail


def _case():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 64, generator=g), 1 + 0.1 * torch.randn(64, generator=g)


@pytest.mark.parametrize("error", [OutOfResources(232448, 101376, "shared memory"),
                                   CompilationError("def k(): ...", None, "libdevice function missing"),
                                   RuntimeError("Triton Error [CUDA]: device kernel image is invalid")])
def test_a_kernel_that_cannot_load_runs_its_reference_once_warned(interpret, broken, capsys, error):
    tried = broken("_rmsnorm_kernel", error)
    x, w = _case()
    for _ in range(3):
        assert torch.equal(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6))
    assert tried == ["_rmsnorm_kernel"]  # later calls go straight to the reference
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert "_rmsnorm_kernel" in err[0] and "cpu" in err[0] and "PyTorch path" in err[0]
    assert str(error).splitlines()[0] in err[0]


def test_other_kernels_keep_their_triton_path(interpret, broken, capsys):
    from kernels.rmsnorm import rmsnorm_add, rmsnorm_add_ref

    tried = broken("_rmsnorm_rope_kernel", OutOfResources(1, 0, "threads"))
    x, w = _case()
    assert torch.allclose(rmsnorm_add(x, x, w, 1e-6), rmsnorm_add_ref(x, x, w, 1e-6))
    assert tried == ["_rmsnorm_kernel"] and capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   ValueError("an argument check")])
def test_oom_and_other_errors_surface(interpret, broken, capsys, error):
    broken("_rmsnorm_kernel", error)
    x, w = _case()
    with pytest.raises(type(error)):
        rmsnorm(x, w, 1e-6)
    assert D._unavailable == set() and D._skipped == set() and capsys.readouterr().err == ""


def test_argument_checks_still_raise(interpret):
    x, w = _case()
    with pytest.raises(ValueError):
        rmsnorm(x, w[:10], 1e-6)
    assert D._unavailable == set() and D._skipped == set()


def test_an_autotune_candidate_that_fails_is_dropped_not_the_kernel(interpret, monkeypatch, capsys):
    """pick_fastest: a candidate the compiler rejects is skipped, nothing is marked, nothing printed;
    when no candidate is left the default comes back, and the default then failing for real marks
    the kernel and raises KernelUnavailable (which the dispatcher turns into its reference)."""
    def kernel():
        pass

    kernel.__name__ = "_tuned_kernel"

    class Kernel:
        fn = kernel

        def warmup(self, *args, grid, bad):
            if bad:
                raise OutOfResources(200000, 101376, "shared memory")
            return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=0))

    k = Kernel()
    monkeypatch.setattr(T, "_time", lambda fn: 1.0)
    monkeypatch.setattr(D, "launchable", lambda kernel, device: _Failing(lambda *a, **kw: None))
    dev = torch.device("cpu")

    def run(cfg, warmup=False):
        return D.launch(k, dev, (1,), warmup=True, bad=cfg == "bad") if warmup else D.launch(k, dev, (1,), bad=False)

    assert T.pick_fastest(["bad", "good"], run, "bad", "tuned", 101376) == ("good", 1.0)
    with pytest.warns(UserWarning, match="no autotune candidate"):
        assert T.pick_fastest(["bad"], run, "bad", "tuned", 101376)[0] == "bad"
    assert D._unavailable == set() and capsys.readouterr().err == ""
    with pytest.raises(D.KernelUnavailable):
        run("bad", warmup=True)
    assert D._unavailable == {("_tuned_kernel", "cpu")}
    assert capsys.readouterr().err.count("_tuned_kernel") == 1


def test_generation_with_a_broken_head_kernel_matches_the_reference(tiny, interpret, broken, monkeypatch, capsys):
    """The fused head's kernel and the draw's fail to load: the tiny model's generation with
    DG_KERNELS=triton gives the reference path's tokens, with one line on stderr per kernel. (Both
    broken keeps the test quick: no vocabulary-sized interpreted launch.)"""
    from dgcli.config import SamplerSettings
    from dgcli.engine import Engine
    from test_graphs import run

    broken("_draw_chunks_kernel", PTXASError("ptxas failed"))
    tried = broken("_lm_head_kernel", OutOfResources(232448, 101376, "shared memory"))
    model = tiny[0].model
    settings = SamplerSettings(max_new_tokens=16, max_denoising_steps=2, seed=3, eos_token_id=None)
    got = run(Engine(model, fused_head=True, cuda_graphs=False), [5, 6, 7, 8], settings)
    # each broken one tried once; the raw logits' proc for the unfused draw comes from _process_kernel
    assert sorted(set(tried)) == ["_draw_chunks_kernel", "_lm_head_kernel", "_process_kernel"]
    assert tried.count("_draw_chunks_kernel") == tried.count("_lm_head_kernel") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "_lm_head_kernel" in err[0] and "_draw_chunks_kernel" in err[1]
    monkeypatch.setenv("DG_KERNELS", "ref")
    want = run(Engine(model, fused_head=True, cuda_graphs=False), [5, 6, 7, 8], settings)
    assert got[2].token_ids == want[2].token_ids and got[1] == want[1]


@pytest.mark.parametrize("raw", [False, True], ids=["proc", "raw-logits"])
def test_fused_draw_that_cannot_load_draws_unfused_on_the_same_stream(interpret, broken, monkeypatch, capsys, raw):
    """The fused draw's kernels failing to load, at the check (cuda_rng's kernel) or after it (the
    draw kernel): the unfused draw from the same generator state, the same tokens and offsets as the
    sampler that never fused, and no mismatch line (the load failure's own line is the one). On raw
    logits (process=(softcap, temperature)): the unfused draw on kernels.lm_head.process(logits), and
    sc = that proc in the model dtype (the unfused answer, which the caller can use as ever)."""
    import kernels.cuda_rng as rng
    import kernels.sample as mod
    from kernels.lm_head import process
    from test_kernels_sample import FakePhilox, make, make_raw

    from kernels.sample import draw_ref

    for kernel in ("_exp_kernel", "_fused_draw_kernel"):
        fake = FakePhilox(monkeypatch)
        D._unavailable.clear()
        tried = broken(kernel, CompilationError("def k(): ...", None, "no libdevice"))
        if kernel == "_fused_draw_kernel":  # the check passes; the draw itself cannot load
            monkeypatch.setattr(rng, "count_mismatches", lambda *a: torch.zeros((), dtype=torch.int32))
        if raw:
            x, lse, args = make_raw(3, 500, seed=3, temperature=0.6)
            proc = process(x, *args)
        else:
            (proc, lse, _), args = make(4, 700, seed=3), None
            x = proc
        g, g_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        for call in range(3):
            tokens, sc, sc_lse = mod.sample_sc(x[None], lse[None], g, torch.bfloat16, process=args)
            want = draw_ref(proc, lse, fake.exponential(proc, g_ref))[None]
            assert torch.equal(tokens, want), (kernel, call)
            assert fake.state[id(g)] == fake.state[id(g_ref)]
            assert torch.equal(sc, proc[None].to(torch.bfloat16)) and sc_lse is None
        assert tried.count(kernel) == 1 and mod.check_status(proc.device, proc.numel()) is False
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and kernel in err[0], err


def test_dg_run_with_a_broken_kernel_exits_0_with_clean_stdout(runner, tiny, interpret, broken, monkeypatch):
    import dgcli
    from dgcli import cli
    from dgcli.engine import Engine

    real = Engine.__init__
    monkeypatch.setattr(Engine, "__init__", lambda self, *a, **k: real(self, *a, **{**k, "fused_head": True}))
    broken("_draw_chunks_kernel", PTXASError("ptxas failed"))
    tried = broken("_lm_head_kernel", RuntimeError("Triton Error [CUDA]: no kernel image is available"))
    r = runner.invoke(cli.app, ["run", "-m", "tiny", "--max-tokens", "16", "--steps", "2", "--device", "cpu",
                                "--seed", "1", "hello"])
    assert r.exit_code == 0, r.stderr
    assert "_lm_head_kernel" in tried
    assert r.stdout == dgcli.generate(*tiny, "hello", max_new_tokens=16, max_denoising_steps=2, seed=1) + "\n"
    assert r.stderr.count("\n") == 2 and r.stderr.count("PyTorch path") == 2 and "_lm_head_kernel" in r.stderr


def test_a_fused_module_runs_its_parents_method(interpret, broken, capsys):
    """kernels.fused_norms: a norm kernel that cannot load leaves the module's call to its parent's
    forward (what DG_KERNELS=ref runs), the other fused methods on Triton."""
    from dgcli.model import RMSNorm
    from kernels.fused_norms import FusedRMSNorm

    tried = broken("_rmsnorm_kernel", OutOfResources(232448, 101376, "shared memory"))
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, _ = _case()
    want = norm(x)
    fused = FusedRMSNorm.replacing(norm)
    for _ in range(2):
        assert torch.equal(fused(x), want)
    assert tried == ["_rmsnorm_kernel"] and len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tile_over_shared_memory_falls_back(monkeypatch, capsys):
    """On a GPU, for real: int8_linear's default tile made far larger than any device's shared memory
    (autotuning off, so it is launched) raises triton's OutOfResources at load; the call returns the
    reference's result, warns once, and the next call does not try again."""
    import kernels.int8_linear as I8

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DG_KERNELS", raising=False)
    monkeypatch.setenv("DG_AUTOTUNE", "off")
    monkeypatch.setattr(I8, "DEFAULT_TILE", (256, 256, 256, 4, 4))  # ~768 KB of stages
    D._unavailable.clear()
    D._skipped.clear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g).to("cuda", torch.bfloat16)
    q = torch.randint(-127, 128, (256, 512), generator=g, dtype=torch.int8).cuda()
    s = (torch.rand(256, generator=g) / 100).to("cuda", torch.float16)
    try:
        for _ in range(2):
            assert torch.equal(I8.int8_linear(x, q, s), I8.int8_linear_ref(x, q, s))
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "_int8_linear_kernel" in err[0], err  # OutOfResources (or ptxas refusing)
    finally:
        D._unavailable.clear()
        D._skipped.clear()
