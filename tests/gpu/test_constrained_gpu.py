"""On CUDA: constrained decoding in the serving engine on its CUDA graphs (the tiny checkpoint's random weights,
so only the grammar can make an answer valid): the masks are computed on the host, copied and applied on the
device; constrained rows, greedy and sampled, share batches with plain greedy rows, which answer as alone."""
from __future__ import annotations

import json

import pytest
import torch

from collecting import Collector
from mllama import MllamaForConditionalGeneration
from mllama.engine.batch import BatchEngine
from mllama.engine.requests import GenerationRequest
from mllama.generation import SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from schemas import SCHEMAS  # noqa: E402

DEVICE = "cuda"
END = (128009,)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map=DEVICE).eval()
    tokenizer = AutoProcessor.from_pretrained(str(tiny_checkpoint)).tokenizer
    e = BatchEngine(model, tokenizer, max_batch=8, max_model_len=512, use_graphs=True, pages=(128, 64)).start()
    yield e
    e.stop()


def _submit(engine, text: str, grammar: str | None = None, seed: int | None = None) -> Collector:
    ids = engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    c = Collector()
    params = SamplingParams(max_new_tokens=160, do_sample=seed is not None, eos_token_id=END)
    engine.submit(GenerationRequest(prompt_ids=ids, params=params, emit=c, grammar=grammar, seed=seed,
                                    end_tokens=END))
    return c


def _answer(c: Collector) -> tuple[str, str]:
    assert c.done.wait(300), "a request never got its final event"
    assert c.events[-1].error is None, c.events[-1].error
    return "".join(e.text for e in c.events), c.events[-1].finish_reason


def test_constrained_rows_on_graphs_follow_their_schemas_beside_plain_rows(engine):
    names = ["nested", "array of objects", "anyOf", "bounded strings"]
    grammars = {n: engine.grammars().compile({"type": "json_schema", "json_schema": {"name": "s",
                                                                                   "schema": SCHEMAS[n]}})
                for n in names}
    plain = [f"Plain question number {i}" for i in range(3)]
    alone_plain = [_answer(_submit(engine, q)) for q in plain]
    alone_greedy = _answer(_submit(engine, "JSON please", grammars["nested"]))
    batch = {n: _submit(engine, "JSON please", grammars[n], seed=None if n == "nested" else k)
             for k, n in enumerate(names)}
    together = [_submit(engine, q) for q in plain]
    assert [_answer(c) for c in together] == alone_plain
    for name, c in batch.items():
        text, finish = _answer(c)
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert _answer(batch["nested"]) == alone_greedy  # a greedy constrained row answers as alone
    assert engine.failed is None and engine.runner.use_graphs and len(engine.runner.graphs)
    assert engine.chooser.masks is not None and engine.chooser.masks.buffer.is_pinned()
