"""pytest plugin: transformers' Mllama classes replaced by mllama's before any test module is imported.

Loaded by `bench/transformers_suite.py` with `-p transformers_suite_rebind`. Every public name mllama shares with
transformers' mllama package is set on `transformers`, on `transformers.models.mllama` (where the Auto mappings
look names up, so the image-processor tests find mllama's classes through `IMAGE_PROCESSOR_MAPPING_NAMES`) and
on the submodule that defines it there. Nothing else of transformers is touched: its tokenizer classes, the
Auto classes and the test mixins stay transformers' own.
"""
from __future__ import annotations

import importlib

import mllama
import transformers

REBOUND = (
    "MllamaConfig", "MllamaTextConfig", "MllamaVisionConfig",
    "MllamaForCausalLM", "MllamaForConditionalGeneration", "MllamaModel", "MllamaTextModel", "MllamaVisionModel",
    "MllamaProcessor", "MllamaImageProcessor", "MllamaImageProcessorPil",
)

SUBMODULES = (
    "configuration_mllama", "modeling_mllama", "processing_mllama", "image_processing_mllama",
    "image_processing_pil_mllama",
)


def rebind() -> list[str]:
    """Set mllama's classes in transformers' namespaces; return 'module.name' for each binding made."""
    package = importlib.import_module("transformers.models.mllama")
    modules = [transformers, package]
    for name in SUBMODULES:
        try:
            modules.append(importlib.import_module(f"transformers.models.mllama.{name}"))
        except ImportError:
            continue
    made = []
    for name in REBOUND:
        ours = getattr(mllama, name)
        for module in modules:
            if module in (transformers, package) or name in vars(module):
                setattr(module, name, ours)
                made.append(f"{module.__name__}.{name}")
    return made


BINDINGS = rebind()


def pytest_report_header(config):
    return f"mllama {mllama.__version__} ({mllama.__file__}) rebound: {', '.join(REBOUND)}"
