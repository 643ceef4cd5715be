"""Sampling that fails for marked requests (top_p 0.5), for the engine's isolation tests."""
from __future__ import annotations

from mllama.engine import choice

MARK = 0.5  # the top_p of a request whose sampling raises


def fail_marked_sampling(monkeypatch) -> None:
    """Makes sampling raise for requests with top_p MARK on both of the engine's paths: a batch of sampled rows
    that holds one fails whole (its rows then go one by one), the one-row path fails for that row alone."""
    real, real_rows = choice.next_tokens, choice.sample_rows

    def next_tokens(logits, seen, params, count, generator, eos=None):
        if params.top_p == MARK:
            raise FloatingPointError("probabilities are not finite")
        return real(logits, seen, params, count, generator, eos)

    def sample_rows(logits, params, generators):
        if any(p.top_p == MARK for p in params):
            raise FloatingPointError("probabilities are not finite")
        return real_rows(logits, params, generators)

    monkeypatch.setattr(choice, "next_tokens", next_tokens)
    monkeypatch.setattr(choice, "sample_rows", sample_rows)
