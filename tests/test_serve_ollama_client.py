"""dg serve's Ollama API driven by the official `ollama` Python client (what Open WebUI-style tools
use): list, chat (whole and streamed), generate; seeded answers equal dgcli.generate's."""

import ollama
import pytest

import dgcli
from serve_helpers import Served

OPTIONS = {"seed": 5, "num_predict": 32, "max_denoising_steps": 4}


@pytest.fixture(scope="module")
def client(tiny):
    with Served(*tiny) as s:
        yield ollama.Client(host=s.url, timeout=60)


def want(tiny, prompt, **kw):
    return dgcli.generate(*tiny, prompt, seed=5, max_new_tokens=32, max_denoising_steps=4, **kw)


def test_list_and_chat(tiny, client):
    assert [m.model for m in client.list().models] == ["tiny"]
    r = client.chat(model="tiny", messages=[{"role": "user", "content": "hello there"}], options=OPTIONS)
    assert r.message.role == "assistant" and r.message.content == want(tiny, "hello there")
    assert r.done and r.eval_count > 0 and r.prompt_eval_count > 0


def test_streamed_chat_joins_to_the_same_answer(tiny, client):
    parts = list(client.chat(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                             options=OPTIONS, stream=True))
    assert "".join(p.message.content for p in parts) == want(tiny, "hello there")
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])


def test_generate_and_an_unknown_model(tiny, client):
    r = client.generate(model="tiny", prompt="the river", options=OPTIONS)
    assert r.response == want(tiny, "the river")
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "tiny" in str(e.value)
