"""Hostile and careless request bodies, checked in-process: every client error is a 4xx in OpenAI's shape naming
the field, limits hold however the bytes arrive, and the expensive work never starts for what cannot fit."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx2 as httpx
import pytest

from mllama.processing.processor import AutoProcessor
from mllama.server.app import MAX_JSON_DEPTH, ServerOptions, create_app, decode_request
from mllama.server.prompts import ImageOptions, RequestError, encode_marked, longest_token

MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"  # an org/name id: routes must take the slash


class FakeEngine:
    """The engine interface create_app needs; no request reaches it in these tests unless it is good."""

    max_model_len, max_batch, max_queue, dtype, failed, accepting = 512, 2, 2, "float32", None, True
    defaults: dict = {}
    eos = (128009,)

    def __init__(self):
        self.submitted = []

    def check_length(self, prompt_len, max_tokens):
        from mllama.engine.requests import check_length

        check_length(prompt_len, max_tokens, self.max_model_len)

    def submit(self, **fields):
        from mllama.engine.requests import Event

        self.submitted.append(fields)
        fields["emit"](Event(text="ok", token_ids=[1], finish_reason="stop", prompt_tokens=3, completion_tokens=1))

        class Job:
            logprobs = None

            def cancel(self):
                pass
        return Job()

    def submit_many(self, requests):
        return [self.submit(**fields) for fields in requests]

    async def stats(self):
        return {}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def app(processor):
    return create_app(processor, FakeEngine(), ServerOptions(model_name=MODEL, max_body_bytes=100_000))


def _raw(app, method: str, path: str, content=None, headers=None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, content=content, headers=headers or {})
    return asyncio.run(go())


def _post(app, path: str, content, headers=None) -> httpx.Response:
    return _raw(app, "POST", path, content, headers)


def _get(app, path: str, method: str = "GET") -> httpx.Response:
    return _raw(app, method, path)


def _error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "any":
        assert error["param"] == param, error
    return error


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **fields}


def test_a_good_body_reaches_the_engine(app):
    r = _post(app, "/v1/chat/completions", json.dumps(_chat()))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("body, param", [
    ('{"model": "m", "messages": ' + "[" * 20_000 + "]" * 20_000 + "}", None),  # RecursionError in the parser
    (json.dumps(_chat(metadata=[])).replace("[]", "[" * (MAX_JSON_DEPTH + 5) + "]" * (MAX_JSON_DEPTH + 5)), "any"),
    (json.dumps(_chat(messages=[{"role": "user", "content": "a \ud800 b"}])), "messages[0].content"),
    (json.dumps(_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}])),
     "messages[0].content[0].text"),
    (json.dumps(_chat(stop=["x\ud83d"])), "stop[0]"),
    (json.dumps(_chat(seed=2 ** 64)), "seed"),
    (json.dumps(_chat(seed=-2 ** 63 - 1)), "seed"),
    (json.dumps(_chat(temperature=1e-300)), "temperature"),
    (json.dumps(_chat(stop="s" * 5000)), "stop"),
])
def test_client_errors_are_400s_naming_the_field(app, body, param):
    _error(_post(app, "/v1/chat/completions", body), 400, param)


def test_extreme_accepted_values_reach_the_engine(app):
    engine = app.state.engine
    before = len(engine.submitted)
    for fields in (dict(seed=2 ** 64 - 1), dict(seed=-2 ** 63), dict(temperature=2e-39)):
        r = _post(app, "/v1/chat/completions", json.dumps(_chat(**fields)))
        assert r.status_code == 200, (fields, r.text)
    assert len(engine.submitted) == before + 3
    assert not engine.submitted[-1]["params"].do_sample  # 2e-39 decodes greedily


def test_too_many_json_values_refused_before_parsing(app, processor):
    raw = json.dumps(_chat(junk=[{}] * 600_000)).encode()
    with pytest.raises(RequestError) as e:
        decode_request(processor, raw, True, MODEL, ImageOptions(), None, 512)
    assert e.value.status == 413


def test_chunked_body_counted_as_it_arrives(app):
    """No Content-Length: the body limit (100,000 bytes here) is met while reading, and the rest is never read."""
    sent = []

    async def chunks():
        for _ in range(1000):  # 1,000 x 1,000 bytes, ten times the limit
            sent.append(1)
            yield b" " * 1000

    r = _post(app, "/v1/chat/completions", chunks())
    assert _error(r, 413)["code"] == "request_too_large"
    assert len(sent) < 200


def test_unknown_routes_and_methods_answer_in_openai_shape(app):
    assert _error(_get(app, "/v1/nothing"), 404)["code"] == "not_found"
    assert _error(_get(app, "/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_models_route_takes_an_org_slash_name_id(app):
    card = _get(app, f"/v1/models/{MODEL}")
    assert card.status_code == 200 and card.json()["id"] == MODEL
    _error(_get(app, "/v1/models/other"), 404, "model")
    assert [m["id"] for m in _get(app, "/v1/models").json()["data"]] == [MODEL]


class _Counting:
    """A tokenizer whose backend's encodes are counted."""

    def __init__(self, tokenizer):
        self.inner, self.encoded = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kw):
        self.encoded.append(len(text))
        return self.inner(text, **kw)


def test_overlong_prompts_refused_before_they_are_rendered_or_tokenized(processor, monkeypatch):
    from mllama.server import prompts

    rendered = []
    real_render = prompts.render_chat
    monkeypatch.setattr(prompts, "render_chat", lambda p, m, *rest: rendered.append(1) or real_render(p, m, *rest))
    text = "word " * (512 * longest_token(processor.tokenizer) // 5 + 10)  # over 512 tokens' worth at any rate
    for chat, body in ((True, _chat(messages=[{"role": "user", "content": text}])),
                       (False, {"model": MODEL, "prompt": text, "max_tokens": 1})):
        counting = _Counting(processor.tokenizer)
        monkeypatch.setattr(processor, "tokenizer", counting)
        with pytest.raises(RequestError) as e:
            decode_request(processor, json.dumps(body).encode(), chat, MODEL, ImageOptions(), None, 512)
        monkeypatch.setattr(processor, "tokenizer", counting.inner)
        assert e.value.code == "context_length_exceeded" and e.value.param == ("messages" if chat else "prompt")
        assert counting.encoded == []
    assert rendered == []
    # a prompt under the bound still goes through (its real length is checked on its ids later)
    _, ids, _ = decode_request(processor, json.dumps(_chat()).encode(), True, MODEL, ImageOptions(), None, 512)
    assert ids


class _Recording:
    """A backend tokenizer that forwards everything and records every attribute set on it."""

    def __init__(self, backend):
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "sets", [])

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __setattr__(self, name, value):
        self.sets.append(name)
        setattr(self.backend, name, value)


def test_user_text_encoding_changes_no_shared_tokenizer_state(processor, monkeypatch):
    """User text is encoded with special-token strings as text; switching that on the shared tokenizer made
    concurrent /v1/completions requests lose their <|image|> tokens (31 of 40 refused)."""
    recording = _Recording(processor.tokenizer.backend_tokenizer)
    monkeypatch.setattr(type(processor.tokenizer), "backend_tokenizer", property(lambda self: recording),
                        raising=False)
    ids = encode_marked(processor.tokenizer, "<|begin_of_text|>\ue0000\ue001", ["say <|image|> here"])
    assert recording.sets == []
    assert processor.image_token_id not in ids  # typed text stays text


def test_concurrent_chat_and_image_completions_all_accepted(processor):
    import base64
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    completion = json.dumps({"model": MODEL, "prompt": "<|image|>What is it?", "images": [url]}).encode()
    chat = json.dumps(_chat(messages=[{"role": "user", "content": "typed <|image|> " * 3000}])).encode()
    errors, barrier = [], threading.Barrier(8)

    def work(raw, is_chat):
        barrier.wait()
        for _ in range(10):
            try:
                decode_request(processor, raw, is_chat, MODEL, ImageOptions(), None, 4096)
            except RequestError as e:
                errors.append(e.message)

    threads = [threading.Thread(target=work, args=(completion, False) if i % 2 else (chat, True)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_body_that_never_ends_is_cut_at_the_body_deadline(processor):
    app = create_app(processor, FakeEngine(), ServerOptions(model_name=MODEL, body_timeout=0.5))

    async def trickle():
        yield b'{"model": '
        await asyncio.Event().wait()  # the rest never comes

    assert _error(_post(app, "/v1/chat/completions", trickle()), 408)["code"] == "request_timeout"


@pytest.mark.parametrize("body, param", [
    ('{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "\\ud800": 1}' % MODEL, "\\ud800"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "Hi", "\\udfff": 1}]}' % MODEL,
     "messages[0].\\udfff"),
    (json.dumps(_chat(top_p=0)), "top_p"),
    (json.dumps(_chat(messages=[{"role": "user", "content": "word " * 1000}])), "messages"),
])
def test_more_client_errors_name_their_field(app, body, param):
    """A lone surrogate in a key used to escape as a 500 (the error named the key, which JSON could not encode);
    top_p 0 and a prompt too long for any max_tokens named no field or the wrong one."""
    _error(_post(app, "/v1/chat/completions", body), 400, param)


def test_accepted_forms_of_careless_fields(app, processor):
    for fields in (dict(stop=[]), dict(stream=True, stream_options={"include_usage": None})):
        r = _post(app, "/v1/chat/completions", json.dumps(_chat(**fields)))
        assert r.status_code == 200, (fields, r.text)
    # an empty system message beside an image is no system message (the template allows images then)
    import base64
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    for system in ("", "  "):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]
        r = _post(app, "/v1/chat/completions", json.dumps(_chat(messages=messages)))
        assert r.status_code == 200, r.text


def test_head_health_checks_no_slash_redirects_and_a_bearer_scheme_in_any_case(processor):
    app = create_app(processor, FakeEngine(), ServerOptions(model_name=MODEL, api_key="k"))
    assert _raw(app, "HEAD", "/health").status_code == 200
    r = _raw(app, "POST", "/v1/chat/completions/", json.dumps(_chat()), {"authorization": "Bearer k",
                                                                           "host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers  # no redirect to the client's Host header
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = _raw(app, "POST", "/v1/chat/completions", json.dumps(_chat()), {"authorization": f"{scheme} k"})
        assert r.status_code == 200, scheme
    _error(_raw(app, "POST", "/v1/chat/completions", json.dumps(_chat()), {"authorization": "Bearer x"}), 401)


def test_answers_before_the_body_is_read_close_the_connection(app):
    """A 413 or 408 leaves the body unread; the connection is closed, not left open in the body state where no
    idle timer reaches it (100 such connections took /health down at --max-connections 16)."""
    r = _raw(app, "POST", "/v1/chat/completions", b"x" * 10, {"content-length": str(10 ** 9)})
    assert r.status_code == 413 and r.headers["connection"] == "close"

    async def chunks():
        for _ in range(1000):
            yield b" " * 1000
    r = _post(app, "/v1/chat/completions", chunks())
    assert r.status_code == 413 and r.headers["connection"] == "close"


def test_a_client_gone_while_its_body_is_read_is_no_500(app):
    sent = []

    async def go():
        messages = iter([{"type": "http.request", "body": b'{"model"', "more_body": True},
                         {"type": "http.disconnect"}])

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        await app(scope, receive, send)
    asyncio.run(go())
    assert not [m for m in sent if m["type"] == "http.response.start" and m["status"] >= 500], sent


def test_images_are_decoded_only_in_the_formats_a_client_may_declare():
    import base64

    from mllama.server.prompts import load_image_url

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    url = "data:image/png;base64," + base64.b64encode(eps).decode()
    with pytest.raises(RequestError) as e:
        load_image_url(url, "messages[0].content[0].image_url.url", ImageOptions())
    assert "PNG, JPEG, WEBP, GIF" in e.value.message and e.value.param.startswith("messages[0]")


@pytest.mark.parametrize("address", ["2002:7f00:1::", "64:ff9b::7f00:1", "2001:0:4136:e378:8000:63bf:80ff:fffe",
                                     "::ffff:10.0.0.1"])
def test_ipv6_forms_that_carry_an_internal_ipv4_address_are_refused(address):
    from mllama.server.prompts import _check_address

    with pytest.raises(RequestError, match="non-public address"):
        _check_address(address, "images.example", "images[0]")


def test_a_malformed_bracketed_host_names_the_param():
    from mllama.server.prompts import _remote_target

    for url in ("http://[/", "http://[::1/"):
        with pytest.raises(RequestError) as e:
            _remote_target(url, "images[0]")
        assert e.value.param == "images[0]"
