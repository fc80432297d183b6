import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's data directory; helper modules (tests/reference.py) import by name.
os.environ["DG_HOME"] = tempfile.mkdtemp(prefix="dg-test-home-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_dir():
    from dgcli import store

    return store.resolve("tiny")


@pytest.fixture(scope="session")
def tiny():
    import dgcli

    return dgcli.load("tiny", device="cpu")
