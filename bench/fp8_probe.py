"""Where an FP8 decode step's time goes on the GPU (11B shapes, random weights): the product alone (row-wise and
tensor-wise scales), the activation quantization eager and compiled, whether the fast path's layer calls compiled,
and the top kernels of one step of generate's decoder run without its graph. Part `sweep`: fp8_kernel's split-K
products over its knobs (column block, splits, warps, stages) at the 11B's and 90B's decode shapes, against
torch._scaled_mm and the weight's read time at the copy rate measured in the same run.

    PYTHONPATH=src python bench/fp8_probe.py --out DIR [--parts products sweep step]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from fp8_bench import config_folder, graph_time  # noqa: E402
from gpu_bench import DEV, make_inputs  # noqa: E402

from mllama import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from mllama.quantization import fp8_linear_cuda, quantize_rows  # noqa: E402


def products() -> dict:
    out = {}
    quantize = torch.compile(quantize_rows)
    compiled = torch.compile(fp8_linear_cuda)
    for name, (inner, outer) in {"q|k|v": (4096, 6144), "gate|up": (4096, 28672), "down": (14336, 4096)}.items():
        x = torch.randn(1, inner, device=DEV, dtype=torch.bfloat16)
        q, s = quantize_rows(torch.randn(outer, inner, device=DEV, dtype=torch.bfloat16) * 0.02)
        qx, sx = quantize_rows(x)
        one = torch.ones((), device=DEV)
        row = {"rowwise_mm_us": graph_time(lambda: torch._scaled_mm(qx, q.t(), scale_a=sx, scale_b=s.t(),
                                                                   out_dtype=torch.bfloat16)),
               "tensorwise_mm_us": graph_time(lambda: torch._scaled_mm(qx, q.t(), scale_a=one, scale_b=one,
                                                                      out_dtype=torch.bfloat16)),
               "quantize_eager_us": graph_time(lambda: quantize_rows(x)),
               "quantize_compiled_us": graph_time(lambda: quantize(x)),
               "linear_compiled_us": graph_time(lambda: compiled(x, q, s)),
               "bf16_us": graph_time(lambda: F.linear(x, q.to(torch.bfloat16)))}
        out[name] = {k: v * 1e6 for k, v in row.items()}
        print(name, {k: round(v, 1) for k, v in out[name].items()}, flush=True)
    return out


SHAPES = {"11b q|k|v": (4096, 6144), "11b o": (4096, 4096), "11b gate|up": (4096, 28672), "11b down": (14336, 4096),
          "90b q|k|v": (8192, 10240), "90b o": (8192, 8192), "90b gate|up": (8192, 57344), "90b down": (28672, 8192)}


def sweep() -> dict:
    """Each shape and row count: every knob setting of fp8_kernel.launch, the best kept with its time, beside
    the default's (partial_products) and the unscaled torch._scaled_mm's, all replayed in CUDA graphs."""
    from gpu_bench import hardware

    from mllama import fp8_kernel

    copy = hardware()["copy_bytes_per_s"]
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    out = {"copy_bytes_per_s": copy, "sm_count": sm}
    one = torch.ones((), device=DEV)
    for rows in (1, 4, 8, 16, 32):
        for name, (inner, outer) in SHAPES.items():
            q, _ = quantize_rows(torch.randn(outer, inner, device=DEV, dtype=torch.bfloat16))
            # copies of the weight taken in turn, 256 MB or more in all: no call finds its weight in the L2 cache
            copies = itertools.cycle([q] + [q.clone() for _ in range(min(15, 2**28 // q.numel()))])
            qx, _ = quantize_rows(torch.randn(rows, inner, device=DEV, dtype=torch.bfloat16))
            blocks = inner // fp8_kernel.block_k(inner)
            tried = {}
            for block_n in (32, 64, 128):
                for splits in [d for d in (1, 2, 4, 7, 8, 14, 16, 28, 32) if blocks % d == 0 and blocks // d >= 2]:
                    for warps in (4, 8):
                        for stages in (3, 5):
                            fn = lambda: fp8_kernel.launch(qx, next(copies), splits, block_n, warps, stages)  # noqa: E731
                            tried[f"n{block_n} s{splits} w{warps} st{stages}"] = graph_time(fn, 20) * 1e6
            best = min(tried, key=tried.get)
            row = {"best": best, "best_us": tried[best],
                   "default_us": graph_time(lambda: fp8_kernel.partial_products(qx, next(copies)), 20) * 1e6,
                   "default_splits": fp8_kernel.splits_for(outer, inner, sm),
                   "scaled_mm_us": graph_time(lambda: torch._scaled_mm(qx, next(copies).t(), scale_a=one,
                                                                       scale_b=one, out_dtype=torch.float32), 20) * 1e6,
                   "read_limit_us": outer * inner / copy * 1e6,
                   "top5": dict(sorted(tried.items(), key=lambda kv: kv[1])[:5])}
            out[f"b{rows} {name}"] = row
            print("sweep", rows, name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                                        if k != "top5"}, flush=True)
    return out


def step_profile(model, config) -> dict:
    from mllama.engine.fast import engine_state

    inputs = make_inputs(config, 1, True)
    model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    decoders = list(engine_state(model)["decoders"].values())
    errors = [d.compile_error for d in decoders]
    decoder = decoders[0]
    decoder.use_graph = False
    tokens = torch.zeros(1, dtype=torch.long, device=DEV)
    positions = torch.full((1,), 50, dtype=torch.long, device=DEV)
    for _ in range(3):
        decoder(tokens, positions, 50)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            decoder(tokens, positions, 50)
        torch.cuda.synchronize()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:25]:
        rows.append({"kernel": e.key[:110], "us_per_step": e.device_time_total / 5, "calls_per_step": e.count / 5})
    total = sum(e.device_time_total for e in prof.key_averages()) / 5
    for r in rows:
        print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel']}", flush=True)
    print("compile errors:", errors, "kernel time per step (us):", round(total, 1), flush=True)
    return {"compile_errors": errors, "kernel_us_per_step": total, "top": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="+", default=["products", "step"], choices=["products", "sweep", "step"])
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    target = Path(args.out) / f"fp8-probe-{'-'.join(args.parts)}.json"
    if "products" in args.parts:
        res["products_b1"] = products()
    if "sweep" in args.parts:
        res["sweep"] = sweep()
        target.write_text(json.dumps(res, indent=1))
    if "step" in args.parts:
        config = MllamaConfig.llama_3_2_11b()
        folder = config_folder(config, Path("/tmp/mllama-11b-config"))
        model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map=DEV,
                                                               quantize="fp8", load_format="dummy")
        res["fp8_step"] = step_profile(model, config)
    target.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
