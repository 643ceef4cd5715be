"""One request's failure while its token is chosen or its output is made ends that request alone: the engine thread
and every other request go on. Sampling is numerically safe for every temperature the server accepts."""
from __future__ import annotations

import threading

import pytest
import torch

from collecting import Collector
from faults import fail_marked_sampling
from mllama.engine import batch as batch_module
from mllama.engine.batch import BatchEngine
from mllama.engine.requests import GenerationRequest
from mllama.generation import GREEDY_BELOW_TEMPERATURE, SamplingParams, filter_logits


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    return model, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _greedy_alone(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def _prompt(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=True)["input_ids"]


def _wait(collectors: list[Collector]) -> None:
    for c in collectors:
        assert c.done.wait(120), "a request never got its final event"


def test_tiny_temperatures_act_as_greedy_and_stay_finite():
    for t in (2e-39, 1e-300, 5e-324, GREEDY_BELOW_TEMPERATURE / 2):
        assert not SamplingParams(do_sample=True, temperature=t).do_sample, t
    assert SamplingParams(do_sample=True, temperature=GREEDY_BELOW_TEMPERATURE).do_sample
    # the smallest temperature that still samples gives finite probabilities on large logits
    logits = torch.tensor([[30.0, 29.0, -50.0]])
    probs = filter_logits(logits, GREEDY_BELOW_TEMPERATURE, 0, 1.0).softmax(-1)
    assert torch.isfinite(probs).all() and probs[0, 0] == 1.0


def test_temperature_2e_39_is_greedy_in_the_engine(loaded):
    """Before: logits / 2e-39 overflowed to inf, softmax gave nan and multinomial raised inside the step."""
    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128).start()
    try:
        ids = _prompt(processor, "A tiny temperature")
        c = Collector()
        engine.submit(GenerationRequest(prompt_ids=ids, emit=c, seed=3,
                                        params=SamplingParams(max_new_tokens=6, do_sample=True, temperature=2e-39)))
        _wait([c])
        assert c.events[-1].error is None and c.ids == _greedy_alone(model, ids, 6)
        assert engine.failed is None
    finally:
        engine.stop()


def test_a_failing_request_ends_alone_and_the_engine_goes_on(loaded, monkeypatch):
    """Three failures at once in one batch: a request whose sampling raises, one whose emit callback raises on its
    second event, and a good one beside them; then a new request after them. Only the two fail."""
    model, processor = loaded
    fail_marked_sampling(monkeypatch)  # the request with top_p 0.5
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=128).start()
    try:
        ids = _prompt(processor, "Several requests together")
        sampled, broken, good = Collector(), Collector(fail_on=2), Collector()
        engine.submit(GenerationRequest(prompt_ids=ids, emit=sampled, seed=1,
                                        params=SamplingParams(max_new_tokens=8, do_sample=True, top_p=0.5)))
        engine.submit(GenerationRequest(prompt_ids=ids, emit=broken, params=SamplingParams(max_new_tokens=8)))
        engine.submit(GenerationRequest(prompt_ids=ids, emit=good, params=SamplingParams(max_new_tokens=8)))
        _wait([sampled, broken, good])
        assert sampled.events[-1].error and "sampling failed: FloatingPointError" in sampled.events[-1].error
        assert broken.events[-1].error and "RuntimeError" in broken.events[-1].error
        assert good.events[-1].error is None and good.ids == _greedy_alone(model, ids, 8)
        assert engine.failed is None and engine.running == 0
        later = Collector()
        engine.submit(GenerationRequest(prompt_ids=ids, emit=later, params=SamplingParams(max_new_tokens=5)))
        _wait([later])
        assert later.ids == _greedy_alone(model, ids, 5)
        assert engine.outcomes["error"] == 2
    finally:
        engine.stop()


def test_repetition_penalty_on_an_image_prompt(loaded):
    """The image token (id = the output vocabulary's size) is in the prompt but has no logit: it used to index past
    the logits (`index 128256 is out of bounds`)."""
    from mllama.generation import apply_repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[3, 0, 1, 3]])  # 3: past the vocabulary
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5]]))
    model, processor = loaded
    import PIL.Image

    inputs = processor(images=[[PIL.Image.new("RGB", (30, 20), (9, 9, 9))]], text=["<|image|>Look"],
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, repetition_penalty=1.3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_stop_waits_for_a_request_between_the_queue_and_its_slot(loaded, monkeypatch):
    """stop(deadline) waits while requests run or wait; one taken from the queue whose prefill is under way is in
    neither place, and was aborted as if the engine were idle (a SIGTERM drain lost it, 2 runs in 4 under load)."""
    import time as real_time
    from types import SimpleNamespace

    from waiting import wait_until

    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128)
    entered, go, polled = threading.Event(), threading.Event(), threading.Event()
    prefill = engine._prefill

    def held_prefill(group):
        entered.set()
        assert go.wait(120)
        prefill(group)

    def sleep(seconds):  # stop() polls while something is left to finish
        polled.set()
        real_time.sleep(seconds)  # poll: stop()'s own poll loop, passed through

    engine._prefill = held_prefill
    monkeypatch.setattr(batch_module, "time", SimpleNamespace(**{**vars(real_time), "sleep": sleep}))
    engine.start()
    c = Collector()
    ids = _prompt(processor, "Caught in between")
    engine.submit(GenerationRequest(prompt_ids=ids, emit=c, params=SamplingParams(max_new_tokens=4)))
    assert entered.wait(120)
    stopper = threading.Thread(target=engine.stop, args=(120.0,))
    stopper.start()
    wait_until(lambda: polled.is_set() or engine.scheduler.stopping, "stop() to poll or to decide the engine is idle")
    assert polled.is_set() and not engine.scheduler.stopping
    go.set()
    stopper.join(120)
    assert c.events[-1].finish_reason == "length" and c.ids == _greedy_alone(model, ids, 4)


def test_fast_path_and_engine_run_the_models_own_mlp(loaded):
    """They call the model's layers (one copy of the math), so a gelu config, which transformers builds, decodes
    as the plain model does; before, their SiLU-only layer functions had to refuse it."""
    from conftest import randomize, tiny_config
    from mllama import MllamaForConditionalGeneration

    config = tiny_config()
    config.text_config.hidden_act = "gelu"
    model = randomize(MllamaForConditionalGeneration.from_config(config)).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    plain = model.generate(input_ids=ids, max_new_tokens=8, fast=False, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=8, fast=True, do_sample=False,
                                      eos_token_id=None), plain)
    engine = BatchEngine(model, loaded[1].tokenizer, max_batch=2, max_model_len=64).start()
    try:
        c = Collector()
        engine.submit(GenerationRequest(prompt_ids=ids[0].tolist(), params=SamplingParams(max_new_tokens=8,
                                        do_sample=False, eos_token_id=()), emit=c))
        _wait([c])
    finally:
        engine.stop()
    assert c.ids == plain[0, 6:].tolist()


def test_the_engine_honours_bad_words_ids_as_generate_does(loaded):
    """Before: the batched argmax skipped every token rule but the penalty, so a banned word came out anyway."""
    model, processor = loaded
    ids = _prompt(processor, "Banned words")
    banned = _greedy_alone(model, ids, 6)[2]
    expected = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                              bad_words_ids=[[banned]])[0, len(ids):].tolist()
    assert banned not in expected
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128).start()
    try:
        c = Collector()
        engine.submit(GenerationRequest(prompt_ids=ids, emit=c,
                                        params=SamplingParams(max_new_tokens=6, bad_words_ids=((banned,),))))
        _wait([c])
        assert c.events[-1].error is None and c.ids == expected
    finally:
        engine.stop()


def test_a_failing_grammar_engine_ends_only_the_constrained_requests(loaded, monkeypatch):
    pytest.importorskip("llguidance")
    from mllama import constraints

    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=128).start()
    try:
        grammar = engine.grammars().compile({"type": "json_object"})

        real, calls = constraints.Masks.fill, []

        def fill(self, *args):  # the prefill's mask is made; the first decode step's fails
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("the mask failed")
            return real(self, *args)

        monkeypatch.setattr(constraints.Masks, "fill", fill)
        ids = _prompt(processor, "Two requests")
        bound, plain = Collector(), Collector()
        engine.submit_many([GenerationRequest(prompt_ids=ids, emit=bound, grammar=grammar,
                                              params=SamplingParams(max_new_tokens=6)),
                            GenerationRequest(prompt_ids=ids, emit=plain, params=SamplingParams(max_new_tokens=6))])
        _wait([bound, plain])
        assert "sampling failed: RuntimeError: the mask failed" in bound.events[-1].error
        assert plain.events[-1].error is None and plain.ids == _greedy_alone(model, ids, 6)[:len(plain.ids)]
        assert engine.failed is None
    finally:
        engine.stop()
