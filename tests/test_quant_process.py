"""dg quantize as a process: Ctrl-C mid-way leaves nothing loadable, and RAM stays bounded.

The interruption holds the quantizer after its first tensor (on the tiny model) and signals once it
is there. The memory bound needs a source large enough to measure: a random checkpoint of ~200 MB in
the official layout, built here (reduced width, fp32).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
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


# `dg quantize` (dgcli.cli.main) with convert_tensor held after its first tensor, until Ctrl-C: the
# file argv[1] says that point is reached, so the signal lands mid-way whatever the machine's speed.
HELD_QUANTIZE = """
import pathlib, signal, sys
import quant.convert as convert
real, ready = convert.convert_tensor, pathlib.Path(sys.argv[1])

def held(*a, **k):
    out = real(*a, **k)
    if not ready.exists():
        ready.write_text("one tensor converted")
        signal.pause()  # until SIGINT raises KeyboardInterrupt here
    return out

convert.convert_tensor = held
sys.argv = ["dg", *sys.argv[2:]]
from dgcli.cli import main
main()
"""


def wait_for(path, proc, err, timeout=120):
    """Until `path` exists; fails if the process exits first or after `timeout` seconds (a bound, not a measure)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"dg quantize exited ({proc.returncode}) before converting a tensor: {err.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dg quantize converted no tensor within {timeout} s: {err.read_text()}")
        time.sleep(0.05)


@pytest.mark.slow
def test_interrupted_quantize_leaves_nothing_loadable(tiny_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out, ready, err = work / "out", tmp_path / "ready", tmp_path / "stderr"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", HELD_QUANTIZE, str(ready), "quantize", str(tiny_dir), str(out)],
                                stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(ready, proc, err)
            assert [p.name.startswith(".out.partial-") for p in work.iterdir() if p.suffix != ".lock"] == [True]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
    assert b"Traceback" not in err.read_bytes()
    assert list(work.iterdir()) == []  # no OUT, no partial directory: nothing loadable


@pytest.mark.slow
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
