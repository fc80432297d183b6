"""Model pieces that parity tests cannot reach: the experts fallback path, RoPE, the encoder mask."""

import torch

from dgcli import model as M


def test_grouped_mm_fallback_matches(tiny, monkeypatch):
    experts = tiny[0].model.decoder.layers[0].experts
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
    model = tiny[0]
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


def test_encoder_mask_window(tiny):
    attn = next(l.self_attn for l in tiny[0].model.decoder.layers if l.self_attn.sliding)
    W = attn.window
    causal, mask = attn.encoder_mask(4, W + 2, "cpu")  # 4 new tokens after W+2 cached ones
    assert not causal and mask.shape == (4, W + 6)
    q = W + 2  # the first new token's position
    assert mask[0].nonzero().flatten().tolist() == list(range(q - W + 1, q + 1))
    assert attn.encoder_mask(3, 0, "cpu") == (True, None)  # short first prefill: plain causal
