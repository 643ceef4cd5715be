"""The base64 fast path (strict C decoding of the payload as it is) against the lenient rule it short-cuts.

image_io.decode_base64 is the one decoder (image strings, data URLs, the server's request images); with the
fast path it must accept exactly the payloads the lenient rule accepts, return the same bytes and fail with the
same message, in both callers' words. The lenient rule is written out here as the oracle.
"""
from __future__ import annotations

import base64
import binascii
import io
import sys

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest

from mllama.processing import image_io
from mllama.processing.image_io import decode_plain_base64
from mllama.server.prompts import ImageOptions, RequestError, data_url_payload_bytes, load_image_url


def old_server_decode(payload: str):
    """The server's rule, which is image_io's lenient one (whitespace anywhere dropped, stripped padding restored,
    the URL-safe alphabet taken), with the server's words for an error."""
    compact = "".join(payload.split())
    compact += "=" * (-len(compact) % 4)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return "ok", base64.b64decode(compact, altchars=altchars, validate=True)
    except ValueError as e:
        return "error", f"p: the data URL's payload is not valid base64 ({e})"


def new_server_decode(payload: str):
    try:
        return "ok", data_url_payload_bytes(payload, "p")
    except RequestError as e:
        assert e.param == "p" and e.status == 400
        return "error", e.message


def old_image_io_decode(text: str):
    """processing/image_io.py `_decode_base64` before the fast path."""
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        return "error", f"{text!r}"[:20] + f" ... ({exc})"
    if not data:
        return "error", "decodes to no bytes"
    return "ok", data


def new_image_io_decode(text: str):
    try:
        return "ok", image_io._decode_base64(text, "image 0")
    except ValueError as e:
        message = str(e)
        if "decodes to no bytes" in message:
            return "error", "decodes to no bytes"
        reason = message[message.index("valid base64 (") + len("valid base64 ("):message.index("). Valid images")]
        return "error", f"{text!r}"[:20] + f" ... ({reason})"


def tricky_payloads() -> list[str]:
    data = bytes(range(256)) * 3
    payloads = []
    for n in (0, 1, 2, 3, 4, 5, 6, 7, 31, 32, 33, 100, 767, 768):
        good = base64.b64encode(data[:n]).decode()
        unpadded = good.rstrip("=")
        wrapped = "\n".join(good[i:i + 76] for i in range(0, len(good), 76))
        payloads += [
            good, unpadded, good + "=", good + "==", good + "===", unpadded + "=",
            " " + good, good + " ", "\t" + good + "\n", good + "\r\n", wrapped, wrapped.replace("\n", "\r\n"),
            unpadded + "\n", unpadded + " =", good[:1] + " " + good[1:], good.replace("=", " ="),
            good + "\x0b", good + "\x0c", good + "\x1c", good + "\x85", good + "\u2003", "\u3000" + good,
            good + "*", "*" + good, good[:2] + "*" + good[2:], good + "é", good + "\x00", good + "==" + good,
            good[:-1] if good else "", good + "A", good + "AA", good + "AAA", good.replace("A", "-"),
            good.replace("+", "-").replace("/", "_"), good.replace("/", "_"), "=" + good, good + "\n\n",
        ]
    payloads += ["", " ", "\n", "=", "==", "===", "====", "A", "AA", "AAA", "AAAA", "AA==", "AA=", "A===", "AB=C",
                 "QQ==QQ==", "QR==", "QUJ=", "QUJD=", "QUJD==", "QUJD ", " QUJD", "QU JD", "QUJ D", "QU\nJD",
                 "@@@", "@@@@", "not base64!", "data", "Zm9v\nYmFy", "Zm9vYmFy\n", "Zm9vYg", "Zm9vYg=", "Zm9vYg==",
                 "Zm9vYg===", "Zm9vYmE", "Zm9vYmE=", "Zm9vYmE==", "Zm9v YmE", "ÿÿÿÿ", "\ud800abc"]
    return payloads


def random_payloads(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    standard = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    alphabet = list(standard) * 3 + list("==  \n\t\r-_*.é\x1c")
    out = []
    for _ in range(count):
        if rng.random() < 0.5:  # a valid encoding, then a few random edits
            text = list(base64.b64encode(rng.bytes(int(rng.integers(0, 40)))).decode())
            for _ in range(int(rng.integers(0, 3))):
                at = int(rng.integers(0, len(text) + 1))
                op = rng.integers(0, 3)
                if op == 0:
                    text.insert(at, str(rng.choice(alphabet)))
                elif op == 1 and text:
                    del text[min(at, len(text) - 1)]
                elif text:
                    text[min(at, len(text) - 1)] = str(rng.choice(alphabet))
            out.append("".join(text))
        else:
            out.append("".join(rng.choice(alphabet, size=int(rng.integers(0, 14)))))
    return out


PAYLOADS = tricky_payloads() + random_payloads(3000)


def test_server_decoder_equals_the_old_one():
    accepted = 0
    for payload in PAYLOADS:
        expected = old_server_decode(payload)
        assert new_server_decode(payload) == expected, repr(payload)
        accepted += expected[0] == "ok"
    assert 300 < accepted < len(PAYLOADS) - 300  # both outcomes are well represented


def test_image_io_decoder_equals_the_old_one():
    for payload in PAYLOADS:
        assert new_image_io_decode(payload) == old_image_io_decode(payload), repr(payload)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the fast path needs binascii's strict mode")
def test_fast_path_takes_plain_base64_and_nothing_else():
    data = bytes(range(256)) * 5
    good = base64.b64encode(data).decode()
    assert decode_plain_base64(good) == data
    assert decode_plain_base64(base64.b64encode(data[:-1]).decode().rstrip("=")) == data[:-1]  # padding restored
    for text in (good + "\n", " " + good, good[:10] + "\n" + good[10:], good + "*", good + "é", good + "=",
                 good.replace("+", "-"), good + "A", "=" + good, "AAAA=AAA"):
        assert decode_plain_base64(text) is None, repr(text[:20])
    # Whatever the fast path accepts, the lenient path accepts with the same bytes.
    for payload in PAYLOADS:
        fast = decode_plain_base64(payload)
        if fast is not None:
            assert old_server_decode(payload) == ("ok", fast), repr(payload)


def test_data_urls_with_whitespace_and_without_padding_decode_to_the_same_image():
    pixels = np.random.default_rng(0).integers(0, 256, (31, 45, 3), dtype=np.uint8)
    for length in range(3):  # a PNG whose base64 ends in padding, so that stripping it changes the payload
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text("comment", "x" * length)
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, "PNG", pnginfo=info)
        good = base64.b64encode(buffer.getvalue()).decode()
        if good.endswith("="):
            break
    assert good.endswith("=")
    variants = [good, good.rstrip("="), "\n".join(good[i:i + 76] for i in range(0, len(good), 76)),
                "\r\n".join(good[i:i + 64] for i in range(0, len(good), 64)) + "\r\n", "  " + good + "\n"]
    for payload in variants:  # plain, unpadded, wrapped at 76 and at 64 columns, surrounded by whitespace
        assert old_server_decode(payload)[0] == "ok"
        image = load_image_url("data:image/png;base64," + payload, "p", ImageOptions())
        assert np.array_equal(np.asarray(image), pixels)
    for payload, reason in [(good[:40] + "*" + good[40:], "Only base64 data is allowed"),
                            (good + "é", "string argument should contain only ASCII characters"),
                            (good[:40] + "=" + good[40:], "Discontinuous padding not allowed")]:
        with pytest.raises(RequestError) as info:
            load_image_url("data:image/png;base64," + payload, "p", ImageOptions())
        assert info.value.message == old_server_decode(payload)[1]
        assert reason in info.value.message
