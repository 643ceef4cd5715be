"""The cost of constrained decoding (response_format) in the serving engine, on one GPU, random weights.

    PYTHONPATH=src python bench/structured_bench.py --tokenizer-from /tmp/tiny --out DIR [--size 11b] [--quantize fp8]
    (a smoke run on the CPU: --checkpoint /tmp/tiny --device cpu)

- steps: the time per decode step (the run's wall time less the engine's prefill time, over its decode steps) at
  batch 1 and batch 64, without constraints and with half the rows (batch 64) or the one row (batch 1) under a
  JSON schema, greedy and sampled (temperature 1, top-p 0.9, a seed per request), text-only prompts of 64
  tokens, 128 new tokens each;
- compile: constraints.Grammars' compile time per schema (the tests' ten schemas), first and cached.
The tokenizer (Llama 3's) comes from a folder with the tokenizer files, e.g. bench/tiny_assets.py's /tmp/tiny.
Writes DIR/structured-bench.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from fp8_bench import config_folder  # noqa: E402

from mllama import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from mllama.constraints import Grammars  # noqa: E402
from mllama.engine.batch import BatchEngine  # noqa: E402
from mllama.engine.requests import GenerationRequest  # noqa: E402
from mllama.processing.processor import AutoProcessor  # noqa: E402
from mllama.sampling import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}}, "required": ["name", "tags"]}


def run(engine: BatchEngine, batch: int, constrained: int, grammar: str, tokens: int = 128,
        sampled: bool = False) -> dict:
    """`batch` requests at once, the first `constrained` under `grammar`; the time per decode step."""
    before = engine.stats()
    done = threading.Semaphore(0)
    gen = torch.Generator().manual_seed(batch + constrained)
    t0 = time.perf_counter()
    for i in range(batch):
        ids = [128000] + torch.randint(1000, 100000, (63,), generator=gen).tolist()

        def emit(event, done=done):
            if event.finish_reason or event.error:
                assert event.error is None, event.error
                done.release()
        params = SamplingParams(max_new_tokens=tokens, do_sample=sampled, top_p=0.9 if sampled else 1.0,
                                eos_token_id=())
        engine.submit(GenerationRequest(prompt_ids=ids, emit=emit, grammar=grammar if i < constrained else None,
                                        end_tokens=(128009,), params=params, seed=i if sampled else None))
    for _ in range(batch):
        assert done.acquire(timeout=600), "a request did not end"
    wall = time.perf_counter() - t0
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    prefill = after["busy_seconds"].get("prefill", 0) - before["busy_seconds"].get("prefill", 0)
    row = {"batch": batch, "constrained_rows": constrained, "sampled": sampled, "steps": steps,
           "s_per_step": (wall - prefill) / steps, "wall_s": wall, "prefill_s": prefill}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=["11b", "90b"], default="11b")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--checkpoint", help="a folder with config.json to use instead of --size (e.g. the tiny one)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    tokenizer = AutoProcessor.from_pretrained(args.tokenizer_from).tokenizer
    res = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
           "torch": torch.__version__, "size": args.checkpoint or args.size,
           "quantize": args.quantize}
    t0 = time.perf_counter()
    grammars = Grammars(tokenizer, 128256)
    res["tokenizer_view_s"] = time.perf_counter() - t0
    from schemas import SCHEMAS

    compile_s = {}
    for name, schema in SCHEMAS.items():
        spec = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        t0 = time.perf_counter()
        grammars.compile(spec)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        grammars.compile(spec)
        compile_s[name] = {"first_s": first, "cached_s": time.perf_counter() - t0}
    res["compile"] = compile_s
    print("compile", compile_s, flush=True)
    if args.checkpoint:
        folder = Path(args.checkpoint)
    else:
        config = MllamaConfig.llama_3_2_11b() if args.size == "11b" else MllamaConfig.llama_3_2_90b()
        folder = config_folder(config, Path(f"/tmp/mllama-{args.size}-config"))
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map=args.device,
                                                           quantize=args.quantize, load_format="dummy")
    engine = BatchEngine(model, tokenizer, max_batch=64, max_model_len=1024).start()
    grammar = grammars.compile({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    try:
        for constrained in (0, 1):  # first requests: any remaining first-call set-up (the engine's grammar view)
            run(engine, 1, constrained, grammar, 16)
        res["steps"] = [run(engine, batch, constrained, grammar, sampled=sampled) for sampled in (False, True)
                        for batch in (1, 64) for constrained in (0, batch // 2 or 1)]
    finally:
        engine.stop()
    for sampled in (False, True):
        for batch in (1, 64):
            plain, constrained = [r["s_per_step"] for r in res["steps"] if r["batch"] == batch
                                  and r["sampled"] == sampled]
            res[f"b{batch}{'_sampled' if sampled else ''}_constrained_over_plain"] = constrained / plain
    print({k: v for k, v in res.items() if k.endswith("plain")}, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "structured-bench.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
