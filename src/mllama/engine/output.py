"""What a request is sent as its tokens come: text pieces (detokenized, stop strings held back and cut), token
ids, logprobs, and the final event. Called by the engine thread for each chosen token."""
from __future__ import annotations

from .requests import Event, GenerationRequest


def advance_text(r: GenerationRequest, token: int, eos: tuple[int, ...]) -> str | None:
    """Adds a chosen token (already appended to r.generated) to the request's text and sends what may be sent;
    returns why the request ends ("stop", "length"), or None while it goes on."""
    finish = None
    if token in eos:
        finish = "stop"  # the EOS token itself adds no text (special tokens are skipped)
    else:
        r.text += r.decoder.push(token)
    if finish is None and len(r.generated) >= r.params.max_new_tokens:
        finish = "length"
    if finish is not None:
        r.text += r.decoder.flush()  # bytes of an incomplete character held back so far
    if r.stop:
        # Search only where a new match can start: text before `sent` was checked when it was emitted.
        window = max(len(s) for s in r.stop) + 16
        start = max(0, r.sent - window)
        hits = [i for i in (r.text.find(s, start) for s in r.stop) if i >= 0]
        if hits:
            r.text = r.text[:min(hits)]
            finish = "stop"
    if finish is None:
        # Hold back a tail that could still become a stop string, so a stop string is never streamed.
        hold = max((len(s) - 1 for s in r.stop), default=0)
        ready = max(r.sent, len(r.text) - hold)
        if ready > r.sent or r.pending_logprobs:
            piece, r.sent = r.text[r.sent:ready], ready
            r.emit(Event(text=piece, token_ids=r.pending_ids, logprobs=r.pending_logprobs))
            r.pending_ids, r.pending_logprobs = [], []
    return finish


def final_event(r: GenerationRequest, reason: str) -> Event:
    """The last event of a request: the text not sent yet and the usage counts."""
    piece = r.text[r.sent:]
    r.sent = len(r.text)
    event = Event(text=piece, token_ids=r.pending_ids, logprobs=r.pending_logprobs, finish_reason=reason,
                  prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated))
    r.pending_ids, r.pending_logprobs = [], []
    return event
