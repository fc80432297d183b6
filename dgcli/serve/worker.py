"""One model, one generation at a time: a FIFO queue of bounded length feeding one thread that owns
the engine (and the chat session whose KV cache a continued conversation reuses).

Handlers `submit` a Job and read its events (`async for ev in job.events()`); the worker thread
posts them onto the handler's event loop. `job.cancel()` (the client left, a stop string was found,
the server stops) drops a waiting job, or closes a running generation between two steps.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys
import threading
import time
import traceback
from collections import deque

from ..canvas_view import TokenPieces
from ..errors import DgError, first_line
from ..events import StepEvent
from ..session import ChatSession
from .common import ApiError

_END = object()


class Job:
    def __init__(self, ids: list[int], history: list[int] | None, multi_turn: bool, settings: dict,
                 canvas: bool = False, pixels=(), template=None):
        self.ids, self.history, self.multi_turn = ids, history, multi_turn
        self.settings, self.canvas = settings, canvas
        self.pixels, self.template = list(pixels), template  # the images' patches; a filling.Plan
        # Image spans are runs of one token id whatever the image: the cache is reused only where the
        # images are the same too.
        self.image_keys = [hashlib.sha256(p.pixels.tobytes()).hexdigest() for p in self.pixels]
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reused = 0  # prompt tokens taken from the cache
        self.frame_unread = False  # a canvas frame waits for the client: newer ones are dropped

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is gone (server stopping)
            self.cancel()

    async def events(self):
        """The job's events (StepEvents as canvas dicts when asked for); an ApiError if it failed.
        Leaving the loop early cancels the job."""
        try:
            while True:
                item = await self.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, dict):
                    self.frame_unread = False
                yield item
        finally:
            self.cancel()


class Worker:
    def __init__(self, engine, tokenizer, max_queue: int = 16):
        self.session = ChatSession(engine, tokenizer)
        self.tokenizer, self.max_queue = tokenizer, max_queue
        self.pieces = TokenPieces(tokenizer)
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.stopping = False
        self.cond = threading.Condition()
        # the last request's history, prompt length and image keys
        self.prev: tuple[list[int] | None, int, list[str]] = (None, 0, [])
        self.seconds = 1.0  # a running mean of a request's time, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="dg-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise ApiError(503, "the server is shutting down")
            self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= self.max_queue:
                wait = max(1, math.ceil(self.seconds * (len(self.waiting) + 1)))
                raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry in {wait} s",
                               headers={"Retry-After": str(wait)})
            self.waiting.append(job)
            self.cond.notify()

    def queued(self) -> int:
        with self.cond:
            return sum(not j.cancelled.is_set() for j in self.waiting)

    def stop(self) -> None:
        """Refuse new jobs, cancel the running one and those waiting (they get a 503)."""
        with self.cond:
            self.stopping = True
            if self.running is not None:
                self.running.cancel()
            for job in self.waiting:
                job.post(ApiError(503, "the server is shutting down"))
            self.waiting.clear()
            self.cond.notify_all()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                job = self.waiting.popleft()
                if job.cancelled.is_set():
                    job.post(_END)
                    continue
                self.running = job
            t0 = time.perf_counter()
            try:
                self._run(job)
            except DgError as e:  # checked before compute: too long for the context, bad settings
                job.post(ApiError(400, str(e)))
            except Exception as e:  # a bug: the log gets the traceback, the client one line
                traceback.print_exc(file=sys.stderr)
                job.post(ApiError(500, f"internal error: {first_line(e)}"))
            finally:
                with self.cond:
                    self.running = None
                if self.stopping and job.cancelled.is_set():
                    job.post(ApiError(503, "the server is shutting down"))
                job.post(_END)
                self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - t0)

    def _run(self, job: Job) -> None:
        (prev, prev_len, prev_keys), self.prev = self.prev, (job.history, len(job.ids), job.image_keys)
        # A request computes its answer exactly as `dg run` would, unless it continues the previous
        # request's conversation (starts with it and goes on past its prompt: a repeated request
        # does not): then the cache's shared prefix is reused, as dg chat reuses it. A multi-turn
        # conversation is encoded in two parts (the history is marked), so that its next turn can
        # come back to it; a single turn in one piece, as `dg run` encodes it.
        continues = (prev is not None and job.history is not None and len(job.history) > prev_len
                     and job.ids[:len(prev)] == prev and job.image_keys[:len(prev_keys)] == prev_keys)
        extra = {"pixels": job.pixels} if job.pixels else {}
        if job.template is not None:
            extra["template"] = job.template
        events = self.session.generate(job.ids, job.history if job.multi_turn else None, job.settings,
                                       reuse=continues, **extra)
        try:
            for ev in events:
                if job.cancelled.is_set() or self.stopping:
                    return
                job.reused = self.session.last_reused
                if isinstance(ev, StepEvent):
                    if job.canvas and not job.frame_unread:  # a slow reader skips frames, as a slow terminal
                        job.frame_unread = True
                        job.post(self.canvas(ev))
                else:
                    job.post(ev)
        finally:
            events.close()

    def canvas(self, ev: StepEvent) -> dict:
        """What the page draws for one step: the canvas's tokens as they read (accepted ones marked),
        and the draft (the argmax a commit would keep) as text."""
        out = {"block": ev.block, "step": ev.step, "max_steps": ev.max_steps, "tokens": self.pieces(ev.canvas),
               "accepted": "".join("1" if a else "0" for a in ev.accepted), "accepted_count": sum(ev.accepted),
               "draft": self.tokenizer.decode(ev.argmax, skip_special_tokens=True), "stopped": ev.stopped,
               "seconds": ev.seconds}
        if ev.pinned is not None:  # a template's fixed positions, as `accepted`
            out["pinned"] = "".join("1" if p else "0" for p in ev.pinned)
        return out
