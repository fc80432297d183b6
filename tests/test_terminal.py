"""dg as a user runs it: a real pseudo-terminal for `dg chat`, real pipes for `dg run` and `dg pull`.

Every generation is seeded, so each test sees the same answers every run. The ones that generate are
`slow` (a fresh interpreter loads torch and the model each time): `pytest -m "not slow"` skips them.
"""

import os
import signal
import subprocess
import sys

import pytest

DG = [sys.executable, "-m", "dgcli"]
# Tiny, raw "the", seed 0, 2 steps a block: an answer of 5 blocks, so a reader can leave or
# interrupt it after the first one while dg still has blocks to write.
LONG_RUN = ["run", "--model", "tiny", "--raw", "--max-tokens", "4096", "--steps", "2", "--seed", "0", "--device", "cpu",
            "the"]


def env(tmp_path, **extra):
    e = dict(os.environ, DG_HOME=str(tmp_path), TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", **extra)
    e.pop("NO_COLOR", None)
    return e


@pytest.mark.slow
def test_chat_in_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "dgcli", "chat", "--model", "tiny", "--fps", "20", "--seed", "0"],
                          env=env(tmp_path), dimensions=(40, 120), encoding="utf-8", timeout=120)
    try:
        child.expect_exact("dg chat · tiny")
        child.expect_exact(">>>")
        child.sendline("/set max_new_tokens 32")
        child.expect_exact("max_new_tokens = 32")
        child.sendline("/set steps 4")
        child.expect_exact("max_denoising_steps = 4")
        child.sendline("hello there")
        child.expect("step +[1-4]/4")  # a canvas frame: its status line
        child.expect_exact("accepted")
        child.expect(r"\d+ tokens · 1 block")  # the answer is done: its stats line
        child.expect_exact(">>>")

        child.sendline("/set max_new_tokens 2048")
        child.expect_exact("max_new_tokens = 2048")
        child.sendline("/set steps 48")
        child.expect_exact("max_denoising_steps = 48")
        child.sendline("tell me a long story")
        child.expect("step +\\d+/48")  # generating
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>>")
        child.sendline("/show")  # still alive, and the interrupted turn is in the transcript
        child.expect(r"messages\s+4")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.slow
def test_ctrl_c_twice_at_the_prompt_leaves(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "dgcli", "chat", "--model", "tiny", "--seed", "0"], env=env(tmp_path),
                          dimensions=(40, 120), encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>>")
        child.sendintr()
        child.expect_exact("Ctrl-C again")
        child.expect_exact(">>>")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_closed_pipe_ends_quietly(tmp_path):
    cmd = f"echo hi | {' '.join(DG)} run --model tiny --max-tokens 64 --steps 2 --seed 0 | head -c 5; " \
          f"echo \" ${{PIPESTATUS[1]}}\""
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env(tmp_path), timeout=300)
    out, status = p.stdout.rsplit(" ", 1)
    assert len(out) <= 5 and int(status) in (0, 141)
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr


@pytest.mark.slow
def test_closed_pipe_mid_answer_exits_141(tmp_path):
    # Read a little of a long answer, then close the pipe while dg still has blocks to write.
    p = subprocess.Popen([*DG, *LONG_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(tmp_path))
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == "", err


def test_pull_with_the_hub_unreachable(tmp_path):
    p = subprocess.run([*DG, "pull", "google/diffusiongemma-26B-A4B-it"],
                       capture_output=True, text=True, timeout=120,
                       env=env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9",
                               HF_HUB_CACHE=str(tmp_path / "hf")))
    assert p.returncode == 1
    assert p.stderr == "error: cannot download google/diffusiongemma-26B-A4B-it: the Hugging Face Hub could not " \
                       "be reached\n"
    assert not any((tmp_path / "hf").glob("*/snapshots/*/config.json"))  # nothing registered


def test_python_m_dgcli(tmp_path):
    p = subprocess.run([*DG, "--version"], capture_output=True, text=True, env=env(tmp_path))
    assert p.returncode == 0 and p.stdout.startswith("dg ")


@pytest.mark.slow
def test_ctrl_c_during_run_exits_130(tmp_path):
    p = subprocess.Popen([*DG, *LONG_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(tmp_path))
    p.stdout.read(1)  # the first block is out: generation is under way
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and b"Traceback" not in err, err
