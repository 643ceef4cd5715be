"""Loading a model and its processor by name, for the command line and the server (which both import it)."""
from __future__ import annotations

DTYPES = ("auto", "bfloat16", "float16", "float32")


class CliError(Exception):
    """An error whose message is shown to the user as one line."""


def as_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise CliError(f"--dtype {name!r} is not a dtype the model runs in: use {', '.join(DTYPES)}")
    return name if name == "auto" else getattr(torch, name)


def load(model_id: str, dtype: str, device: str, text_only: bool = False, quantize: str | None = None):
    from .modeling.mllama import MllamaForCausalLM, MllamaForConditionalGeneration
    from .processing.processor import AutoProcessor
    from .quantization import QUANTIZE_CHOICES

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise CliError(f"--quantize {quantize!r} is not supported: use {', '.join(QUANTIZE_CHOICES)}")
    cls = MllamaForCausalLM if text_only else MllamaForConditionalGeneration
    model = cls.from_pretrained(model_id, dtype=as_dtype(dtype), device_map=device, quantize=quantize)
    processor = AutoProcessor.from_pretrained(model_id)
    return model, processor
