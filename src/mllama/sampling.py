"""Choosing tokens from logits (the sampling rules generate and the serving engine share) and turning token ids
back into streamed text. Nothing here knows about the model or the engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Temperatures below this act as greedy (vLLM's rule too): logits divided by a value near zero overflow float32 to
# inf (2e-39 does), and softmax of inf is nan; greedy is the limit such a temperature means.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # tokens less likely than min_p times the most likely one are dropped (0 = off)
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences whose last token is banned after the rest
    remove_invalid_values: bool = False  # nan scores -> 0, +-inf -> the float32 extremes
    min_tokens_to_keep: int = 1  # top-k / top-p keep at least this many (beam sampling keeps 1 + number of EOS)
    # OpenAI's: added to the logits, per token id; minus presence (once a token was generated) and frequency
    # (times it was generated) penalties, counted over the generated tokens only, not the prompt
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.do_sample and 0 < self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.do_sample = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens, got {self.min_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError(f"presence_penalty and frequency_penalty must be in [-2, 2], got "
                             f"{self.presence_penalty} and {self.frequency_penalty}")
        if any(token < 0 or not -100 <= value <= 100 for token, value in self.logit_bias):
            raise ValueError(f"logit_bias takes token ids >= 0 and biases in [-100, 100], got {self.logit_bias}")
        if any(not words or min(words) < 0 for words in self.bad_words_ids):
            raise ValueError(f"bad_words_ids must be non-empty lists of token ids >= 0, got {self.bad_words_ids}")


def _as_tuple(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, int):
        return (ids,)
    return tuple(int(i) for i in ids)


def resolve_params(model, kwargs: dict, prompt_len: int = 0) -> SamplingParams:
    """Explicit arguments, else the checkpoint's generation_config.json, else the text config, else defaults."""
    defaults = dict(getattr(model, "generation_config", None) or {})
    text = getattr(model.config, "text_config", model.config)

    def pick(name, fallback):
        value = kwargs.pop(name, None)
        if value is None:
            value = defaults.get(name)
        return fallback if value is None else value

    max_length = kwargs.pop("max_length", None)
    if kwargs.get("max_new_tokens") is None and max_length is not None:
        kwargs["max_new_tokens"] = max_length - prompt_len  # transformers' max_length counts the prompt
    params = SamplingParams(
        max_new_tokens=int(pick("max_new_tokens", 20)),
        min_new_tokens=int(pick("min_new_tokens", 0)),
        do_sample=bool(pick("do_sample", False)),
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0)),
        min_p=float(pick("min_p", 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        eos_token_id=_as_tuple(pick("eos_token_id", text.eos_token_id)),
        pad_token_id=pick("pad_token_id", text.pad_token_id),
        stop_strings=tuple([s] if isinstance(s := kwargs.pop("stop_strings", None) or (), str) else s),
        remove_invalid_values=bool(pick("remove_invalid_values", False)),
    )
    params.bad_words_ids = _bad_words(pick("bad_words_ids", ()), params.eos_token_id)
    params.validate()
    return params


def _bad_words(value: Any, eos: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """bad_words_ids as tuples; a single EOS token among them stays allowed (transformers' rule too)."""
    if not isinstance(value, (list, tuple)) or any(not isinstance(w, (list, tuple)) for w in value):
        raise ValueError(f"bad_words_ids must be a list of lists of token ids, got {value!r}")
    words = tuple(tuple(int(t) for t in w) for w in value)
    return tuple(w for w in words if not (len(w) == 1 and w[0] in eos))


# ---------------------------------------------------------------------------------------------------------------
# Logit processing (the order transformers uses: penalty, bad words, min-length, invalid values, then temperature,
# top-k, top-p)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already in the sequence: positive logits divided by `penalty`, negative ones multiplied. Ids the
    model cannot produce (the image token is past the output vocabulary) have no logit to penalise: they go to one
    extra column, dropped after."""
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    seen = seen.clamp(max=vocab)
    padded = F.pad(logits, (0, 1))
    scores = padded.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return padded.scatter(1, seen, scores)[..., :vocab]


def apply_openai_biases(scores: torch.Tensor, generated: torch.Tensor | None, params: SamplingParams
                        ) -> torch.Tensor:
    """OpenAI's logit_bias (added per token id), then presence and frequency penalties over the `generated` ids
    [rows, n]: each token's logit minus presence_penalty if it was generated and frequency_penalty times the
    times it was (ids past the output vocabulary, such as the image token, count for nothing)."""
    if params.logit_bias:
        ids = on_device([token for token, _ in params.logit_bias], scores.device)
        bias = on_device([value for _, value in params.logit_bias], scores.device, scores.dtype)
        scores = scores.index_add(1, ids, bias.expand(scores.shape[0], -1))
    if (params.presence_penalty or params.frequency_penalty) and generated is not None and generated.shape[1]:
        vocab = scores.shape[-1]
        counts = torch.zeros(scores.shape[0], vocab + 1, dtype=scores.dtype, device=scores.device)
        counts = counts.scatter_add(1, generated.clamp(max=vocab).to(scores.device),
                                    torch.ones(generated.shape, dtype=scores.dtype, device=scores.device))[:, :vocab]
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


def filter_logits(logits: torch.Tensor, temperature, top_k, top_p, min_keep=1, min_p=0.0) -> torch.Tensor:
    """Sampling distribution as logits: scaled by temperature, everything outside top-k, outside the smallest
    set whose probability reaches top_p, and then less likely than min_p times the most likely token set to -inf
    (at least `min_keep` tokens always stay).

    Each knob is one value for every row or a sequence of one per row (the serving engine's rows each have their
    own): a row's result is the same either way, to the bit, so a request samples what it would alone."""
    rows, vocab = logits.shape
    temperature, top_k, top_p, min_keep, min_p = (_rows(v, rows) for v in (temperature, top_k, top_p, min_keep,
                                                                           min_p))
    device = logits.device
    logits = logits / on_device(temperature, device, torch.float32)[:, None]
    keep = [min(max(k, m), vocab) if k else 0 for k, m in zip(top_k, min_keep)]
    if any(keep):
        values = torch.topk(logits, max(keep), dim=-1).values
        kth = values.gather(1, on_device([max(k, 1) - 1 for k in keep], device)[:, None])
        off = on_device([not k for k in keep], device, torch.bool)[:, None]
        logits = logits.masked_fill((logits < kth) & ~off, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        threshold = on_device([1 - p for p in top_p], device, torch.float32)[:, None]
        kept = on_device([vocab - m if p < 1.0 else 0 for p, m in zip(top_p, min_keep)], device)
        drop = (cumulative <= threshold) & (torch.arange(vocab, device=device) < kept[:, None])
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if any(p > 0 for p in min_p):
        probs = logits.softmax(-1)
        floor = on_device(min_p, device, torch.float32)[:, None] * probs.max(-1, keepdim=True).values
        kept = torch.topk(logits, max(min_keep), dim=-1).values.gather(1, on_device([m - 1 for m in min_keep],
                                                                                    device)[:, None])
        logits = logits.masked_fill((probs < floor) & (logits < kept), float("-inf"))
    return logits


def on_device(values: list, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A small tensor of host values on `device`, copied without waiting for the work queued there (through
    pinned memory: a plain copy from the host waits for the device to finish all it was given, first)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _rows(value, rows: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * rows
    if len(values) != rows:
        raise ValueError(f"{len(values)} values for {rows} rows")
    return values


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """One sampled token for each row of `logits` [rows, vocab] under its own params (temperature, top-k, top-p,
    min-p; nothing else) and generator: what next_tokens gives each row alone, with the distributions computed
    for all rows at once (rows with a generator then draw one by one; the others together, from the global one)."""
    scores = filter_logits(logits.float(), [p.temperature for p in params], [p.top_k for p in params],
                           [p.top_p for p in params], [p.min_tokens_to_keep for p in params],
                           [p.min_p for p in params])
    probs = scores.softmax(-1)
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    free = [row for row, g in enumerate(generators) if g is None]
    if free:
        index = on_device(free, logits.device)
        tokens[index] = torch.multinomial(probs[index], 1).squeeze(1)
    for row, g in enumerate(generators):
        if g is not None:
            tokens[row:row + 1] = torch.multinomial(probs[row:row + 1], 1, generator=g).squeeze(1)
    return tokens


def ban_bad_words(scores: torch.Tensor, seen: torch.Tensor, bad_words_ids: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """-inf for the last token of each bad word in the rows whose sequence ends with the word's other tokens."""
    vocab = scores.shape[-1]
    if any(t >= vocab for word in bad_words_ids for t in word):
        raise ValueError(f"bad_words_ids {bad_words_ids} hold ids outside the model's {vocab} output tokens")
    scores = scores.clone()
    for word in bad_words_ids:
        *prefix, last = word
        if len(prefix) > seen.shape[1]:
            continue
        rows = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        if prefix:
            rows = (seen[:, -len(prefix):] == torch.tensor(prefix, device=seen.device)).all(-1).to(scores.device)
        scores[rows, last] = float("-inf")
    return scores


def remove_invalid(scores: torch.Tensor) -> torch.Tensor:
    info = torch.finfo(scores.dtype)
    return scores.nan_to_num(nan=0.0, posinf=info.max, neginf=info.min)


def processed_scores(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, new_count: int,
                     eos: torch.Tensor | None = None) -> torch.Tensor:
    """The scores tokens are chosen from (and output_scores returns, as transformers defines them): the logits in
    float32 after the repetition penalty and the min-length rule and, when sampling, after temperature, top-k and
    top-p. eos: the EOS ids already on the logits' device (indexing with a host list would sync every step)."""
    scores = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    scores = apply_openai_biases(scores, seen[:, seen.shape[1] - new_count:] if seen is not None else None, params)
    if params.bad_words_ids:
        scores = ban_bad_words(scores, seen, params.bad_words_ids)
    if new_count < params.min_new_tokens and params.eos_token_id:
        if eos is None:
            eos = on_device(list(params.eos_token_id), scores.device)
        scores = scores.index_fill(1, eos, float("-inf"))
    if params.remove_invalid_values:
        scores = remove_invalid(scores)
    if params.do_sample:
        scores = filter_logits(scores, params.temperature, params.top_k, params.top_p, params.min_tokens_to_keep,
                               params.min_p)
    return scores


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, new_count: int,
                generator: torch.Generator | None, eos: torch.Tensor | None = None) -> torch.Tensor:
    return choose(processed_scores(logits, seen, params, new_count, eos), params, generator)


def choose(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from processed scores: the best, or a sample when do_sample."""
    if not params.do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def pad_id(params: SamplingParams) -> int:
    """The token finished rows get: pad_token_id, else the first EOS id, else 0."""
    return params.pad_token_id if params.pad_token_id is not None else (params.eos_token_id or (0,))[0]


# ---------------------------------------------------------------------------------------------------------------
# The loop


class TextDecoder:
    """Turns a growing list of token ids into new text pieces, holding back text that ends in an incomplete
    UTF-8 sequence (a multi-byte character split across tokens decodes to U+FFFD until it is complete).

    Each push decodes only the ids since the last emitted piece plus the piece before it, not the whole list, so
    a long answer costs the same per token as a short one. Byte-level BPE text is the concatenation of its
    tokens' bytes, so the pieces add up to the decoding of the whole list."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.start = 0   # ids before `start` are decoded and emitted for good
        self.read = 0    # ids[start:read] are the last emitted piece

    def _pieces(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        done = decode(self.ids[self.start:self.read], skip_special_tokens=self.skip_special_tokens)
        return done, decode(self.ids[self.start:], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done, text = self._pieces()
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        done, text = self._pieces()
        self.start, self.read = self.read, len(self.ids)
        return text[len(done):]
