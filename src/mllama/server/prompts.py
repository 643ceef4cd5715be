"""OpenAI request bodies -> token ids and image tensors, with user text kept as text.

The chat template copies user text verbatim into the prompt, so a user who types "<|image|>" (or "<|eot_id|>")
would otherwise create a real special token: an image slot without an image, or a forged turn. Here the prompt
is rendered with a private-use marker around every piece of user text; then the rendered string is cut at the
special tokens of the TEMPLATE's text only, and every stretch between two such tokens (template text and user
text together) is encoded with special-token parsing off. The tokenizer itself cuts at special tokens first and
encodes the stretches between them independently, so for text without special-token strings the ids are exactly
what `processor.apply_chat_template(..., tokenize=True)` gives (a test checks this).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import http.client
import io
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import torch

from ..processing.cross_attention_mask import cross_attention_mask
from ..processing.image_io import decode_base64, decode_image_bytes, parse_data_url
from ..processing.processor import add_bos

# Private-use code points: never produced by a template, and removed from user text before rendering.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKED = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class RequestError(ValueError):
    """A client error: HTTP `status`, OpenAI `param` (the field at fault) and `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def __reduce__(self):  # raised in an input worker process, re-raised here: keep every field
        return RequestError, (self.message, self.param, self.status, self.code)


@dataclass
class ImageOptions:
    max_images: int = 4
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    allow_remote: bool = False
    allow_private_hosts: bool = False
    timeout: float = 10.0


_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")
SERVED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # PIL's names for the formats of _MEDIA_TYPES


def load_image_url(url: Any, param: str, options: ImageOptions, fetched: dict[str, bytes] | None = None):
    """A data: URL (png, jpeg, webp, gif) or, with --allow-remote-images, an http(s) URL -> a PIL image. An http(s)
    URL's bytes are taken from `fetched` when there (the server fetches them beforehand), else downloaded here."""
    return decode_served_image(*image_url_bytes(url, param, options, fetched), param, options)


def image_url_bytes(url: Any, param: str, options: ImageOptions, fetched: dict[str, bytes] | None = None
                    ) -> tuple[bytes, str]:
    """The encoded file an image URL carries or names (see load_image_url), and what to call it in errors."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param} must be a non-empty string: a 'data:image/png;base64,...' URL"
                           + (" or an http(s) URL" if options.allow_remote else ""), param)
    head = url[:16].lower()
    if head.startswith("data:"):
        payload = check_data_url_header(url, param)
        if len(payload) * 3 // 4 > options.max_bytes:
            raise RequestError(f"{param} is about {len(payload) * 3 // 4} bytes, more than the limit of "
                               f"{options.max_bytes} bytes per image", param, status=413, code="image_too_large")
        return data_url_payload_bytes(payload, param), "the data URL"
    if head.startswith(("http://", "https://")):
        if not options.allow_remote:
            raise RequestError(f"{param}: remote image URLs are disabled on this server (start it with "
                               f"--allow-remote-images); send the image inline as a 'data:image/png;base64,...' "
                               f"URL", param)
        return (fetched[url] if fetched and url in fetched else fetch_remote(url, param, options)), \
            "the downloaded file"
    raise RequestError(f"{param} must be a 'data:image/<type>;base64,...' URL"
                       + (" or an http(s) URL" if options.allow_remote else "")
                       + f", got {url[:40]!r}", param)


def check_data_url_header(url: str, param: str) -> str:
    """A data URL's payload; RequestError unless its header is 'data:<a served type>;base64'."""
    parsed = parse_data_url(url)
    if parsed is None or parsed[0] not in _MEDIA_TYPES:
        raise RequestError(f"{param} is not a supported data URL: expected 'data:<type>;base64,<data>' with "
                           f"<type> one of {', '.join(t for t in _MEDIA_TYPES if t != 'image/jpg')}", param)
    return parsed[1]


def decode_served_image(data: bytes, what: str, param: str, options: ImageOptions):
    """An image file's bytes -> a PIL image, in the formats a client may declare; RequestError names `param`."""
    try:
        # Only the formats a client may declare: PIL would otherwise decode whatever it recognises (TIFF, EPS
        # through Ghostscript, ...) behind an image/png label.
        return decode_image_bytes(data, max_pixels=options.max_pixels, position=param, what=what,
                                  formats=SERVED_FORMATS)
    except ValueError as e:
        message = str(e).split(". Valid images are")[0]
        if "max_pixels" in message:
            raise RequestError(message, param, status=413, code="image_too_large") from None
        raise RequestError(message, param) from None


def data_url_payload_bytes(payload: str, param: str) -> bytes:
    """The bytes of a data URL's base64 payload (processing.image_io.decode_base64's rule)."""
    try:
        return decode_base64(payload)
    except ValueError as e:
        raise RequestError(f"{param}: the data URL's payload is not valid base64 ({e})", param) from None


class RemoteImagesNeeded(Exception):
    """The http(s) image URLs of a request whose bytes were not given, as (url, param) pairs.

    Raised by the first decoding pass: fetching is waiting on the network, not CPU work, so it is not done where
    requests are decoded (an input worker held by one slow image server would hold up every request queued behind
    it). The HTTP process fetches these on threads and decodes again with the bytes."""

    def __init__(self, urls: list[tuple[str, str]]):
        super().__init__(urls)  # the urls as the only argument: the exception pickles back from an input worker
        self.urls = urls


def is_remote(url: Any) -> bool:
    return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))


def require_fetched(urls: list[tuple[Any, str]], options: ImageOptions, fetched: dict[str, bytes] | None) -> None:
    """RemoteImagesNeeded for the http(s) URLs not in `fetched`. Nothing for data URLs, nor when remote images are
    disabled (load_image_url refuses those with its own message)."""
    if not options.allow_remote:
        return
    missing = [(url, param) for url, param in urls if is_remote(url) and url not in (fetched or {})]
    for url, param in missing:
        _remote_target(url, param)  # a malformed URL is refused here, before anything is fetched
    if missing:
        raise RemoteImagesNeeded(missing)


class _Target(NamedTuple):
    tls: bool
    host: str  # the URL's host (IDNA): what is resolved, and the name TLS sends (SNI) and verifies
    port: int
    host_header: str
    path: str  # path and query: the target of the request line


def _remote_target(url: str, param: str) -> _Target:
    try:
        parts = urlsplit(url)
    except ValueError as e:  # 'http://[/': a bracketed host that is no IPv6 address
        raise RequestError(f"{param}: the URL is not valid ({e})", param) from None
    if "@" in parts.netloc:
        # Credentials would have to go out as a header, and 'http://public.example@10.0.0.1/' reads like a
        # different host than the one it names.
        raise RequestError(f"{param}: image URLs with user info ('user:password@host') are not accepted; use a URL "
                           f"without credentials or send the image as a data URL", param)
    try:
        port, host = parts.port, (parts.hostname or "").encode("idna").decode("ascii")
    except ValueError as e:  # a port out of range or not a number; a host name that IDNA refuses
        raise RequestError(f"{param}: the URL's host or port is not valid ({e})", param) from None
    if not host:
        raise RequestError(f"{param}: the URL has no host", param)
    tls = parts.scheme.lower() == "https"
    default = 443 if tls else 80
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in the Host header
    host_header = name if port in (None, default) else f"{name}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(tls, host, default if port is None else port, host_header, path)


def _checked_addresses(target: _Target, param: str, options: ImageOptions) -> list[tuple]:
    """The host's addresses (getaddrinfo entries), resolved once and every one checked. The download connects to
    exactly these: resolving again to connect would let a DNS answer that changed in between (rebinding) reach an
    address that was never checked."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise RequestError(f"{param}: cannot resolve host {target.host!r} ({e})", param) from None
    if not options.allow_private_hosts:
        for *_, sockaddr in infos:
            _check_address(sockaddr[0], target.host, param)
    return infos


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _check_address(ip: str, host: str, param: str) -> None:
    # Internal addresses are refused, so that the server cannot be used to reach its own network.
    address = ipaddress.ip_address(ip.split("%")[0])  # an IPv6 zone (fe80::1%eth0) is not part of the address
    if address.version == 6:  # IPv6 forms that carry an IPv4 address reach that address
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            _check_address(str(embedded), host, param)
    # not is_global covers private, loopback, link-local, unspecified and shared (100.64/10) space; it lets
    # multicast, IPv6's reserved ranges and its old site-local ones through
    if (not address.is_global or address.is_multicast or address.is_reserved
            or getattr(address, "is_site_local", False)):
        raise RequestError(f"{param}: host {host!r} resolves to the non-public address {address}; image URLs "
                           f"must point to public hosts (or start the server with --allow-private-image-hosts)",
                           param)


class _PastDeadline(Exception):
    pass


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _PastDeadline
    return left


class _DeadlineReader(io.RawIOBase):
    """Reads a socket giving every recv only the time left until the fetch's deadline: a socket timeout alone is
    per read, so a server sending a byte now and then would never trip it."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(_time_left(self.deadline))
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:  # the timeout was all the time left
            raise _PastDeadline from None


class _DeadlineSocket:
    """What http.client needs of its socket (sendall, makefile, close), under one deadline. Closing is left to the
    fetch, which owns the real socket: http.client closes its connection before the body is read."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(_time_left(self.deadline))
        self.sock.sendall(data)

    def makefile(self, mode: str, *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self.sock, self.deadline))

    def close(self) -> None:
        pass


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # loads the system's CA certificates: once


def _connect(target: _Target, infos: list[tuple], deadline: float) -> socket.socket:
    """A connection to the first checked address that answers (TLS on top for https)."""
    error: OSError = OSError(f"no address for {target.host!r}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_time_left(deadline))
            sock.connect(sockaddr)
            if target.tls:
                # the name, not the address, is what SNI sends and the certificate must match
                sock.settimeout(_time_left(deadline))
                sock = _tls_context().wrap_socket(sock, server_hostname=target.host)
            return sock
        except OSError as e:  # e.g. an IPv6 address without a route: the next one
            error = e
        except BaseException:  # the deadline
            sock.close()
            raise
        sock.close()
    raise error


def _too_large(param: str, max_bytes: int) -> RequestError:
    return RequestError(f"{param}: the image is more than {max_bytes} bytes", param, status=413, code="image_too_large")


def _download(target: _Target, infos: list[tuple], deadline: float, param: str, max_bytes: int) -> bytes:
    sock = _connect(target, infos, deadline)
    try:
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = _DeadlineSocket(sock, deadline)  # already connected: http.client must not resolve again
        connection.request("GET", target.path, headers={"Host": target.host_header, "User-Agent": "mllama-server",
                                                        "Connection": "close"})
        response = connection.getresponse()
        if response.status != 200:
            raise RequestError(f"{param}: downloading the image gave HTTP {response.status} (redirects are not "
                               f"followed)", param)
        length = response.getheader("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise _too_large(param, max_bytes)
        data = response.read(max_bytes + 1)
    finally:
        sock.close()
    if len(data) > max_bytes:
        raise _too_large(param, max_bytes)
    return data


def fetch_remote(url: str, param: str, options: ImageOptions) -> bytes:
    """The bytes at an http(s) URL: one GET to a checked address, no redirects (one could lead to an internal
    address), at most max_bytes, and options.timeout for all of it (connecting, TLS, headers and body)."""
    target = _remote_target(url, param)
    deadline = time.monotonic() + options.timeout
    infos = _checked_addresses(target, param, options)
    try:
        return _download(target, infos, deadline, param, options.max_bytes)
    except RequestError:
        raise
    except (_PastDeadline, TimeoutError):  # every timeout given was the time left
        raise RequestError(f"{param}: downloading the image took longer than {options.timeout:g} s, the limit for "
                           f"the whole download (connecting, headers and body)", param) from None
    except Exception as e:  # refused connections, TLS errors, malformed responses
        raise RequestError(f"{param}: could not download the image ({type(e).__name__}: {e})", param) from None


# -----------------------------------------------------------------------------------------------------------------
# Chat messages

_ROLES = ("system", "user", "assistant", "tool")


def parse_messages(messages: Any, options: ImageOptions) -> tuple[list[dict], list[str], list[Any]]:
    """OpenAI messages -> (template messages with marked text, the user texts by marker number, image URLs).
    Images stay URLs here; they are decoded later, after the cheap checks."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of {role, content} objects", "messages")
    out, texts, urls = [], [], []

    def mark(text: str) -> str:
        # The markers must not be forgeable from user text. Empty text stays empty: the template tests some
        # contents for emptiness (an empty system message beside an image is no system message).
        text = text.replace(_OPEN, "").replace(_CLOSE, "")
        if not text:
            return ""
        texts.append(text)
        return f"{_OPEN}{len(texts) - 1}{_CLOSE}"

    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role must be one of {list(_ROLES)}, got {role!r}", f"{where}.role")
        if "tool_calls" in message:  # an assistant's call, as tools.template_messages made it (checked there)
            out.append(message)
            continue
        content = message.get("content")
        if role == "tool":  # the template prints a tool's result as a JSON string: the text marked, escaped
            out.append({"role": role, "content": mark(json.dumps(content, ensure_ascii=False)[1:-1])})
            continue
        if isinstance(content, str):
            text = content.strip() if role == "system" else content  # the template trims system text
            out.append({"role": role, "content": mark(text)})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or an array of content parts, got "
                               f"{type(content).__name__}", f"{where}.content")
        parts = []
        for p, part in enumerate(content):
            pw = f"{where}.content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{pw}.text must be a string", f"{pw}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{pw}: images are only accepted in user messages, not {role}", pw)
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                urls.append((url, f"{pw}.image_url.url"))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{pw}.type must be 'text' or 'image_url', got {kind!r}", f"{pw}.type")
        if role == "system":
            # The template trims system content as one string; join the text parts so it can.
            out.append({"role": role, "content": mark("".join(p["text"] for p in parts).strip())})
            continue
        for part in parts:
            if part["type"] == "text":
                part["text"] = mark(part["text"])
        out.append({"role": role, "content": parts})
    if len(urls) > options.max_images:
        raise RequestError(f"the messages contain {len(urls)} images; this server accepts at most "
                           f"{options.max_images} per request (--max-images-per-request)", "messages")
    return out, texts, urls


_literal_lock = threading.Lock()
_literal_encoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def literal_encoder(tokenizer):
    """A private copy of `tokenizer`'s backend that encodes special-token strings as plain text.

    encode_special_tokens is a setting of the tokenizer object: switching it on the shared tokenizer would change
    what every other request encoding at the same moment gets (a completion's <|image|> would stop being a token).
    The copy is made once per tokenizer and never changed after, so concurrent requests share nothing mutable."""
    with _literal_lock:
        encoder = _literal_encoders.get(tokenizer)
        if encoder is None:
            from tokenizers import Tokenizer

            encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            encoder.encode_special_tokens = True
            _literal_encoders[tokenizer] = encoder
    return encoder


def special_texts(tokenizer) -> list[str]:
    """The special tokens' texts, longest first."""
    return sorted((t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special),
                  key=lambda t: -len(t))


def encode_marked(tokenizer, rendered: str, texts: list[str]) -> list[int]:
    """Token ids of a rendered prompt whose user texts are markers: special tokens count only in template text."""
    specials = sorted((t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special),
                      key=lambda t: -len(t.content))
    pattern = re.compile("|".join(re.escape(t.content) for t in specials)) if specials else None
    stretches: list[str | int] = []  # text to encode, or a special token id
    current = ""
    pos = 0
    for marker in list(_MARKED.finditer(rendered)) + [None]:
        template_text = rendered[pos:marker.start() if marker else len(rendered)]
        last = 0
        for hit in (pattern.finditer(template_text) if pattern else ()):
            current += template_text[last:hit.start()]
            if current:
                stretches.append(current)
            current = ""
            stretches.append(tokenizer.convert_tokens_to_ids(hit.group(0)))
            last = hit.end()
        current += template_text[last:]
        if marker is None:
            break
        current += texts[int(marker.group(1))]
        pos = marker.end()
    if current:
        stretches.append(current)
    encoder = literal_encoder(tokenizer)
    ids: list[int] = []
    for piece in stretches:
        if isinstance(piece, int):
            ids.append(piece)
        else:
            ids.extend(encoder.encode(piece, add_special_tokens=False).ids)
    return ids


def render_chat(processor, messages: list[dict], tools: list[dict] | None = None) -> str:
    from ..processing.chat_template import TemplateError, render_chat_template, resolve_template

    template = resolve_template(processor.chat_template, None)
    try:
        return render_chat_template(template, messages, add_generation_prompt=True, tools=tools,
                                    **processor.tokenizer.special_tokens_map)
    except (TemplateError, ValueError) as e:
        raise RequestError(str(e).removeprefix("the chat template failed to render: "), "messages") from None


class ImagePart(NamedTuple):
    """One image of a request as the model takes it: pixels [1, 1, T, 3, H, W] in the pixel dtype (None when the
    server holds them already: an image_memory ref), its aspect ratio id and tile count, and `digest`, the sha256 of
    its data URL's payload text (what the server's image memory keys it by; None for a remote image)."""
    pixels: torch.Tensor | None
    aspect_ratio_id: int
    num_tiles: int
    digest: bytes | None = None


class ImageRef(NamedTuple):
    """An image the server holds decoded already, standing in for its data URL's payload (server.image_memory)."""
    aspect_ratio_id: int
    num_tiles: int
    digest: bytes


class RefsMisplaced(Exception):
    """A ref the server put in a body was not met as an image URL (the span it replaced was something else, such
    as text that looked like a data URL): the server decodes the original body instead."""


def payload_digest(url: str) -> bytes | None:
    """The sha256 of a data URL's payload text, None for any other URL."""
    if not url[:5].lower() == "data:":
        return None
    return hashlib.sha256(url.partition(",")[2].encode("utf-8", "surrogatepass")).digest()


def decode_part(processor, data: bytes, what: str, param: str, options: ImageOptions, pixel_dtype: str | None,
                digest: bytes | None = None) -> ImagePart:
    """One image file -> its tiles and aspect ratio as the image processor makes them."""
    out = dict(processor.image_processor([[decode_served_image(data, what, param, options)]],
                                         return_tensors="pt").data)
    pixels = torch.as_tensor(out["pixel_values"])
    if pixel_dtype:  # the same rounding the engine's .to(dtype) would do, here: half the bytes cross the pipes
        pixels = pixels.to(getattr(torch, pixel_dtype))
    return ImagePart(pixels, int(torch.as_tensor(out["aspect_ratio_ids"])[0, 0]), out["num_tiles"][0][0], digest)


class DecodedImages:
    """Images decoded recently (ImagePart with pixels), by the digest of their data URL's payload.

    Chat clients re-send a conversation's images with every turn, and decoding one again (base64, PNG, tiling:
    about 75 ms for a 1120x1120 PNG) was most of a later turn's time to first token once the engine had its K/V
    cached. Entries are dropped least recently used beyond `max_bytes` (their pixels' bytes); an error is never
    stored, and the same payload always decodes to the same tiles, so a hit gives what decoding would.
    Thread-safe; `hits` and `misses` count images (/metrics)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict[bytes, ImagePart] = collections.OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, digest: bytes) -> ImagePart | None:
        with self.lock:
            part = self.entries.get(digest)
            if part is None:
                self.misses += 1
            else:
                self.entries.move_to_end(digest)
                self.hits += 1
            return part

    def put(self, part: ImagePart) -> None:
        size = part.pixels.nbytes
        with self.lock:
            if part.digest is None or size > self.max_bytes or part.digest in self.entries:
                return
            self.entries[part.digest] = part
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self.entries.popitem(last=False)[1].pixels.nbytes


def image_parts(processor, urls: list[tuple[Any, str]], options: ImageOptions, fetched: dict[str, bytes] | None,
                pixel_dtype: str | None, memo: DecodedImages | None = None,
                refs: dict[str, ImageRef] | None = None) -> list[ImagePart]:
    """Each (url, param) -> its ImagePart: a ref's (no pixels), the memory's, or decoded now (and kept)."""
    parts, used = [], set()
    for url, param in urls:
        payload = url.partition(",")[2] if refs and isinstance(url, str) and url[:5].lower() == "data:" else None
        if payload is not None and payload in refs:
            check_data_url_header(url, param)  # (what decoding its payload checked before, the server did)
            ref = refs[payload]
            parts.append(ImagePart(None, ref.aspect_ratio_id, ref.num_tiles, ref.digest))
            used.add(payload)
            continue
        digest = payload_digest(url) if isinstance(url, str) else None
        part = memo.get(digest) if memo is not None and digest is not None else None
        if part is None:
            data, what = image_url_bytes(url, param, options, fetched)
            part = decode_part(processor, data, what, param, options, pixel_dtype, digest)
            if memo is not None:
                memo.put(part)
        parts.append(part)
    if refs and used != set(refs):
        raise RefsMisplaced(f"{len(set(refs) - used)} of {len(refs)} refs were not image URLs")
    return parts


def image_inputs(processor, ids: list[int], parts: list[ImagePart]) -> dict[str, torch.Tensor]:
    """pixel_values (left out if a part has none: a ref's), aspect ratios and the cross-attention mask for one
    prompt and its images. Each image is tiled on its own (the processor tiles a sample's images one by one) and
    joined along the image axis."""
    if not parts:
        return {}
    tiles = processor.image_processor.max_image_tiles
    counts = [p.num_tiles for p in parts]
    inputs = {"aspect_ratio_ids": torch.tensor([[p.aspect_ratio_id for p in parts]]),
              "aspect_ratio_mask": (torch.arange(tiles) < torch.tensor(counts)[:, None]).long()[None],
              "cross_attention_mask": cross_attention_mask([ids], [counts], processor.image_token_id,
                                                           max_num_tiles=tiles)}
    if all(p.pixels is not None for p in parts):
        inputs["pixel_values"] = torch.cat([p.pixels for p in parts], dim=1)  # a copy: the memory's stay its own
    return inputs


def check_image_count(processor, ids: list[int], count: int) -> None:
    found = ids.count(processor.image_token_id)
    if found != count:
        raise RequestError(f"the prompt has {found} {processor.image_token} tokens for {count} images; "
                           f"each image needs exactly one", "messages")


_longest_tokens: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def longest_token(tokenizer) -> int:
    """The most characters of text one token can stand for (128 in Llama 3's byte-level vocabulary)."""
    with _literal_lock:
        longest = _longest_tokens.get(tokenizer)
        if longest is None:
            from tokenizers.pre_tokenizers import ByteLevel

            vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
            alphabet = set(ByteLevel.alphabet())
            byte_level = all(set(piece) <= alphabet for piece in vocab)  # one vocabulary character = one byte
            longest = max(len(p) if byte_level else len(p.encode("utf-8")) for p in vocab)
            _longest_tokens[tokenizer] = longest
    return longest


def check_text_length(tokenizer, texts: list[str], max_model_len: int | None, param: str) -> None:
    """Refuses text that cannot fit the context before it is rendered or tokenized: n characters are at least
    n / longest_token(tokenizer) tokens. A 40 MB prompt used to be tokenized whole (tens of seconds, gigabytes of a
    worker) before its 400; this costs one pass over the lengths."""
    if max_model_len is None:
        return
    chars = sum(len(t) for t in texts)
    least = -(-chars // longest_token(tokenizer))
    if least >= max_model_len:
        raise RequestError(f"{param}: the text is {chars} characters long, so at least {least} tokens (one token "
                           f"covers at most {longest_token(tokenizer)} characters), more than the context of "
                           f"{max_model_len} tokens (--max-model-len)", param, code="context_length_exceeded")


def chat_inputs(processor, messages: Any, options: ImageOptions, max_model_len: int | None = None,
                fetched: dict[str, bytes] | None = None, pixel_dtype: str | None = None,
                memo: DecodedImages | None = None, refs: dict[str, ImageRef] | None = None,
                tools: list[dict] | None = None) -> tuple[list[int], list[ImagePart]]:
    """-> the prompt's ids and its images' parts (image_inputs joins them)."""
    ids, urls = chat_ids(processor, messages, options, max_model_len, tools)
    require_fetched(urls, options, fetched)
    check_image_count(processor, ids, len(urls))
    return ids, image_parts(processor, urls, options, fetched, pixel_dtype, memo, refs)


def chat_ids(processor, messages: Any, options: ImageOptions, max_model_len: int | None = None,
             tools: list[dict] | None = None) -> tuple[list[int], list[tuple[Any, str]]]:
    """Chat messages -> the prompt's ids (the instruct template's, user text kept as text) and the image URLs,
    not loaded. `tools`: the function definitions the template renders (server.tools)."""
    from .tools import template_messages

    if isinstance(messages, list):
        messages = template_messages(messages, special_texts(processor.tokenizer))
    marked, texts, urls = parse_messages(messages, options)
    if tools and urls:
        raise RequestError("tools cannot be used together with images: Meta documents that this model's tool "
                           "calls do not work with images (send the image without tools, or tools without it)",
                           "tools")
    check_text_length(processor.tokenizer, texts, max_model_len, "messages")
    rendered = render_chat(processor, marked, tools)
    ids = encode_marked(processor.tokenizer, rendered, texts)
    if processor.bos_token and not rendered.startswith(processor.bos_token):
        bos = processor.tokenizer.convert_tokens_to_ids(processor.bos_token)
        ids = [bos] + ids  # a template without BOS: the processor would add one
    return ids, urls


def prompt_ids(processor, prompt: str, add_special_tokens: bool = True) -> list[int]:
    """A raw prompt's ids: with special tokens, the same as processor(text=prompt) (BOS placed by add_bos, plus
    the tokenizer's own; the published checkpoints were evaluated that way); without, the text's alone."""
    text = add_bos(prompt, processor.bos_token, processor.image_token) if add_special_tokens else prompt
    ids = processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def token_prompt(tokenizer, prompt: Any) -> list[int] | None:
    """A prompt given as token ids (a non-empty list of integers), checked against the vocabulary; None if the
    prompt is not one."""
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
        return None
    bad = next((t for t in prompt if not 0 <= t < len(tokenizer)), None)
    if bad is not None:
        raise RequestError(f"prompt holds token id {bad}, outside the vocabulary (0..{len(tokenizer) - 1})",
                           "prompt")
    return list(prompt)


MAX_PROMPTS = 128  # prompts in one /v1/completions request


def prompt_list(processor, prompt: Any, max_model_len: int | None = None) -> list[list[int]] | None:
    """A list of two or more prompts (strings or lists of token ids) -> their ids; None for a single prompt."""
    if not isinstance(prompt, list) or len(prompt) < 2 or token_prompt(processor.tokenizer, prompt) is not None:
        return None
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    out = []
    for i, one in enumerate(prompt):
        ids = token_prompt(processor.tokenizer, one) if isinstance(one, list) else None
        if ids is None:
            if not isinstance(one, str) or not one:
                raise RequestError(f"prompt[{i}] must be a non-empty string or a list of token ids", f"prompt[{i}]")
            check_text_length(processor.tokenizer, [one], max_model_len, f"prompt[{i}]")
            ids = prompt_ids(processor, one)
        out.append(ids)
    return out


def completion_inputs(processor, prompt: Any, images: Any, options: ImageOptions, max_model_len: int | None = None,
                      fetched: dict[str, bytes] | None = None, pixel_dtype: str | None = None,
                      memo: DecodedImages | None = None, refs: dict[str, ImageRef] | None = None
                      ) -> tuple[list[int], list[ImagePart]]:
    """/v1/completions: a raw prompt whose <|image|> tokens ARE image slots, one per entry of `images`; or a
    prompt of token ids (taken as they are: no BOS is added), whose image token ids are the slots."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    token_ids = token_prompt(processor.tokenizer, prompt)
    if token_ids is None and (not isinstance(prompt, str) or not prompt):
        raise RequestError("prompt must be a non-empty string or a list of token ids (one prompt per request)",
                           "prompt")
    if token_ids is None:
        check_text_length(processor.tokenizer, [prompt], max_model_len, "prompt")
    if images is None:
        images = []
    if not isinstance(images, list):
        raise RequestError("images must be an array of 'data:image/...;base64,...' URLs", "images")
    if len(images) > options.max_images:
        raise RequestError(f"images has {len(images)} entries; this server accepts at most {options.max_images} "
                           f"per request (--max-images-per-request)", "images")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    count = prompt.count(processor.image_token) if token_ids is None else token_ids.count(image_id)
    if count != len(images):
        raise RequestError(f"the prompt has {count} {processor.image_token} tokens but {len(images)} images were "
                           f"sent in 'images'; send one image per {processor.image_token}", "images")
    require_fetched([(url, f"images[{i}]") for i, url in enumerate(images)], options, fetched)
    ids = prompt_ids(processor, prompt) if token_ids is None else token_ids
    urls = [(url, f"images[{i}]") for i, url in enumerate(images)]
    check_image_count(processor, ids, len(urls))
    return ids, image_parts(processor, urls, options, fetched, pixel_dtype, memo, refs)
