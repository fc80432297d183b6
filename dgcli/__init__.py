"""dg: the local runner for DiffusionGemma. Python API: load, stream_generate, generate."""

__version__ = "0.1.0"

from .events import BlockEvent, DoneEvent, PrefillEvent, StepEvent  # noqa: E402
from .generate import generate, load, stream_generate  # noqa: E402

__all__ = ["load", "stream_generate", "generate", "PrefillEvent", "StepEvent", "BlockEvent", "DoneEvent",
           "__version__"]
