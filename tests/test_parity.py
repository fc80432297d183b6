"""Our engine against the transformers reference (5.23.0) on tiny random checkpoints, number for number.

Covers: prefill K/V (sliding caches truncating: prompts longer than the window), decoder logits with
and without self-conditioning, commits of several canvases, and whole generations token for token
for several seeds, including EOS inside a canvas and a logits processor that forces early stopping.
"""

import pytest
import torch

from reference import build_reference, save_reference

from dgcli.loader import load_model
from dgcli.sampler import denoise
from dgcli.events import BlockEvent, DoneEvent, StepEvent

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module", params=["small", "wide"])
def pair(request, tmp_path_factory):
    ref = build_reference(request.param, seed=0)
    path = save_reference(ref, tmp_path_factory.mktemp(request.param))
    return ref, load_model(path, device="cpu", dtype=torch.float32)


def ref_cache(ref):
    return DynamicCache(config=ref.config.get_text_config(decoder=True))


def test_prefill_and_commit_kv_match(pair):
    ref, ours = pair
    V, L = ref.config.text_config.vocab_size, ref.config.canvas_length
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (1, 20), generator=g)  # longer than both windows (8 and 6)
    rc, oc = ref_cache(ref), ours.new_cache()
    with torch.no_grad():
        ref.model.encoder(input_ids=prompt, past_key_values=rc, position_ids=torch.arange(20)[None])
    ours.encode(prompt, oc)
    for block in range(2):  # then two committed canvases
        for i, layer in enumerate(rc.layers):
            assert oc.keys[i].shape == layer.keys.shape
            assert (oc.keys[i] - layer.keys).abs().max() <= TOL
            assert (oc.values[i] - layer.values).abs().max() <= TOL
        canvas = torch.randint(0, V, (1, L), generator=g)
        pos = torch.arange(oc.length, oc.length + L)[None]
        with torch.no_grad():
            ref.model.encoder(input_ids=canvas, past_key_values=rc, position_ids=pos)
        ours.encode(canvas, oc)
    window = ref.config.text_config.sliding_window
    sliding = [i for i, t in enumerate(ref.config.text_config.layer_types) if t == "sliding_attention"]
    assert oc.keys[sliding[0]].shape[-2] == window - 1  # the sliding cache did truncate


def test_decoder_logits_match_with_and_without_self_conditioning(pair):
    ref, ours = pair
    V, L = ref.config.text_config.vocab_size, ref.config.canvas_length
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, V, (1, 13), generator=g)
    rc, oc = ref_cache(ref), ours.new_cache()
    with torch.no_grad():
        ref.model.encoder(input_ids=prompt, past_key_values=rc, position_ids=torch.arange(13)[None])
    ours.encode(prompt, oc)
    canvas = torch.randint(0, V, (1, L), generator=g)
    pos = torch.arange(13, 13 + L)[None]
    with torch.no_grad():
        r = ref(decoder_input_ids=canvas, past_key_values=rc, decoder_position_ids=pos).logits
    o = ours.logits(ours.decode(canvas, oc))
    assert o.dtype == torch.float32 and o.shape == r.shape
    assert (o - r).abs().max() <= TOL
    sc = r / 0.7  # processed logits of a previous step
    with torch.no_grad():
        r2 = ref(decoder_input_ids=canvas, past_key_values=rc, self_conditioning_logits=sc,
                 decoder_position_ids=pos).logits
    o2 = ours.logits(ours.decode(canvas, oc, sc))
    assert (o2 - r2).abs().max() <= TOL
    assert (r2 - r).abs().max() > 1e-3  # self-conditioning really changed something
    assert [len(k) for k in rc.layers[0].keys] == [len(k) for k in oc.keys[0]]  # the decoder wrote nothing


class Boost:
    """Makes the model confident (so blocks stop after 2 steps) and plants EOS at call `eos_at`."""

    def __init__(self, eos_at: int | None, eos_id: int = 5):
        self.calls, self.eos_at, self.eos_id = 0, eos_at, eos_id

    def __call__(self, logits):
        self.calls += 1
        V, L = logits.shape[-1], logits.shape[-2]
        out = logits.clone()
        target = (torch.arange(L) * 5 + 7) % V
        if self.eos_at is not None and self.calls >= self.eos_at:
            target[3] = self.eos_id
        out[0, torch.arange(L), target] += 40.0
        return out


class HFBoost(LogitsProcessor):
    def __init__(self, boost):
        self.boost = boost

    def __call__(self, input_ids, scores, cur_step=None):
        return self.boost(scores)


def run_ours(ours, prompt, seed, boost=None, **settings):
    from dgcli.config import SamplerSettings

    s = SamplerSettings(eos_token_id=[1, 5], pad_token_id=0, seed=seed).replace(**settings)
    events = list(denoise(ours, prompt[0].tolist(), s, logits_processor=boost))
    return events


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_generation_token_identical_random(pair, seed):
    ref, ours = pair
    V = ref.config.text_config.vocab_size
    L = ref.config.canvas_length
    prompt = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(seed + 10))
    torch.manual_seed(seed)
    want = ref.generate(prompt, max_new_tokens=3 * L, max_denoising_steps=6).sequences[0, 12:].tolist()
    events = run_ours(ours, prompt, seed, max_new_tokens=3 * L, max_denoising_steps=6)
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.token_ids == want
    assert done.blocks == len(want) // L
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert len(steps) == sum(done.steps_per_block)


@pytest.mark.parametrize("seed", [0, 3])
def test_generation_token_identical_with_early_stop_and_eos(pair, seed):
    ref, ours = pair
    V = ref.config.text_config.vocab_size
    L = ref.config.canvas_length
    prompt = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    want = ref.generate(prompt, max_new_tokens=4 * L, logits_processor=LogitsProcessorList([HFBoost(Boost(5))]))
    want = want.sequences[0, 12:].tolist()
    events = run_ours(ours, prompt, seed, boost=Boost(5), max_new_tokens=4 * L)
    done = events[-1]
    assert done.token_ids == want
    assert done.finish_reason == "eos"
    assert done.steps_per_block == [2, 2, 2]  # confident + stable after 2 steps; EOS planted in block 3
    assert want[-L:].count(0) > 0 and 5 in want  # pads after the EOS
    blocks = [e for e in events if isinstance(e, BlockEvent)]
    assert [b.finished for b in blocks] == [False, False, True]


def test_generation_token_identical_uneven_budget(pair):
    ref, ours = pair
    V, L = ref.config.text_config.vocab_size, ref.config.canvas_length
    prompt = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    torch.manual_seed(11)
    want = ref.generate(prompt, max_new_tokens=L + 3, max_denoising_steps=5, t_min=0.3, t_max=1.1,
                        sampler_config=EntropyBoundSamplerConfig(entropy_bound=2.5)).sequences[0, 9:].tolist()
    done = run_ours(ours, prompt, 11, max_new_tokens=L + 3, max_denoising_steps=5, t_min=0.3, t_max=1.1,
                    entropy_bound=2.5)[-1]
    assert len(want) == 2 * L  # whole canvases, not cut to max_new_tokens
    assert done.token_ids == want
