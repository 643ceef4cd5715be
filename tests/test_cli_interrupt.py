"""Ctrl-C while an answer is being written: `generate` exits with 130, `chat` stops the answer and goes on."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLLAMA_DEBUG", None)
    # A shell's background job starts with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "mllama", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_until(fd: int, marker: bytes, seen: bytearray, limit_s: float = 180) -> None:
    """Reads `fd` into `seen` until `marker` is in it, then drops `seen` up to the marker's end (the limit only
    turns a hang into a failure)."""
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], limit_s)
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            pytest.fail(f"no {marker!r} in the output: {bytes(seen)[-300:]!r}")
        seen += chunk
    del seen[:seen.index(marker) + len(marker)]


def assert_clean(stderr: bytes) -> None:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text and "terminate called" not in text, text
    assert len(text.strip().splitlines()) <= 1, text


def test_ctrl_c_during_generate_exits_130_without_a_traceback(tiny_checkpoint):
    proc = start("generate", "--model", str(tiny_checkpoint), "--prompt", "Tell me a long story.",
                 "--max-new-tokens", "3000", "--greedy")
    assert proc.stdout.read1(4096)  # the answer has begun
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert_clean(stderr)


def test_ctrl_c_in_chat_stops_the_answer_then_leaves_at_the_prompt(tiny_checkpoint):
    proc = start("chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "3000", "--greedy")
    out = proc.stdout.fileno()
    proc.stdin.write(b"Tell me a long story.\n")
    proc.stdin.flush()
    seen = bytearray(os.read(out, 4096))  # the answer has begun
    proc.send_signal(signal.SIGINT)
    read_until(out, b"\n(answer stopped)\n", seen)
    proc.stdin.write(b"/reset\n")  # answered: the chat is back at its prompt
    proc.stdin.flush()
    read_until(out, b"(conversation cleared)\n", seen)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert_clean(stderr)
