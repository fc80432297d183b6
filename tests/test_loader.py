"""Loader errors: every broken checkpoint gives one clear line naming what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgcli
from dgcli.errors import CheckpointError, ConfigError, ModelNotFoundError
from dgcli.loader import load_model


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dest)
    return dest


def split_into_shards(path):
    """Rewrite model.safetensors as two shards with an index, as large checkpoints are stored."""
    sd = load_file(path / "model.safetensors")
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, path / name)
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return list(halves)


def test_sharded_checkpoint_loads_identically(ckpt, tiny):
    split_into_shards(ckpt)
    model = load_model(ckpt, device="cpu")
    ours, ref = model.state_dict(), tiny[0].model.state_dict()
    assert sorted(ours) == sorted(ref)
    for k, a in ours.items():
        assert torch.equal(a, ref[k]), k


def test_missing_shard(ckpt):
    names = split_into_shards(ckpt)
    (ckpt / names[1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{names[1]}.*dg pull"):
        load_model(ckpt, device="cpu")


def test_truncated_shard(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(ckpt, device="cpu")


def test_garbage_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(ckpt, device="cpu")


def test_wrong_shape_is_named(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.decoder.layers.1.router.proj.weight"] = torch.zeros(3, 3)
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.router\.proj\.weight.*shape \[3, 3\]"):
        load_model(ckpt, device="cpu")


def test_missing_and_unknown_tensors_are_named(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.decoder.norm.weight"]
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.decoder\.norm\.weight"):
        load_model(ckpt, device="cpu")
    sd["model.decoder.norm.weight"] = torch.ones(64)
    sd["model.decoder.surprise"] = torch.ones(2)
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.decoder.surprise'"):
        load_model(ckpt, device="cpu")


def test_vision_tensors_are_skipped(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.encoder.vision_tower.patch_embedder.weight"] = torch.ones(4, 4)
    save_file(sd, ckpt / "model.safetensors")
    assert load_model(ckpt, device="cpu") is not None


def test_missing_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["text_config"]["num_experts"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_experts"):
        load_model(ckpt, device="cpu")


def test_no_weights_and_only_safetensors_are_read(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not a pickle we would ever open")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(ckpt, device="cpu")


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="dg pull"):
        dgcli.load("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="no model named"):
        dgcli.load("definitely-not-a-model")


def test_dtype_override(tiny_dir):
    m = load_model(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert m.model.decoder.layers[0].experts.gate_up_proj.dtype == torch.bfloat16


def test_too_big_for_the_gpu_is_refused_with_numbers(tiny_dir, monkeypatch):
    from dgcli import loader
    from dgcli.errors import DgError

    with torch.device("meta"):
        from dgcli.config import ModelConfig
        from dgcli.model import DiffusionGemma

        model = DiffusionGemma(ModelConfig.from_file(tiny_dir / "config.json"))
    plan = loader.index_shards(tiny_dir, {k: v.shape for k, v in model.state_dict().items()})
    need = loader.weight_bytes(plan, torch.float32)
    assert abs(need - (tiny_dir / "model.safetensors").stat().st_size) < 100_000  # fp32 as stored
    assert loader.weight_bytes(plan, torch.bfloat16) < 0.6 * need
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(1e9), int(24e9)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU 24GB")
    with pytest.raises(DgError, match=r"needs about .* GB.*FakeGPU 24GB has 1.0 of 24.0 GB free.*dg quantize"):
        loader.check_fits(int(50e9), torch.device("cuda"))
    loader.check_fits(int(50e9), torch.device("cpu"))  # the CPU is not checked
