"""Shared oracles for the tokenizer, processor and chat-template tests.

The converted tokenizer is built once per test session (the cache lives in this module, which every test file
imports): Meta's tokenizer.model from the llama-models wheel -> our converter -> a folder that both mllama and
transformers load.
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

# A copy of ../shared/data/llama32-vision-instruct-chat-template.jinja, the published instruct template.
TEMPLATE_PATH = Path(__file__).resolve().parent / "data/llama32-vision-instruct-chat-template.jinja"
PACKAGED_TEMPLATE = Path(__file__).resolve().parents[1] / "src/mllama/data/llama32-vision-instruct-chat-template.jinja"

# Meta's Tokenizer.pat_str.
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def meta_tokenizer_model() -> Path:
    """tokenizer.model shipped inside the llama-models wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None, "pip install --no-deps llama-models==0.3.0 (test dependency: Meta's tokenizer.model)"
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    assert path.is_file(), path
    return path


def template_text() -> str:
    path = TEMPLATE_PATH if TEMPLATE_PATH.is_file() else PACKAGED_TEMPLATE
    return path.read_text()


@functools.lru_cache(maxsize=None)
def converted_dir(instruct: bool = True) -> Path:
    from mllama.processing.convert_tiktoken import convert

    out = Path(tempfile.mkdtemp(prefix=f"mllama-tok-{'instruct' if instruct else 'base'}-"))
    atexit.register(shutil.rmtree, out, True)
    convert(meta_tokenizer_model(), out, instruct=instruct)
    return out


@functools.lru_cache(maxsize=None)
def hf_tokenizer(instruct: bool = True):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted_dir(instruct)))


@functools.lru_cache(maxsize=None)
def hf_special_tokens() -> dict[str, int]:
    from mllama.processing.convert_tiktoken import llama32_vision_special_tokens

    return {t: 128000 + i for i, t in enumerate(llama32_vision_special_tokens())}


@functools.lru_cache(maxsize=None)
def tiktoken_encoding():
    """tiktoken with Meta's ranks and regex, and the special tokens at the ids of the published checkpoints."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(
        name="llama32-vision",
        pat_str=META_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(meta_tokenizer_model())),
        special_tokens=hf_special_tokens(),
    )


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return converted_dir(True)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from mllama.processing.tokenizer import MllamaTokenizer

    return MllamaTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tik():
    return tiktoken_encoding()
