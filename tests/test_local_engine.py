"""create_app over a BatchEngine of the same process (a library user serving a model object they hold), through
Starlette's test client: answers equal generate's, streamed and not, and /metrics reads the engine's counters."""
from __future__ import annotations

import json

import pytest
import torch

from test_server import MODEL, _generate, _messages


@pytest.fixture(scope="module")
def local_app(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from mllama.engine.batch import BatchEngine
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor
    from mllama.server import ServerOptions, create_app

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=512).start()
    app = create_app(processor, engine, ServerOptions(model_name=MODEL))
    with TestClient(app) as client:
        yield client, (model, processor)
    engine.stop(0)


def test_local_engine_answers_like_generate(local_app):
    client, reference = local_app
    api, ref = _messages("Describe the picture", [3])
    expected, n_out, n_prompt = _generate(reference, ref, 9, do_sample=False)
    body = {"model": MODEL, "messages": api, "max_tokens": 9, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == expected
    assert (answer["usage"]["completion_tokens"], answer["usage"]["prompt_tokens"]) == (n_out, n_prompt)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
    metrics = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines()
                   if line and not line.startswith("#"))
    finished = sum(float(metrics[f'mllama_requests_total{{outcome="{o}"}}']) for o in ("stop", "length"))
    assert finished == 2 and float(metrics["mllama_running_requests"]) == 0
    assert client.get("/health").json()["status"] == "ok"
