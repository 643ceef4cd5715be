"""mllama vs transformers on one GPU, same random 11B weights (bf16, non-zero gates), same run.

    PYTHONPATH=src python bench/gpu_bench.py [--out DIR] [--quick]

Measures the GPU's copy bandwidth and bf16 matmul rate first, then for both implementations: vision encoder
(1 image, 4 tiles), time to first token (1 image + 40-token prompt), decode tok/s at batch 1 with an image,
batch 1 text-only, batch 8 and 32 with one image each, start-up and peak GPU memory; and the fast path's
bf16 error against an fp32 reference next to the plain bf16 model's. Prints a table and writes JSON + markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mllama import MllamaConfig, MllamaForConditionalGeneration
from mllama.engine.fast import FastDecoder

PROMPT_LEN = 40
DEV = "cuda"


def cuda_time(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def hardware() -> dict:
    n = 2**31  # 2 GiB bf16 buffer each way
    x = torch.randn(n // 2, device=DEV, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), 3, 10)
    copy_bw = 2 * x.numel() * 2 / t
    del x, y
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, 3, 20)
    return {"copy_bytes_per_s": copy_bw, "bf16_flops": 2 * 8192**3 / t}


def build_ours(config: MllamaConfig) -> MllamaForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device(DEV):
        torch.set_default_dtype(torch.bfloat16)
        model = MllamaForConditionalGeneration(config)
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf:
                p.fill_(0.7)
            elif "norm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            else:
                p.normal_(0, 0.02)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers(DEV)
    return model.eval()


def build_transformers(ours, config: MllamaConfig):
    import transformers

    data = config.to_dict("transformers5")
    for sub in ("text_config", "vision_config"):
        data[sub].pop("compat", None)
    cfg = transformers.MllamaConfig(**{k: v for k, v in data.items() if k not in ("architectures", "model_type")})
    with torch.device(DEV):
        hf = transformers.MllamaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                                      dtype=torch.bfloat16)
    state = {k: v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not [m for m in missing if "inv_freq" not in m] and not unexpected, (missing[:3], unexpected[:3])
    return hf.eval()


def make_inputs(config, batch: int, with_image: bool, prompt_len: int = PROMPT_LEN, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    image_token = config.image_token_index
    ids = torch.randint(1000, 100000, (batch, prompt_len), generator=gen)
    ids[:, 0] = 128000
    out = {"input_ids": ids.to(DEV), "attention_mask": torch.ones_like(ids).to(DEV)}
    if with_image:
        ids[:, 1] = image_token
        out["input_ids"] = ids.to(DEV)
        tile = config.vision_config.image_size
        out["pixel_values"] = torch.randn(batch, 1, 4, 3, tile, tile, generator=gen).to(DEV, torch.bfloat16)
        out["aspect_ratio_ids"] = torch.full((batch, 1), 6, device=DEV)
        out["aspect_ratio_mask"] = torch.ones(batch, 1, 4, dtype=torch.long, device=DEV)
        cross = torch.zeros(batch, prompt_len, 1, 4, dtype=torch.long)
        cross[:, 1:] = 1
        out["cross_attention_mask"] = cross.to(DEV)
    return out


def gen_ours(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def gen_hf(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def decode_rate(gen, model, inputs, short=8, long=72, repeat=2) -> float:
    """Tokens per second per sequence... summed over the batch: (long - short) * B / (t_long - t_short)."""
    t_short = cuda_time(lambda: gen(model, inputs, short), 1, repeat)
    t_long = cuda_time(lambda: gen(model, inputs, long), 1, repeat)
    return (long - short) * inputs["input_ids"].shape[0] / (t_long - t_short)


def measure(name, model, gen, vision, config, quick) -> dict:
    res = {}
    img1 = make_inputs(config, 1, True)
    pv = img1["pixel_values"]
    with torch.no_grad():
        res["vision_encoder_s"] = cuda_time(lambda: vision(pv, img1["aspect_ratio_ids"], img1["aspect_ratio_mask"]), 2, 10)
        res["first_token_s"] = cuda_time(lambda: gen(model, img1, 1), 2, 5)
        res["decode_b1_image_tok_s"] = decode_rate(gen, model, img1)
        res["decode_b1_text_tok_s"] = decode_rate(gen, model, make_inputs(config, 1, False))
        res["decode_b8_image_tok_s"] = decode_rate(gen, model, make_inputs(config, 8, True))
        if not quick:
            res["decode_b32_image_tok_s"] = decode_rate(gen, model, make_inputs(config, 32, True), 4, 36, 1)
    print(name, json.dumps(res), flush=True)
    return res


def exactness(model, config) -> dict:
    """Teacher-forced decode steps: relative L2 error of the fast path's and the plain bf16 model's logits
    against an fp32 copy of the same weights."""
    inputs = make_inputs(config, 2, True, seed=3)
    steps = torch.randint(1000, 100000, (8, 2), generator=torch.Generator().manual_seed(4)).to(DEV)

    def run(m, fast: bool):
        from mllama.modeling.cache import MllamaCache

        b, p = inputs["input_ids"].shape
        vision_tokens = 4 * config.vision_config.num_patches
        decoder = FastDecoder(m, b, p + 8, vision_tokens) if fast else None
        cache = decoder.reset() if fast else MllamaCache.allocate(m.config, b, p + 8, DEV, m.dtype)
        mask = torch.ones(b, p + 8, dtype=torch.long, device=DEV)
        extra = {k: (v.to(m.dtype) if v.is_floating_point() else v) for k, v in inputs.items()
                 if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            m(input_ids=inputs["input_ids"], attention_mask=mask[:, :p], cache=cache, **extra)
            last_cross = inputs["cross_attention_mask"][:, -1:]
            if fast:
                decoder.bind(mask, last_cross)
            outs = []
            for i in range(8):
                pos = torch.full((b, 1), p + i, device=DEV)
                if fast:
                    outs.append(decoder(steps[i], pos, p + i).float().clone())
                else:
                    outs.append(m(input_ids=steps[i][:, None], attention_mask=mask[:, :p + i + 1], position_ids=pos,
                                  cache=cache, cross_attention_mask=last_cross).logits[:, -1].float())
        return torch.stack(outs)

    fast, plain = run(model, True), run(model, False)
    with torch.device("meta"):
        ref_model = MllamaForConditionalGeneration(config)
    ref_model = ref_model.to_empty(device=DEV)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for m in ref_model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers(DEV)
    ref = run(ref_model.eval(), False)
    del ref_model
    err = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
    return {"fast_vs_fp32": err(fast), "plain_bf16_vs_fp32": err(plain), "ratio": err(fast) / err(plain),
            "greedy_agreement_fast_vs_fp32": float((fast.argmax(-1) == ref.argmax(-1)).float().mean())}


def vision_graph_check(model, config) -> dict:
    """The vision encoder replayed as CUDA graphs (what generate and the server's prefill use) against the plain
    module: its time, and the largest difference on one 4-tile image and on two images of 4 and 2 tiles."""
    from mllama.engine.fast import engine_state, vision_graphs

    engine_state(model).pop("vision_graphs", None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    runner = vision_graphs(model)
    vm = model.model.vision_model
    img = make_inputs(config, 1, True)
    args1 = (img["pixel_values"], img["aspect_ratio_ids"], img["aspect_ratio_mask"])
    two = make_inputs(config, 2, True, seed=1)
    mask2 = two["aspect_ratio_mask"].clone()
    mask2[1, 0, 2:] = 0
    args2 = (two["pixel_values"], torch.tensor([[6], [2]], device=DEV), mask2)
    out = {}
    with torch.no_grad():
        for name, args in (("one_image", args1), ("two_images_4_and_2_tiles", args2)):
            want = vm(*args).last_hidden_state
            got = runner(*args).last_hidden_state.clone()
            out[f"vision_graph_max_abs_diff_{name}"] = float((got - want).abs().max())
        out["vision_graph_encoder_s"] = cuda_time(lambda: runner(*args1), 2, 10)
    torch.cuda.synchronize()
    # what the graphs keep: the shared pool and the output buffer (two images' worth here)
    out["vision_graph_memory_bytes"] = torch.cuda.memory_allocated() - before
    return out


def profile_first_token(model, inputs, out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        gen_ours(model, inputs, 1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            gen_ours(model, inputs, 1)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    (out / "profile-first-token.txt").write_text(table + "\n\n" + cpu)
    print(table[:6000], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-exactness", action="store_true", help="no fp32 reference comparison (44 GB, minutes)")
    ap.add_argument("--profile", action="store_true", help="print where the first-token time of mllama goes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    print(meta, flush=True)
    hw = hardware()
    print("hardware", hw, flush=True)
    config = MllamaConfig.llama_3_2_11b()

    t0 = time.perf_counter()
    ours = build_ours(config)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    decode_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                       if not n.startswith("model.vision_model") and "multi_modal_projector" not in n
                       and "embed_tokens" not in n)
    cross = set(config.text_config.cross_attention_layers)
    text_only_bytes = decode_bytes - sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                                         if any(n.startswith(f"model.language_model.layers.{i}.") for i in cross))
    # start-up after loading: first request pays the projection fusion and the graph capture
    img1 = make_inputs(config, 1, True)
    t0 = time.perf_counter()
    gen_ours(ours, img1, 2)
    torch.cuda.synchronize()
    first_request_s = time.perf_counter() - t0
    if args.profile:
        profile_first_token(ours, img1, out)
    torch.cuda.reset_peak_memory_stats()
    results = {"meta": meta, "hardware": hw, "decode_weight_bytes": decode_bytes,
               "text_only_weight_bytes": text_only_bytes,
               "mllama": measure("mllama", ours, gen_ours, ours.model.vision_model, config, args.quick)}
    results["mllama"]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    results["mllama"].update(vision_graph_check(ours, config))
    print("vision graphs:", {k: v for k, v in results["mllama"].items() if k.startswith("vision_graph")}, flush=True)
    results["mllama"]["build_s"] = build_s
    results["mllama"]["first_request_s"] = first_request_s
    try:  # a request that cannot fit is refused before anything is allocated
        big = make_inputs(config, 512, False)
        gen_ours(ours, big, 60000)
        results["mllama"]["oversized_request"] = "accepted (unexpected)"
    except ValueError as e:
        results["mllama"]["oversized_request"] = f"refused: {e}"
    print("oversized:", results["mllama"]["oversized_request"], flush=True)
    from mllama.engine.fast import engine_state

    decoders = list(engine_state(ours).get("decoders", {}).values())
    results["mllama"]["compile_errors"] = sorted({d.compile_error for d in decoders if d.compile_error})
    if not args.skip_transformers:
        t0 = time.perf_counter()
        hf = build_transformers(ours, config)
        torch.cuda.synchronize()
        hf_build = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        results["transformers"] = measure("transformers", hf, gen_hf, hf.model.vision_model, config, args.quick)
        results["transformers"]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        results["transformers"]["build_s"] = hf_build
        del hf
        torch.cuda.empty_cache()
    # the measured runs' graphs and caches go first (the fp32 reference below needs 44 GB)
    engine_state(ours).clear()
    torch.cuda.empty_cache()
    if not args.skip_exactness:
        results["exactness"] = exactness(ours, config)
    write(results, out)


def write(results: dict, out: Path) -> None:
    hw = results["hardware"]
    limit_tok_s = hw["copy_bytes_per_s"] / results["decode_weight_bytes"]
    vision_flops = 40 * (6432 * 1280 * 1280 * 2 * 4 + 6432 * 1280 * 5120 * 2 * 2 + 6432 * 6432 * 1280 * 2 * 2)
    rows = [("vision encoder, 1 image x 4 tiles (ms)", "vision_encoder_s", 1e3),
            ("first token, 1 image + 40 tokens (ms)", "first_token_s", 1e3),
            ("decode batch 1 + image (tok/s)", "decode_b1_image_tok_s", 1),
            ("decode batch 1 text-only (tok/s)", "decode_b1_text_tok_s", 1),
            ("decode batch 8 + image (tok/s)", "decode_b8_image_tok_s", 1),
            ("decode batch 32 + image (tok/s)", "decode_b32_image_tok_s", 1),
            ("peak GPU memory (GiB)", "peak_gpu_bytes", 1 / 2**30)]
    m = results["meta"]
    lines = [f"# mllama vs transformers, {m['date']}, {m['gpu']}, torch {m['torch']}, transformers "
             f"{m['transformers']}", "",
             f"copy bandwidth {hw['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {hw['bf16_flops'] / 1e12:.0f} "
             f"TFLOP/s; decode weights {results['decode_weight_bytes'] / 1e9:.2f} GB -> weight-read limit "
             f"{limit_tok_s:.0f} tok/s at batch 1; vision encoder {vision_flops / 1e12:.1f} TFLOP -> "
             f"{vision_flops / hw['bf16_flops'] * 1e3:.1f} ms at the matmul rate", "",
             "| figure | mllama | transformers | mllama / transformers | mllama vs limit |", "|---|---|---|---|---|"]
    for label, key, scale in rows:
        ours = results["mllama"].get(key)
        theirs = results.get("transformers", {}).get(key)
        if ours is None:
            continue
        ratio = f"{ours / theirs:.2f}" if theirs else "-"
        limit = "-"
        if key == "decode_b1_image_tok_s":
            limit = f"{ours / limit_tok_s:.0%} of {limit_tok_s:.0f}"
        elif key == "decode_b1_text_tok_s":
            text_limit = hw["copy_bytes_per_s"] / results["text_only_weight_bytes"]
            limit = f"{ours / text_limit:.0%} of {text_limit:.0f} (cross layers not read)"
        elif key == "vision_encoder_s":
            limit = f"{vision_flops / ours / hw['bf16_flops']:.0%} of matmul rate"
        lines.append(f"| {label} | {ours * scale:.1f} | {theirs * scale:.1f} | {ratio} | {limit} |" if theirs else
                     f"| {label} | {ours * scale:.1f} | - | - | {limit} |")
    lines.append(f"| start-up: build + random init (s) | {results['mllama']['build_s']:.1f} | "
                 f"{results.get('transformers', {}).get('build_s', float('nan')):.1f} (copy of the weights) | | |")
    lines.append(f"| first request incl. fusion + compile + graph capture (s) | "
                 f"{results['mllama']['first_request_s']:.2f} | | | |")
    if "vision_graph_encoder_s" in results["mllama"]:
        mm = results["mllama"]
        lines += ["", f"vision encoder replayed as CUDA graphs (generate and the server use it): "
                  f"{mm['vision_graph_encoder_s'] * 1e3:.1f} ms; largest difference to the plain module "
                  f"{mm['vision_graph_max_abs_diff_one_image']:.1e} (one 4-tile image), "
                  f"{mm['vision_graph_max_abs_diff_two_images_4_and_2_tiles']:.1e} (4 + 2 tiles); graph memory "
                  f"{mm['vision_graph_memory_bytes'] / 2**30:.2f} GiB after a 1-image and a 2-image graph"]
    if results["mllama"].get("compile_errors"):
        lines.append(f"\ncompile fell back to eager: {results['mllama']['compile_errors']}")
    e = results.get("exactness")
    lines += [] if not e else ["", f"exactness (8 teacher-forced decode steps, batch 2 with an image): fast path vs fp32 "
              f"{e['fast_vs_fp32']:.2e}, plain bf16 vs fp32 {e['plain_bf16_vs_fp32']:.2e}, ratio {e['ratio']:.2f} "
              f"(goal <= 1.2); greedy agreement with fp32 {e['greedy_agreement_fast_vs_fp32']:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    stamp = f"{m['date']}-h200"
    (out / f"{stamp}-gpu-bench.md").write_text(text)
    (out / f"{stamp}-gpu-bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
