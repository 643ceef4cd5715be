"""`mllama serve` end to end: a real uvicorn server in a subprocess on 127.0.0.1, the tiny checkpoint on CPU,
talked to with the official openai client and raw HTTP. Every generated output is compared with
`model.generate` run alone on the same prompt."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import numpy as np
import openai
import PIL.Image
import pytest
import torch

from waiting import GUARD, wait_until

MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[1]
ENGINE_LINE = re.compile(r"mllama serve: .*engine process (\d+)")


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    """`count` different ports that were free (all bound at once, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class Server:
    def __init__(self, checkpoint, *extra: str, env: dict | None = None, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mllama.server", str(checkpoint), "--port", str(self.port), "--device", "cpu",
               "--served-model-name", MODEL, "--max-model-len", "512", *extra]
        environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        # The output is read as it comes, on a thread: a pipe nobody reads fills up and blocks the server.
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        try:
            wait_until(self._healthy, "the server to answer /health with 200", poll=0.2, state=self._tail)
            # the start-up line, printed before the server listens, names the engine's process
            match = wait_until(self._engine_line, "the start-up line naming the engine process", state=self._tail)
        except BaseException:
            self.stop()
            raise
        self.engine_pid = int(match.group(1))

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def _tail(self) -> str:
        return "".join(self.output[-20:])

    def _engine_line(self) -> re.Match | None:
        return next((m for m in map(ENGINE_LINE.search, list(self.output)) if m), None)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            self._reader.join(GUARD)  # the rest of what it printed
            raise RuntimeError(f"server exited ({self.proc.returncode}): {''.join(self.output)}")
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """Every sample of one /metrics scrape: name (with its labels) -> value."""
        # the server waits up to 5 s for the engine's counters, so the client waits longer than that
        text = httpx.get(self.url + "/metrics", timeout=60).text
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}

    def metric(self, name: str) -> float:
        samples = self.metrics()
        assert name in samples, f"{name} not in /metrics"
        return samples[name]

    def processes(self) -> list[int]:
        """The server and every process under it (the engine, the input workers)."""
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree = [self.proc.pid]
        for pid in tree:
            tree += [child for child, parent in parents.items() if parent == pid]
        return tree

    def rss_kb(self) -> int:
        total = 0
        for pid in self.processes():
            try:
                total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
            except (OSError, AttributeError):
                pass
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=GUARD)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_servers(checkpoint, *flags: tuple[str, ...]) -> list[Server]:
    """A Server for each tuple of flags, all started together (a start-up is mostly interpreters starting and a
    model loading, one core each); they run side by side on ports of their own. If one fails to start, those that
    did are stopped and its error is raised."""
    ports = _free_ports(len(flags))
    with ThreadPoolExecutor(max_workers=len(flags)) as pool:
        starting = [pool.submit(Server, checkpoint, *extra, port=port) for extra, port in zip(flags, ports)]
    started, failure = [], None
    for future in starting:
        try:
            started.append(future.result())
        except BaseException as error:
            failure = failure or error
    if failure is not None:
        for s in started:
            s.stop()
        raise failure
    return started


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint, "--max-batch", "8", "--max-queue", "64")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    return model, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _image(seed: int, size=(48, 36)) -> tuple[str, PIL.Image.Image]:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), PIL.Image.open(buf)


def _messages(text: str, image_seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """The OpenAI messages and the same conversation for processor.apply_chat_template."""
    if not image_seeds:
        return [{"role": "user", "content": text}], [{"role": "user", "content": text}]
    api, ref = [], []
    for seed in image_seeds:
        url, image = _image(seed)
        api.append({"type": "image_url", "image_url": {"url": url}})
        ref.append({"type": "image", "image": image})
    api.append({"type": "text", "text": text})
    ref.append({"type": "text", "text": text})
    return [{"role": "user", "content": api}], [{"role": "user", "content": ref}]


def _generate(reference, ref_messages, max_tokens, **kwargs) -> tuple[str, int, int]:
    model, processor = reference
    inputs = processor.apply_chat_template(ref_messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, **kwargs)[0, prompt_len:].tolist()
    eos = {128001, 128008, 128009}
    stop = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
    out = out[:stop]
    return processor.tokenizer.decode(out, skip_special_tokens=True), len(out), prompt_len


def _client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kw)


def _assert_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


# ---------------------------------------------------------------------------------------------------------------


def test_models_and_health(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_with_image_matches_generate(server, reference):
    api, ref = _messages("What is in this picture?", [1])
    expected, n_out, n_prompt = _generate(reference, ref, 12, do_sample=False)
    r = _client(server).chat.completions.create(model=MODEL, messages=api, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (n_prompt, n_out, n_prompt + n_out)


def test_a_conversation_resending_its_image_is_decoded_once(server, reference):
    """Turn 2 re-sends turn 1's image (as chat clients do): the server holds its tiles and sends the input worker a
    ref instead; its answer is still generate's. A user who pastes that image's data URL as text has it read as
    text (here too long for the context: the 400 says so, where a ref left in the text would be a 500)."""
    hits, misses = server.metric("mllama_decoded_image_hits_total"), server.metric("mllama_decoded_image_misses_total")
    api, ref = _messages("What is in this picture?", [71])  # an image no other test sends
    client = _client(server)
    first = client.chat.completions.create(model=MODEL, messages=api, max_tokens=6, temperature=0)
    for turn in (api, ref):
        turn += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And what else?"}]
    second = client.chat.completions.create(model=MODEL, messages=api, max_tokens=6, temperature=0)
    assert second.choices[0].message.content == _generate(reference, ref, 6, do_sample=False)[0]
    assert server.metric("mllama_decoded_image_misses_total") == misses + 1
    assert server.metric("mllama_decoded_image_hits_total") == hits + 1
    pasted = [{"role": "user", "content": "Is this an image? " + api[0]["content"][0]["image_url"]["url"]}]
    third = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": pasted}, timeout=60)
    assert _assert_error(third, 400, "messages")["code"] == "context_length_exceeded"


def test_streaming_chat_with_usage(server, reference):
    api, ref = _messages("Describe it.", [2])
    expected, n_out, n_prompt = _generate(reference, ref, 10, do_sample=False)
    chunks = list(_client(server).chat.completions.create(model=MODEL, messages=api, max_tokens=10, temperature=0,
                                                          stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_out
    assert chunks[-1].usage.prompt_tokens == n_prompt
    # Raw SSE framing: data lines, blank-line separated, ending with [DONE].
    body = {"model": MODEL, "messages": api, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_logprobs(server):
    r = _client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    c = _client(server).completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3 and "".join(c.choices[0].logprobs.tokens) == c.choices[0].text


def test_completions_with_image(server, reference):
    model, processor = reference
    url, image = _image(5)
    prompt = "<|image|>If I had to write a haiku for this one"
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    r = _client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                           extra_body={"images": [url]})
    assert r.choices[0].text == processor.tokenizer.decode(out.tolist(), skip_special_tokens=True)
    assert r.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_stop_sequences(server):
    client = _client(server)
    messages = [{"role": "user", "content": "Count for me"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[6:9]
    assert len(stop) == 3 and stop.strip()
    expected = text[:text.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible_and_equal_to_generate(server, reference):
    api, ref = _messages("Tell me a story", [])
    client = _client(server)
    runs = [client.chat.completions.create(model=MODEL, messages=api, max_tokens=10, temperature=0.9, top_p=0.95,
                                           seed=1234).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]
    expected, _, _ = _generate(reference, ref, 10, do_sample=True, temperature=0.9, top_p=0.95, seed=1234)
    assert runs[0] == expected
    other = client.chat.completions.create(model=MODEL, messages=api, max_tokens=10, temperature=0.9, top_p=0.95,
                                           seed=99).choices[0].message.content
    assert other != runs[0]


def test_32_concurrent_mixed_requests_equal_generate(server, reference):
    cases = []
    for i in range(32):
        seeds = [] if i % 3 == 0 else ([10 + i] if i % 3 == 1 else [10 + i, 50 + i])
        cases.append((f"Request {i}: say something about item {i * 7}", seeds, 4 + (i * 5) % 17))

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        calls = [client.chat.completions.create(model=MODEL, messages=_messages(t, s)[0], max_tokens=n,
                                                temperature=0) for t, s, n in cases]
        try:
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    timed = ("mllama_request_decode_seconds_count", "mllama_server_time_to_first_token_seconds_count",
             "mllama_time_to_first_token_seconds_count")
    start_counts = [server.metric(name) for name in timed]
    results = asyncio.run(run_all())
    # every request's latency is on record, on the HTTP side and in the engine
    assert [server.metric(name) - start for name, start in zip(timed, start_counts)] == [32, 32, 32]
    for (text, seeds, n), r in zip(cases, results):
        expected, n_out, n_prompt = _generate(reference, _messages(text, seeds)[1], n, do_sample=False)
        assert r.choices[0].message.content == expected, (text, seeds)
        assert (r.usage.completion_tokens, r.usage.prompt_tokens) == (n_out, n_prompt)
    # How many steps were shared and how many prefills overlapped depends on how fast the requests arrive: the
    # engine-level test_requests_arriving_while_others_decode_are_batched_and_overlapped fixes that order.


def test_disconnect_mid_stream_frees_slot(server):
    cancelled = server.metric('mllama_requests_total{outcome="cancelled"}')
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 450,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert got[0].startswith("data: ")
        assert server.metric("mllama_running_requests") == 1
    def counts():
        m = server.metrics()
        return m["mllama_running_requests"], m['mllama_requests_total{outcome="cancelled"}'] - cancelled

    wait_until(lambda: counts() == (0, 1), "the request to be cancelled and leave its slot (running, cancelled)",
               state=counts)
    assert server.metric("mllama_cache_bytes_in_use") == 0


def test_literal_image_token_in_user_text_is_text(server, reference):
    from mllama.server.prompts import ImageOptions, chat_inputs

    _, processor = reference
    url, _ = _image(3)
    tricky = "Here is <|image|> and <|image|><|eot_id|> typed by hand"
    for images in (0, 1, 2):
        content = [{"type": "image_url", "image_url": {"url": url}}] * images + [{"type": "text", "text": tricky}]
        ids, parts = chat_inputs(processor, [{"role": "user", "content": content}], ImageOptions())
        assert ids.count(processor.image_token_id) == images
        plain_content = content[:-1] + [{"type": "text", "text": "plain"}]
        plain, _ = chat_inputs(processor, [{"role": "user", "content": plain_content}], ImageOptions())
        eot = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        assert ids.count(eot) == plain.count(eot)  # only the template's own turn ends
        assert processor.tokenizer.decode(ids).count(tricky) == 1
        assert len(parts) == images and all(part.pixels.shape[1] == 1 for part in parts)
    # Ordinary text gives exactly the ids of apply_chat_template.
    for text in ("Hello", "\n\n  spaced\n", "émoji 🙂 and 数字 123"):
        api, ref = _messages(text, [])
        ids, _ = chat_inputs(processor, api, ImageOptions())
        expected = processor.apply_chat_template(ref, add_generation_prompt=True, tokenize=True, return_tensors="pt")
        assert ids == expected[0].tolist()
    # Through the server: a literal <|image|> with no image is a text-only request, not an error.
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": tricky}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_bad_inputs_are_4xx_while_a_good_request_succeeds(server):
    good_result = {}

    def good():
        good_result["r"] = _client(server).chat.completions.create(
            model=MODEL, messages=_messages("A good request", [7])[0], max_tokens=40, temperature=0)

    worker = threading.Thread(target=good)
    worker.start()
    url, _ = _image(4)
    post = lambda body, **kw: httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30, **kw)  # noqa
    user = lambda content: {"model": MODEL, "messages": [{"role": "user", "content": content}]}  # noqa
    bad_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png").decode()
    _assert_error(post(user([{"type": "image_url", "image_url": {"url": bad_png}}])), 400,
                  "messages[0].content[0].image_url.url")
    _assert_error(post(user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}])), 400)
    _assert_error(post(user([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}])), 400)
    _assert_error(post(user([{"type": "image_url", "image_url": {"url": url}}] * 5)), 400, "messages")
    err = _assert_error(post({"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]}),
        400, "messages")
    assert "incompatible with system messages" in err["message"]
    err = _assert_error(post({**user("word " * 600), "max_tokens": 10}), 400)
    assert err["code"] == "context_length_exceeded"
    _assert_error(post({**user("hi"), "max_tokens": 600}), 400)
    _assert_error(post({**user("hi"), "model": "gpt-4"}), 404, "model")
    _assert_error(httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                             headers={"content-type": "application/json"}), 400)
    _assert_error(post({**user("hi"), "max_tokens": "ten"}), 400, "max_tokens")
    _assert_error(post({**user("hi"), "temperature": "hot"}), 400, "temperature")
    _assert_error(post({**user("hi"), "temperature": 5}), 400, "temperature")
    _assert_error(post({**user("hi"), "stream": "yes"}), 400, "stream")
    _assert_error(post({**user("hi"), "stop": 5}), 400, "stop")
    _assert_error(post({**user("hi"), "seed": 1.5}), 400, "seed")
    _assert_error(post({**user("hi"), "n": 0}), 400, "n")
    _assert_error(post({**user("hi"), "n": 129}), 400, "n")
    _assert_error(post({"model": MODEL, "messages": "hello"}), 400, "messages")
    _assert_error(post({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role")
    _assert_error(post(user([{"type": "audio", "data": "x"}])), 400, "messages[0].content[0].type")
    _assert_error(post(user(5)), 400, "messages[0].content")
    big = "data:image/png;base64," + "A" * (28 * 1024 * 1024)
    _assert_error(post(user([{"type": "image_url", "image_url": {"url": big}}])), 413)
    c = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "<|image|>hi"}, timeout=30)
    _assert_error(c, 400, "images")
    worker.join(GUARD)
    assert not worker.is_alive(), "the good request never came back"
    assert good_result["r"].choices[0].finish_reason == "length"
    assert good_result["r"].usage.completion_tokens == 40


def test_soak_500_requests_concurrency_16(server):
    url, _ = _image(8)

    async def run(count):
        sem = asyncio.Semaphore(16)
        statuses = []
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def one(i):
                content = "Soak" if i % 2 else [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": f"Soak {i}"}]
                body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
                        "temperature": 0, "stream": i % 4 == 0}
                async with sem:
                    r = await client.post("/v1/chat/completions", json=body)
                    statuses.append(r.status_code)
                    if r.status_code == 200 and not body["stream"]:
                        assert r.json()["usage"]["completion_tokens"] == 6
                    if body["stream"]:
                        assert r.text.rstrip().endswith("data: [DONE]")
            # a hang guard, not a speed check: every request must come back
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout=600)
        return statuses

    asyncio.run(run(100))  # warm-up: allocator pools and caches reach their steady size
    rss_before = server.rss_kb()
    statuses = asyncio.run(run(500))
    assert len(statuses) == 500 and statuses.count(200) == 500, sorted(set(statuses))
    assert server.metric("mllama_running_requests") == 0 and server.metric("mllama_queue_depth") == 0
    assert server.rss_kb() < rss_before * 1.15 + 20_000


def test_queue_full_429_api_key_and_sigterm(tiny_checkpoint):
    # One slot, one queue place. The first request is long (2,000 tokens, seconds of decoding: --max-model-len
    # 4096 overrides the class's 512) so that it is still decoding while the queue fills, the next three are
    # refused and SIGTERM comes, which all take a fraction of a second. --shutdown-timeout only guards against a
    # hang here: what is tested is that both requests in flight finish before the process exits.
    s = Server(tiny_checkpoint, "--max-batch", "1", "--max-queue", "1", "--max-model-len", "4096",
               "--shutdown-timeout", "120", env={"MLLAMA_API_KEY": "sekret"})
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 400,
                "temperature": 0}
        _assert_error(httpx.post(s.url + "/v1/chat/completions", json=body, timeout=10), 401)
        _assert_error(httpx.post(s.url + "/v1/chat/completions", json=body, timeout=10,
                                 headers={"Authorization": "Bearer wrong"}), 401)
        auth = {"Authorization": "Bearer sekret"}
        results = {}

        def fire(max_tokens):
            results[max_tokens] = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": max_tokens},
                                             headers=auth, timeout=GUARD)

        def engine_state():  # (running, waiting) from one scrape
            m = s.metrics()
            return m["mllama_running_requests"], m["mllama_queue_depth"]

        threads = [threading.Thread(target=fire, args=(n,)) for n in (2000, 400)]
        threads[0].start()
        wait_until(lambda: engine_state() == (1, 0), "the first request to take the slot (running, waiting)",
                   state=engine_state)
        threads[1].start()
        wait_until(lambda: engine_state() == (1, 1), "the second request to wait for the slot (running, waiting)",
                   state=engine_state)
        for _ in range(3):  # slot and queue taken: refused
            r = httpx.post(s.url + "/v1/chat/completions", json=body, headers=auth, timeout=GUARD)
            error = _assert_error(r, 429)
            assert error["type"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
        # SIGTERM with two requests in flight: they finish within the deadline, then the process exits 0 and
        # leaves no process behind (engine, input workers).
        children = s.processes()[1:]
        assert s.engine_pid in children
        assert engine_state() == (1, 1) and not results
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=GUARD)
        assert s.proc.returncode == 0
        wait_until(lambda: not any(_alive(pid) for pid in children), "the server's child processes to exit",
                   state=lambda: [pid for pid in children if _alive(pid)])
        for t in threads:
            t.join(GUARD)
            assert not t.is_alive(), "a request in flight at SIGTERM never came back"
        assert {n: r.status_code for n, r in results.items()} == {2000: 200, 400: 200}
        answers = {n: (r.json()["choices"][0]["finish_reason"], r.json()["usage"]["completion_tokens"])
                   for n, r in results.items()}
        assert all(tokens == n for n, (_, tokens) in answers.items()), answers
    finally:
        s.stop()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_engine_process_crash_fails_requests_and_health(tiny_checkpoint):
    """The engine runs in its own process; if it dies, requests in flight end with an error instead of hanging,
    /health says 503, new requests get 503, and the HTTP process keeps answering."""
    # a request far longer than the test needs (--max-model-len 4096 overrides the class's 512): still decoding
    # when the engine is killed
    s = Server(tiny_checkpoint, "--max-batch", "2", "--max-model-len", "4096")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert any(line.startswith("data: ") and '"content"' in line and '"role"' not in line
                       for line in lines)  # tokens are flowing
            os.kill(s.engine_pid, signal.SIGKILL)
            rest = list(lines)
        errors = [json.loads(line[6:]) for line in rest if line.startswith("data: {") and '"error"' in line]
        assert errors and "engine process ended" in errors[0]["error"]["message"]
        assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""]
        health = httpx.get(s.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=10)
        assert _assert_error(r, 503)["type"] == "server_error"
    finally:
        assert s.stop() == 0


def test_remote_images_limits(tiny_checkpoint, reference, tmp_path):
    """http(s) image URLs: fetched with --allow-remote-images; loopback refused unless explicitly allowed; size cap."""
    import functools
    import http.server
    import threading

    _, image = _image(5)
    image.save(tmp_path / "img.png")
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"0" * 300_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"

    def ask(srv, url):
        body = {"model": MODEL, "max_tokens": 5, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": "What is it?"}]}]}
        return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)

    strict, open_ = start_servers(tiny_checkpoint, ("--allow-remote-images", "--max-image-bytes", "200000"),
                                  ("--allow-remote-images", "--allow-private-image-hosts", "--max-image-bytes",
                                   "200000"))
    try:
        try:
            refused = ask(strict, f"{base}/img.png")
            assert refused.status_code == 400 and "non-public address" in refused.json()["error"]["message"]
        finally:
            assert strict.stop() == 0
        ok = ask(open_, f"{base}/img.png")
        assert ok.status_code == 200, ok.text
        ref = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
        text, _, _ = _generate(reference, ref, 5, do_sample=False)
        assert ok.json()["choices"][0]["message"]["content"] == text
        big = ask(open_, f"{base}/big.png")
        assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]
        missing = ask(open_, f"{base}/none.png")
        assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
    finally:
        assert open_.stop() == 0
        files.shutdown()
