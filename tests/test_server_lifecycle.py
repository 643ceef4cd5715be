"""`mllama serve` from start to exit under careless and hostile use: ports and hosts it cannot serve, connections
that never send a request, a flood of idle sockets at the descriptor limit, SIGTERM while requests run, the
engine process killed. Servers are subprocesses on the tiny checkpoint (test_server's Server helper); every wait
is for something observable (a line of output, a metric, a socket closed by the server), under a hang guard."""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx2 as httpx
import pytest

from test_server import MODEL, ROOT, Server
from waiting import GUARD, wait_until

CLOSE_GUARD = 60.0  # seconds a socket may take to be closed by the server: far above the 1 s deadlines used


def _serve(*args: str) -> subprocess.Popen:
    """`python -m mllama.server ARGS` that is expected to fail before it serves."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mllama.server", *args, "--device", "cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _failure(proc: subprocess.Popen) -> tuple[int, list[str]]:
    out, _ = proc.communicate(timeout=GUARD)
    return proc.returncode, out.strip().splitlines()


def _closed_by_server(sock: socket.socket, guard: float = CLOSE_GUARD) -> bool:
    """True once the server has closed `sock` (end of stream or reset) with nothing more sent."""
    sock.settimeout(guard)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _trickled_until_closed(sock: socket.socket, guard: float = CLOSE_GUARD) -> int:
    """Sends one header byte whenever the server has said nothing for 0.2 s, until it closes the connection;
    returns how many bytes went out. Fails after `guard` seconds."""
    sent = 0

    def closed() -> bool:
        nonlocal sent
        readable, _, _ = select.select([sock], [], [], 0.2)  # the pause between two bytes of a slow client
        if readable:
            return _closed_by_server(sock, 1.0)
        try:
            sent += sock.send(b"a")
        except (BrokenPipeError, ConnectionResetError):
            return True
        return False

    wait_until(closed, "the server to close a connection whose request head never ends", guard=guard, poll=0)
    return sent


def _response_head_and_body(sock: socket.socket) -> bytes:
    """Reads one HTTP response with a Content-Length (what /health answers)."""
    sock.settimeout(CLOSE_GUARD)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before the response head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_GUARD)


# --- start-up errors: one line, non-zero exit, no banner ---------------------------------------------------------


def test_unservable_port_or_host_is_one_line_before_loading(tiny_checkpoint):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    try:
        runs = {  # started together: each is an interpreter start-up, not a model load
            "range": _serve(str(tiny_checkpoint), "--port", "99999"),
            "in use": _serve(str(tiny_checkpoint), "--port", port),
            # a model that does not exist: the port is found taken before the model is looked at
            "in use, no model": _serve(str(ROOT / "no-such-checkpoint"), "--port", port),
            "host": _serve(str(tiny_checkpoint), "--host", "192.0.2.1", "--port", "0"),  # TEST-NET: not ours
        }
        results = {name: _failure(proc) for name, proc in runs.items()}
    finally:
        taken.close()
    for name, (code, lines) in results.items():
        assert code != 0 and len(lines) == 1, (name, code, lines)
        assert "Traceback" not in lines[0] and " on http://" not in lines[0], (name, lines)
    assert results["range"][0] == 2
    assert "--port" in results["range"][1][0] and "99999" in results["range"][1][0] \
        and "1..65535" in results["range"][1][0]
    for name in ("in use", "in use, no model"):
        assert f"--port {port}" in results[name][1][0] and "in use" in results[name][1][0], results[name]
    assert "--host '192.0.2.1'" in results["host"][1][0] and "0.0.0.0" in results["host"][1][0]


def test_served_name_is_the_model_argument_as_given():
    from mllama.server import add_arguments, served_model_name

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    hub_id = "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert served_model_name(parser.parse_args([hub_id])) == hub_id
    assert served_model_name(parser.parse_args(["./checkpoints/tiny/"])) == "./checkpoints/tiny/"
    assert served_model_name(parser.parse_args([hub_id, "--served-model-name", "llama"])) == "llama"


def test_timeouts_are_documented():
    from mllama.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--timeout-request-header" in text and "--timeout-keep-alive" in text and "default 75" in text
    assert "--max-connections" in text
    args = parser.parse_args(["m"])
    assert (args.timeout_request_header, args.timeout_keep_alive) == (10.0, 75.0)


# --- idle and slow connections -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    s = Server(tiny_checkpoint, "--timeout-request-header", "1", "--timeout-keep-alive", "1")
    yield s
    assert s.stop() == 0


def test_connection_that_sends_nothing_is_closed(guarded):
    with _connect(guarded) as sock:
        assert _closed_by_server(sock)
    assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200


def test_slowloris_is_closed_though_bytes_keep_coming(guarded):
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # one byte every 0.2 s is five per --timeout-request-header: only a deadline on the whole head ends it
        assert _trickled_until_closed(sock) >= 1


def test_kept_alive_connection_closed_when_idle_and_when_its_next_head_is_slow(guarded):
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response_head_and_body(sock).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(sock)  # --timeout-keep-alive 1
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response_head_and_body(sock).startswith(b"HTTP/1.1 200")
        # the next request's first byte stops the keep-alive timer; the head must still end in time
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        assert _trickled_until_closed(sock) >= 1


# --- a flood of idle sockets at the descriptor limit -------------------------------------------------------------


def _accept_queue(port: int) -> int:
    """Connections waiting for the server's accept() on `port` (rx_queue of its listening socket)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # 0A: LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listening socket on port {port}")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_idle_flood_at_the_descriptor_limit_leaves_health_answering(tiny_checkpoint):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # started with a soft limit below the hard one (inherited), which the server raises
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(256, hard // 2), hard))
    try:
        s = Server(tiny_checkpoint, "--max-connections", "8", "--timeout-request-header", "600")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sockets = []
    try:
        limits = Path(f"/proc/{s.proc.pid}/limits").read_text()
        server_soft, server_hard = next(line.split()[3:5] for line in limits.splitlines()
                                        if line.startswith("Max open files"))
        assert server_soft == server_hard
        # Now hold the server to 32 descriptors above what it uses: 8 kept connections, a burst of 16 accepts
        # before the cap closes the oldest, room for /health. 64 idle sockets would take all of them.
        in_use = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
        resource.prlimit(s.proc.pid, resource.RLIMIT_NOFILE, (in_use + 32, in_use + 32))

        def state() -> tuple[int, int]:  # (connections waiting for accept(), the server's descriptors beyond before)
            return _accept_queue(s.port), len(os.listdir(f"/proc/{s.proc.pid}/fd")) - in_use

        for _ in range(4):  # in bursts of 16, each accepted and the cap enforced before the next
            sockets += [_connect(s) for _ in range(16)]
            wait_until(lambda: state()[0] == 0 and state()[1] <= 8 + 4,
                       "every connection accepted and the server back to 8 of them (+4 of slack)", state=state)
        assert httpx.get(s.url + "/health", timeout=GUARD).status_code == 200
        # the oldest idle connections made room, oldest first (the 8 newest may remain)
        assert all(_closed_by_server(sock) for sock in sockets[:48])
        assert httpx.get(s.url + "/health", timeout=GUARD).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
        assert s.stop() == 0
    s._reader.join(GUARD)  # the rest of what the server printed
    assert "Traceback" not in "".join(s.output)


# --- SIGTERM with requests running -------------------------------------------------------------------------------


def test_sigterm_ends_running_requests_with_a_final_event(tiny_checkpoint):
    # Two requests of 4,000 tokens (--max-model-len 4096 overrides the helper's 512): tens of seconds of decoding,
    # so both still run at the 2 s deadline. A request head deadline of 0.5 s must not cut them either.
    s = Server(tiny_checkpoint, "--shutdown-timeout", "2", "--max-model-len", "4096",
               "--timeout-request-header", "0.5")
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4000, "temperature": 0}
    plain = {}

    def not_streamed():
        plain["response"] = httpx.post(s.url + "/v1/completions", json=body, timeout=GUARD)

    worker = threading.Thread(target=not_streamed)
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=GUARD) as r:
            lines = r.iter_lines()
            assert any(line.startswith("data: {") and '"text": ""' not in line for line in lines)  # tokens flow
            worker.start()
            wait_until(lambda: s.metric("mllama_running_requests") == 2, "both requests to run",
                       state=lambda: s.metric("mllama_running_requests"))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        worker.join(GUARD)
        assert not worker.is_alive(), "the request that was not streamed never came back"
        assert s.proc.wait(GUARD) == 0
    finally:
        s.stop()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    last = json.loads(rest[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "abort", last
    assert plain["response"].status_code == 200 and plain["response"].json()["choices"][0]["finish_reason"] == "abort"
    s._reader.join(GUARD)  # the rest of what the server printed
    output = [line.rstrip("\n") for line in s.output]
    assert not any("Traceback" in line or "Error" in line for line in output), output
    # the access log has a line per request (the two aborted ones among them); the server's own lines are these
    output = [line for line in output if not re.match(r"\d{4}-\d\d-\d\dT[\d:]+ \S+ [A-Z]+ /", line)]
    at = [i for i, line in enumerate(output) if "shutting down" in line]
    assert len(at) == 1 and output[at[0]] == "mllama serve: shutting down, 2 requests in flight, deadline 2 s", output
    assert output[at[0] + 1:] == ["mllama serve: stopped; 2 requests aborted at the deadline"], output


def test_input_workers_are_joined_before_exit(tiny_checkpoint):
    """At exit, Python 3.11 wakes every process pool's manager thread through a pipe; a pool shut down without
    waiting still has that thread closing the pipe, and the wake-up fails ("OSError: Bad file descriptor",
    after 2 of 6 SIGTERMs here). The server's close leaves no manager thread running."""
    from concurrent.futures.process import _ExecutorManagerThread
    from types import SimpleNamespace

    from mllama.server import _close_input_workers
    from mllama.server.app import InputWorkers

    workers = InputWorkers(str(tiny_checkpoint), 1)
    _close_input_workers(SimpleNamespace(state=SimpleNamespace(input_workers=workers)))
    assert not [t for t in threading.enumerate() if isinstance(t, _ExecutorManagerThread) and t.is_alive()]


# --- the engine process killed -----------------------------------------------------------------------------------


def test_engine_death_is_logged_and_health_says_why(tiny_checkpoint):
    s = Server(tiny_checkpoint)
    try:
        os.kill(s.engine_pid, signal.SIGKILL)
        reason = "the engine process ended: killed by signal 9 (SIGKILL)"
        line = wait_until(lambda: next((x for x in list(s.output) if reason in x), None),
                          "the server to log the engine's death", state=lambda: "".join(s.output[-5:]))
        assert line.startswith("mllama serve: ")
        health = httpx.get(s.url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["message"] == reason, health.text
    finally:
        assert s.stop() == 0
    s._reader.join(GUARD)
    assert "Traceback" not in "".join(s.output)
    assert sum("engine process ended" in line for line in s.output) == 1
