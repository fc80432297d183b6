"""dg serve against a real uvicorn server on 127.0.0.1: the official `openai` client and raw httpx
for OpenAI's API, Ollama's API, seeded answers equal to dgcli.generate (= `dg run --seed`), the
queue (FIFO, bounded, 429; clients that leave), KV reuse across a conversation, and every bad input
answered with its status and a JSON error while the server keeps serving."""

import json
import threading
import time

import httpx
import openai
import pytest

import dgcli
from dgcli.api import prompt_ids
from serve_helpers import Served

FAST = {"max_tokens": 32, "max_denoising_steps": 4}
ENGINE_FAST = {"max_new_tokens": 32, "max_denoising_steps": 4}
# Never settles (1024 equal steps in a row are needed): only ever cancelled.
LONG = {"max_tokens": 4096, "max_denoising_steps": 1024, "stability_threshold": 1024}


def chat(text):
    return [{"role": "user", "content": text}]


def expected(tiny, prompt, seed, **kw):
    return dgcli.generate(*tiny, prompt, seed=seed, **ENGINE_FAST, **kw)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_seeded_chat_equals_dg_run_streamed_or_not(tiny, server, client):
    want = expected(tiny, "hello there", 5)
    r = client.chat.completions.create(model="tiny", messages=chat("hello there"), seed=5, extra_body=FAST)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(prompt_ids(tiny[1], "hello there")) and r.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny", messages=chat("hello there"), seed=5, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=FAST))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_temperature_is_the_cli_shorthand_and_max_tokens_counts(tiny, client):
    want = expected(tiny, "rain", 2, t_max=1.2, t_min=0.6)
    r = client.chat.completions.create(model="tiny", messages=chat("rain"), seed=2, temperature=1.2,
                                       max_completion_tokens=32, extra_body={"max_denoising_steps": 4})
    assert r.choices[0].message.content == want
    short = client.chat.completions.create(model="tiny", messages=chat("rain"), seed=2, max_tokens=3,
                                           extra_body={"max_denoising_steps": 4})
    assert short.usage.completion_tokens <= 3


def test_three_concurrent_seeded_requests_get_their_sequential_answers(tiny, server, client):
    prompts = ["one", "two words", "three little words"]
    want = [expected(tiny, p, 10 + i) for i, p in enumerate(prompts)]
    got = [None] * 3

    def ask(i):
        got[i] = client.chat.completions.create(model="tiny", messages=chat(prompts[i]), seed=10 + i,
                                                extra_body=FAST).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_raw_completion_equals_dg_run_raw(tiny, client):
    want = expected(tiny, "the river", 4, raw=True)
    r = client.completions.create(model="tiny", prompt="the river", seed=4, extra_body=FAST)
    assert r.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the river", seed=4, stream=True, extra_body=FAST) if c.choices)
    assert streamed == want


def test_stop_strings_cut_the_answer(tiny, client):
    full = expected(tiny, "hello there", 5)
    stop = full.split()[3]
    r = client.chat.completions.create(model="tiny", messages=chat("hello there"), seed=5, stop=[stop],
                                       extra_body=FAST)
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_thinking_renders_the_template_with_it(tiny, client):
    msgs = chat("hello")
    r = client.chat.completions.create(model="tiny", messages=msgs, seed=1, extra_body={
        **FAST, "chat_template_kwargs": {"enable_thinking": True}})
    assert r.usage.prompt_tokens == len(prompt_ids(tiny[1], msgs, think=True)) != len(prompt_ids(tiny[1], msgs))


def test_canvas_events_only_when_asked(server):
    body = {"model": "tiny", "messages": chat("hi"), "seed": 1, "stream": True, **FAST}
    with httpx.Client(timeout=60) as h:
        plain = h.post(server.url + "/v1/chat/completions", json=body).text
        live = h.post(server.url + "/v1/chat/completions", json={**body, "dg_canvas": True}).text
    assert "event: canvas" not in plain and plain.rstrip().endswith("data: [DONE]")
    frames = [json.loads(block.split("data: ", 1)[1]) for block in live.split("\n\n")
              if block.startswith("event: canvas")]
    assert frames and all(len(f["tokens"]) == len(f["accepted"]) == 256 for f in frames)
    assert frames[0]["step"] == 1 and frames[0]["accepted_count"] == frames[0]["accepted"].count("1")
    text = lambda s: "".join(json.loads(b[6:])["choices"][0]["delta"].get("content", "")  # noqa: E731
                             for b in s.split("\n\n") if b.startswith("data: {") and '"choices": [{' in b)
    assert text(live) == text(plain)


def test_a_continued_conversation_reuses_the_cache(tiny, client):
    # Two steps a block: reused and fresh prompts are encoded in different chunks, which only
    # rounding tells apart (dg chat's documented tolerance; tests/test_repl.py).
    settings = {"max_tokens": 32, "max_denoising_steps": 2}
    msgs, reused = [], []
    for text in ("hello there", "tell me more", "and then?"):
        msgs.append({"role": "user", "content": text})
        r = client.chat.completions.create(model="tiny", messages=msgs, seed=7, extra_body=settings)
        fresh = dgcli.generate(*tiny, msgs, seed=7, max_new_tokens=32, max_denoising_steps=2)
        assert r.choices[0].message.content == fresh
        reused.append(r.usage.prompt_tokens_details.cached_tokens)
        msgs.append({"role": "assistant", "content": fresh})
    assert reused[0] == 0 and reused[2] > 0  # the third turn comes back to the second's mark
    r = client.chat.completions.create(model="tiny", messages=chat("hello there"), seed=7, extra_body=settings)
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # a new conversation starts afresh


# ---- Ollama ----

def test_ollama_chat_stream_and_not(tiny, server):
    want = expected(tiny, "hello there", 5)
    body = {"model": "tiny", "messages": chat("hello there"),  # a stock client's payload
            "options": {"seed": 5, "num_predict": 32, "max_denoising_steps": 4}}
    with httpx.Client(timeout=60) as h:
        lines = [json.loads(line) for line in h.post(server.url + "/api/chat", json=body).text.splitlines()]
        one = h.post(server.url + "/api/chat", json={**body, "stream": False}).json()
        tags = h.get(server.url + "/api/tags").json()
        version = h.get(server.url + "/api/version").json()
    assert "".join(x["message"]["content"] for x in lines) == want == one["message"]["content"]
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
    last = lines[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] > 0
    assert last["prompt_eval_count"] == len(prompt_ids(tiny[1], "hello there"))
    assert all(isinstance(last[k], int) and last[k] >= 0 for k in ("total_duration", "prompt_eval_duration",
                                                                   "eval_duration"))
    assert one["done"] is True and one["message"]["role"] == "assistant"
    assert tags["models"][0]["name"] == "tiny" and isinstance(version["version"], str)


def test_ollama_generate(tiny, server):
    body = {"model": "tiny:latest", "prompt": "the river", "system": "be brief", "stream": False,
            "options": {"seed": 4, "num_predict": 32, "max_denoising_steps": 4, "temperature": 1.0}}
    with httpx.Client(timeout=60) as h:
        r = h.post(server.url + "/api/generate", json=body).json()
        raw = h.post(server.url + "/api/generate", json={**body, "system": None, "raw": True}).json()
        load = h.post(server.url + "/api/generate", json={"model": "tiny"}).json()
    assert r["response"] == expected(tiny, "the river", 4, system="be brief", t_max=1.0, t_min=0.5)
    assert raw["response"] == expected(tiny, "the river", 4, raw=True, t_max=1.0, t_min=0.5)
    assert load["done"] is True and load["response"] == ""


# ---- bad input: its status and a JSON error; the server goes on ----

LIMIT = 4 * 1024 * 1024
BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", {"messages": chat("hi")}, 400, "model"),
    ("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": chat("hi")}, 404, "model"),
    ("POST", "/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "n": 2}, 400, "n"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "max_tokens": "9"}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "temperature": 0}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "temperature": 1e300}, 400, None),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "seed": -1}, 400, "seed"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "t_min": 0.9, "t_max": 0.5}, 400,
     None),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "max_denoising_steps": 10**6}, 400,
     None),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": chat("hi"), "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, 400,
     "messages[0].content[0].type"),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [  # no vision tower
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400, "prompt"),
    ("POST", "/v1/nothing", {}, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("POST", "/api/chat", {"model": "llama3", "messages": chat("hi")}, 404, None),
    ("POST", "/api/chat", {"model": "tiny", "messages": chat("hi"), "options": {"seed": "x"}}, 400, None),
    ("POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]},
     400, None),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_status_and_a_json_error(server, method, path, body, status, param):
    with httpx.Client(timeout=30) as h:
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        r = h.request(method, server.url + path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        if path.startswith("/api/"):
            assert isinstance(err, str) and err
        else:
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert err["param"] == param or param is None
        assert "Traceback" not in r.text
        assert h.get(server.url + "/v1/models").status_code == 200  # still serving


def test_too_long_and_too_big(server):
    with httpx.Client(timeout=60) as h:
        r = h.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": chat("hi"),
                                                              "max_tokens": 9000})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "8192" in message and "9216" in message  # the context, and what was asked
        big = {"model": "tiny", "messages": chat("x" * (LIMIT + 10))}
        r = h.post(server.url + "/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_key_cors_and_shutdown(tiny):
    site = "http://localhost:3000"
    with Served(*tiny, api_key="sesame", cors_origin=site) as s, httpx.Client(timeout=30) as h:
        assert h.get(s.url + "/v1/models").status_code == 401
        assert h.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert h.get(s.url + "/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert h.get(s.url + "/").status_code == 200  # the page itself; it asks for the key
        pre = h.options(s.url + "/v1/chat/completions", headers={
            "Origin": site, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == site
        other = h.get(s.url + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer sesame"})
        assert "access-control-allow-origin" not in other.headers
        s.worker.stop()
        r = h.post(s.url + "/v1/chat/completions", headers={"Authorization": "Bearer sesame"},
                   json={"model": "tiny", "messages": chat("hi"), **FAST})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


# ---- the queue ----

def first_canvas(lines) -> None:
    """Read up to the first canvas event (the generation runs); `lines` stays open for more."""
    for line in lines:
        if line.startswith("event: canvas"):
            return
    raise AssertionError("no canvas event")


def wait_until(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_queue_full_is_429_and_clients_that_leave_free_it(tiny):
    long = {"model": "tiny", "messages": chat("hi"), "stream": True, "dg_canvas": True, **LONG}
    url = "/v1/chat/completions"
    with Served(*tiny, max_queue=1) as s, httpx.Client(timeout=60) as h, httpx.Client(timeout=60) as h2:
        with h.stream("POST", s.url + url, json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            first_canvas(lines)  # it runs
            with h2.stream("POST", s.url + url, json=long) as waiting:
                queued = waiting.iter_lines()
                next(queued)  # the first chunk comes at once: it waits in the queue
                assert s.worker.queued() == 1
                r = h.post(s.url + url, json={"model": "tiny", "messages": chat("x"), **FAST})
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
            # The waiting client left: dropped from the queue, while the first still runs.
            assert wait_until(lambda: s.worker.queued() == 0), "a streaming client that left is still queued"
            assert s.worker.running is not None
            # A non-streaming client that gives up while it waits is dropped too.
            with pytest.raises(httpx.TimeoutException):
                httpx.post(s.url + url, json={**long, "stream": False}, timeout=1.5)
            assert wait_until(lambda: s.worker.queued() == 0), "a non-streaming client that left is still queued"
            assert s.worker.running is not None
        # The running client left: its generation is cancelled between two steps.
        assert s.idle(), f"still running {s.worker.running} or queued {s.worker.queued()}"
        r = h.post(s.url + url, json={"model": "tiny", "messages": chat("hi"), "seed": 5, **FAST})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected(tiny, "hi", 5)


def test_load_50_requests_from_8_clients_some_leaving(tiny):
    """Bounded load: 8 clients, 50 requests, every fifth leaves mid-stream; afterwards nothing is
    left running or queued, answers are still right, and memory has not grown with the requests."""
    import resource  # noqa: F401  (Linux: /proc gives the current RSS)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    small = {"max_tokens": 16, "max_denoising_steps": 2}
    with Served(*tiny, max_queue=64) as s:
        def one(i: int, h: httpx.Client) -> str:
            body = {"model": "tiny", "messages": chat(f"request {i}"), "seed": i, **small}
            if i % 5 == 0:
                with h.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True,
                                                                            "dg_canvas": True}) as r:
                    lines = r.iter_lines()
                    first_canvas(lines)
                return "left"
            r = h.post(s.url + "/v1/chat/completions", json=body)
            return r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else f"HTTP {r.status_code}"

        def run(n: int, start: int) -> dict:
            out, lock, todo = {}, threading.Lock(), list(range(start, start + n))

            def client():
                with httpx.Client(timeout=120) as h:
                    while True:
                        with lock:
                            if not todo:
                                return
                            i = todo.pop()
                        out[i] = one(i, h)

            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            return out

        run(10, 1000)  # warm-up: allocator pools, first-use caches
        assert s.idle()
        before = rss()
        got = run(50, 0)
        assert s.idle()
        grown = rss() - before
        assert len(got) == 50 and not [v for v in got.values() if v.startswith("HTTP")]
        assert sum(v == "left" for v in got.values()) == 10
        assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 50 requests"
        for i in (1, 7):
            assert got[i] == dgcli.generate(*tiny, chat(f"request {i}"), seed=i, max_new_tokens=16,
                                            max_denoising_steps=2)


# ---- the answer's parts, end to end (the tiny model does not think by itself: its output is given) ----

def given_answer(ids):
    """A stand-in for the worker session's generate: one canvas holding `ids`, then EOS."""
    from dgcli.events import BlockEvent, DoneEvent, PrefillEvent

    def generate(prompt, history=None, settings=None, reuse=None):
        yield PrefillEvent(prompt_tokens=len(prompt), cached_tokens=len(prompt), seconds=0.0)
        canvas = ids + [1] + [0] * (255 - len(ids))
        yield BlockEvent(block=0, token_ids=canvas, steps=1, finished=True)
        yield DoneEvent(token_ids=canvas, finish_reason="eos", prompt_tokens=len(prompt), generated_tokens=len(ids),
                        blocks=1, steps_per_block=[1], prefill_seconds=0.0, denoise_seconds=0.0, commit_seconds=0.0,
                        total_seconds=0.0, seed=0)

    return generate


def test_the_thought_comes_back_apart_in_both_apis(tiny):
    tok = tiny[1]
    with Served(*tiny) as s, httpx.Client(timeout=30) as h:
        # <|channel>thought ...<channel|> then the answer
        s.worker.session.generate = given_answer([6] + tok.encode("thought ready above") + [7] + tok.encode("ever red"))
        think = {"model": "tiny", "messages": chat("hi"), "chat_template_kwargs": {"enable_thinking": True}}
        msg = h.post(s.url + "/v1/chat/completions", json=think).json()["choices"][0]["message"]
        assert (msg["content"], msg["reasoning_content"]) == ("ever red", "ready above")
        deltas = [json.loads(b[6:])["choices"][0]["delta"] for b in h.post(
            s.url + "/v1/chat/completions", json={**think, "stream": True}).text.split("\n\n")
            if b.startswith("data: {")]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "ready above"
        assert "".join(d.get("content", "") for d in deltas) == "ever red"
        ollama = h.post(s.url + "/api/chat", json={"model": "tiny", "messages": chat("hi"), "think": True,
                                                   "stream": False}).json()["message"]
        assert (ollama["content"], ollama["thinking"]) == ("ever red", "ready above")


def test_tool_calls_come_back_in_both_apis(tiny):
    from serve_helpers import Q, pieces_tokenizer

    tok, ids = pieces_tokenizer()  # one with Gemma 4's tool-call tokens (tiny has none)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"model": "tiny", "messages": chat("weather?"), "tools": tools}
    with Served(tiny[0], tok) as s, httpx.Client(timeout=30) as h:
        s.worker.session.generate = given_answer(ids("Sure.", "<|tool_call>", "call:get_weather{city:", Q, "Paris", Q,
                                                     ",days:3}", "<tool_call|>"))
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(**body)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Sure."
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris",
                                                                                              "days": 3}
        chunks = list(client.chat.completions.create(**body, stream=True))
        streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert streamed[0][0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
        ollama = h.post(s.url + "/api/chat", json={**body, "stream": False}).json()["message"]
        want = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
        assert ollama["tool_calls"] == [{"function": want}]
