"""Peak host memory while loading a checkpoint of a few GB (bf16, sharded), measured in a fresh process.

    python bench/load_memory.py [--gb 3] [--shard-size 1GB] [--dtype bfloat16]

Writes a random bf16 checkpoint (real 11B text width, fewer layers) to a temporary folder, then loads it in a
child process and reports the child's peak resident memory (VmHWM) next to the checkpoint size, the largest
shard, and the baseline of a process that has only imported mllama.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
import mllama

def hwm_kib():  # peak RSS of this process image (ru_maxrss would include the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

base = hwm_kib()
t = time.perf_counter()
model = mllama.MllamaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
elapsed = time.perf_counter() - t
peak = hwm_kib()
params = sum(p.numel() * p.element_size() for p in model.parameters())
# bf16 weights of a bf16 checkpoint stay memory-mapped until read: read them all, then look at the peak again
checksum = sum(int(p.detach().reshape(-1).view(torch.uint8)[::4096].sum()) for p in model.parameters())  # one byte per page
touched = hwm_kib()
print(json.dumps({"baseline_kib": base, "peak_kib": peak, "touched_peak_kib": touched, "param_bytes": params,
                  "load_s": elapsed,
                  "dtype": str(model.dtype)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10, help="text layers (4096 wide, 11B shapes); 10 gives ~7.4 GiB bf16")
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    import torch
    from mllama import MllamaConfig, MllamaForConditionalGeneration

    config = MllamaConfig.llama_3_2_11b()
    text = config.text_config
    text.num_hidden_layers = args.layers
    text.cross_attention_layers = [3, 8][: 1 + (args.layers > 8)]
    config.vision_config.num_hidden_layers, config.vision_config.num_global_layers = 31, 1
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            model = MllamaForConditionalGeneration(config)
        # materialise shard by shard would be ideal; a bf16 model of a few GB fits this machine once
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(tmp, max_shard_size=args.shard_size)
        del model
        shards = sorted(Path(tmp).glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest = max(f.stat().st_size for f in shards)
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, args.dtype], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    peak = result["peak_kib"] * 1024
    base = result["baseline_kib"] * 1024
    report = {
        "checkpoint_bytes": total, "shards": len(shards), "largest_shard_bytes": largest,
        "loaded_param_bytes": result["param_bytes"], "baseline_rss_bytes": base, "peak_rss_bytes": peak,
        "peak_after_reading_all_weights_bytes": result["touched_peak_kib"] * 1024, "load_s": result["load_s"],
        "dtype": result["dtype"],
    }
    print(json.dumps(report, indent=2))
    touched = result["touched_peak_kib"] * 1024
    print(f"{args.dtype}: checkpoint {total / gib:.2f} GiB in {len(shards)} shards (largest {largest / gib:.2f} GiB); "
          f"weights in memory {result['param_bytes'] / gib:.2f} GiB; peak RSS during load {peak / gib:.2f} GiB "
          f"(baseline {base / gib:.2f}); peak RSS after reading every weight {touched / gib:.2f} GiB; "
          f"loaded in {result['load_s']:.1f} s")


if __name__ == "__main__":
    main()
