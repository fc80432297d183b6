"""dg quantize end to end on the tiny model, the packed formats, and the planner on the real config."""

import json

import pytest
import torch

import dgcli
from dgcli.config import ModelConfig
from dgcli.errors import CheckpointError, DgError
from dgcli.known import DIFFUSIONGEMMA_26B_A4B
from kernels.moe_int4 import unpack_int4 as kernel_unpack
from quant.convert import quantize_checkpoint
from quant.formats import dequantize_int4, dequantize_int8_row, quantize_int4_sym, quantize_int8_row
from quant.planner import plan


def test_int4_format_matches_the_kernels_reading_of_it():
    w = torch.randn(3, 8, 128)
    packed = quantize_int4_sym(w)
    assert packed["qweight"].dtype == torch.uint8 and packed["qweight"].shape == (3, 8, 64)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (3, 8, 2)
    deq = dequantize_int4(packed["qweight"], packed["scales"])
    assert torch.equal(deq, kernel_unpack(packed["qweight"], packed["scales"]).float())
    step = packed["scales"].float().abs().repeat_interleave(64, -1)
    assert (deq - w).norm() / w.norm() < 0.15  # int4 at group 64: about 0.1 relative error
    assert (deq - w).abs().mean() < 0.3 * step.mean()


def test_int8_rows():
    w = torch.randn(16, 64)
    p = quantize_int8_row(w)
    assert p["qweight"].dtype == torch.int8
    deq = dequantize_int8_row(p["qweight"], p["scales"])
    assert ((deq - w).abs() <= p["scales"].float()[:, None] / 2 + 1e-6).all()


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    return quantize_checkpoint(str(tiny_dir), out, progress=False)


def test_quantized_tiny_loads_and_stays_close(quantized, tiny):
    model, tok = dgcli.load(str(quantized), device="cpu")
    ref, _ = tiny
    manifest = json.loads((quantized / "dg_manifest.json").read_text())
    assert manifest["shards"] and all(len(v["sha256"]) == 64 for v in manifest["shards"].values())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ref.config.vocab_size, (1, 40), generator=g)
    canvas = torch.randint(0, ref.config.vocab_size, (1, ref.config.canvas_length), generator=g)
    bf16 = dgcli.load("tiny", device="cpu", dtype=torch.bfloat16)[0]
    logits = {}
    for name, m in (("fp32", ref), ("bf16", bf16), ("int4", model)):
        c = m.new_cache()
        m.encode(prompt, c)
        logits[name] = m.decode(canvas, c)
    # The random tiny model is very sensitive (bf16 alone moves its logits a lot): the quantized
    # model must stay in the same range as a plain bf16 copy, which a broken format would not.
    err = {k: (logits[k] - logits["fp32"]).abs().mean() for k in ("bf16", "int4")}
    assert err["int4"] < 2 * err["bf16"], err
    assert dgcli.generate(model, tok, "hi", seed=0, max_new_tokens=16)


def test_corrupt_shard_and_existing_output(quantized, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(quantized, copy)
    shard = next(copy.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        dgcli.load(str(copy), device="cpu")
    with pytest.raises(DgError, match="exists|--force"):
        quantize_checkpoint("tiny", copy, progress=False)


def test_planner_real_config_fits_18gb_at_32k():
    config = ModelConfig.from_dict(DIFFUSIONGEMMA_26B_A4B)
    _, est = plan(config, "int4", context=32768, budget_bytes=None)
    assert est.total < 18e9
    assert abs(est.weights - 14.56e9) < 0.3e9  # quant.md's S3 row
