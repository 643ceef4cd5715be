"""Prefills: a group of waiting requests through the vision encoder (one request's images at a time), then the
text part, then each row's K/V into the request's pages.

`Prefiller` holds what a prefill uses (the model, the page pools, the vision and prefill graphs, the side
stream) and nothing of the engine's scheduling: the engine calls prepare, encode and text_part, puts the
requests in their slots, and gives `encode` the decode step to run between two requests' images.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..modeling.cache import MllamaCache
from .fast import text_prefill
from .paged import PagedCaches
from .requests import GenerationRequest


@dataclass
class Prefill:
    """A prefill between its vision part (maybe still running on the side stream) and its text part. `rows`:
    each request's row in the batch (requests that share a prompt share a row); `lengths`: each row's."""
    group: list
    rows: list[int]
    lengths: list[int]
    width: int
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    inputs: dict
    keep: torch.Tensor | None = None
    states: torch.Tensor | None = None
    ready: Any = None  # a CUDA event recorded after the vision part, or None when nothing is pending
    ratio_mask_host: torch.Tensor | None = None  # aspect_ratio_mask on the host, for the encoder's planning
    ids_host: torch.Tensor | None = None
    cached: bool = False  # one request whose images' K/V are all in the image cache: no encoder to run


class Prefiller:
    WIDTH = 64  # prefill widths are multiples of this

    def __init__(self, model, caches: PagedCaches, vision_runner, prefill_graphs, side_stream, can_overlap: bool,
                 max_tiles: int):
        self.model, self.caches = model, caches
        self.text = model.model.language_model if hasattr(model.model, "language_model") else model.model
        self.vision_runner, self.prefill_graphs, self.side_stream = vision_runner, prefill_graphs, side_stream
        self.can_overlap, self.max_tiles = can_overlap, max_tiles
        param = next(model.parameters())
        self.device, self.dtype = param.device, model.dtype
        self.width = self.WIDTH

    def prepare(self, group: list[tuple[GenerationRequest, int]], cached: bool = False) -> Prefill:
        """The group's prompts left-padded to one width (real tokens keep positions 0..L-1, so each row computes
        what it would alone) and its image inputs, on the device: one row for the requests that share a prompt
        (GenerationRequest.share)."""
        rows_of: dict = {}
        rows = [rows_of.setdefault(r.share if r.share is not None else id(r), len(rows_of)) for r, _ in group]
        first = {row: i for i, row in reversed(list(enumerate(rows)))}
        unique = [group[first[row]] for row in range(len(rows_of))]
        prefill = self._batch(unique, cached)
        prefill.group, prefill.rows = group, rows
        return prefill

    def _batch(self, group: list[tuple[GenerationRequest, int]], cached: bool) -> Prefill:
        lengths = [len(r.prompt_ids) for r, _ in group]
        # Widths rounded up (more left padding, exact): attention kernels that build a plan per shape (cuDNN's,
        # 150-1200 ms each on the H200) then meet a few widths again and again, not a new one per prompt length.
        width, rows = -(-max(lengths) // self.width) * self.width, len(group)
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for row, (r, _) in enumerate(group):
            ids[row, width - lengths[row]:] = torch.tensor(r.prompt_ids)
            mask[row, width - lengths[row]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {}
        for name in group[0][0].model_inputs:
            parts = [r.model_inputs[name] for r, _ in group]
            if name == "cross_attention_mask":  # [1, L, N, T]: pad on the left like the prompts
                parts = [F.pad(m, (0, 0, 0, 0, width - m.shape[1], 0)) for m in parts]
            inputs[name] = torch.cat(parts)
        ratio_mask_host = inputs.get("aspect_ratio_mask")
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return Prefill(group, list(range(rows)), lengths, width, ids.to(self.device), mask.to(self.device),
                       positions.to(self.device), inputs, ratio_mask_host=ratio_mask_host, ids_host=ids, cached=cached)

    def encode(self, p: Prefill, overlap: bool, between: Callable[[], None] | None = None) -> bool:
        """The vision part of a prefill: projected vision tokens of the kept tiles, into p.states. With
        `overlap`, queued on the side stream (the engine thread returns at once and decode steps go on while the
        GPU encodes; p.ready then marks the end) if every graph it needs was captured before. Returns whether it
        was queued that way. Without overlap, `between` is called between two requests' images (the engine runs
        a decode step of its batch there)."""
        pixels = p.inputs.get("pixel_values")
        if pixels is None or not self.can_overlap or p.cached:
            return False  # text only, a model without a vision encoder, or images cached: text_part does it all
        inner = self.model.model
        mask = p.inputs.get("cross_attention_mask")
        ratio_ids, ratio_mask = p.inputs.get("aspect_ratio_ids"), p.inputs.get("aspect_ratio_mask")
        inner.check_image_inputs(p.ids_host, pixels, ratio_ids, ratio_mask, mask)  # before anything is queued
        p.keep = inner.kept_tiles(mask, pixels)
        rows = range(pixels.shape[0])
        if self.vision_runner is not None and p.ratio_mask_host is not None:
            ratio_mask = p.ratio_mask_host  # the graphs plan on the host: no read-back behind queued encoder work
            if overlap and not all(self.vision_runner.captured(pixels[r:r + 1], ratio_ids[r:r + 1],
                                                               ratio_mask[r:r + 1]) for r in rows):
                overlap = False  # graphs are captured on the engine's stream, never beside running decode steps
        # One request's images at a time: the encoder only meets one-request shapes, which the start-up warm-up
        # covers, and without overlap a decode step of the running batch goes between two requests, so that a
        # group of four stops the batch for one encoder run at a time, not four in a row.
        stream = self.side_stream if overlap else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            parts = []
            for row in rows:
                if row and between is not None and not overlap:
                    between()
                parts.append(inner.encode_images(pixels[row:row + 1], ratio_ids[row:row + 1],
                                                 ratio_mask[row:row + 1], p.keep, self.vision_runner))
            p.states = parts[0] if len(parts) == 1 else torch.cat(parts)
            if stream is not None:
                p.ready = torch.cuda.Event()
                p.ready.record(stream)
        return overlap

    @torch.no_grad()
    def text_part(self, p: Prefill) -> tuple[torch.Tensor, MllamaCache]:
        """The text part of a prefill (the whole forward if nothing was encoded before): -> (last-row logits,
        the prompts' cache)."""
        group, width, rows = p.group, p.width, len(p.lengths)
        if p.ready is not None:  # encoded on the side stream: this stream waits for it, then owns the tokens
            torch.cuda.current_stream().wait_event(p.ready)
            p.states.record_stream(torch.cuda.current_stream())
        cross_mask = p.inputs.get("cross_attention_mask")
        if p.cached:  # every image's K/V is in its pages already: no encoder, and the text part reads them
            self.text._check_ids(p.ids_host)
            pixels = p.inputs["pixel_values"]
            keys, values = self.caches.gather_tiles([page for _, entry in group[0][0].holding.images
                                                     for page in entry.pages])
            keep = self.model.model.kept_tiles(cross_mask, pixels)
            given = (p.ids, p.mask, p.positions, cross_mask)
            replayed = self.prefill_graphs(*given, cross=(keys, values, keep)) if self.prefill_graphs is not None \
                else None  # (a turn of a conversation: its first token ~60 ms sooner than eagerly, on the H200)
            logits, cache = replayed if replayed is not None else text_prefill(self.model, *given,
                                                                               cross=(keys, values, keep))
        elif p.states is not None or not p.inputs:  # images encoded already, or text only: the text part alone
            if p.states is None:
                self.text._check_ids(p.ids_host)  # (the image path checked them before its encoder ran)
            given = (p.ids, p.mask, p.positions, cross_mask, p.states, p.keep)
            # one-request prefills only: a group's text part as a graph too was measured no faster (its launches
            # overlap the last image's encoder work; bench/results/2026-11-29-h200-serve-load-s5-group-prefill-
            # graphs.json), and its graphs' outputs would hold rows x 210 MB each
            replayed = self.prefill_graphs(*given) if self.prefill_graphs is not None and rows == 1 else None
            logits, cache = replayed if replayed is not None else text_prefill(self.model, *given)
        else:  # inputs the encoder path left alone (a model without a vision encoder): the model's own forward
            cache = MllamaCache.allocate(self.model.config, rows, width, self.device, self.dtype)
            logits = self.model(input_ids=p.ids, attention_mask=p.mask, position_ids=p.positions, cache=cache,
                                use_cache=True, logits_to_keep=1, **p.inputs).logits[:, -1]
        return logits, cache

    def bind(self, r: GenerationRequest, slot: int, cache: MllamaCache, row: int, pad: int,
              last_seen: torch.Tensor | None, fill: bool) -> None:
        """Copies a prefilled row's K/V into the request's pages and points its slot at them. Each generated
        token sees the tiles the last prompt token saw (the rule generate follows)."""
        c, holding = self.caches, r.holding
        c.store_prompt(holding.self_pages, cache.key, cache.value, row, pad, len(r.prompt_ids))
        if not holding.images:
            c.bind_row(slot, holding, [], 0.0)
            return
        tiles = self.max_tiles
        kept = cache.cross_tiles.tolist() if cache.cross_tiles is not None else None
        where = {tile: i for i, tile in enumerate(kept)} if kept is not None else None  # N*T index -> cache's
        for n, (_, entry) in enumerate(holding.images):
            if entry.ready or not fill:
                continue
            present = [t for t in range(len(entry.pages)) if where is None or n * tiles + t in where]
            if present:
                c.store_tiles([entry.pages[t] for t in present], cache.cross_key, cache.cross_value, row,
                              [n * tiles + t if where is None else where[n * tiles + t] for t in present])
            entry.ready = len(present) == len(entry.pages)  # (a tile no row sees was never computed)
        if last_seen is None:  # images without a mask: every row sees every vision token
            seen = [(n, t) for n, (_, e) in enumerate(holding.images) for t in range(len(e.pages))]
            row_mask = 1.0
        else:
            seen = [(n, t) for n, t in last_seen.nonzero().tolist()]
            row_mask = 1.0 if seen else 0.0
            if not seen and getattr(self.text.config, "compat", "meta") != "meta":
                # transformers' rule: a row that sees no image attends to every vision token (zeroed MLP only)
                seen = [(n, t) for n, (_, e) in enumerate(holding.images) for t in range(len(e.pages))]
        c.bind_row(slot, holding, [holding.images[n][1].pages[t] for n, t in seen], row_mask)
