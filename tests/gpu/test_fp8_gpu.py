"""On CUDA: the FP8 linear layer on the tensor cores (torch._scaled_mm) against its definition, the
dequantize-and-compute reference in float32, at the 11B model's decode and prefill shapes; the FP8 model's fast
path and serving engine against its plain forward with the reference products; FP8 against bf16."""
from __future__ import annotations

import pytest
import torch

from mllama import MllamaForConditionalGeneration, fp8_kernel, quantization
from mllama.processing.cross_attention_mask import extend_cross_attention_mask
from mllama.quantization import Fp8Linear, fp8_linear_cuda, fp8_linear_reference

DEVICE = "cuda"


@pytest.mark.parametrize("rows", [1, 8, 64, 65, 301])
@pytest.mark.parametrize("inner, outer", [(4096, 6144), (4096, 28672), (14336, 4096)])
def test_scaled_mm_equals_the_reference(rows, inner, outer):
    g = torch.Generator(device=DEVICE).manual_seed(rows + inner + outer)
    linear = torch.nn.Linear(inner, outer, bias=False, device=DEVICE, dtype=torch.bfloat16)
    linear.weight.data = torch.randn(outer, inner, device=DEVICE, generator=g, dtype=torch.bfloat16) * 0.02
    layer = Fp8Linear.quantized(linear)
    x = torch.randn(rows, inner, device=DEVICE, generator=g, dtype=torch.bfloat16)
    x[0] *= 40  # rows of very different sizes: each gets its own scale
    fast = fp8_linear_cuda(x, layer.weight, layer.weight_scale)
    assert torch.equal(layer(x), fast)  # the module takes this path on CUDA
    exact = fp8_linear_reference(x.float(), layer.weight, layer.weight_scale)  # float32 out: no final rounding
    error = ((fast.float() - exact).abs().amax(dim=-1) / exact.abs().amax(dim=-1)).max().item()
    bf16 = x.float() @ linear.weight.float().t()  # the product FP8 replaces: its own quantization error, printed
    quantization = ((exact - bf16).abs().amax() / bf16.abs().amax()).item()
    print(f"rows {rows}, {inner} -> {outer}: kernel vs definition {error:.2e}, FP8 vs bf16 {quantization:.2e}")
    assert error < 8e-3  # bf16's rounding of the output (2^-8) and the accumulation order, nothing more


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("inner, outer", [(4096, 6144), (14336, 4096), (96, 80)])
def test_kernel_partial_products_sum_to_the_exact_product(rows, inner, outer):
    g = torch.Generator(device=DEVICE).manual_seed(rows * inner + outer)
    q_x, _ = quantization.quantize_rows(torch.randn(rows, inner, device=DEVICE, generator=g))
    q_w, _ = quantization.quantize_rows(torch.randn(outer, inner, device=DEVICE, generator=g))
    parts = fp8_kernel.partial_products(q_x, q_w)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    assert parts.shape == (fp8_kernel.splits_for(outer, inner, sm), rows, outer) and parts.dtype == torch.float32
    exact = q_x.double() @ q_w.double().t()  # e4m3 products are exact: only float32 sums differ
    error = ((parts.sum(0).double() - exact).abs().max() / exact.abs().max()).item()
    print(f"kernel rows {rows}, {inner} -> {outer}, {parts.shape[0]} splits: {error:.1e}")
    assert error < 1e-5


def test_small_rows_take_the_kernel_inside_a_compiled_graph(monkeypatch):
    calls = []
    kernel = fp8_kernel.partial_products

    def counted(q_x, q_w):
        calls.append(q_x.shape[0])
        return kernel(q_x, q_w)
    monkeypatch.setattr(fp8_kernel, "partial_products", counted)
    linear = torch.nn.Linear(4096, 6144, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer = Fp8Linear.quantized(linear)
    for rows in (1, quantization.KERNEL_ROWS, quantization.KERNEL_ROWS + 1):
        x = torch.randn(rows, 4096, device=DEVICE, dtype=torch.bfloat16)
        eager = fp8_linear_cuda(x, layer.weight, layer.weight_scale)
        compiled = torch.compile(fp8_linear_cuda, dynamic=False)
        static = x.clone()
        compiled(static, layer.weight, layer.weight_scale)  # compiles (and warms up) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(static, layer.weight, layer.weight_scale)
        static.copy_(x)
        graph.replay()
        exact = fp8_linear_reference(x.float(), layer.weight, layer.weight_scale)
        for result in (eager, out):
            assert ((result.float() - exact).abs().max() / exact.abs().max()).item() < 8e-3
    assert 1 in calls and quantization.KERNEL_ROWS in calls and quantization.KERNEL_ROWS + 1 not in calls


def test_a_3d_input_and_bias():
    linear = torch.nn.Linear(256, 512, bias=True, device=DEVICE, dtype=torch.bfloat16)
    layer = Fp8Linear.quantized(linear)
    x = torch.randn(2, 5, 256, device=DEVICE, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 5, 512) and out.dtype == torch.bfloat16
    exact = fp8_linear_reference(x.float(), layer.weight, layer.weight_scale, layer.bias)
    assert ((out.float() - exact).abs().max() / exact.abs().max()).item() < 8e-3


# --- the FP8 model: fast path and engine against the reference path, and against bf16 --------------------------

STEPS = 64


@pytest.fixture(scope="module")
def tiny_fp8(tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor

    load = dict(dtype=torch.bfloat16, device_map=DEVICE)
    fp8 = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), quantize="fp8", **load)
    bf16 = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), **load)
    return fp8, bf16, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _image_prompt(processor):
    import PIL.Image

    pixels = (torch.rand(70, 50, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8).numpy()
    inputs = processor(images=[[PIL.Image.fromarray(pixels)]], text=["<|image|>Describe the picture."],
                       return_tensors="pt")
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def _teacher_forced(model, inputs, sequence):
    """Logits [steps, vocab] that `model`'s plain forward gives at each generated position of `sequence`."""
    prompt = inputs["input_ids"].shape[1]
    steps = sequence.shape[1] - prompt
    given = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    given["cross_attention_mask"] = extend_cross_attention_mask(inputs["cross_attention_mask"], steps - 1)
    with torch.no_grad():
        logits = model(input_ids=sequence[:, :-1], **given).logits
    return logits[0, prompt - 1:].float()


def _reference_products(monkeypatch):
    """The plain forward with every FP8 product computed by the definition (float32 dequantized operands)."""
    monkeypatch.setattr(quantization, "fp8_linear_cuda", quantization.fp8_linear_reference)


def _gaps(reference: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """How far below the reference's best logit each chosen token's logit is (0 where they agree)."""
    return reference.max(dim=-1).values - reference.gather(-1, chosen[:, None])[:, 0]


def test_fp8_fast_path_and_engine_against_the_fp8_reference(tiny_fp8, monkeypatch):
    from collecting import Collector
    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams

    model, _, processor = tiny_fp8
    inputs = _image_prompt(processor)
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                         fast=True, return_dict_in_generate=True, output_logits=True)
    fast_logits = torch.stack(out.logits)[:, 0].float()
    engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=256, use_graphs=True, pages=(64, 64))
    engine.eos = ()
    engine.start()
    try:
        collector = Collector()
        given = {k: v.cpu() for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        engine.submit(GenerationRequest(prompt_ids=inputs["input_ids"][0].tolist(), model_inputs=given,
                                        emit=collector, params=SamplingParams(max_new_tokens=STEPS,
                                                                              min_new_tokens=STEPS, do_sample=False)))
        assert collector.done.wait(300) and collector.events[-1].error is None
    finally:
        engine.stop()
    engine_tokens = torch.tensor([collector.ids], device=DEVICE)
    _reference_products(monkeypatch)
    reference = _teacher_forced(model, inputs, out.sequences)
    error = (fast_logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    worst = (fast_logits - reference).abs().amax(dim=-1)  # per step
    fast_gaps = _gaps(reference, out.sequences[0, prompt:])
    engine_reference = _teacher_forced(model, inputs, torch.cat([inputs["input_ids"], engine_tokens], 1))
    engine_gaps = _gaps(engine_reference, engine_tokens[0])
    print(f"FP8 fast path vs FP8 reference over {STEPS} steps: relative logit error mean {error.mean():.2e} max "
          f"{error.max():.2e}, "
          f"agreement {(fast_gaps == 0).float().mean():.3f}; engine agreement {(engine_gaps == 0).float().mean():.3f}")
    # bf16 activations between the products round differently one token at a time than over the whole sequence,
    # and a per-token activation scale turns that into whole e4m3 steps: a few percent at worst, but well below
    # FP8's own error against bf16 (mean 4.8e-2 on the H200: the unquantized model would be caught here); seen:
    # mean 1.2e-2 on the CPU (the reference product on both sides), 2.5e-2 and 2.6e-2 on the H200
    assert error.mean() < 3.5e-2 and error.max() < 6e-2
    # a token chosen where the reference prefers another only where the two logits lie within the numerical error
    assert bool((fast_gaps <= 2 * worst).all()), (fast_gaps, worst)
    assert bool((engine_gaps <= 2 * worst.max()).all()), engine_gaps


def test_fp8_against_bf16_over_teacher_forced_steps(tiny_fp8):
    """The quantization's own error, printed: the FP8 model teacher-forced on the bf16 model's greedy answer."""
    fp8, bf16, processor = tiny_fp8
    inputs = _image_prompt(processor)
    prompt = inputs["input_ids"].shape[1]
    out = bf16.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                        fast=True)
    ours, theirs = _teacher_forced(fp8, inputs, out), _teacher_forced(bf16, inputs, out)
    error = ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1))
    agreement = (ours.argmax(-1) == out[0, prompt:]).float().mean().item()
    print(f"FP8 vs bf16 over {STEPS} teacher-forced steps: relative logit error mean {error.mean():.3e} max "
          f"{error.max():.3e}; greedy agreement {agreement:.3f}")
    assert error.max() < 0.2  # e4m3 keeps 3 mantissa bits: a few percent per product
    assert agreement >= 0.75
    assert error.mean() > 1e-3  # the layers really are FP8 (an unquantized model would agree to bf16 rounding)


def test_fp8_engine_warm_up_keeps_its_compiled_layers_for_every_rows_bucket(tiny_fp8):
    """The serving engine's warm-up compiles the layer calls for every rows bucket up to --max-batch (FP8's
    products branch at 16 and 64 rows); a compile that runs out of recompiles would leave every step eager."""
    from mllama.engine.batch import BatchEngine

    model, _, processor = tiny_fp8
    engine = BatchEngine(model, processor.tokenizer, max_batch=96, max_model_len=256, use_graphs=True, pages=(64, 64))
    engine.start()
    try:
        assert engine.runner.compile_error is None and engine.runner.calls.compiled
        assert engine.runner.graphs.failed is None
    finally:
        engine.stop()
