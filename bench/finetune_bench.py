"""LoRA training speed and memory: mllama against transformers + peft, same weights, same sample, same run.

    PYTHONPATH=src python bench/finetune_bench.py --out DIR [--size 11b] [--steps 10] [--tokens 512]
    (a CPU smoke run: --tiny --device cpu)

Each framework in turn, on random weights (bf16 on CUDA): LoRA rank 16 (alpha 32) on every linear layer of the
text model (q, k, v, o, gate, up, down, in the self- and cross-attention layers), gradient checkpointing on, one
4-tile image and `--tokens` tokens per sample (labels on every text token), AdamW; two warm-up steps, then
`--steps` timed ones. Reported: samples/s, peak memory allocated (CUDA), the ratios mllama / transformers, and
the first loss of each (the same weights and sample: they should agree). Writes DIR/finetune-bench.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from mllama import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from mllama.training import labels_of  # noqa: E402

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def sample(config: MllamaConfig, tokens: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    vision = config.vision_config
    vocab = config.text_config.vocab_size
    ids = torch.randint(min(1000, vocab // 4), min(100000, vocab), (1, tokens), generator=gen)
    ids[0, 0], ids[0, 1] = config.text_config.bos_token_id, config.image_token_index
    tiles, size = vision.max_num_tiles, vision.image_size
    mask = torch.zeros(1, tokens, 1, tiles, dtype=torch.long)
    mask[:, 1:, 0, :] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(1, 1, tiles, 3, size, size, generator=gen),
             "aspect_ratio_ids": torch.tensor([[6 if tiles == 4 else 1]]),
             "aspect_ratio_mask": torch.ones(1, 1, tiles, dtype=torch.long), "cross_attention_mask": mask}
    batch["labels"] = labels_of(ids, config.image_token_index)
    return {k: v.to(device) for k, v in batch.items()}


def lora(model):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    base = model.get_base_model()
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()
    return model.train()


STARTED = time.perf_counter()


def log(*what) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s]", *what, flush=True)


def measure(name: str, model, batch: dict, steps: int, dtype) -> dict:
    device = batch["input_ids"].device
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = None
    for step in range(2 + steps):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = float(loss) if first is None else first
        log(name, "step", step, "loss", float(loss))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"framework": name, "samples_per_s": steps / seconds, "s_per_step": seconds / steps, "first_loss": first,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    log(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=["11b", "90b"], default="11b")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny config instead (a smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--only", choices=["mllama", "transformers"], help="measure one framework alone")
    args = ap.parse_args()
    import oracle
    import transformers

    if args.tiny:
        from conftest import tiny_config
        config = tiny_config()
    else:
        config = MllamaConfig.llama_3_2_11b() if args.size == "11b" else MllamaConfig.llama_3_2_90b()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "size": "tiny" if args.tiny else args.size,
           "tokens": args.tokens, "steps": args.steps, "rows": []}
    batch = sample(config, args.tokens, device)
    if device.type == "cuda":  # on the GPU, in bf16, with the other benches' weights (non-zero gates)
        from gpu_bench import build_ours
        ours = build_ours(config).train()
    else:
        ours = MllamaForConditionalGeneration.from_config(config, dtype=dtype, device=device)
    log("mllama model built", next(ours.parameters()).device)
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()} if args.only is None else None
    if args.only != "transformers":
        res["rows"].append(measure("mllama", lora(ours), batch, args.steps, dtype))
    del ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.only != "mllama":
        with torch.device(device):
            theirs = transformers.MllamaForConditionalGeneration._from_config(oracle.hf_config(config), dtype=dtype)
        log("transformers model built", next(theirs.parameters()).device)
        if state is not None:
            theirs.load_state_dict(state, strict=False)
        del state
        res["rows"].append(measure("transformers", lora(theirs), batch, args.steps, dtype))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "finetune-bench.json").write_text(json.dumps(res, indent=1))
    if len(res["rows"]) < 2:
        return
    mine, other = res["rows"]
    res["speed_ratio"] = mine["samples_per_s"] / other["samples_per_s"]
    if mine["peak_gib"] is not None:
        res["memory_ratio"] = mine["peak_gib"] / other["peak_gib"]
    log({k: v for k, v in res.items() if k.endswith("ratio")})
    (Path(args.out) / "finetune-bench.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
