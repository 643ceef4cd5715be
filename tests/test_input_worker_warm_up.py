"""Input workers decode one small request while they start, so the first client request does not pay for
lazy imports and first-call set-up."""
from __future__ import annotations

import torch

from mllama.processing.processor import AutoProcessor
from mllama.server import app
from mllama.server.prompts import RequestError


def test_worker_start_runs_the_warm_up(tiny_checkpoint, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this test process's threads
    monkeypatch.setattr(app, "_warm_up", lambda *worker: seen.append(worker))
    monkeypatch.setattr(app, "_WORKER", None)
    app._init_worker(str(tiny_checkpoint))
    assert app._ready()
    assert len(seen) == 1 and seen[0] == (app._WORKER,)


def test_warm_up_decodes_a_chat_request_with_an_image(tiny_checkpoint, monkeypatch):
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    results = []
    real = app.decode_request
    monkeypatch.setattr(app, "decode_request", lambda *args: results.append(real(*args)) or results[-1])
    app._warm_up(processor)
    (parsed, ids, packed), = results  # it went through without a RequestError
    assert ids.count(processor.image_token_id) == 1
    assert packed["pixel_values"][1] == "bfloat16"
    # A processor whose template refuses the warm-up request still starts its workers.
    def refuse(*args):
        raise RequestError("this template takes no images", "messages")

    monkeypatch.setattr(app, "decode_request", refuse)
    app._warm_up(processor)  # (no exception)
