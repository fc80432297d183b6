"""Our model built from the released 26B-A4B config has exactly the reference's weights (text and vision)."""

import pytest
import torch

from dgcli.config import ModelConfig
from dgcli.known import DIFFUSIONGEMMA_26B_A4B
from dgcli.model import DiffusionGemma

VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


@pytest.fixture(scope="module")
def ours():
    with torch.device("meta"):
        return DiffusionGemma(ModelConfig.from_dict(DIFFUSIONGEMMA_26B_A4B))


def reference_checkpoint_keys():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DiffusionGemmaConfig(**DIFFUSIONGEMMA_26B_A4B)
    with torch.device("meta"):
        ref = transformers.DiffusionGemmaForBlockDiffusion(cfg)
    tied = ref.all_tied_weights_keys  # tied copies are not stored in the checkpoint
    return {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in tied}


def test_names_and_shapes_match_the_reference(ours):
    ref = reference_checkpoint_keys()
    assert len(ref) == 1047  # the released checkpoint's key count
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert set(mine) == set(ref)  # the vision tower's keys included (tests/test_vision.py has them alone)
    assert mine == ref


def test_parameter_counts(ours):
    counts = ours.parameter_counts()
    assert counts["total"] + 60 == 25_250_986_812  # + 60 layer scalars (buffers), 25.25B as in the card
    assert abs(counts["active"] - 3.84e9) < 0.02e9


def test_real_config_shapes(ours):
    cfg = ours.config
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]
    layer5 = ours.model.decoder.layers[5].self_attn
    assert layer5.v_proj is None and layer5.head_dim == 512 and layer5.kv_heads == 2
    assert ours.model.decoder.layers[0].self_attn.k_proj.weight.shape == (2048, 2816)
    # proportional RoPE: 64 of 256 frequency pairs rotate, exponent over the full head dim 512
    f = ours.inv_freq["full_attention"]
    assert f.shape == (256,) and (f[64:] == 0).all() and (f[:64] > 0).all()
    assert torch.isclose(f[1], torch.tensor(1e6 ** (-2 / 512)))
