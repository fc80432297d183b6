"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, for the dg serve tests."""

from __future__ import annotations

import threading
import time

import uvicorn

from dgcli.serve import create_app


class Served:
    """`with Served(engine, tok, **create_app_kwargs) as s:` s.url, s.app, s.worker."""

    def __init__(self, engine, tokenizer, name: str = "tiny", **kwargs):
        self.app = create_app(engine, tokenizer, name, **kwargs)
        self.worker = self.app.state.ctx.worker
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def idle(self, timeout: float = 30) -> bool:
        """Wait (bounded) until nothing runs or waits; True if it got there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.worker.running is None and not self.worker.queued():
                return True
            time.sleep(0.01)
        return False
