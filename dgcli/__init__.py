"""dg: the local runner for DiffusionGemma. Python API: load, stream_generate, generate, fill.

The API is imported lazily so that `dg --version`, `dg list` and `--help` start without torch.
"""

__version__ = "0.1.0"

_API = {
    "load": "api", "stream_generate": "api", "generate": "api", "prefill": "api", "Engine": "engine",
    "fill": "api", "FillResult": "filling",
    "PrefillEvent": "events", "StepEvent": "events", "BlockEvent": "events", "DoneEvent": "events",
}
__all__ = [*_API, "__version__"]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'dgcli' has no attribute {name!r}")
