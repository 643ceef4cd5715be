"""Generation on top of the model: prefill once, then one token per step on a preallocated cache.

The vision encoder runs once per request (in the prefill), the cross-attention K/V are computed once and kept in
the cache, and the self-attention cache is allocated for the whole request up front.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from .modeling.cache import MllamaCache
from .modeling.outputs import ModelOutput

_IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


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
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()

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
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        eos_token_id=_as_tuple(pick("eos_token_id", text.eos_token_id)),
        pad_token_id=pick("pad_token_id", text.pad_token_id),
        stop_strings=tuple([s] if isinstance(s := kwargs.pop("stop_strings", None) or (), str) else s),
    )
    params.validate()
    return params


# ---------------------------------------------------------------------------------------------------------------
# Logit processing (the order transformers uses: penalty, min-length, then temperature, top-k, top-p)


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


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution as logits: scaled by temperature, everything outside top-k and outside the
    smallest set whose probability reaches top_p set to -inf (at least one token always stays)."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def processed_scores(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, new_count: int,
                     eos: torch.Tensor | None = None) -> torch.Tensor:
    """The scores tokens are chosen from (and output_scores returns, as transformers defines them): the logits in
    float32 after the repetition penalty and the min-length rule and, when sampling, after temperature, top-k and
    top-p. eos: the EOS ids already on the logits' device (indexing with a host list would sync every step)."""
    scores = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if new_count < params.min_new_tokens and params.eos_token_id:
        if eos is None:
            eos = torch.tensor(params.eos_token_id, device=scores.device)
        scores = scores.index_fill(1, eos, float("-inf"))
    if params.do_sample:
        scores = filter_logits(scores, params.temperature, params.top_k, params.top_p)
    return scores


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, new_count: int,
                generator: torch.Generator | None, eos: torch.Tensor | None = None) -> torch.Tensor:
    scores = processed_scores(logits, seen, params, new_count, eos)
    if not params.do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {list(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {list(attention_mask.shape)} differs from input_ids "
                         f"{list(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("the batch is right-padded (a row's last token is padding): generation continues every "
                         "row from its last position, so pad on the left (processor/tokenizer padding_side='left')")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
    return attention_mask


def decode_steps(model, input_ids: torch.Tensor, params: SamplingParams, *, attention_mask=None,
                 cross_attention_mask=None, generator: torch.Generator | None = None,
                 stop_checker=None, fast: bool | None = None, on_logits=None,
                 **model_inputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens [B], finished [B]) once per new token. Finished rows get pad tokens from then on.
    on_logits(logits [B, vocab], seen [B, length], step) sees each step's logits before its tokens are chosen.

    fast (default: on CUDA) runs the decode steps through engine.fast.FastDecoder (fused projections, CUDA
    graph) and looks at the finished flags on the host only every few steps; the tokens are the same."""
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = _check_inputs(input_ids, attention_mask if attention_mask is None else attention_mask.to(device))
    input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    batch, prompt_len = input_ids.shape
    total = prompt_len + params.max_new_tokens
    limit = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)
    if limit is not None and total > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                         f"model's context of {limit} tokens")
    if fast is None:
        from .engine.fast import unsupported

        fast = device.type == "cuda" and unsupported(model) is None
    decoder = vision_runner = None
    if fast:
        from .engine.fast import get_decoder

        pixels = model_inputs.get("pixel_values")
        vision_tokens = 0
        if pixels is not None:  # the prefill keeps these tiles' tokens (MllamaModel.kept_tiles)
            keep = model.model.kept_tiles(cross_attention_mask, pixels)
            tiles = pixels.shape[1] * pixels.shape[2] if keep is None else keep.numel()
            vision_tokens = tiles * model.config.vision_config.num_patches
        decoder = get_decoder(model, batch, total, vision_tokens)
        cache = decoder.reset()
        if pixels is not None:
            from .engine.fast import vision_graphs

            vision_runner = vision_graphs(model)
    else:
        cache = MllamaCache.allocate(model.config, batch, total, device, model.dtype)
    mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    # Positions count real tokens only, so left padding does not shift the prompt (pads get position 0).
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {k: v.to(device) for k, v in model_inputs.items() if isinstance(v, torch.Tensor)}
    if cross_attention_mask is not None:
        cross_attention_mask = cross_attention_mask.to(device)
        extra["cross_attention_mask"] = cross_attention_mask
    pad = params.pad_token_id if params.pad_token_id is not None else (params.eos_token_id or (0,))[0]
    eos = torch.tensor(params.eos_token_id, device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    seen = input_ids
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask[:, :prompt_len], position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1, vision_runner=vision_runner, **extra)
        last_position = positions[:, -1:]
        step_cross = cross_attention_mask[:, -1:] if cross_attention_mask is not None else None
        stepper = None
        if decoder is not None:
            decoder.bind(mask, step_cross)
            stepper = decoder
        for step in range(params.max_new_tokens):
            if on_logits is not None:
                on_logits(out.logits[:, -1], seen, step)
            tokens = next_tokens(out.logits[:, -1], seen, params, step, generator, eos)
            tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
            if eos.numel():
                finished = finished | torch.isin(tokens, eos)
            seen = torch.cat([seen, tokens[:, None]], dim=1)
            if stop_checker is not None:
                finished = finished | stop_checker(seen[:, prompt_len:]).to(device)
            yield tokens, finished
            if step + 1 == params.max_new_tokens:
                return
            if (stepper is None or step % 8 == 7 or stop_checker is not None) and bool(finished.all()):
                return
            last_position = last_position + 1
            cur = prompt_len + step + 1
            if stepper is not None:
                out = ModelOutput(logits=stepper(tokens, last_position, cur - 1)[:, None])
                continue
            # Each new token sees the images the last prompt token saw (transformers' rule as well).
            out = model(input_ids=tokens[:, None], attention_mask=mask[:, :cur], position_ids=last_position,
                        cache=cache, use_cache=True, cross_attention_mask=step_cross)


class StopStrings:
    """Marks rows finished once their generated text contains one of the stop strings."""

    def __init__(self, tokenizer, stop_strings: Iterable[str]):
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=processor.tokenizer (or the processor)")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.window = max(len(s) for s in self.stop_strings) + 8

    def __call__(self, generated: torch.Tensor) -> torch.Tensor:
        done = []
        for row in generated.tolist():
            text = self.tokenizer.decode(row[-self.window:], skip_special_tokens=False)
            done.append(any(s in text for s in self.stop_strings))
        return torch.tensor(done)


def _make_generator(seed: int | None, generator: torch.Generator | None, device: torch.device):
    if generator is not None:
        return generator
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


class GenerateOutput(ModelOutput):
    """generate's result with return_dict_in_generate=True, read by attribute or key like transformers' own:
    `sequences` (prompt + new tokens, what generate returns otherwise) and, when asked for, `scores` and `logits`:
    one float32 [batch, vocab] tensor per new token, after the logit processing / as the model gave them."""


class _StepOutputs:
    """Collects output_scores / output_logits, one entry per step."""

    def __init__(self, params: SamplingParams, scores: bool, logits: bool):
        self.params = params
        self.scores: list[torch.Tensor] | None = [] if scores else None
        self.logits: list[torch.Tensor] | None = [] if logits else None

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, step: int) -> None:
        # A copy: the fast path's logits are a static buffer that its next step overwrites.
        logits = logits.to(torch.float32, copy=True)
        if self.logits is not None:
            self.logits.append(logits)
        if self.scores is not None:
            self.scores.append(processed_scores(logits, seen, self.params, step))

    def result(self, sequences: torch.Tensor, steps: int) -> GenerateOutput:
        def kept(items):
            return None if items is None else tuple(items[:steps])

        return GenerateOutput(sequences=sequences, scores=kept(self.scores), logits=kept(self.logits))


def _output_options(kwargs: dict) -> tuple[bool, bool, bool]:
    """Pops (return_dict_in_generate, output_scores, output_logits) and the options that change nothing here."""
    for key in ("use_cache", "synced_gpus"):  # the cache is always used; there is one process
        kwargs.pop(key, None)
    if kwargs.pop("num_beams", None) not in (None, 1):
        raise ValueError("beam search is not supported: use num_beams=1 (greedy or sampling)")
    as_dict, scores, logits = (bool(kwargs.pop(k, None)) for k in
                               ("return_dict_in_generate", "output_scores", "output_logits"))
    if (scores or logits) and not as_dict:
        raise ValueError("output_scores and output_logits need return_dict_in_generate=True: they come back as the "
                         "result's .scores and .logits")
    return as_dict, scores, logits


def generate(model, input_ids: torch.Tensor | None = None, *, streamer=None, tokenizer=None, seed: int | None = None,
             generator: torch.Generator | None = None, fast: bool | None = None,
             stop_event: threading.Event | None = None, **kwargs) -> torch.Tensor | GenerateOutput:
    """Prompt + new tokens [B, prompt_len + new], rows that finished early padded with pad_token_id; a
    GenerateOutput with return_dict_in_generate=True. Once `stop_event` is set, generation ends after the step
    under way and returns the tokens so far (how `stream` is stopped from another thread)."""
    if input_ids is None:
        raise ValueError("generate needs input_ids (the processor returns them)")
    if hasattr(tokenizer, "tokenizer"):  # a processor was given
        tokenizer = tokenizer.tokenizer
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    params = resolve_params(model, kwargs, input_ids.shape[-1])
    as_dict, want_scores, want_logits = _output_options(kwargs)
    model_inputs = {k: v for k, v in kwargs.items() if k in _IMAGE_KEYS + ("attention_mask", "cross_attention_mask")}
    unknown = sorted(set(kwargs) - set(model_inputs))
    if unknown:
        raise ValueError(f"generate got unknown arguments {unknown}")
    stop = StopStrings(tokenizer, params.stop_strings) if params.stop_strings else None
    gen = _make_generator(seed, generator, model.device)
    outputs = _StepOutputs(params, want_scores, want_logits) if want_scores or want_logits else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    pieces, done = [], []
    for tokens, finished in decode_steps(model, input_ids, params, generator=gen, stop_checker=stop, fast=fast,
                                         on_logits=outputs, **model_inputs):
        pieces.append(tokens)
        done.append(finished.all())
        if streamer is not None:
            streamer.put(tokens.cpu())
        if stop_event is not None and stop_event.is_set():
            break
    if streamer is not None:
        streamer.end()
    # The fast path looks at the finished flags only every few steps: drop the steps after all rows finished.
    all_done = torch.stack(done).nonzero()
    keep = int(all_done[0, 0]) + 1 if all_done.numel() else len(pieces)
    sequences = torch.cat([input_ids.to(model.device), torch.stack(pieces[:keep], dim=1)], dim=1)
    if not as_dict:
        return sequences
    return outputs.result(sequences, keep) if outputs is not None else GenerateOutput(sequences=sequences)


# ---------------------------------------------------------------------------------------------------------------
# Streaming text


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


class TextIteratorStreamer:
    """Pass as `streamer=` to `generate` (running in another thread) and iterate over the text pieces of the
    first sequence of the batch as they are produced."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 timeout: float | None = None):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.skip_prompt = skip_prompt
        self.decoder = TextDecoder(self.tokenizer, skip_special_tokens)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout
        self._prompt_seen = False
        self._finished = False

    def put(self, value: torch.Tensor) -> None:
        ids = value[0] if value.dim() > 1 and value.shape[0] >= 1 else value
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
            ids = ids.reshape(-1)
        if self._finished:
            return
        for token in ids.reshape(-1).tolist():
            piece = self.decoder.push(token)
            if piece:
                self.queue.put(piece)

    def end(self) -> None:
        rest = self.decoder.flush()
        if rest:
            self.queue.put(rest)
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self.queue.get(timeout=self.timeout)
            if piece is None:
                return
            yield piece


class TextStreamer(TextIteratorStreamer):
    """Prints the text of the first sequence to stdout as it is generated."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True, file=None):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens)
        import sys

        self.file = file or sys.stdout

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        while not self.queue.empty():
            piece = self.queue.get()
            if piece is not None:
                print(piece, end="", file=self.file, flush=True)

    def end(self) -> None:
        rest = self.decoder.flush()
        print(rest, file=self.file, flush=True)


def stream(model, tokenizer, **kwargs) -> Iterator[str]:
    """Generates in a background thread and yields text pieces of the first sequence as they come.

    Closing the iterator (`close()`, the end of a `with contextlib.closing(stream(...))` block, or an exception
    such as KeyboardInterrupt while it waits for a piece) stops the generation after the step under way and
    waits for the thread: a thread still inside torch when the interpreter exits aborts the process."""
    streamer = TextIteratorStreamer(tokenizer)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            generate(model, streamer=streamer, tokenizer=tokenizer, stop_event=stop, **kwargs)
        except BaseException as e:  # re-raised in the consumer's thread
            errors.append(e)
            streamer.queue.put(None)

    thread = threading.Thread(target=run, name="mllama-generate", daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
