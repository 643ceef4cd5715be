"""Turning whatever a user calls "an image" (PIL image, path, URL, data URL, base64, bytes) into a PIL image.

Every failure is a `ValueError` that names the image by its position ("image 2 of sample 1") and says what
would have been accepted, so that a bad item in a large batch can be found without reading a PIL traceback.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

# PIL refuses images above twice its MAX_IMAGE_PIXELS (89,478,485) with DecompressionBombError; using the same
# number keeps one limit in force. Raising it above PIL's own limit also needs PIL.Image.MAX_IMAGE_PIXELS raised.
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # 178,956,970 pixels, e.g. 16,000 x 11,000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # cap on a downloaded file, so a huge or endless response cannot exhaust memory

VALID_SOURCES = (
    "Valid images are a PIL image, a numpy array or torch tensor (HWC or CHW), a path to an image file, "
    "an http(s) URL, a 'data:image/<type>;base64,...' URL, a base64-encoded image string, or raw image bytes."
)

_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def _error(position: str, problem: str) -> ValueError:
    return ValueError(f"{position}: {problem}. {VALID_SOURCES}")


def _short(text: str, limit: int = 80) -> str:
    # base64 payloads can be megabytes long; an error message only needs to recognise them
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def load_image(
    source: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    position: str = "image 0",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PIL.Image.Image | np.ndarray | torch.Tensor:
    """Load one image from any supported source.

    PIL images come back unchanged (after the size checks); numpy arrays and torch tensors are returned as they
    are, since the image processors read them directly. Everything else is decoded into a fully loaded PIL image
    in its stored mode (RGBA stays RGBA: the processors composite alpha onto white), with its EXIF orientation
    applied. `max_pixels` is checked from the file header before any pixel is decoded.
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return source
    if isinstance(source, PIL.Image.Image):
        _check_size(source.size, max_pixels, position)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), max_pixels=max_pixels, position=position)
    if isinstance(source, os.PathLike):
        return _load_file(Path(source), max_pixels, position)
    if isinstance(source, str):
        return _load_string(source, max_pixels=max_pixels, timeout=timeout, position=position, max_bytes=max_bytes)
    raise _error(position, f"unsupported image type {type(source).__module__}.{type(source).__qualname__}")


def _load_string(source: str, *, max_pixels: int, timeout: float, position: str, max_bytes: int) -> PIL.Image.Image:
    text = source.strip()
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        data = fetch_url(text, timeout=timeout, position=position, max_bytes=max_bytes)
        return decode_image_bytes(data, max_pixels=max_pixels, position=position, what=f"the file at {_short(text)}")
    if lowered.startswith("data:"):
        return decode_image_bytes(_decode_data_url(text, position), max_pixels=max_pixels, position=position,
                                  what="the data URL")
    if not text:
        raise _error(position, "got an empty string")
    if len(text) < 4096 and os.path.exists(os.path.expanduser(text)):
        return _load_file(Path(os.path.expanduser(text)), max_pixels, position)
    # Strings with '.', '~', '\\' or inner spaces cannot be base64, and base64 of a JPEG is the only one that starts
    # with '/' ('/9j/'): both are paths the user meant, so say "file not found" rather than "bad base64".
    compact = "".join(text.split())
    if not _BASE64_CHARS.match(compact) or (text.startswith("/") and not text.startswith("/9j/")):
        raise _error(position, f"no image file at {_short(text)} (file not found)")
    return decode_image_bytes(_decode_base64(text, position), max_pixels=max_pixels, position=position,
                              what="the base64 string")


def _load_file(path: Path, max_pixels: int, position: str) -> PIL.Image.Image:
    if not path.exists():
        raise _error(position, f"no image file at '{path}' (file not found)")
    if path.is_dir():
        raise _error(position, f"'{path}' is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _error(position, f"cannot read '{path}' ({exc.strerror or exc})") from None
    return decode_image_bytes(data, max_pixels=max_pixels, position=position, what=f"the file '{path}'")


def fetch_url(url: str, *, timeout: float = 10.0, position: str = "image 0",
              max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Download `url` with the standard library, refusing responses larger than `max_bytes`."""
    request = urllib.request.Request(url, headers={"User-Agent": "mllama-image-loader"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise _error(position, f"{_short(url)} is {int(declared)} bytes, more than max_bytes={max_bytes}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise _error(position, f"could not download {_short(url)}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _error(position, f"could not download {_short(url)} ({reason}; timeout {timeout}s)") from None
    if len(data) > max_bytes:
        raise _error(position, f"{_short(url)} is more than max_bytes={max_bytes} bytes")
    return data


def parse_data_url(url: str) -> tuple[str, str] | None:
    """'data:<media type>[;...];base64,<payload>' -> (the media type, lowercased, and the payload); None for any
    other string. The one reading of data URLs here and in the server (which accepts fewer media types)."""
    header, comma, payload = url.partition(",")
    if not comma or not header[:5].lower() == "data:" or ";base64" not in header.lower():
        return None
    return header[5:].split(";")[0].strip().lower(), payload


def _decode_data_url(url: str, position: str) -> bytes:
    parsed = parse_data_url(url)
    if parsed is None or not parsed[0].startswith("image/"):
        raise _error(position, f"malformed data URL {_short(url, 40)}; expected 'data:image/<type>;base64,<data>'")
    return _decode_base64(parsed[1], position)


# binascii's strict mode (Python 3.11+) is exactly what base64.b64decode(..., validate=True) runs there.
_STRICT_BASE64 = sys.version_info >= (3, 11)


def decode_plain_base64(text: str) -> bytes | None:
    """`text` decoded as plain standard base64 (no whitespace, padding optional), or None if it is not that.

    This is the fast path of decode_base64, whose lenient rule strips whitespace (a copy of the whole text, slow
    for a megabyte payload), restores stripped padding and runs strict decoding. When strict decoding of the text
    as it is (padding restored) succeeds, the text holds no whitespace and no URL-safe characters, so the lenient
    path would have decoded the very same string: the bytes are the same. On None, decode_base64 runs its lenient
    path, which gives the same bytes, or the same error, as before.
    """
    if not _STRICT_BASE64:
        return None
    padding = -len(text) % 4
    if padding == 3:  # one character past a multiple of 4: never valid, let the lenient path say why
        return None
    try:
        return binascii.a2b_base64(text + "=" * padding if padding else text, strict_mode=True)
    except ValueError:  # binascii.Error (a ValueError), or non-ASCII characters
        return None


def decode_base64(text: str) -> bytes:
    """Base64 text -> its bytes, leniently: whitespace anywhere is dropped, stripped padding restored, and the
    URL-safe alphabet ('-', '_') taken too. ValueError (binascii's reason) for anything else. The one base64 rule
    of mllama: image strings, data URLs, and the server's request images."""
    data = decode_plain_base64(text)  # the common case, without copying megabytes to strip whitespace
    if data is not None:
        return data
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    return base64.b64decode(compact, altchars=altchars, validate=True)


def _decode_base64(text: str, position: str) -> bytes:
    try:
        data = decode_base64(text)
    except ValueError as exc:  # binascii.Error is one
        raise _error(position, f"{_short(text)} is not an existing file, a URL, or valid base64 ({exc})") from None
    if not data:
        raise _error(position, "the base64 string decodes to no bytes")
    return data


def decode_image_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, position: str = "image 0",
                       what: str = "the image data", formats: tuple[str, ...] | None = None) -> PIL.Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) into a loaded PIL image, checking the size from the header first.
    `formats` (PIL's names, e.g. ("PNG", "JPEG")): the only decoders tried; None: every format PIL reads."""
    if not data:
        raise _error(position, f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns between its two thresholds; our own max_pixels check below is the one that decides
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=formats)
    except PIL.Image.DecompressionBombError as exc:
        reason = str(exc).rstrip(".")
        raise _error(position, f"{what} is refused as a decompression bomb ({reason}); "
                               f"max_pixels={max_pixels}") from None
    except PIL.UnidentifiedImageError:
        if formats is not None:
            raise _error(position, f"{what} is not a {', '.join(formats)} image (corrupt, or another format)") \
                from None
        raise _error(position, f"{what} is not in any image format PIL can read (corrupt or not an image)") from None
    except Exception as exc:  # PIL plugins raise a variety of types on malformed headers
        raise _error(position, f"{what} could not be opened as an image ({type(exc).__name__}: {exc})") from None
    _check_size(image.size, max_pixels, position)
    try:
        image.load()
        # In place: the same transposition, without copying every image that needs none (most of them)
        PIL.ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # truncated or corrupt pixel data only shows up when decoding
        raise _error(position, f"{what} could not be decoded, the data is corrupt or truncated "
                               f"({type(exc).__name__}: {exc})") from None
    return image


def _check_size(size: tuple[int, int], max_pixels: int, position: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise _error(position, f"the image is empty ({width}x{height} pixels); an image needs at least 1x1 pixel")
    if width * height > max_pixels:
        raise _error(position, f"the image is {width}x{height} = {width * height} pixels, more than "
                               f"max_pixels={max_pixels} (a possible decompression bomb); pass a larger max_pixels "
                               f"if the image is trusted")
