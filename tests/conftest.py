import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's data directory; helper modules (tests/reference.py) import by name.
os.environ["DG_HOME"] = tempfile.mkdtemp(prefix="dg-test-home-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models' ops are too small to gain from a second thread, and on a shared 2-core machine
# it mostly waits: one thread is ~2.5x faster in wall time here (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_dir():
    from dgcli import store

    return store.resolve("tiny")


@pytest.fixture(scope="session")
def tiny():
    import dgcli

    return dgcli.load("tiny", device="cpu")


def _cuda_layout_sdpa(sdpa):
    """SDPA returning the same values in the stride order of CUDA's memory-efficient kernel (the one
    a bool mask gets): a transposed view of a [B, T, H, D] buffer, which `.view` cannot reshape."""

    def wrapped(q, k, v, *args, **kwargs):
        y = sdpa(q, k, v, *args, **kwargs)  # (B, H, T, D)
        return y.transpose(1, 2).contiguous().transpose(1, 2)

    return wrapped


@pytest.fixture(params=["cpu-layout", "cuda-layout"])
def sdpa_layout(request, monkeypatch):
    """Run a fast-path test with the CPU's SDPA output layout, then with CUDA's."""
    if request.param == "cuda-layout":
        import torch.nn.functional as F

        monkeypatch.setattr(F, "scaled_dot_product_attention", _cuda_layout_sdpa(F.scaled_dot_product_attention))
    return request.param


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh dg data directory (home / "dg") and an empty Hugging Face cache (home / "hf") for this test."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("DG_HOME", str(tmp_path / "dg"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture(scope="module")
def server(tiny):
    """dg serve on tiny: a real uvicorn server on 127.0.0.1 (tests/serve_helpers.py), one per module."""
    from serve_helpers import Served

    with Served(*tiny) as s:
        yield s


@pytest.fixture
def client(server):
    """The official `openai` client pointed at `server`."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels on CPU tensors through the interpreter (DG_KERNELS=triton), with fp32 -> bf16
    casts rounded to nearest as the GPU does (tests/test_kernels_norm.py `_round_bf16_casts`).
    Kernel test modules whose interpreter needs differ define their own `interpret`."""
    from test_kernels_norm import _round_bf16_casts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DG_KERNELS", "triton")
    _round_bf16_casts(monkeypatch)
