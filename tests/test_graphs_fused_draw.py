"""Graph-replayed generation with the sampler's fused draw under the device's semantics, on the CPU:
the draw's once-per-shape check (and its fallback) running after graphs were captured, blocks with
and without a logits processor (eager, unfused steps beside graphed, fused ones) in one generation,
and the generator stream that every path must draw alike (kernels.sample's fused draw, its check, the
fallback: the same numbers in the same order, so later randint calls see the same philox offset).

The CUDA generator's philox state is faked as tests/test_kernels_sample.py's FakePhilox does; the
reference is eager decoding with the unfused draw on the same fake stream.
"""

import pytest
import torch

from dgcli import graphs
from dgcli.config import SamplerSettings
from dgcli.engine import Engine
from dgcli.sampler import TemplateBlock
from test_graphs import run  # a generation's steps, blocks, DoneEvent and cache


@pytest.mark.parametrize("check", ["passes", "fails"])
def test_check_and_fallback_after_capture_with_mixed_blocks(tiny, monkeypatch, capsys, check):
    """Three canvases: a typed-hole processor (eager, unfused head and draw), then two plain ones
    (graphs, fused head): the first fused-eligible step runs the draw's check after the processor
    block and after its own first-step graph was captured; passing, the later steps draw in the
    kernel into the graph's buffers; failing, they fall back to exponential_ for good. Either way:
    every step's canvas and argmax, the tokens, the philox offset seen by each randint call and the
    generator's final offset are the eager unfused run's."""
    import kernels.cuda_rng as rng
    import kernels.sample as ks
    from test_kernels_sample import FakePhilox

    fake = FakePhilox(monkeypatch)
    model = tiny[0].model
    L, V = model.config.canvas_length, model.config.vocab_size
    bias = torch.zeros(V)
    bias[:V // 2] = float("-inf")  # the processor's holes take the upper half of the vocabulary

    def processor(logits):
        return logits + bias

    none = torch.zeros(L, dtype=torch.bool)
    pins = torch.zeros(L, dtype=torch.bool)
    pins[:3] = True
    template = [TemplateBlock(none, torch.zeros(L, dtype=torch.long), processor),
                TemplateBlock(none, torch.zeros(L, dtype=torch.long)),
                TemplateBlock(pins, torch.full((L,), 9, dtype=torch.long))]
    settings = SamplerSettings(max_new_tokens=3 * L, max_denoising_steps=3, seed=5, eos_token_id=None,
                               stability_threshold=100, confidence_threshold=-1.0)  # every step runs
    seen = []  # (philox offset, CPU generator state digest) at each randint with a generator
    real_randint = torch.randint

    def randint(*args, generator=None, **kw):
        if generator is not None:
            seen[-1].append(fake.state.get(id(generator), 0))
        return real_randint(*args, generator=generator, **kw)

    monkeypatch.setattr(torch, "randint", randint)
    checks = []
    mismatches = 0 if check == "passes" else 3
    monkeypatch.setattr(rng, "count_mismatches",
                        lambda *a: checks.append(a) or torch.tensor(mismatches, dtype=torch.int32))

    def generate(**kw):
        fake.state.clear()
        seen.append([])
        monkeypatch.setattr(ks, "_checked", {})
        engine = Engine(model, static_cache=True, fused_head=True, bucket=1024, **kw)
        out = run(engine, [5, 6, 7, 8], settings, template)
        return out, engine, dict(fake.state)

    # The reference: eager, the unfused draw throughout (a check that never passes draws as it does).
    monkeypatch.setattr(rng, "count_mismatches", lambda *a: torch.tensor(1, dtype=torch.int32))
    plain, _, plain_state = generate(cuda_graphs=False)
    capsys.readouterr()
    monkeypatch.setattr(rng, "count_mismatches",
                        lambda *a: checks.append(a) or torch.tensor(mismatches, dtype=torch.int32))
    got, engine, got_state = generate(capture=graphs.TracedCapture())
    assert len(got[0]) == 9 and len(checks) == 1
    assert got[0] == plain[0]  # every step's canvas and argmax
    assert got[1] == plain[1] and got[2].token_ids == plain[2].token_ids
    assert seen[1] == seen[0] and len(seen[1]) == 3 + 9  # a randint a canvas, one a step
    assert list(got_state.values()) == list(plain_state.values())
    assert engine.cuda_graphs
    kinds = sorted({key[1] for key in engine._graphed[got[3]].graphs})
    assert kinds == ([0, 1, 2] if check == "passes" else [0, 1])
    err = capsys.readouterr().err
    assert err.count("fused Exp(1) draws are not torch's") == (check == "fails")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("check", ["passes", "fails"])
def test_cuda_generation_draws_alike_on_every_path(tiny, monkeypatch, capsys, check):
    """On a GPU, the tiny config with random bf16 weights, a processor canvas then two plain ones:
    the fused draw (its check run for real, or failing and falling back) against the unfused draw,
    eager and with real CUDA graphs. The plain embedding ignores the draw's logsumexp, so on each
    backend the canvases and tokens are the unfused run's exactly, and on all four the philox offset
    at every randint and at the end is the same."""
    import kernels.cuda_rng as rng
    import kernels.sample as ks
    from dgcli.config import ModelConfig
    from test_graphs import random_cuda_model

    monkeypatch.delenv("DG_KERNELS", raising=False)
    config = ModelConfig.from_dict(dict(tiny[0].config.__dict__))
    model = random_cuda_model(config)
    L, V = config.canvas_length, config.vocab_size
    bias = torch.zeros(V, device="cuda", dtype=torch.bfloat16)
    bias[:V // 2] = float("-inf")
    none = torch.zeros(L, dtype=torch.bool, device="cuda")
    template = [TemplateBlock(none, torch.zeros(L, dtype=torch.long, device="cuda"), lambda x: x + bias),
                TemplateBlock(none, torch.zeros(L, dtype=torch.long, device="cuda")),
                TemplateBlock(none, torch.zeros(L, dtype=torch.long, device="cuda"))]
    settings = SamplerSettings(max_new_tokens=3 * L, max_denoising_steps=4, seed=5, eos_token_id=None,
                               stability_threshold=100, confidence_threshold=-1.0)
    offsets = []
    real_randint = torch.randint

    def randint(*args, generator=None, **kw):
        if generator is not None:
            offsets[-1].append(generator.get_offset())
        return real_randint(*args, generator=generator, **kw)

    monkeypatch.setattr(torch, "randint", randint)
    real_count = rng.count_mismatches
    if check == "fails":
        monkeypatch.setattr(rng, "count_mismatches", lambda *a: real_count(*a) + 3)

    def generate(fused_draw: bool, graphs_on: bool):
        offsets.append([])
        monkeypatch.setattr(ks, "_checked", {} if fused_draw else {(str(torch.device("cuda", 0)), L * V): False})
        engine = Engine(model, static_cache=True, fused_head=True, cuda_graphs=graphs_on, bucket=1024)
        steps, blocks, done, cache = run(engine, [5, 6, 7, 8], settings, template)
        assert engine.cuda_graphs == graphs_on
        return steps, blocks, done.token_ids

    for graphs_on in (False, True):
        unfused = generate(False, graphs_on)
        fused = generate(True, graphs_on)
        assert fused == unfused, graphs_on
        assert ks.check_status(torch.device("cuda", 0), L * V) is (check == "passes")
    assert all(o == offsets[0] for o in offsets) and len(offsets[0]) == 3 + 12
    assert capsys.readouterr().err.count("fused Exp(1) draws are not torch's") == 2 * (check == "fails")
