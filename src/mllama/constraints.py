"""Constrained decoding: answers that follow a JSON schema (OpenAI's `response_format`), through llguidance.

Why llguidance: it needs no other package (xgrammar needs transformers and triton; outlines-core was the other
candidate without dependencies), it takes JSON schemas as they are written, computes a token mask on the CPU in
well under a millisecond for Llama 3's 128k-token vocabulary (0.08 ms median with the unpacking, measured on the
tiny checkpoint's tokenizer, which is Llama 3's), and names what it cannot compile.

- `Grammars(tokenizer)`: llguidance's view of the tokenizer (built once: about 1 s), and `compile`, which turns a
  `response_format` into a grammar (a string, so it can cross to the engine's process), raising `GrammarError`
  with the field and the reason for anything it cannot compile. Compiled grammars are cached by their schema.
- `Constraint(grammars, grammar)`: one request's matcher; `accept(token)` advances it.
- `Masks`: the masks of one step's constrained rows (the tokens that keep each answer valid, and the request's end
  tokens where its grammar may end), computed on the host in llguidance's threads while the device computes the
  step's logits, copied to the device in one transfer and applied there to all the rows at once.

The engine applies the masks to the step's logits before each request's own choice (temperature, top-p, ...):
the decode step's CUDA graphs are unchanged (engine.batch).
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

    def accept(self, token: int, end_tokens: tuple[int, ...]) -> None:
        """Advances past a chosen token (an end token ends the answer: nothing to advance)."""
        if token in end_tokens:
            return
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} does not follow the grammar: {self.matcher.get_error()}")


class Masks:
    """Token masks for up to `rows` constrained rows at a time, over a vocabulary of `vocab` logits.

    Bits as llguidance packs them: token t is bit t % 32 of int32 word t // 32. The host fills a (pinned) buffer;
    the device unpacks it. The engine fills it again only after it has read the tokens of the step whose choice
    copied it (their copy is queued behind that one), so one buffer serves every step."""

    def __init__(self, grammars: Grammars, rows: int, vocab: int, device):
        self.grammars, self.vocab, self.device = grammars, vocab, torch.device(device)
        words = (grammars.vocab_size + 31) // 32
        pinned = self.device.type == "cuda"
        self.buffer = torch.zeros((rows, words), dtype=torch.int32, pin_memory=pinned)
        self.host = self.buffer.numpy()
        self.bits = self.host.view(np.uint32)
        self.executor = llguidance.LLExecutor()
        if self.device.type != "cpu":
            index = torch.arange(vocab, device=self.device)
            self.word, self.shift = index >> 5, (index & 31).to(torch.int32)

    def fill(self, constraints: list[Constraint], end_tokens: list[tuple[int, ...]]) -> list[int]:
        """Computes the masks of `constraints` into the buffer's first rows (in parallel); returns the rows whose
        mask allows no token at all (their requests cannot go on)."""
        if len(constraints) > self.host.shape[0]:
            raise ValueError(f"{len(constraints)} constrained rows, more than the {self.host.shape[0]} masks held")
        self.executor.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(constraints)],
                                              self.host.ctypes.data, self.host.shape[1] * 4, self.host.shape[0])
        own_end = self.grammars.tokenizer.eos_token
        empty = []
        for i, (c, ends) in enumerate(zip(constraints, end_tokens)):
            row = self.bits[i]
            if c.matcher.is_accepting() or self._has(row, own_end):
                for t in ends:
                    if t < self.vocab:
                        row[t >> 5] |= np.uint32(1 << (t & 31))
            if own_end not in ends:  # llguidance's end token is not this request's: it would not end the answer
                row[own_end >> 5] &= ~np.uint32(1 << (own_end & 31))
            if not self._has_any(row):
                empty.append(i)
        return empty

    def _has(self, row: np.ndarray, token: int) -> bool:
        return token < self.vocab and bool((row[token >> 5] >> np.uint32(token & 31)) & np.uint32(1))

    def _has_any(self, row: np.ndarray) -> bool:
        full, rest = divmod(self.vocab, 32)
        return bool(row[:full].any()) or bool(rest and row[full] & np.uint32((1 << rest) - 1))

    def allowed(self, rows: int) -> torch.Tensor:
        """[rows, vocab] bool on the device: the filled masks, unpacked there (one transfer, not waited for); on
        the CPU by numpy (a gather per bit is 30 times slower there)."""
        if self.device.type == "cpu":
            bits = np.unpackbits(self.host[:rows].view(np.uint8), axis=1, bitorder="little")[:, :self.vocab]
            return torch.from_numpy(bits.view(np.bool_))
        words = self.buffer[:rows].to(self.device, non_blocking=True)
        return ((words[:, self.word] >> self.shift) & 1).bool()
