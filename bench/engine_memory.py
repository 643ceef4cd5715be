"""The serving engine's GPU memory, stage by stage, from the model's load to the end of its warm-up: what torch
holds (allocated), what its allocator keeps (reserved), the peak since the last stage, and what the driver
reports free. For sizing the pools' workspace (engine.batch.WORKSPACE_BYTES) from what a model really takes.

    PYTHONPATH=src python bench/engine_memory.py --size 90b --quantize fp8 --out DIR [--utilization 0.9]

The model is made on the GPU with random weights (load_format="dummy"); the tokenizer is the tiny checkpoint's
(bench/tiny_assets.py's /tmp/tiny), which is Llama 3's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_bench import config_folder  # noqa: E402

from mllama import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from mllama.engine import batch, runner  # noqa: E402
from mllama.processing.processor import AutoProcessor  # noqa: E402

GIB = 2**30
STAGES: list[dict] = []


def stage(name: str) -> None:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    row = {"stage": name, "allocated_gib": torch.cuda.memory_allocated() / GIB,
           "reserved_gib": torch.cuda.memory_reserved() / GIB,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB, "free_gib": free / GIB,
           "total_gib": total / GIB, "t": time.perf_counter()}
    torch.cuda.reset_peak_memory_stats()
    STAGES.append(row)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if k != "t"}, flush=True)


def watch(cls, method: str, label) -> None:
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        stage(label(*args))
        return result
    setattr(cls, method, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["11b", "90b"], default="90b")
    ap.add_argument("--quantize", default="fp8")
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument("--engine-arg", action="append", default=[], help="NAME=VALUE (a Python literal)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = MllamaConfig.llama_3_2_11b() if args.size == "11b" else MllamaConfig.llama_3_2_90b()
    folder = config_folder(config, Path(f"/tmp/mllama-{args.size}-config"))
    stage("start")
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                           quantize=args.quantize or None, load_format="dummy")
    stage("loaded")
    tokenizer = AutoProcessor.from_pretrained("/tmp/tiny").tokenizer
    watch(runner.DecodeRunner, "__call__", lambda rows, positions, vision, *_: f"decode graph {len(rows)} rows "
          f"{'image' if vision else 'text'}")
    watch(batch.BatchEngine, "_warm_up_prefill", lambda: "prefill warm-up")
    fuse = batch.fuse_projections

    def fused(model):
        fuse(model)
        stage("projections fused")
    batch.fuse_projections = fused
    extra = {k: eval(v) for k, v in (a.split("=", 1) for a in args.engine_arg)}  # noqa: S307 - bench flags
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
              "quantize": args.quantize, "utilization": args.utilization, "engine_args": args.engine_arg,
              "workspace_bytes": batch.WORKSPACE_BYTES + batch.PREFILL_GRAPH_BYTES}
    try:
        engine = batch.BatchEngine(model, tokenizer, gpu_memory_utilization=args.utilization, **extra)
        stage("pools")
        result["plan"] = {"slots": engine.max_batch, "self_pages": engine.caches.self_allocator.total,
                          "tile_pages": engine.caches.images.allocator.total}
        engine.start()
        stage("started")
        result["graph_failures"] = {
            "decode": getattr(getattr(engine.runner, "graphs", None), "failed", None),
            "prefill": engine.prefill_graphs.failed if engine.prefill_graphs is not None else None,
            "vision": engine.vision_runner.graphs.failed if engine.vision_runner is not None else None}
        engine.stop()
        result["outcome"] = "started"
    except Exception as e:  # noqa: BLE001 - out of memory above all, reported with the stages before it
        stage("failed")
        result["outcome"] = f"{type(e).__name__}: {str(e)[:600]}"
        result["memory_summary"] = torch.cuda.memory_summary(abbreviated=True)
        print(result["memory_summary"], flush=True)
    result["stages"] = STAGES
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"engine-memory-{args.size}-{args.utilization}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
