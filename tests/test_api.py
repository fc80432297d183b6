"""The Python API on the built-in tiny model: load, stream_generate, generate."""

import pytest
import torch

import dgcli
from dgcli.api import prompt_ids
from dgcli.errors import EmptyPromptError
from dgcli.events import BlockEvent, DoneEvent, PrefillEvent, StepEvent

FEW_STEPS = 4  # per block: enough for the sampler's schedule and acceptance rules, a fraction of the default 48


def events(tiny, prompt="hi", **kw):
    engine, tok = tiny
    return list(dgcli.stream_generate(engine, tok, prompt, **kw))


def test_event_stream_shape(tiny):
    ev = events(tiny, seed=0, max_new_tokens=600, max_denoising_steps=FEW_STEPS)
    assert isinstance(ev[0], PrefillEvent) and isinstance(ev[-1], DoneEvent)
    done = ev[-1]
    blocks = [e for e in ev if isinstance(e, BlockEvent)]
    steps = [e for e in ev if isinstance(e, StepEvent)]
    assert len(blocks) == done.blocks and [b.steps for b in blocks] == done.steps_per_block
    assert len(steps) == sum(done.steps_per_block)
    L = tiny[0].config.canvas_length
    assert len(done.token_ids) == L * done.blocks
    for s in steps:
        assert len(s.canvas) == len(s.accepted) == len(s.argmax) == len(s.entropy) == L
        assert any(s.accepted)  # the lowest-entropy position is always accepted
        assert 0.4 < s.temperature <= 0.8 + 1e-6
    assert [b.token_ids for b in blocks] == [done.token_ids[i * L:(i + 1) * L] for i in range(done.blocks)]
    assert "".join(b.text for b in blocks).strip() == done.text.strip()
    assert done.seed == 0 and done.settings["seed"] == 0


def test_seed_reproduces_and_differs(tiny):
    engine, tok = tiny
    kw = dict(max_new_tokens=64, max_denoising_steps=FEW_STEPS)
    a = dgcli.generate(engine, tok, "tell me a story", seed=5, **kw)
    b = dgcli.generate(engine, tok, "tell me a story", seed=5, **kw)
    c = dgcli.generate(engine, tok, "tell me a story", seed=6, **kw)
    assert a == b and a != c and a


def test_text_is_cut_at_eos_and_budget(tiny):
    engine, tok = tiny
    done = events(tiny, seed=1, max_new_tokens=10, max_denoising_steps=FEW_STEPS)[-1]
    assert len(done.token_ids) == engine.config.canvas_length  # whole canvas, like the reference
    assert done.generated_tokens <= 10
    eos = engine.sampler_defaults.eos_token_id
    useful = done.token_ids[: done.generated_tokens]
    assert not set(useful) & set(eos)
    assert done.text == tok.decode(useful)
    # EOS ids are only ever followed by pad in a finished block
    for i, t in enumerate(done.token_ids):
        if t in eos and done.finish_reason == "eos":
            assert set(done.token_ids[i + 1:]) <= {0}
            break


def test_prompt_forms_agree(tiny):
    engine, tok = tiny
    ids = prompt_ids(tok, "hello there")
    assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=False).startswith("<bos>")
    msgs = prompt_ids(tok, [{"role": "user", "content": "hello there"}])
    assert ids == msgs
    a = dgcli.generate(engine, tok, "hello there", seed=3, max_new_tokens=32, max_denoising_steps=FEW_STEPS)
    b = dgcli.generate(engine, tok, ids, seed=3, max_new_tokens=32, max_denoising_steps=FEW_STEPS)
    assert a == b
    raw = prompt_ids(tok, "hello there", raw=True)
    assert raw[0] == 2 and len(raw) < len(ids)


def test_chat_template_gemma4_format(tiny):
    _, tok = tiny
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "again"}])
    assert text == ("<bos><|turn>system\nbe brief<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\nhello<turn|>\n"
                    "<|turn>user\nagain<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    thinking = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=True)
    assert thinking.endswith("<|turn>model\n")


def test_cache_reuse_matches_a_fresh_prefill(tiny):
    engine, tok = tiny
    model = engine.model
    first = prompt_ids(tok, "first question")
    full = first + tok.encode("more words here", add_special_tokens=False)
    cache = engine.new_cache()
    engine.prefill(torch.tensor([first]), cache)
    snapshot = (list(cache.keys), list(cache.values), cache.length)
    reused = events(tiny, full[len(first):], cache=cache, seed=9, max_new_tokens=32, max_denoising_steps=FEW_STEPS)
    assert reused[0].prompt_tokens == len(full) - len(first) and reused[0].cached_tokens == len(full)
    fresh_cache = engine.new_cache()
    engine.prefill(torch.tensor([full]), fresh_cache)
    cache.keys, cache.values, cache.length = list(snapshot[0]), list(snapshot[1]), snapshot[2]
    engine.prefill(torch.tensor([full[len(first):]]), cache)
    for a, b in zip(cache.keys, fresh_cache.keys):  # a split prefill is the same prefill, up to rounding
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5
    canvas = torch.randint(0, model.config.vocab_size, (1, model.config.canvas_length))
    split, fresh = (model.logits(model.decode(canvas, c)) for c in (cache, fresh_cache))
    assert (split - fresh).abs().max() < 5e-4  # logits up to 30


def test_bfloat16_generates_reproducibly(tiny_dir):
    engine, tok = dgcli.load(str(tiny_dir), device="cpu", dtype=torch.bfloat16)
    assert engine.dtype == torch.bfloat16 and {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}

    def run():
        return list(dgcli.stream_generate(engine, tok, "hi", seed=0, max_new_tokens=16, max_denoising_steps=2))

    first, again = run(), run()
    done = first[-1]
    assert isinstance(done, DoneEvent) and 1 <= max(done.steps_per_block) <= 2
    assert 0 < done.generated_tokens <= 16 and done.text == tok.decode(done.token_ids[:done.generated_tokens])
    assert [e.token_ids for e in again if isinstance(e, BlockEvent)] == [e.token_ids for e in first
                                                                        if isinstance(e, BlockEvent)]
    assert again[-1].text == done.text


def test_bad_input(tiny):
    engine, tok = tiny
    with pytest.raises(EmptyPromptError, match="empty prompt") as e:
        dgcli.generate(engine, tok, [])
    assert e.value.exit_code == 2
    with pytest.raises(dgcli.errors.ConfigError, match="max_new_tokens"):
        dgcli.generate(engine, tok, "hi", max_new_tokens=0)


def test_closing_the_stream_cancels(tiny):
    engine, tok = tiny
    gen = dgcli.stream_generate(engine, tok, "hi", seed=0, max_new_tokens=2000)
    seen = [next(gen) for _ in range(3)]
    gen.close()
    assert isinstance(seen[1], StepEvent)
    with pytest.raises(StopIteration):
        next(gen)
