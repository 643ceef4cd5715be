"""`mllama serve MODEL`: an OpenAI-compatible HTTP server with continuous batching.

Wire into the CLI with:
    from .server import add_arguments as add_serve_arguments, run as run_serve
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server"); add_serve_arguments(p); p.set_defaults(func=run_serve)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys

from ..loading import add_load_args, check_load_args
from .app import ServerOptions, create_app, error_response, render_metrics, start_input_workers
from .prompts import ImageOptions, RequestError

__all__ = ["add_arguments", "run", "main", "create_app", "ServerOptions", "ImageOptions", "RequestError",
           "error_response", "render_metrics"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .http import port_number

    parser.add_argument("model", help="Hub id or local checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=port_number, default=8000, help="1..65535, 0: any free port (default 8000)")
    parser.add_argument("--served-model-name",
                        help="the id clients pass as 'model' (default: the model argument exactly as given)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="requests decoded together (slots); default: what the K/V page pool supports, at most "
                             "256 on a GPU (8 on the CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of the GPU's memory this server may take: the K/V page pools get what the "
                             "weights and the workspace leave of it (default 0.9)")
    parser.add_argument("--image-kv-share", type=float, default=0.5,
                        help="share of the K/V pool for image tiles' cross-attention K/V (and cached images); the "
                             "rest holds text tokens' K/V (default 0.5)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="auto: K/V pages in the model's dtype; fp8: e4m3 with a scale per token and kv head, "
                             "half the bytes (about twice the requests and images per GiB), error measured in the "
                             "README (default auto)")
    parser.add_argument("--no-image-cache", action="store_true",
                        help="do not keep images after their request (their K/V on the GPU, their decoded tiles on "
                             "the HTTP side): every image is decoded and encoded again")
    parser.add_argument("--max-prefill-batch", type=int, default=4,
                        help="images (or text-only requests) prefilled together, between two decode steps of the "
                             "running batch")
    parser.add_argument("--overlap-prefill", action="store_true",
                        help="experimental on CUDA: run the vision part of prefills on a side stream while the batch "
                             "decodes (slower on the H200, where it also once ended in a CUDA error; see README)")
    parser.add_argument("--input-workers", type=int, default=None,
                        help="processes that decode requests (template, tokens, images) off the engine's process; "
                             "0: threads of the server process (default: min(8, CPUs / 2), at least 1)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--max-model-len", type=int,
                        help="context per request, prompt + max_tokens (default min(max_position_embeddings, 4096))")
    parser.add_argument("--max-images-per-request", type=int, default=4)
    parser.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--allow-remote-images", action="store_true", help="accept http(s) image URLs")
    parser.add_argument("--allow-private-image-hosts", action="store_true",
                        help="with --allow-remote-images: also fetch from loopback/private/link-local addresses")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or MLLAMA_API_KEY)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_load_args(parser)
    parser.add_argument("--shutdown-timeout", type=_seconds(zero_ok=True), default=10.0,
                        help="seconds running requests get to finish after SIGTERM before they are aborted (their "
                             "streams end with finish_reason 'abort'); default 10")
    parser.add_argument("--timeout-request-header", type=_seconds(), default=10.0,
                        help="seconds a client has to send a complete request head (from connecting, or from the "
                             "first byte of the next request on a kept-alive connection); then it is closed "
                             "(default 10)")
    parser.add_argument("--timeout-keep-alive", type=_seconds(), default=75.0,
                        help="seconds an idle connection is kept open between two requests (default 75: clients "
                             "such as openai's pool their connections, and a short keep-alive races with reuse)")
    parser.add_argument("--max-connections", type=_count, default=None,
                        help="connections open at once; past it a new one closes the connection idle the longest "
                             "(default: half the file descriptors free after start-up, at most 8192; the soft "
                             "RLIMIT_NOFILE is raised to the hard one)")
    parser.add_argument("--max-body-bytes", type=_count, default=100 * 1024 * 1024,
                        help="largest request body, counted as it arrives (chunked bodies too): 413 past it "
                             "(default 100 MiB)")
    parser.add_argument("--body-timeout", type=_seconds(), default=60.0,
                        help="seconds from a request's head to the end of its body: 408 past it (default 60)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="no line per request on stderr (client, method, path, status, tokens, seconds)")


def _seconds(zero_ok: bool = False):
    """argparse type: a finite number of seconds, > 0 (>= 0 if zero_ok)."""
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value < math.inf or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds: use a number "
                                             f"{'>= 0' if zero_ok else '> 0'}")
        return value
    return seconds


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: use an integer >= 1")
    return value


def served_model_name(args: argparse.Namespace) -> str:
    """The id clients send as 'model': --served-model-name, else the model argument exactly as given (a client
    that names the hub id the server was started with must find it)."""
    return args.served_model_name or str(args.model)


@contextlib.contextmanager
def _children_ignore_interrupts():
    """Processes started inside inherit SIGINT and SIGTERM blocked. Ctrl+C reaches every process of the
    terminal's group and a service manager's SIGTERM often every process of the service: the server drains and
    then ends its children itself, and a child that took the signal would end in a traceback, or break the pool
    that requests still use. A signal sent here meanwhile is held, then delivered once this block ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def build(args: argparse.Namespace):
    """Processor, started engine process and app for parsed arguments."""
    from ..processing.processor import AutoProcessor
    from .engine_process import EngineProcess

    check_load_args(args.quantize, args.load_format)
    spec = {"model": args.model, "dtype": args.dtype, "device": args.device, "quantize": args.quantize,
            "load_format": args.load_format,
            "engine": {"max_batch": args.max_batch, "max_queue": args.max_queue, "max_model_len": args.max_model_len,
                       "max_images": args.max_images_per_request, "max_prefill_batch": args.max_prefill_batch,
                       "overlap_prefill": True if args.overlap_prefill else None,
                       "gpu_memory_utilization": args.gpu_memory_utilization, "cross_share": args.image_kv_share,
                       "cache_images": not args.no_image_cache, "kv_cache_dtype": args.kv_cache_dtype}}
    engine = EngineProcess(spec, wait=False)  # it loads the model while this process starts the rest
    workers = app = None
    try:
        processor = AutoProcessor.from_pretrained(args.model)
        api_key = args.api_key if args.api_key is not None else os.environ.get("MLLAMA_API_KEY") or None
        images = ImageOptions(max_images=args.max_images_per_request, max_bytes=args.max_image_bytes,
                              allow_remote=args.allow_remote_images,
                              allow_private_hosts=args.allow_private_image_hosts)
        input_workers = args.input_workers
        if input_workers is None:
            input_workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        options = ServerOptions(model_name=served_model_name(args), api_key=api_key, images=images,
                                processor_source=str(args.model), input_workers=input_workers,
                                max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                                **({"decoded_image_bytes": 0} if args.no_image_cache else {}))
        with _children_ignore_interrupts():  # the input workers
            workers = start_input_workers(options)
        engine.wait_ready()
        app = create_app(processor, engine, options, workers)
    except BaseException:
        if workers is not None:  # a signal held while the workers started is delivered on the way out
            workers.close()
        if engine.ready:
            engine.stop(0.0)
        else:
            engine.kill()
        raise
    return processor, engine, app


def _close_input_workers(app) -> None:
    workers = app.state.input_workers
    if workers is None:
        return
    workers.close()


def _log_access() -> None:
    """The app's one line per request (`mllama.access`) to stderr, with the time."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log = logging.getLogger("mllama.access")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> None:
    """Serves until SIGTERM/SIGINT. The listening socket is bound before the model loads (a port in use fails at
    once); the banner comes once the engine is ready. At the signal the engine gets --shutdown-timeout seconds
    for what runs, then aborts the rest; every request ends with its final event, then the process exits 0."""
    import uvicorn

    from .http import BACKLOG, SHUTDOWN_MARGIN, Server, concurrency_limit, default_max_connections, listen_socket, \
        protocol_class, raise_fd_limit

    fd_limit = raise_fd_limit()
    sock = listen_socket(args.host, args.port)
    if args.access_log:
        _log_access()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # while loading: stop, and leave no engine behind
    try:
        _, engine, app = build(args)
    except BaseException:
        sock.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        max_connections = args.max_connections or default_max_connections(fd_limit)
        config = uvicorn.Config(app, log_level="warning", http=protocol_class(args.timeout_request_header,
                                                                              max_connections),
                                limit_concurrency=concurrency_limit(max_connections), backlog=BACKLOG,
                                timeout_keep_alive=args.timeout_keep_alive,
                                timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_MARGIN)
        server = Server(config, engine, args.shutdown_timeout)
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        print(f"mllama serve: {app.state.options.model_name!r} on http://{where}:{port} (max batch "
              f"{engine.max_batch}, context {engine.max_model_len}, {max_connections} connections, warm-up "
              f"{engine.warm_up_seconds:.1f} s, engine process {engine.process.pid})", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        # Serving is over. A second SIGTERM or Ctrl+C would now end the process halfway through this, and input
        # workers left without their parent wait for work forever.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        engine.stop(0.0)  # asked to stop at the signal already: this waits for its process to end
        _close_input_workers(app)
        sock.close()
    aborted = f"; {engine.aborted} request{'' if engine.aborted == 1 else 's'} aborted at the deadline" \
        if engine.aborted else ""
    print(f"mllama serve: stopped{aborted}", file=sys.stderr, flush=True)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | argparse.Namespace | None = None) -> int:
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        parser = _OneLineParser(prog="mllama serve")
        add_arguments(parser)
        args = parser.parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM before the server ran
        return 130
    except Exception as e:  # one line; MLLAMA_DEBUG=1 shows the traceback
        if os.environ.get("MLLAMA_DEBUG"):
            raise
        text = str(e).strip()
        print(f"mllama serve: error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
