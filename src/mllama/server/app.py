"""The OpenAI-compatible HTTP API over a BatchEngine.

Bodies are parsed by hand rather than by pydantic models so that every error has OpenAI's shape and names the
field at fault (pydantic's 422 lists would not be what OpenAI clients expect).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..constraints import GrammarError, Grammars, schema_of
from ..engine.batch import BatchEngine, sampling_params
from ..engine.requests import Event, RequestTooLong
from ..engine.scheduler import EngineStopped, QueueFull
from ..engine.stats import Histogram
from ..sampling import GREEDY_BELOW_TEMPERATURE
from .engine_process import EngineProcess, LocalEngine, pack_tensors
from .image_memory import join_pixels, with_refs
from .prompts import DecodedImages, ImageOptions, ImagePart, ImageRef, RefsMisplaced, RemoteImagesNeeded, \
    RequestError, chat_ids, chat_inputs, completion_inputs, fetch_remote, image_inputs, prompt_ids, prompt_list, \
    special_texts
from .tools import Tools, call_schema, calls_of, tools_of


# An answer given before the body was read whole ends the connection: the rest of the body is never read, and
# the connection must not stay open in the body state (uvicorn's idle timers do not cover it).
CLOSE = {"connection": "close"}
ACCESS_LOG = logging.getLogger("mllama.access")  # one line per request; `mllama serve` prints it on stderr


@dataclass
class ServerOptions:
    model_name: str = "mllama"
    api_key: str | None = None
    images: ImageOptions = field(default_factory=ImageOptions)
    default_max_tokens: int | None = None  # None: whatever the context leaves
    retry_after: int = 1
    max_body_bytes: int = 100 * 1024 * 1024
    body_timeout: float = 60.0  # seconds from the request's head to the end of its body
    # Where input worker processes load the processor from (the checkpoint); None or 0 workers: decode requests on
    # threads of this process instead.
    processor_source: str | None = None
    input_workers: int = 0
    # Decoded images this process keeps for requests that send them again (DecodedImages, and image_memory's
    # refs to input workers), in bytes of tiles; 0: none kept (`mllama serve --no-image-cache`).
    decoded_image_bytes: int = 2 * 2**30


# --- request decoding: JSON, fields, template, tokens, images --------------------------------------------------
# All of it holds the GIL for tens of milliseconds per request with an image (json of a 5 MB data URL 7 ms,
# base64 and PNG decoding 50 ms, tiling 25 ms, measured on a 1120x1120 PNG), so it runs in worker processes; what
# comes back is small (the fields) or plain bytes (the tiles, already in the model's dtype).


# A JSON body's memory grows with its number of values, not its bytes: 100 MB of `[{},{},...]` are 33 million
# dicts, gigabytes of a worker. Bodies are big because of their data URLs (long strings), so the values are counted
# (an upper bound: the bytes that open or separate one) before parsing. Nesting is bounded too: the parser and the
# checks below walk it.
MAX_JSON_VALUES = 1_000_000
MAX_JSON_DEPTH = 64


def parse_body(raw: bytes) -> dict:
    """A request body -> its JSON object; RequestError for what is not a JSON object within the limits above or
    holds text that is not Unicode (a lone surrogate such as \\ud800)."""
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > MAX_JSON_VALUES:
        raise RequestError(f"the request body has up to {values} JSON values, more than the limit of "
                           f"{MAX_JSON_VALUES}", None, 413, "request_too_large")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError(f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)", None) \
            from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", None) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    check_values(body)
    return body


def check_values(body: dict) -> None:
    """Walks the body without recursion: at most MAX_JSON_DEPTH levels, and every string (keys too) encodable as
    UTF-8. The error names the field, as `messages[0].content[1].text`."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"{path} is nested too deeply (at most {MAX_JSON_DEPTH} levels)", path)
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                _check_text(key, where)
                stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = where.encode("utf-8", "backslashreplace").decode("utf-8")  # the path may hold the bad key itself
        raise RequestError(f"{where} is not valid Unicode text: a lone surrogate {text[e.start]!r} at character "
                           f"{e.start}", where) from None


def check_model(body: dict, model_name: str, required: bool = True) -> None:
    """The body's `model` must name the served model (vLLM's /tokenize lets it out: `required=False`)."""
    name = body.get("model", None if required else model_name)
    if not isinstance(name, str):
        raise RequestError(f"model must be a string: the served model is {model_name!r}", "model")
    if name != model_name:
        raise RequestError(f"the model {name!r} does not exist: this server serves {model_name!r}", "model", 404,
                           "model_not_found")


def decode_parts(processor, raw: bytes, chat: bool, model_name: str, images: ImageOptions,
                 pixel_dtype: str | None, max_model_len: int | None = None, fetched: dict[str, bytes] | None = None,
                 memo: DecodedImages | None = None,
                 refs: dict[str, ImageRef] | None = None) -> tuple["Parsed", list[int], list[ImagePart]]:
    """A request body -> (its options, prompt ids, its images' parts); RequestError names the field at fault.
    RemoteImagesNeeded when http(s) image URLs have no bytes in `fetched` (url -> bytes) yet. Images are tiled in
    `pixel_dtype` (the engine's), through `memo` when given; `refs` (image_memory) stand for images held already."""
    body = parse_body(raw)
    check_model(body, model_name)
    parsed = parse_common(body, chat)
    if chat:
        parsed.tools = tools_of(body, special_texts(processor.tokenizer))
        ids, parts = chat_inputs(processor, body.get("messages"), images, max_model_len, fetched, pixel_dtype, memo,
                                 refs, parsed.tools.functions if parsed.tools is not None else None)
    else:
        if "prompt" not in body:
            raise RequestError("prompt is required", "prompt")
        many = prompt_list(processor, body.get("prompt"), max_model_len)
        if many is not None:  # several prompts: one choice each, no images
            if body.get("images"):
                raise RequestError("images go with a single prompt: send a list of prompts without images",
                                   "images")
            parsed.prompts = many
            if parsed.echo is None:
                parsed.echoes = [p if isinstance(p, str) else processor.tokenizer.decode(i, skip_special_tokens=False)
                                 for p, i in zip(body["prompt"], many)]
            return parsed, many[0], []
        ids, parts = completion_inputs(processor, body.get("prompt"), body.get("images"), images, max_model_len,
                                       fetched, pixel_dtype, memo, refs)
        if parsed.echo is None:  # a prompt of token ids echoes their text, special tokens included
            parsed.echo = processor.tokenizer.decode(ids, skip_special_tokens=False)
    return parsed, ids, parts


def decode_request(processor, raw: bytes, chat: bool, model_name: str, images: ImageOptions,
                   pixel_dtype: str | None, max_model_len: int | None = None, fetched: dict[str, bytes] | None = None,
                   memo: DecodedImages | None = None) -> tuple["Parsed", list[int], dict]:
    """decode_parts, with the model inputs joined and packed for the engine."""
    parsed, ids, parts = decode_parts(processor, raw, chat, model_name, images, pixel_dtype, max_model_len, fetched,
                                      memo)
    return parsed, ids, pack_tensors(image_inputs(processor, ids, parts))


_WORKER = None  # the processor, in an input worker


def _init_worker(source: str) -> None:
    global _WORKER
    import signal

    import torch

    # The server stops its workers itself (a Ctrl-C or SIGTERM to the process group must not kill them mid-request),
    # and a worker whose server died without stopping it (SIGKILL, the OOM killer) exits instead of waiting forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="mllama-parent-watch", daemon=True).start()

    from ..processing.processor import AutoProcessor

    torch.set_num_threads(1)  # several workers side by side: one thread each
    _WORKER = AutoProcessor.from_pretrained(source)
    _warm_up(_WORKER)


def _exit_with_parent() -> None:
    import os
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(0)


def _warm_up(processor) -> None:
    """Decode one small chat request with an image, so that the first client request a fresh worker gets does not
    pay for lazy imports and first-call set-up (PIL's PNG plugin, the chat template, the tokenizer, torch's
    kernels): ~70 ms on a 1120x1120 PNG request, measured. This costs a few milliseconds per worker at start."""
    import base64
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (120, 90, 60)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "warm-up", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe this image."}]}]}
    try:
        decode_request(processor, json.dumps(body).encode(), True, "warm-up", ImageOptions(), "bfloat16")
    except Exception:  # e.g. a chat template that takes no images: the worker still starts, cold
        pass


def _job(raw: bytes, chat: bool, context: tuple, fetched: dict[str, bytes] | None, refs: dict[str, ImageRef]):
    """In a worker: decode_parts -> (options, ids, the packed inputs but pixel_values, [(image part without pixels,
    its packed pixels or None for a ref)]) for image_memory.join_pixels."""
    parsed, ids, parts = decode_parts(_WORKER, raw, chat, *context, fetched=fetched, refs=refs)
    inputs = image_inputs(_WORKER, ids, parts)
    inputs.pop("pixel_values", None)
    pixels = [(part._replace(pixels=None), None if part.pixels is None else pack_tensors({"p": part.pixels})["p"])
              for part in parts]
    return parsed, ids, pack_tensors(inputs), pixels


def _ready() -> bool:
    return _WORKER is not None


class InputWorkers:
    """`workers` spawned processes that decode requests. A worker that dies (killed, out of memory) breaks a
    ProcessPoolExecutor for good, so the pool is then replaced by a fresh one, and the requests that were on the
    broken pool (innocent, most of them) are decoded once more on the new one; a request that breaks a second pool
    gets a 503. While no pool works, `healthy` says so (and /health answers 503)."""

    def __init__(self, source: str, workers: int):
        self.source, self.workers = source, workers
        self.context: tuple = ()  # decode_parts' (model name, image options, pixel dtype, context length)
        self.lock = threading.Lock()
        self.replacements = 0  # pools replaced after a worker died (/metrics)
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        mp_context = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        pool = ProcessPoolExecutor(self.workers, mp_context=mp_context, initializer=_init_worker,
                                   initargs=(self.source,))
        # start them all now (each imports torch and loads the tokenizer), not on the first requests
        assert all(f.result() for f in [pool.submit(_ready) for _ in range(self.workers * 2)])
        return pool

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """The working pool: `broken` replaced if no other request has replaced it already (on a thread: a start
        takes seconds)."""
        with self.lock:
            if self.pool is broken:
                if broken is not None:
                    broken.shutdown(wait=True, cancel_futures=True)  # its manager thread has ended the workers
                self.pool = None
                self.pool = self._start()
                self.replacements += 1
            return self.pool

    async def run(self, raw: bytes, chat: bool, fetched: dict[str, bytes] | None = None,
                  refs: dict[str, ImageRef] | None = None):
        """_job's answer for this body."""
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            pool = self.pool or await asyncio.to_thread(self._replace, None)
            try:
                return await loop.run_in_executor(pool, _job, raw, chat, self.context, fetched, refs or {})
            except BrokenProcessPool:
                await asyncio.to_thread(self._replace, pool)
        raise RequestError("an input worker died twice while decoding this request; try again", None, 503,
                           "worker_died")

    def healthy(self) -> str | None:
        """None if the pool works, else why not (a dead worker is seen here before any request meets it)."""
        pool = self.pool
        if pool is None:
            return "the input workers are being restarted"
        try:
            pool.submit(_ready)  # raises at once on a broken pool; else a no-op job
        except BrokenProcessPool:
            threading.Thread(target=self._replace, args=(pool,), daemon=True).start()
            return "an input worker died; the input workers are being restarted"
        except RuntimeError:  # shut down
            return "the input workers are stopped"
        return None

    def close(self) -> None:
        """Waits for the pool's manager thread: if the interpreter exits while it still runs, Python 3.11's exit
        hook writes to the wake-up pipe that thread is closing ("OSError: Bad file descriptor" at exit)."""
        with self.lock:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


async def _disconnected(request: Request, job, events: asyncio.Queue) -> None:
    """Cancels `job` and wakes its reader (a None event) when the client closes the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    events.put_nowait(None)


def _merge_ready(event: Event, queue: asyncio.Queue) -> Event:
    """`event` joined with the events already waiting behind it: a client that reads slower than tokens come gets
    them in fewer, larger chunks instead of falling further behind."""
    while not (event.finish_reason or event.error) and not queue.empty():
        nxt = queue.get_nowait()
        if nxt is None:  # the client left (collect's watcher): met at the next get
            queue.put_nowait(None)
            return event
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
    if stop is None or stop == []:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or an array of at most 4 non-empty strings", "stop")
    if max(len(s) for s in stop) > MAX_STOP_CHARS:  # each decode step searches the text's tail this long
        raise RequestError(f"stop strings must be at most {MAX_STOP_CHARS} characters long", "stop")
    return tuple(stop)


MAX_STOP_CHARS = 1000
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what a torch.Generator takes
SEED_SPAN = SEED_RANGE[1] - SEED_RANGE[0] + 1
MAX_CHOICES = 128  # n
# The smallest positive float32: the sampler computes in float32, where a smaller positive temperature is 0.
SMALLEST_TEMPERATURE = 1.4e-45


def _temperature(body: dict) -> float | None:
    value = _float(body, "temperature", 0.0, 2.0)
    if value is not None and 0 < value < SMALLEST_TEMPERATURE:
        raise RequestError(f"temperature {value} is positive but smaller than the smallest float32 number "
                           f"({SMALLEST_TEMPERATURE}), which sampling computes in: send 0 for greedy decoding "
                           f"(every temperature below {GREEDY_BELOW_TEMPERATURE} decodes greedily)", "temperature")
    return value


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
    top_k: int = 0  # vLLM's extras, from here down
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's, from here down
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: they end the answer as the end token does
    echo: str | None = ""  # /v1/completions' echo: the prompt text, put before the answer's
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt tokens' logprobs come first
    response_format: Any = None  # as sent; compiled by constraints.Grammars before the request is submitted
    tools: Tools | None = None  # chat's tools (server.tools), None without them or with tool_choice "none"
    n: int = 1  # choices per prompt
    prompts: list | None = None  # /v1/completions with several prompts: each one's ids (n choices each)
    echoes: list | None = None  # and, with echo, each one's text


# The request fields each endpoint reads (parse_common, decode_parts); IGNORED_FIELDS carry no meaning for this
# server and are accepted (the README lists them); NOT_YET change the answer and are not built, so they are refused
# unless they hold the value that changes nothing (clients send tools [] or response_format text routinely).
_FIELDS = {"model", "n", "max_tokens", "stream", "stream_options", "logprobs", "seed", "temperature", "top_p",
           "stop", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens", "logit_bias",
           "presence_penalty", "frequency_penalty", "stop_token_ids", "response_format"}
_CHAT_FIELDS = _FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                          "parallel_tool_calls"}
_COMPLETION_FIELDS = _FIELDS | {"prompt", "images", "best_of", "echo"}
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
NOT_YET = {"functions": ([],), "function_call": ("none",),
           "echo": (False,),
           "suffix": ("",)}


def check_fields(body: dict, chat: bool) -> None:
    """Refuses, naming it, a field this server would otherwise not honour (OpenAI's words for one it does not
    know at all)."""
    known = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name, value in body.items():
        if name in known or name in IGNORED_FIELDS:
            continue
        if name in NOT_YET:
            if value is None or any(value == neutral and type(value) is type(neutral) for neutral in NOT_YET[name]):
                continue
            raise RequestError(f"{name} is not supported by this server yet: send it without {name} (or with "
                               f"{NOT_YET[name][0]!r}, which changes nothing)", name)
        raise RequestError(f"Unrecognized request argument supplied: {name}", name)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return value


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in value):
        raise RequestError(f"{name} must be a list of token ids (integers >= 0), got {value!r}"[:300], name)
    return tuple(value)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError("logit_bias must be an object mapping token ids to biases, like {\"1234\": -100}",
                           "logit_bias")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise RequestError(f"logit_bias maps token ids (strings of digits) to numbers, got {key!r}: {bias!r}",
                               "logit_bias")
        if not -100 <= bias <= 100:
            raise RequestError(f"logit_bias[{key!r}] must be between -100 and 100, got {bias}", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def parse_common(body: dict, chat: bool) -> Parsed:
    check_fields(body, chat)
    n = _int(body, "n", 1, MAX_CHOICES, 1)
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
        usage = options.get("include_usage") if isinstance(options, dict) else None
        if not isinstance(options, dict) or not isinstance(usage, (bool, type(None))):
            raise RequestError("stream_options must be an object like {\"include_usage\": true}", "stream_options")
        include_usage = bool(usage)
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
    echo = "" if chat else _echo(body, logprobs)
    seed = _int(body, "seed", *SEED_RANGE)
    top_p = _float(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise RequestError(f"top_p must be greater than 0 and at most 1, got {top_p}", "top_p")
    repetition_penalty = _float(body, "repetition_penalty", 0.0, 2.0 ** 64)
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise RequestError(f"repetition_penalty must be greater than 0 (1 = off), got {repetition_penalty}",
                           "repetition_penalty")
    top_k = _int(body, "top_k", -1, None, 0)
    return Parsed(max_tokens=max_tokens, temperature=_temperature(body), top_p=top_p, seed=seed, stop=_stop(body),
                  stream=stream, include_usage=include_usage, logprobs=logprobs,
                  top_k=0 if top_k == -1 else top_k,  # (vLLM's -1 means off, as 0 does)
                  min_p=_float(body, "min_p", 0.0, 1.0) or 0.0,
                  repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                  min_tokens=_int(body, "min_tokens", 0, None, 0), ignore_eos=_flag(body, "ignore_eos", False),
                  skip_special_tokens=_flag(body, "skip_special_tokens", True), logit_bias=_logit_bias(body),
                  presence_penalty=_float(body, "presence_penalty", -2.0, 2.0) or 0.0,
                  frequency_penalty=_float(body, "frequency_penalty", -2.0, 2.0) or 0.0,
                  stop_token_ids=_token_ids(body, "stop_token_ids"), echo=echo, n=n,
                  prompt_logprobs=logprobs if echo != "" and logprobs is not None else None,
                  response_format=_response_format(body))


def _response_format(body: dict) -> Any:
    """response_format, checked in shape (the schema itself compiles later); None for plain text."""
    try:
        schema, _ = schema_of(body.get("response_format"))
    except GrammarError as e:
        raise RequestError(str(e), e.param) from None
    return None if schema is None else body["response_format"]


def _prompt_part(entries: list[dict]) -> tuple[list[dict], list[dict]]:
    """A first event's logprob entries split into the prompt's (echo with logprobs) and the answer's."""
    prompt = [e for e in entries if e.get("prompt")]
    return prompt, entries[len(prompt):]


def _echo(body: dict, logprobs: int | None) -> str | None:
    """/v1/completions' echo: the prompt text to put before the answer ("" without echo, None for a prompt of
    token ids: their text, decode_parts fills it in)."""
    if not _flag(body, "echo", False):
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):  # one prompt in a list
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None  # None: token ids, decoded once they are read


# -----------------------------------------------------------------------------------------------------------------
# The app


class Guard:
    """Authentication and the body-size limit before any route reads the body, OpenAI's error shape for anything a
    route lets escape, a count of every answer by route and status, and one access-log line per request.

    A plain ASGI middleware: it sees each streamed chunk pass by and does nothing to it (Starlette's
    `@app.middleware("http")` form would copy every chunk through an extra task and stream, per token of every
    running request)."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")

    def __init__(self, app, options: ServerOptions, counts: dict):
        self.app, self.options, self.counts = app, options, counts

    def _count(self, key: tuple[str, int]) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _refusal(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if self.options.api_key is not None and (scheme.lower() != "bearer" or key.strip() != self.options.api_key):
            return error_response("invalid or missing API key: send 'Authorization: Bearer <key>'", 401, None,
                                  "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.options.max_body_bytes:
            return error_response(f"the request body is {length} bytes, more than {self.options.max_body_bytes}",
                                  413, None, "request_too_large", headers=CLOSE)
        return None

    def _limited(self, receive):
        """`receive` that counts the body's bytes as they arrive (chunked bodies carry no Content-Length) and
        refuses past the limit, before the rest is read; and a body that trickles in is cut at the body deadline
        (a connection held open that way holds memory and a connection slot)."""
        limit, seen = self.options.max_body_bytes, [0]
        deadline = time.monotonic() + self.options.body_timeout
        complete = [False]

        async def receive_counted():
            if complete[0]:  # the body is read: what comes next is the disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError(f"the request body did not arrive within {self.options.body_timeout:g} s", None,
                                   408, "request_timeout") from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                complete[0] = not message.get("more_body", False)
                if seen[0] > limit:
                    raise RequestError(f"the request body is more than {limit} bytes", None, 413,
                                       "request_too_large")
            return message
        return receive_counted

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, path, status = time.monotonic(), scope["path"], []
        route = "/v1/models" if path.startswith("/v1/models/") else path
        route = route if route in self.ROUTES else "other"

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if path.startswith("/v1/"):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                refusal = self._refusal(path, headers)
                if refusal is not None:
                    return await refusal(scope, receive, send_and_note)
                receive = self._limited(receive)
            await self.app(scope, receive, send_and_note)
        except RequestError as e:  # the body limit or deadline, met while a route reads the body
            if status:
                raise
            await error_response(e.message, e.status, e.param, e.code, headers=CLOSE)(scope, receive, send_and_note)
        except ClientDisconnect:  # gone while its body was read: nobody to answer
            status.append(499)
        except Exception as e:  # never a bare 500 page: keep OpenAI's shape
            if status:  # the answer had started (a stream): nothing more can be said over HTTP
                raise
            response = error_response(f"internal error: {type(e).__name__}: {e}", 500, None, None, "server_error")
            await response(scope, receive, send_and_note)
        finally:
            code = status[0] if status else 500
            self._count((route, code))
            usage = scope.get("state", {}).get("usage")
            tokens = f" tokens {usage[0]}+{usage[1]}" if usage else ""
            client = scope.get("client") or ("-", 0)
            ACCESS_LOG.info("%s %s %s %d%s %.3fs", client[0], scope.get("method", "-"), path, code, tokens,
                            time.monotonic() - began)


def tokenize_request(processor, raw: bytes, model_name: str, images: ImageOptions, max_model_len: int) -> dict:
    """vLLM's /tokenize: {"prompt": text, "add_special_tokens": true} or {"messages": [...]} -> the ids the model
    would be given (a chat's through the instruct template; images are not loaded)."""
    body = parse_body(raw)
    unknown = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens"})
    if unknown:
        raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    check_model(body, model_name, required=False)
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("send either prompt (a string) or messages (a chat), not both or neither", "prompt")
    if "messages" in body:
        ids, _ = chat_ids(processor, body["messages"], images, max_model_len)
    else:
        if not isinstance(body["prompt"], str):
            raise RequestError("prompt must be a string", "prompt")
        ids = prompt_ids(processor, body["prompt"], _flag(body, "add_special_tokens", True))
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}


def detokenize_request(processor, raw: bytes, model_name: str) -> dict:
    """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": their text}, special tokens included."""
    body = parse_body(raw)
    unknown = sorted(set(body) - {"model", "tokens"})
    if unknown:
        raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    check_model(body, model_name, required=False)
    tokens = _token_ids(body, "tokens")
    if "tokens" not in body:
        raise RequestError("tokens is required: a list of token ids", "tokens")
    vocabulary = len(processor.tokenizer)
    if any(token >= vocabulary for token in tokens):
        raise RequestError(f"tokens holds {max(tokens)}, past the vocabulary of {vocabulary} tokens", "tokens")
    return {"prompt": processor.tokenizer.decode(list(tokens), skip_special_tokens=False)}


def start_input_workers(options: ServerOptions) -> InputWorkers | None:
    """The input worker processes `options` asks for (None for none), started; create_app gives them their
    context. `mllama serve` starts them while the engine process loads the model."""
    if not options.processor_source or options.input_workers <= 0:
        return None
    return InputWorkers(options.processor_source, options.input_workers)


def create_app(processor, engine: "EngineProcess | LocalEngine | BatchEngine",
               options: ServerOptions | None = None, workers: InputWorkers | None = None) -> FastAPI:
    """The HTTP API over an engine: an EngineProcess (what `mllama serve` starts) or a started BatchEngine of this
    process. `workers`: input workers started beforehand (start_input_workers); by default, those `options` asks
    for are started here."""
    options = options or ServerOptions()
    if isinstance(engine, BatchEngine):
        engine = LocalEngine(engine)
    app = FastAPI(title="mllama", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.options = engine, options
    http_counts: dict[tuple[str, int], int] = {}
    timings = {"decode": Histogram(), "ttft": Histogram()}  # this side's share of the latency
    app.state.timings = timings
    tokenizer = processor.tokenizer
    context = (options.model_name, options.images, engine.dtype, engine.max_model_len)
    if workers is None:
        workers = start_input_workers(options)
    if workers is not None:
        workers.context = context
    memo = DecodedImages(options.decoded_image_bytes) if options.decoded_image_bytes > 0 else None
    app.state.input_workers, app.state.decoded_images = workers, memo

    app.add_middleware(Guard, options=options, counts=http_counts)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # 404, 405: OpenAI's shape too
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.url.path!r}: this server answers /v1/chat/completions, "
                        f"/v1/completions, /v1/models, /health and /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(message, e.status_code, None, kind, headers=getattr(e, "headers", None))

    # Remote images are fetched here, on threads: waiting on an image server is I/O, and inside an input worker one
    # slow server would hold up every request queued behind it. At most 16 at a time, each within
    # ImageOptions.timeout in all.
    fetch_pool = ThreadPoolExecutor(16, thread_name_prefix="mllama-image-fetch")

    async def fetch_images(wanted: list[tuple[str, str]]) -> dict[str, bytes]:
        params: dict[str, str] = {}
        for url, param in wanted:
            params.setdefault(url, param)  # the same URL twice is fetched once
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(fetch_pool, fetch_remote, url, param, options.images)
                                         for url, param in params.items()), return_exceptions=True)
        for result in results:  # the first failure in request order, as one image after the other would give
            if isinstance(result, BaseException):
                raise result
        return dict(zip(params, results))

    async def decode_once(raw: bytes, chat: bool, fetched: dict[str, bytes] | None):
        if workers is not None:
            sent, refs, held = with_refs(raw, memo) if memo is not None else (raw, {}, {})
            try:
                parsed, ids, packed, pixels = await workers.run(sent, chat, fetched, refs)
            except RefsMisplaced:  # a span that looked like a held image was not one: the body as it came
                parsed, ids, packed, pixels = await workers.run(raw, chat, fetched)
                held = {}
            return parsed, ids, join_pixels(packed, pixels, held, memo)
        return await asyncio.to_thread(decode_request, processor, raw, chat, *context, fetched=fetched, memo=memo)

    async def decode(raw: bytes, chat: bool):
        try:
            return await decode_once(raw, chat, None)  # data URLs only: this one pass is all
        except RemoteImagesNeeded as needed:
            fetched = await fetch_images(needed.urls)
        return await decode_once(raw, chat, fetched)

    app.router.redirect_slashes = False  # a redirect would send the client to whatever its Host header names

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        failed = engine.failed if engine.failed is not None else workers.healthy() if workers is not None else None
        if failed is not None:
            return JSONResponse({"status": "error", "message": failed}, status_code=503)
        return {"status": "ok" if engine.accepting else "shutting_down"}

    def model_card() -> dict:
        return {"id": options.model_name, "object": "model", "created": 0, "owned_by": "mllama",
                "max_model_len": engine.max_model_len}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        if model_id != options.model_name:
            return error_response(f"the model {model_id!r} does not exist: this server serves "
                                  f"{options.model_name!r}", 404, "model", "model_not_found")
        return model_card()

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        restarts = workers.replacements if workers is not None else 0
        images = (memo.hits, memo.misses) if memo is not None else (0, 0)
        return PlainTextResponse(render_metrics(await engine.stats(), http_counts, timings, restarts, images),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            return await asyncio.to_thread(tokenize_request, processor, await request.body(), options.model_name,
                                           options.images, engine.max_model_len)
        except RequestError as e:
            return error_response(e.message, e.status, e.param, e.code)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        try:
            return await asyncio.to_thread(detokenize_request, processor, await request.body(), options.model_name)
        except RequestError as e:
            return error_response(e.message, e.status, e.param, e.code)

    grammars: list = []  # constraints.Grammars, made at the first response_format (about 1 s)
    grammars_lock = threading.Lock()

    def compile_in_thread(response_format: Any, for_tools: bool) -> str | None:
        with grammars_lock:
            if not grammars:
                grammars.append(Grammars(tokenizer))
        try:
            return grammars[0].compile(response_format)
        except GrammarError as e:
            if for_tools:  # the schema is the tools' parameters, not a response_format the client sent
                raise RequestError(str(e).replace(e.param, "the tools' parameters"), "tools") from None
            raise RequestError(str(e), e.param) from None

    async def compile_grammar(parsed: Parsed) -> str | None:
        """The grammar the answer must follow (None: free text); RequestError naming what cannot be."""
        response_format = parsed.response_format
        calls = call_schema(parsed.tools) if parsed.tools is not None else None
        if calls is not None:
            if response_format is not None:
                raise RequestError("response_format cannot go with tool_choice \"required\" or a named function: "
                                   "the answer is the call", "response_format")
            response_format = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": calls}}
        if response_format is None:
            return None
        if parsed.min_tokens or parsed.ignore_eos:
            name = "min_tokens" if parsed.min_tokens else "ignore_eos"
            raise RequestError(f"{name} cannot go with response_format: the answer ends where its schema does",
                               name)
        return await asyncio.to_thread(compile_in_thread, response_format, calls is not None)

    async def handle(request: Request, chat: bool):
        arrival = time.monotonic()
        parsed, ids = None, []
        try:
            parsed, ids, inputs = await decode(await request.body(), chat)
            timings["decode"].observe(time.monotonic() - arrival)
            max_tokens = parsed.max_tokens
            longest = max(len(p) for p in parsed.prompts) if parsed.prompts else len(ids)
            if max_tokens is None:
                max_tokens = options.default_max_tokens or max(1, engine.max_model_len - longest)
            for prompt in parsed.prompts or [ids]:
                engine.check_length(len(prompt), max_tokens)
            if parsed.min_tokens > max_tokens:
                raise RequestError(f"min_tokens ({parsed.min_tokens}) must not exceed max_tokens ({max_tokens})",
                                   "min_tokens")
            for name, tokens in (("logit_bias", [t for t, _ in parsed.logit_bias]),
                                 ("stop_token_ids", parsed.stop_token_ids)):
                if any(token >= len(tokenizer) for token in tokens):
                    raise RequestError(f"{name} names token {max(tokens)}, past the vocabulary of {len(tokenizer)} "
                                       f"tokens", name)
            grammar = await compile_grammar(parsed)
            params = sampling_params(engine, max_tokens, parsed.temperature, parsed.top_p, parsed.top_k,
                                     parsed.repetition_penalty, parsed.min_tokens, parsed.ignore_eos,
                                     parsed.logit_bias, parsed.presence_penalty, parsed.frequency_penalty,
                                     parsed.stop_token_ids, parsed.min_p)
        except RequestError as e:
            return error_response(e.message, e.status, e.param, e.code,
                                  headers=CLOSE if e.status in (408, 413) else None)
        except RequestTooLong as e:  # the prompt's fault, unless max_tokens was given and the prompt alone fits
            fits = parsed is not None and parsed.max_tokens and len(ids) < engine.max_model_len
            return error_response(str(e), 400, "max_tokens" if fits else ("messages" if chat else "prompt"),
                                  "context_length_exceeded")
        except ValueError as e:
            return error_response(str(e), 400, None, None)
        if parsed.prompts is not None or parsed.n > 1:
            return await handle_many(request, chat, parsed, ids, inputs, params, grammar, arrival)

        events: asyncio.Queue[Event] = asyncio.Queue()
        first = [True]

        def emit(event: Event) -> None:  # on the event loop
            if first[0]:
                first[0] = False
                timings["ttft"].observe(time.monotonic() - arrival)
            events.put_nowait(event)

        try:
            job, = engine.submit_many([dict(prompt_ids=ids, params=params, model_inputs=inputs, stop=parsed.stop,
                                            seed=parsed.seed, logprobs=parsed.logprobs, emit=emit,
                                            skip_special_tokens=parsed.skip_special_tokens,
                                            end_tokens=params.eos_token_id, grammar=grammar,
                                            prompt_logprobs=parsed.prompt_logprobs)])
        except (QueueFull, EngineStopped, RequestTooLong) as e:
            return submit_refusal(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if parsed.stream:
            return StreamingResponse(stream(request, job, events, rid, created, chat, parsed),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(request, job, events, rid, created, chat, parsed)

    def submit_refusal(e: Exception) -> JSONResponse:
        if isinstance(e, QueueFull):
            return error_response(f"the server is busy: {e}; retry later", 429, None, "queue_full",
                                  "rate_limit_exceeded", headers={"Retry-After": str(options.retry_after)})
        if isinstance(e, EngineStopped):
            return error_response(str(e), 503, None, "shutting_down", "server_error")
        return error_response(str(e), 400, "max_tokens", "context_length_exceeded")

    async def handle_many(request: Request, chat: bool, parsed: Parsed, ids: list[int], inputs: dict, params,
                          grammar: str | None, arrival: float):
        """Several choices: n per prompt, and on /v1/completions one prompt or several. One engine request per
        choice (submitted together, refused together; a prompt's n choices share its prefill), the choices
        indexed prompt by prompt, n each; with a seed, choice j of a prompt samples with seed + j. Their events
        come tagged with the choice's index."""
        queue: asyncio.Queue = asyncio.Queue()
        group = _Jobs()
        first = [True]

        def emitter(index: int):
            def emit(event: Event) -> None:  # on the event loop
                if first[0]:
                    first[0] = False
                    timings["ttft"].observe(time.monotonic() - arrival)
                queue.put_nowait((index, event))
            return emit

        prompts = parsed.prompts or [ids]
        echoes = parsed.echoes or [parsed.echo or ""] * len(prompts)
        wanted = [(prompt, echo, j) for prompt, echo in zip(prompts, echoes) for j in range(parsed.n)]
        share = uuid.uuid4().hex  # the n choices of a prompt share its prefill (BatchEngine.submit_many)
        choices = []
        for index, (prompt, _, j) in enumerate(wanted):
            seed = None if parsed.seed is None else (parsed.seed + j - SEED_RANGE[0]) % SEED_SPAN + SEED_RANGE[0]
            choices.append(dict(prompt_ids=prompt, params=params, stop=parsed.stop, seed=seed,
                                model_inputs=inputs if parsed.prompts is None else {}, logprobs=parsed.logprobs,
                                emit=emitter(index), skip_special_tokens=parsed.skip_special_tokens,
                                end_tokens=params.eos_token_id, grammar=grammar,
                                share=f"{share}-{index // parsed.n}" if parsed.n > 1 else None,
                                prompt_logprobs=parsed.prompt_logprobs))
        try:
            group.jobs.extend(engine.submit_many(choices))
        except (QueueFull, EngineStopped, RequestTooLong) as e:
            return submit_refusal(e)
        rid, created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time())
        echoes = [echo for _, echo, _ in wanted]
        if parsed.stream:
            return StreamingResponse(stream_many(group, queue, rid, created, chat, parsed, echoes),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect_many(request, group, queue, rid, created, chat, parsed, echoes)

    async def collect_many(request: Request, group: "_Jobs", queue: asyncio.Queue, rid: str, created: int,
                           chat: bool, parsed: Parsed, echoes: list[str]):
        count = len(echoes)
        texts, entries, finals = [[] for _ in range(count)], [[] for _ in range(count)], [None] * count
        watcher = asyncio.ensure_future(_disconnected(request, group, queue))
        done = False
        try:
            while any(final is None for final in finals):
                item = await queue.get()
                if item is None:  # the client left: every job is cancelled
                    return error_response("client disconnected", 499, None, "client_closed")
                index, ev = item
                if ev.error:  # the others are cancelled below
                    return error_response(f"generation failed: {ev.error}", 500, None, None, "server_error")
                texts[index].append(ev.text)
                entries[index].extend(ev.logprobs)
                if ev.finish_reason:
                    finals[index] = ev
            done = True
        finally:
            watcher.cancel()
            if not done:
                group.cancel()
        usage = _usage(finals)
        request.state.usage = (usage["prompt_tokens"], usage["completion_tokens"])
        choices = []
        for i, ev in enumerate(finals):
            text = echoes[i] + "".join(texts[i])
            logprobs = None if parsed.logprobs is None else \
                {"content": logprob_payload(entries[i], True, 0)} if chat else logprob_payload(entries[i], False, 0)
            if not chat:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": ev.finish_reason})
                continue
            message, finish = {"role": "assistant", "content": text}, ev.finish_reason
            calls = calls_of(text, parsed.tools) if parsed.tools is not None and finish == "stop" else None
            if calls:
                message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": options.model_name, "choices": choices, "usage": usage}

    async def stream_many(group: "_Jobs", queue: asyncio.Queue, rid: str, created: int, chat: bool,
                          parsed: Parsed, echoes: list[str]):
        count = len(echoes)
        offsets, finals = [0] * count, [None] * count
        kind = "chat.completion.chunk" if chat else "text_completion"

        def piece(index: int, text: str | None, finish: str | None, entries: list) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                if parsed.logprobs is not None and entries:
                    choice["logprobs"] = {"content": logprob_payload(entries, True, 0)}
            else:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                if parsed.logprobs is not None and entries:
                    choice["logprobs"] = logprob_payload(entries, False, offsets[index])
            payload = {"id": rid, "object": kind, "created": created, "model": options.model_name,
                       "choices": [choice]}
            if parsed.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        def call_piece(index: int, calls: list[dict]) -> str:
            deltas = [{"index": i, **call} for i, call in enumerate(calls)]
            payload = {"id": rid, "object": kind, "created": created, "model": options.model_name,
                       "choices": [{"index": index, "delta": {"tool_calls": deltas}, "logprobs": None,
                                    "finish_reason": None}]}
            if parsed.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        # tools: each choice's answer is held until it shows whether it is a call (_HeldAnswer)
        held = [_HeldAnswer(parsed.tools, functools.partial(piece, index), functools.partial(call_piece, index))
                for index in range(count)] if chat and parsed.tools is not None else None
        finished = False
        try:
            scored = parsed.prompt_logprobs is not None  # the echo goes with its logprobs, in the first event
            for index, echo in enumerate(echoes):
                if chat or (echo and not scored):
                    yield piece(index, None if chat else echo, None, [])
            echoed = [not scored] * count
            while any(final is None for final in finals):
                index, ev = await queue.get()
                if not echoed[index] and not ev.error:
                    echoed[index] = True
                    prompt, rest = _prompt_part(ev.logprobs)
                    yield piece(index, echoes[index], None, prompt)
                    offsets[index] += len(echoes[index])
                    ev = dataclasses.replace(ev, logprobs=rest)
                if ev.error:
                    error = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                       "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                if held is not None:
                    held[index].add(ev)
                    for chunk in held[index].ready(ev.finish_reason):
                        yield chunk
                elif ev.text or ev.logprobs or ev.finish_reason:
                    yield piece(index, ev.text, ev.finish_reason, ev.logprobs)
                    offsets[index] += len(ev.text)
                if ev.finish_reason:
                    finals[index] = ev
            else:
                finished = True
                if parsed.include_usage:
                    usage = {"id": rid, "object": kind, "created": created, "model": options.model_name,
                             "choices": [], "usage": _usage(finals)}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # an error, or the client left: the other choices' requests end too
                group.cancel()

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
        for e in entries:  # where each token's text starts in the choice's text (special tokens add none)
            offsets.append(pos)
            pos += len(tokenizer.decode([e["id"]], skip_special_tokens=True))
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top"] is None else {token_text(i): lp for i, lp in e["top"]}
                                 for e in entries],
                "text_offset": offsets}

    async def collect(request: Request, job, events: asyncio.Queue, rid: str, created: int,
                      chat: bool, parsed: Parsed):
        text, entries = [], []
        done = False
        # A client that goes away must not keep its slot until max_tokens: its disconnect is the next message of
        # the connection once the body has been read, so a task waits for it beside the events.
        watcher = asyncio.ensure_future(_disconnected(request, job, events))
        try:
            while True:
                ev = await events.get()
                if ev is None:  # the client left: the job is cancelled
                    return error_response("client disconnected", 499, None, "client_closed")
                ev = _merge_ready(ev, events)
                if ev.error:
                    done = True
                    request.state.usage = (ev.prompt_tokens, ev.completion_tokens)
                    return error_response(f"generation failed: {ev.error}", 500, None, None, "server_error")
                text.append(ev.text)
                entries.extend(ev.logprobs)
                if ev.finish_reason:
                    done = True
                    break
        finally:
            watcher.cancel()
            if not done:  # cancelled by the server (shutdown) or the client: free the slot
                job.cancel()
        request.state.usage = (ev.prompt_tokens, ev.completion_tokens)
        content = "".join(text)
        usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                 "total_tokens": ev.prompt_tokens + ev.completion_tokens}
        logprobs = None
        if job.logprobs is not None:
            logprobs = {"content": logprob_payload(entries, True, 0)} if chat else logprob_payload(entries, False, 0)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            finish = ev.finish_reason
            calls = calls_of(content, parsed.tools) if parsed.tools is not None and finish == "stop" else None
            if calls:
                message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion", "created": created, "model": options.model_name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": parsed.echo + content, "logprobs": logprobs, "finish_reason": ev.finish_reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": options.model_name,
                "choices": [choice], "usage": usage}

    async def stream(request: Request, job, events: asyncio.Queue, rid: str, created: int, chat: bool,
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

        def call_chunk(calls: list[dict]) -> str:
            deltas = [{"index": i, **call} for i, call in enumerate(calls)]
            payload = {"id": rid, "object": kind, "created": created, "model": options.model_name,
                       "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None,
                                    "finish_reason": None}]}
            if parsed.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        held = _HeldAnswer(parsed.tools, text_chunk, call_chunk) if chat and parsed.tools is not None else None
        finished = False
        try:
            scored = parsed.prompt_logprobs is not None  # the echo goes with its logprobs, in the first event
            if chat:
                yield chunk("", None, [], first=True)
            elif parsed.echo and not scored:
                yield chunk(parsed.echo, None, [])
            while True:
                ev = _merge_ready(await events.get(), events)
                if scored and not ev.error:
                    scored = False
                    prompt, rest = _prompt_part(ev.logprobs)
                    yield chunk(parsed.echo, None, prompt)
                    offset += len(parsed.echo)
                    ev = dataclasses.replace(ev, logprobs=rest)
                if ev.error or ev.finish_reason:
                    request.state.usage = (ev.prompt_tokens, ev.completion_tokens)
                if ev.error:
                    error = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                       "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    finished = True
                    break
                if held is not None:  # tools: the answer may be a call, sent whole once known
                    held.add(ev)
                    for piece in held.ready(ev.finish_reason):
                        yield piece
                elif ev.text or ev.logprobs or ev.finish_reason:
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


class _Jobs:
    """The engine requests of one HTTP request with several prompts: cancelled together."""

    def __init__(self):
        self.jobs: list = []

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


def _usage(finals: list[Event]) -> dict:
    prompt = sum(ev.prompt_tokens for ev in finals)
    completion = sum(ev.completion_tokens for ev in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _HeldAnswer:
    """A streamed chat answer with tools: held until it shows whether it is a call. An answer whose first
    non-blank character is not "{" streams on as text; one that is goes out whole at its end: as tool_calls
    deltas and finish_reason "tool_calls" if it is a call (tools.calls_of), else as text. With a required or
    named call the answer is always held (the grammar makes it a call)."""

    def __init__(self, tools: Tools, text_chunk, call_chunk):
        self.tools, self.text_chunk, self.call_chunk = tools, text_chunk, call_chunk
        self.text, self.entries = "", []
        self.holding: bool | None = True if tools.choice != "auto" else None  # None: not known yet

    def add(self, ev: Event) -> None:
        self.text += ev.text
        self.entries.extend(ev.logprobs)
        if self.holding is None and self.text.strip():
            self.holding = self.text.lstrip().startswith("{")

    def ready(self, finish: str | None) -> list[str]:
        """The chunks to send now."""
        if self.holding is False or (finish and not self.holding):
            out = [self.text_chunk(self.text, finish, self.entries)] if self.text or self.entries or finish else []
            self.text, self.entries = "", []
            return out
        if not finish:
            return []
        calls = calls_of(self.text, self.tools) if finish == "stop" else None
        if calls:
            return [self.call_chunk(calls), self.text_chunk("", "tool_calls", [])]
        return [self.text_chunk(self.text, finish, self.entries)]


def render_metrics(stats: dict, http_counts: dict, timings: dict[str, Histogram] | None = None,
                   worker_restarts: int = 0, decoded_images: tuple[int, int] = (0, 0)) -> str:
    """Prometheus text from the engine's stats snapshot (BatchEngine.stats), the HTTP counts, this side's
    latency histograms, how often the input workers were replaced and their decoded-image (hits, misses)."""
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
    metric("mllama_cache_bytes_allocated", "gauge", "K/V page pools' bytes (text pages and image tile pages)",
           [("", stats["cache_bytes_allocated"])])
    pages = stats.get("pages", {})
    metric("mllama_kv_pages_used", "gauge", "K/V pages taken (text: 64 tokens of all self-attention layers; tile: "
           "one image tile of all cross-attention layers, cached images' included)",
           [(f'{{kind="{k}"}}', v["used"]) for k, v in sorted(pages.items())])
    metric("mllama_kv_pages_free", "gauge", "K/V pages free",
           [(f'{{kind="{k}"}}', v["free"]) for k, v in sorted(pages.items())])
    metric("mllama_image_cache_idle_pages", "gauge", "Tile pages of cached images no running request uses "
           "(given back when pages run short)", [("", pages.get("tile", {}).get("cached_idle", 0))])
    cache = stats.get("image_cache", {})
    metric("mllama_image_cache_hits_total", "counter", "Images whose K/V were found in the image cache",
           [("", cache.get("hits", 0))])
    metric("mllama_image_cache_misses_total", "counter", "Cacheable images encoded (not found in the cache)",
           [("", cache.get("misses", 0))])
    metric("mllama_image_cache_evictions_total", "counter", "Cached images dropped to free pages",
           [("", cache.get("evictions", 0))])
    metric("mllama_prefills_overlapped_total", "counter", "Prefills whose vision encoder ran beside decode steps",
           [("", stats.get("overlapped_prefills", 0))])
    metric("mllama_engine_busy_seconds_total", "counter", "Engine loop time by phase",
           [(f'{{phase="{p}"}}', v) for p, v in sorted(stats.get("busy_seconds", {}).items())])
    histogram("mllama_time_to_first_token_seconds", "Engine: submit to first token", stats["ttft"])
    histogram("mllama_inter_token_latency_seconds", "Engine: time between tokens", stats["itl"])
    metric("mllama_input_worker_restarts_total", "counter", "Input worker pools replaced after a worker died",
           [("", worker_restarts)])
    metric("mllama_decoded_image_hits_total", "counter", "Request images whose decoded tiles the HTTP side had "
           "kept (no base64, PNG or tiling work)", [("", decoded_images[0])])
    metric("mllama_decoded_image_misses_total", "counter", "Request images the HTTP side decoded",
           [("", decoded_images[1])])
    if timings:
        histogram("mllama_request_decode_seconds", "Server: arrival to decoded inputs (body, JSON, template, "
                  "images)", timings["decode"].snapshot())
        histogram("mllama_server_time_to_first_token_seconds", "Server: arrival to first token",
                  timings["ttft"].snapshot())
    return "\n".join(lines) + "\n"
