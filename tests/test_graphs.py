"""The graph-capturable denoising step (dgcli/graphs.py, dgcli/engine.py) and the static cache beneath
it, on the CPU, under the device's semantics.

A CUDA graph freezes Python: it replays the kernels it recorded, on the buffers it recorded, and only
the buffers' contents change; each replay overwrites the previous one's outputs. `TracedCapture` has
the same semantics (make_fx records the aten ops on the live buffers, and the step writes its results
into fixed buffers), so a position, a mask or an input that the step read from Python state instead
of a device tensor, or an output kept past the next replay, shows up here as a wrong token.
The `sdpa_layout` fixture (tests/conftest.py) runs these tests once more with SDPA returning CUDA's
memory-efficient kernel's output layout, so no layout assumption hides behind the CPU's.
"""

import pytest
import torch

from dgcli import graphs
from dgcli.config import ModelConfig, SamplerSettings
from dgcli.engine import Engine, StepOut, entropy, multinomial
from dgcli.events import BlockEvent, DoneEvent, StepEvent
from dgcli.model import DiffusionGemma
from dgcli.sampler import denoise

pytestmark = pytest.mark.usefixtures("sdpa_layout")


def run(engine, prompt, settings, template=None):
    """A generation's (canvas, argmax) per step, tokens per block, DoneEvent and cache."""
    cache = engine.new_cache(max_tokens=len(prompt) + settings.max_new_tokens + 256)
    steps, blocks, done = [], [], None
    for ev in denoise(engine, prompt, settings, cache=cache, template=template):
        if isinstance(ev, StepEvent):
            steps.append((ev.canvas, ev.argmax))
        elif isinstance(ev, BlockEvent):
            blocks.append(ev.token_ids)
        elif isinstance(ev, DoneEvent):
            done = ev
    return steps, blocks, done, cache


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-head"])
def test_graph_replays_generate_what_eager_decoding_does(tiny, fused):
    model = tiny[0].model
    W, L = model.config.sliding_window, model.config.canvas_length
    prompt = list(range(5, 5 + W + 40))  # past the window: the rings wrap
    settings = SamplerSettings(max_new_tokens=3 * L, max_denoising_steps=3, seed=3, eos_token_id=None)
    bucket = 256  # 168+256 -> span 512, then 768, then 1024: three buckets over the three blocks
    # Eager decoding with the same bucketed spans the graphs use (the same kernels).
    eager = run(Engine(model, static_cache=True, fused_head=fused, cuda_graphs=False, bucket=bucket), prompt, settings)
    engine = Engine(model, static_cache=True, fused_head=fused, capture=graphs.TracedCapture(), bucket=bucket)
    graphed = run(engine, prompt, settings)
    assert graphed[0] == eager[0]  # every step's canvas and argmax
    assert graphed[1] == eager[1]
    # The answer is the blocks as they were committed: no block read from a buffer a later replay
    # overwrote (the argmax of a graph is its output buffer).
    assert graphed[2].token_ids == [t for b in graphed[1] for t in b] == eager[2].token_ids
    cache = graphed[3]
    # one graph per bucket and kind of step (a canvas's first step has no self-conditioning)
    step = engine._graphed[cache]
    assert sorted(step.graphs) == [(span, sc, fused) for span in (512, 768, 1024) for sc in (False, True)]
    assert graphed[2].warmup_seconds > 0 and eager[2].warmup_seconds == 0
    assert graphed[2].warmup_seconds == pytest.approx(step.capture_seconds)
    assert engine.cuda_graphs  # no fallback happened


def test_graphs_are_one_head_kind(tiny):
    """An engine's graphs write one kind of output (raw logits with the fused head, fp32 proc without):
    a step of the other kind is refused before anything is copied or captured."""
    engine = Engine(tiny[0].model, static_cache=True, fused_head=False, capture=graphs.TracedCapture())
    step = graphs.GraphedStep(engine, engine.new_cache(max_tokens=300), engine.capture)
    assert step.out.values.dtype == torch.float32 and step.out.process is None
    canvas = torch.zeros(1, engine.config.canvas_length, dtype=torch.long)
    with pytest.raises(ValueError, match="other kind"):
        step(canvas, None, torch.tensor(0.7), fused=True)
    assert not step.graphs and not step.canvas.any()


def test_a_failed_capture_changes_the_engines_state_only(tiny, capsys):
    model = tiny[0].model

    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    engine = Engine(model, static_cache=True, capture=refuse, bucket=256)
    settings = SamplerSettings(max_new_tokens=64, max_denoising_steps=2, seed=1, eos_token_id=None)
    eager = run(Engine(model, static_cache=True, cuda_graphs=False, bucket=256), [5, 6, 7], settings)
    got = run(engine, [5, 6, 7], settings)
    assert got[2].token_ids == eager[2].token_ids and not engine.cuda_graphs
    assert capsys.readouterr().err.count("CUDA graphs off (RuntimeError: operation not permitted") == 1
    assert not hasattr(model, "graph_capture") and not hasattr(got[3], "graphs")


@pytest.mark.slow
def test_bucketed_span_matches_the_exact_one_even_at_a_bucket_boundary(tiny):
    """The slack past the canvas is masked, also when a bucket's graph is captured with none."""
    model = tiny[0].model
    L, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    cache = model.new_cache(static=True, max_tokens=2048, rollback=100)
    model.encode(torch.randint(0, V, (1, 512 - L), generator=g), cache)  # length + L == 512
    canvas = torch.randint(0, V, (1, L), generator=g)
    temp = torch.tensor(1.0)
    exact = model.logits(model.decode(canvas, cache))
    engine = Engine(model, static_cache=True, fused_head=False, capture=graphs.TracedCapture(), bucket=512)
    first = engine.step(canvas, cache, None, temp).proc.clone()
    assert (first - exact).abs().max() < 1e-3
    assert cache.truncate(cache.length - 100)  # a shorter context in the same bucket: slack to hide
    again = engine.step(canvas, cache, None, temp).proc
    assert list(engine._graphed[cache].graphs) == [(512, False, False)]
    assert (again - model.logits(model.decode(canvas, cache))).abs().max() < 1e-3


@pytest.mark.parametrize("sc", [False, True], ids=["first-step", "self-conditioned"])
def test_fused_head_gives_the_sampler_statistics_of_the_logits(tiny, sc):
    """The fused head (kernels.lm_head: one pass over the vocabulary) against the sampler's own maths."""
    model = tiny[0].model
    L, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    cache = model.new_cache()
    model.encode(torch.randint(0, V, (1, 50), generator=g), cache)
    canvas = torch.randint(0, V, (1, L), generator=g)
    sc_logits = model.logits(model.decode(canvas, cache)).to(model.dtype) / 0.7 if sc else None
    temp = torch.tensor(0.6)
    plain = Engine(model, fused_head=False).step(canvas, cache, sc_logits, temp)
    head = Engine(model, fused_head=True).step(canvas, cache, sc_logits, temp)
    proc = plain.proc
    torch.testing.assert_close(head.proc, proc, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.argmax, proc.argmax(-1)) and torch.equal(plain.argmax, proc.argmax(-1))
    torch.testing.assert_close(head.entropy, entropy(proc), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.lse, proc.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.probabilities(), plain.probabilities(), rtol=1e-5, atol=1e-6)


def test_sample_is_multinomial_bit_for_bit():
    """argmax(p / Exp(1)) draws what torch.multinomial draws from the same generator state."""
    for shape in [(256, 4000), (16, 50000), (3, 7)]:
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        p = torch.softmax(torch.randn(*shape) * 3, -1)
        assert torch.equal(torch.multinomial(p, 1, generator=g1).view(-1), multinomial(p, g2))
        assert torch.equal(torch.randint(0, 100, (5,), generator=g1), torch.randint(0, 100, (5,), generator=g2))


def test_decode_step_never_syncs_with_the_host(tiny):
    """On `meta` tensors any .item(), .tolist() or data-dependent shape raises: the step has none."""
    config = tiny[0].config
    with torch.device("meta"):
        model = DiffusionGemma(config).to(torch.bfloat16)  # bf16: the grouped_mm path GPUs take
    cache = model.new_cache(static=True, max_tokens=256)
    model.encode(torch.zeros(1, 40, dtype=torch.long, device="meta"), cache)
    canvas = torch.zeros(1, config.canvas_length, dtype=torch.long, device="meta")
    temp = torch.ones((), device="meta")
    positions = cache.prepare_decode(config.canvas_length, bucket=128)
    for fused in (False, True):  # the unfused statistics and the fused head are both sync-free
        engine = Engine(model, static_cache=True, fused_head=fused, cuda_graphs=False, bucket=128)
        out = engine.stats(canvas, cache, None, temp, positions, fused)
        out = engine.stats(canvas, cache, out.proc.to(torch.bfloat16), temp, positions, fused)
        assert out.proc.shape == (1, config.canvas_length, config.vocab_size)
        assert out.entropy.shape == out.argmax.shape == (1, config.canvas_length)
        out.probabilities()
    with pytest.raises(Exception):  # the check has teeth: a host read fails on meta
        out.proc.sum().item()


def test_a_step_reads_the_host_once(tiny, monkeypatch):
    """The sampler's steps make one device-to-host read each (the event and the stop flag)."""
    reads = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append("bool") or item(t) != 0)
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append("float") or float(item(t)))
    settings = SamplerSettings(max_new_tokens=512, max_denoising_steps=6, seed=2, eos_token_id=None)
    events = list(denoise(tiny[0], [5, 6, 7, 8], settings))
    steps, blocks = sum(isinstance(e, StepEvent) for e in events), sum(isinstance(e, BlockEvent) for e in events)
    assert steps == 12 and blocks == 2
    assert len(reads) <= steps + 2 * blocks + 2  # per block: the committed ids; at the end: all ids


def random_cuda_model(config: ModelConfig) -> DiffusionGemma:
    """A bf16 model on the GPU with small random weights (seed 0), for the CUDA-only tests."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DiffusionGemma(config)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model.to(torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graphs_match_eager_decoding(tiny):
    """On a GPU: the captured graphs give the eager step's statistics at every step and bucket."""
    config = ModelConfig.from_dict({**tiny[0].config.__dict__, "canvas_length": 64})
    model = random_cuda_model(config)
    V, L = config.vocab_size, config.canvas_length
    prompt = torch.randint(0, V, (1, 100), device="cuda")
    for fused in (False, True):  # the fused LM head (Triton) is captured too
        eager = Engine(model, static_cache=True, fused_head=fused, cuda_graphs=False, bucket=128)
        graphed = Engine(model, static_cache=True, fused_head=fused, cuda_graphs=True, bucket=128)
        eager_cache, graph_cache = eager.new_cache(max_tokens=600), graphed.new_cache(max_tokens=600)
        for c in (eager_cache, graph_cache):
            model.encode(prompt, c)
        for block in range(3):  # spans 256, 256, 384: a new bucket on the way
            canvas = torch.randint(0, V, (1, L), device="cuda")
            sc = None
            temp = torch.tensor(0.7, device="cuda")
            for step in range(3):
                want = eager.step(canvas, eager_cache, sc, temp)
                got = graphed.step(canvas, graph_cache, sc, temp)
                assert (got.proc - want.proc).abs().max().item() < 1e-2, (block, step)
                assert (got.entropy - want.entropy).abs().max().item() < 1e-2
                sc = want.proc.to(model.dtype)
            committed = want.argmax.clone()
            for c in (eager_cache, graph_cache):
                model.encode(committed, c)
        assert len(graphed._graphed[graph_cache].graphs) == 4 and graphed.cuda_graphs  # no fallback happened


def test_fused_draw_feeds_the_graph_in_place_with_the_unfused_tokens(tiny, monkeypatch):
    """Two blocks of two graph-replayed steps with the sampler's fused draw (kernels.sample: its
    Exp(1) draws made as torch's CUDA exponential_ makes them, its check passed; on the CPU its
    reference, the generator's philox state faked) against the unfused draw on the same stream
    (eager: graphs replay what eager decoding does, tested above): the same canvases and tokens.
    Each self-conditioned step is handed the graph's own input buffer (nothing copied) and the
    logsumexp the draw made (graphs of kind 2)."""
    import kernels.sample as ks
    from test_kernels_sample import FakePhilox

    fake = FakePhilox(monkeypatch)
    handed = []
    real_call = graphs.GraphedStep.__call__

    def spy(self, canvas, sc, temperature, fused, sc_lse=None):
        if sc is not None:
            handed.append((sc is self.sc, sc_lse is self.sc_lse))
        return real_call(self, canvas, sc, temperature, fused, sc_lse)

    monkeypatch.setattr(graphs.GraphedStep, "__call__", spy)
    model = tiny[0].model
    L, V = model.config.canvas_length, model.config.vocab_size
    settings = SamplerSettings(max_new_tokens=2 * L, max_denoising_steps=2, seed=5, eos_token_id=None,
                               stability_threshold=100, confidence_threshold=-1.0)  # both steps, both blocks

    def generate(fused_draw: bool, **kw):
        fake.state.clear()
        monkeypatch.setattr(ks, "_checked", {("cpu", L * V): fused_draw})
        return run(Engine(model, static_cache=True, fused_head=True, bucket=1024, **kw), [5, 6, 7, 8], settings)

    plain = generate(False, cuda_graphs=False)
    assert handed == []
    fused = generate(True, capture=graphs.TracedCapture())
    assert fused[0] == plain[0] and fused[1] == plain[1] and len(fused[0]) == 4
    assert fused[2].token_ids == plain[2].token_ids
    assert handed == [(True, True), (True, True)]


def test_decode_hands_the_samplers_lse_to_the_soft_embedding(tiny, monkeypatch):
    """Engine.step with a SelfCond carrying a logsumexp: the model's decode gives it to
    soft_logits (which a quantized embedding uses); without one, soft_logits gets the logits alone."""
    from dgcli.engine import SelfCond

    model = tiny[0].model
    emb = model.model.decoder.embed_tokens
    seen = []
    real = emb.soft_logits
    monkeypatch.setattr(emb, "soft_logits", lambda x, *lse: seen.append(lse) or real(x, *lse))
    L, V = model.config.canvas_length, model.config.vocab_size
    engine = Engine(model)
    cache = engine.new_cache()
    model.encode(torch.arange(5, 9)[None], cache)
    canvas = torch.zeros(1, L, dtype=torch.long)
    sc = torch.randn(1, L, V)
    lse = sc.logsumexp(-1)
    a = engine.step(canvas, cache, SelfCond(sc, lse), torch.tensor(0.7)).proc.clone()
    b = engine.step(canvas, cache, sc, torch.tensor(0.7)).proc
    assert len(seen) == 2 and torch.equal(seen[0][0], lse) and seen[1] == ()
    assert torch.equal(a, b)  # the plain embedding ignores it
