"""dg serve's answer parts on crafted text and ids: Gemma 4's tool-call syntax into tool calls, the
thinking channel into reasoning, stop strings across blocks, tools passed to the chat template."""

import pytest

from dgcli.events import BlockEvent
from dgcli.serve.common import Answer
from dgcli.serve.tools import openai_tool_calls, parse_tool_call, split_answer
from dgcli.tokenizer import Tokenizer
from serve_helpers import Q, pieces_tokenizer


@pytest.mark.parametrize("text,want", [
    (f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},days:3}}<tool_call|>",
     {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}),
    (f"call:f{{a:{Q}x, y: {{z}}{Q}, b:[1,2.5,{Q}s{Q}], c:{{d:true,e:null}}, f:false}}",
     {"name": "f", "arguments": {"a": "x, y: {z}", "b": [1, 2.5, "s"], "c": {"d": True, "e": None}, "f": False}}),
    ('call:f{"quoted key":"json \\"text\\"", n:-4e2}', {"name": "f", "arguments": {"quoted key": 'json "text"',
                                                                                  "n": -400.0}}),
    ("call:noargs{}", {"name": "noargs", "arguments": {}}),
    ("call:f{ a : bare word }", {"name": "f", "arguments": {"a": "bare word"}}),
])
def test_gemma4_tool_calls_parse(text, want):
    assert parse_tool_call(text) == want


@pytest.mark.parametrize("text", ["hello", "call:{a:1}", "call:f{a:1", f"call:f{{a:{Q}open}}", "call:f{a:1} trailing",
                                  "call:f{:1}", "call:f{a 1}", "call:f[1]"])
def test_malformed_tool_calls_are_not_calls(text):
    assert parse_tool_call(text) is None


def test_openai_shape_has_json_arguments_and_ids():
    calls = openai_tool_calls([{"name": "f", "arguments": {"a": "é"}}, {"name": "g", "arguments": {}}])
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": '{"a": "é"}'},
                                              {"name": "g", "arguments": "{}"}]
    assert calls[0]["id"] != calls[1]["id"] and all(c["type"] == "function" for c in calls)


@pytest.fixture(scope="module")
def pieces_tok():
    return pieces_tokenizer()


def test_answer_ids_split_into_thought_content_and_calls(pieces_tok):
    tok, ids = pieces_tok
    p = split_answer(tok, ids("<|channel>", "thought", "\n", "Let me check.", "<channel|>", "Sure.",
                              "<|tool_call>", "call:get_weather{city:", Q, "Paris", Q, ",days:3}", "<tool_call|>",
                              " It is sunny."))
    assert p.reasoning == "Let me check." and p.content == "Sure. It is sunny." and p.open_part is None
    assert p.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]


def test_a_call_that_does_not_parse_stays_text_and_an_open_one_is_pending(pieces_tok):
    tok, ids = pieces_tok
    p = split_answer(tok, ids("Sure.", "<|tool_call>", "call:broken{", "<tool_call|>"))
    assert p.tool_calls == [] and p.content == "Sure.call:broken{"
    p = split_answer(tok, ids("Sure.", "<|tool_call>", "call:get_weather{city:", Q, "Paris"))
    assert p.content == "Sure." and p.open_part == "tool_call" and p.pending.startswith("<|tool_call>call:")
    p = split_answer(tok, ids("<|channel>", "thought", "\n", "Let me check."))
    assert p.open_part == "reasoning" and p.reasoning == "Let me check." and p.content == ""


def block(ids, i=0):
    return BlockEvent(block=i, token_ids=ids, steps=1, finished=False)


def test_answer_streams_thought_apart_and_cuts_stop_strings_across_blocks(tiny):
    engine, tok = tiny
    s = engine.sampler_settings(max_new_tokens=64)
    words = lambda text: tok.encode(text)  # noqa: E731
    a = Answer(tok, s, stop=["red list"])
    c1, r1 = a.block(block([6] + words("thought ready above") + [7] + words("ever red")))
    assert r1 == "ready above" and c1 == "ever "  # "red" held back: it may begin the stop string
    c2, r2 = a.block(block(words("list though feel"), 1))
    assert a.stopped and c2 == "" and r2 == ""
    assert (a.content, a.reasoning) == ("ever ", "ready above") and a.finish_reason() == "stop"

    plain = Answer(tok, s, stop=[])
    assert plain.block(block(words("ever red"))) == ("ever red", "")
    assert plain.block(block(words("list") + [1] + words("feel"), 1)) == (" list", "")  # cut at EOS
    plain.finish(None)
    assert plain.content == "ever red list" and plain.completion_tokens() == 3


def test_tools_reach_the_chat_template(tiny):
    tok = Tokenizer(tiny[1].tok, "{% for t in tools %}{{ t.function.name }};{% endfor %}{{ messages[0].content }}", {})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools) == "get_weather;hi"
