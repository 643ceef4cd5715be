"""The engine's paged memory (CPU, fp32): requests take the pages they need, wait when pages are short, are refused
when they could never fit; an image seen before is not encoded again and gives the same answer."""
from __future__ import annotations

import PIL.Image
import pytest
import torch

from collecting import Collector
from mllama.engine.batch import BatchEngine
from mllama.engine.requests import GenerationRequest, RequestTooLong
from mllama.engine.paged import PAGE_TOKENS
from mllama.generation import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    return model, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _image_request(processor, color, size=(40, 30), text="Describe it:") -> tuple[list[int], dict]:
    image = PIL.Image.new("RGB", size, color)
    inputs = processor(images=[[image]], text=[f"<|image|>{text}"], return_tensors="pt")
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    return ids, dict(inputs)


def _alone(model, ids, inputs, n) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), **inputs, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, fast=False)
    return out[0, len(ids):].tolist()


def _run(engine, ids, inputs, n, emit=None) -> Collector:
    c = emit or Collector()
    engine.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=n, min_new_tokens=n,
                                                                          do_sample=False, eos_token_id=engine.eos),
                                    model_inputs=dict(inputs), emit=c))
    return c


def _done(c: Collector) -> Collector:
    assert c.done.wait(120), "a request never got its final event"
    assert c.events[-1].error is None, c.events[-1].error
    return c


def test_a_repeated_image_is_not_encoded_again_and_gives_the_same_answer(loaded, monkeypatch):
    model, processor = loaded
    inner = model.model
    encoded = []
    original = type(inner).encode_images

    def counting(self, pixel_values, *args, **kwargs):
        encoded.append(pixel_values.shape)
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(type(inner), "encode_images", counting)
    red = _image_request(processor, (200, 30, 90))
    # the second turn of a chat: the same image, a longer prompt
    red_again = _image_request(processor, (200, 30, 90), text="Describe it: a red thing. And then?")
    blue = _image_request(processor, (20, 40, 220))
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128).start()
    try:
        first = _done(_run(engine, *red, 6))
        assert len(encoded) == 1
        second = _done(_run(engine, *red_again, 6))
        assert len(encoded) == 1  # its K/V came from the pages the first request left
        third = _done(_run(engine, *blue, 6))
        assert len(encoded) == 2
        stats = engine.stats()
    finally:
        engine.stop()
    assert first.ids == _alone(model, *red, 6)
    assert second.ids == _alone(model, *red_again, 6)
    assert third.ids == _alone(model, *blue, 6)
    assert stats["image_cache"] == {"hits": 1, "misses": 2, "evictions": 0, "images": 2}
    tiles = [int(inputs["aspect_ratio_mask"].sum()) for _, inputs in (red, blue)]
    # cached images keep one page per real tile, idle once their requests ended; no text page is held
    assert stats["pages"]["tile"]["cached_idle"] == stats["pages"]["tile"]["used"] == sum(tiles)
    assert stats["pages"]["self"]["used"] == 0 and stats["cache_bytes_in_use"] == 0


def test_cached_images_give_their_pages_back_least_recently_used_first(loaded):
    model, processor = loaded
    colors = [(200, 30, 90), (20, 40, 220), (30, 200, 30)]
    requests = [_image_request(processor, color) for color in colors]
    tiles = int(requests[0][1]["aspect_ratio_mask"].sum())
    assert all(int(inputs["aspect_ratio_mask"].sum()) == tiles for _, inputs in requests)
    # room for two images' tiles: the third evicts the least recently used (the first)
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128,
                         pages=(2 * 128 // PAGE_TOKENS + 1, 2 * tiles + 1)).start()
    try:
        for request in requests:
            _done(_run(engine, *request, 4))
        stats = engine.stats()
        again = _done(_run(engine, *requests[0], 4))  # evicted: encoded again, same answer
        after = engine.stats()
    finally:
        engine.stop()
    assert stats["image_cache"]["evictions"] == 1 and stats["image_cache"]["images"] == 2
    assert after["image_cache"]["misses"] == 4 and after["image_cache"]["hits"] == 0
    assert again.ids == _alone(model, *requests[0], 4)


def test_a_request_waits_for_pages_and_one_that_could_never_fit_is_refused(loaded):
    model, processor = loaded
    ids = processor.tokenizer("A text prompt of a few tokens", add_special_tokens=True)["input_ids"]
    n = 2 * PAGE_TOKENS - len(ids)  # prompt + answer fill two pages exactly
    order = []

    class Tracking(Collector):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, event):
            if not self.events:
                order.append((self.name, "first"))
            if event.finish_reason or event.error:
                order.append((self.name, "end"))
            super().__call__(event)

    # three text pages (and the scratch one): the first request takes two, the second must wait for them
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=256, pages=(4, 2))
    with pytest.raises(RequestTooLong, match=r"need 4 K/V pages of 64 tokens but the pool has 3"):
        _run(engine, ids, {}, 4 * PAGE_TOKENS - len(ids))
    engine.start()
    try:
        a, b = Tracking("a"), Tracking("b")
        _run(engine, ids, {}, n, a)
        _run(engine, ids, {}, n, b)
        _done(a), _done(b)
    finally:
        engine.stop()
    assert order == [("a", "first"), ("a", "end"), ("b", "first"), ("b", "end")]
    assert a.ids == b.ids == _alone(model, ids, {}, n)
