"""The OpenAI-compatible HTTP API over a BatchEngine.

Bodies are parsed by hand rather than by pydantic models so that every error has OpenAI's shape and names the
field at fault (pydantic's 422 lists would not be what OpenAI clients expect).
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..engine.batch import BatchEngine, EngineStopped, Event, Histogram, QueueFull, RequestTooLong, sampling_params
from .engine_process import EngineProcess, LocalEngine, pack_tensors
from .prompts import ImageOptions, RequestError, chat_inputs, completion_inputs


@dataclass
class ServerOptions:
    model_name: str = "mllama"
    api_key: str | None = None
    images: ImageOptions = field(default_factory=ImageOptions)
    default_max_tokens: int | None = None  # None: whatever the context leaves
    retry_after: int = 1
    max_body_bytes: int = 100 * 1024 * 1024
    # Where input worker processes load the processor from (the checkpoint); None or 0 workers: decode requests on
    # threads of this process instead.
    processor_source: str | None = None
    input_workers: int = 0


# --- request decoding: JSON, fields, template, tokens, images --------------------------------------------------
# All of it holds the GIL for tens of milliseconds per request with an image (json of a 5 MB data URL 7 ms,
# base64 and PNG decoding 50 ms, tiling 25 ms, measured on a 1120x1120 PNG), so it runs in worker processes; what
# comes back is small (the fields) or plain bytes (the tiles, already in the model's dtype).


def decode_request(processor, raw: bytes, chat: bool, model_name: str, images: ImageOptions,
                   pixel_dtype: str | None) -> tuple["Parsed", list[int], dict]:
    """A request body -> (its options, prompt ids, packed model inputs); RequestError names the field at fault."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", None) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    name = body.get("model")
    if not isinstance(name, str):
        raise RequestError(f"model must be a string: the served model is {model_name!r}", "model")
    if name != model_name:
        raise RequestError(f"the model {name!r} does not exist: this server serves {model_name!r}", "model", 404,
                           "model_not_found")
    parsed = parse_common(body, chat)
    if chat:
        ids, inputs = chat_inputs(processor, body.get("messages"), images)
    else:
        if "prompt" not in body:
            raise RequestError("prompt is required", "prompt")
        ids, inputs = completion_inputs(processor, body.get("prompt"), body.get("images"), images)
    if pixel_dtype and "pixel_values" in inputs:
        # the same rounding the engine's .to(dtype) would do, here, so half the bytes cross the pipes
        import torch

        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, pixel_dtype))
    return parsed, ids, pack_tensors(inputs)


_WORKER: tuple | None = None  # (processor, model name, image options, pixel dtype) in an input worker


def _init_worker(source: str, context: tuple) -> None:
    global _WORKER
    import torch

    from ..processing.processor import AutoProcessor

    torch.set_num_threads(1)  # several workers side by side: one thread each
    _WORKER = (AutoProcessor.from_pretrained(source), *context)
    _warm_up(*_WORKER)


def _warm_up(processor, model_name: str, *context) -> None:
    """Decode one small chat request with an image, so that the first client request a fresh worker gets does not
    pay for lazy imports and first-call set-up (PIL's PNG plugin, the chat template, the tokenizer, torch's
    kernels): ~70 ms on a 1120x1120 PNG request, measured. This costs a few milliseconds per worker at start."""
    import base64
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (120, 90, 60)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": model_name, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this image."}]}]}
    try:
        decode_request(processor, json.dumps(body).encode(), True, model_name, *context)
    except Exception:  # e.g. a server that accepts no images: the worker still starts, cold
        pass


def _job(raw: bytes, chat: bool):
    processor, *context = _WORKER
    return decode_request(processor, raw, chat, *context)


def _ready() -> bool:
    return _WORKER is not None


class InputWorkers:
    def __init__(self, source: str, workers: int, context: tuple):
        mp_context = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        self.pool = ProcessPoolExecutor(workers, mp_context=mp_context, initializer=_init_worker,
                                        initargs=(source, context))
        # start them all now (each imports torch and loads the tokenizer), not on the first requests
        assert all(f.result() for f in [self.pool.submit(_ready) for _ in range(workers * 2)])

    async def run(self, raw: bytes, chat: bool):
        return await asyncio.get_running_loop().run_in_executor(self.pool, _job, raw, chat)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _merge_ready(event: Event, queue: asyncio.Queue) -> Event:
    """`event` joined with the events already waiting behind it: a client that reads slower than tokens come gets
    them in fewer, larger chunks instead of falling further behind."""
    while not (event.finish_reason or event.error) and not queue.empty():
        nxt = queue.get_nowait()
        if nxt.error:
            return nxt
        event = Event(text=event.text + nxt.text, token_ids=event.token_ids + nxt.token_ids,
                      logprobs=event.logprobs + nxt.logprobs, finish_reason=nxt.finish_reason,
                      prompt_tokens=nxt.prompt_tokens, completion_tokens=nxt.completion_tokens)
    return event


def error_response(message: str, status: int = 400, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# -----------------------------------------------------------------------------------------------------------------
# Field checks


def _int(body: dict, name: str, low: int, high: int | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if value < low or (high is not None and value > high):
        raise RequestError(f"{name} must be in {low}..{high if high is not None else 'inf'}, got {value}", name)
    return value


def _float(body: dict, name: str, low: float, high: float):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or an array of at most 4 non-empty strings", "stop")
    return tuple(stop)


@dataclass
class Parsed:
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None


def parse_common(body: dict, chat: bool) -> Parsed:
    n = _int(body, "n", 1, None, 1)
    if n != 1:
        raise RequestError(f"n must be 1 (this server returns one choice per request), got {n}", "n")
    if body.get("best_of") not in (None, 1):
        raise RequestError("best_of must be 1", "best_of")
    max_tokens = _int(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise RequestError("stream_options must be an object like {\"include_usage\": true}", "stream_options")
        include_usage = options.get("include_usage", False)
    if chat:
        want = body.get("logprobs", False)
        if want is not None and not isinstance(want, bool):
            raise RequestError(f"logprobs must be true or false, got {want!r}", "logprobs")
        top = _int(body, "top_logprobs", 0, 20)
        if top is not None and not want:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _int(body, "logprobs", 0, 5)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {type(seed).__name__}", "seed")
    return Parsed(max_tokens=max_tokens, temperature=_float(body, "temperature", 0.0, 2.0),
                  top_p=_float(body, "top_p", 0.0, 1.0), seed=seed, stop=_stop(body), stream=stream,
                  include_usage=include_usage, logprobs=logprobs)


# -----------------------------------------------------------------------------------------------------------------
# The app


class Guard:
    """Authentication and body-size checks before any route reads the body, OpenAI's error shape for anything a
    route lets escape, and a count of every answer by route and status.

    A plain ASGI middleware: it sees each streamed chunk pass by and does nothing to it (Starlette's
    `@app.middleware("http")` form would copy every chunk through an extra task and stream, per token of every
    running request)."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")

    def __init__(self, app, options: ServerOptions, counts: dict):
        self.app, self.options, self.counts = app, options, counts

    def _count(self, key: tuple[str, int]) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if self.options.api_key is not None and \
                    headers.get("authorization", "") != f"Bearer {self.options.api_key}":
                self._count((path, 401))
                response = error_response("invalid or missing API key: send 'Authorization: Bearer <key>'", 401,
                                          None, "invalid_api_key")
                return await response(scope, receive, send)
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.options.max_body_bytes:
                self._count((path, 413))
                response = error_response(f"the request body is {length} bytes, more than "
                                          f"{self.options.max_body_bytes}", 413, None, "request_too_large")
                return await response(scope, receive, send)
        status = []

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as e:  # never a bare 500 page: keep OpenAI's shape
            if status:  # the answer had started (a stream): nothing more can be said over HTTP
                raise
            status.append(500)
            response = error_response(f"internal error: {type(e).__name__}: {e}", 500, None, None, "server_error")
            await response(scope, receive, send)
        finally:
            self._count((path if path in self.ROUTES else "other", status[0] if status else 500))


def create_app(processor, engine: "EngineProcess | LocalEngine | BatchEngine",
               options: ServerOptions | None = None) -> FastAPI:
    """The HTTP API over an engine: an EngineProcess (what `mllama serve` starts) or a started BatchEngine of this
    process."""
    options = options or ServerOptions()
    if isinstance(engine, BatchEngine):
        engine = LocalEngine(engine)
    app = FastAPI(title="mllama", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.options = engine, options
    http_counts: dict[tuple[str, int], int] = {}
    timings = {"decode": Histogram(), "ttft": Histogram()}  # this side's share of the latency
    app.state.timings = timings
    tokenizer = processor.tokenizer
    context = (options.model_name, options.images, engine.dtype)
    workers = InputWorkers(options.processor_source, options.input_workers, context) \
        if options.processor_source and options.input_workers > 0 else None
    app.state.input_workers = workers

    app.add_middleware(Guard, options=options, counts=http_counts)

    async def decode(raw: bytes, chat: bool):
        if workers is not None:
            return await workers.run(raw, chat)
        return await asyncio.to_thread(decode_request, processor, raw, chat, *context)

    @app.get("/health")
    async def health():
        if engine.failed is not None:
            return JSONResponse({"status": "error", "message": engine.failed}, status_code=503)
        return {"status": "ok" if engine.accepting else "shutting_down"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "mllama", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(await engine.stats(), http_counts, timings),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    async def handle(request: Request, chat: bool):
        arrival = time.monotonic()
        parsed = None
        try:
            parsed, ids, inputs = await decode(await request.body(), chat)
            timings["decode"].observe(time.monotonic() - arrival)
            max_tokens = parsed.max_tokens
            if max_tokens is None:
                max_tokens = options.default_max_tokens or max(1, engine.max_model_len - len(ids))
            engine.check_length(len(ids), max_tokens)
            params = sampling_params(engine, max_tokens, parsed.temperature, parsed.top_p)
        except RequestError as e:
            return error_response(e.message, e.status, e.param, e.code)
        except RequestTooLong as e:
            return error_response(str(e), 400, "max_tokens" if parsed and parsed.max_tokens else
                                  ("messages" if chat else "prompt"), "context_length_exceeded")
        except ValueError as e:
            return error_response(str(e), 400, None, None)

        events: asyncio.Queue[Event] = asyncio.Queue()
        first = [True]

        def emit(event: Event) -> None:  # on the event loop
            if first[0]:
                first[0] = False
                timings["ttft"].observe(time.monotonic() - arrival)
            events.put_nowait(event)

        try:
            job = engine.submit(prompt_ids=ids, params=params, model_inputs=inputs, stop=parsed.stop,
                                seed=parsed.seed, logprobs=parsed.logprobs, emit=emit)
        except QueueFull as e:
            return error_response(f"the server is busy: {e}; retry later", 429, None, "queue_full",
                                  "rate_limit_exceeded", headers={"Retry-After": str(options.retry_after)})
        except EngineStopped as e:
            return error_response(str(e), 503, None, "shutting_down", "server_error")
        except RequestTooLong as e:
            return error_response(str(e), 400, "max_tokens", "context_length_exceeded")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if parsed.stream:
            return StreamingResponse(stream(job, events, rid, created, chat, parsed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(request, job, events, rid, created, chat)

    def logprob_payload(entries: list[dict], chat: bool, offset: int) -> Any:
        def token_text(i: int) -> str:
            return tokenizer.decode([i], skip_special_tokens=False)

        if chat:
            out = []
            for e in entries:
                text = token_text(e["id"])
                out.append({"token": text, "logprob": e["logprob"], "bytes": list(text.encode()),
                            "top_logprobs": [{"token": token_text(i), "logprob": lp,
                                              "bytes": list(token_text(i).encode())} for i, lp in e["top"]]})
            return out
        tokens = [token_text(e["id"]) for e in entries]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{token_text(i): lp for i, lp in e["top"]} for e in entries],
                "text_offset": offsets}

    async def collect(request: Request, job, events: asyncio.Queue, rid: str, created: int,
                      chat: bool):
        text, entries = [], []
        done = False
        try:
            while True:
                try:
                    ev = _merge_ready(await asyncio.wait_for(events.get(), timeout=1.0), events)
                except asyncio.TimeoutError:
                    # A client that went away should not keep its slot until max_tokens.
                    if await request.is_disconnected():
                        job.cancel()
                        return error_response("client disconnected", 499, None, "client_closed")
                    continue
                if ev.error:
                    done = True
                    return error_response(f"generation failed: {ev.error}", 500, None, None, "server_error")
                text.append(ev.text)
                entries.extend(ev.logprobs)
                if ev.finish_reason:
                    done = True
                    break
        finally:
            if not done:  # cancelled by the server (shutdown) or the client: free the slot
                job.cancel()
        content = "".join(text)
        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                 "total_tokens": ev.prompt_tokens + ev.completion_tokens}
        logprobs = None
        if job.logprobs is not None:
            logprobs = {"content": logprob_payload(entries, True, 0)} if chat else logprob_payload(entries, False, 0)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "logprobs": logprobs, "finish_reason": ev.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": options.model_name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": content, "logprobs": logprobs, "finish_reason": ev.finish_reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": options.model_name,
                "choices": [choice], "usage": usage}

    async def stream(job, events: asyncio.Queue, rid: str, created: int, chat: bool,
                     parsed: Parsed):
        kind = "chat.completion.chunk" if chat else "text_completion"
        offset = 0

        def chunk(delta_text: str | None, finish: str | None, entries: list, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                if job.logprobs is not None and entries:
                    choice["logprobs"] = {"content": logprob_payload(entries, True, 0)}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
                if job.logprobs is not None and entries:
                    choice["logprobs"] = logprob_payload(entries, False, offset)
            payload = {"id": rid, "object": kind, "created": created, "model": options.model_name,
                       "choices": [choice]}
            if parsed.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        # The usual chunk (text, no logprobs, not the last) from a template: only the text is serialised per chunk
        # (one is sent per running request per decode step). The same bytes as chunk() gives.
        marker = json.dumps("\ue002")
        template = chunk("\ue002", None, [])
        head, tail = template.split(marker) if template.count(marker) == 1 else (None, None)

        def text_chunk(text: str, finish: str | None, entries: list) -> str:
            if head is None or finish is not None or (entries and job.logprobs is not None):
                return chunk(text, finish, entries)
            return head + json.dumps(text) + tail

        finished = False
        try:
            if chat:
                yield chunk("", None, [], first=True)
            while True:
                ev = _merge_ready(await events.get(), events)
                if ev.error:
                    error = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                       "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    finished = True
                    break
                if ev.text or ev.logprobs or ev.finish_reason:
                    yield text_chunk(ev.text, ev.finish_reason, ev.logprobs)
                    offset += len(ev.text)
                if ev.finish_reason:
                    finished = True
                    if parsed.include_usage:
                        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                                 "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                        yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': options.model_name, 'choices': [], 'usage': usage})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects too (the generator is cancelled or closed): free the slot.
            if not finished:
                job.cancel()

    return app


def render_metrics(stats: dict, http_counts: dict, timings: dict[str, Histogram] | None = None) -> str:
    """Prometheus text from the engine's stats snapshot (BatchEngine.stats), the HTTP counts and this side's
    latency histograms."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    def histogram(name: str, help_text: str, snap: dict):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(snap["bounds"], snap["counts"]):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {snap["count"]}')
        lines.append(f"{name}_sum {snap['total']}")
        lines.append(f"{name}_count {snap['count']}")

    outcomes = ("stop", "length", "cancelled", "aborted", "error")
    metric("mllama_requests_total", "counter", "Requests that left the engine, by outcome",
           [(f'{{outcome="{o}"}}', stats["outcomes"].get(o, 0)) for o in outcomes])
    metric("mllama_http_responses_total", "counter", "HTTP responses by route and status",
           [(f'{{route="{r}",status="{s}"}}', c) for (r, s), c in sorted(http_counts.items())])
    metric("mllama_generation_tokens_total", "counter", "Tokens generated", [("", stats["tokens_generated"])])
    metric("mllama_prompt_tokens_total", "counter", "Prompt tokens prefilled", [("", stats["prompt_tokens"])])
    metric("mllama_queue_depth", "gauge", "Requests waiting for a slot", [("", stats["queue_depth"])])
    metric("mllama_running_requests", "gauge", "Requests in the running batch", [("", stats["running"])])
    metric("mllama_batch_slots", "gauge", "Slots of the running batch (--max-batch)", [("", stats["max_batch"])])
    metric("mllama_decode_steps_total", "counter", "Batched decode steps run", [("", stats["steps"])])
    metric("mllama_cache_bytes_in_use", "gauge", "K/V cache bytes held by running requests",
           [("", stats["cache_bytes_in_use"])])
    metric("mllama_cache_bytes_allocated", "gauge", "K/V cache bytes preallocated for all slots",
           [("", stats["cache_bytes_allocated"])])
    metric("mllama_prefills_overlapped_total", "counter", "Prefills whose vision encoder ran beside decode steps",
           [("", stats.get("overlapped_prefills", 0))])
    metric("mllama_engine_busy_seconds_total", "counter", "Engine loop time by phase",
           [(f'{{phase="{p}"}}', v) for p, v in sorted(stats.get("busy_seconds", {}).items())])
    histogram("mllama_time_to_first_token_seconds", "Engine: submit to first token", stats["ttft"])
    histogram("mllama_inter_token_latency_seconds", "Engine: time between tokens", stats["itl"])
    if timings:
        histogram("mllama_request_decode_seconds", "Server: arrival to decoded inputs (body, JSON, template, "
                  "images)", timings["decode"].snapshot())
        histogram("mllama_server_time_to_first_token_seconds", "Server: arrival to first token",
                  timings["ttft"].snapshot())
    return "\n".join(lines) + "\n"
