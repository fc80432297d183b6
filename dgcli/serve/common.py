"""What both APIs share: the request error, field checks, one generation request (`GenRequest`),
its prompt ids, and `Answer`, which turns the engine's events into text deltas, thought, tool calls
and a finish reason the same way for every endpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..api import useful_length
from ..config import MAX_DENOISING_STEPS, MAX_SEED, TUNABLE_SETTINGS, temperature_shorthand
from ..events import BlockEvent, DoneEvent
from .tools import Parts, marker_ids, split_answer


class ApiError(Exception):
    """A request the client has to change (or cannot make now): an HTTP status and one line."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.code = code or {400: "invalid_request", 401: "invalid_api_key", 404: "model_not_found",
                             413: "request_too_large", 429: "queue_full", 503: "shutting_down"}.get(status)
        self.type = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                     503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")


# ---- field checks (JSON values, named as the client sent them) ----

def bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"'{param}' {why}", param=param)


def get_bool(body: dict, key: str, default=False, name: str | None = None) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name or key, f"must be true or false, got {_show(v)}")
    return v


def get_int(body: dict, key: str, low: int, high: int | None = None, name: str | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        raise bad(name or key, f"must be an integer from {low}" + (f" to {high}" if high is not None else " up")
                  + f", got {_show(v)}")
    return v


def get_number(body: dict, key: str, name: str | None = None) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad(name or key, f"must be a number, got {_show(v)}")
    return v


def get_str(body: dict, key: str, name: str | None = None, required: bool = False) -> str | None:
    v = body.get(key)
    if v is None:
        if required:
            raise bad(name or key, "is required")
        return None
    if not isinstance(v, str):
        raise bad(name or key, f"must be a string, got {_show(v)}")
    return v


def get_stop(body: dict, key: str, name: str | None = None) -> list[str]:
    v = body.get(key)
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > 16:
        raise bad(name or key, "must be a non-empty string or a list of at most 16 of them")
    return stops


def _show(v) -> str:
    import json

    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def sampler_fields(body: dict, where: str = "") -> dict:
    """The sampler's own settings under the reference's names (max_denoising_steps, entropy_bound,
    t_min, t_max, stability_threshold, confidence_threshold), as vLLM clients send extra fields."""
    out = {}
    for key, kind in TUNABLE_SETTINGS.items():
        if key in ("max_new_tokens", "seed"):
            continue  # the APIs' own names carry these
        # stability_threshold sizes a [k, canvas] buffer, and beyond the step limit no block could settle
        high = MAX_DENOISING_STEPS if key == "stability_threshold" else None
        v = get_int(body, key, 0, high, name=where + key) if kind is int else get_number(body, key, name=where + key)
        if v is not None:
            out[key] = v
    return out


def temperature(t: float | None, settings: dict, name: str) -> None:
    """The CLI's shorthand: t_max = T, t_min = T/2 (unless t_min/t_max are given themselves)."""
    if t is None:
        return
    if "t_min" in settings or "t_max" in settings:
        raise bad(name, "sets t_min and t_max; give either it or them")
    if t <= 0:
        raise bad(name, f"must be > 0 (a diffusion step samples; use 'seed' for repeatable answers), got {t}")
    settings.update(temperature_shorthand(t))


def seed(body: dict, key: str, name: str | None = None) -> int | None:
    return get_int(body, key, 0, MAX_SEED, name=name)


# ---- messages ----

ROLES = ("system", "developer", "user", "assistant", "tool")


def content_text(content, param: str):
    """A message's content: text (a string, or its text parts joined), or, when it holds images, a list
    of text parts and image parts (`image_part`: decoded later, off the event loop)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(param, f"must be a string or a list of content parts, got {_show(content)}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{param}[{j}]"
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "text":
            raise bad(f"{where}.text", "must be a string")
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append(image_part(data_url(url, f"{where}.image_url.url"), where))
        else:
            raise bad(f"{where}.type", f"content part type {_show(kind)} is not supported "
                                       "(only 'text' and 'image_url')")
    if any(p["type"] == "image" for p in parts):
        return parts
    return "\n".join(p["text"] for p in parts)


# ---- images: base64 only; a server never fetches a URL it is given ----

def data_url(url, param: str) -> bytes:
    """The bytes of a `data:<type>;base64,...` URL; 400 for a remote URL or anything else."""
    if not isinstance(url, str):
        raise bad(param, "must be a data: URL (data:image/png;base64,...)")
    if url[:8].lower().startswith(("http://", "https://")):
        raise bad(param, "is a remote URL: dg serve never fetches one; send the image inline as a data: URL "
                         "(data:image/png;base64,...)")
    head, comma, data = url.partition(",")
    if not head.lower().startswith("data:") or not comma:
        raise bad(param, "must be a data: URL (data:image/png;base64,...)")
    if not head.lower().endswith(";base64"):
        raise bad(param, "must be a base64 data: URL (data:image/png;base64,...)")
    return b64(data, param)


def b64(text, param: str) -> bytes:
    import base64
    import binascii

    if not isinstance(text, str) or not text.strip():
        raise bad(param, "must be an image as a non-empty base64 string")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad(param, "is not valid base64") from None


def image_part(data: bytes, param: str) -> dict:
    """An image part whose bytes are decoded (Pillow) and processed when the request is encoded."""
    return {"type": "image", "_data": data, "_name": param}


def chat_messages(messages, param: str = "messages") -> list[dict]:
    """Checked messages in the template's form: role, content (text), tool calls and names kept."""
    import json

    if not isinstance(messages, list) or not messages:
        raise bad(param, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {_show(role)}")
        msg = {"role": "system" if role == "developer" else role, "content": content_text(m.get("content"),
                                                                                            f"{where}.content")}
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls", "must be a list")
            msg["tool_calls"] = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"{where}.tool_calls", "each needs a 'function' with a 'name'")
                args = fn.get("arguments")
                if isinstance(args, str):  # OpenAI sends JSON text; the template wants the object
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise bad(f"{where}.tool_calls", "function.arguments is not valid JSON") from None
                msg["tool_calls"].append({**c, "function": {"name": fn["name"], "arguments": args or {}}})
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def get_tools(body: dict, key: str = "tools") -> list | None:
    tools = body.get(key)
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise bad(key, "must be a list of tool objects")
    return tools or None


# ---- templates: the answer fills one (docs/fill.md) ----

def template_fields(body: dict, xargs: dict | None = None, response_format: bool = False,
                    ollama_format: bool = False) -> tuple[object, str | None]:
    """(Template or None, the field it came from) from at most one of: `dg_template` (template text),
    `dg_schema` (a JSON Schema), vLLM's `diffusion_seed_canvas` + `diffusion_pinned` (in `vllm_xargs`
    or at the top level), OpenAI's `response_format` json_schema, Ollama's `format` schema."""
    from ..template import TemplateError
    from ..filling import template_from

    found = []  # (field, keyword for template_from, value)
    if body.get("dg_template") is not None:
        found.append(("dg_template", "template", get_str(body, "dg_template")))
    if body.get("dg_schema") is not None:
        found.append(("dg_schema", "schema", body["dg_schema"]))
    for where, d in (("", body), ("vllm_xargs.", xargs or {})):
        if d.get("diffusion_seed_canvas") is not None or d.get("diffusion_pinned") is not None:
            found.append((where + "diffusion_seed_canvas", "tokens",
                          (d.get("diffusion_seed_canvas"), d.get("diffusion_pinned"))))
    if response_format:
        schema = response_schema(body.get("response_format"))
        if schema is not None:
            found.append(("response_format.json_schema.schema", "schema", schema))
    if ollama_format:
        fmt = body.get("format")
        if fmt == "json":
            raise bad("format", "'json' needs a schema here: dg fills a schema's template (give format a JSON "
                                "Schema object); free-form JSON is not constrained")
        if isinstance(fmt, dict):
            found.append(("format", "schema", fmt))
        elif fmt not in (None, ""):
            raise bad("format", f"must be a JSON Schema object, got {_show(fmt)}")
    if not found:
        return None, None
    if len(found) > 1:
        raise bad(found[1][0], f"cannot be combined with '{found[0][0]}': give one template")
    name, kind, value = found[0]
    try:
        if kind == "schema":
            if not isinstance(value, dict):
                raise TemplateError(f"a JSON Schema is an object, got {_show(value)}")
            return template_from(schema=value), name
        if kind == "tokens":
            return template_from(seed_canvas=value[0], pinned=value[1]), name
        return template_from(value), name
    except TemplateError as e:
        raise bad(name, f"cannot be used: {e}") from None


def response_schema(fmt) -> dict | None:
    """The schema of OpenAI's `response_format: {"type": "json_schema", "json_schema": {"schema": ...}}`."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        raise bad("response_format", "{\"type\": \"json_object\"} needs a schema here: dg fills a schema's "
                                     "template; use {\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}")
    if kind != "json_schema":
        raise bad("response_format.type", f"must be 'text' or 'json_schema', got {_show(kind)}")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema", "is required: a JSON Schema object")
    return schema


# ---- one generation request ----

@dataclass
class GenRequest:
    """What an endpoint asks the engine for, whichever API it came from."""

    messages: list[dict] | None = None  # chat: the whole conversation
    prompt: str | list[int] | None = None  # raw: text (encoded as `dg run --raw` does) or token ids
    think: bool = False
    tools: list | None = None
    settings: dict = field(default_factory=dict)  # the engine's names: max_new_tokens, seed, t_min, ...
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    canvas: bool = False  # dg_canvas: also send the denoising steps
    template: object = None  # a dgcli.template.Template the answer fills (dg_template, a schema, vLLM's arrays)
    template_param: str | None = None  # the field it came from, for errors
    pixels: list = field(default_factory=list)  # the images' patches, in order (set by encode)

    def encode(self, tokenizer, model=None) -> tuple[list[int], list[int] | None, bool]:
        """(prompt ids, the conversation's ids without the generation prompt or None, multi-turn).
        Images are decoded and processed here (an ImageError, 400, for a bad one); `self.pixels`."""
        if self.messages is None:
            if isinstance(self.prompt, list):
                return list(self.prompt), None, False
            return tokenizer.encode(self.prompt, add_special_tokens=True), None, False
        multi = any(m["role"] == "assistant" for m in self.messages)
        parts = [p for m in self.messages if isinstance(m["content"], list) for p in m["content"]
                 if p["type"] == "image"]
        if parts:
            from ..images import check_vision, encode_prompt, image_from_bytes, vision_for

            check_vision(model)
            processor, _ = vision_for(tokenizer)
            self.pixels = [processor(image_from_bytes(p["_data"], p["_name"])) for p in parts]

            def encoded(gen: bool) -> list[int]:
                return encode_prompt(model, tokenizer, self.messages, think=self.think, tools=self.tools,
                                     pixels=self.pixels, add_generation_prompt=gen).ids

            return encoded(True), encoded(False), multi

        def render(gen: bool) -> list[int]:
            text = tokenizer.apply_chat_template(self.messages, add_generation_prompt=gen,
                                                 enable_thinking=self.think, tools=self.tools)
            return tokenizer.encode(text, add_special_tokens=False)

        return render(True), render(False), multi


def stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that begins a stop string (held back until it is decided)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Answer:
    """Events in, answer out: text deltas as blocks commit, the thought apart, `stop` strings cut
    (text that may begin one is held back until the next block decides), tool calls at the end.
    One per request."""

    def __init__(self, tokenizer, settings, stop: list[str], template: bool = False):
        self.tok, self.s, self.stop = tokenizer, settings, stop
        self.template = template  # a filled template: the text is the template's (pads out), no thought or calls
        self.filled = ""
        self.markers = marker_ids(tokenizer)
        self.ids: list[int] = []
        self.sent_content = self.sent_reasoning = ""
        self.stopped = False  # a stop string was found: the caller cancels the generation
        self.parts = Parts()
        self.done: DoneEvent | None = None

    def _useful(self) -> list[int]:
        return self.ids[:min(useful_length(self.ids, self.s.eos_token_id), self.s.max_new_tokens)]

    def block(self, ev: BlockEvent) -> tuple[str, str]:
        """(content delta, reasoning delta) after a committed block."""
        self.ids += ev.token_ids
        self.filled += ev.text
        return self._update(final=False)

    def finish(self, done: DoneEvent | None) -> tuple[str, str]:
        """The last deltas; `done` is None when the generation was cut short by a stop string."""
        self.done = done
        if done is not None and self.template:
            self.filled = done.text
        return self._update(final=True)

    def _update(self, final: bool) -> tuple[str, str]:
        p = Parts(self.filled) if self.template else split_answer(self.tok, self._useful(), self.markers)
        content = p.content
        for s in self.stop:
            at = content.find(s)
            if at >= 0:
                content, self.stopped = content[:at], True
        if final and p.open_part == "tool_call" and not self.stopped:  # cut off inside a call: the text as is
            content += p.pending
        show = content
        if not final and not self.stopped:
            show = content.rstrip("\ufffd")  # a character split across blocks
            show = show[:max(len(self.sent_content), len(show) - stop_prefix(show, self.stop))]
        thought = p.reasoning if final or p.open_part != "reasoning" else p.reasoning.rstrip("\ufffd")
        self.parts = Parts(content, p.reasoning, p.tool_calls, p.open_part)
        dc, self.sent_content = show[len(self.sent_content):], max(show, self.sent_content, key=len)
        dr, self.sent_reasoning = thought[len(self.sent_reasoning):], max(thought, self.sent_reasoning, key=len)
        return dc, dr

    @property
    def content(self) -> str:
        return self.parts.content

    @property
    def reasoning(self) -> str:
        return self.parts.reasoning

    @property
    def tool_calls(self) -> list[dict]:
        return self.parts.tool_calls

    def completion_tokens(self) -> int:
        return self.done.generated_tokens if self.done else len(self._useful())

    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        if self.stopped or self.done is None:
            return "stop"
        return "stop" if self.done.finish_reason in ("eos", "template") else "length"
