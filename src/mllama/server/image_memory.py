"""Images that clients send again, decoded once: what the HTTP process does with its DecodedImages when the
requests are decoded by input worker processes.

Chat clients re-send a conversation's images with every turn. The HTTP process keeps each decoded image's tiles
(server.prompts.DecodedImages, by the sha256 of its data URL's payload text). Before a body goes to a worker, every
payload it holds is cut out of the body and replaced by a ref, a random marker the worker is told about
(`with_refs`): the worker then parses a small body, decodes only the images it has not seen, and sends back only
their pixels; the HTTP process puts the pixels it holds back in (`join_pixels`). Sending the 5 MB body to a worker
and its 7.5 MB of tiles back cost ~30-60 ms per request through the process pool's pipes, more than the decoding
the worker skips.

A payload is found in the raw body as what follows ';base64,' up to the next '"', without a backslash in it (so
that the raw bytes are the JSON string's text). Such a span could also be text that only looks like a data URL:
the worker then meets a marker that is not an image URL and refuses the refs (RefsMisplaced), and the original body
is decoded instead. Markers carry a random token per request, so a client cannot send one.
"""
from __future__ import annotations

import hashlib
import secrets

import torch

from .engine_process import pack_tensors, unpack_tensors
from .prompts import DecodedImages, ImagePart, ImageRef

MIN_PAYLOAD = 4096  # characters: smaller images are decoded each time (a few milliseconds)


def find_payloads(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of every base64 data URL payload of `raw` that could be a held image."""
    spans, at = [], 0
    while (found := raw.find(b";base64,", at)) >= 0:
        start = found + 8
        end = raw.find(b'"', start)
        if end < 0:
            break
        if end - start >= MIN_PAYLOAD and raw.find(b"\\", start, end) < 0:
            spans.append((start, end))
        at = end
    return spans


def with_refs(raw: bytes, memory: DecodedImages) -> tuple[bytes, dict[str, ImageRef], dict[bytes, ImagePart]]:
    """`raw` with the payloads `memory` holds replaced by refs -> (the body to send, ref -> ImageRef for the
    worker, digest -> ImagePart held for join_pixels)."""
    token = secrets.token_hex(8)
    view = memoryview(raw)
    pieces, refs, held, last = [], {}, {}, 0
    for k, (start, end) in enumerate(find_payloads(raw)):
        digest = hashlib.sha256(view[start:end]).digest()
        part = memory.get(digest)
        if part is None:
            continue
        marker = f"mllama-ref-{token}-{k}"
        refs[marker] = ImageRef(part.aspect_ratio_id, part.num_tiles, digest)
        held[digest] = part
        pieces += [view[last:start], marker.encode()]
        last = end
    if not refs:
        return raw, {}, {}
    return b"".join(pieces + [view[last:]]), refs, held


def join_pixels(packed: dict, pixel_parts: list, held: dict[bytes, ImagePart], memory: DecodedImages | None) -> dict:
    """A worker's packed inputs (all but pixel_values) and its images' (part without pixels, its pixels packed, or
    None for a ref) -> the packed inputs with pixel_values, each held image's pixels put back; the images decoded
    now are kept in `memory` (if any)."""
    if not pixel_parts:
        return packed
    tensors = []
    for part, pixels in pixel_parts:
        if pixels is None:
            tensors.append(held[part.digest].pixels)
            continue
        tensors.append(unpack_tensors({"pixels": pixels})["pixels"])
        if memory is not None and part.digest is not None:
            memory.put(part._replace(pixels=tensors[-1]))
    return {**packed, **pack_tensors({"pixel_values": torch.cat(tensors, dim=1)})}
