"""dg quantize as a process: Ctrl-C mid-way leaves nothing loadable, and RAM stays bounded.

The source is a random checkpoint of ~200 MB in the official layout, built here (reduced width,
fp32), so quantizing it takes long enough to be interrupted.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from dgcli import tiny
from dgcli.config import ModelConfig


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "src"
    tiny.write(path)  # tokenizer, template, generation config; then wider weights
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(hidden_size=256, intermediate_size=512, num_experts=32, moe_intermediate_size=256,
                              num_hidden_layers=6)
    (path / "config.json").write_text(json.dumps(cfg))
    weights = tiny.random_weights(ModelConfig.from_dict(cfg))
    save_file(weights, str(path / "model.safetensors"))
    return path


def dg(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dgcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def loadable_dirs(parent):
    return [p for p in parent.iterdir() if (p / "dg_manifest.json").exists() and (p / "config.json").exists()]


def test_interrupted_quantize_leaves_nothing_loadable(big_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = dg("quantize", str(big_ckpt), str(out))
    time.sleep(0.2)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
        time.sleep(0.05)  # wait until it is writing
    assert proc.poll() is None, "quantize finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    assert not out.exists()
    assert loadable_dirs(tmp_path) == []


def test_quantize_ram_stays_bounded(big_ckpt, tmp_path):
    size = (big_ckpt / "model.safetensors").stat().st_size
    assert size > 150e6
    base = subprocess.run([sys.executable, "-c", "import resource, torch, dgcli.cli, quant.convert; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, check=True)
    baseline = int(base.stdout) * 1024
    code = ("import resource, sys; from quant.convert import quantize_checkpoint; "
            f"quantize_checkpoint({str(big_ckpt)!r}, __import__('pathlib').Path({str(tmp_path / 'q')!r}), progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(run.stdout.split()[-1]) * 1024
    print(f"baseline {baseline / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB, checkpoint {size / 1e6:.0f} MB")
    assert peak - baseline < 0.5 * size, (peak, baseline, size)
