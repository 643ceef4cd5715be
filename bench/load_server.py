"""Load generator for `mllama serve`: streamed chat requests with one image each, at several concurrency levels.

    python bench/load_server.py --url http://127.0.0.1:8000 --model NAME 1 8 32 64 128 --requests 64 --json out.json

Loopback only (the server is assumed to be a local one under test); bounded by --requests per level and by
--time-limit seconds per level. Prints requests/s, output tokens/s, p50/p99 time-to-first-token and p50/p99
per-token latency (time between streamed chunks after the first), and writes all figures as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import random
import socket
import sys
import time
from urllib.parse import urlsplit

try:
    import httpx2 as httpx  # what the openai client installs here
except ImportError:
    import httpx


def _image_url(size: int = 64) -> str:
    import numpy as np
    import PIL.Image

    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def distinct_images(count: int, size: int, seed: int = 0) -> list[str]:
    """`count` PNG data URLs of random pixels, each different."""
    import numpy as np
    import PIL.Image

    base = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    urls = []
    for k in range(count):
        pixels = base.copy()
        pixels[k % size, (k // size) % size] ^= 0xFF  # one pixel apart: another image to the server
        pixels[0, 0, 0] = k % 256
        buf = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    for info in socket.getaddrinfo(host, None):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            sys.exit(f"refusing {url}: this load generator only targets loopback servers")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _one(client: httpx.AsyncClient, body: bytes, record: dict) -> None:
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    try:
        async with client.stream("POST", "/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"}) as response:
            if response.status_code != 200:
                await response.aread()
                record["errors"][str(response.status_code)] = record["errors"].get(str(response.status_code), 0) + 1
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except httpx.HTTPError as e:
        record["errors"][type(e).__name__] = record["errors"].get(type(e).__name__, 0) + 1
        return
    record["ok"] += 1
    record["tokens"] += tokens
    if first is not None:
        record["ttft"].append(first - start)
    record["itl"].extend(gaps)


def request_lengths(requests: int, max_tokens: int, spread: float, seed: int = 0) -> list[int]:
    """max_tokens of each request: all equal, or with `spread` s > 0 drawn uniformly from
    [max_tokens * (1 - s), max_tokens * (1 + s)] (seeded, so runs compare)."""
    if spread <= 0:
        return [max_tokens] * requests
    if spread >= 1:
        raise ValueError(f"--max-tokens-spread must be below 1, got {spread}")
    rng = random.Random(seed)
    low, high = max(1, round(max_tokens * (1 - spread))), round(max_tokens * (1 + spread))
    return [rng.randint(low, high) for _ in range(requests)]


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int, image: str,
                    time_limit: float, spread: float = 0.0, image_size: int = 0) -> dict:
    """image_size > 0: each request gets an image of its own of that size (so none is in the server's image
    cache); 0: every request sends `image`."""
    record = {"concurrency": concurrency, "ok": 0, "tokens": 0, "ttft": [], "itl": [], "errors": {}}
    body = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "Describe this image."}]}]}
    # once: re-encoding a multi-megabyte image per request would load the client; model and max_tokens go first
    rest = json.dumps(body).encode()[1:]
    head = b'{"model": ' + json.dumps(model).encode() + b', "max_tokens": '
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    # (seeded by the level, so that two levels never send the same images either)
    own = distinct_images(requests, image_size, seed=concurrency * 100_003 + max_tokens) if image_size else None
    for k, n in enumerate(request_lengths(requests, max_tokens, spread)):
        part = rest if own is None else rest.replace(image.encode(), own[k].encode(), 1)
        queue.put_nowait(head + str(n).encode() + b", " + part)
    start = time.perf_counter()
    deadline = start + time_limit

    async def worker(client):
        while time.perf_counter() < deadline:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await _one(client, body, record)

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=max(60.0, time_limit), limits=limits) as client:
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))),
                                   timeout=time_limit + 30)
        except asyncio.TimeoutError:
            record["errors"]["time_limit"] = record["errors"].get("time_limit", 0) + 1
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests_ok": record["ok"], "errors": record["errors"],
            "seconds": elapsed, "requests_per_s": record["ok"] / elapsed, "output_tokens_per_s": record["tokens"] / elapsed,
            "ttft_p50_s": _percentile(record["ttft"], 50), "ttft_p99_s": _percentile(record["ttft"], 99),
            "itl_p50_s": _percentile(record["itl"], 50), "itl_p99_s": _percentile(record["itl"], 99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("concurrency", nargs="*", type=int, default=[1, 8, 32, 64, 128])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id (default: the first of /v1/models)")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-tokens-spread", type=float, default=0.0,
                        help="0: every request asks for --max-tokens; s in (0, 1): each asks for a length drawn "
                             "uniformly from max_tokens * [1 - s, 1 + s] (closed-loop clients asking for equal "
                             "lengths end together and come back together; unequal ones drift apart)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--same-image", action="store_true",
                        help="every request sends the same image (the server's image cache then answers all but "
                             "the first); default: each request has an image of its own")
    parser.add_argument("--json", default="load_server.json", help="where to write the results")
    args = parser.parse_args(argv)
    _check_loopback(args.url)
    model = args.model or httpx.get(args.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    image = _image_url(args.image_size)
    results = []
    print(f"{'conc':>5} {'ok':>5} {'req/s':>8} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>9} "
          f"{'itl p99':>9}  errors")
    fmt = lambda v: f"{v * 1000:8.1f}ms" if v is not None else f"{'-':>10}"  # noqa: E731
    for level in args.concurrency:
        r = asyncio.run(run_level(args.url, model, level, args.requests, args.max_tokens, image, args.time_limit,
                                  args.max_tokens_spread, 0 if args.same_image else args.image_size))
        results.append(r)
        print(f"{level:>5} {r['requests_ok']:>5} {r['requests_per_s']:8.2f} {r['output_tokens_per_s']:9.1f}"
              f"{fmt(r['ttft_p50_s'])}{fmt(r['ttft_p99_s'])}{fmt(r['itl_p50_s'])}{fmt(r['itl_p99_s'])}  "
              f"{r['errors'] or ''}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"url": args.url, "model": model, "max_tokens": args.max_tokens, "same_image": args.same_image,
                   "max_tokens_spread": args.max_tokens_spread, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
