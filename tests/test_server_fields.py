"""The request fields the server honours beyond OpenAI's basic ones (vLLM's top_k, repetition_penalty, min_tokens,
ignore_eos, skip_special_tokens), the ones it accepts and ignores, and the refusal of everything else by name.

The tiny model is altered so that its first greedy token is a special token, which this app's engine takes as its
end token: a plain request ends at once, so min_tokens, ignore_eos and skip_special_tokens each show."""
from __future__ import annotations

import pytest
import torch

MODEL = "tiny"
SPECIAL = "<|reserved_special_token_10|>"
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from mllama.engine.batch import BatchEngine
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor
    from mllama.server import ServerOptions, create_app

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    ids = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    special = processor.tokenizer.convert_tokens_to_ids(SPECIAL)
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
        model.lm_head.weight[special] = model.lm_head.weight[first] * 4
        assert int(model(input_ids=ids).logits[0, -1].argmax()) == special
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=256)
    engine.eos = (special,)
    engine.start()
    app = create_app(processor, engine, ServerOptions(model_name=MODEL))
    with TestClient(app) as client:
        yield client, model, ids, special
    engine.stop(0)


def _chat(client, **fields):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def _answer(client, **fields) -> tuple[str, str, int]:
    r = _chat(client, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"], \
        body["usage"]["completion_tokens"]


def _reference(model, ids, special, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=special, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_the_end_token_ends_a_plain_request_at_once(served):
    client = served[0]
    assert _answer(client)[1:] == ("stop", 1)


def test_ignore_eos_runs_to_max_tokens_and_skip_special_tokens_chooses_the_text(served):
    client, model, ids, special = served
    text, finish, count = _answer(client, ignore_eos=True)
    assert (finish, count) == ("length", 6) and SPECIAL not in text
    raw, _, _ = _answer(client, ignore_eos=True, skip_special_tokens=False)
    assert raw.startswith(SPECIAL) and raw.replace(SPECIAL, "") == text


def test_min_tokens_holds_the_end_token_back(served):
    client, model, ids, special = served
    text, finish, count = _answer(client, min_tokens=3)
    expected = _reference(model, ids, special, min_new_tokens=3)  # three other tokens, then the end token
    assert count == len(expected) >= 4 and special not in expected[:3] and expected[-1] == special
    tokenizer = client.app.state.engine.engine.tokenizer
    assert (text, finish) == (tokenizer.decode(expected[:-1], skip_special_tokens=True), "stop")


def test_repetition_penalty_equals_generates(served):
    client, model, ids, special = served
    penalised = _answer(client, ignore_eos=True, repetition_penalty=3.0, skip_special_tokens=False)[0]
    plain = _answer(client, ignore_eos=True, skip_special_tokens=False)[0]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, repetition_penalty=3.0,
                             eos_token_id=None)
    tokenizer = client.app.state.engine.engine.tokenizer
    assert penalised == tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False) != plain


def test_top_k_1_samples_the_greedy_answer(served):
    client = served[0]
    greedy = _answer(client, ignore_eos=True)[0]
    sampled = {_answer(client, ignore_eos=True, temperature=1.5, seed=seed, top_k=1)[0] for seed in range(3)}
    assert sampled == {greedy}
    free = {_answer(client, ignore_eos=True, temperature=1.5, seed=seed)[0] for seed in range(3)}
    assert free != {greedy}  # without top_k these seeds sample other answers


def test_min_p_1_samples_the_greedy_answer_and_a_small_one_changes_little(served):
    """min_p (vLLM's): only tokens at least min_p times as likely as the best one are sampled; at 1 only the best,
    so any seed gives the greedy answer (the seeds give others without it, test_top_k_1_...)."""
    client = served[0]
    greedy = _answer(client, ignore_eos=True)[0]
    assert {_answer(client, ignore_eos=True, temperature=1.5, seed=seed, min_p=1.0)[0] for seed in range(3)} == \
        {greedy}
    assert _answer(client, ignore_eos=True, temperature=1.5, seed=0, min_p=0.0)[0] == \
        _answer(client, ignore_eos=True, temperature=1.5, seed=0)[0]


def _greedy(model, ids, adjust, steps: int = 6) -> list[int]:
    """Greedy decoding written out, with `adjust(logits, generated ids)` applied at every step."""
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.cat([ids, torch.tensor([generated], dtype=ids.dtype)], dim=1)
                           ).logits[0, -1].float()
            generated.append(int(adjust(logits, generated).argmax()))
    return generated


def test_logit_bias_moves_the_logits_it_names(served):
    client, model, ids, special = served
    tokenizer = client.app.state.engine.engine.tokenizer
    text, finish, count = _answer(client, logit_bias={str(special): -100})  # the end token pushed away

    def away(logits, generated):
        logits[special] -= 100
        return logits

    expected = _greedy(model, ids, away)
    assert (finish, count) == ("length", 6) and text == tokenizer.decode(expected, skip_special_tokens=True)
    assert _answer(client, ignore_eos=True, logit_bias={"1000": 100})[0] == tokenizer.decode([1000] * 6)
    r = _chat(client, logit_bias={str(len(tokenizer)): 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_presence_and_frequency_penalties_count_the_generated_tokens(served):
    client, model, ids, special = served
    tokenizer = client.app.state.engine.engine.tokenizer

    def penalised(logits, generated):
        for token in set(generated):
            logits[token] -= 1.5 + 2.0 * generated.count(token)
        return logits

    got = _answer(client, ignore_eos=True, skip_special_tokens=False, presence_penalty=1.5, frequency_penalty=2.0)[0]
    expected = _greedy(model, ids, penalised)
    assert got == tokenizer.decode(expected, skip_special_tokens=False)
    assert expected != _greedy(model, ids, lambda logits, generated: logits)  # the penalties changed the answer
    r = _chat(client, presence_penalty=2.5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"


def test_fields_without_meaning_here_are_accepted_and_change_nothing(served):
    client = served[0]
    plain = _answer(client, ignore_eos=True)
    assert _answer(client, ignore_eos=True, user="u-1", metadata={"a": "b"}, store=False,
                   service_tier="auto") == plain
    # the fields not built yet, holding the value that changes nothing (what clients send by default)
    assert _answer(client, ignore_eos=True, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=[],
                   response_format={"type": "text"}, parallel_tool_calls=True) == plain


@pytest.mark.parametrize("field, value", [("functions", [{"name": "f"}]), ("function_call", "auto"), ("echo", True)])
def test_fields_not_built_yet_are_refused_by_name(served, field, value):
    r = _chat(served[0], **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert r.json()["error"]["message"].startswith(f"{field} is not supported by this server yet")


def test_unknown_fields_are_refused_as_openai_does(served):
    client = served[0]
    r = _chat(client, temprature=0.5)
    assert r.status_code == 400 and r.json()["error"]["message"] == "Unrecognized request argument supplied: temprature"
    assert r.json()["error"]["param"] == "temprature"
    # each endpoint its own fields: max_completion_tokens is chat's, echo and best_of completions'
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_completion_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = _chat(client, best_of=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


@pytest.mark.parametrize("fields, param", [({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"min_p": "x"}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                                           ({"min_tokens": 7}, "min_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
                                           ({"skip_special_tokens": 1}, "skip_special_tokens")])
def test_bad_values_of_the_extras_are_400s_naming_them(served, fields, param):
    r = _chat(served[0], **fields)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_stop_token_ids_end_the_answer_as_an_end_token(served):
    client, model, ids, special = served
    tokenizer = client.app.state.engine.engine.tokenizer
    free = _greedy(model, ids, lambda logits, generated: logits)  # what ignore_eos gives
    at = next(i for i in range(1, 6) if free[i] not in free[:i])
    text, finish, count = _answer(client, ignore_eos=True, stop_token_ids=[free[at]], skip_special_tokens=False)
    assert (finish, count) == ("stop", at + 1) and text == tokenizer.decode(free[:at], skip_special_tokens=False)
    r = _chat(client, stop_token_ids=[len(tokenizer)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_tokenize_and_detokenize(served, tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor

    client = served[0]
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "Hello there"})
    assert r.status_code == 200, r.text
    expected = processor(text="Hello there")["input_ids"][0]
    assert r.json()["tokens"] == list(expected) and r.json()["count"] == len(expected)
    assert r.json()["max_model_len"] == 256
    plain = client.post("/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()["tokens"]
    assert plain == list(processor.tokenizer("Hello there", add_special_tokens=False)["input_ids"])  # no BOS
    assert plain != list(expected)
    chat = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert chat == processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                 return_tensors="pt")[0].tolist()
    back = client.post("/detokenize", json={"model": MODEL, "tokens": chat}).json()["prompt"]
    assert back.startswith("<|begin_of_text|>") and "Say something." in back
    for path, body, param in [("/tokenize", {"prompt": "x", "truncate": 3}, "truncate"),
                              ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"),
                              ("/tokenize", {"model": "other", "prompt": "x"}, "model")]:
        r = client.post(path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, body, r.text)


def _complete(client, **fields):
    body = {"model": MODEL, "prompt": "Say something.", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            **fields}
    return client.post("/v1/completions", json=body)


def test_echo_puts_the_prompt_before_the_answer(served):
    import json

    client = served[0]
    plain = _complete(client).json()
    answer = plain["choices"][0]["text"]
    assert answer and not answer.startswith("Say something.")
    for fields in ({"echo": True}, {"echo": True, "prompt": ["Say something."]}):
        echoed = _complete(client, **fields).json()
        assert echoed["choices"][0]["text"] == "Say something." + answer
        assert echoed["usage"] == plain["usage"]
    assert _complete(client, echo=False).json()["choices"][0]["text"] == answer
    streamed = _complete(client, echo=True, stream=True)
    assert streamed.status_code == 200
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[0]["choices"][0]["text"] == "Say something."
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Say something." + answer
    r = _complete(client, echo="yes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_echo_with_logprobs_scores_the_prompt_tokens_first(served):
    """echo with logprobs (how evaluation harnesses score a text): the prompt's tokens come first in the logprobs,
    the first without one, each other's the model's log-probability of it after the tokens before it, with the
    top alternatives; then the answer's, as without echo; streamed, the prompt's go with the echo chunk."""
    import json

    client, model = served[0], served[1]
    tokenizer = client.app.state.engine.engine.tokenizer
    ids = client.post("/tokenize", json={"model": MODEL, "prompt": "Say something."}).json()["tokens"]
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    body = _complete(client, echo=True, logprobs=2).json()
    plain = _complete(client, logprobs=2).json()["choices"][0]
    choice = body["choices"][0]
    assert choice["text"] == "Say something." + plain["text"]
    lp = choice["logprobs"]
    n = len(ids)
    assert lp["tokens"][:n] == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for k in range(1, n):
        assert lp["token_logprobs"][k] == pytest.approx(float(expected[k - 1, ids[k]]), abs=1e-4)
        assert len(lp["top_logprobs"][k]) == 2
        assert max(lp["top_logprobs"][k].values()) == pytest.approx(float(expected[k - 1].max()), abs=1e-4)
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    # offsets into the choice's text: the prompt's (the special BOS adds none) and then the answer's
    assert lp["text_offset"][n] == len("Say something.")
    streamed = _complete(client, echo=True, logprobs=2, stream=True)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"] == "Say something." and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == n
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == lp["tokens"]
    many = _complete(client, echo=True, logprobs=1, n=2).json()["choices"]
    assert [c["logprobs"]["tokens"][:n] for c in many] == [lp["tokens"][:n]] * 2


def test_a_prompt_of_token_ids_is_taken_as_it_is(served):
    client = served[0]
    ids = client.post("/tokenize", json={"model": MODEL, "prompt": "Say something."}).json()["tokens"]
    assert ids[0] == 128000  # the string's ids begin with BOS: the same ids as a list give the same answer
    text = _complete(client).json()["choices"][0]["text"]
    for prompt in (ids, [ids]):
        r = _complete(client, prompt=prompt)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == text, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
    echoed = _complete(client, prompt=ids, echo=True).json()["choices"][0]["text"]
    tokenizer = client.app.state.engine.engine.tokenizer
    assert echoed == tokenizer.decode(ids, skip_special_tokens=False) + text
    assert echoed.endswith("Say something." + text)
    without_bos = _complete(client, prompt=ids[1:]).json()
    assert without_bos["usage"]["prompt_tokens"] == len(ids) - 1  # no BOS added to token ids
    for bad, param, words in (([1, 2, 10 ** 7], "prompt", "outside the vocabulary"), ([], "prompt", "non-empty"),
                              ([1, "a"], "prompt[0]", "token ids"), ([True], "prompt", "token ids")):
        r = _complete(client, prompt=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
        assert words in r.json()["error"]["message"], r.json()


def test_a_list_of_prompts_gives_a_choice_each(served):
    import json

    client = served[0]
    prompts = ["Say something.", "Tell me more about it", "Hello there"]
    ids = client.post("/tokenize", json={"model": MODEL, "prompt": prompts[2]}).json()["tokens"]
    alone = [_complete(client, prompt=p).json() for p in prompts]
    body = _complete(client, prompt=[prompts[0], prompts[1], ids]).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    echoed = _complete(client, prompt=prompts[:2], echo=True).json()
    want = [p + a["choices"][0]["text"] for p, a in zip(prompts[:2], alone)]
    assert [c["text"] for c in echoed["choices"]] == want
    streamed = _complete(client, prompt=prompts, stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    texts, finishes = ["", "", ""], [None] * 3
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    assert texts == [a["choices"][0]["text"] for a in alone] and finishes == ["length"] * 3
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    r = _complete(client, prompt=prompts, images=["data:image/png;base64,AAAA"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "images"
    r = _complete(client, prompt=["fine", ""])
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"


def test_n_choices_per_prompt(served):
    import json

    client = served[0]
    greedy = _answer(client, ignore_eos=True)[0]
    body = _chat(client, n=3, ignore_eos=True).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == greedy for c in body["choices"])  # greedy: three times the same
    assert body["usage"]["completion_tokens"] == 18 and body["usage"]["prompt_tokens"] == 3 * len(served[2][0])
    engine = client.app.state.engine.engine
    shared = engine.stats()["shared_prefills"]
    sampled = _chat(client, n=4, ignore_eos=True, temperature=1.0, seed=7).json()["choices"]
    texts = [c["message"]["content"] for c in sampled]
    assert len(set(texts)) > 1  # each choice samples on its own (seed + its index)
    assert engine.stats()["shared_prefills"] == shared + 3  # from one prefill of the prompt
    again = _chat(client, n=4, ignore_eos=True, temperature=1.0, seed=7).json()["choices"]
    assert [c["message"]["content"] for c in again] == texts  # and reproducibly
    first = _chat(client, ignore_eos=True, temperature=1.0, seed=7).json()["choices"][0]["message"]["content"]
    assert texts[0] == first
    streamed = _chat(client, n=2, ignore_eos=True, stream=True)
    parts = ["", ""]
    for line in streamed.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                parts[choice["index"]] += choice["delta"].get("content") or ""
    assert parts == [greedy, greedy]
    listed = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Say something.", "Hello"], "n": 2,
                                                  "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()
    alone = [_complete(client, prompt=p).json()["choices"][0]["text"] for p in ("Say something.", "Hello")]
    assert [c["text"] for c in listed["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
