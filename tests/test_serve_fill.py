"""dg serve fills templates (issue 13): `response_format` json_schema through the official `openai`
client, `dg_schema`, `dg_template`, vLLM's `diffusion_seed_canvas` + `diffusion_pinned`, Ollama's
`format`; the same text as dgcli.fill with the same seed and settings, streamed or not; bad
templates and schemas are a 400 JSON error and the server keeps answering."""

import json
import re

import httpx
import jsonschema
import pytest

import dgcli
from dgcli.filling import template_from

STEPS = {"max_denoising_steps": 4}
SCHEMA = {"type": "object", "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
                         "pet": {"enum": ["cat", "dog"]}, "vaccinated": {"type": "boolean"}}}
TEMPLATE = "Name: {{name:text:3}}. Age: {{age:int:2}}. Likes {{choice:tea|coffee}}."


@pytest.fixture
def h(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat(text):
    return [{"role": "user", "content": text}]


def test_response_format_schema_via_openai_equals_fill(tiny, client):
    want = dgcli.fill(*tiny, "a person", SCHEMA, seed=4, **STEPS).text
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=chat("a person"), seed=4, response_format=fmt,
                                       extra_body=STEPS)
    text = r.choices[0].message.content
    assert text == want and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = list(client.chat.completions.create(model="tiny", messages=chat("a person"), seed=4, stream=True,
                                                 response_format=fmt, extra_body=STEPS))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_dg_template_keeps_its_fixed_text_and_streams_the_pins(tiny, h):
    body = {"model": "tiny", "messages": chat("a form"), "seed": 2, "dg_template": TEMPLATE, **STEPS}
    r = h.post("/v1/chat/completions", json=body).json()
    text = r["choices"][0]["message"]["content"]
    assert text == dgcli.fill(*tiny, "a form", TEMPLATE, seed=2, **STEPS).text
    assert re.fullmatch(r"Name: .*\. Age: \d+\. Likes (tea|coffee)\.", text, re.S)
    live = h.post("/v1/chat/completions", json={**body, "stream": True, "dg_canvas": True}).text
    frames = [json.loads(b.split("data: ", 1)[1]) for b in live.split("\n\n") if b.startswith("event: canvas")]
    assert frames and all(len(f["pinned"]) == len(f["accepted"]) for f in frames)
    assert len({f["pinned"] for f in frames}) == 1 and "1" in frames[0]["pinned"]  # the same pins every step


def test_dg_schema_on_completions_and_ollama_format(tiny, h):
    want = dgcli.fill(*tiny, "a person", SCHEMA, raw=True, seed=1, **STEPS).text
    r = h.post("/v1/completions", json={"model": "tiny", "prompt": "a person", "seed": 1, "dg_schema": SCHEMA,
                                        **STEPS}).json()
    assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop"
    want = dgcli.fill(*tiny, "a person", SCHEMA, seed=1, **STEPS).text
    body = {"model": "tiny", "messages": chat("a person"), "format": SCHEMA, "options": {"seed": 1, **STEPS}}
    lines = [json.loads(x) for x in h.post("/api/chat", json=body).text.splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == want and lines[-1]["done_reason"] == "stop"
    r = h.post("/api/generate", json={"model": "tiny", "prompt": "a person", "format": SCHEMA, "stream": False,
                                      "options": {"seed": 1, **STEPS}}).json()
    assert r["response"] == want
    jsonschema.validate(json.loads(want), SCHEMA)


def test_vllm_token_arrays(tiny, h):
    engine, tok = tiny
    head, tail = tok.encode("Answer:", add_special_tokens=False), tok.encode(" done.", add_special_tokens=False)
    canvas = head + [0] * 5 + tail
    pinned = [True] * len(head) + [False] * 5 + [True] * len(tail)
    want = dgcli.fill(*tiny, "q", template_from(seed_canvas=canvas, pinned=pinned), seed=6, **STEPS).text
    assert want.startswith(tok.decode(head)) and want.endswith(tok.decode(tail))  # the pinned tokens, as they read
    for where in ("vllm_xargs", None):
        arrays = {"diffusion_seed_canvas": canvas, "diffusion_pinned": pinned}
        extra = {"vllm_xargs": {**arrays, **STEPS}} if where else {**arrays, **STEPS}
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": chat("q"), "seed": 6, **extra}).json()
        assert r["choices"][0]["message"]["content"] == want


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"dg_template": "{{text:0}}"}, "dg_template"),
    ("/v1/chat/completions", {"dg_template": "a {{nope:3}}"}, "dg_template"),
    ("/v1/chat/completions", {"dg_schema": {"type": "object", "properties": {"a": {}}}}, "dg_schema"),
    ("/v1/chat/completions", {"dg_schema": "not an object"}, "dg_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"dg_template": "{{text:2}}", "dg_schema": SCHEMA}, "dg_schema"),
    ("/v1/chat/completions", {"vllm_xargs": {"diffusion_seed_canvas": [1, 2], "diffusion_pinned": [True]}},
     "vllm_xargs.diffusion_seed_canvas"),
    ("/v1/chat/completions", {"dg_template": "{{text:9000}}"}, "dg_template"),  # longer than the context
    ("/v1/chat/completions", {"dg_template": "{{text:8000}}"}, "dg_template"),  # with the prompt, too long
    ("/v1/completions", {"dg_template": "{{choice:}}"}, "dg_template"),
])
def test_bad_templates_are_400_and_the_server_answers_on(h, path, extra, param):
    body = {"model": "tiny", **({"messages": chat("hi")} if "chat" in path else {"prompt": "hi"}), **extra}
    r = h.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"] and "Traceback" not in err["message"]
    r = h.post(path, json={**body, "max_tokens": 8, "max_denoising_steps": 1, "dg_template": None, "dg_schema": None,
                           "response_format": None, "vllm_xargs": None})
    assert r.status_code == 200


def test_ollama_bad_format_is_its_400(h):
    for fmt in ("json", 7, {"type": "object", "properties": {"a": {}}}):
        r = h.post("/api/chat", json={"model": "tiny", "messages": chat("hi"), "format": fmt})
        assert r.status_code == 400 and isinstance(r.json()["error"], str) and "format" in r.json()["error"]
