"""First-call cost of new prompt lengths and tile counts: what a server pays when a request brings a shape that no
earlier request had (attention plans are built per shape by some SDPA backends).

    PYTHONPATH=src python bench/prefill_shapes.py --out DIR

For each attention-backend choice, time to first token of `generate` (1 image, 4 tiles) at prompt lengths never
seen before (first call) and again (second call), and the vision encoder at 1..4 tiles, first and second call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import build_ours, gen_ours, make_inputs  # noqa: E402

from mllama import MllamaConfig  # noqa: E402


def wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = MllamaConfig.llama_3_2_11b()
    model = build_ours(config)
    gen_ours(model, make_inputs(config, 1, True, 40), 2)  # fusion, compile, graphs
    choices = {"default": None,
               "no cuDNN": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}
    results = {}
    length = 50
    for name, backends in choices.items():
        rows, vision = [], []
        try:
            for _ in range(4):
                length += 3  # never seen before by any choice
                inputs = make_inputs(config, 1, True, length)
                with torch.no_grad(), (sdpa_kernel(backends) if backends else torch.no_grad()):
                    first = wall(lambda: gen_ours(model, inputs, 1))
                    second = wall(lambda: gen_ours(model, inputs, 1))
                rows.append({"prompt_len": length, "first_ms": round(first * 1e3, 1),
                             "second_ms": round(second * 1e3, 1)})
            if name == "default":
                for tiles in (1, 2, 3):
                    inputs = make_inputs(config, 1, True, 40)
                    mask = torch.zeros(1, 1, 4, dtype=torch.long, device="cuda")
                    mask[:, :, :tiles] = 1
                    pv = inputs["pixel_values"]
                    with torch.no_grad():
                        fn = lambda: model.model.vision_model(pv, inputs["aspect_ratio_ids"], mask)  # noqa: E731
                        vision.append({"tiles": tiles, "first_ms": round(wall(fn) * 1e3, 1),
                                       "second_ms": round(wall(fn) * 1e3, 1)})
            results[name] = {"ttft": rows, "vision": vision}
        except Exception as e:  # noqa: BLE001 - a backend choice that cannot run these shapes
            results[name] = {"ttft": rows, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(name, json.dumps(results[name]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill-shapes.json").write_text(json.dumps({"meta": meta, **results}, indent=1))


if __name__ == "__main__":
    main()
