"""Shared fixtures: small random Mllama models whose every gate and tile table is non-zero."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mllama import MllamaConfig  # noqa: E402

IMAGE = 320  # image token id of the test configs (= text vocab_size, the first "learnable" embedding row)
BOS, PAD = 1, 0

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_config(image_size: int = 28, patch_size: int = 14, compat: str = "meta") -> MllamaConfig:
    """Tiny shapes with GQA, llama3 RoPE, two cross layers; image_size=560 gives the real tile geometry."""
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=32, attention_heads=4,
                  intermediate_size=64, num_hidden_layers=4, num_global_layers=2, intermediate_layers_indices=[0, 2, 3],
                  vision_output_dim=128)
    text = dict(vocab_size=IMAGE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                num_hidden_layers=6, cross_attention_layers=[1, 4], pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=2, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=256)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, compat=compat)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Random weights everywhere, including gates, tile tables and norm scales (a zero gate hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf:
                p.copy_(torch.rand(p.shape, generator=gen) * 1.2 + 0.3)  # tanh(gate) in ~[0.3, 0.95]
            elif "norm" in name:
                p.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name and "embed_tokens" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def cross_mask(ids: list[list[int]], num_tiles: list[list[int]], max_tiles: int = 4) -> torch.Tensor:
    """Dense [B, S, N, T] cross-attention mask written from the rule in the spec (image k visible from its token
    to the next image token; a run of adjacent image tokens shares the run's end; the last image to the end)."""
    batch, length = len(ids), len(ids[0])
    max_images = max(1, max(len(n) for n in num_tiles))
    mask = torch.zeros(batch, length, max_images, max_tiles, dtype=torch.long)
    for b, row in enumerate(ids):
        locs = [i for i, t in enumerate(row) if t == IMAGE]
        for k, start in enumerate(locs):
            end, j = length, k
            while j + 1 < len(locs) and locs[j + 1] == locs[j] + 1:
                j += 1
            if j + 1 < len(locs):
                end = locs[j + 1]
            mask[b, start:end, k, :num_tiles[b][k]] = 1
    return mask


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mllama")


@pytest.fixture(scope="session")
def tokenizer_model_path():
    """Meta's Llama 3 tokenizer.model, shipped inside the llama-models wheel (a test-only dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_models")
    assert spec is not None, "llama-models is a test dependency: pip install --no-deps llama-models"
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint with the real tokenizer and instruct template (what `mllama create-tiny` writes).
    Its tokenizer files are copied from the session's instruct conversion of Meta's tokenizer.model, which
    convert_tiktoken would write again byte for byte (test_cli runs create-tiny on tokenizer.model itself)."""
    from conftest_tokenizer import converted_dir
    from mllama.cli import create_tiny

    return create_tiny(tmp_path_factory.mktemp("tiny-ckpt"), converted_dir(True))


_GPU_TESTS = Path(__file__).parent / "gpu"


def pytest_collection_modifyitems(config, items):
    """tests/gpu/ needs CUDA (CUDA graphs, compiled paths): run there on the GPU machine, skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (CUDA graphs and compiled paths); run on the GPU machine")
    for item in items:
        if _GPU_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(skip)
