"""The serving engine alone (no HTTP, no image decoding): random 11B weights on one GPU, one 4-tile image per
request, closed-loop clients at several concurrencies.

    PYTHONPATH=src python bench/engine_bench.py --assets DIR_WITH_TOKENIZER_FILES [--out DIR]

Separates what the BatchEngine does (prefill groups, graph decode steps, sampling, detokenising) from what the
HTTP server adds (request parsing, image decoding, streaming). Prints prefill time per group size, decode step
time per batch size, and requests/s, output tok/s, TTFT p50/p99 and per-token latency p50/p99 per level.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def request_inputs(assets: str, tiny: str | None = None):
    import load_server

    from mllama.processing.image_io import load_image
    from mllama.processing.processor import AutoProcessor

    if tiny:
        folder = Path(tiny)
        processor = AutoProcessor.from_pretrained(str(folder))
        return _prompt(processor, load_image(load_server._image_url(112)))
    folder = Path(tempfile.mkdtemp())
    for f in Path(assets).iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 560, "width": 560}, "max_image_tiles": 4,
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_pad": True,
        "resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    processor = AutoProcessor.from_pretrained(str(folder))
    return _prompt(processor, load_image(load_server._image_url(1120)))


def _prompt(processor, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=prompt, images=[image], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    inputs = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")}
    return processor, ids, inputs


def run_level(engine, ids, inputs, concurrency: int, requests: int, max_tokens: int) -> dict:
    from load_server import _percentile as percentile

    from mllama.engine.batch import sampling_params
    from mllama.engine.requests import GenerationRequest

    params = sampling_params(engine, max_tokens, 0.0, None)
    ttft, itl, tokens = [], [], [0]
    lock = threading.Condition()
    state = {"started": 0, "done": 0}

    def submit():
        start = time.perf_counter()
        last = [None]

        def emit(event):
            now = time.perf_counter()
            if event.token_ids:
                if last[0] is None:
                    ttft.append(now - start)
                else:
                    itl.append((now - last[0]) / len(event.token_ids))
                last[0] = now
            if event.finish_reason or event.error:
                with lock:
                    tokens[0] += event.completion_tokens
                    state["done"] += 1
                    lock.notify()
        state["started"] += 1
        engine.submit(GenerationRequest(prompt_ids=list(ids), params=params, model_inputs=dict(inputs), emit=emit))

    t0 = time.perf_counter()
    with lock:
        for _ in range(min(concurrency, requests)):
            submit()
        while state["done"] < requests:
            lock.wait(timeout=1)
            while state["started"] < requests and state["started"] - state["done"] < concurrency:
                submit()
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "seconds": elapsed,
            "requests_per_s": requests / elapsed, "output_tok_s": tokens[0] / elapsed,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--levels", default="1x8x128,8x32x128,64x128x128,64x128x512,128x256x128",
                    help="CONCURRENCYxREQUESTSxMAX_TOKENS, comma-separated")
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--max-prefill-batch", type=int, default=4)
    ap.add_argument("--tiny", help="a tiny checkpoint folder (mllama create-tiny): a CPU smoke run of this script")
    args = ap.parse_args(argv)
    from gpu_bench import build_ours

    from mllama import MllamaConfig
    from mllama.engine.batch import BatchEngine, sampling_params
    from mllama.engine.requests import GenerationRequest

    processor, ids, inputs = request_inputs(args.assets, args.tiny)
    if args.tiny:
        from mllama import MllamaForConditionalGeneration
        model = MllamaForConditionalGeneration.from_pretrained(args.tiny, device_map="cpu").eval()
    else:
        model = build_ours(MllamaConfig.llama_3_2_11b())
    model.generation_config.update(do_sample=False, eos_token_id=[128001, 128008, 128009])
    engine = BatchEngine(model, processor.tokenizer, max_batch=args.max_batch, max_queue=4096, max_model_len=1024,
                         max_images=1, max_prefill_batch=args.max_prefill_batch)
    t0 = time.perf_counter()
    engine.start()
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "prompt_tokens": len(ids),
              "engine_start_s": time.perf_counter() - t0, "warm_up_s": engine.warm_up_seconds}
    print(result, flush=True)
    # prefill cost per group size, measured on the engine's own path (slots are released afterwards)
    timings = {}
    for size in (1, 2, 4, 8):
        if size > args.max_prefill_batch and size != 8:
            continue
        per = []
        for _ in range(3):
            reqs = [GenerationRequest(prompt_ids=list(ids), params=sampling_params(engine, 4, 0.0, None),
                                      model_inputs=dict(inputs), emit=lambda e: None) for _ in range(size)]
            with engine.scheduler.lock:  # the engine thread is idle (no requests): borrow its prefill
                for r in reqs:  # what submit and admission do first: images described, pages taken
                    r.images = engine.describe_images(r.model_inputs)
                    assert engine._reserve(r)
                sync()
                s = time.perf_counter()
                engine._prefill(list(zip(reqs, range(size))))
                sync()
                per.append(time.perf_counter() - s)
                for slot in range(size):
                    engine._free(slot)
        timings[size] = statistics.median(per[1:])
        print(f"prefill group of {size}: {timings[size] * 1e3:.1f} ms", flush=True)
    result["prefill_group_s"] = timings
    levels = []
    for spec in args.levels.split(","):
        c, n, t = map(int, spec.split("x"))
        steps0, busy0 = engine.steps, dict(engine.busy)
        r = run_level(engine, ids, inputs, c, n, t)
        r["decode_steps"] = engine.steps - steps0
        r["engine_busy_s"] = {k: v - busy0.get(k, 0.0) for k, v in engine.busy.items()}
        print("  engine thread busy (s):", {k: round(v, 2) for k, v in r["engine_busy_s"].items()},
              f"decode per step {r['engine_busy_s'].get('decode', 0) / max(1, r['decode_steps']) * 1e3:.1f} ms",
              flush=True)
        levels.append(r)
        fmt = lambda v: f"{v * 1e3:8.1f}" if v is not None else "       -"  # noqa: E731
        print(f"c={c:4d} n={n:4d} max_tokens={t:4d}: {r['requests_per_s']:6.2f} req/s {r['output_tok_s']:8.1f} tok/s "
              f"ttft p50/p99 {fmt(r['ttft_p50_s'])}/{fmt(r['ttft_p99_s'])} ms itl p50/p99 {fmt(r['itl_p50_s'])}/"
              f"{fmt(r['itl_p99_s'])} ms, {r['decode_steps']} steps", flush=True)
    result["levels"] = levels
    if torch.cuda.is_available():  # one decode step of the graph runner per batch size (free rows: scratch pages)
        steps = {}
        vision = True
        for n in (1, 8, 32, 64, 128):
            if n > engine.max_batch:
                continue
            with engine.scheduler.lock:
                for _ in range(3):
                    engine.runner([0] * n, [400] * n, vision)
                sync()
                s = time.perf_counter()
                for _ in range(10):
                    engine.runner([0] * n, [400] * n, vision).argmax(-1).tolist()
                steps[n] = (time.perf_counter() - s) / 10
        result["decode_step_s"] = steps
        print("decode step ms by batch:", {n: round(v * 1e3, 2) for n, v in steps.items()}, flush=True)
    result["graphs"] = len(engine.runner.graphs)
    result["compile_error"] = engine.runner.compile_error
    engine.stop(0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "engine-bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
