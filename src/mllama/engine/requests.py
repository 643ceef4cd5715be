"""What a request to the batch engine is, what the engine tells it back, and the engine's refusals."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING, Callable

if TYPE_CHECKING:  # (annotations only: this module and the scheduler import no torch)
    import torch

    from ..sampling import SamplingParams, TextDecoder
    from .paged import Holding


class RequestTooLong(ValueError):
    """prompt + max_tokens exceeds the engine's context, or needs more K/V pages than its pools have."""


def check_length(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Raises RequestTooLong, saying what would fit, when prompt + max_tokens exceeds the slots' context."""
    if prompt_len + max_tokens > max_model_len:
        raise RequestTooLong(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                             f"{prompt_len + max_tokens}, more than the context of {max_model_len} tokens "
                             f"(--max-model-len); shorten the prompt or lower max_tokens to at most "
                             f"{max(0, max_model_len - prompt_len)}")


@dataclass
class Event:
    """What the engine tells a request. `text` and `token_ids` are new since the last event; `finish_reason`
    ("stop", "length", "abort") is set on the last one; `error` (a message) replaces everything else."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)  # a request is itself, not its fields: compared and hashed by identity (queue, sets)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixels, aspect ratios, cross mask
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    # the prompt's tokens' logprobs too (k most likely each; the first token has none), sent before the answer's
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True  # in the text sent (the token ids are sent whole)
    end_tokens: tuple[int, ...] | None = None  # the tokens that end it (None: the engine's end tokens)
    grammar: str | None = None  # what the answer must follow (constraints.Grammars.compile), or None
    # Requests with the same `share` (not None) have the same prompt and inputs (the n choices of one prompt):
    # submitted together (submit_many), they are admitted together when the slots allow and prefilled once.
    share: Any = None
    # --- engine state (engine thread only, except `cancelled`)
    cancelled: bool = False
    slot: int = -1
    length: int = 0
    generated: list[int] = field(default_factory=list)
    decoder: TextDecoder | None = None
    text: str = ""
    sent: int = 0
    generator: torch.Generator | None = None
    submitted: float = 0.0
    last_token_time: float = 0.0
    pending_logprobs: list[dict] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    images: list[tuple[str | None, int]] = field(default_factory=list)  # per image: cache key (or None), tiles
    holding: Holding | None = None  # its pages, from admission to its end
    constraint: Any = None  # constraints.Constraint for `grammar`, made at submit

    def cancel(self) -> None:
        # A plain flag: the engine looks at it before every step, so the slot is free by the next one.
        self.cancelled = True
