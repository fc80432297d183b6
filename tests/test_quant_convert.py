"""`quantize_checkpoint` end to end: output layout, loading, quality and errors (the subprocess tests,
interruption and peak memory, are in test_quant_process.py)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dgcli
from dgcli import store, tiny
from dgcli.config import FULL, SLIDING, ModelConfig
from dgcli.errors import CheckpointError, DgError
from quant import convert
from quant.convert import OutputExistsError, quantize_checkpoint
from quant.planner import BudgetError
from quant.runtime import Packed, prepare_quantized


def write_checkpoint(dest: Path, seed=0, hidden=128, layers=3, experts=8, moe=64, vocab=512, realistic=False):
    """A random checkpoint in the official layout (config, generation config, tokenizer of tiny, weights)."""
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                num_global_key_value_heads=1, sliding_window=64, layer_types=[SLIDING] * (layers - 1) + [FULL],
                num_experts=experts, top_k_experts=2, moe_intermediate_size=moe, pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    cfg = dict(architectures=["DiffusionGemmaForBlockDiffusion"], canvas_length=32, eos_token_id=[1],
               dtype="float32", text_config=text)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg))
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    config = ModelConfig.from_dict(cfg)
    w = tiny.random_weights(config, seed)
    if realistic:  # scaled like a trained model: soft attention, a decided router, logits of std ~4
        for k, v in w.items():
            if k.endswith("embed_tokens.weight"):
                w[k] = v * 4 / hidden**0.5
            elif k.endswith("router.proj.weight"):
                w[k] = v * 2 * hidden**0.5
            elif k.endswith(("q_norm.weight", "k_norm.weight")):
                w[k] = v * v.shape[0] ** -0.25
    save_file(w, str(dest / "model.safetensors"))
    return dest


def load_quantized(path):
    """The model of a dg quantize output, as dgcli.load builds it (the loader's prepare hook)."""
    return dgcli.loader.load_model(path, device="cpu", prepare=prepare_quantized)


def decode_logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=g)
    cache = model.new_cache()
    model.encode(ids, cache)
    canvas = torch.randint(0, model.config.vocab_size, (1, model.config.canvas_length), generator=g)
    first = model.logits(model.decode(canvas, cache))
    return first, model.logits(model.decode(canvas, cache, first))  # and a step with self-conditioning


def assert_same_as_dequantized(model, fake):
    """Equal to the dequantized model: exactly as arithmetic goes for a step without self-conditioning;
    with it, the int8 soft embedding scales the probabilities rather than the weights (the same sum,
    rounded otherwise: ~3e-7 relative at its output), which the layers amplify to ~1e-5 of the logits."""
    (a1, a2), (b1, b2) = decode_logits(model), decode_logits(fake)
    torch.testing.assert_close(a1, b1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a2, b2, rtol=1e-4, atol=2e-3)
    assert (a2 - b2).norm() < 1e-4 * b2.norm()


def fake_quant(model, quantized):
    """The original model with each weight replaced by its dequantized copy."""
    fq = copy.deepcopy(model)
    params = dict(fq.named_parameters())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, Packed):
                params[name].copy_(m.dequantize(torch.float32))
    return fq


@pytest.fixture(scope="module")
def q_tiny(tiny_dir, tmp_path_factory):
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("q") / "tiny-int4", budget_bytes=None,
                               progress=False)


def test_output_layout_and_manifest(q_tiny, tiny_dir):
    names = sorted(p.name for p in q_tiny.iterdir())
    assert names == ["chat_template.jinja", "config.json", "dg_manifest.json", "generation_config.json",
                     "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json"]
    m = json.loads((q_tiny / "dg_manifest.json").read_text())
    assert m["format"] == "dg-quant" and m["format_version"] == 1 and m["dg_version"] == dgcli.__version__
    assert m["groups"] == {"experts": "int4_sym_g64", "dense": "int8_row", "embedding": "int8_row"}
    t = m["tensors"]
    assert t["model.decoder.layers.0.experts.gate_up_proj"]["format"] == "int4_sym_g64"
    assert t["model.decoder.layers.0.experts.down_proj"]["format"] == "int8_row"  # K=32: no group of 64
    assert t["model.decoder.layers.0.router.proj.weight"]["format"] == "keep"
    assert m["source"]["path"] == str(tiny_dir.resolve())
    assert set(m["shards"]) == {"model-00001-of-00001.safetensors"}
    assert len(m["shards"]["model-00001-of-00001.safetensors"]["sha256"]) == 64
    wm = json.loads((q_tiny / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.decoder.layers.0.experts.gate_up_proj.qweight" in wm
    assert "model.decoder.embed_tokens.weight.scales" in wm and "model.decoder.embed_tokens.weight" not in wm
    assert (q_tiny / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()


@pytest.mark.slow
def test_loads_generates_and_equals_the_dequantized_model(q_tiny, tiny):
    engine, tok = dgcli.load(str(q_tiny), device="cpu")
    model = engine.model
    emb = model.model.decoder.embed_tokens
    assert type(emb).__name__ == "QuantEmbedding" and emb.weight.qweight.dtype == torch.int8
    assert emb.weight.scales.dtype == torch.float16  # the loader kept the stored dtype
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    text = dgcli.generate(engine, tok, "hello there", seed=0, max_new_tokens=32)
    assert isinstance(text, str) and text
    ref = tiny[0].model
    assert_same_as_dequantized(model, fake_quant(ref, model))


def test_quality_on_a_realistically_scaled_model(tmp_path):
    src = write_checkpoint(tmp_path / "src", realistic=True)
    out = quantize_checkpoint(src, tmp_path / "q", budget_bytes=None, progress=False)
    ref = dgcli.loader.load_model(src, device="cpu")
    q = load_quantized(out)
    a, b = decode_logits(ref)[1], decode_logits(q)[1]
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (pa.exp() * (pa - pb)).sum(-1).mean()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert kl < 0.05 and top1 > 0.9, (kl, top1)


def test_nf4_scheme_loads_and_runs(tiny_dir, tmp_path, tiny):
    pytest.importorskip("bitsandbytes")
    out = quantize_checkpoint(tiny_dir, tmp_path / "nf4", scheme="nf4", budget_bytes=None, progress=False)
    model = load_quantized(out)
    q = model.model.decoder.layers[0].self_attn.q_proj.weight
    assert q.format.name == "nf4_g64" and q.scales.dtype == torch.float32
    assert_same_as_dequantized(model, fake_quant(tiny[0].model, model))


def test_default_budget_upgrades_dense_and_embedding_on_a_small_model(tiny_dir, tmp_path):
    out = quantize_checkpoint(tiny_dir, tmp_path / "q", progress=False)  # 18 GB is plenty for tiny
    m = json.loads((out / "dg_manifest.json").read_text())
    assert m["groups"] == {"experts": "int4_sym_g64", "dense": "bf16", "embedding": "bf16"}
    model = load_quantized(out)
    assert isinstance(model.model.decoder.layers[0].self_attn.q_proj, torch.nn.Linear)
    decode_logits(model)


def test_corrupted_shard_is_a_clear_error(q_tiny, tmp_path):
    bad = shutil.copytree(q_tiny, tmp_path / "bad")
    shard = bad / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        dgcli.load(str(bad))


def test_unknown_format_version_and_missing_shard(q_tiny, tmp_path):
    bad = shutil.copytree(q_tiny, tmp_path / "v2")
    m = json.loads((bad / "dg_manifest.json").read_text())
    m["format_version"] = 2
    (bad / "dg_manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 2"):
        dgcli.load(str(bad))
    gone = shutil.copytree(q_tiny, tmp_path / "gone")
    (gone / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError):
        dgcli.load(str(gone))


def test_user_errors(q_tiny, tiny_dir, tmp_path):
    with pytest.raises(OutputExistsError, match="--force"):
        quantize_checkpoint(tiny_dir, q_tiny, budget_bytes=None, progress=False)
    with pytest.raises(DgError, match="unknown quantization scheme 'int3'"):
        quantize_checkpoint(tiny_dir, tmp_path / "x", scheme="int3", progress=False)
    with pytest.raises(BudgetError) as exc:  # 0.5 GiB of CUDA context alone exceeds it
        quantize_checkpoint(tiny_dir, tmp_path / "x", budget_bytes=100_000_000, progress=False)
    assert "total" in exc.value.hint
    with pytest.raises(DgError, match="already quantized"):
        quantize_checkpoint(q_tiny, tmp_path / "x", budget_bytes=None, progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))


def test_force_replaces_and_default_out_is_in_models_dir(tiny_dir, tmp_path):
    out = tmp_path / "q"
    (out).mkdir()
    (out / "junk").write_text("old")
    (out / "dg_manifest.json").write_text("{}")  # --force replaces only a dg quantize output
    quantize_checkpoint(tiny_dir, out, budget_bytes=None, force=True, progress=False)
    assert not (out / "junk").exists() and (out / "dg_manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    default = quantize_checkpoint("tiny", None, scheme="int4", budget_bytes=None, progress=False)
    assert default == store.models_dir() / f"{tiny_dir.name}-int4"
    assert dgcli.load(str(default))[0] is not None
    shutil.rmtree(default)


def test_many_shards(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 100_000)
    out = quantize_checkpoint(tiny_dir, tmp_path / "q", budget_bytes=None, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert len(json.loads((out / "dg_manifest.json").read_text())["shards"]) == len(shards)
    load_quantized(out)


def test_failure_midway_leaves_nothing_loadable(tiny_dir, tmp_path, monkeypatch):
    real, calls = convert.convert_tensor, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 40:
            raise OSError(28, "No space left on device")  # ENOSPC
        return real(*a, **k)

    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 50_000)
    monkeypatch.setattr(convert, "convert_tensor", failing)
    with pytest.raises(DgError, match="no space left"):
        quantize_checkpoint(tiny_dir, tmp_path / "q", budget_bytes=None, progress=False)
    assert list(tmp_path.iterdir()) == []
