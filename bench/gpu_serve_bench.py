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
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default="/tmp/mllama-11b-random")
    ap.add_argument("--levels", nargs="*", type=int, default=[1, 8, 64])
    ap.add_argument("--max-batch", type=int, default=64)
    args = ap.parse_args()
    from gpu_bench import build_ours
    from mllama import MllamaConfig

    ckpt = Path(args.ckpt)
    t0 = time.perf_counter()
    model = build_ours(MllamaConfig.llama_3_2_11b())
    model.generation_config.update(do_sample=False, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    model.save_pretrained(ckpt)
    del model
    torch.cuda.empty_cache()
    for name in os.listdir(args.assets):
        shutil.copy(Path(args.assets) / name, ckpt / name)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 560, "width": 560}, "max_image_tiles": 4,
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_pad": True,
        "resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    port = 8011
    server = subprocess.Popen([sys.executable, "-m", "mllama.server", str(ckpt), "--device", "cuda", "--dtype",
                               "bfloat16", "--port", str(port), "--served-model-name", "m", "--max-batch",
                               str(args.max_batch), "--max-queue", "512", "--max-model-len", "1024",
                               "--max-images-per-request", "1"], stdout=sys.stdout, stderr=sys.stderr)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 240:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except Exception:
            if server.poll() is not None:
                raise SystemExit("server exited")
            time.sleep(1)
    print(f"server ready in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        import load_server

        load_server.main([*map(str, args.levels), "--url", f"http://127.0.0.1:{port}", "--requests", "32",
                          "--max-tokens", "64", "--time-limit", "40", "--image-size", "1120",
                          "--json", str(Path(args.out) / "serve-load.json")])
    finally:
        server.send_signal(signal.SIGTERM)
        print("server exit code", server.wait(timeout=60), flush=True)


if __name__ == "__main__":
    main()
