"""The one rollback protocol of both caches (truncate / mark / rewind / reset), against encoding afresh."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("sdpa_layout")


def logits(model, canvas, cache):
    return model.logits(model.decode(canvas, cache))


@pytest.mark.parametrize("static", [False, True], ids=["reference", "static"])
def test_truncate_and_rewind(tiny, static):
    """Chat rolls the cache back to where a new turn diverges; the result equals encoding afresh."""
    model = tiny[0].model
    W, L, V = model.config.sliding_window, model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, V, (1, W + 50), generator=g)
    answer = torch.randint(0, V, (1, L), generator=g)
    follow = torch.randint(0, V, (1, 30), generator=g)
    canvas = torch.randint(0, V, (1, L), generator=g)

    def fresh_logits(ids):
        fresh = model.new_cache(static=static, max_tokens=2048)
        model.encode(ids, fresh)
        return logits(model, canvas, fresh)

    cache = model.new_cache(static=static, max_tokens=2048, rollback=64)
    model.encode(prompt, cache)
    cache.mark()
    logits(model, canvas, cache)  # a canvas decoded (into the ring, for the static cache), as a generation does
    model.encode(answer, cache)
    if static:  # the static ring keeps 64 more: take back the last 64 answer tokens (pads, say)
        keep = prompt.shape[1] + L - 64
        assert cache.truncate(keep)
        model.encode(follow, cache)
        want = fresh_logits(torch.cat([prompt, answer[:, :L - 64], follow], dim=1))
        assert (logits(model, canvas, cache) - want).abs().max() < 1e-3
    else:  # the reference keeps exactly the last W-1 in its sliding layers: only the last token's own
        assert cache.truncate(cache.length) and not cache.truncate(cache.length - 1)

    # Further back than the rings reach: refused, nothing changed; the mark brings the prompt back.
    before = cache.length
    assert not cache.truncate(prompt.shape[1] + 10)
    assert cache.length == before
    cache.rewind()
    assert cache.length == prompt.shape[1] == cache.marked_length
    model.encode(follow, cache)
    assert (logits(model, canvas, cache) - fresh_logits(torch.cat([prompt, follow], dim=1))).abs().max() < 1e-3
    cache.rewind()  # again: a mark serves several turns
    model.encode(follow, cache)
    assert (logits(model, canvas, cache) - fresh_logits(torch.cat([prompt, follow], dim=1))).abs().max() < 1e-3
    assert cache.truncate(prompt.shape[1] - 20) is static  # before the mark
    if static:
        assert cache.marked_length is None  # its full-layer slots will be overwritten
    assert cache.truncate(0) and cache.length == 0 and cache.marked_length is None
    with pytest.raises(ValueError):
        cache.truncate(1)


def test_reference_cache_truncates_within_its_window(tiny):
    """While the context is shorter than the window, the reference cache can go back anywhere."""
    model = tiny[0].model
    V, L = model.config.vocab_size, model.config.canvas_length
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (1, 60), generator=g)
    canvas = torch.randint(0, V, (1, L), generator=g)
    cache = model.new_cache()
    model.encode(ids, cache)
    assert cache.truncate(25)
    model.encode(ids[:, 25:40], cache)
    fresh = model.new_cache()
    model.encode(ids[:, :40], fresh)
    assert (logits(model, canvas, cache) - logits(model, canvas, fresh)).abs().max() < 1e-4
