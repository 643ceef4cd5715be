"""What stands between the network and the app: the listening socket, the descriptor budget, the HTTP protocol.

* The socket is bound before the model loads, so a port in use or an address of another machine fails at once
  as one line, not after minutes of loading (and not after a banner saying the server is up).
* Every connection holds a file descriptor. uvicorn closes a connection only between requests (keep-alive) or
  once a request is answered, so sockets that connect and never send a request head (or send one header byte
  every few seconds) were held forever; past RLIMIT_NOFILE accept() fails and the server stops answering,
  `/health` included. `GuardedH11Protocol` gives a request head a deadline and caps open connections.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import math
import os
import socket
import sys
import time
from collections import OrderedDict

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..loading import CliError

# After the deadline the engine still has to end its current step and send the aborts, and each stream its last
# chunk; connections still open this long after the deadline are cut by uvicorn.
SHUTDOWN_MARGIN = 5.0
# Connections the kernel queues for accept(). It is also how many asyncio accepts in one go, before any protocol
# sees them (and before the connection cap can close idle ones): the descriptor budget leaves room for a burst.
BACKLOG = 512


def port_number(text: str) -> int:
    """argparse type of --port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number: use 1..65535 (0: any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number: use 1..65535 (0: any free port)")
    return port


def listen_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A socket bound to host:port and listening; CliError names the flag at fault. Connections made before the
    server runs wait in the backlog and are answered once it does."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise CliError(f"--host {host!r} is neither an IP address nor a name this machine resolves ({e.strerror}): "
                       "use e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    try:
        # a restart must not wait for the last run's connections in TIME_WAIT to expire
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CliError(_bind_error(host, port, e)) from None
    return sock


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"--port {port}: {where} is in use (another server listens there): stop it or choose another --port"
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host!r} is not an address of this machine: use one of its addresses, 127.0.0.1 (this "
                "machine only) or 0.0.0.0 (every interface)")
    if e.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need privileges): use a port in 1024..65535"
    return f"cannot listen on {where}: {e.strerror or e}"


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one (the usual soft 1024 is a few hundred idle clients away) and
    returns the limit in force."""
    try:
        import resource
    except ImportError:  # not on this platform: guess the common default
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def descriptors_in_use() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 256


def default_max_connections(fd_limit: int) -> int:
    """Of the descriptors left now that the engine and the input workers run, less a burst of accepts (BACKLOG)
    and 64 for what the server opens later, half (a request may hold a second one while it fetches a remote
    image); at most 8192."""
    free = fd_limit - descriptors_in_use() - BACKLOG - 64
    return max(16, min(8192, free // 2))


def concurrency_limit(max_connections: int) -> int:
    """uvicorn's limit_concurrency: a request that arrives while more than this many connections are open (or
    requests run) is answered 503. uvicorn counts connections closed to make room until the loop's next turn, so
    the limit leaves that much room above the cap; it is only reached when every open connection has a request
    running and newcomers had to be let in over the cap."""
    return max_connections + 64


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two limits of its own (set by `protocol_class`):

    * A request head must be complete within `header_timeout` seconds: counted from the connection's opening for
      its first request, from the first byte of the next one on a kept-alive connection (the idle time between
      requests is the keep-alive timeout's, as in uvicorn). A connection that sends nothing, or sends a header
      byte every few seconds, is closed. The timer is not restarted by bytes: only a complete head stops it.
    * At most `max_connections` are open. A new connection past the cap closes the one that has been waiting
      longest for a request head (kept alive or still sending it): a flood of idle sockets takes the place of
      other idle sockets, never of a request that is running, nor the descriptors that new clients need.
    """

    header_timeout: float = 10.0
    max_connections: int = 1024
    # one server's connections waiting for a request head, in the order they started waiting; and those closed
    # to make room that the loop has not yet reported lost
    waiting: OrderedDict
    evicted: set

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_timer: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a bad Content-Length or chunk size, bytes no header may hold): 400 in
        OpenAI's error shape, as every other answer, then the connection closes."""
        body = json.dumps({"error": {"message": f"the request is not valid HTTP/1.1 ({msg})",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "bad_http_request"}}).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=head, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # an answer had started already: nothing more can be said over HTTP
            pass
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        self._update()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and self._between_requests():
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_head_timer()
        self.waiting.pop(self, None)
        self.evicted.discard(self)

    def _between_requests(self) -> bool:
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    def _update(self) -> None:
        if self.transport.is_closing():
            self.waiting.pop(self, None)
        elif self._between_requests():
            self.waiting.setdefault(self, None)  # a new place only when it starts waiting, not per byte
        else:  # a head has come: its request runs
            self._cancel_head_timer()
            self.waiting.pop(self, None)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()  # no response: h11 has no request to answer

    def _make_room(self) -> None:
        while len(self.connections) - len(self.evicted) > self.max_connections:
            victim = next((c for c in self.waiting if c is not self), None)
            if victim is None:  # every other connection runs a request: let this one in over the cap
                return
            del self.waiting[victim]
            self.evicted.add(victim)
            victim.transport.close()


def protocol_class(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol for one server (uvicorn.Config(http=...) takes a class)."""
    return type("ServerH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections, "waiting": OrderedDict(),
                 "evicted": set()})


class _DropCancelledTracebacks(logging.Filter):
    """uvicorn logs a traceback for every request it cancels past the graceful-shutdown timeout, after one line
    that says how many it cancels; that line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class Server(uvicorn.Server):
    """uvicorn's server that stops the engine as soon as a signal asks it to, with the shutdown deadline: the
    engine lets running requests go on until then and aborts the rest, and every request ends through the
    normal path (a stream with a last chunk that has a finish_reason, then `data: [DONE]`), before uvicorn's own
    graceful-shutdown timeout, which is the deadline plus SHUTDOWN_MARGIN."""

    def __init__(self, config: uvicorn.Config, engine, deadline: float):
        super().__init__(config)
        self.engine, self.deadline = engine, deadline
        self.out_of_descriptors_said = -math.inf
        logging.getLogger("uvicorn.error").addFilter(_DropCancelledTracebacks())

    def handle_exit(self, sig, frame) -> None:
        import signal

        super().handle_exit(sig, frame)
        # uvicorn re-raises the captured signal after its graceful shutdown, so the process would end "killed
        # by SIGTERM" (143); SIGTERM is the orderly way to stop a service, so end with status 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        await super().startup(sockets)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Out of descriptors (a burst of connections faster than the cap closes idle ones, or descriptors used
        # elsewhere): asyncio stops accepting for a second and logs a traceback each time. One line a minute.
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            now = time.monotonic()
            if now - self.out_of_descriptors_said > 60:
                self.out_of_descriptors_said = now
                print(f"mllama serve: out of file descriptors ({context.get('exception')}): new connections wait",
                      file=sys.stderr, flush=True)
            return
        # That pause's timer, when it fires after shutdown closed the socket, fails on the closed descriptor.
        if self.should_exit and isinstance(context.get("exception"), ValueError) and \
                "_start_serving" in repr(context.get("handle")):
            return
        loop.default_exception_handler(context)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        count = self.engine.inflight
        print(f"mllama serve: shutting down, {count} request{'' if count == 1 else 's'} in flight, deadline "
              f"{self.deadline:g} s", file=sys.stderr, flush=True)
        self.engine.stop_soon(self.deadline)
        await super().shutdown(sockets)
