"""`dg serve` as a command: SIGTERM or Ctrl-C during a generation exits 0 promptly; a taken port, an empty key
are one-line usage errors before the model loads; a non-loopback host is warned about."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import dgcli.cli
import dgcli.serve
import dgcli.serve.app

ROOT = Path(__file__).resolve().parent.parent
LONG = {"max_tokens": 4096, "max_denoising_steps": 1024, "stability_threshold": 1024}  # never settles


def start_server(*args) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dgcli", "serve", "-m", "tiny", "--port", "0", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the one line saying where it listens
        if line.startswith("dg serve: tiny at "):
            return proc, line.split()[4]
    proc.kill()
    raise AssertionError(f"dg serve did not start: {proc.communicate()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_during_a_generation_exits_0(tiny, sig):
    proc, url = start_server()
    try:
        with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "dg_canvas": True,
                **LONG}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("event: canvas"):
                    break  # generating
            proc.send_signal(sig)
            rest = [x for x in lines if x]  # the stream ends: the generation was cancelled
        assert proc.wait(timeout=20) == 0
        errors = [json.loads(x[6:])["error"] for x in rest if x.startswith('data: {"error"')]
        assert errors and errors[0]["code"] == "shutting_down" and rest[-1] == "data: [DONE]"
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_taken_port_or_an_empty_key_is_one_line_before_loading(runner, monkeypatch):
    monkeypatch.setattr(dgcli.cli, "load", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = runner.invoke(dgcli.cli.app, ["serve", "-m", "tiny", "--port", str(port)])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output and "Traceback" not in r.output
    r = runner.invoke(dgcli.cli.app, ["serve", "-m", "tiny", "--port", "0"], env={"DG_API_KEY": " "})
    assert r.exit_code == 2 and "--api-key (or DG_API_KEY) is empty" in r.output


@pytest.mark.parametrize("key,words", [(None, "use the model freely"), ("k", "only clients with the API key")])
def test_a_host_other_machines_reach_is_warned_about(runner, monkeypatch, key, words):
    started = {}
    monkeypatch.setattr(dgcli.serve.app, "is_loopback", lambda host: False)  # 127.0.0.1, said to be public
    monkeypatch.setattr(dgcli.cli, "load", lambda *a, **k: ("engine", "tok"))
    monkeypatch.setattr(dgcli.serve, "create_app", lambda *a, **k: started.update(app=(a, k)))
    monkeypatch.setattr(dgcli.serve, "serve", lambda app, host, port: started.update(host=host, port=port))
    r = runner.invoke(dgcli.cli.app, ["serve", "-m", "tiny", "--port", "0"] + (["--api-key", key] if key else []))
    assert r.exit_code == 0, r.output
    assert f"warning: listening on 127.0.0.1: other machines can reach this server" in r.output and words in r.output
    assert started["host"] == "127.0.0.1" and started["app"][1]["api_key"] == key


@pytest.mark.parametrize("flag, vision", [([], True), (["--no-vision"], False)])
def test_no_vision_serves_text_only(runner, monkeypatch, flag, vision):
    """--no-vision leaves the tower out (the 18 GB plan at 32k has no room for it), as for run and chat."""
    loaded = {}
    monkeypatch.setattr(dgcli.cli, "load", lambda *a, **k: loaded.update(k) or ("engine", "tok"))
    monkeypatch.setattr(dgcli.serve, "create_app", lambda *a, **k: None)
    monkeypatch.setattr(dgcli.serve, "serve", lambda app, host, port: None)
    r = runner.invoke(dgcli.cli.app, ["serve", "-m", "tiny", "--port", "0", *flag])
    assert r.exit_code == 0, r.output
    assert loaded["vision"] is vision
