"""The HTTP side's memory of decoded images (server.prompts.DecodedImages), used directly when requests are decoded
on threads, and through refs in the bodies sent to input workers (server.image_memory)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from mllama.processing.processor import AutoProcessor
from mllama.server import app, prompts
from mllama.server.app import decode_request
from mllama.server.engine_process import unpack_tensors
from mllama.server.image_memory import join_pixels, with_refs
from mllama.server.prompts import DecodedImages, ImageOptions, RefsMisplaced, RequestError, decode_part, \
    image_inputs, image_parts

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


def _later_turn(image: bytes) -> bytes:
    """The next turn of a conversation that began with `image`: re-sent, as chat clients do."""
    earlier = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(image)}},
                                            {"type": "text", "text": "What is it?"}]},
               {"role": "assistant", "content": "A test card."}]
    return json.dumps({"model": MODEL, "max_tokens": 4, "messages": earlier + [
        {"role": "user", "content": "And its colours?"}]}).encode()


def _same_packed(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, (array, dtype) in b.items():
        assert a[name][1] == dtype and np.array_equal(a[name][0], array), name


def test_a_resent_image_is_not_decoded_again_and_gives_the_same_inputs(processor, monkeypatch):
    calls = _counting_decoder(monkeypatch)
    memo = DecodedImages(1 << 30)
    image = _png(1, (300, 200))
    first = decode_request(processor, _chat("What is it?", image), True, MODEL, ImageOptions(), "bfloat16",
                           memo=memo)
    second = decode_request(processor, _later_turn(image), True, MODEL, ImageOptions(), "bfloat16", memo=memo)
    assert len(calls) == 1 and (memo.hits, memo.misses) == (1, 1)
    plain = decode_request(processor, _later_turn(image), True, MODEL, ImageOptions(), "bfloat16")  # no memory
    assert len(calls) == 2
    _same_packed(second[2], plain[2])
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
    parts = image_parts(processor, [(_url(data), f"images[{i}]") for i, data in enumerate(files)], ImageOptions(),
                        None, None, DecodedImages(1 << 30))
    ours = image_inputs(processor, ids, parts)
    assert ours["pixel_values"].shape[:3] == (1, 3, 4) and len(set(ours["aspect_ratio_ids"][0].tolist())) == 3
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        assert torch.equal(ours[name], torch.as_tensor(theirs[name])), name


def test_the_memory_is_bounded_and_drops_the_least_recently_used(processor):
    parts = {seed: decode_part(processor, _png(seed), "the data URL", "p", ImageOptions(), "bfloat16",
                               bytes([seed]) * 32) for seed in (6, 7, 8)}
    size = parts[6].pixels.nbytes
    memo = DecodedImages(2 * size)  # room for two images
    for seed in (6, 7):
        memo.put(parts[seed])
    assert memo.get(parts[6].digest) is parts[6]  # 6 used again before 8 comes: 7 is the least recently used
    memo.put(parts[8])
    assert memo.bytes == 2 * size
    assert memo.get(parts[7].digest) is None
    assert memo.get(parts[6].digest) is parts[6] and memo.get(parts[8].digest) is parts[8]
    assert (memo.hits, memo.misses) == (3, 1)


def test_a_bad_image_is_refused_every_time_and_never_kept(processor):
    memo = DecodedImages(1 << 30)
    broken = _png(9)[:60]  # a PNG cut short
    for _ in range(2):
        with pytest.raises(RequestError, match="corrupt or truncated|not a PNG") as e:
            decode_request(processor, _chat("What?", broken), True, MODEL, ImageOptions(), None, memo=memo)
        assert e.value.param == "messages[0].content[0].image_url.url"
    assert (memo.hits, memo.misses, memo.bytes) == (0, 2, 0)


@pytest.fixture
def worker(processor, monkeypatch):
    """This process as an input worker (app._job runs here)."""
    monkeypatch.setattr(app, "_WORKER", processor)
    return MODEL, ImageOptions(), "bfloat16", 4096


def test_a_worker_gets_refs_for_held_images_and_the_inputs_are_the_same(processor, worker, monkeypatch):
    memo = DecodedImages(1 << 30)
    image, other = _png(20, (400, 300)), _png(21, (500, 200))
    raw = _chat("Compare them.", image, other)
    sent, refs, held = with_refs(raw, memo)
    assert (sent, refs) == (raw, {}) and (memo.hits, memo.misses) == (0, 2)
    join_pixels(*app._job(sent, True, worker, None, refs)[2:], held, memo)  # turn 1 keeps both
    # turn 2 re-sends the first image only, with a new one
    calls = _counting_decoder(monkeypatch)
    raw = _chat("And this one?", image, _png(22, (90, 90)))
    sent, refs, held = with_refs(raw, memo)
    assert len(refs) == 1 and len(sent) < len(raw) - len(base64.b64encode(image)) + 100
    parsed, ids, packed, pixels = app._job(sent, True, worker, None, refs)
    assert len(calls) == 1  # the new image only
    assert [p is None for _, p in pixels] == [True, False]
    joined = join_pixels(packed, pixels, held, memo)
    _, plain_ids, plain = decode_request(processor, raw, True, MODEL, ImageOptions(), "bfloat16", 4096)
    assert ids == plain_ids
    _same_packed(joined, plain)
    assert torch.equal(unpack_tensors(joined)["pixel_values"], unpack_tensors(plain)["pixel_values"])


def test_text_that_only_looks_like_a_held_image_is_left_alone(processor, worker):
    """A user who pastes a held image's data URL as text: the span is replaced by a ref, the worker does not meet
    it as an image URL and refuses the refs, and the server decodes the body as it came."""
    memo = DecodedImages(1 << 30)
    image = _png(23, (300, 300))
    sent, refs, held = with_refs(_chat("What is it?", image), memo)
    join_pixels(*app._job(sent, True, worker, None, refs)[2:], held, memo)
    pasted = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Is this base64? " + _url(image)}]})
    sent, refs, held = with_refs(pasted.encode(), memo)
    assert len(refs) == 1
    with pytest.raises(RefsMisplaced):
        app._job(sent, True, worker, None, refs)


def test_a_client_cannot_send_a_ref(processor, worker):
    forged = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,mllama-ref-0-0"}}]}]}).encode()
    with pytest.raises(RequestError, match="is not a PNG, JPEG, WEBP, GIF image") as e:  # decoded as base64
        app._job(forged, True, worker, None, {})
    assert e.value.param == "messages[0].content[0].image_url.url"
