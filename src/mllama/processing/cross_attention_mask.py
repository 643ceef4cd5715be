"""Which text tokens may look at which image: the one home of Mllama's cross-attention-mask rules.

Each `<|image|>` token opens a span of rows that see that image:
* a span starts at its image token and ends where the next image token starts, or at the end of the sequence;
* a run of adjacent image tokens shares one end, the end of the run's last member, so that every image of the
  run is visible to the text after the run ("<|image|><|image|>Compare these" sees both images);
* tokens before the first image token (BOS, left padding, leading text) see no image at all.

The processor builds the mask from these rules; generation and the server use the same functions to extend the
mask to new tokens, so the rules cannot drift apart.
"""
from __future__ import annotations

from typing import Sequence

import torch

# An end of -1 means "to the end of the sequence, however long it gets" (used for a lone image).
TO_END = -1


def image_token_spans(input_ids: Sequence[int], image_token_id: int) -> list[list[int]]:
    """[start, end) spans of rows that attend to each image, in image order (end -1 = to the end).

    Examples with I = image token: [5,I,6,I,7] -> [[1,3],[3,5]]; [I,I,5,6] -> [[0,4],[1,4]];
    [5,I,I,6,I,7,8] -> [[1,4],[2,4],[4,7]]; [5,I,6] -> [[1,-1]]."""
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    locations = [i for i, token in enumerate(ids) if token == image_token_id]
    if not locations:
        return []
    if len(locations) == 1:
        return [[locations[0], TO_END]]
    spans = [[start, end] for start, end in zip(locations[:-1], locations[1:])]
    spans.append([locations[-1], len(ids)])
    # Walk backwards: an image token immediately followed by another one takes over the end of that one.
    run_end = spans[-1][1]
    for span in reversed(spans):
        if span[1] - span[0] == 1:
            span[1] = run_end
        run_end = span[1]
    return spans


def dense_cross_attention_mask(
    spans: Sequence[Sequence[Sequence[int]]],
    num_tiles: Sequence[Sequence[int]],
    max_num_tiles: int,
    length: int,
    max_num_images: int | None = None,
) -> torch.Tensor:
    """The int64 mask [B, length, max_images, max_num_tiles] the model takes as `cross_attention_mask`.

    Row s of sample b is 1 at (image j, tile t) when s lies in image j's span and t < num_tiles[b][j]; padding
    tiles and padding images stay 0. `max_num_images` defaults to the most spans in any sample."""
    batch = len(spans)
    if len(num_tiles) != batch:
        raise ValueError(f"num_tiles has {len(num_tiles)} samples but the spans have {batch}")
    if max_num_images is None:
        max_num_images = max((len(s) for s in spans), default=0)
    mask = torch.zeros(batch, length, max_num_images, max_num_tiles, dtype=torch.int64)
    for b, (sample_spans, sample_tiles) in enumerate(zip(spans, num_tiles)):
        if len(sample_spans) > len(sample_tiles):
            raise ValueError(f"sample {b} has {len(sample_spans)} image tokens but only {len(sample_tiles)} images")
        for j, (span, tiles) in enumerate(zip(sample_spans, sample_tiles)):
            start, end = span
            end = length if end == TO_END else min(end, length)
            mask[b, start:end, j, :tiles] = 1
    return mask


def cross_attention_mask(
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    num_tiles: Sequence[Sequence[int]],
    image_token_id: int,
    max_num_tiles: int,
) -> torch.Tensor:
    """Spans of every sample, then the dense mask over the longest sequence (sequences are padded already)."""
    rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [list(r) for r in input_ids]
    spans = [image_token_spans(r, image_token_id) for r in rows]
    length = max((len(r) for r in rows), default=0)
    return dense_cross_attention_mask(spans, num_tiles, max_num_tiles, length)


def generated_row(mask: torch.Tensor) -> torch.Tensor:
    """The mask row of every token generated after the prompt: each new token sees what the last prompt token
    saw, since text after the last image keeps attending to the images before it. [B, S, I, T] -> [B, 1, I, T].
    generate, its fast path and the server's engine all take the rows of generated tokens from here."""
    if mask.shape[1] == 0:
        raise ValueError("cannot extend an empty cross-attention mask: it has no last row to repeat")
    return mask[:, -1:]


def extend_cross_attention_mask(mask: torch.Tensor, num_new_tokens: int = 1) -> torch.Tensor:
    """Mask rows for `num_new_tokens` tokens appended after the prompt (generated_row's).
    [B, S, I, T] -> [B, S+n, I, T]."""
    return torch.cat([mask, generated_row(mask).expand(-1, num_new_tokens, -1, -1)], dim=1)
