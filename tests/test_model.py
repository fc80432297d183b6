"""Model pieces that parity tests cannot reach: the experts fallback path, RoPE, the encoder mask."""

import pytest
import torch

from dgcli import model as M


def test_grouped_mm_fallback_matches(tiny, monkeypatch):
    experts = tiny[0].model.model.decoder.layers[0].experts
    E = experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, experts.gate_up_proj.shape[-1], generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(37)])
    weights = torch.rand(37, 2, generator=g)
    fast = experts(x, index, weights)
    monkeypatch.setattr(M, "_grouped_mm_ok", False)
    slow = experts(x, index, weights)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    # and both equal the obvious per-token computation
    want = torch.zeros_like(x)
    for t in range(37):
        for j in range(2):
            e = index[t, j]
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (experts.down_proj[e] @ (torch.nn.functional.gelu(gate, approximate="tanh") * up))
    assert torch.allclose(fast, want, atol=1e-4, rtol=1e-4)


def test_proportional_rope_leaves_unrotated_dims_alone(tiny):
    model = tiny[0].model
    inv = model.inv_freq["full_attention"]
    D = 2 * inv.numel()
    cos, sin = M.rope_cos_sin(inv, torch.arange(5, 9), torch.float32)
    x = torch.randn(1, 4, 1, D)
    y = M.apply_rope(x, cos, sin)
    still = inv == 0
    assert still.any() and not still.all()
    idx = torch.cat([still, still])  # dim i pairs with i + D/2
    assert torch.equal(y[..., idx], x[..., idx])
    assert not torch.allclose(y[..., ~idx], x[..., ~idx])


def test_encoder_window_mask():
    from dgcli.cache import window_mask

    W = 4
    q = torch.arange(6, 10)  # 4 new tokens after 6 cached ones
    mask = window_mask(q, torch.arange(10), W)
    assert mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6]  # q-W < k <= q
    assert mask[3].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert not window_mask(q, torch.tensor([-1, 7]), None)[3, 0]  # empty slots are never visible


@pytest.mark.slow
def test_static_cache_matches_the_reference_cache(tiny):
    """Ring buffers for sliding layers and slack for the canvas give the reference's logits."""
    model = tiny[0].model
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ref, static = model.new_cache(), model.new_cache(static=True, max_tokens=4096)
    prompt = torch.randint(0, cfg.vocab_size, (1, cfg.sliding_window + 37), generator=g)  # > the ring
    for c in (ref, static):
        model.encode(prompt, c)
    for block in range(3):
        canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
        a, b = model.logits(model.decode(canvas, ref)), model.logits(model.decode(canvas, static))
        # key order differs in the ring: rounding only (a wrong window or a leaked canvas is O(1))
        assert (a - b).abs().max() < 1e-3 and (a - b).abs().mean() < 5e-5
        sc = (a / 0.7).to(model.dtype)
        assert (model.logits(model.decode(canvas, ref, sc)) - model.logits(model.decode(canvas, static, sc))).abs().max() < 1e-3
        committed = a.argmax(-1)
        for c in (ref, static):
            model.encode(committed, c)
        short = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)  # a short chat turn
        for c in (ref, static):
            model.encode(short, c)
    assert ref.length == static.length
    assert static.nbytes() < 10 * 2**20
