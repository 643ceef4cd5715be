"""Loading a model and its processor by name, for the command line and the server (which both import it)."""
from __future__ import annotations

import argparse

DTYPES = ("auto", "bfloat16", "float16", "float32")


class CliError(Exception):
    """An error whose message is shown to the user as one line."""


def as_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise CliError(f"--dtype {name!r} is not a dtype the model runs in: use {', '.join(DTYPES)}")
    return name if name == "auto" else getattr(torch, name)


def check_load_args(quantize: str | None, load_format: str) -> None:
    from .modeling.base import LOAD_FORMATS
    from .quantization import QUANTIZE_CHOICES

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise CliError(f"--quantize {quantize!r} is not supported: use {', '.join(QUANTIZE_CHOICES)}")
    if load_format not in LOAD_FORMATS:
        raise CliError(f"--load-format {load_format!r} is not supported: use {' or '.join(LOAD_FORMATS)}")


def load(model_id: str, dtype: str, device: str, text_only: bool = False, quantize: str | None = None,
         load_format: str = "safetensors"):
    from .modeling.mllama import MllamaForCausalLM, MllamaForConditionalGeneration
    from .processing.processor import AutoProcessor

    check_load_args(quantize, load_format)
    cls = MllamaForCausalLM if text_only else MllamaForConditionalGeneration
    model = cls.from_pretrained(model_id, dtype=as_dtype(dtype), device_map=device, quantize=quantize,
                                load_format=load_format)
    processor = AutoProcessor.from_pretrained(model_id)
    return model, processor


def add_load_args(p: argparse.ArgumentParser) -> None:
    """--quantize and --load-format, for generate, chat and serve."""
    p.add_argument("--quantize", help="fp8: the text model's linear layers in FP8 (e4m3 weights with per-channel "
                   "scales, activations quantized per token), quantized as they load (an FP8 checkpoint loads as "
                   "FP8 without it)")
    p.add_argument("--load-format", default="safetensors", help="safetensors (default): the checkpoint's weights; "
                   "dummy: random weights at the config's shapes, for measuring speed and memory (the folder needs "
                   "config.json and the processor's files only; the answers are noise)")
