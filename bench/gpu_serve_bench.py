"""`mllama serve` on one GPU with random 11B weights, driven by bench/load_server.py at several concurrencies.

    PYTHONPATH=src python bench/gpu_serve_bench.py --assets DIR_WITH_TOKENIZER_FILES --out DIR

Writes a random bf16 11B checkpoint (with the given tokenizer files and a 560-px preprocessor config), starts the
server on 127.0.0.1, runs the load generator (one 4-tile image per request) and stops the server with SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def check_overlapped_prefill(assets: str, device: str = "cuda", overlap: bool = True) -> dict:
    """The engine on a tiny fp32 checkpoint with CUDA graphs: a text-only request decodes while 13 image requests
    arrive, prefilled in groups (more than 8 wait), with `overlap` their vision part on the side stream beside
    decode steps; every request's greedy tokens must equal what generate() gives for it alone with the plain
    model."""
    import tempfile

    import PIL.Image

    from mllama.cli import create_tiny
    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = create_tiny(tempfile.mkdtemp(), assets)
    model = MllamaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                           device_map=device).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    engine = BatchEngine(model, processor.tokenizer, max_batch=16, max_model_len=512, overlap_prefill=overlap,
                         pages=(16 * 8 + 1, 16 * 4 + 1)).start()
    gen = torch.Generator().manual_seed(0)
    cases = [("Tell me a long story about the sea.", None, 48)]
    for i in range(13):  # more than 8 waiting: prefill groups of 4 images, as at concurrency 32 on the 11B
        pixels = (torch.rand(40 + 9 * i, 30 + 13 * i, 3, generator=gen) * 255).to(torch.uint8).numpy()
        cases.append((f"Describe picture {i}.", PIL.Image.fromarray(pixels), 12))
    done, outputs, requests = threading.Event(), {}, []
    for index, (text, image, n) in enumerate(cases):
        if image is None:
            inputs = processor(text=[text], return_tensors="pt")
        else:
            inputs = processor(images=[[image]], text=[f"<|image|>{text}"], return_tensors="pt")
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)

        def emit(event, index=index):
            outputs.setdefault(index, []).extend(event.token_ids)
            if event.finish_reason or event.error:
                outputs.setdefault("finished", []).append((index, event.finish_reason, event.error))
                if len(outputs["finished"]) == len(cases):
                    done.set()

        requests.append((ids, dict(inputs), n))
        engine.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=n, do_sample=False),
                                        model_inputs=dict(inputs), emit=emit))
        if index == 0:
            time.sleep(0.05)  # the text-only one is decoding when the images arrive
    done.wait(120)
    engine.stop(0)
    equal = 0
    for index, (ids, inputs, n) in enumerate(requests):
        want = model.generate(input_ids=torch.tensor([ids]), **inputs, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, fast=False)[0, len(ids):].tolist()
        equal += outputs.get(index, [])[:n] == want
    graphs = engine.prefill_graphs
    return {"requests": len(requests), "equal_to_generate": equal, "overlapped_prefills": engine.overlapped,
            "prefill_graphs": len(graphs.graphs) if graphs is not None else None,
            "prefill_graphs_failed": graphs.failed if graphs is not None else None,
            "errors": [f for f in outputs.get("finished", []) if f[2]],
            "ok": equal == len(requests) and (engine.overlapped > 0 or not overlap)}


def one_image_request(folder: Path, seed: int):
    """(processor, prompt ids, model inputs) of a chat request with one random 1120x1120 image (4 tiles)."""
    import PIL.Image

    from mllama.processing.processor import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    pixels = (torch.rand(1120, 1120, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}], add_generation_prompt=True)
    inputs = processor(images=[[PIL.Image.fromarray(pixels.numpy())]], text=[prompt], return_tensors="pt")
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return processor, ids, dict(inputs)


def profile_engine_prefill(model, folder: Path, requests: int = 6) -> dict:
    """Where a one-image request's time to first token goes inside the engine (no HTTP, no pipes): the 11B in
    this process, one 1120x1120 image and a short chat prompt, requests one after another; then the same with
    each prefill phase timed between device synchronisations, and one request under the profiler."""
    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams

    processor, ids, inputs = one_image_request(folder, seed=0)
    t0 = time.perf_counter()
    engine = BatchEngine(model, processor.tokenizer, max_batch=8, max_model_len=1024, max_images=1).start()
    warm_up = time.perf_counter() - t0

    def one() -> float:
        first = threading.Event()
        start = time.perf_counter()
        engine.submit(GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=2, do_sample=False),
                                        model_inputs=dict(inputs), emit=lambda e: first.set()))
        first.wait(60)
        took = time.perf_counter() - start
        time.sleep(0.05)  # its second token and finish
        return took

    plain = [one() for _ in range(requests)]
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*a, **k)
            torch.cuda.synchronize()
            phases.setdefault(name, []).append(time.perf_counter() - start)
            return result
        return wrapper

    for name in ("_prepare", "_encode", "_complete", "_sample_and_emit"):
        setattr(engine, name, timed(name, getattr(engine, name)))
    synced = [one() for _ in range(3)]
    for name in ("_prepare", "_encode", "_complete", "_sample_and_emit"):
        delattr(engine, name)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = one()
    engine.stop(0)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    table_gpu = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gpu_busy = sum(e.device_time for e in kernels) / 1e3
    result = {"warm_up_s": warm_up, "ttft_ms": [1e3 * x for x in plain],
              "ttft_synced_phases_ms": [1e3 * x for x in synced],
              "phases_ms": {k: [1e3 * x for x in v] for k, v in phases.items()},
              "profiled_ttft_ms": 1e3 * profiled, "profiled_gpu_kernel_ms": gpu_busy,
              "profiled_kernels": len(kernels), "cpu_table": table_cpu, "gpu_table": table_gpu}
    print("engine prefill profile:", json.dumps({k: v for k, v in result.items() if "table" not in k}), flush=True)
    print(table_cpu, table_gpu, sep="\n", flush=True)
    return result


def profile_engine_decode(model, folder: Path, batch: int = 64, seconds: float = 1.0) -> dict:
    """Where a decode step's time goes at a large batch, in-process: `batch` one-image requests running, then
    the engine loop profiled for about `seconds`: wall time per step against the GPU's kernel time per step."""
    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams

    processor, ids, inputs = one_image_request(folder, seed=1)
    engine = BatchEngine(model, processor.tokenizer, max_batch=batch, max_model_len=1024, max_images=1).start()
    started = threading.Semaphore(0)
    seen: set[int] = set()

    def emitter(i):
        def emit(event):
            if i not in seen:
                seen.add(i)
                started.release()
        return emit

    params = SamplingParams(max_new_tokens=900, min_new_tokens=900, do_sample=False)
    for i in range(batch):
        engine.submit(GenerationRequest(prompt_ids=ids, params=params, model_inputs=dict(inputs), emit=emitter(i)))
    for _ in range(batch):
        started.acquire(timeout=120)
    time.sleep(0.3)
    steps, t0 = engine.steps, time.perf_counter()
    time.sleep(seconds)  # without the profiler first: its tracing slows the host down
    plain_ms = 1e3 * (time.perf_counter() - t0) / max(engine.steps - steps, 1)
    from torch.profiler import ProfilerActivity, profile
    steps, busy, t0 = engine.steps, dict(engine.busy), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time.sleep(seconds)
    wall = time.perf_counter() - t0
    n = engine.steps - steps
    busy = {k: 1e3 * (engine.busy[k] - busy.get(k, 0.0)) / max(n, 1) for k in engine.busy}
    engine.stop(0)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    result = {"batch": batch, "running": len(seen), "steps": n, "unprofiled_wall_ms_per_step": plain_ms,
              "wall_ms_per_step": 1e3 * wall / max(n, 1),
              "busy_ms_per_step": busy, "gpu_kernel_ms_per_step": sum(e.device_time for e in kernels) / 1e3 / max(n, 1),
              "cpu_table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                     max_name_column_width=60),
              "gpu_table": prof.key_averages().table(sort_by="self_device_time_total", row_limit=10,
                                                     max_name_column_width=60)}
    print("engine decode profile:", json.dumps({k: v for k, v in result.items() if "table" not in k}), flush=True)
    print(result["cpu_table"], result["gpu_table"], sep="\n", flush=True)
    return result


def scrape(port: int) -> dict[str, float]:
    """/metrics as {name{labels}: value}, histogram buckets left out."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_bucket{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metrics_delta(before: dict, after: dict, seconds: float) -> dict:
    """Where a level's time went, from the server's own counters: engine loop busy time by phase (as a share of
    the level's wall time), mean latencies of the HTTP side and of the engine."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}

    def mean(name: str):
        count = d.get(f"{name}_count", 0)
        return d[f"{name}_sum"] / count if count else None

    busy = {k.split('"')[1]: v / seconds for k, v in d.items() if k.startswith("mllama_engine_busy_seconds_total")}
    return {"engine_busy_share": busy, "decode_steps": d.get("mllama_decode_steps_total"),
            "tokens": d.get("mllama_generation_tokens_total"),
            "mean_request_decode_s": mean("mllama_request_decode_seconds"),
            "mean_server_ttft_s": mean("mllama_server_time_to_first_token_seconds"),
            "mean_engine_ttft_s": mean("mllama_time_to_first_token_seconds"),
            "mean_engine_itl_s": mean("mllama_inter_token_latency_seconds"),
            "decoded_image_hits": d.get("mllama_decoded_image_hits_total"),
            "decoded_image_misses": d.get("mllama_decoded_image_misses_total"),
            "engine_image_cache_hits": d.get("mllama_image_cache_hits_total")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None, help="where the checkpoint goes (default /tmp/mllama-SIZE-random)")
    ap.add_argument("--size", choices=["11b", "90b"], default="11b")
    ap.add_argument("--dummy", action="store_true", help="write no weights: config and processor files only, "
                    "served with --load-format dummy (random weights made on the GPU as they load)")
    ap.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                    help="passed to mllama serve as it is (repeat: --server-flag=--quantize --server-flag=fp8)")
    ap.add_argument("--levels", nargs="*", type=int, default=[1, 8, 32, 64, 128])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--long-level", type=int, default=64, help="also run this level with --long-tokens")
    ap.add_argument("--long-tokens", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--max-prefill-batch", type=int, default=None, help="passed to the server (default: its own)")
    ap.add_argument("--varied-level", type=int, default=0,
                    help="also run this level with answer lengths spread by --varied-spread (load_server.py)")
    ap.add_argument("--varied-spread", type=float, default=0.5)
    ap.add_argument("--time-limit", type=float, default=45)
    ap.add_argument("--skip-checks", action="store_true", help="no graph-runner and overlapped-prefill checks")
    ap.add_argument("--overlap-prefill", action="store_true", help="serve with --overlap-prefill (experimental)")
    ap.add_argument("--profile-prefill", action="store_true", help="first profile the engine's prefill in-process")
    ap.add_argument("--profile-decode", type=int, default=0, metavar="BATCH",
                    help="first profile the engine's decode loop in-process with BATCH one-image requests running")
    ap.add_argument("--profile-only", action="store_true", help="only the in-process profiles, no server")
    ap.add_argument("--defaults", action="store_true",
                    help="serve with default flags only (`mllama serve MODEL --port P`): no --max-batch, "
                         "--max-model-len or --max-images-per-request")
    ap.add_argument("--runs", nargs="*", default=None, metavar="CONC:TOKENS:REQUESTS",
                    help="load levels to run instead of --levels/--long-level (each image distinct)")
    ap.add_argument("--multiturn", nargs="*", type=int, default=[], metavar="CONC",
                    help="also run bench/multiturn.py at these concurrencies (4-turn conversations)")
    args = ap.parse_args()
    check = overlap = "skipped (--skip-checks)"
    if not args.skip_checks:
        check = "tests/gpu/test_cuda_paths.py (the engine on graphs against generate alone)"
        overlap = {"overlapped": check_overlapped_prefill(args.assets),
                   "groups_without_overlap": check_overlapped_prefill(args.assets, overlap=False)}
        print("tiny-model engine checks:", overlap, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from gpu_bench import build_ours
    from mllama import MllamaConfig

    ckpt = Path(args.ckpt or f"/tmp/mllama-{args.size}-random")
    t0 = time.perf_counter()
    config = MllamaConfig.llama_3_2_11b() if args.size == "11b" else MllamaConfig.llama_3_2_90b()
    generation = dict(do_sample=False, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    if args.dummy:
        from fp8_bench import config_folder

        config_folder(config, ckpt)
        (ckpt / "generation_config.json").write_text(json.dumps(generation))
        model = None
        if args.profile_prefill or args.profile_decode:
            raise SystemExit("--dummy writes no weights: the in-process profiles need --size 11b without it")
    else:
        model = build_ours(config)
        model.generation_config.update(**generation)
        model.save_pretrained(ckpt)
    for name in os.listdir(args.assets):
        shutil.copy(Path(args.assets) / name, ckpt / name)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 560, "width": 560}, "max_image_tiles": 4,
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_pad": True,
        "resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    prefill_profile = profile_engine_prefill(model, ckpt) if args.profile_prefill else None
    decode_profile = profile_engine_decode(model, ckpt, args.profile_decode) if args.profile_decode else None
    if args.profile_only:
        (Path(args.out) / "engine-profiles.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
             "command": " ".join(sys.argv), "engine_prefill_profile": prefill_profile,
             "engine_decode_profile": decode_profile}, indent=1))
        return
    del model
    torch.cuda.empty_cache()
    port = 8011
    flags = ["--port", str(port), "--served-model-name", "m"] + args.server_flag
    if args.dummy:
        flags += ["--load-format", "dummy"]
    if not args.defaults:
        flags += ["--device", "cuda", "--dtype", "bfloat16", "--max-batch", str(args.max_batch), "--max-queue",
                  "1024", "--max-model-len", "1024", "--max-images-per-request", "1"]
    server = subprocess.Popen([sys.executable, "-m", "mllama.server", str(ckpt)] + flags
                              + (["--overlap-prefill"] if args.overlap_prefill else [])
                              + ([] if args.max_prefill_batch is None else
                                 ["--max-prefill-batch", str(args.max_prefill_batch)]),
                              stdout=sys.stdout, stderr=sys.stderr)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 400:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except Exception:
            if server.poll() is not None:
                raise SystemExit("server exited")
            time.sleep(1)
    startup = time.perf_counter() - t0
    print(f"server ready in {startup:.0f} s", flush=True)
    try:
        import load_server

        # enough requests at low concurrency that the first (simultaneous) round is not most of the samples
        counts = {1: 16, 8: 64}
        runs = [(level, counts.get(level, max(8, 3 * level)), args.max_tokens, args.time_limit, f"c{level}", 0.0)
                for level in args.levels]
        if args.runs is not None:
            runs = [(int(c), int(r), int(t), 2 * args.time_limit, f"c{c}-t{t}", 0.0)
                    for c, t, r in (spec.split(":") for spec in args.runs)]
        elif args.long_level:
            runs.append((args.long_level, 2 * args.long_level, args.long_tokens, 2 * args.time_limit,
                         f"c{args.long_level}-long", 0.0))
        if args.varied_level:
            level = args.varied_level
            runs.append((level, counts.get(level, max(8, 3 * level)), args.max_tokens, args.time_limit,
                         f"c{level}-varied", args.varied_spread))
        summary = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "command": " ".join(sys.argv), "server_flags": flags, "startup_s": startup,
                   "graph_runner_check": check, "overlapped_prefill_check": overlap,
                   "engine_prefill_profile": prefill_profile,
                   "engine_decode_profile": decode_profile, "levels": []}
        for level, requests, max_tokens, limit, name, spread in runs:
            before, t0 = scrape(port), time.perf_counter()
            load_json = Path(args.out) / f"serve-load-{name}.json"
            load_server.main([str(level), "--url", f"http://127.0.0.1:{port}", "--requests", str(requests),
                              "--max-tokens", str(max_tokens), "--time-limit", str(limit), "--image-size", "1120",
                              "--max-tokens-spread", str(spread),
                              "--json", str(load_json)])
            delta = metrics_delta(before, scrape(port), time.perf_counter() - t0)
            print(f"server metrics {name}:", json.dumps(delta), flush=True)
            summary["levels"].append({"run": name, "load": json.loads(load_json.read_text()), "server_metrics": delta})
            load_json.unlink()  # all of it is in the summary: one file to bring back
            (Path(args.out) / "serve-summary.json").write_text(json.dumps(summary, indent=1))
        import multiturn

        summary["multiturn"] = []
        for run, level in enumerate(args.multiturn):
            before, t0 = scrape(port), time.perf_counter()
            result = multiturn.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", str(level),
                                     "--conversations", str(max(8, 2 * level)), "--max-tokens", "64",
                                     "--seed", str(run)])
            result["server_metrics"] = metrics_delta(before, scrape(port), time.perf_counter() - t0)
            print(f"server metrics multiturn c{level}:", json.dumps(result["server_metrics"]), flush=True)
            summary["multiturn"].append(result)
            (Path(args.out) / "serve-summary.json").write_text(json.dumps(summary, indent=1))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        summary["final_metrics"] = [line for line in metrics.splitlines()
                                    if line.startswith(("mllama_kv", "mllama_image", "mllama_cache", "mllama_batch",
                                                        "mllama_decoded"))]
        (Path(args.out) / "serve-summary.json").write_text(json.dumps(summary, indent=1))
        print(metrics[-3000:])
    finally:
        server.send_signal(signal.SIGTERM)
        print("server exit code", server.wait(timeout=60), flush=True)


if __name__ == "__main__":
    main()
