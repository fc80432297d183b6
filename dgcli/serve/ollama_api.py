"""Ollama's API: /api/version, /api/tags, /api/chat, /api/generate (streamed as NDJSON by default,
ending with a `done: true` object that carries Ollama's counts and timings in nanoseconds).
Errors are Ollama's `{"error": "..."}`.

`ollama_request` is the one place a body becomes a GenRequest: `images` (base64, on a message or
on /api/generate) and `format` (a JSON Schema: the answer fills its template) included.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from starlette.responses import JSONResponse, StreamingResponse

from .. import __version__
from ..events import BlockEvent, DoneEvent
from .common import (ApiError, GenRequest, b64, bad, chat_messages, get_bool, get_int, get_number, get_stop, get_str,
                     get_tools, image_part, sampler_fields, seed, temperature, template_fields)


def ollama_request(body: dict, chat: bool) -> GenRequest:
    """/api/chat's or /api/generate's body as a GenRequest (400 for anything wrong in it)."""
    opts = body.get("options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise bad("options", "must be an object")
    s = sampler_fields(opts, "options.")
    n = get_int(opts, "num_predict", -2, name="options.num_predict")
    if n is not None and n > 0:  # -1 (no limit) and -2 (fill the context): the model's default
        s["max_new_tokens"] = n
    elif n == 0:
        raise bad("options.num_predict", "must be > 0, or -1 for the default")
    v = seed(opts, "seed", "options.seed")
    if v is not None:
        s["seed"] = v
    temperature(get_number(opts, "temperature", "options.temperature"), s, "options.temperature")
    think = body.get("think")
    if think is not None and not isinstance(think, (bool, str)):
        raise bad("think", "must be true, false, or a level")
    req = GenRequest(settings=s, think=bool(think) and think not in ("none", "false"),
                     stop=get_stop(opts, "stop", "options.stop"), stream=get_bool(body, "stream", True))
    req.template, req.template_param = template_fields(body, ollama_format=True)
    if chat:
        req.messages = chat_messages(body.get("messages"))
        for i, (m, msg) in enumerate(zip(body["messages"], req.messages)):
            with_images(msg, m.get("images"), f"messages[{i}].images")
        req.tools = get_tools(body)
    else:
        prompt = get_str(body, "prompt") or ""
        system = get_str(body, "system")
        if get_bool(body, "raw"):
            if system:
                raise bad("system", "needs the chat template; it cannot be combined with raw")
            if body.get("images"):
                raise bad("images", "need the chat template; they cannot be combined with raw")
            req.prompt = prompt
        else:
            req.messages = ([{"role": "system", "content": system}] if system else []) + \
                           [with_images({"role": "user", "content": prompt}, body.get("images"), "images")]
    return req


def with_images(msg: dict, images, param: str) -> dict:
    """Ollama's `images` (base64 strings) as image parts before the message's text, as `dg run --image`."""
    if images is None or images == []:
        return msg
    if not isinstance(images, list):
        raise bad(param, "must be a list of base64-encoded images")
    parts = []
    for j, im in enumerate(images):
        where = f"{param}[{j}]"
        if isinstance(im, str) and im[:8].lower().startswith(("http://", "https://")):
            raise bad(where, "is a remote URL: dg serve never fetches one; send the image as base64")
        if isinstance(im, str) and im[:5].lower() == "data:":  # a data: URL is taken too
            im = im.partition(",")[2]
        parts.append(image_part(b64(im, where), where))
    text = msg["content"]
    if isinstance(text, list):
        msg["content"] = parts + text
    else:
        msg["content"] = parts + ([{"type": "text", "text": text}] if text else [])
    return msg


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


async def respond(ctx, request, req: GenRequest, chat: bool):
    from .tools import ollama_tool_calls

    t0 = time.perf_counter()
    job, answer, n_prompt = await ctx.start(req)

    def piece(content: str, thinking: str, calls=None) -> dict:
        if chat:
            msg = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            return {"model": ctx.model_name, "created_at": _now(), "message": msg, "done": False}
        out = {"model": ctx.model_name, "created_at": _now(), "response": content, "done": False}
        if thinking:
            out["thinking"] = thinking
        return out

    def last(content: str, thinking: str) -> dict:
        d = answer.done
        ns = 1_000_000_000
        out = piece(content, thinking, ollama_tool_calls(answer.tool_calls))
        reason = answer.finish_reason()
        out.update(done=True, done_reason="stop" if reason == "tool_calls" else reason,
                   total_duration=int((time.perf_counter() - t0) * ns), load_duration=0,
                   prompt_eval_count=n_prompt, prompt_eval_duration=int((d.prefill_seconds if d else 0) * ns),
                   eval_count=answer.completion_tokens(),
                   eval_duration=int(((d.denoise_seconds + d.commit_seconds) if d else 0) * ns))
        return out

    if not req.stream:
        await ctx.collect(job, answer, request)
        return JSONResponse(last(answer.content, answer.reasoning))

    async def body():
        done = None
        try:
            async for ev in job.events():
                if isinstance(ev, BlockEvent):
                    c, r = answer.block(ev)
                    if c or r:
                        yield json.dumps(piece(c, r), ensure_ascii=False) + "\n"
                    if answer.stopped:
                        job.cancel()
                        break
                elif isinstance(ev, DoneEvent):
                    done = ev
            c, r = answer.finish(done)
            yield json.dumps(last(c, r), ensure_ascii=False) + "\n"
        except ApiError as e:
            yield json.dumps({"error": e.message}) + "\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")


async def version(ctx, request):
    return JSONResponse({"version": __version__})


async def tags(ctx, request):
    name = ctx.model_name
    return JSONResponse({"models": [{"name": name, "model": name, "modified_at": _now(), "size": 0, "digest": "",
                                     "details": {"format": "safetensors", "family": "diffusion_gemma"}}]})


async def chat(ctx, request):
    body = await ctx.body(request)
    ctx.check_model(get_str(body, "model", required=True))
    return await respond(ctx, request, ollama_request(body, chat=True), chat=True)


async def generate(ctx, request):
    body = await ctx.body(request)
    ctx.check_model(get_str(body, "model", required=True))
    req = ollama_request(body, chat=False)
    if req.messages is not None and not req.messages[-1]["content"] or req.prompt == "":
        # Ollama answers an empty prompt by loading the model: here it is loaded already
        return JSONResponse({"model": ctx.model_name, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    return await respond(ctx, request, req, chat=False)
