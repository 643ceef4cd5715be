"""Generation on top of the model: prefill once, then one token per step on a preallocated cache.

The vision encoder runs once per request (in the prefill), the cross-attention K/V are computed once and kept in
the cache, and the self-attention cache is allocated for the whole request up front.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from .modeling.cache import MllamaCache
from .modeling.outputs import ModelOutput
from .processing.cross_attention_mask import extend_cross_attention_mask, generated_row
from .sampling import (GREEDY_BELOW_TEMPERATURE, SamplingParams, TextDecoder, apply_repetition_penalty,  # noqa: F401
                       ban_bad_words, choose, filter_logits, next_tokens, pad_id, processed_scores, remove_invalid,
                       resolve_params)

_IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


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
        from .engine.decode import unsupported

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
    pad = pad_id(params)
    eos = torch.tensor(params.eos_token_id, device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    seen = input_ids
    with torch.no_grad():
        if vision_runner is not None:  # the fast path's encoder (CUDA graphs), run before the model's forward
            extra = _encoded(model, input_ids, extra, vision_runner)
        out = model(input_ids=input_ids, attention_mask=mask[:, :prompt_len], position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1, **extra)
        last_position = positions[:, -1:]
        step_cross = generated_row(cross_attention_mask) if cross_attention_mask is not None else None
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
            out = model(input_ids=tokens[:, None], attention_mask=mask[:, :cur], position_ids=last_position,
                        cache=cache, use_cache=True, cross_attention_mask=step_cross)


def _encoded(model, input_ids: torch.Tensor, inputs: dict, vision_runner) -> dict:
    """The prefill's inputs with the images replaced by their vision tokens (encoded by `vision_runner`, only the
    tiles some row sees): the forward then takes them as cross_attention_states."""
    inner = model.model
    pixels, ratio_ids, ratio_mask = (inputs.pop(k) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"))
    mask = inputs.get("cross_attention_mask")
    inner.check_image_inputs(input_ids, pixels, ratio_ids, ratio_mask, mask)
    keep = inner.kept_tiles(mask, pixels)
    states = inner.encode_images(pixels, ratio_ids, ratio_mask, keep, vision_runner)
    return {**inputs, "cross_attention_states": states, "cross_tiles": keep, "ids_checked": True}


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
    `sequences` (prompt + new tokens, what generate returns otherwise) and, when asked for, `scores` and `logits`
    (one float32 [batch, vocab] tensor per new token, after the logit processing / as the model gave them),
    `attentions` and `hidden_states` (per new token, the forward pass's per-layer tuple) and `past_key_values`
    (the cache, from the eager loop). Beam search adds `beam_indices` [batch, new] (the flat beam each token was
    chosen from) and, with output_scores, `sequences_scores` (the length-penalised log-probability)."""


class _StepOutputs:
    """Collects output_scores / output_logits / output_attentions / output_hidden_states, one entry per step."""

    def __init__(self, params: SamplingParams, request: "_Request"):
        self.params = params
        self.scores: list[torch.Tensor] | None = [] if request.scores else None
        self.logits: list[torch.Tensor] | None = [] if request.logits else None
        self.attentions: list[tuple] | None = [] if request.attentions else None
        self.hidden_states: list[tuple] | None = [] if request.hidden_states else None

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, step: int) -> None:
        # A copy: the fast path's logits are a static buffer that its next step overwrites.
        logits = logits.to(torch.float32, copy=True)
        self.add(logits, processed_scores(logits, seen, self.params, step) if self.scores is not None else None)

    def add(self, logits: torch.Tensor, scores: torch.Tensor | None, out: ModelOutput | None = None) -> None:
        for store, value in ((self.logits, logits), (self.scores, scores)):
            if store is not None:
                store.append(value)
        if self.attentions is not None:
            self.attentions.append(out.attentions)
        if self.hidden_states is not None:
            self.hidden_states.append(out.hidden_states)

    def result(self, sequences: torch.Tensor, steps: int, **extra) -> GenerateOutput:
        def kept(items):
            return None if items is None else tuple(items[:steps])

        return GenerateOutput(sequences=sequences, scores=kept(self.scores), logits=kept(self.logits),
                              attentions=kept(self.attentions), hidden_states=kept(self.hidden_states), **extra)


@dataclass
class _Request:
    """What generate returns and how it searches, besides the per-token processing of SamplingParams."""
    as_dict: bool = False
    scores: bool = False
    logits: bool = False
    attentions: bool = False
    hidden_states: bool = False
    use_cache: bool = True
    logits_to_keep: int | torch.Tensor | None = None
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def eager(self) -> bool:
        """Whether the plain model's eager loop must run (decode_steps computes none of these)."""
        return (self.num_beams > 1 or self.attentions or self.hidden_states or not self.use_cache
                or self.logits_to_keep is not None)


def _read_request(model, kwargs: dict) -> _Request:
    """Pops generate's output and search options (and synced_gpus, which one process needs no syncing for)."""
    defaults = dict(getattr(model, "generation_config", None) or {})

    def pick(name, fallback):
        value = kwargs.pop(name, None)
        value = defaults.get(name) if value is None else value
        return fallback if value is None else value

    kwargs.pop("synced_gpus", None)
    r = _Request(as_dict=bool(pick("return_dict_in_generate", False)), scores=bool(pick("output_scores", False)),
                 logits=bool(pick("output_logits", False)), attentions=bool(pick("output_attentions", False)),
                 hidden_states=bool(pick("output_hidden_states", False)), use_cache=bool(pick("use_cache", True)),
                 logits_to_keep=kwargs.pop("logits_to_keep", None), num_beams=int(pick("num_beams", 1)),
                 num_return_sequences=int(pick("num_return_sequences", 1)),
                 length_penalty=float(pick("length_penalty", 1.0)), early_stopping=pick("early_stopping", False))
    if (r.scores or r.logits or r.attentions or r.hidden_states) and not r.as_dict:
        raise ValueError("output_scores, output_logits, output_attentions and output_hidden_states need "
                         "return_dict_in_generate=True: they come back as fields of the result")
    if r.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {r.num_beams}")
    if r.num_return_sequences < 1 or (r.num_beams > 1 and r.num_return_sequences > r.num_beams):
        raise ValueError(f"num_return_sequences must be in 1..num_beams ({r.num_beams}), got "
                         f"{r.num_return_sequences}")
    if r.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {r.early_stopping!r}")
    return r


def _prompt_ids(model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                kwargs: dict) -> torch.Tensor | None:
    """input_ids as [B, L]; without them and without inputs_embeds, one BOS per row (the batch size read from the
    first tensor argument, as transformers does); None for a prompt given only as inputs_embeds."""
    if input_ids is not None:
        input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(f"inputs_embeds {list(inputs_embeds.shape)} must cover input_ids "
                             f"{list(input_ids.shape)} token for token")
        return input_ids
    if inputs_embeds is not None:
        return None
    text = getattr(model.config, "text_config", model.config)
    bos = dict(getattr(model, "generation_config", None) or {}).get("bos_token_id", text.bos_token_id)
    if bos is None:
        raise ValueError("generate without input_ids starts from bos_token_id, which the config does not set: "
                         "pass input_ids (the processor returns them)")
    batch = next((v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor)), 1)
    return torch.full((batch, 1), int(bos), dtype=torch.long, device=model.device)


def _repeat_rows(value: Any, copies: int) -> Any:
    return value.repeat_interleave(copies, dim=0) if isinstance(value, torch.Tensor) and copies > 1 else value


def generate(model, input_ids: torch.Tensor | None = None, *, streamer=None, tokenizer=None, seed: int | None = None,
             generator: torch.Generator | None = None, fast: bool | None = None,
             stop_event: threading.Event | None = None, **kwargs) -> torch.Tensor | GenerateOutput:
    """Prompt + new tokens [B, prompt_len + new], rows that finished early padded with pad_token_id (a prompt given
    only as inputs_embeds: the new tokens alone); a GenerateOutput with return_dict_in_generate=True. Once
    `stop_event` is set, generation ends after the step under way and returns the tokens so far (how `stream` is
    stopped from another thread). num_beams > 1 runs beam search; inputs_embeds, past_key_values, position_ids,
    use_cache=False, logits_to_keep, output_attentions and output_hidden_states run the plain model's eager loop."""
    if hasattr(tokenizer, "tokenizer"):  # a processor was given
        tokenizer = tokenizer.tokenizer
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    input_ids = _prompt_ids(model, input_ids, inputs_embeds, kwargs)
    params = resolve_params(model, kwargs, (input_ids if input_ids is not None else inputs_embeds).shape[1])
    request = _read_request(model, kwargs)
    past, position_ids = kwargs.pop("past_key_values", None), kwargs.pop("position_ids", None)
    model_inputs = {k: kwargs.pop(k) for k in _IMAGE_KEYS + ("attention_mask", "cross_attention_mask") if k in kwargs}
    if kwargs:
        raise ValueError(f"generate got unknown arguments {sorted(kwargs)}")
    if request.num_beams == 1 and request.num_return_sequences > 1 and not params.do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams > 1: greedy search would "
                         "return the same sequence every time")
    copies = request.num_beams if request.num_beams > 1 else request.num_return_sequences
    input_ids, inputs_embeds, position_ids = (_repeat_rows(v, copies) for v in (input_ids, inputs_embeds, position_ids))
    model_inputs = {k: _repeat_rows(v, copies) for k, v in model_inputs.items()}
    stop = StopStrings(tokenizer, params.stop_strings) if params.stop_strings else None
    gen = _make_generator(seed, generator, model.device)
    if request.eager() or inputs_embeds is not None or past is not None or position_ids is not None:
        if fast:
            raise ValueError("fast=True decodes greedy search and sampling from input_ids only: beam search, "
                             "inputs_embeds, past_key_values, position_ids, use_cache=False, logits_to_keep and "
                             "output_attentions/output_hidden_states run on the plain model (leave fast unset)")
        steps = _Steps(model, input_ids, inputs_embeds, position_ids, past, request, model_inputs)
        if request.num_beams > 1:
            if streamer is not None or stop is not None:
                raise ValueError("beam search streams no tokens and takes no stop_strings: its best sequence is "
                                 "known only at the end (use eos_token_id to end beams)")
            return beam_search(steps, params, request, gen)
        return _eager_sample(steps, params, request, gen, stop, streamer, stop_event)
    outputs = _StepOutputs(params, request) if request.scores or request.logits else None
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
    if not request.as_dict:
        return sequences
    return outputs.result(sequences, keep) if outputs is not None else GenerateOutput(sequences=sequences)


# ---------------------------------------------------------------------------------------------------------------
# The eager loop: the plain model's forward per step, for beam search and what decode_steps does not compute


class _Steps:
    """A growing batch of sequences and the plain model's forward passes over it: tokens [B, P + G] (a prompt
    given as inputs_embeds holds placeholders there, never embedded), their mask, positions and cross-attention
    mask rows. Each forward feeds what the cache does not hold yet (the prompt, then the last token); with
    use_cache=False the whole sequence every time, images included, as transformers computes it."""

    def __init__(self, model, input_ids, inputs_embeds, position_ids, cache, request: _Request, model_inputs: dict):
        device = model.device
        self.model, self.request = model, request
        self.embeds = inputs_embeds.to(device) if inputs_embeds is not None else None
        self.has_prompt_ids = input_ids is not None
        if input_ids is None:
            input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long)
        self.tokens = input_ids.to(device)
        self.prompt_len = self.tokens.shape[1]
        mask = model_inputs.pop("attention_mask", None)
        self.mask = _check_inputs(self.tokens, mask if mask is None else mask.to(device))
        if position_ids is not None and position_ids.shape != self.tokens.shape:
            raise ValueError(f"position_ids {list(position_ids.shape)} must cover the prompt "
                             f"{list(self.tokens.shape)}")
        self.positions = (position_ids.to(device) if position_ids is not None else
                          (self.mask.cumsum(-1) - 1).clamp(min=0))
        cross = model_inputs.pop("cross_attention_mask", None)
        self.cross = cross.to(device) if cross is not None else None
        self.images = {k: v.to(device) for k, v in model_inputs.items()}
        if cache is not None and not request.use_cache:
            raise ValueError("past_key_values need use_cache=True: generation continues on that cache")
        self.cache = (cache if cache is not None else MllamaCache()) if request.use_cache else None

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]

    def sequences(self) -> torch.Tensor:
        """What generate returns and the logit processors see: the prompt ids (if given) and the new tokens."""
        return self.tokens if self.has_prompt_ids else self.generated

    def forward(self) -> ModelOutput:
        fed = self.cache.get_seq_length() if self.cache is not None else 0
        embeds = None
        if self.embeds is not None and fed < self.prompt_len:
            new = self.model.get_input_embeddings()(self.generated).to(self.embeds.dtype)
            embeds = torch.cat([self.embeds, new], dim=1)
        keep = self.request.logits_to_keep
        extra = dict(self.images, cross_attention_mask=self.cross) if self.cross is not None else self.images
        inputs = prepare_inputs_for_generation(
            self.tokens, self.cache, self.mask, embeds, self.positions, self.cache is not None,
            logits_to_keep=1 if keep is None else keep, output_attentions=self.request.attentions,
            output_hidden_states=self.request.hidden_states, **extra)
        with torch.no_grad():
            return self.model(**inputs, return_dict=True)

    def append(self, tokens: torch.Tensor) -> None:
        """Adds one token per row; each new token sees the images the last prompt token saw."""
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        if self.cross is not None:
            self.cross = extend_cross_attention_mask(self.cross)

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the rows in `index`, in that order (the beams that continue), the cache's included."""
        for name in ("tokens", "mask", "positions", "cross", "embeds"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, index))
        self.images = {k: v.index_select(0, index) for k, v in self.images.items()}
        if self.cache is not None:
            self.cache.reorder(index)


def _eager_sample(steps: _Steps, params: SamplingParams, request: _Request, generator, stop, streamer,
                  stop_event) -> torch.Tensor | GenerateOutput:
    """Greedy search or sampling on the plain model, one forward per new token."""
    device = steps.tokens.device
    eos = torch.tensor(params.eos_token_id, device=device, dtype=torch.long)
    finished = torch.zeros(steps.tokens.shape[0], dtype=torch.bool, device=device)
    record = _StepOutputs(params, request)
    if streamer is not None:
        streamer.put(steps.sequences().cpu())
    for step in range(params.max_new_tokens):
        out = steps.forward()
        logits = out.logits[:, -1].float()
        scores = processed_scores(logits, steps.sequences(), params, step, eos)
        record.add(logits, scores, out)
        tokens = torch.where(finished, torch.full_like(finished, pad_id(params), dtype=torch.long),
                             choose(scores, params, generator))
        finished = finished | torch.isin(tokens, eos)
        steps.append(tokens)
        if stop is not None:
            finished = finished | stop(steps.generated).to(device)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if bool(finished.all()) or (stop_event is not None and stop_event.is_set()):
            break
    if streamer is not None:
        streamer.end()
    if not request.as_dict:
        return steps.sequences()
    return record.result(steps.sequences(), steps.generated.shape[1], cache=steps.cache)


def beam_search(steps: _Steps, params: SamplingParams, request: _Request, generator) -> torch.Tensor | GenerateOutput:
    """Beam search (or beam sampling with do_sample) over `steps`, whose rows are num_beams copies of each prompt.

    Each step scores every continuation of every running beam by its summed log-probability (after the logit
    processing) and keeps 2 * num_beams candidates (more with several EOS ids): the best num_beams that did not
    just finish run on; those among the first num_beams that finished (EOS, or the length limit) compete for
    the num_beams finished slots by score / new_length ** length_penalty. The search ends when no running beam
    can beat the worst finished one (early_stopping=False: judged at the current length; "never": at the longest
    possible with a positive length_penalty), when every slot is full (early_stopping=True), or at the limit.
    Ties and order follow transformers' implementation, so results equal its output token for token."""
    k, total = request.num_beams, params.max_new_tokens
    rows, device = steps.tokens.shape[0], steps.tokens.device
    batch = rows // k
    eos = torch.tensor(params.eos_token_id, device=device, dtype=torch.long)
    params = replace(params, min_tokens_to_keep=max(2, len(params.eos_token_id) + 1))
    keep = max(2, 1 + eos.numel()) * k
    in_top = torch.arange(keep, device=device) < k
    offsets = torch.arange(batch, device=device)[:, None] * k
    fill = (params.pad_token_id or params.eos_token_id[0]) if params.eos_token_id else -1
    run_scores = torch.full((batch, k), -1e9, device=device)
    run_scores[:, 0] = 0
    run_origin = torch.full((batch, k, total), -1, dtype=torch.int32, device=device)   # flat beam per step
    done = _Finished(batch, k, total, fill, device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    record = _StepOutputs(params, request)
    for step in range(total):
        out = steps.forward()
        logits = out.logits[:, -1].float()
        scores = processed_scores(logits.log_softmax(-1), steps.sequences(), params, step, eos)
        record.add(logits, scores, out)
        vocab = scores.shape[-1]
        totals = (scores.view(batch, k, vocab) + run_scores[..., None]).view(batch, k * vocab)
        if params.do_sample:
            picked = torch.multinomial(totals.softmax(-1), keep, generator=generator)
            cand_scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)  # best samples first
            picked = picked.gather(1, order)
        else:
            cand_scores, picked = totals.topk(keep)
        source = picked // vocab                                                 # [batch, keep] beam within batch
        cand_tokens = torch.cat([_take(steps.generated.reshape(batch, k, step), source), (picked % vocab)[..., None]],
                                dim=2)
        cand_origin = _take(run_origin, source)
        cand_origin[:, :, step] = source + offsets
        hits = torch.isin(picked % vocab, eos) | (step + 1 == total)
        alive = cand_scores - 1e9 * hits.float()
        running = alive.topk(k).indices
        run_scores, run_origin = _take(alive, running), _take(cand_origin, running)
        finals = cand_scores / (step + 1) ** request.length_penalty
        # A candidate enters the finished slots only if it just finished among the first num_beams, the slots
        # take more (early_stopping=True stops at full) and the search can still improve: -1e9 per reason not.
        for closed in (done.full() & (request.early_stopping is True), ~improvable, ~(hits & in_top)):
            finals = finals + closed.float() * -1e9
        done.merge(cand_tokens, finals, cand_origin, hits & in_top)
        steps.reorder(run_origin[:, :, step].reshape(-1).long())
        steps.append(_take(cand_tokens, running)[:, :, -1].reshape(-1))
        improvable = improvable & _can_improve(run_scores, done, step + 1, total, request)
        all_full = request.early_stopping is True and bool(done.full().all())
        if all_full or not bool(improvable.any()) or bool(hits.all()):
            break
    return done.result(steps, record, request, batch)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [batch, beams, ...] -> [batch, len(index), ...]: the beams `index` [batch, n] names, per batch row."""
    index = index.view(*index.shape, *([1] * (values.dim() - 2)))
    return torch.take_along_dim(values, index, dim=1)


def _can_improve(run_scores, done: "_Finished", new_len: int, total: int, request: _Request) -> torch.Tensor:
    """[batch, 1]: whether the best running beam could still beat the worst finished one."""
    length = total if request.early_stopping == "never" and request.length_penalty > 0 else new_len
    best = run_scores[:, :1] / length ** request.length_penalty
    worst = torch.where(done.is_done, done.scores.min(dim=1, keepdim=True).values, -1e9)
    return (best > worst).any(dim=-1, keepdim=True)


class _Finished:
    """The num_beams best finished hypotheses per batch row: new tokens, scores, flat beam per step."""

    def __init__(self, batch: int, beams: int, total: int, fill: int, device):
        self.tokens = torch.full((batch, beams, total), fill, dtype=torch.long, device=device)
        self.scores = torch.full((batch, beams), -1e9, device=device)
        self.origin = torch.full((batch, beams, total), -1, dtype=torch.int32, device=device)
        self.is_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        self.fill = fill

    def full(self) -> torch.Tensor:
        return self.is_done.all(dim=-1, keepdim=True)

    def merge(self, tokens, scores, origin, just_done) -> None:
        """Keeps the best num_beams of the finished ones and the candidates (closed ones score -1e9 less)."""
        tokens = F.pad(tokens, (0, self.tokens.shape[2] - tokens.shape[2]), value=self.fill)
        merged = [torch.cat(pair, dim=1) for pair in ((self.tokens, tokens), (self.scores, scores),
                                                       (self.origin, origin), (self.is_done, just_done))]
        best = merged[1].topk(self.scores.shape[1]).indices
        self.tokens, self.scores, self.origin, self.is_done = (_take(m, best) for m in merged)

    def result(self, steps: _Steps, record: _StepOutputs, request: _Request, batch: int):
        n = request.num_return_sequences
        origin = self.origin[:, :n].flatten(0, 1)
        length = int((origin >= 0).sum(dim=1).max())
        prompt = steps.sequences()[:, :steps.sequences().shape[1] - steps.generated.shape[1]]
        prompt = prompt.view(batch, request.num_beams, -1)[:, :n].flatten(0, 1)
        sequences = torch.cat([prompt, self.tokens[:, :n].flatten(0, 1)[:, :length]], dim=1)
        if not request.as_dict:
            return sequences
        scores = self.scores[:, :n].flatten() if request.scores else None
        return record.result(sequences, steps.generated.shape[1], sequences_scores=scores,
                             beam_indices=origin[:, :length], cache=steps.cache)


def prepare_inputs_for_generation(input_ids: torch.Tensor | None, past_key_values: MllamaCache | None = None,
                                  attention_mask: torch.Tensor | None = None,
                                  inputs_embeds: torch.Tensor | None = None,
                                  position_ids: torch.Tensor | None = None, use_cache: bool = True,
                                  **kwargs) -> dict:
    """The forward arguments for the next step over the whole sequence so far: only the tokens the cache does not
    hold (inputs_embeds while the cache holds less than they cover), their positions (from the mask when not
    given), the images only while the cache holds none, and every other argument as given."""
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    inputs = dict(kwargs, attention_mask=attention_mask, past_key_values=past_key_values, use_cache=use_cache,
                  input_ids=None, inputs_embeds=None)
    if inputs_embeds is not None and past < inputs_embeds.shape[1]:
        inputs["inputs_embeds"] = inputs_embeds[:, past:]
    else:
        inputs["input_ids"] = input_ids[:, past:]
    new = (inputs["input_ids"] if inputs["input_ids"] is not None else inputs["inputs_embeds"]).shape[1]
    if position_ids is None and attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs["position_ids"] = position_ids[:, -new:] if position_ids is not None else None
    if past_key_values is not None and past_key_values.cross_length():
        for key in _IMAGE_KEYS:
            inputs.pop(key, None)
    return inputs


class GenerationMixin:
    """Text generation for the models with an lm_head (transformers' generative classes inherit a class of this
    name): greedy search, sampling and beam search on the model; see `generate` for the arguments."""

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor | GenerateOutput:
        """Prompt + new tokens; see mllama.generation.generate for the arguments."""
        return generate(self, input_ids, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor | None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, position_ids=None,
                                      use_cache: bool = True, **kwargs) -> dict:
        """The forward arguments of the next generation step; see mllama.generation.prepare_inputs_for_generation."""
        return prepare_inputs_for_generation(input_ids, past_key_values, attention_mask, inputs_embeds, position_ids,
                                             use_cache, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Streaming text


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
