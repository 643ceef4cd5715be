"""The HTTP side's memory of decoded images (server.prompts.DecodedImages) and the routing that sends a
conversation's turns to the input worker that decoded its image (server.app.image_affinity)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from mllama.processing.processor import AutoProcessor
from mllama.server import prompts
from mllama.server.app import decode_request, image_affinity
from mllama.server.prompts import DecodedImages, ImageOptions, RequestError, image_inputs

MODEL = "tiny"


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _png(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _chat(text: str, *images: bytes, earlier: list | None = None) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": _url(data)}} for data in images]
    messages = (earlier or []) + [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    return json.dumps({"model": MODEL, "max_tokens": 4, "messages": messages}).encode()


def _counting_decoder(monkeypatch) -> list:
    calls = []
    real = prompts.decode_served_image
    monkeypatch.setattr(prompts, "decode_served_image", lambda *args: calls.append(args[2]) or real(*args))
    return calls


def test_a_resent_image_is_not_decoded_again_and_gives_the_same_inputs(processor, monkeypatch):
    calls = _counting_decoder(monkeypatch)
    memo = DecodedImages(1 << 30)
    image = _png(1, (300, 200))
    first = decode_request(processor, _chat("What is it?", image), True, MODEL, ImageOptions(), "bfloat16",
                           memo=memo)
    # the next turn re-sends the conversation, image included
    earlier = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(image)}},
                                            {"type": "text", "text": "What is it?"}]},
               {"role": "assistant", "content": "A test card."}]
    body = json.dumps({"model": MODEL, "max_tokens": 4, "messages": earlier + [
        {"role": "user", "content": "And its colours?"}]}).encode()
    second = decode_request(processor, body, True, MODEL, ImageOptions(), "bfloat16", memo=memo)
    assert len(calls) == 1 and (memo.hits, memo.misses) == (1, 1)
    plain = decode_request(processor, body, True, MODEL, ImageOptions(), "bfloat16")  # no memory at all
    assert len(calls) == 2
    for name, (array, dtype) in plain[2].items():
        assert second[2][name][1] == dtype and np.array_equal(second[2][name][0], array), name
    assert plain[2]["pixel_values"][1] == "bfloat16"
    assert np.array_equal(first[2]["pixel_values"][0], second[2]["pixel_values"][0])
    assert second[1] == plain[1] and second[1] != first[1]  # the prompts differ, the tiles do not


def test_images_tiled_one_by_one_equal_the_processor_on_all_of_them(processor):
    """Each image is tiled alone (so that it can be kept alone); joined, they are what the processor gives for the
    sample's images together, cross-attention mask included."""
    files = [_png(2, (700, 300)), _png(3, (64, 64)), _png(4, (90, 400))]
    text = "<|image|><|image|>Compare<|image|>"
    theirs = processor(images=[[PIL.Image.open(io.BytesIO(data)) for data in files]], text=[text],
                       return_tensors="pt")
    ids = theirs["input_ids"][0].tolist()
    ours = image_inputs(processor, ids, [(data, "the data URL", f"images[{i}]") for i, data in enumerate(files)],
                        ImageOptions(), memo=DecodedImages(1 << 30))
    assert ours["pixel_values"].shape[:3] == (1, 3, 4) and len(set(ours["aspect_ratio_ids"][0].tolist())) == 3
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        assert torch.equal(ours[name], torch.as_tensor(theirs[name])), name


def test_the_memory_is_bounded_and_drops_the_least_recently_used(processor, monkeypatch):
    calls = _counting_decoder(monkeypatch)
    one = DecodedImages(1 << 30).tiles(processor, _png(5), "the data URL", "p", ImageOptions(), "bfloat16")
    memo = DecodedImages(2 * one["pixel_values"].nbytes)  # room for two images
    a, b, c = _png(6), _png(7), _png(8)
    for data in (a, b, a, c):  # a is used again before c comes: b is the least recently used
        memo.tiles(processor, data, "the data URL", "p", ImageOptions(), "bfloat16")
    assert (memo.hits, memo.misses) == (1, 3) and memo.bytes == 2 * one["pixel_values"].nbytes
    memo.tiles(processor, a, "the data URL", "p", ImageOptions(), "bfloat16")
    memo.tiles(processor, c, "the data URL", "p", ImageOptions(), "bfloat16")
    assert (memo.hits, memo.misses) == (3, 3)
    memo.tiles(processor, b, "the data URL", "p", ImageOptions(), "bfloat16")  # dropped: decoded again
    assert (memo.hits, memo.misses) == (3, 4) and len(calls) == 5
    # another pixel dtype is another entry (its tiles were rounded differently)
    memo.tiles(processor, b, "the data URL", "p", ImageOptions(), None)
    assert memo.misses == 5


def test_a_bad_image_is_refused_every_time_and_never_kept(processor):
    memo = DecodedImages(1 << 30)
    broken = _png(9)[:60]  # a PNG cut short
    for _ in range(2):
        with pytest.raises(RequestError, match="corrupt or truncated|not a PNG") as e:
            decode_request(processor, _chat("What?", broken), True, MODEL, ImageOptions(), None, memo=memo)
        assert e.value.param == "messages[0].content[0].image_url.url"
    assert (memo.hits, memo.misses, memo.bytes) == (0, 2, 0)


def test_image_affinity_follows_the_first_image_not_the_text():
    a, b = _png(10), _png(11)
    assert image_affinity(_chat("one", a)) == image_affinity(_chat("a longer question now", a, b))
    assert image_affinity(_chat("one", a)) != image_affinity(_chat("one", b))
    assert image_affinity(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()) \
        is None
    # JPEGs of one encoder open with the same kilobyte of tables: the hint still tells them apart
    jpegs = []
    for seed in (12, 13):
        buffer = io.BytesIO()
        PIL.Image.open(io.BytesIO(_png(seed, (200, 150)))).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    assert jpegs[0][:600] == jpegs[1][:600]
    urls = [json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}]}]}).encode() for data in jpegs]
    assert image_affinity(urls[0]) != image_affinity(urls[1])
