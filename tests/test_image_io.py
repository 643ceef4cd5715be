"""load_image: every source it accepts, and every way it fails (a ValueError naming the image's position)."""
from __future__ import annotations

import base64
import functools
import http.server
import io
import socket
import struct
import threading
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

from mllama.processing.image_io import DEFAULT_MAX_PIXELS, load_image

POSITION = "image 2 of sample 1"


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_image(mode: str = "RGB") -> PIL.Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(23, 37, 4), dtype=np.uint8)
    return PIL.Image.fromarray(pixels, "RGBA").convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds no pixel data (what a bomb looks like up front)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def assert_fails(source, needle: str, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load_image(source, position=POSITION, **kwargs)
    message = str(info.value)
    assert message.startswith(POSITION + ":"), message
    assert needle in message, message
    assert "Valid images are" in message  # says what would be accepted
    return message


# --------------------------------------------------------------------------------------------------------------
# Sources that work.
# --------------------------------------------------------------------------------------------------------------

def test_in_memory_images_pass_through():
    image = sample_image()
    assert load_image(image) is image
    array = np.zeros((4, 5, 3), np.uint8)
    tensor = torch.zeros(3, 4, 5)
    assert load_image(array) is array and load_image(tensor) is tensor


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_files_bytes_and_base64_decode_to_the_same_pixels(mode, tmp_path):
    image = sample_image(mode)
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    sources = [str(path), path, data, bytearray(data), encoded, "data:image/png;base64," + encoded,
               "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)),  # MIME line breaks
               encoded.rstrip("=")]  # stripped padding
    for source in sources:
        loaded = load_image(source)
        assert loaded.mode == mode  # alpha is kept: the processors composite it onto white
        assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_exif_orientation_is_applied(tmp_path):
    image = sample_image()  # 37 wide, 23 high
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif)
    assert load_image(path).size == (23, 37)


def test_transparency_info_of_palette_images_survives(tmp_path):
    image = sample_image("P")
    image.info["transparency"] = 0
    path = tmp_path / "transparent.png"
    image.save(path, transparency=0)
    assert load_image(path).info.get("transparency") == 0


# --------------------------------------------------------------------------------------------------------------
# A local HTTP server on the loopback interface (there is no other network).
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def http_folder(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_download(http_folder):
    folder, base = http_folder
    image = sample_image()
    (folder / "cat.png").write_bytes(png_bytes(image))
    assert np.array_equal(np.asarray(load_image(f"{base}/cat.png")), np.asarray(image))


def test_url_errors(http_folder):
    folder, base = http_folder
    (folder / "cat.png").write_bytes(png_bytes(sample_image()))
    (folder / "notes.txt").write_bytes(b"hello")
    assert_fails(f"{base}/missing.png", "HTTP 404")
    assert_fails(f"{base}/cat.png", "more than max_bytes=100", max_bytes=100)
    assert_fails(f"{base}/notes.txt", "not in any image format")


def test_unreachable_and_silent_servers():
    with socket.socket() as closed:  # bind, then close: nothing listens on this port
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert_fails(f"http://127.0.0.1:{port}/x.png", "could not download")
    with socket.socket() as silent:  # accepts connections but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        message = assert_fails(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png", "could not download", timeout=0.3)
        assert "timeout 0.3s" in message


# --------------------------------------------------------------------------------------------------------------
# Failures: corrupt, empty, too large, wrong type, missing.
# --------------------------------------------------------------------------------------------------------------

def test_corrupt_and_truncated_data(tmp_path):
    assert_fails(b"definitely not an image", "not in any image format PIL can read")
    data = png_bytes(sample_image())
    assert_fails(data[: len(data) // 2], "corrupt or truncated")
    path = tmp_path / "broken.png"
    path.write_bytes(data[:60])
    assert_fails(path, "broken.png")


def test_empty_inputs(tmp_path):
    empty_file = tmp_path / "empty.png"
    empty_file.write_bytes(b"")
    assert_fails(empty_file, "is empty (0 bytes)")
    assert_fails(b"", "is empty (0 bytes)")
    assert_fails("", "empty string")
    assert_fails(PIL.Image.new("RGB", (0, 10)), "the image is empty (0x10 pixels)")


def test_decompression_bombs_are_refused_from_the_header():
    # The header check runs before decoding: this file has no pixel data, so decoding would report corruption.
    message = assert_fails(png_header_only(10_000, 10_000), "more than max_pixels=50000000", max_pixels=50_000_000)
    assert "10000x10000" in message
    # Above PIL's own limit, PIL's DecompressionBombError is turned into the same kind of error.
    assert_fails(png_header_only(30_000, 30_000), "decompression bomb")
    assert DEFAULT_MAX_PIXELS == 178_956_970
    assert_fails(sample_image(), "more than max_pixels=100", max_pixels=100)  # PIL images are checked too


def test_bad_base64_and_data_urls():
    assert_fails("abcde", "not an existing file, a URL, or valid base64")
    assert_fails(base64.b64encode(b"hello world").decode(), "not in any image format")
    assert_fails("data:image/png;base64,@@@@", "valid base64")
    assert_fails("data:text/plain;base64,aGVsbG8=", "malformed data URL")
    assert_fails("data:image/png,rawbytes", "malformed data URL")


def test_missing_files_and_folders(tmp_path):
    assert_fails("holiday photo.jpg", "no image file at 'holiday photo.jpg' (file not found)")
    assert_fails("/no/such/dir/cat", "file not found")
    assert_fails(tmp_path / "missing.png", "file not found")
    assert_fails(str(tmp_path), "is a directory")


@pytest.mark.parametrize("source", [42, 3.5, None, {"url": "x"}, ["a.png"], object()])
def test_unsupported_types(source):
    assert_fails(source, "unsupported image type")


def test_default_position_and_long_inputs_are_shortened():
    with pytest.raises(ValueError, match=r"^image 0: "):
        load_image(12)
    long_junk = "A" * 10_000 + "$"  # not base64, not a path that exists
    message = assert_fails(long_junk, "(10001 characters)")
    assert len(message) < 600
