"""The batch engine behind the HTTP server, in its own process (`EngineProcess`) or in this one (`LocalEngine`).

Why a process: the engine thread needs the GIL for every decode step (graph replay, sampling, detokenising,
stop strings) and for the Python-bound text prefill, while the HTTP side needs it for every request body (JSON
of a multi-megabyte data URL) and every streamed chunk (one per running request per step). Sharing one GIL, the
two slowed each other down: on the H200, the same engine gave 2,804 tok/s alone and 1,482 tok/s behind HTTP at
concurrency 64 (bench/results/2026-11-29-h200-serve-load.json). Apart, each has its own interpreter.

Wire format (a multiprocessing pipe, one writer thread per side):
  server -> engine: ("submit", [(rid, fields), ...]), ("cancel", rid), ("stats", token), ("stop", deadline)
  engine -> server: ("ready", info) or ("failed", reason) first; then ("events", [(rid, event tuple), ...]),
                    ("stats", token, dict), ("failed", reason) before it exits after a failure, ("stopped",)
Image tensors travel as numpy arrays (`pack_tensors`), bf16/fp16 as int16 views of the same bytes.
Every request ends with exactly one final event (finish_reason or error); the server counts requests in flight
from submit to that event, which is the engine's own admission rule (running + waiting <= slots + queue), so a
full server answers 429 at once without asking the engine.
Stopping: after ("stop", deadline) the engine lets its requests run until the deadline and aborts the rest (each
with its final event), then answers ("stopped",). The server closes its end once its two pipe threads have
ended; the engine process exits at the end of the pipe.
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from ..engine.requests import Event, GenerationRequest, check_length
from ..engine.scheduler import EngineStopped, QueueFull

_VIEWS = {"bfloat16": "int16", "float16": "int16"}


def pack_tensors(tensors: dict) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (numpy array, torch dtype name): plain bytes for a pipe (numpy has no bfloat16)."""
    import torch

    out = {}
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        view = t.view(getattr(torch, _VIEWS[dtype])) if dtype in _VIEWS else t
        out[name] = (view.contiguous().numpy(), dtype)
    return out


def unpack_tensors(packed: dict[str, tuple[np.ndarray, str]]) -> dict:
    import torch

    out = {}
    for name, (array, dtype) in packed.items():
        t = torch.from_numpy(np.ascontiguousarray(array))
        out[name] = t.view(getattr(torch, dtype)) if dtype in _VIEWS else t
    return out


def _event_tuple(e: Event) -> tuple:
    return (e.text, e.token_ids, e.logprobs, e.finish_reason, e.prompt_tokens, e.completion_tokens, e.error)


def _final(e: Event) -> bool:
    return bool(e.finish_reason or e.error)


class _Outbox:
    """The only writer of a pipe end: callers post from any thread, one thread sends what has piled up, events
    of a burst (a decode step's) in one message. The engine thread never blocks on a slow reader."""

    def __init__(self, conn):
        self.conn = conn
        self.cond = threading.Condition()
        self.events: list[tuple[int, tuple]] = []
        self.controls: list[tuple] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="mllama-outbox", daemon=True)
        self.thread.start()

    def event(self, rid: int, event: Event) -> None:
        with self.cond:
            self.events.append((rid, _event_tuple(event)))
            self.cond.notify()

    def control(self, message: tuple) -> None:
        with self.cond:
            self.controls.append(message)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.events and not self.controls and not self.closed:
                    self.cond.wait()
                events, controls, closed = self.events, self.controls, self.closed
                self.events, self.controls = [], []
            try:
                if events:
                    self.conn.send(("events", events))
                for message in controls:  # after the events: "stopped" must follow the last of them
                    self.conn.send(message)
            except (OSError, EOFError):
                return  # the other side is gone
            if closed:
                return


# -----------------------------------------------------------------------------------------------------------------
# The engine process


def _exit_after(outbox: "_Outbox | None", reason: str) -> None:
    """The engine thread failed (a CUDA error leaves the device unusable): say why, flush, end the process; the
    server then fails what is in flight and answers 503."""
    import os

    if outbox is not None:
        outbox.control(("failed", reason))
        outbox.close()
    os._exit(3)


def _engine_main(conn, spec: dict) -> None:
    # Ctrl+C reaches every process of the terminal's group, and a service manager's SIGTERM often every process
    # of the service: the server decides when the engine stops ("stop" with its deadline), and if the server is
    # gone, the end of the pipe stops the engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outbox = None  # made once the engine runs; the failure callback reads it then

    # The engine thread waits on the GPU once per step and then wants the GIL back at once; the pipe threads
    # (unpickling a request's tiles) should not hold it for the default 5 ms.
    sys.setswitchinterval(0.0005)
    try:
        import torch

        from ..loading import load
        from ..engine.batch import BatchEngine

        device = spec["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, processor = load(spec["model"], spec["dtype"], device, quantize=spec["quantize"],
                                load_format=spec["load_format"])
        model.eval()
        engine = BatchEngine(model, processor.tokenizer, **spec["engine"])
        engine.on_failure = lambda reason: _exit_after(outbox, reason)
        engine.start()
    except BaseException as e:  # noqa: BLE001 - reported to the server, which exits with the message
        try:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        except OSError:  # the server is gone already
            pass
        return
    try:
        conn.send(("ready", {"max_model_len": engine.max_model_len, "max_batch": engine.max_batch,
                             "max_queue": engine.max_queue, "defaults": engine.defaults, "eos": engine.eos,
                             "warm_up_seconds": engine.warm_up_seconds,
                             "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
                             "stats": engine.stats()}))
    except OSError:  # the server ended while the model loaded: nobody to serve
        engine.stop(0.0)
        return
    outbox = _Outbox(conn)
    requests: dict[int, GenerationRequest] = {}

    def emitter(rid: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            if _final(event):
                requests.pop(rid, None)
            outbox.event(rid, event)
        return emit

    def stop(deadline: float) -> None:
        # Not engine.stop(deadline): it waits while its queue or its slots hold a request, and one that has left
        # the queue for a slot but is not in it yet looks like none, so it was aborted though time was left. The
        # requests this process was given leave `requests` at their final event: wait for those.
        end = time.monotonic() + deadline
        while requests and time.monotonic() < end:
            time.sleep(0.01)
        engine.stop(0.0)
        outbox.control(("stopped",))

    stopper = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone: nobody to answer
            break
        kind = message[0]
        if kind == "submit":  # several requests, queued together (the choices of one request)
            batch, unpacked = [], {}
            for rid, fields in message[1]:
                share = fields["share"]
                if share is None or share not in unpacked:  # (a shared prompt's inputs unpacked once)
                    unpacked[share] = unpack_tensors(fields["model_inputs"])
                request = GenerationRequest(prompt_ids=fields["prompt_ids"], params=fields["params"],
                                            model_inputs=unpacked[share], stop=fields["stop"],
                                            seed=fields["seed"], logprobs=fields["logprobs"], emit=emitter(rid),
                                            skip_special_tokens=fields["skip_special_tokens"],
                                            end_tokens=fields["end_tokens"], grammar=fields["grammar"], share=share,
                                            prompt_logprobs=fields["prompt_logprobs"])
                requests[rid] = request
                batch.append(request)
            try:
                if stopper is not None:  # the server sends none after "stop"; were one to come, it would not wait
                    raise EngineStopped("the server is shutting down")
                engine.submit_many(batch)
            except Exception as e:  # noqa: BLE001 - the server checked these first; report, keep serving
                for request in batch:
                    request.emit(Event(error=f"{type(e).__name__}: {e}"))
        elif kind == "cancel":
            request = requests.get(message[1])
            if request is not None:
                request.cancel()
        elif kind == "stats":
            outbox.control(("stats", message[1], engine.stats()))
        elif kind == "stop" and stopper is None:
            # in a thread: cancels of clients that leave during the shutdown deadline must still be read
            stopper = threading.Thread(target=stop, args=(message[1],), daemon=True)
            stopper.start()
    if stopper is None:
        engine.stop(0.0)
    else:
        stopper.join(timeout=60)
    outbox.close()


class _Handle:
    """What the server holds of a submitted request."""

    def __init__(self, owner: "EngineProcess", rid: int, logprobs: int | None):
        self.owner, self.rid, self.logprobs = owner, rid, logprobs
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled and self.rid in self.owner.requests:
            self.cancelled = True
            self.owner.outgoing.put(("cancel", self.rid))


class EngineProcess:
    """Starts the engine process (model load, compilation and graph warm-up happen there) and talks to it.
    submit_many, stats, stop_soon and the deliveries run on the server's event loop; two threads move the pipe's
    messages, and only they use the pipe until `stop` has ended them."""

    def __init__(self, spec: dict, start_timeout: float | None = None, wait: bool = True):
        """Starts the engine process; with `wait` (else call wait_ready), waits until it has loaded the model."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: never fork threads or CUDA
        self.conn, child = context.Pipe()
        self.spec, self.start_timeout = spec, start_timeout
        self.ready = False  # True once wait_ready has returned
        # not a daemon: the engine may start worker processes of its own (torch.compile's)
        self.process = context.Process(target=_engine_main, args=(child, spec), name="mllama-engine")
        self.process.start()
        child.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Waits for the engine's "ready" (RuntimeError if it fails first), then starts talking to it."""
        try:
            info = self._wait_ready(self.spec["model"], self.start_timeout)
        except BaseException:  # a failure, or Ctrl+C / SIGTERM while loading: leave no engine behind
            self.kill()
            raise
        self.max_model_len, self.max_batch = info["max_model_len"], info["max_batch"]
        self.max_queue, self.defaults, self.eos = info["max_queue"], info["defaults"], info["eos"]
        self.warm_up_seconds, self.dtype, self.device = info["warm_up_seconds"], info["dtype"], info["device"]
        self.last_stats = info["stats"]
        self.failed: str | None = None
        self._failure: str | None = None
        self._accepting = True
        self._stop_by: float | None = None  # when the engine, asked to stop, will have aborted what is left
        self.requests: dict[int, Callable[[Event], None]] = {}
        self.inflight = 0
        self.aborted = 0  # requests that ended with finish_reason "abort": still running at the stop's deadline
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._waiters: dict[int, asyncio.Future] = {}
        self.outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="mllama-engine-send", daemon=True)
        self._sender.start()
        self._reader = threading.Thread(target=self._read, name="mllama-engine-read", daemon=True)
        self._reader.start()
        self.ready = True

    def kill(self) -> None:
        """Ends a process that has not become ready (or is not wanted any more)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def _wait_ready(self, model: str, start_timeout: float | None) -> dict:
        began = time.monotonic()
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the engine process ended while loading {model!r} ({self._exit_status()})")
            if start_timeout is not None and time.monotonic() - began > start_timeout:
                raise RuntimeError(f"the engine did not start within {start_timeout} s")
        kind, info = self.conn.recv()
        if kind == "failed":
            raise RuntimeError(f"the engine could not start: {info}")
        return info

    @property
    def accepting(self) -> bool:
        return self._accepting and self.failed is None

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        check_length(prompt_len, max_tokens, self.max_model_len)

    def submit_many(self, requests: list[dict]) -> list[_Handle]:
        """On the event loop: requests (each GenerationRequest's fields as keywords, with `emit`), queued
        together or refused together: EngineStopped, RequestTooLong or QueueFull at once. Each `emit` is then
        called on the loop for every event of its request."""
        if self.failed is not None:
            raise EngineStopped(self.failed)
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        for fields in requests:
            self.check_length(len(fields["prompt_ids"]), fields["params"].max_new_tokens)
        if self.inflight + len(requests) > self.max_batch + self.max_queue:
            raise QueueFull(f"{self.inflight} requests are running or waiting already (--max-batch {self.max_batch}"
                            f" + --max-queue {self.max_queue})")
        self.loop = self.loop or asyncio.get_running_loop()
        handles, sent, shared = [], [], set()
        for fields in requests:
            rid = next(self._ids)
            fields = dict(fields)
            self.requests[rid] = fields.pop("emit")
            fields.setdefault("share", None)
            fields.setdefault("prompt_logprobs", None)
            if fields["share"] is not None and fields["share"] in shared:
                fields["model_inputs"] = {}  # the first request of a shared prompt carries its inputs
            shared.add(fields["share"])
            sent.append((rid, fields))
            handles.append(_Handle(self, rid, fields["logprobs"]))
        self.inflight += len(requests)
        self.outgoing.put(("submit", sent))
        return handles

    async def stats(self) -> dict:
        """The engine's counters; the last ones seen if it does not answer within 5 s (or has stopped)."""
        if self.failed is not None or not self.process.is_alive():
            return self.last_stats
        self.loop = self.loop or asyncio.get_running_loop()
        token = next(self._ids)
        future = self.loop.create_future()
        self._waiters[token] = future
        self.outgoing.put(("stats", token))
        try:
            return await asyncio.wait_for(future, 5.0)
        except asyncio.TimeoutError:
            return self.last_stats
        finally:
            self._waiters.pop(token, None)

    def stop_soon(self, deadline: float = 0.0) -> None:
        """Stops taking requests and asks the engine to stop, without waiting: running and queued requests get
        `deadline` seconds, then the engine aborts the rest. Each still ends with its final event (finish_reason
        "abort" for the aborted), delivered on the loop as usual. Asking again changes nothing."""
        self._accepting = False
        if self._stop_by is None and self.process.is_alive():
            self._stop_by = time.monotonic() + deadline
            self.outgoing.put(("stop", deadline))

    def stop(self, deadline: float = 0.0) -> None:
        """stop_soon, then waits for the engine's last events and for its process to exit (killed if it does not
        answer within 60 s of its deadline). Not on the event loop: it blocks."""
        self.stop_soon(deadline)
        if self._stop_by is not None:  # the reader ends at "stopped", or when the process is gone
            self._reader.join(timeout=max(0.0, self._stop_by - time.monotonic()) + 60)
        self.outgoing.put(None)
        self._sender.join(timeout=10)
        if self._reader.is_alive() or self._sender.is_alive():  # the engine neither answers nor reads
            self.process.kill()  # which ends both threads: the pipe's other end is gone
            self._reader.join(timeout=10)
            self._sender.join(timeout=10)
        # Closed only now: a thread blocked in send or recv on a closed descriptor fails with EBADF, or worse,
        # writes to whatever file has reused that descriptor number.
        self.conn.close()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    # --- threads and the loop ---------------------------------------------------------------------------------

    def _send(self) -> None:
        while True:
            message = self.outgoing.get()
            if message is None:
                return
            try:
                self.conn.send(message)
            except (OSError, EOFError, ValueError):
                return

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self._post(self._deliver, message[1])
            elif kind == "stats":
                self.last_stats = message[2]
                self._post(self._resolve, message[1], message[2])
            elif kind == "stopped":
                return
            elif kind == "failed":  # the engine's own account; the process exits next
                self._failure = f"the engine failed: {message[1]}"
        # The pipe ended without "stopped": the process died. Fail whatever is in flight, say so on /health and
        # once on stderr.
        reason = self._failure or f"the engine process ended: {self._exit_status()}"
        if self._accepting or self._failure:
            self.failed = reason
        print(f"mllama serve: {reason}; requests in flight failed, new ones get 503: restart the server",
              file=sys.stderr, flush=True)
        self._post(self._fail_all, reason)

    def _exit_status(self) -> str:
        self.process.join(timeout=5)  # the pipe ends a moment before the process does
        code = self.process.exitcode
        if code is None:
            return "it closed its pipe and still runs"
        if code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            return f"killed by signal {-code}{name}"
        return f"exit code {code}"

    def _post(self, callback: Callable, *args) -> None:
        """callback(*args) on the event loop; dropped once the loop has closed (the server is exiting)."""
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # "Event loop is closed"
            pass

    def _deliver(self, events: list[tuple[int, tuple]]) -> None:
        for rid, fields in events:
            event = Event(*fields)
            emit = self.requests.get(rid)
            if _final(event) and emit is not None:
                del self.requests[rid]
                self.inflight -= 1
                self.aborted += event.finish_reason == "abort"
            if emit is not None:
                emit(event)

    def _resolve(self, token: int, stats: dict) -> None:
        future = self._waiters.get(token)
        if future is not None and not future.done():
            future.set_result(stats)

    def _fail_all(self, reason: str) -> None:
        for rid, emit in list(self.requests.items()):
            emit(Event(error=reason))
        self.requests.clear()
        self.inflight = 0


class _Dispatcher:
    """Hands a local engine's events (engine thread) to the event loop with one wake-up per burst (a decode step
    emits one event per running request), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[Callable[[Event], None], Event]] = []
        self.scheduled = False

    def post(self, emit: Callable[[Event], None], event: Event) -> None:
        with self.lock:
            self.pending.append((emit, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for emit, event in items:
            emit(event)


class LocalEngine:
    """EngineProcess' interface over a BatchEngine of this process (a library user serving a model object they
    hold). Events reach `emit` on the event loop, as with the process."""

    def __init__(self, engine):
        self.engine = engine
        self.max_model_len, self.max_batch, self.max_queue = engine.max_model_len, engine.max_batch, engine.max_queue
        self.defaults, self.eos, self.warm_up_seconds = engine.defaults, engine.eos, engine.warm_up_seconds
        self.dtype = str(engine.dtype).removeprefix("torch.")
        self.failed = None
        self._dispatchers: dict[int, _Dispatcher] = {}

    @property
    def accepting(self) -> bool:
        return self.engine.accepting

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        self.engine.check_length(prompt_len, max_tokens)

    def submit_many(self, requests: list[dict]) -> list[GenerationRequest]:
        loop = asyncio.get_running_loop()
        dispatcher = self._dispatchers.setdefault(id(loop), _Dispatcher(loop))
        made, unpacked = [], {}
        for fields in requests:
            fields = dict(fields)
            emit, share = fields.pop("emit"), fields.pop("share", None)
            if share is None or share not in unpacked:
                unpacked[share] = unpack_tensors(fields["model_inputs"])
            fields["model_inputs"] = unpacked[share]
            made.append(GenerationRequest(**fields, share=share,
                                          emit=lambda event, emit=emit: dispatcher.post(emit, event)))
        self.engine.submit_many(made)
        return made

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def stop(self, deadline: float = 0.0) -> None:
        self.engine.stop(deadline)
