"""On CUDA: generate's fast path (fused projections, CUDA graphs) against the plain model, and the serving engine
(compiled layer functions, decode and prefill graphs) against generate alone, with failing requests beside good
ones. Tiny models in float32, so that equality is exact up to kernel choice."""
from __future__ import annotations

import pytest
import torch

from collecting import Collector
from faults import fail_marked_sampling
from conftest import randomize, tiny_config
from test_generation import GEN_CASES
from test_parity import make_inputs
from mllama import MllamaForConditionalGeneration
from mllama.engine.batch import BatchEngine
from mllama.engine.requests import GenerationRequest
from mllama.generation import SamplingParams

DEVICE = "cuda"


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=21, std=0.15).eval().to(DEVICE)


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_fast_path_tokens_and_scores_equal_plain(model, case):
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(*GEN_CASES[case], 28).items()}
    kw = dict(max_new_tokens=16, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    plain = model.generate(**inputs, fast=False, **kw)
    fast = model.generate(**inputs, fast=True, **kw)
    assert torch.equal(plain.sequences, fast.sequences)
    assert len(fast.scores) == len(plain.scores) == 16
    for a, b in zip(plain.scores + plain.logits, fast.scores + fast.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor

    m = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                       device_map=DEVICE).eval()
    return m, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _request(processor, text: str, image=None) -> tuple[list[int], dict]:
    if image is None:
        return processor.tokenizer(text, add_special_tokens=True)["input_ids"], {}
    inputs = processor(images=[[image]], text=[f"<|image|>{text}"], return_tensors="pt")
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    return ids, dict(inputs)


def _alone(model, ids, inputs, max_new_tokens) -> list[int]:
    given = {k: v.to(DEVICE) for k, v in inputs.items()}
    out = model.generate(input_ids=torch.tensor([ids], device=DEVICE), max_new_tokens=max_new_tokens,
                         do_sample=False, fast=False, eos_token_id=None, **given)
    return out[0, len(ids):].tolist()


def _graph_engine(model, processor) -> BatchEngine:
    """A started engine on CUDA graphs whose requests all run to max_tokens (no end token), so that the answers
    compare token for token."""
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=256, use_graphs=True,
                         pages=(64, 64))
    engine.eos = ()
    return engine.start()


def test_engine_on_graphs_equals_generate_and_failures_stay_alone(served, monkeypatch):
    import PIL.Image

    model, processor = served
    fail_marked_sampling(monkeypatch)  # the request with top_p 0.5
    engine = _graph_engine(model, processor)
    try:
        image = PIL.Image.new("RGB", (50, 40), (10, 200, 30))
        cases = [_request(processor, "Plain text first"), _request(processor, "An image here", image),
                 _request(processor, "A longer text prompt, with more words in it than the first"),
                 _request(processor, "Tiny temperature")]
        good, collectors = [], []
        for k, (ids, inputs) in enumerate(cases):
            c = Collector()
            params = SamplingParams(max_new_tokens=12, do_sample=k == 3, temperature=2e-39 if k == 3 else 1.0)
            engine.submit(GenerationRequest(prompt_ids=ids, params=params, model_inputs=inputs, emit=c))
            good.append((c, ids, inputs))
        ids, inputs = cases[0]
        sampled, broken = Collector(), Collector(fail_on=3)
        engine.submit(GenerationRequest(prompt_ids=ids, emit=sampled, seed=1,
                                        params=SamplingParams(max_new_tokens=12, do_sample=True, top_p=0.5)))
        engine.submit(GenerationRequest(prompt_ids=ids, emit=broken, params=SamplingParams(max_new_tokens=12)))
        for c in [c for c, _, _ in good] + [sampled, broken]:
            assert c.done.wait(300), "a request never got its final event"
        for c, ids, inputs in good:
            assert c.events[-1].error is None and c.ids == _alone(model, ids, inputs, 12)
        assert "sampling failed" in sampled.events[-1].error and "RuntimeError" in broken.events[-1].error
        assert engine.failed is None and engine.runner.use_graphs
        # the decode step ran compiled and captured (a failure falls back to eager kernels with a warning)
        assert engine.runner.compile_error is None and engine.runner.calls.compiled
        assert engine.runner.graphs.failed is None and len(engine.runner.graphs)
    finally:
        engine.stop()


def test_choices_sharing_a_prefill_on_graphs_answer_as_alone(served):
    """The n choices of one prompt with an image (submit_many, one `share`): one prefill, its K/V bound to each
    choice's slot, then decoded on the graphs: greedy choices give generate's tokens alone, sampled ones run
    beside them, and the engine counts the shared prefills."""
    import PIL.Image

    model, processor = served
    engine = _graph_engine(model, processor)
    try:
        ids, inputs = _request(processor, "Four takes on this", PIL.Image.new("RGB", (40, 70), (90, 20, 200)))
        collectors = [Collector() for _ in range(4)]
        engine.submit_many([GenerationRequest(prompt_ids=ids, model_inputs=inputs, emit=c, share="one", seed=j,
                                              params=SamplingParams(max_new_tokens=12, do_sample=j >= 2))
                            for j, c in enumerate(collectors)])
        for c in collectors:
            assert c.done.wait(300), "a request never got its final event"
            assert c.events[-1].error is None, c.events[-1].error
        alone = _alone(model, ids, inputs, 12)
        assert collectors[0].ids == collectors[1].ids == alone and len(collectors[2].ids) == 12
        assert engine.stats()["shared_prefills"] == 3 and engine.failed is None
    finally:
        engine.stop()


def test_engine_image_cache_on_graphs(served):
    """A repeated image's K/V come from its pages (no encoder run), through the paged decode graphs: the same
    tokens as generate alone, before and after."""
    import PIL.Image

    model, processor = served
    engine = _graph_engine(model, processor)
    try:
        image = PIL.Image.new("RGB", (60, 30), (200, 20, 30))
        first, again = _request(processor, "What is it?", image), _request(processor, "What is it? Say more.", image)
        outputs = []
        for ids, inputs in (first, again):
            c = Collector()
            engine.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=10),
                                            model_inputs=inputs, emit=c))
            assert c.done.wait(300), "a request never got its final event"
            outputs.append(c)
        assert engine.stats()["image_cache"]["hits"] == 1
        # the repeat's text part was replayed as a graph of its own (the images' K/V as inputs)
        assert engine.prefill_graphs.failed is None
        assert any(key[0] for key in engine.prefill_graphs.graphs.graphs), "no prefill graph took cached K/V"
    finally:
        engine.stop()
    for c, (ids, inputs) in zip(outputs, (first, again)):
        assert c.events[-1].error is None and c.ids == _alone(model, ids, inputs, 10)


def test_vision_and_prefill_graphs_equal_their_eager_forms(served):
    from mllama.engine.fast import PrefillGraphs, VisionGraphs, text_prefill
    import PIL.Image

    model, processor = served
    image = PIL.Image.new("RGB", (70, 40), (20, 20, 230))
    inputs = {k: v.to(DEVICE) for k, v in processor(images=[[image]], text=["<|image|>Hi"],
                                                     return_tensors="pt").items()}
    pixels, ratio_ids, ratio_mask = inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
    with torch.no_grad():
        eager = model.model.vision_model(pixels, ratio_ids, ratio_mask).last_hidden_state
        graphs = VisionGraphs(model.model.vision_model, use_graphs=True)
        for _ in range(2):  # capture, then replay
            torch.testing.assert_close(graphs(pixels, ratio_ids, ratio_mask).last_hidden_state, eager,
                                       rtol=1e-4, atol=1e-4)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = model.model.kept_tiles(inputs["cross_attention_mask"], pixels)
        states = model.model.encode_images(pixels, ratio_ids, ratio_mask, keep)
        given = (ids, mask, positions, inputs["cross_attention_mask"], states, keep)
        logits, cache = text_prefill(model, *given)
        prefill = PrefillGraphs(model)
        for _ in range(2):
            replayed, replayed_cache = prefill(*given)
            assert prefill.failed is None
            torch.testing.assert_close(replayed, logits, rtol=1e-4, atol=1e-4)
            for i in cache.key:
                torch.testing.assert_close(replayed_cache.key[i], cache.key[i], rtol=1e-4, atol=1e-4)
        # a cached image's turn: the images' K/V given (as the engine's image cache gives them), not the states
        cross = ({i: t.clone() for i, t in cache.cross_key.items()},
                 {i: t.clone() for i, t in cache.cross_value.items()}, keep)
        longer = torch.cat([ids, ids[:, -3:]], dim=1), torch.cat([mask, mask[:, -3:]], dim=1)
        positions = (longer[1].cumsum(-1) - 1).clamp(min=0)
        cross_mask = torch.cat([inputs["cross_attention_mask"], inputs["cross_attention_mask"][:, -3:]], dim=1)
        eager_logits, eager_cache = text_prefill(model, *longer, positions, cross_mask, cross=cross)
        for _ in range(2):
            replayed, replayed_cache = prefill(*longer, positions, cross_mask, cross=cross)
            assert prefill.failed is None and len(prefill.graphs) == 2
            torch.testing.assert_close(replayed, eager_logits, rtol=1e-4, atol=1e-4)
            for i in eager_cache.key:
                torch.testing.assert_close(replayed_cache.key[i], eager_cache.key[i], rtol=1e-4, atol=1e-4)
