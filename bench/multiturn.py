"""Multi-turn chat load for `mllama serve`: conversations of several turns, each turn re-sending the whole
conversation with its image, as chat clients do. Prints the time to first token of each turn (p50/p99).

    python bench/multiturn.py --url http://127.0.0.1:8000 --conversations 16 --concurrency 1 --json out.json

Each conversation has an image of its own (so the first turn always encodes it); a turn starts when the previous
one's answer is complete. With --concurrency C, C conversations run at once, the k-th starting k * --stagger
seconds after the first. Loopback servers only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from load_server import _check_loopback, _percentile, distinct_images, httpx

QUESTIONS = ["Describe this image.", "What colours are in it?", "Is there any text in it?", "Summarise it again."]


async def _turn(client, model: str, messages: list, max_tokens: int) -> tuple[float | None, str]:
    # The body is encoded before the clock starts, as load_server.py does. With httpx encoding it (json=), the
    # client's TTFT was ~90 ms above the server's own on the H200 machine, where this client's share is not
    # what is measured.
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    start, first, text = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"}) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                text.append(delta)
    return (None if first is None else first - start), "".join(text)


# the server's latency sums (seconds) read around each turn when conversations run one at a time
_SUMS = {"decode": "mllama_request_decode_seconds_sum", "server_ttft": "mllama_server_time_to_first_token_seconds_sum",
         "engine_ttft": "mllama_time_to_first_token_seconds_sum"}


async def _sums(client) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(values.get(metric, "nan")) for name, metric in _SUMS.items()}


async def conversation(client, model: str, image: str, turns: int, max_tokens: int, delay: float,
                       ttft: list[list[float]], parts: list[list[dict]] | None = None) -> None:
    """`parts` (one conversation at a time only): each turn's server-side split of its first token."""
    await asyncio.sleep(delay)
    messages: list = []
    for turn in range(turns):
        content = [{"type": "text", "text": QUESTIONS[turn % len(QUESTIONS)]}]
        if turn == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image}})
        messages.append({"role": "user", "content": content})
        before = await _sums(client) if parts is not None else None
        first, answer = await _turn(client, model, messages, max_tokens)
        if first is not None:
            ttft[turn].append(first)
        if parts is not None:
            after = await _sums(client)
            parts[turn].append({name: after[name] - before[name] for name in _SUMS} | {"client_ttft": first})
        messages.append({"role": "assistant", "content": answer})


async def run(url: str, model: str | None, conversations: int, concurrency: int, turns: int, max_tokens: int,
              image_size: int, stagger: float, seed: int = 0) -> dict:
    images = distinct_images(conversations, image_size, seed=1_000_003 * concurrency + turns + 7919 * seed)
    ttft: list[list[float]] = [[] for _ in range(turns)]
    parts: list[list[dict]] | None = [[] for _ in range(turns)] if concurrency == 1 else None
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        pending = list(enumerate(images))

        async def worker(slot: int):
            first = True
            while pending:
                _, image = pending.pop(0)
                await conversation(client, model, image, turns, max_tokens, slot * stagger if first else 0.0, ttft,
                                   parts)
                first = False

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        seconds = time.perf_counter() - start
    turn_p50 = [_percentile(t, 50) for t in ttft]
    later = [x for t in ttft[1:] for x in t]
    return {"conversations": conversations, "concurrency": concurrency, "turns": turns, "max_tokens": max_tokens,
            "image_size": image_size, "stagger_s": stagger, "seconds": seconds,
            "ttft_p50_s_by_turn": turn_p50, "ttft_p99_s_by_turn": [_percentile(t, 99) for t in ttft],
            "later_turns_p50_over_first": (_percentile(later, 50) / turn_p50[0]) if later and turn_p50[0] else None,
            # p50 by turn of: arrival to decoded inputs, arrival to first token (server), the engine's share
            "server_p50_s_by_turn": None if parts is None else [
                {name: _percentile([p[name] for p in turn if p[name] is not None], 50) for name in turn[0]}
                for turn in parts if turn]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id (default: the first of /v1/models)")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=1120, help="square image side in pixels (1120: 4 tiles)")
    parser.add_argument("--stagger", type=float, default=0.25, help="seconds between conversation starts")
    parser.add_argument("--seed", type=int, default=0, help="another seed: other images than an earlier run's")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    _check_loopback(args.url)
    result = asyncio.run(run(args.url, args.model, args.conversations, args.concurrency, args.turns,
                             args.max_tokens, args.image_size, args.stagger, args.seed))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
