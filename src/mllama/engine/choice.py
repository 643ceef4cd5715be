"""How the serving engine chooses each row's next token from a step's logits: queued on the device, never waited
for, so that the next decode step can be queued behind it and take its tokens from the device (engine.batch).

A row is chosen by the plain argmax unless its request samples, penalises, biases, holds back its end token or
follows a grammar (`chosen_on_host`: its choice needs more than the decode graph's argmax). Those rows start
from their own copy of the logits. Constrained rows' masks come from the host (constraints.Masks: computed while
the device computes the logits) and are applied in one go; then the rows that only take the argmax (constrained
ones, otherwise greedy) take one batched argmax, the rows that only sample (temperature, top-k, top-p) one
batched distribution and a draw each from their own generator (sampling.sample_rows), and any other row
next_tokens on its own. Logprobs are computed there too: the host reads everything once the step is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..constraints import Grammars, Masks
from ..sampling import SamplingParams, next_tokens, on_device, sample_rows
from .requests import GenerationRequest


def processed(p: SamplingParams, count: int) -> bool:
    """Whether the token after `count` generated ones is chosen from processed scores, not by the plain argmax:
    sampled (with the request's own generator, as generate() alone would), repeats penalised, words banned,
    invalid scores replaced, biases added, or EOS not allowed yet."""
    return (p.do_sample or p.repetition_penalty != 1.0 or bool(p.bad_words_ids) or p.remove_invalid_values
            or bool(count < p.min_new_tokens and p.eos_token_id) or bool(p.logit_bias)
            or bool(p.presence_penalty or p.frequency_penalty))


def chosen_on_host(r: GenerationRequest, count: int) -> bool:
    return r.constraint is not None or processed(r.params, count)


def kind_of(r: GenerationRequest, count: int) -> str:
    """How a row chosen_on_host is chosen: "argmax" (of its masked logits: a constrained row, otherwise greedy),
    "sample" (temperature, top-k, top-p and min-p only) or "full" (next_tokens: penalties, biases, ...)."""
    p = r.params
    if not processed(p, count):
        return "argmax"
    plain = replace(p, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    return "sample" if p.do_sample and not processed(plain, count) else "full"


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of `t` on the host, queued behind the work that makes it (pinned memory: the copy does not wait)."""
    if t is None or t.device.type == "cpu":
        return None if t is None else t.clone()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


@dataclass
class Choice:
    """One step's choices as they come back to the host: the rows (indices into its requests) that failed, and
    the logprobs of those that asked: the chosen tokens' own and the `top` most likely (ids and values)."""
    failed: dict[int, Exception] = field(default_factory=dict)
    wanted: list[int] = field(default_factory=list)
    logprob: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    def to_host(self) -> None:
        self.logprob, self.top_values, self.top_ids = (to_host(t) for t in (self.logprob, self.top_values,
                                                                              self.top_ids))

    def entries(self, requests: list[GenerationRequest], tokens: list[int]) -> list:
        """Per request, its logprob entry ({"id", "logprob", "top": [(id, logprob), ...]}) or None, given each
        request's chosen token; read once the step is done."""
        out: list = [None] * len(requests)
        if not self.wanted:
            return out
        chosen = self.logprob.tolist()
        values = self.top_values.tolist() if self.top_values is not None else None
        ids = self.top_ids.tolist() if self.top_ids is not None else None
        for i, row in enumerate(self.wanted):
            top = requests[row].logprobs
            out[row] = {"id": tokens[row], "logprob": chosen[i],
                        "top": list(zip(ids[i][:top], values[i][:top])) if top else []}
        return out


class Chooser:
    """The choices of the engine's steps; `grammars` is called at the first constrained row (it builds
    llguidance's view of the tokenizer) and `end_tokens` gives a request's end tokens."""

    def __init__(self, grammars: Callable[[], Grammars], end_tokens: Callable[[GenerationRequest], tuple],
                 max_rows: int, device: torch.device):
        self.grammars, self.end_tokens = grammars, end_tokens
        self.max_rows, self.device = max_rows, device
        self.masks: Masks | None = None

    def __call__(self, requests: list[GenerationRequest], logits: torch.Tensor, positions: list[int],
                 out: torch.Tensor) -> Choice:
        """Queues each request's token into out[positions[i]] (out holds the argmax of `logits` already); its
        logits are logits[positions[i]]. Counts are len(r.generated): the token chosen is the one after them."""
        choice = Choice()
        special = [i for i, r in enumerate(requests) if chosen_on_host(r, len(r.generated))]
        if special:
            self._special(requests, special, logits, positions, out, choice.failed)
        choice.wanted = [i for i, r in enumerate(requests) if r.logprobs is not None and i not in choice.failed]
        if choice.wanted:
            index = on_device([positions[i] for i in choice.wanted], logits.device)
            logprobs = torch.log_softmax(logits[index].float(), dim=-1)
            choice.logprob = logprobs.gather(1, out[index][:, None]).squeeze(1)
            top = max(requests[i].logprobs for i in choice.wanted)
            if top:
                choice.top_values, choice.top_ids = torch.topk(logprobs, top, dim=-1)
        return choice

    def _special(self, requests, special, logits, positions, out, failed) -> None:
        device = logits.device
        scores = logits[on_device([positions[i] for i in special], device)]  # [len(special), vocab]
        try:
            self._mask(requests, special, scores, failed)
        except Exception as e:  # noqa: BLE001 - the grammar engine failed: its rows end, the batch goes on
            failed.update((i, e) for i in special if requests[i].constraint is not None)
        kinds = {i: kind_of(requests[i], len(requests[i].generated)) for i in special}
        for kind in ("argmax", "sample"):
            rows = [j for j, i in enumerate(special) if kinds[i] == kind and i not in failed]
            if not rows:
                continue
            index = on_device(rows, device)
            chosen = [requests[special[j]] for j in rows]
            try:
                tokens = scores[index].argmax(-1) if kind == "argmax" else sample_rows(
                    scores[index], [r.params for r in chosen], [r.generator for r in chosen])
            except Exception:  # noqa: BLE001 - one at a time below, so that only the row at fault fails
                kinds.update((special[j], "full") for j in rows)
                continue
            out[on_device([positions[special[j]] for j in rows], device)] = tokens
        for j, i in enumerate(special):
            if kinds[i] != "full" or i in failed:
                continue
            r, p = requests[i], requests[i].params
            try:
                seen = on_device([r.prompt_ids + r.generated], device) \
                    if p.repetition_penalty != 1.0 or p.bad_words_ids or p.presence_penalty or p.frequency_penalty \
                    else None
                out[positions[i]] = next_tokens(scores[j:j + 1], seen, p, len(r.generated), r.generator)[0]
            except Exception as e:  # noqa: BLE001 - this request's sampling failed: it ends, the batch goes on
                failed[i] = e

    def _mask(self, requests, special, scores, failed) -> None:
        """-inf, in `scores` (the rows of `special`), for every token a constrained row's grammar does not allow."""
        bound = [j for j, i in enumerate(special) if requests[i].constraint is not None]
        if not bound:
            return
        vocab = scores.shape[-1]
        if self.masks is None or self.masks.vocab != vocab:
            self.masks = Masks(self.grammars(), self.max_rows, vocab, self.device)
        constrained = [requests[special[j]] for j in bound]
        for k in self.masks.fill([r.constraint for r in constrained], [self.end_tokens(r) for r in constrained]):
            failed[special[bound[k]]] = ValueError("the grammar allows no next token")
        index = on_device(bound, scores.device)
        scores[index] = scores[index].masked_fill_(~self.masks.allowed(len(bound)), float("-inf"))
