"""`mllama serve MODEL`: an OpenAI-compatible HTTP server with continuous batching.

Wire into the CLI with:
    from .server import add_arguments as add_serve_arguments, run as run_serve
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server"); add_serve_arguments(p); p.set_defaults(func=run_serve)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .app import ServerOptions, create_app, error_response, render_metrics
from .prompts import ImageOptions, RequestError

__all__ = ["add_arguments", "run", "main", "create_app", "ServerOptions", "ImageOptions", "RequestError",
           "error_response", "render_metrics"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hub id or local checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the id clients pass as 'model' (default: the folder name)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots)")
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
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds running requests get to finish after SIGTERM before they are cancelled")


def build(args: argparse.Namespace):
    """Processor, started engine process and app for parsed arguments."""
    from ..processing.processor import AutoProcessor
    from .engine_process import EngineProcess

    processor = AutoProcessor.from_pretrained(args.model)
    spec = {"model": args.model, "dtype": args.dtype, "device": args.device,
            "engine": {"max_batch": args.max_batch, "max_queue": args.max_queue, "max_model_len": args.max_model_len,
                       "max_images": args.max_images_per_request, "max_prefill_batch": args.max_prefill_batch,
                       "overlap_prefill": True if args.overlap_prefill else None}}
    engine = EngineProcess(spec)
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    api_key = args.api_key if args.api_key is not None else os.environ.get("MLLAMA_API_KEY") or None
    images = ImageOptions(max_images=args.max_images_per_request, max_bytes=args.max_image_bytes,
                          allow_remote=args.allow_remote_images,
                          allow_private_hosts=args.allow_private_image_hosts)
    input_workers = args.input_workers
    if input_workers is None:
        input_workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    options = ServerOptions(model_name=name, api_key=api_key, images=images, processor_source=str(args.model),
                            input_workers=input_workers)
    try:
        app = create_app(processor, engine, options)
    except BaseException:
        engine.stop(0.0)
        raise
    return processor, engine, app


def _server_class():
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the captured signal after its graceful shutdown, so the process would end "killed
            # by SIGTERM" (143); SIGTERM is the orderly way to stop a service, so end with status 0 instead.
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server


def run(args: argparse.Namespace) -> None:
    """Serves until SIGTERM/SIGINT: uvicorn stops accepting, gives open requests --shutdown-timeout seconds,
    then the engine aborts what is left and the process exits with status 0."""
    import uvicorn

    _Server = _server_class()
    _, engine, app = build(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            # clients keep connections open between requests (the openai client pools them); a
                            # short keep-alive races with their reuse and surfaces as reset connections
                            timeout_keep_alive=75)
    server = _Server(config)
    print(f"mllama serve: {app.state.options.model_name!r} on http://{args.host}:{args.port} "
          f"(max batch {engine.max_batch}, context {engine.max_model_len}, warm-up {engine.warm_up_seconds:.1f} s, "
          f"engine process {engine.process.pid})",
          file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        # uvicorn has waited for (or cancelled) open connections by now; abort anything still queued.
        engine.stop(0.0)
        if app.state.input_workers is not None:
            app.state.input_workers.close()


def main(argv: list[str] | argparse.Namespace | None = None) -> int:
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        parser = argparse.ArgumentParser(prog="mllama serve")
        add_arguments(parser)
        args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
