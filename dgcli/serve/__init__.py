"""dg serve: an OpenAI- and Ollama-compatible HTTP server for one loaded model, with a page (GET /)
that shows the live canvas. app.py builds the Starlette app and runs uvicorn; openai_api.py and
ollama_api.py turn requests into GenRequests (common.py) and events into responses; worker.py runs
one generation at a time from a bounded FIFO queue; tools.py splits the thought and tool calls out
of an answer. docs/serve.md describes the endpoints."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
