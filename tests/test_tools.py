"""Tool calling: tools rendered by the instruct template (the same ids as processor.apply_chat_template with
tools), `tool_choice` "required" and a named function enforced by the grammar (every answer of the random tiny
model is a valid call, streamed or not), a full round trip (call, tool result, answer), the answer parser, and
the refusals (images with tools, unknown function, special-token text)."""
from __future__ import annotations

import json

import httpx2 as httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from test_server import MODEL, Server, _client, _image  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint, "--max-batch", "4")
    yield s
    assert s.stop() == 0


def _valid_call(call, allowed: list[str]) -> dict:
    assert call.type == "function" and call.id and call.function.name in allowed
    schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)["function"]["parameters"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    return arguments


@pytest.mark.parametrize("choice, allowed", [("required", ["get_weather", "get_time"]),
                                             ({"type": "function", "function": {"name": "get_time"}}, ["get_time"])])
def test_required_and_named_calls_are_always_valid(server, choice, allowed):
    client = _client(server)
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                  max_tokens=80, temperature=1.0, seed=seed)
        choice0 = response.choices[0]
        assert choice0.finish_reason == "tool_calls" and choice0.message.content is None, choice0
        assert len(choice0.message.tool_calls) == 1
        _valid_call(choice0.message.tool_calls[0], allowed)


def test_a_streamed_call_comes_as_tool_call_deltas(server):
    client = _client(server)
    calls, finish, text = {}, None, ""
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                max_tokens=80, temperature=1.0, seed=5, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and text == "" and list(calls) == [0]
    assert calls[0]["id"] and calls[0]["name"] in ("get_weather", "get_time")
    schema = next(t for t in TOOLS if t["function"]["name"] == calls[0]["name"])["function"]["parameters"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), schema)


def test_several_streamed_choices_each_come_as_their_own_call(server):
    client = _client(server)
    calls, finishes = {}, {}
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                max_tokens=80, temperature=1.0, seed=9, stream=True, n=3):
        for choice in chunk.choices:
            assert not choice.delta.content
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault((choice.index, d.index), {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert finishes == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    assert sorted(index for index, _ in calls) == [0, 1, 2]
    for call in calls.values():
        schema = next(t for t in TOOLS if t["function"]["name"] == call["name"])["function"]["parameters"]
        jsonschema.validate(json.loads(call["arguments"]), schema)


def test_a_round_trip_call_result_answer(server):
    client = _client(server)
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=80, temperature=1.0, seed=1)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_tools_and_history_render_as_the_template_does(tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor
    from mllama.server.prompts import ImageOptions, chat_ids

    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, \"sunny\"\nand dry"}]
    template_history = ASK + [
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "unit": "C"}}}]},
        {"role": "tool", "content": "21 degrees, \"sunny\"\nand dry"}]
    functions = [t["function"] for t in TOOLS]
    for ours, theirs in ((ASK, ASK), (history, template_history)):
        ids, _ = chat_ids(processor, ours, ImageOptions(), tools=functions)
        want = processor.apply_chat_template(theirs, tools=functions, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) else want
        want = want[0] if want and isinstance(want[0], list) else want
        assert ids == list(want)
    text = processor.tokenizer.decode(chat_ids(processor, history, ImageOptions(), tools=functions)[0])
    assert '"name": "get_weather"' in text and "Environment: ipython" in text


def test_calls_are_read_from_answers():
    from mllama.server.tools import Tools, calls_of

    tools = Tools([t["function"] for t in TOOLS], "auto", True)
    one = calls_of(' {"name": "get_time", "parameters": {"zone": 3}}', tools)
    assert [c["function"]["name"] for c in one] == ["get_time"] and json.loads(one[0]["function"]["arguments"]) == \
        {"zone": 3}
    two = calls_of('{"name": "get_time", "parameters": {"zone": 1}}; {"name": "get_weather", "arguments": '
                   '{"city": "a;b", "unit": "C"}}', tools)
    assert [c["function"]["name"] for c in two] == ["get_time", "get_weather"]
    assert json.loads(two[1]["function"]["arguments"]) == {"city": "a;b", "unit": "C"}
    assert calls_of('<|python_tag|>{"name": "get_time", "parameters": {}}', tools) is not None
    for text in ("The weather is fine.", '{"name": "nope", "parameters": {}}', '{"name": "get_time"}', "{broken"):
        assert calls_of(text, tools) is None, text
    single = Tools(tools.functions, "auto", False)
    assert calls_of('{"name": "get_time", "parameters": {"zone": 1}}; {"name": "get_time", "parameters": {}}',
                    single) is None


@pytest.mark.parametrize("fields, param, words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tool_choice": "always"}, "tool_choice", "must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "<|eot_id|>"}}]},
     "tools[0].function", "special token"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "must be"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "the call"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
])
def test_bad_tool_fields_are_400s_naming_them(server, fields, param, words):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "tools": TOOLS, **fields}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.json()


def test_tools_with_an_image_are_refused(server):
    url, _ = _image(3)
    body = {"model": MODEL, "max_tokens": 4, "tools": TOOLS, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "images" in r.json()["error"]["message"]
    body["tool_choice"] = "none"  # no tools in play: the image is answered
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
