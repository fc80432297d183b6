"""Images through the vision tower, against transformers 5.23.0 on tiny random vision checkpoints:
the tower's features bit for bit, the processor's pixels, and whole generations token for token
(several aspect ratios, two images in a message, seeds); the same answer through the API,
`dg run --image` and `dg chat /image`; one-line errors for bad images; the released config's vision keys."""

import json
import shutil

import numpy as np
import pytest
import torch

import vision_reference as vr

import dgcli
from dgcli.events import DoneEvent
from dgcli.images import ImageError, ImageProcessor, encode_prompt, open_image
from dgcli.loader import load_model
from dgcli.model import VISION_PREFIXES

L = 8  # the tiny checkpoints' canvas
SETTINGS = dict(max_new_tokens=3 * L, max_denoising_steps=4)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """(reference model, reference processor, checkpoint path, our engine, our tokenizer)."""
    tok = vr.build_tokenizer()
    ref, _ = vr.build_reference(tokenizer=tok)
    processor = vr.build_processor(tok)
    path = vr.save(ref, tok, processor, tmp_path_factory.mktemp("vision"))
    engine, tokenizer = dgcli.load(str(path), device="cpu")
    return ref, processor, path, engine, tokenizer


def message(*images, text="what is in this picture"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def reference_generate(ref, processor, msgs, seed):
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    torch.manual_seed(seed)
    out = ref.generate(**inputs, **SETTINGS)
    return inputs["input_ids"][0].tolist(), out.sequences[0, n:].tolist()


def ours(engine, tokenizer, msgs, seed):
    events = list(dgcli.stream_generate(engine, tokenizer, msgs, seed=seed, **SETTINGS))
    assert isinstance(events[-1], DoneEvent)
    return events[-1]


# ---- the tower and the processor ----

@pytest.mark.parametrize("kv_heads,clipped", [(2, False), (1, True)])  # plain; grouped K/V with clipped linears
def test_tower_features_bit_identical(tmp_path, kv_heads, clipped):
    tok = vr.build_tokenizer()
    ref, _ = vr.build_reference(seed=3, kv_heads=kv_heads, clipped=clipped, tokenizer=tok)
    processor = vr.build_processor(tok)
    model = load_model(vr.save(ref, tok, processor, tmp_path), device="cpu", dtype=torch.float32)
    assert model.has_vision and model.parameter_counts()["vision"] > 0
    for w, h in ((37, 23), (8, 8), (200, 30), (16, 40)):
        batch = processor.image_processor([vr.picture(w, h, 0), vr.picture(h, w, 1)], return_tensors="pt")
        with torch.no_grad():
            want = ref.model.encoder.get_image_features(batch["pixel_values"], batch["image_position_ids"])
        got = model.image_features(batch["pixel_values"], batch["image_position_ids"])
        assert torch.equal(got, want.pooler_output)


def test_processor_pixels_identical(ckpt, tmp_path):
    from PIL import Image

    _, processor, path, _, _ = ckpt
    mine = ImageProcessor.from_dir(path)
    assert (mine.patch_size, mine.pooling_kernel_size, mine.max_soft_tokens) == (vr.PATCH, vr.POOL, vr.SOFT_TOKENS)
    a = np.array(vr.picture(40, 30, 7, "RGBA"))
    a[..., 3] = np.arange(40)[None, :] * 6  # real transparency: composited onto white
    images = [vr.picture(37, 23, 0), vr.picture(8, 8, 1), vr.picture(300, 17, 2), vr.picture(5, 400, 3),
              vr.picture(31, 29, 5, "L"), vr.picture(1, 1, 6), Image.fromarray(a)]
    for img in images:
        want = processor.image_processor([img], return_tensors="pt")
        got = mine(img)
        assert np.array_equal(want["pixel_values"][0].numpy(), got.pixels)
        assert np.array_equal(want["image_position_ids"][0].numpy(), got.positions)
        assert got.tokens == int(want["num_soft_tokens_per_image"][0])
    # files: decoded, EXIF-rotated and converted as the reference's load_image does
    img = vr.picture(50, 20, 9)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    img.save(tmp_path / "a.jpg", exif=exif)
    img.save(tmp_path / "a.png")
    for f in (tmp_path / "a.jpg", tmp_path / "a.png"):
        want = processor.image_processor([processor.image_processor.fetch_images(str(f))], return_tensors="pt")
        assert np.array_equal(want["pixel_values"][0].numpy(), mine(open_image(f)).pixels)


# ---- whole generations ----

@pytest.mark.parametrize("size,seed", [((37, 23), 0), ((200, 30), 1), ((16, 40), 2)])
def test_generation_token_identical(ckpt, size, seed):
    ref, processor, _, engine, tokenizer = ckpt
    msgs = message(vr.picture(*size, seed))
    ids, want = reference_generate(ref, processor, msgs, seed)
    assert encode_prompt(engine.model, tokenizer, msgs).ids == ids
    assert ours(engine, tokenizer, msgs, seed).token_ids == want


def test_two_images_in_one_message_token_identical(ckpt):
    ref, processor, _, engine, tokenizer = ckpt
    msgs = message(vr.picture(37, 23, 5), vr.picture(20, 50, 6), text="compare them")
    _, want = reference_generate(ref, processor, msgs, 3)
    assert ours(engine, tokenizer, msgs, 3).token_ids == want


def test_system_prompt_and_an_image_between_texts_token_identical(ckpt):
    ref, processor, _, engine, tokenizer = ckpt
    parts = [{"type": "text", "text": "look"}, {"type": "image", "image": vr.picture(50, 19, 7)},
             {"type": "text", "text": "and tell"}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    _, want = reference_generate(ref, processor, msgs, 6)
    assert ours(engine, tokenizer, msgs, 6).token_ids == want
    # the same through the API's system= argument
    events = list(dgcli.stream_generate(engine, tokenizer, msgs[1:], system="be brief", seed=6, **SETTINGS))
    assert events[-1].token_ids == want


def test_text_only_prompt_on_a_vision_config_token_identical(ckpt):
    """A text prompt on a config with use_bidirectional_attention="vision" (the released one's):
    the reference materializes its encoder masks then, as we do."""
    ref, processor, _, engine, tokenizer = ckpt
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    ids, want = reference_generate(ref, processor, msgs, 4)
    assert ours(engine, tokenizer, ids, 4).token_ids == want


def test_the_image_changes_the_answer(ckpt):
    """Ignoring the image (or mixing two up) fails here: two images, the same seed, different answers."""
    ref, processor, _, engine, tokenizer = ckpt
    answers = []
    for img in (vr.picture(30, 30, 11), vr.picture(30, 30, 12)):  # same size: same placeholder ids
        _, want = reference_generate(ref, processor, message(img), 5)
        assert ours(engine, tokenizer, message(img), 5).token_ids == want
        answers.append(want)
    assert answers[0] != answers[1]


def test_same_text_through_api_run_and_chat(ckpt, runner, tmp_path):
    from dgcli.cli import app

    _, _, path, engine, tokenizer = ckpt
    f = tmp_path / "photo.png"
    vr.picture(44, 28, 21).save(f)
    api = dgcli.generate(engine, tokenizer, message(str(f)), seed=2, **SETTINGS)
    flags = ["-m", str(path), "--seed", "2", "--max-tokens", str(3 * L), "--steps", "4"]
    r = runner.invoke(app, ["run", *flags, "--image", str(f), "what is in this picture"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == api.strip()
    r = runner.invoke(app, ["chat", *flags, "--no-canvas"], input=f"/image {f}\nwhat is in this picture\n")
    assert r.exit_code == 0, r.output
    tokens = open_image(f)  # the count the REPL echoes
    n = ImageProcessor.from_dir(path)(tokens).tokens
    assert f"[image: {n} tokens]" in r.stdout
    assert api.strip() in r.stdout


def test_chat_reuses_the_cache_with_an_image_in_the_history(ckpt):
    """Turn 2 reuses turn 1's K/V, image included: the cached prefix equals a fresh prefill's."""
    from dgcli.session import ChatSession

    _, _, _, engine, tokenizer = ckpt
    s = ChatSession(engine, tokenizer, settings=dict(seed=1, **SETTINGS))
    assert s.attach(vr.picture(30, 40, 3)) > 0
    list(s.turn("what is this"))
    list(s.turn("and then"))
    assert s.last_reused > 70  # past the image's span
    ids, _, pixels = s._encode(s.conversation())
    fresh = engine.new_cache()
    dgcli.api.prefill(engine, ids[:s.last_reused], fresh, pixels)
    for i in range(engine.config.num_hidden_layers):
        if engine.config.is_sliding(i):  # keeps only the last window - 1 tokens
            continue
        n = fresh.keys[i].shape[-2]
        assert torch.allclose(s.cache.keys[i][:, :, :n], fresh.keys[i], atol=1e-4)
    saved = s.to_json()
    assert saved["messages"][0]["content"][0] == {"type": "text", "text": "[image]"}  # a PIL image: no path


# ---- errors ----

def test_bad_images_are_one_line_errors(ckpt, tmp_path, runner, monkeypatch):
    from dgcli import images
    from dgcli.cli import app

    _, _, path, engine, tokenizer = ckpt
    good = tmp_path / "ok.png"
    vr.picture(20, 20, 0).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:120])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    cases = [(tmp_path / "missing.jpg", "image not found"), (text, "is not an image"),
             (truncated, "cannot be decoded"), (tmp_path, "is not a file")]
    for f, why in cases:
        r = runner.invoke(app, ["run", "-m", str(path), "--image", str(f), "hi"])
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, r.output
        assert r.output.count("\n") == 1
    monkeypatch.setattr(images, "MAX_PIXELS", 300)
    with pytest.raises(ImageError, match="too large: 20x20 = 400 pixels"):
        open_image(good)
    monkeypatch.undo()
    r = runner.invoke(app, ["chat", "-m", str(path), "--no-canvas"], input=f"/image {text}\n/image\n/show\n")
    assert r.exit_code == 0 and "error: " + str(text) + " is not an image" in r.stdout  # the chat goes on
    assert "usage: /image FILE" in r.stdout and "max_new_tokens" in r.stdout
    r = runner.invoke(app, ["run", "-m", "tiny", "--image", str(good), "hi"])  # no vision tower
    assert r.exit_code == 2 and "no vision tower" in r.output
    r = runner.invoke(app, ["run", "-m", str(path), "--no-vision", "--image", str(good), "hi"])
    assert r.exit_code == 2 and "--no-vision" in r.output
    r = runner.invoke(app, ["run", "-m", str(path), "--raw", "--image", str(good), "hi"])
    assert r.exit_code == 2 and "--image needs the chat template" in r.output
    # more images than the context holds: refused before any compute
    monkeypatch.setattr(engine.model.config, "max_position_embeddings", 200)
    with pytest.raises(dgcli.errors.ContextLengthError, match=r"the 3 image\(s\) take 1\d\d of the prompt"):
        dgcli.generate(engine, tokenizer, message(*[vr.picture(30, 30, i) for i in range(3)]), **SETTINGS)
    with pytest.raises(ImageError, match="placeholder"):  # the placeholder typed in the text
        dgcli.generate(engine, tokenizer, message(str(good), text="look <|image|>"), **SETTINGS)


def test_image_from_bytes(ckpt, tmp_path):
    from dgcli.images import image_from_bytes

    _, _, _, engine, tokenizer = ckpt
    f = tmp_path / "a.png"
    vr.picture(25, 35, 4).save(f)
    a = dgcli.generate(engine, tokenizer, message(image_from_bytes(f.read_bytes())), seed=0, **SETTINGS)
    assert a == dgcli.generate(engine, tokenizer, message(str(f)), seed=0, **SETTINGS)
    with pytest.raises(ImageError, match="is not an image"):
        image_from_bytes(b"GIF89a but not really")
    import random

    rng, data = random.Random(0), f.read_bytes()
    for _ in range(60):  # damaged files: an image or the one-line error, never another exception
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            image_from_bytes(bytes(b[:rng.randrange(len(b) // 2, len(b) + 1)]))
        except ImageError:
            pass


# ---- loading ----

def test_no_vision_and_text_only_exports(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, path, engine, _ = ckpt
    text_only = load_model(path, device="cpu", vision=False)
    assert not text_only.has_vision and text_only.parameter_counts()["vision"] == 0
    assert text_only.parameter_counts()["total"] == engine.model.parameter_counts()["total"]
    # a checkpoint whose vision tensors were dropped (an older dg quantize output) loads text-only
    dest = tmp_path / "stripped"
    shutil.copytree(path, dest)
    weights = load_file(dest / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".vision_tower." not in k and ".embed_vision." not in k},
              dest / "model.safetensors", metadata={"format": "pt"})
    assert not load_model(dest, device="cpu").has_vision
    # half a tower is a broken checkpoint, named
    save_file({k: v for k, v in weights.items() if ".embed_vision." not in k}, dest / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(dgcli.errors.CheckpointError, match="missing tensor.*embed_vision"):
        load_model(dest, device="cpu")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["text_config"]["use_bidirectional_attention"] == "vision"


@pytest.mark.parametrize("clipped", [False, True])
def test_released_config_vision_keys_match_the_reference(clipped):
    """The released config's tower (and with clipped linears: their four bounds each) on `meta`."""
    import copy

    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dgcli.config import ModelConfig
    from dgcli.known import DIFFUSIONGEMMA_26B_A4B
    from dgcli.model import VISION_PREFIXES, DiffusionGemma

    d = copy.deepcopy(DIFFUSIONGEMMA_26B_A4B)
    d["vision_config"]["use_clipped_linears"] = clipped
    with torch.device("meta"):
        ref = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**copy.deepcopy(d)))
        mine = DiffusionGemma(ModelConfig.from_dict(d))
    ref = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith(VISION_PREFIXES)}
    mine = {k: tuple(v.shape) for k, v in mine.state_dict().items() if k.startswith(VISION_PREFIXES)}
    # per layer 7 linears (+ 4 bounds each when clipped) and 6 norms; patch embedder 2, std 2, projection 1
    assert len(ref) == 27 * (13 + 28 * clipped) + 5
    assert mine == ref


def test_static_cache_chunks_never_cut_an_image(ckpt, monkeypatch):
    """A static cache prefills in chunks; a chunk boundary inside an image span moves to its end, so
    the image's tokens still see each other: the same K/V as the reference cache's one pass."""
    from dgcli import engine as engine_mod
    from dgcli.engine import Engine

    _, _, _, engine, tokenizer = ckpt
    enc = encode_prompt(engine.model, tokenizer, message(vr.picture(30, 40, 8), vr.picture(40, 30, 9)))
    ids = torch.tensor([enc.ids])
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 10)  # every image span crosses a boundary
    static = Engine(engine.model, static_cache=True)
    a, b = static.new_cache(max_tokens=256), engine.new_cache()
    static.prefill(ids, a, enc.images)
    engine.prefill(ids, b, enc.images)
    for i in range(engine.config.num_hidden_layers):
        if not engine.config.is_sliding(i):
            n = ids.shape[1]
            assert torch.allclose(a.keys[i][:, :, :n], b.keys[i], atol=1e-5)
            assert torch.allclose(a.values[i][:, :, :n], b.values[i], atol=1e-5)


def test_quantize_carries_the_vision_tower_and_show_counts_it(ckpt, tmp_path, runner):
    from dgcli.cli import app
    from quant.convert import quantize_checkpoint

    _, processor, path, engine, _ = ckpt
    small = quantize_checkpoint(path, tmp_path / "int8", budget_bytes=None, progress=False)  # smallest formats
    big = quantize_checkpoint(path, tmp_path / "bf16", progress=False)  # 18 GB: room for bf16
    tensors = json.loads((small / "dg_manifest.json").read_text())["tensors"]
    linear = "model.encoder.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"
    assert tensors[linear]["format"] == "int8_row"
    assert tensors["model.encoder.embed_vision.embedding_projection.weight"]["format"] == "int8_row"
    assert tensors["model.encoder.vision_tower.patch_embedder.position_embedding_table"]["format"] == "keep"
    assert json.loads((big / "dg_manifest.json").read_text())["groups"]["vision"] == "bf16"
    batch = processor.image_processor([vr.picture(30, 20, 1)], return_tensors="pt")
    want = engine.model.image_features(batch["pixel_values"], batch["image_position_ids"])
    for out, tol in ((small, 0.05), (big, 0.02)):
        q, _ = dgcli.load(str(out), device="cpu")
        got = q.model.image_features(batch["pixel_values"], batch["image_position_ids"])
        assert (got - want).norm() / want.norm() < tol
    assert not dgcli.load(str(small), device="cpu", vision=False)[0].model.has_vision
    r = runner.invoke(app, ["show", str(path), "--json"])
    info = json.loads(r.stdout)
    n = sum(t.numel() for k, t in engine.model.state_dict().items() if k.startswith(VISION_PREFIXES))
    assert info["vision_parameters"] == n and info["parameters"] > n
    assert "vision tower" in runner.invoke(app, ["show", str(path)]).stdout


def test_saved_chat_keeps_image_paths(ckpt, tmp_path):
    from dgcli.errors import DgError
    from dgcli.session import ChatSession

    _, _, _, engine, tokenizer = ckpt
    f = tmp_path / "p.png"
    vr.picture(26, 34, 13).save(f)
    s = ChatSession(engine, tokenizer, settings=dict(seed=0, **SETTINGS))
    list(s.turn("what is it", images=[f]))
    saved = json.loads(json.dumps(s.to_json()))
    assert saved["messages"][0]["content"] == [{"type": "image", "image": str(f)},
                                               {"type": "text", "text": "what is it"}]
    again = ChatSession(engine, tokenizer, settings=dict(seed=0, **SETTINGS))
    again.load_json(saved)
    assert again._encode(again.conversation())[0] == s._encode(s.conversation())[0]
    f.unlink()
    with pytest.raises(DgError, match="image not found"):
        ChatSession(engine, tokenizer).load_json(saved)
