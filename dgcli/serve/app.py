"""The Starlette app (`create_app`) and the uvicorn server around it (`serve`).

Every endpoint goes through `Ctx.endpoint`: the API key, then the handler; an ApiError or a DgError
(bad input) becomes its status and a JSON error (OpenAI's shape, or Ollama's `{"error": ...}` under
/api), anything else a 500 with one line (its traceback goes to the server's stderr, never to the
client). Bodies are read with a size limit before they are parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from ..api import check_context
from ..engine import as_engine
from ..errors import DgError, first_line
from ..events import BlockEvent, DoneEvent
from ..filling import layout
from ..images import ImageError
from . import ollama_api, openai_api
from .common import Answer, ApiError, GenRequest
from .worker import Job, Worker

MAX_BODY = 4 * 1024 * 1024
MAX_QUEUE = 16
PAGE = Path(__file__).resolve().parent.parent / "assets" / "serve.html"


class Ctx:
    """What the handlers share: the model, the worker, the limits."""

    def __init__(self, engine, tokenizer, model_name: str, api_key: str | None, max_queue: int, max_body: int):
        self.engine, self.tokenizer, self.model_name = as_engine(engine), tokenizer, model_name
        self.api_key, self.max_body = api_key, max_body
        self.worker = Worker(self.engine, tokenizer, max_queue)
        self.started = int(time.time())

    # ---- requests ----

    async def body(self, request) -> dict:
        """The JSON object in the body: 413 past the limit (counted as it arrives), 400 if not JSON."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the body is {int(length)} bytes; the limit is {self.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the body is over the limit of {self.max_body} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({first_line(e)})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, self.model_name + ":latest"):
            raise ApiError(404, f"model '{name}' not found: this server runs '{self.model_name}'", param="model")

    async def start(self, req: GenRequest) -> tuple[Job, Answer, int]:
        """Check the request against the model (before it waits in the queue) and queue it."""
        try:
            ids, history, multi = await run_in_threadpool(req.encode, self.tokenizer, self.engine.model)
        except ImageError as e:  # not an image, too large, no vision tower: the client's to change
            raise ApiError(400, str(e), param="messages") from None
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        vocab = self.engine.config.vocab_size
        if max(ids) >= vocab:
            raise ApiError(400, f"token id {max(ids)} is not in the vocabulary (0 to {vocab - 1})", param="prompt")
        settings = dict(req.settings)
        s = self.engine.sampler_settings(**settings)  # ConfigError (a DgError): 400 with the reason
        plan = None
        if req.template is not None:  # laid out now: a bad one is a 400 before the queue
            try:
                plan = await run_in_threadpool(layout, req.template, self.tokenizer, self.engine, s)
            except DgError as e:
                raise ApiError(400, f"'{req.template_param}' cannot be used: {e}", param=req.template_param) from None
            settings["max_new_tokens"] = plan.n_blocks * plan.L  # the template sets the answer's length
            s = s.replace(max_new_tokens=settings["max_new_tokens"])
        try:
            check_context(self.engine, len(ids), s.max_new_tokens, template=plan is not None)
        except DgError as e:
            why = str(e).replace("(--max-tokens)", "(max_tokens)")
            if req.pixels:
                n = sum(p.tokens for p in req.pixels)
                why += f" (the {len(req.pixels)} image(s) take {n} of the prompt's tokens)"
            raise ApiError(400, why, param=req.template_param if plan else "messages",
                           code="context_length_exceeded") from None
        job = Job(ids, history, multi, settings, req.canvas, pixels=req.pixels, template=plan)
        self.worker.submit(job)
        return job, Answer(self.tokenizer, s, req.stop, template=plan is not None), len(ids)

    async def collect(self, job: Job, answer: Answer, request) -> None:
        """Run a non-streaming job to its end; the client leaving cancels it."""
        watch = asyncio.create_task(self._watch(request, job))
        try:
            done = None
            async for ev in job.events():
                if isinstance(ev, BlockEvent):
                    answer.block(ev)
                    if answer.stopped:  # a stop string: the rest is not needed
                        job.cancel()
                        break
                elif isinstance(ev, DoneEvent):
                    done = ev
            answer.finish(done)
        finally:
            watch.cancel()

    @staticmethod
    async def _watch(request, job: Job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    # ---- responses ----

    @staticmethod
    def error_body(e: ApiError) -> dict:
        return {"message": e.message, "type": e.type, "param": e.param, "code": e.code}

    def error_response(self, e: ApiError, ollama: bool) -> JSONResponse:
        content = {"error": e.message} if ollama else {"error": self.error_body(e)}
        return JSONResponse(content, status_code=e.status, headers=e.headers)

    def authorized(self, request) -> bool:
        if not self.api_key:
            return True
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def endpoint(self, fn, ollama: bool = False, public: bool = False):
        async def handler(request):
            try:
                if not public and not self.authorized(request):
                    raise ApiError(401, "missing or wrong API key (send the header 'Authorization: Bearer KEY')")
                return await fn(self, request)
            except ApiError as e:
                return self.error_response(e, ollama)
            except DgError as e:  # bad input found by the library (settings, chat template, context)
                return self.error_response(ApiError(400, str(e)), ollama)
            except Exception as e:  # a bug: one line to the client, the traceback to the log
                traceback.print_exc(file=sys.stderr)
                return self.error_response(ApiError(500, f"internal error: {first_line(e)}"), ollama)

        return handler


async def page(ctx, request):
    return HTMLResponse(ctx.page)


def create_app(engine, tokenizer, model_name: str, *, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               cors_origin: str | None = None, max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app serving one loaded model. `app.state.ctx.worker` is its generation thread."""
    ctx = Ctx(engine, tokenizer, model_name, api_key, max_queue, max_body)
    ctx.page = PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", json.dumps(model_name).replace("<", "\\u003c"))
    e = ctx.endpoint
    routes = [
        Route("/", e(page, public=True), methods=["GET"]),
        Route("/v1/models", e(openai_api.models), methods=["GET"]),
        Route("/v1/chat/completions", e(openai_api.chat_completions), methods=["POST"]),
        Route("/v1/completions", e(openai_api.completions), methods=["POST"]),
        Route("/api/version", e(ollama_api.version, ollama=True), methods=["GET"]),
        Route("/api/tags", e(ollama_api.tags, ollama=True), methods=["GET"]),
        Route("/api/chat", e(ollama_api.chat, ollama=True), methods=["POST"]),
        Route("/api/generate", e(ollama_api.generate, ollama=True), methods=["POST"]),
    ]

    async def http_error(request, exc: HTTPException):  # unknown path, wrong method: JSON too
        what = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        err = ApiError(exc.status_code, f"{what}: {request.method} {request.url.path}")
        err.code = None
        return ctx.error_response(err, request.url.path.startswith("/api/"))

    async def server_error(request, exc: Exception):
        return ctx.error_response(ApiError(500, "internal error"), request.url.path.startswith("/api/"))

    middleware = []
    if cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                                     allow_headers=["*"]))

    @asynccontextmanager
    async def lifespan(app):
        yield
        ctx.worker.stop()
        await run_in_threadpool(ctx.worker.join, 5.0)

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.ctx = ctx
    return app


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, log=None) -> None:
    """Run the app with uvicorn until SIGTERM or Ctrl-C: then stop accepting, cancel the running
    generation and return (exit 0), within a few seconds."""
    import uvicorn

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    worker = app.state.ctx.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            worker.stop()  # the running generation stops at its next step; streams end
            super().handle_exit(sig, frame)
            self._captured_signals = []  # a clean stop: exit 0, not by raising the signal again

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and self.servers:
                bound = self.servers[0].sockets[0].getsockname()
                name = app.state.ctx.model_name
                url = f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
                log(f"dg serve: {name} at {url}  (OpenAI: {url}/v1, Ollama: {url}/api, page: {url}/); "
                    "Ctrl-C stops")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    Server(config).run()
