"""The graph-capturable denoising step (dgcli/graphs.py) and the static cache beneath it, on the CPU.

A CUDA graph freezes Python: it replays the kernels it recorded, on the buffers it recorded, and only
the buffers' contents change. `TracedCapture` has the same semantics (make_fx records the aten ops on
the live buffers), so a position, a mask or an input that the step read from Python state instead of
a device tensor shows up here as a wrong token.
"""

import pytest
import torch

from dgcli import graphs
from dgcli.bench import text_config
from dgcli.config import ModelConfig, SamplerSettings
from dgcli.model import DiffusionGemma
from dgcli.sampler import denoise
from dgcli.events import BlockEvent, DoneEvent, StepEvent


class Bucketed:
    """The model decoding eagerly with the same bucketed spans the graphs use (the same kernels)."""

    def __init__(self, model, bucket):
        self.model, self.bucket = model, bucket

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode(self, canvas, cache, sc_logits=None):
        positions = cache.prepare_decode(canvas.shape[1], bucket=self.bucket)
        return self.model.decode_at(canvas, cache, sc_logits, positions)

    def decode_stats(self, canvas, cache, sc_logits, temperature):
        positions = cache.prepare_decode(canvas.shape[1], bucket=self.bucket)
        return self.model.decode_at(canvas, cache, sc_logits, positions, temperature=temperature)


def run(model, prompt, settings):
    cache = model.new_cache(static=True, max_tokens=len(prompt) + settings.max_new_tokens + 256)
    steps, blocks, done = [], [], None
    for ev in denoise(model, prompt, settings, cache=cache):
        if isinstance(ev, StepEvent):
            steps.append((ev.canvas, ev.argmax))
        elif isinstance(ev, BlockEvent):
            blocks.append(ev.token_ids)
        elif isinstance(ev, DoneEvent):
            done = ev
    return steps, blocks, done, cache


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-head"])
def test_graph_replays_generate_what_eager_decoding_does(tiny, monkeypatch, fused):
    model = tiny[0]
    monkeypatch.setattr(model, "fused_head", fused)
    W, L = model.config.sliding_window, model.config.canvas_length
    prompt = list(range(5, 5 + W + 40))  # past the window: the rings wrap
    settings = SamplerSettings(max_new_tokens=3 * L, max_denoising_steps=4, seed=3, eos_token_id=None)
    bucket = 256  # 168+256 -> span 512, then 768, then 1024: three buckets over the three blocks
    eager = run(Bucketed(model, bucket), prompt, settings)

    monkeypatch.setattr(graphs, "BUCKET", bucket)
    monkeypatch.setattr(model, "graph_capture", graphs.TracedCapture())
    graphed = run(model, prompt, settings)
    assert graphed[0] == eager[0]  # every step's canvas and argmax
    assert graphed[1] == eager[1]
    cache = graphed[3]
    # one graph per bucket and kind of step (a canvas's first step has no self-conditioning)
    assert sorted(cache.graphs.graphs) == [(span, sc, fused) for span in (512, 768, 1024) for sc in (False, True)]
    assert graphed[2].warmup_seconds > 0 and eager[2].warmup_seconds == 0
    assert graphed[2].warmup_seconds == pytest.approx(cache.graphs.capture_seconds)


def test_bucketed_span_matches_the_exact_one_even_at_a_bucket_boundary(tiny):
    """The slack past the canvas is masked, also when a bucket's graph is captured with none."""
    model = tiny[0]
    L, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    cache = model.new_cache(static=True, max_tokens=2048, rollback=100)
    model.encode(torch.randint(0, V, (1, 512 - L), generator=g), cache)  # length + L == 512
    canvas = torch.randint(0, V, (1, L), generator=g)
    exact = model.decode(canvas, cache)
    graphed = graphs.DecodeGraphs(model, cache, graphs.TracedCapture(), bucket=512)
    first = graphed.decode(canvas, None).clone()
    assert (first - exact).abs().max() < 1e-3
    assert cache.truncate(cache.length - 100)  # a shorter context in the same bucket: slack to hide
    again = graphed.decode(canvas, None)
    assert list(graphed.graphs) == [(512, False, False)]
    assert (again - model.decode(canvas, cache)).abs().max() < 1e-3


@pytest.mark.parametrize("sc", [False, True], ids=["first-step", "self-conditioned"])
def test_fused_head_gives_the_sampler_statistics_of_the_logits(tiny, sc):
    """decode_stats (kernels.lm_head: one pass over the vocabulary) against the sampler's own maths."""
    from dgcli.sampler import entropy

    model = tiny[0]
    L, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    cache = model.new_cache()
    model.encode(torch.randint(0, V, (1, 50), generator=g), cache)
    canvas = torch.randint(0, V, (1, L), generator=g)
    sc_logits = model.decode(canvas, cache).to(model.dtype) / 0.7 if sc else None
    temp = torch.tensor(0.6)
    proc = model.decode(canvas, cache, sc_logits) / temp
    head = model.decode_stats(canvas, cache, sc_logits, temp)
    torch.testing.assert_close(head.proc.view(1, L, V), proc, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.argmax.view(1, L), proc.argmax(-1))
    torch.testing.assert_close(head.entropy.view(1, L), entropy(proc), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.lse.view(1, L), proc.logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_decode_step_never_syncs_with_the_host():
    """On `meta` tensors any .item(), .tolist() or data-dependent shape raises: the step has none."""
    config = ModelConfig.from_dict(text_config("tiny"))
    with torch.device("meta"):
        model = DiffusionGemma(config).to(torch.bfloat16)  # bf16: the grouped_mm path GPUs take
    cache = model.new_cache(static=True, max_tokens=256)
    model.encode(torch.zeros(1, 40, dtype=torch.long, device="meta"), cache)
    canvas = torch.zeros(1, config.canvas_length, dtype=torch.long, device="meta")
    positions = cache.prepare_decode(config.canvas_length, bucket=128)
    logits = model.decode_at(canvas, cache, None, positions)
    out = model.decode_at(canvas, cache, logits.to(torch.bfloat16), positions, out=torch.empty_like(logits))
    assert out.shape == (1, config.canvas_length, config.vocab_size)
    head = model.decode_at(canvas, cache, None, positions, temperature=torch.ones(1, device="meta"))
    assert head.entropy.shape == (config.canvas_length,)  # the fused head is sync-free too
    with pytest.raises(Exception):  # the check has teeth: a host read fails on meta
        out.sum().item()


def test_truncate_and_rewind(tiny):
    """Chat rolls the cache back to where a new turn diverges; the result equals encoding afresh."""
    model = tiny[0]
    W, L, V = model.config.sliding_window, model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, V, (1, W + 50), generator=g)
    answer = torch.randint(0, V, (1, L), generator=g)
    follow = torch.randint(0, V, (1, 30), generator=g)
    canvas = torch.randint(0, V, (1, L), generator=g)

    def fresh_logits(ids):
        fresh = model.new_cache(static=True, max_tokens=2048)
        model.encode(ids, fresh)
        return model.decode(canvas, fresh)

    cache = model.new_cache(static=True, max_tokens=2048, rollback=64)
    model.encode(prompt, cache)
    cache.mark()
    model.decode(canvas, cache)  # a canvas decoded into the ring, as a generation does
    model.encode(answer, cache)
    keep = prompt.shape[1] + L - 64  # the last 64 answer tokens were pads, say: take them back
    assert cache.truncate(keep)
    model.encode(follow, cache)
    want = fresh_logits(torch.cat([prompt, answer[:, :L - 64], follow], dim=1))
    assert (model.decode(canvas, cache) - want).abs().max() < 1e-3

    # Further back than the rings reach: refused, nothing changed; the mark brings the prompt back.
    before = cache.length
    assert not cache.truncate(prompt.shape[1] + 10)
    assert cache.length == before
    cache.rewind()
    assert cache.length == prompt.shape[1]
    model.encode(follow, cache)
    assert (model.decode(canvas, cache) - fresh_logits(torch.cat([prompt, follow], dim=1))).abs().max() < 1e-3
    assert cache.truncate(prompt.shape[1] - 20)  # before the mark: its full-layer slots will be overwritten
    assert cache.marked_length is None
    assert cache.truncate(0) and cache.length == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graphs_match_eager_decoding():
    """On a GPU: the captured graphs give the eager step's logits at every step and bucket."""
    config = ModelConfig.from_dict(dict(text_config("tiny"), canvas_length=64))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DiffusionGemma(config)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    model = model.to(torch.bfloat16)
    V, L = config.vocab_size, config.canvas_length
    prompt = torch.randint(0, V, (1, 100), device="cuda")
    eager_cache = model.new_cache(static=True, max_tokens=600)
    graph_cache = model.new_cache(static=True, max_tokens=600)
    for c in (eager_cache, graph_cache):
        model.encode(prompt, c)
    graphed = graphs.DecodeGraphs(model, graph_cache, graphs.CudaCapture(), bucket=128)
    for block in range(3):  # spans 256, 256, 384: a new bucket on the way
        canvas = torch.randint(0, V, (1, L), device="cuda")
        sc = None
        for step in range(3):
            positions = eager_cache.prepare_decode(L, bucket=128)
            want = model.decode_at(canvas, eager_cache, sc, positions)
            got = graphed.decode(canvas, sc)
            assert (got - want).abs().max().item() < 1e-2, (block, step)
            temp = torch.full((1,), 0.7, device="cuda")
            positions = eager_cache.prepare_decode(L, bucket=128)
            want_head = model.decode_at(canvas, eager_cache, sc, positions, temperature=temp)
            got_head = graphed.decode(canvas, sc, temp)  # the fused LM head (Triton), captured too
            assert (got_head.proc - want_head.proc).abs().max().item() < 1e-2
            assert (got_head.entropy - want_head.entropy).abs().max().item() < 1e-2
            sc = (want / 0.8).to(model.dtype)
        committed = want.argmax(-1)
        for c in (eager_cache, graph_cache):
            model.encode(committed, c)
    assert len(graphed.graphs) == 8 and model.graph_capture is None  # never set: no fallback happened
