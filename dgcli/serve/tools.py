"""The answer's parts: visible text, the thought, and tool calls, from the generated token ids.

Gemma 4's chat template (as published with the model) marks them with special tokens:
- the thinking channel: `<|channel>thought\\n ... <channel|>`;
- a tool call: `<|tool_call>call:NAME{key:value,...}<tool_call|>`, where string values are quoted
  with the `<|"|>` token, keys are bare, numbers/true/false/null are bare, and objects and lists
  nest as `{k:v,...}` / `[v,...]`.
The split is made on the ids (the markers are single tokens), so an answer without markers
decodes exactly as `dg run` prints it. A tokenizer without these tokens (tiny has no tool tokens)
simply never produces that part.
"""

from __future__ import annotations

import json
import uuid

CHANNEL = ("<|channel>", "<channel|>")
TOOL_CALL = ("<|tool_call>", "<tool_call|>")
QUOTE = '<|"|>'
THOUGHT_LABEL = "thought"  # the channel's name, at the start of its text


class Parts:
    """content, reasoning, tool_calls ({"name", "arguments": dict}) and whether a part is still open."""

    def __init__(self, content="", reasoning="", tool_calls=None, open_part=None, pending=""):
        self.content, self.reasoning = content, reasoning
        self.tool_calls = tool_calls or []
        self.open_part = open_part  # "reasoning" or "tool_call" when the answer stops inside one
        self.pending = pending  # the text of an unfinished tool call, markers included


def marker_ids(tokenizer) -> dict[str, int]:
    """The marker tokens this tokenizer has, by text."""
    out = {}
    for m in (*CHANNEL, *TOOL_CALL):
        i = tokenizer.tok.token_to_id(m)
        if i is not None:
            out[m] = i
    return out


def split_answer(tokenizer, ids: list[int], markers: dict[str, int] | None = None) -> Parts:
    """Split answer ids (already cut at EOS) into visible text, thought and tool calls. A tool call
    that does not parse stays in the visible text, as the model wrote it."""
    markers = marker_ids(tokenizer) if markers is None else markers
    kind = {v: k for k, v in markers.items()}
    content: list[int] = []
    reasoning: list[int] = []
    calls: list[dict] = []
    state, part = "content", []
    for i in ids:
        m = kind.get(i)
        if state == "content":
            if m == CHANNEL[0]:
                state, part = "reasoning", []
            elif m == TOOL_CALL[0]:
                state, part = "tool_call", [i]
            else:
                content.append(i)
        elif state == "reasoning":
            if m == CHANNEL[1]:
                reasoning += part
                state = "content"
            else:
                part.append(i)
        else:  # inside a tool call
            part.append(i)
            if m == TOOL_CALL[1]:
                text = tokenizer.decode(part, skip_special_tokens=False)
                call = parse_tool_call(text)
                if call is None:
                    content += part
                else:
                    calls.append(call)
                state = "content"
    open_part, pending = None, ""
    if state == "reasoning":
        reasoning += part
        open_part = "reasoning"
    elif state == "tool_call":
        open_part, pending = "tool_call", tokenizer.decode(part, skip_special_tokens=False)
    thought = tokenizer.decode(reasoning, skip_special_tokens=True)
    if thought.startswith(THOUGHT_LABEL):
        thought = thought[len(THOUGHT_LABEL):].lstrip()
    return Parts(tokenizer.decode(content, skip_special_tokens=True), thought, calls, open_part, pending)


def parse_tool_call(text: str) -> dict | None:
    """{"name", "arguments"} from `<|tool_call>call:NAME{...}<tool_call|>` (the markers optional);
    None if it is not that."""
    s = text.strip()
    if s.startswith(TOOL_CALL[0]):
        s = s[len(TOOL_CALL[0]):]
    if s.endswith(TOOL_CALL[1]):
        s = s[:-len(TOOL_CALL[1])]
    s = s.strip()
    if not s.startswith("call:") or "{" not in s:
        return None
    name, brace = s[5:s.index("{")].strip(), s.index("{")
    if not name:
        return None
    try:
        args, end = _value(s, brace)
    except (ValueError, IndexError):
        return None
    if s[end:].strip() or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def _value(s: str, i: int):
    """(value, index after it) at s[i]."""
    if s.startswith(QUOTE, i):
        j = s.index(QUOTE, i + len(QUOTE))
        return s[i + len(QUOTE):j], j + len(QUOTE)
    c = s[i]
    if c == "{":
        out, i = {}, i + 1
        while True:
            i = _skip(s, i)
            if s[i] == "}":
                return out, i + 1
            key, i = _key(s, i)
            i = _skip(s, i)
            if s[i] != ":":
                raise ValueError("expected ':'")
            out[key], i = _value(s, _skip(s, i + 1))
            i = _skip(s, i)
            if s[i] == ",":
                i += 1
            elif s[i] != "}":
                raise ValueError("expected ',' or '}'")
    if c == "[":
        items, i = [], i + 1
        while True:
            i = _skip(s, i)
            if s[i] == "]":
                return items, i + 1
            v, i = _value(s, i)
            items.append(v)
            i = _skip(s, i)
            if s[i] == ",":
                i += 1
            elif s[i] != "]":
                raise ValueError("expected ',' or ']'")
    if c == '"':
        return json.JSONDecoder().raw_decode(s, i)
    j = i
    while j < len(s) and s[j] not in ",}]":
        j += 1
    word = s[i:j].strip()
    if not word:
        raise ValueError("empty value")
    try:
        return json.loads(word), j  # numbers, true, false, null
    except ValueError:
        return word, j  # a bare word: taken as text


def _key(s: str, i: int):
    if s.startswith(QUOTE, i) or s[i] == '"':
        key, i = _value(s, i)
        return str(key), i
    j = i
    while j < len(s) and s[j] not in ":,{}[]":
        j += 1
    key = s[i:j].strip()
    if not key:
        raise ValueError("empty key")
    return key, j


def _skip(s: str, i: int) -> int:
    while s[i].isspace():
        i += 1
    return i


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI's `tool_calls`: arguments as a JSON string, each with an id."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def ollama_tool_calls(calls: list[dict]) -> list[dict]:
    """Ollama's `tool_calls`: arguments as an object."""
    return [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
