"""Stopping a generation from another thread: generate(stop_event=...) and closing a stream()."""
from __future__ import annotations

import threading

import torch

from mllama import AutoProcessor, MllamaForConditionalGeneration


def test_a_set_stop_event_ends_generate_after_one_step(tiny_checkpoint):
    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(text="Once upon a time", return_tensors="pt")
    full = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    stop = threading.Event()
    stop.set()
    cut = model.generate(**inputs, max_new_tokens=6, do_sample=False, stop_event=stop)
    assert torch.equal(cut, full[:, :inputs["input_ids"].shape[1] + 1])


def test_closing_a_stream_ends_its_thread(tiny_checkpoint):
    from mllama.generation import stream

    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(text="Once upon a time", return_tensors="pt")
    before = set(threading.enumerate())
    pieces = stream(model, processor, **inputs, max_new_tokens=2000, do_sample=False)
    assert next(pieces)
    workers = [t for t in threading.enumerate() if t not in before]
    assert len(workers) == 1 and workers[0].is_alive()
    pieces.close()
    assert not workers[0].is_alive()  # close() waited for it: it stopped, long before its 2000 tokens
