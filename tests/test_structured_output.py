"""response_format on both endpoints: a real server (tiny checkpoint, random weights: only the constraint can make
an answer valid), the official openai client, sampling at temperature 1 with several seeds, streaming and not.
Every schema here is bounded (lengths, item counts, ranges, no extra keys), so every answer must end with "stop"
well within max_tokens, and each must parse and validate against its schema (jsonschema). Schemas the grammar
engine cannot compile are 400s naming the field; greedy requests batched with constrained ones answer as alone."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from test_server import MODEL, Server, _client  # noqa: E402

from schemas import SCHEMAS  # noqa: E402

PROMPT = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint, "--max-batch", "8")
    yield s
    assert s.stop() == 0


def _format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"), "schema": SCHEMAS[name],
                                                   "strict": True}}


def _chat(client, response_format, seed: int, stream: bool) -> tuple[str, str]:
    kwargs = dict(model=MODEL, messages=PROMPT, max_tokens=160, temperature=1.0, seed=seed,
                  response_format=response_format)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_answer_follows_its_schema(server, name):
    client = _client(server)
    for seed, stream in ((0, False), (1, True), (2, False)):
        text, finish = _chat(client, _format(name), seed, stream)
        assert finish == "stop", (name, seed, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_and_the_completions_endpoint(server):
    client = _client(server)
    for seed in (3, 4):
        text, finish = _chat(client, {"type": "json_object"}, seed, stream=seed == 4)
        if finish == "stop":  # an object with any keys has no bound: only an ended one must be whole
            assert isinstance(json.loads(text), dict)
        else:
            assert finish == "length" and text.startswith("{")
    schema = SCHEMAS["enum"]
    for seed in (5, 6):
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Colors:", "max_tokens": 60, "temperature": 1.0, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_without_the_constraint_the_answers_are_not_json(server):
    """The check above can fail: the same requests without response_format give no valid answer."""
    client = _client(server)
    valid = 0
    for seed in (0, 1, 2):
        text, _ = _chat(client, None, seed, stream=False)
        try:
            jsonschema.validate(json.loads(text), SCHEMAS["flat"])
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid == 0


@pytest.mark.parametrize("response_format, param, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
     "response_format.json_schema.schema", "frob"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format.json_schema.schema", "unclosed group"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema", "name"),
    ({"type": "xml"}, "response_format", "json_schema"),
    ("json", "response_format", "json_object"),
])
def test_schemas_that_cannot_compile_are_400s_naming_the_field(server, response_format, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": PROMPT, "max_tokens": 5, "response_format": response_format})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_min_tokens_and_ignore_eos_cannot_go_with_a_schema(server):
    for field in ({"min_tokens": 3}, {"ignore_eos": True}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": PROMPT, "max_tokens": 5, "response_format": _format("flat"), **field})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(field)), r.text


def test_greedy_rows_batched_with_constrained_rows_answer_as_alone(server):
    client = _client(server)
    questions = [f"Tell me about number {i}." for i in range(3)]

    def greedy(question: str) -> str:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                              max_tokens=24, temperature=0).choices[0].message.content

    alone = [greedy(q) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(_chat, client, _format(name), 7, False) for name in ("flat", "nested", "enum")]
        together = [pool.submit(greedy, q) for q in questions]
        assert [f.result() for f in together] == alone
        for future, name in zip(constrained, ("flat", "nested", "enum")):
            text, finish = future.result()
            assert finish == "stop"
            jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_masks_hold_the_grammars_tokens_and_the_end_only_where_the_answer_may_end(tiny_checkpoint):
    """constraints.Masks as the engine uses them: two rows filled at once (llguidance's threads), unpacked bit by
    bit, the request's own end token allowed once the grammar is complete and llguidance's end token never
    (it is not this request's)."""
    from mllama.constraints import Constraint, Grammars, Masks
    from mllama.processing.processor import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(str(tiny_checkpoint)).tokenizer
    vocab, end = 128256, (128008,)
    grammars = Grammars(tokenizer, vocab)
    grammar = grammars.compile({"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}})
    fresh, started = Constraint(grammars, grammar), Constraint(grammars, grammar)
    for token in tokenizer.encode("tru", add_special_tokens=False):
        started.accept(token, end)
    masks = Masks(grammars, 4, vocab, "cpu")
    assert masks.fill([fresh, started], [end, end]) == []
    allowed = masks.allowed(2)
    assert allowed.shape == (2, vocab)
    first = {tokenizer.decode([t]) for t in allowed[0].nonzero().flatten().tolist()}
    assert {"true", "false"} <= first and all("true".startswith(t) or "false".startswith(t) for t in first), first
    (e,) = tokenizer.encode("e", add_special_tokens=False)
    assert allowed[1].nonzero().flatten().tolist() == [e]
    started.accept(e, end)
    assert masks.fill([started], [end]) == []
    assert masks.allowed(1)[0].nonzero().flatten().tolist() == [end[0]]  # (not 128009, llguidance's end token)
