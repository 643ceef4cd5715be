"""The batch engine's prefill on its own (CPU, fp32): rounded-up widths are exact, and the start-up warm-up covers
every tile count and leaves no trace."""
from __future__ import annotations

import pytest
import torch

from mllama.engine.batch import BatchEngine
from mllama.engine.requests import GenerationRequest
from mllama.generation import SamplingParams
from waiting import GUARD, wait_until


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    return model, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _admitted(engine: BatchEngine, request: GenerationRequest) -> GenerationRequest:
    """What submit and admission do before a prefill: the images described, the pages taken."""
    request.images = engine.describe_images(request.model_inputs)
    assert engine._reserve(request)
    return request


def _prefill_logits(engine: BatchEngine, request: GenerationRequest, keep_slot: bool = False):
    """-> (the prefill's logits, the slot's self-attention keys as its pages hold them)."""
    seen = []
    engine._sample_and_emit = lambda requests, logits: seen.append(logits.clone())
    engine._prefill([(_admitted(engine, request), 0)])
    slot_keys = [k.clone() for k in engine.caches.prompt_keys(request.holding.self_pages, request.length).values()]
    if not keep_slot:
        engine._free(0)
    return seen[0], slot_keys


def test_rounded_prefill_width_is_exact(loaded):
    model, processor = loaded
    import PIL.Image

    image = PIL.Image.new("RGB", (40, 30), (200, 30, 90))
    inputs = processor(images=[[image]], text=["<|image|>A picture of a red thing, described"], return_tensors="pt")
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    results = []
    for width in (1, 64):  # 1: no padding; 64: every prompt left-padded to a multiple of 64
        engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128)
        engine.prefiller.width = width
        request = GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=1, do_sample=False),
                                    model_inputs=dict(inputs), emit=lambda event: None)
        results.append(_prefill_logits(engine, request))
    (logits_a, keys_a), (logits_b, keys_b) = results
    assert len(ids) % 64 != 0
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(keys_a, keys_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_warm_up_prefills_every_tile_count_and_leaves_no_trace(loaded):
    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=128, max_prefill_batch=3)
    vision = model.config.vision_config
    kept, bound = [], {}
    original, original_bind = engine._prefill, engine.caches.bind_row

    def bind_row(slot, holding, visible_pages, row_mask):  # vision tokens each slot's decode steps see
        bound[slot] = len(visible_pages) * engine.caches.tile_tokens
        original_bind(slot, holding, visible_pages, row_mask)

    def recording(group):
        original(group)
        kept.append((len(group), [bound[slot] for _, slot in group]))

    engine.caches.bind_row = bind_row

    engine._prefill = recording
    engine._warm_up_prefill()
    # text only, then one image with 1..max tiles: the vision keys kept are exactly those tiles' tokens; then groups
    # of 2..max_prefill_batch requests, text-only and with the most tiles, in slots 0..rows-1
    most = vision.max_num_tiles * vision.num_patches
    assert kept == [(1, [0])] + [(1, [t * vision.num_patches]) for t in range(1, vision.max_num_tiles + 1)] + \
        [(rows, [v] * rows) for rows in (2, 3) for v in (0, most)]
    assert engine.running == 0 and not engine.outcomes and engine.tokens_generated == 0 and not engine.reserved
    pools = (engine.caches.self_allocator, engine.caches.images.allocator)
    assert all(pool.free == pool.total for pool in pools) and not engine.caches.images.entries  # no page kept
    assert engine.ttft.count == 0


def test_engine_thread_failure_fails_every_request_and_refuses_new_ones(loaded):
    """A failure inside the loop (a CUDA error, say) must not leave requests waiting forever: each gets an error
    event, the engine refuses new requests, and on_failure (the server process exits on it) is called."""
    import threading

    from mllama.engine.scheduler import EngineStopped

    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=1, max_model_len=128)
    calls = []
    original = engine._step

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal instruction was encountered")
        original()

    engine._step = failing_step
    reasons, events, done = [], {}, threading.Event()
    engine.on_failure = reasons.append
    for i in range(2):  # one decoding, one waiting for the single slot
        def emit(event, i=i):
            events.setdefault(i, []).append(event)
            if len([e for evs in events.values() for e in evs if e.error or e.finish_reason]) == 2:
                done.set()
        engine.submit(GenerationRequest(prompt_ids=[128000, 9906, 1917], emit=emit,
                                        params=SamplingParams(max_new_tokens=50, do_sample=False)))
    engine.start()
    assert done.wait(GUARD), "a request never got its final event"
    engine.thread.join(GUARD)
    assert not engine.thread.is_alive()
    for i in range(2):
        assert "illegal instruction" in events[i][-1].error
    assert reasons and "illegal instruction" in reasons[0] and engine.outcomes["error"] == 2
    with pytest.raises(EngineStopped):
        engine.submit(GenerationRequest(prompt_ids=[128000], emit=lambda e: None,
                                        params=SamplingParams(max_new_tokens=1, do_sample=False)))


def test_group_prefill_encodes_one_request_at_a_time_between_decode_steps(loaded):
    """Without the overlapped prefill (the CUDA default), a group of image requests is encoded request by request
    with a decode step of the running batch in between; every answer still equals generate's alone."""
    import threading

    import PIL.Image

    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=16, max_model_len=256, max_prefill_batch=4,
                         overlap_prefill=False)
    steps_inside, encodes, in_prefill = [], [], [False]
    original_step, original_prefill = engine._step, engine._prefill
    inner = model.model
    original_encode = inner.encode_images
    # The text-only request's first decode step waits until every image request is queued, so the engine meets
    # them as one long queue (prefilled in groups), however the two threads are scheduled.
    all_queued = threading.Event()

    def step():
        assert all_queued.wait(GUARD), "the image requests were never all queued"
        steps_inside.append(in_prefill[0])
        original_step()

    def prefill(group):
        in_prefill[0] = True
        try:
            original_prefill(group)
        finally:
            in_prefill[0] = False

    def encode(pixels, *args, **kwargs):
        encodes.append(pixels.shape[0])
        return original_encode(pixels, *args, **kwargs)

    engine._step, engine._prefill = step, prefill
    inner.encode_images = encode
    try:
        gen = torch.Generator().manual_seed(5)
        cases = [(processor(text=["Tell me a long story"], return_tensors="pt"), 40)]
        for i in range(12):
            pixels = (torch.rand(30 + 7 * i, 20 + 11 * i, 3, generator=gen) * 255).to(torch.uint8).numpy()
            cases.append((processor(images=[[PIL.Image.fromarray(pixels)]], text=[f"<|image|>Picture {i}"],
                                    return_tensors="pt"), 6))
        requests, outputs = _first_then_the_rest(engine, cases, all_queued)
    finally:
        all_queued.set()  # never leave the engine thread waiting
        engine.stop(0)
        inner.encode_images = original_encode
    assert set(encodes) == {1}  # one request's images per encoder call
    assert any(steps_inside)  # decode steps ran between the images of a group
    _each_equals_generate(model, requests, outputs)


def _first_then_the_rest(engine: BatchEngine, cases: list, all_queued) -> tuple[list, dict]:
    """Submits cases[0] and starts the engine; once that request has its slot, submits the rest and sets
    `all_queued` (which the caller's wrapped first decode step waits for). Returns (ids, inputs, n) per case and
    each case's generated ids, once every request has ended without an error."""
    import threading

    outputs, done, requests = {}, threading.Event(), []
    for index, (inputs, n) in enumerate(cases):
        inputs = dict(inputs)
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)

        def emit(event, index=index):
            outputs.setdefault(index, []).extend(event.token_ids)
            if event.finish_reason or event.error:
                outputs.setdefault("done", []).append(event.error)
                if len(outputs["done"]) == len(cases):
                    done.set()
        requests.append((ids, inputs, n))
        engine.submit(GenerationRequest(prompt_ids=ids, model_inputs=inputs, emit=emit,
                                        params=SamplingParams(max_new_tokens=n, do_sample=False)))
        if index == 0:
            engine.start()
            wait_until(lambda: engine.running, "the first request to take its slot", poll=0.001)
    all_queued.set()
    assert done.wait(GUARD), "a request never got its final event"
    assert not any(outputs["done"])
    return requests, outputs


def _each_equals_generate(model, requests: list, outputs: dict) -> None:
    for index, (ids, inputs, n) in enumerate(requests):
        want = model.generate(input_ids=torch.tensor([ids]), **inputs, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, fast=False)[0, len(ids):].tolist()
        assert outputs[index][:n] == want, index


def test_prefill_through_the_static_graph_path_equals_the_plain_prefill(loaded, monkeypatch):
    """fast.PrefillGraphs (run eagerly here: the same static inputs, ids_checked forward and cache it hands back
    as the CUDA graph replays) gives the same logits and slot caches as the plain prefill, with and without an
    image; a text prompt with an id outside the table is still refused before anything runs."""
    from mllama.engine.fast import PrefillGraphs

    model, processor = loaded
    import PIL.Image

    image = PIL.Image.new("RGB", (50, 20), (20, 130, 90))
    with_image = processor(images=[[image]], text=["<|image|>What is it? It is"], return_tensors="pt")
    text_only = processor(text=["A text prompt without any image at all"], return_tensors="pt")
    for inputs in (with_image, text_only):
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        results = []
        for graphs in (None, PrefillGraphs(model, use_graphs=False)):
            engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128)
            engine.prefill_graphs = graphs
            request = GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=1, do_sample=False),
                                        model_inputs=dict(inputs), emit=lambda event: None)
            logits, keys = _prefill_logits(engine, request, keep_slot=True)
            tiles = [page for _, entry in request.holding.images for page in entry.pages]
            cross = list(engine.caches.gather_tiles(tiles)[0].values()) if tiles else []
            engine._free(0)
            results.append((logits, keys, cross))
        (logits_a, keys_a, cross_a), (logits_b, keys_b, cross_b) = results
        torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
        for a, b in zip(keys_a + cross_a, keys_b + cross_b):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert bool(cross_a) == ("pixel_values" in inputs)  # vision K/V with the image
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128)
    engine.prefill_graphs = PrefillGraphs(model, use_graphs=False)
    for module in ("mllama.engine.fast", "mllama.engine.prefill"):
        monkeypatch.setattr(f"{module}.text_prefill", lambda *a, **k: pytest.fail("the forward ran with a bad id"))
    bad = GenerationRequest(prompt_ids=[1, 2, model.model.language_model.embed_tokens.num_embeddings + 3],
                            params=SamplingParams(max_new_tokens=1, do_sample=False), emit=lambda event: None)
    with pytest.raises(ValueError, match="outside the embedding table"):
        engine._prefill([(_admitted(engine, bad), 0)])


def test_steps_read_one_step_late_stay_exact_and_never_run_past_a_request(loaded):
    """Steps are read by the host one step late: the next step takes its tokens from the device, a sampled
    row's too (its choice is queued behind its step); every answer equals generate's alone, including a request
    that ends on an end token the engine could not foresee (its row, computed once more, is ignored and its slot
    reused by a waiting request meanwhile). No row is ever run for a token after its request's last one."""
    import threading

    import PIL.Image

    model, processor = loaded
    gen = torch.Generator().manual_seed(11)
    pixels = (torch.rand(40, 60, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image_inputs = processor(images=[[PIL.Image.fromarray(pixels)]], text=["<|image|>Describe it"],
                             return_tensors="pt")
    cases = [  # (inputs, max_new_tokens, sampling options); three slots, so the last four wait for one
        (processor(text=["Once upon a time"], return_tensors="pt"), 20, {}),
        (processor(text=["This one meets an end token early"], return_tensors="pt"), 30, {}),
        (processor(text=["Short"], return_tensors="pt"), 3, {}),
        (processor(text=["Waiting for a slot"], return_tensors="pt"), 12, {}),
        (processor(text=["Waiting too, and long"], return_tensors="pt"), 9, {}),
        (image_inputs, 17, {}),
        (processor(text=["A sampled answer"], return_tensors="pt"), 8, {"temperature": 0.9, "seed": 7}),
    ]
    prepared, full = [], []
    for inputs, n, options in cases:
        inputs = dict(inputs)
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        sample = {"do_sample": True, "temperature": options["temperature"], "seed": options["seed"]} if options \
            else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), **inputs, max_new_tokens=n, min_new_tokens=n,
                                 fast=False, **sample)[0, len(ids):].tolist()
        prepared.append((ids, inputs, n, options))
        full.append(out)
    # an end token the second request meets at its fourth token, not before
    end = next(t for i, t in enumerate(full[1]) if i >= 3 and t not in full[1][:i])
    expected = [out[:out.index(end) + 1] if end in out else out for out in full]
    assert len(expected[1]) < len(full[1])

    engine = BatchEngine(model, processor.tokenizer, max_batch=3, max_model_len=128)
    engine.eos = (end,)
    calls, reused = [], []
    original_land = engine._land

    def land(step):  # requests of a step read late whose slot another request has taken since
        reused.extend(r for r in step.requests if engine.slots[r.slot] not in (None, r))
        return original_land(step)

    engine._land = land

    class Recording:  # the engine's runner, recording each step's rows
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, tokens, positions, vision, from_host=None):
            live = {r.slot: r for r in engine.slots if r is not None}
            calls.append([(live[row], positions[row], from_host[row]) for row in range(len(tokens)) if row in live])
            return self.inner(tokens, positions, vision, from_host)

    engine.runner = Recording(engine.runner)
    outputs, finished, done, fed = {}, {}, threading.Event(), []
    for index, (ids, inputs, n, options) in enumerate(prepared):
        def emit(event, index=index):
            assert event.error is None, event.error
            outputs.setdefault(index, []).extend(event.token_ids)
            if cases[index][2]:  # the sampled request: (its last token's index, the last position it has fed)
                fed.append((len(outputs[index]) - 1, max((pos for call in calls for r, pos, _ in call
                                                          if r.prompt_ids == prepared[index][0]), default=-1)))
            if event.finish_reason:
                finished[index] = event.finish_reason
                if len(finished) == len(prepared):
                    done.set()
        params = SamplingParams(max_new_tokens=n, do_sample=bool(options), temperature=options.get("temperature", 1.0))
        engine.submit(GenerationRequest(prompt_ids=ids, model_inputs=inputs, emit=emit, params=params,
                                        seed=options.get("seed")))
    engine.start()
    try:
        assert done.wait(GUARD), "a request never got its final event"
    finally:
        engine.stop(0)
    for index, want in enumerate(expected):
        assert outputs[index] == want, index
    assert finished[1] == "stop" and finished[2] == "length"
    assert cases[1][0]["input_ids"][0].tolist() in [r.prompt_ids for r in reused]  # the unforeseen end, reused
    rows = [row for call in calls for row in call]
    assert any(not given for _, _, given in rows)  # some rows took the previous step's token on the device
    for r, position, _ in rows:  # the last token a request feeds is its (max_new_tokens - 1)-th, at this position
        assert position <= len(r.prompt_ids) + r.params.max_new_tokens - 2
    sampled = [given for r, _, given in rows if r.params.do_sample]
    assert sampled and not all(sampled)  # a sampled row's token, chosen behind its step, stays on the device too
    length, n = len(prepared[-1][0]), prepared[-1][2]
    # each sampled token (but the prefill's and the last) was sent after the step it feeds was queued
    late = [(j, position) for j, position in fed if 1 <= j <= n - 2]
    assert late and all(position == length + j for j, position in late), fed


def test_requests_arriving_while_others_decode_are_batched_and_overlapped(loaded):
    """What the server's 32-request test used to assert from timing, with the order fixed: a text request takes
    its slot, its first decode step waits until the rest are queued, then image requests meet a running batch
    (their vision part beside the decode steps: the CPU default) and everything decodes in shared steps."""
    import threading

    import PIL.Image

    model, processor = loaded
    engine = BatchEngine(model, processor.tokenizer, max_batch=8, max_model_len=256)
    assert engine.overlap_prefill  # the default on CPU
    all_queued, original_step = threading.Event(), engine._step

    def step():
        assert all_queued.wait(GUARD), "the requests were never all queued"
        original_step()

    engine._step = step
    gen = torch.Generator().manual_seed(9)
    cases = [(processor(text=["Tell me a long story"], return_tensors="pt"), 30)]
    for i in range(7):
        if i % 2:
            pixels = (torch.rand(25 + 5 * i, 30, 3, generator=gen) * 255).to(torch.uint8).numpy()
            inputs = processor(images=[[PIL.Image.fromarray(pixels)]], text=[f"<|image|>Picture {i}"],
                               return_tensors="pt")
        else:
            inputs = processor(text=[f"Text {i}, a little longer"], return_tensors="pt")
        cases.append((inputs, 6 + i))
    try:
        requests, outputs = _first_then_the_rest(engine, cases, all_queued)
    finally:
        all_queued.set()
        engine.stop(0)
    tokens = sum(n for _, _, n in requests)
    assert engine.steps < tokens * 0.6  # shared steps: 30 of the 93 tokens are the longest request's
    assert engine.overlapped > 0
    _each_equals_generate(model, requests, outputs)


@pytest.mark.parametrize("with_image", [False, True])
def test_choices_of_one_prompt_are_prefilled_once_and_each_samples_as_alone(loaded, with_image):
    """n choices of a prompt (submit_many with one `share`): one prefill row for them all (the engine counts the
    others as shared), while a request with another prompt in the same queue keeps its own; each choice samples
    with its own seed what generate gives alone, and a greedy choice among them answers greedily."""
    import threading

    import PIL.Image

    model, processor = loaded
    if with_image:
        pixels = (torch.rand(30, 45, 3, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8).numpy()
        inputs = dict(processor(images=[[PIL.Image.fromarray(pixels)]], text=["<|image|>Several takes on it"],
                                return_tensors="pt"))
    else:
        inputs = dict(processor(text=["Several takes on one prompt"], return_tensors="pt"))
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    other = processor.tokenizer("Something else entirely", add_special_tokens=True)["input_ids"]
    engine = BatchEngine(model, processor.tokenizer, max_batch=6, max_model_len=128).start()
    seeds = [11, 12, None, 13]
    outputs, done = {}, threading.Semaphore(0)

    def emit_for(key):
        def emit(event):
            assert event.error is None, event.error
            outputs.setdefault(key, []).extend(event.token_ids)
            if event.finish_reason:
                done.release()
        return emit

    def request(key, prompt, seed, share, model_inputs):
        params = SamplingParams(max_new_tokens=8, do_sample=seed is not None, temperature=1.2)
        return GenerationRequest(prompt_ids=prompt, params=params, model_inputs=model_inputs, emit=emit_for(key),
                                 seed=seed, share=share)

    try:
        engine.submit_many([request(j, ids, seed, "p", inputs) for j, seed in enumerate(seeds)]
                           + [request("other", other, None, None, {})])
        for _ in range(len(seeds) + 1):
            assert done.acquire(timeout=GUARD), "a request never ended"
    finally:
        engine.stop(0)
    assert engine.stats()["shared_prefills"] == len(seeds) - 1
    for j, seed in enumerate(seeds):
        sample = {"do_sample": True, "temperature": 1.2, "seed": seed} if seed is not None else {"do_sample": False}
        with torch.no_grad():
            alone = model.generate(input_ids=torch.tensor([ids]), **inputs, max_new_tokens=8, min_new_tokens=8,
                                   fast=False, **sample)[0, len(ids):].tolist()
        assert outputs[j] == alone[:len(outputs[j])] and len(outputs[j]) >= 1, j
    assert len({tuple(outputs[j]) for j in range(len(seeds))}) > 2  # the seeds differ in what they sample
