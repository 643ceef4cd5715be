"""Constrained decoding: answers that follow a JSON schema (OpenAI's `response_format`), through llguidance.

Why llguidance: it needs no other package (xgrammar needs transformers and triton; outlines-core was the other
candidate without dependencies), it takes JSON schemas as they are written, computes a token mask on the CPU in
well under a millisecond for Llama 3's 128k-token vocabulary (0.08 ms median with the unpacking, measured on the
tiny checkpoint's tokenizer, which is Llama 3's), and names what it cannot compile.

- `Grammars(tokenizer)`: llguidance's view of the tokenizer (built once: about 1 s), and `compile`, which turns a
  `response_format` into a grammar (a string, so it can cross to the engine's process), raising `GrammarError`
  with the field and the reason for anything it cannot compile. Compiled grammars are cached by their schema.
- `Constraint(grammars, grammar)`: one request's matcher. `allowed(...)` is the mask of the tokens that keep the
  answer valid (the request's end tokens once the grammar accepts); `accept(token)` advances it.

The engine chooses a constrained row's token on the host path (engine.batch), with the mask applied to its logits
before the request's own sampling (temperature, top-p, ...): the decode step's CUDA graphs are unchanged.
"""
from __future__ import annotations

import collections
import json
import threading
from typing import Any

import numpy as np
import torch

try:
    import llguidance
except ImportError:  # the `structured` extra is not installed
    llguidance = None

CACHE_SIZE = 256  # compiled grammars kept, by schema


class GrammarError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def schema_of(response_format: Any) -> tuple[dict | None, str]:
    """OpenAI's response_format -> (the JSON schema to follow or None for plain text, the field it came from);
    GrammarError naming the field for anything else."""
    if response_format is None:
        return None, ""
    if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                   "json_schema"):
        raise GrammarError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           "response_format")
    kind = response_format["type"]
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return {"type": "object"}, "response_format"
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise GrammarError("response_format.json_schema must be an object with a 'name' and a 'schema'",
                           "response_format.json_schema")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema.schema must be a JSON schema (an object)",
                           "response_format.json_schema.schema")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise GrammarError("response_format.json_schema.strict must be true or false",
                           "response_format.json_schema.strict")
    return schema, "response_format.json_schema.schema"


class Grammars:
    """llguidance's tokenizer for one model's tokenizer, and the grammars compiled against it."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        if llguidance is None:
            raise RuntimeError("response_format needs llguidance: pip install 'mllama[structured]'")
        backend = getattr(tokenizer, "_tokenizer", tokenizer)  # MllamaTokenizer wraps a tokenizers.Tokenizer
        self.vocab_size = max(vocab_size or 0, len(tokenizer))
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size)
        self._cache: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, response_format: Any) -> str | None:
        """The grammar of a response_format (None: plain text); GrammarError naming the part at fault."""
        schema, param = schema_of(response_format)
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(f"{param} cannot be compiled: {e}", param) from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"{param} cannot be compiled: {error.strip()}", param)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, grammars: Grammars, grammar: str):
        self.grammars = grammars
        self.matcher = llguidance.LLMatcher(grammars.tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(f"the grammar did not compile: {self.matcher.get_error()}")

    def allowed(self, vocab: int, end_tokens: tuple[int, ...], device) -> torch.Tensor:
        """[vocab] bool: the tokens that keep the answer inside the grammar; the end tokens where it may end."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[:min(vocab, bits.shape[0])] = torch.from_numpy(bits[:vocab].astype(bool))
        own_end = self.grammars.tokenizer.eos_token
        if self.matcher.is_accepting() or (own_end < vocab and bool(mask[own_end])):
            mask[[t for t in end_tokens if t < vocab]] = True
        if own_end < vocab and own_end not in end_tokens:
            mask[own_end] = False  # llguidance's end token is not this request's: it would not end the answer
        return mask.to(device)

    def accept(self, token: int, end_tokens: tuple[int, ...]) -> None:
        """Advances past a chosen token (an end token ends the answer: nothing to advance)."""
        if token in end_tokens:
            return
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} does not follow the grammar: {self.matcher.get_error()}")
