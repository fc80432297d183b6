"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions (JSON, or SSE with `data: [DONE]`).

`chat_request` / `completion_request` are the one place a body becomes a GenRequest: fields that
later features add (templates and schemas, images) go there.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..events import BlockEvent, DoneEvent, PrefillEvent
from .common import (Answer, ApiError, GenRequest, bad, chat_messages, get_bool, get_int, get_number, get_stop,
                     get_str, get_tools, sampler_fields, seed, temperature, template_fields)


def settings_from(body: dict) -> dict:
    """The engine's settings from OpenAI's fields, the sampler's own names, and vLLM's `vllm_xargs`."""
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise bad("vllm_xargs", "must be an object")
    s = {**sampler_fields(body), **sampler_fields(xargs or {}, "vllm_xargs.")}
    n = get_int(body, "n", 1)
    if n is not None and n != 1:
        raise bad("n", f"must be 1: dg generates one answer per request, got {n}")
    for key in ("max_completion_tokens", "max_tokens"):
        v = get_int(body, key, 1)
        if v is not None:
            s["max_new_tokens"] = v
            break
    v = seed(body, "seed")
    if v is not None:
        s["seed"] = v
    temperature(get_number(body, "temperature"), s, "temperature")
    return s


def stream_fields(body: dict, req: GenRequest) -> None:
    req.stream = get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options", "must be an object")
        req.include_usage = get_bool(opts, "include_usage", name="stream_options.include_usage")
    req.canvas = get_bool(body, "dg_canvas")
    req.stop = get_stop(body, "stop")
    # The answer fills a template: dg_template, dg_schema, response_format json_schema, vLLM's arrays.
    req.template, req.template_param = template_fields(body, body.get("vllm_xargs"), response_format=True)


def chat_request(body: dict) -> GenRequest:
    """POST /v1/chat/completions's body as a GenRequest (400 for anything wrong in it)."""
    req = GenRequest(messages=chat_messages(body.get("messages")), settings=settings_from(body))
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", "must be an object")
        req.think = get_bool(kwargs, "enable_thinking", name="chat_template_kwargs.enable_thinking")
    choice = body.get("tool_choice")
    req.tools = None if choice == "none" else get_tools(body)
    stream_fields(body, req)
    return req


def completion_request(body: dict) -> GenRequest:
    """POST /v1/completions's body: a raw prompt (no chat template), as `dg run --raw`."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ids:
        raise bad("prompt", "must be a non-empty string, or a list of token ids (one prompt per request)")
    for key in ("suffix", "echo", "best_of", "logprobs"):
        if body.get(key) not in (None, False, 1 if key == "best_of" else None):
            raise bad(key, "is not supported")
    req = GenRequest(prompt=prompt, settings=settings_from(body))
    stream_fields(body, req)
    return req


# ---- responses ----

def usage(prompt_tokens: int, answer: Answer, reused: int) -> dict:
    c = answer.completion_tokens()
    return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c,
            "prompt_tokens_details": {"cached_tokens": reused}}


def message(answer: Answer, tool_calls: list[dict]) -> dict:
    msg = {"role": "assistant", "content": answer.content if answer.content or not tool_calls else None}
    if answer.reasoning:
        msg["reasoning_content"] = answer.reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


async def respond(ctx, request, req: GenRequest, chat: bool):
    """Run the request and answer it: one JSON object, or an SSE stream."""
    from .tools import openai_tool_calls

    job, answer, n_prompt = await ctx.start(req)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": ctx.model_name}

    def choice(content: str = "", reasoning: str = "", finish=None, tool_calls=None, first=False) -> dict:
        if not chat:
            return {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    if not req.stream:
        await ctx.collect(job, answer, request)
        calls = openai_tool_calls(answer.tool_calls)
        out = {**base, "object": "chat.completion" if chat else "text_completion",
               "usage": usage(n_prompt, answer, job.reused)}
        if chat:
            out["choices"] = [{"index": 0, "message": message(answer, calls), "logprobs": None,
                               "finish_reason": answer.finish_reason()}]
        else:
            out["choices"] = [{"index": 0, "text": answer.content, "logprobs": None,
                               "finish_reason": answer.finish_reason()}]
        return JSONResponse(out)

    def sse(obj, event: str | None = None) -> str:
        return (f"event: {event}\n" if event else "") + f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def body():
        try:
            if chat:
                yield sse({**base, "choices": [choice(first=True)]})
            done = None
            async for ev in job.events():
                if isinstance(ev, dict):
                    yield sse(ev, "canvas")
                elif isinstance(ev, BlockEvent):
                    c, r = answer.block(ev)
                    if c or r:
                        yield sse({**base, "choices": [choice(c, r)]})
                    if answer.stopped:
                        job.cancel()
                        break
                elif isinstance(ev, DoneEvent):
                    done = ev
                elif isinstance(ev, PrefillEvent):
                    continue
            c, r = answer.finish(done)
            calls = openai_tool_calls(answer.tool_calls)
            if c or r:
                yield sse({**base, "choices": [choice(c, r)]})
            yield sse({**base, "choices": [choice(finish=answer.finish_reason(), tool_calls=calls)]})
            if req.include_usage:
                yield sse({**base, "choices": [], "usage": usage(n_prompt, answer, job.reused)})
        except ApiError as e:  # failed after the stream began: an error event, as OpenAI sends one
            yield sse({"error": ctx.error_body(e)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def models(ctx, request):
    return JSONResponse({"object": "list", "data": [
        {"id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "dg"}]})


async def chat_completions(ctx, request):
    body = await ctx.body(request)
    ctx.check_model(get_str(body, "model", required=True))
    return await respond(ctx, request, chat_request(body), chat=True)


async def completions(ctx, request):
    body = await ctx.body(request)
    ctx.check_model(get_str(body, "model", required=True))
    return await respond(ctx, request, completion_request(body), chat=False)
