"""dg serve takes images (issue 16): OpenAI `image_url` parts with data: URLs and Ollama's `images`
(base64) give the same text as dgcli.generate with an image part (= `dg run --image`, tests/test_vision.py);
the KV cache is reused only where the images are the same; a remote URL, bad base64, something that
is not an image, one over the pixel limit, or a model without a vision tower is a 400 with one line."""

import base64
import io

import httpx
import openai
import pytest

import vision_reference as vr

import dgcli
from serve_helpers import Served

L = 8  # the tiny vision checkpoint's canvas
STEPS = {"max_new_tokens": 3 * L, "max_denoising_steps": 2}  # 2: reused and fresh prefills agree (test_serve)
BODY = {"max_tokens": 3 * L, "max_denoising_steps": 2}
Q = "what is in this picture"


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """(engine, tokenizer, server) for a tiny random checkpoint with a vision tower."""
    tok = vr.build_tokenizer()
    ref, _ = vr.build_reference(tokenizer=tok)
    path = vr.save(ref, tok, vr.build_processor(tok), tmp_path_factory.mktemp("vision"))
    engine, tokenizer = dgcli.load(str(path), device="cpu")
    with Served(engine, tokenizer, name="vis") as s:
        yield engine, tokenizer, s


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two PNG files of the same size (the same placeholder ids) and different pixels."""
    d = tmp_path_factory.mktemp("photos")
    out = []
    for seed in (21, 22):
        f = d / f"p{seed}.png"
        vr.picture(44, 28, seed).save(f)
        out.append(f)
    return out


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def openai_msg(path, text=Q):
    url = "data:image/png;base64," + b64(path)
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def api_msg(path, text=Q):
    return {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": text}]}


def test_same_image_same_text_as_the_api(vision, photos):
    engine, tok, s = vision
    want = dgcli.generate(engine, tok, [api_msg(photos[0])], seed=3, **STEPS)
    assert want != dgcli.generate(engine, tok, [api_msg(photos[1])], seed=3, **STEPS)  # the image matters
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="vis", messages=[openai_msg(photos[0])], seed=3, extra_body=BODY)
    assert r.choices[0].message.content == want
    chunks = client.chat.completions.create(model="vis", messages=[openai_msg(photos[0])], seed=3, stream=True,
                                            extra_body=BODY)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    opts = {"seed": 3, "num_predict": 3 * L, "max_denoising_steps": 2}
    with httpx.Client(base_url=s.url, timeout=60) as h:
        r = h.post("/api/chat", json={"model": "vis", "stream": False, "options": opts, "messages": [
            {"role": "user", "content": Q, "images": [b64(photos[0])]}]})
        assert r.json()["message"]["content"] == want
        r = h.post("/api/generate", json={"model": "vis", "stream": False, "options": opts, "prompt": Q,
                                          "images": [b64(photos[0])]})
        assert r.json()["response"] == want


def test_cache_reused_only_with_the_same_image(vision, photos):
    engine, tok, s = vision
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def ask(msgs):
        r = client.chat.completions.create(model="vis", messages=msgs, seed=1, extra_body=BODY)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    first, _ = ask([openai_msg(photos[0])])
    turn2 = [openai_msg(photos[0]), {"role": "assistant", "content": first}, {"role": "user", "content": "and then"}]
    second, _ = ask(turn2)  # marks the end of its history: the next turn comes back to it
    more = [{"role": "assistant", "content": second}, {"role": "user", "content": "more"}]
    for photo, reused in ((photos[1], False), (photos[0], True)):
        # the same token ids either way: only the pixels tell the two conversations apart
        text, cached = ask([openai_msg(photo), *turn2[1:], *more])
        assert text == dgcli.generate(engine, tok, [api_msg(photo), *turn2[1:], *more], seed=1, **STEPS)
        assert (cached > 0) == reused
        if not reused:
            ask(turn2)  # the previous request again


def png(w, h, mode="1") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_400_and_the_server_answers_on(vision, photos, tiny):
    _, _, s = vision
    bad_urls = {
        "https://example.com/cat.png": "never fetches",
        "data:image/png;base64,@@@": "not valid base64",
        "data:image/png," + "abc": "base64 data: URL",
        "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(): "not an image",
        "data:image/png;base64," + base64.b64encode(png(9000, 9000)).decode(): "too large",
    }
    with httpx.Client(base_url=s.url, timeout=60) as h:
        for url, why in bad_urls.items():
            part = {"type": "image_url", "image_url": {"url": url}}
            r = h.post("/v1/chat/completions", json={"model": "vis", "messages": [
                {"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]})
            assert r.status_code == 400, (url[:40], r.text)
            msg = r.json()["error"]["message"]
            assert why in msg and "\n" not in msg, msg
        for images, why in (([b64(photos[0])[:-3] + "!!!"], "not valid base64"), (["https://x/y.png"], "never fetches"),
                            ("notalist", "list")):
            r = h.post("/api/chat", json={"model": "vis", "messages": [{"role": "user", "content": "hi",
                                                                        "images": images}]})
            assert r.status_code == 400 and why in r.json()["error"], r.text
        r = h.post("/api/generate", json={"model": "vis", "prompt": "hi", "raw": True, "images": [b64(photos[0])]})
        assert r.status_code == 400 and "raw" in r.json()["error"]
        r = h.post("/v1/chat/completions", json={"model": "vis", "messages": [openai_msg(photos[0])], **BODY})
        assert r.status_code == 200  # still serving
    with Served(*tiny) as t, httpx.Client(base_url=t.url, timeout=60) as h:  # a model without a vision tower
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": [openai_msg(photos[0])]})
        assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"]
