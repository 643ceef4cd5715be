"""FP8 on one GPU, against bf16 and the hardware limits measured in the same run (random weights, real shapes).

    PYTHONPATH=src python bench/fp8_bench.py --out DIR [--parts kernels 11b cut90b 90b]

- kernels: the text model's products at decode shapes in CUDA graphs: bf16, W8A8 (torch._scaled_mm with the
  activations quantized per token, what mllama runs) and FP8 weights with bf16 activations (dequantized, then a
  bf16 product, compiled), at batch 1 and 32.
- 11b: the bf16 11B built on the GPU, then the same weights quantized (from_pretrained(state_dict=...,
  quantize="fp8")); each: vision encoder, time to first token (one 4-tile image), decode tok/s at batch 1 (image,
  text), 8 and 32 (one image each) through generate's defaults; FP8 against bf16 teacher-forced over 64 steps.
- cut90b: a 90B checkpoint cut to its first layers, written to disk, loaded with quantize="fp8" (the
  load-and-quantize path at the 90B's shapes: seconds per layer, peak memory).
- 90b: the 90B in FP8 made on the GPU (load_format="dummy": each layer quantized as it is made), then time to
  first token with one 4-tile image and decode at batch 1 and 8.
- kv: the serving engine's FP8 K/V pages against bf16 pages (11B): logit error and greedy agreement over 64
  teacher-forced steps.
Writes DIR/fp8-bench.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import gpu_bench  # noqa: E402
from gpu_bench import DEV, build_ours, cuda_time, gen_ours, make_inputs, measure  # noqa: E402

from mllama import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from mllama.processing.cross_attention_mask import extend_cross_attention_mask  # noqa: E402
from mllama.quantization import FP8, fp8_linear_cuda, quantize_rows  # noqa: E402


def hardware() -> dict:
    """gpu_bench's copy rate and bf16 matmul rate, and the FP8 matmul rate beside them."""
    hw = gpu_bench.hardware()
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    qa, qb = a.to(FP8), a.to(FP8).t().contiguous().t()
    one = torch.ones((), device=DEV)
    hw["fp8_flops"] = 2 * 8192**3 / cuda_time(lambda: torch._scaled_mm(qa, qb, scale_a=one, scale_b=one,
                                                                       out_dtype=torch.bfloat16), 3, 20)
    return hw


def graph_time(fn, repeat: int = 50) -> float:
    """Seconds per call of fn, replayed `repeat` times inside one CUDA graph (no launch gaps counted)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return cuda_time(graph.replay, 2, 5) / repeat


def kernels() -> dict:
    """Each product compiled as the fast path compiles its layers, replayed in a CUDA graph: bf16; W8A8 as
    mllama runs it (quantization.fp8_linear_cuda: unscaled product then both scales up to UNSCALED_ROWS rows,
    row-wise-scaled kernel above); W8A8 always through the row-wise-scaled kernel; at one row also FP8 weights
    with bf16 activations (dequantized, then a bf16 product)."""
    import torch._dynamo

    from mllama.quantization import UNSCALED_ROWS

    torch._dynamo.config.cache_size_limit = 256  # one compiled variant per shape, none falling back to eager

    def rowwise(x, q, s):
        qx, sx = quantize_rows(x)
        return torch._scaled_mm(qx, q.t(), scale_a=sx, scale_b=s.t(), out_dtype=x.dtype)

    shapes = {"q|k|v": (4096, 6144), "o": (4096, 4096), "gate|up": (4096, 28672), "down": (14336, 4096)}
    ours, row_scaled = torch.compile(fp8_linear_cuda), torch.compile(rowwise)
    dequantized = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s.t().to(x.dtype))
    out = {"unscaled_rows": UNSCALED_ROWS}
    for rows in (1, 32, 64, 128):
        for name, (inner, outer) in shapes.items():
            x = torch.randn(rows, inner, device=DEV, dtype=torch.bfloat16)
            w = torch.randn(outer, inner, device=DEV, dtype=torch.bfloat16) * 0.02
            q, s = quantize_rows(w)
            row = {"bf16_us": graph_time(lambda: F.linear(x, w)) * 1e6,
                   "w8a8_mllama_us": graph_time(lambda: ours(x, q, s)) * 1e6,
                   "w8a8_rowwise_kernel_us": graph_time(lambda: row_scaled(x, q, s)) * 1e6}
            if rows == 1:
                row["fp8_weights_bf16_activations_us"] = graph_time(lambda: dequantized(x, q, s)) * 1e6
            row["weight_read_limit_us_fp8"] = outer * inner / HW["copy_bytes_per_s"] * 1e6
            out[f"b{rows} {name}"] = row
            print("kernel", rows, name, {k: round(v, 1) for k, v in row.items()}, flush=True)
    return out


def text_weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter but the vision tower's, the projector's and the embeddings'."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("model.vision_model") and "multi_modal_projector" not in n
               and "embed_tokens" not in n)


def teacher_forced(fp8, bf16, config, steps: int = 64) -> dict:
    inputs = make_inputs(config, 1, True)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        sequence = bf16.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        given = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        given["cross_attention_mask"] = extend_cross_attention_mask(inputs["cross_attention_mask"], steps - 1)
        logits = [m(input_ids=sequence[:, :-1], **given).logits[0, prompt - 1:].float() for m in (fp8, bf16)]
    error = (logits[0] - logits[1]).norm(dim=-1) / logits[1].norm(dim=-1)
    return {"steps": steps, "relative_logit_error_mean": error.mean().item(), "relative_logit_error_max":
            error.max().item(), "greedy_agreement": (logits[0].argmax(-1) == sequence[0, prompt:]).float().mean().item()}


def part_11b() -> dict:
    config = MllamaConfig.llama_3_2_11b()
    bf16 = build_ours(config)
    res = {"bf16": measure("11B bf16", bf16, gen_ours,
                           bf16.model.vision_model, config, quick=False)}
    res["bf16"]["decode_weight_bytes"] = text_weight_bytes(bf16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fp8 = MllamaForConditionalGeneration.from_pretrained(None, config=config, state_dict=bf16.state_dict(),
                                                         dtype=torch.bfloat16, device_map=DEV, quantize="fp8")
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t0
    res["fp8_vs_bf16"] = teacher_forced(fp8, bf16, config)
    print("11B FP8 vs bf16", res["fp8_vs_bf16"], flush=True)
    from mllama.engine.fast import engine_state

    engine_state(bf16).clear()
    del bf16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res["fp8"] = measure("11B fp8", fp8, gen_ours,
                         fp8.model.vision_model, config, quick=False)
    res["fp8"].update(quantize_from_gpu_state_s=quantize_s, decode_weight_bytes=text_weight_bytes(fp8),
                      peak_gpu_bytes=torch.cuda.max_memory_allocated())
    for name in ("bf16", "fp8"):
        res[name]["weight_read_limit_tok_s"] = HW["copy_bytes_per_s"] / res[name]["decode_weight_bytes"]
    del fp8
    torch.cuda.empty_cache()
    return res


def config_folder(config: MllamaConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = config.to_dict("published")
    data["architectures"] = ["MllamaForConditionalGeneration"]
    data["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(data, indent=1))
    return folder


def part_cut90b(layers: int = 5) -> dict:
    """The first `layers` layers of the 90B (one of them cross-attention), every other tensor at full size."""
    full = MllamaConfig.llama_3_2_90b()
    text = full.text_config.to_dict()
    text.update(num_hidden_layers=layers, cross_attention_layers=[3])
    config = MllamaConfig(vision_config=full.vision_config.to_dict(), text_config=text,
                          image_token_index=full.image_token_index)
    folder = Path("/tmp/mllama-90b-cut")
    model = build_ours(config)
    model.save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map=DEV,
                                                           quantize="fp8")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    res = {"layers": layers, "checkpoint_bytes": size, "load_and_quantize_s": seconds,
           "read_bytes_per_s": size / seconds, "weights_bytes_on_gpu": weights,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    print("90B cut", res, flush=True)
    del model
    shutil.rmtree(folder)
    torch.cuda.empty_cache()
    return res


def part_90b() -> dict:
    config = MllamaConfig.llama_3_2_90b()
    folder = config_folder(config, Path("/tmp/mllama-90b-config"))
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map=DEV,
                                                           quantize="fp8", load_format="dummy")
    torch.cuda.synchronize()
    res = {"build_and_quantize_s": time.perf_counter() - t0, "weights_bytes": sum(
        p.numel() * p.element_size() for p in model.parameters()), "peak_gpu_bytes_loading":
        torch.cuda.max_memory_allocated(), "decode_weight_bytes": text_weight_bytes(model)}
    res["weight_read_limit_tok_s"] = HW["copy_bytes_per_s"] / res["decode_weight_bytes"]
    print("90B built", res, flush=True)
    res.update(measure("90B fp8", model, gen_ours,
                       model.model.vision_model, config, quick=True))
    res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return res


def part_kv(steps: int = 64) -> dict:
    """kv_cache_dtype="fp8" against the model's dtype in the serving engine (11B, FP8 weights made on the GPU):
    one request with a 4-tile image prefilled into each engine, then `steps` decode steps teacher-forced by the
    bf16 pages' greedy tokens: relative logit error (norm) and greedy agreement; the pages' bytes of each."""
    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams

    config = MllamaConfig.llama_3_2_11b()
    folder = config_folder(config, Path("/tmp/mllama-11b-config"))
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map=DEV,
                                                           quantize="fp8", load_format="dummy")
    inputs = make_inputs(config, 1, True)
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask")
    engines, first = [], []
    for dtype in ("auto", "fp8"):
        engine = BatchEngine(model, None, max_batch=2, max_model_len=1024, pages=(20, 5), kv_cache_dtype=dtype)
        request = GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=steps, do_sample=False),
                                    model_inputs=dict(inputs), emit=lambda event: None)
        request.images = engine.describe_images(request.model_inputs)
        assert engine._reserve(request)
        seen = []
        engine._sample_and_emit = lambda requests, logits: seen.append(logits[0].float().clone())
        engine._prefill([(request, 0)])
        engines.append(engine)
        first.append(seen[0])
    token, errors, agree = int(first[0].argmax()), [], 0
    for step in range(steps):
        a, b = (engine.runner([token], [len(ids) + step], True)[0].float() for engine in engines)
        errors.append(((b - a).norm() / a.norm()).item())
        agree += int(a.argmax() == b.argmax())
        token = int(a.argmax())
    res = {"steps": steps, "relative_logit_error_mean": sum(errors) / steps, "relative_logit_error_max": max(errors),
           "greedy_agreement": agree / steps,
           "bytes_per_self_page": [e.caches.bytes_per_self_page for e in engines],
           "bytes_per_tile_page": [e.caches.bytes_per_tile_page for e in engines]}
    print("K/V pages fp8 vs bf16", res, flush=True)
    return res


HW: dict = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--parts", nargs="*", default=["kernels", "11b", "cut90b", "90b"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "command": " ".join(sys.argv)}}
    HW.update(hardware())
    results["hardware"] = dict(HW)
    print("hardware", HW, flush=True)
    parts = {"kernels": kernels, "11b": part_11b, "cut90b": part_cut90b, "90b": part_90b, "kv": part_kv}
    for name in args.parts:
        try:
            results[name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others' numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        (out / "fp8-bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
