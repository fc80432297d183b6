"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, for the dg serve tests."""

from __future__ import annotations

import threading
import time

import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from dgcli.serve import create_app
from dgcli.tokenizer import Tokenizer

Q = '<|"|>'  # Gemma 4's string quote in tool calls
SPECIAL = ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", Q, "<eos>"]


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


def pieces_tokenizer():
    """(tokenizer, ids): a tokenizer whose tokens are given pieces of text (decoded by concatenation)
    and Gemma 4's markers, with a chat template that renders the last message; ids(*pieces) -> ids."""
    words = ["thought", "\n", "Let me check.", "Sure.", " It is sunny.", "call:get_weather{city:", "Paris",
             ",days:3}", "call:broken{", "x"]
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="x"))
    tok.add_special_tokens(SPECIAL)
    tok.decoder = decoders.Fuse()
    return Tokenizer(tok, "{{ messages[-1].content }}", {}), lambda *ps: [vocab[p] for p in ps]
