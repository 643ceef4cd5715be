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

import base64
import ipaddress
import re
import socket
import urllib.error
import urllib.request
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from ..processing.cross_attention_mask import cross_attention_mask
from ..processing.image_io import decode_image_bytes, decode_plain_base64
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


def load_image_url(url: Any, param: str, options: ImageOptions):
    """A data: URL (png, jpeg, webp, gif) or, with --allow-remote-images, an http(s) URL -> a PIL image."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param} must be a non-empty string: a 'data:image/png;base64,...' URL"
                           + (" or an http(s) URL" if options.allow_remote else ""), param)
    head = url[:16].lower()
    if head.startswith("data:"):
        header, comma, payload = url.partition(",")
        media = header[5:].split(";")[0].strip().lower()
        if not comma or ";base64" not in header.lower() or media not in _MEDIA_TYPES:
            raise RequestError(f"{param} is not a supported data URL: expected 'data:<type>;base64,<data>' with "
                               f"<type> one of {', '.join(t for t in _MEDIA_TYPES if t != 'image/jpg')}", param)
        if len(payload) * 3 // 4 > options.max_bytes:
            raise RequestError(f"{param} is about {len(payload) * 3 // 4} bytes, more than the limit of "
                               f"{options.max_bytes} bytes per image", param, status=413, code="image_too_large")
        data = data_url_payload_bytes(payload, param)
        what = "the data URL"
    elif head.startswith(("http://", "https://")):
        if not options.allow_remote:
            raise RequestError(f"{param}: remote image URLs are disabled on this server (start it with "
                               f"--allow-remote-images); send the image inline as a 'data:image/png;base64,...' "
                               f"URL", param)
        data = fetch_remote(url, param, options)
        what = "the downloaded file"
    else:
        raise RequestError(f"{param} must be a 'data:image/<type>;base64,...' URL"
                           + (" or an http(s) URL" if options.allow_remote else "")
                           + f", got {url[:40]!r}", param)
    try:
        image = decode_image_bytes(data, max_pixels=options.max_pixels, position=param, what=what)
    except ValueError as e:
        message = str(e).split(". Valid images are")[0]
        if "max_pixels" in message:
            raise RequestError(message, param, status=413, code="image_too_large") from None
        raise RequestError(message, param) from None
    return image


def data_url_payload_bytes(payload: str, param: str) -> bytes:
    """The bytes of a data URL's base64 payload; whitespace and stripped padding are tolerated."""
    data = decode_plain_base64(payload)  # the common case, without copying megabytes to strip whitespace
    if data is not None:
        return data
    compact = "".join(payload.split())  # line-wrapped base64 (MIME's 76 columns) is still base64
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except ValueError as e:
        raise RequestError(f"{param}: the data URL's payload is not valid base64 ({e})", param) from None


def _check_host(host: str, param: str, options: ImageOptions) -> None:
    # Resolve once and refuse internal addresses, so the server cannot be used to reach its own network.
    if options.allow_private_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as e:
        raise RequestError(f"{param}: cannot resolve host {host!r} ({e})", param) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if (address.is_private or address.is_loopback or address.is_link_local or address.is_reserved
                or address.is_multicast or address.is_unspecified):
            raise RequestError(f"{param}: host {host!r} resolves to the non-public address {address}; image URLs "
                               f"must point to public hosts (or start the server with --allow-private-image-hosts)",
                               param)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could lead to an internal address that the host check did not see.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def fetch_remote(url: str, param: str, options: ImageOptions) -> bytes:
    parts = urlsplit(url)
    if not parts.hostname:
        raise RequestError(f"{param}: the URL has no host", param)
    _check_host(parts.hostname, param, options)
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "mllama-server"})
    try:
        with opener.open(request, timeout=options.timeout) as response:
            if response.status != 200:
                raise RequestError(f"{param}: downloading the image gave HTTP {response.status} "
                                   f"(redirects are not followed)", param)
            data = response.read(options.max_bytes + 1)
    except RequestError:
        raise
    except urllib.error.HTTPError as e:
        raise RequestError(f"{param}: downloading the image gave HTTP {e.code} (redirects are not followed)",
                           param) from None
    except Exception as e:  # timeouts, refused connections, TLS errors
        raise RequestError(f"{param}: could not download the image ({type(e).__name__}: {e}; timeout "
                           f"{options.timeout}s)", param) from None
    if len(data) > options.max_bytes:
        raise RequestError(f"{param}: the image is more than {options.max_bytes} bytes", param,
                           status=413, code="image_too_large")
    return data


# -----------------------------------------------------------------------------------------------------------------
# Chat messages

_ROLES = ("system", "user", "assistant")


def parse_messages(messages: Any, options: ImageOptions) -> tuple[list[dict], list[str], list[Any]]:
    """OpenAI messages -> (template messages with marked text, the user texts by marker number, image URLs).
    Images stay URLs here; they are decoded later, after the cheap checks."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of {role, content} objects", "messages")
    out, texts, urls = [], [], []

    def mark(text: str) -> str:
        # The markers must not be forgeable from user text.
        texts.append(text.replace(_OPEN, "").replace(_CLOSE, ""))
        return f"{_OPEN}{len(texts) - 1}{_CLOSE}"

    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role must be one of {list(_ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
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


_tokenizer_lock = threading.Lock()


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
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    # encode_special_tokens is a setting of the shared tokenizer object: hold a lock while it is switched.
    with _tokenizer_lock:
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            for piece in stretches:
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    ids.extend(backend.encode(piece, add_special_tokens=False).ids)
        finally:
            backend.encode_special_tokens = before
    return ids


def render_chat(processor, messages: list[dict]) -> str:
    from ..processing.chat_template import TemplateError, render_chat_template, resolve_template

    template = resolve_template(processor.chat_template, None)
    try:
        return render_chat_template(template, messages, add_generation_prompt=True,
                                    **processor.tokenizer.special_tokens_map)
    except (TemplateError, ValueError) as e:
        raise RequestError(str(e).removeprefix("the chat template failed to render: "), "messages") from None


def image_inputs(processor, ids: list[int], images: list) -> dict[str, torch.Tensor]:
    """pixel_values, aspect ratios and the cross-attention mask for one prompt and its images."""
    if not images:
        return {}
    found = ids.count(processor.image_token_id)
    if found != len(images):
        raise RequestError(f"the prompt has {found} {processor.image_token} tokens for {len(images)} images; "
                           f"each image needs exactly one", "messages")
    out = processor.image_processor([images], return_tensors="pt")
    data = dict(out.data)
    num_tiles = data.pop("num_tiles")
    pixels = torch.as_tensor(data["pixel_values"])
    mask = cross_attention_mask([ids], num_tiles, processor.image_token_id, max_num_tiles=pixels.shape[2])
    return {"pixel_values": pixels, "aspect_ratio_ids": torch.as_tensor(data["aspect_ratio_ids"]),
            "aspect_ratio_mask": torch.as_tensor(data["aspect_ratio_mask"]), "cross_attention_mask": mask}


def chat_inputs(processor, messages: Any, options: ImageOptions) -> tuple[list[int], dict[str, torch.Tensor]]:
    marked, texts, urls = parse_messages(messages, options)
    rendered = render_chat(processor, marked)
    ids = encode_marked(processor.tokenizer, rendered, texts)
    if processor.bos_token and not rendered.startswith(processor.bos_token):
        bos = processor.tokenizer.convert_tokens_to_ids(processor.bos_token)
        ids = [bos] + ids  # a template without BOS: the processor would add one
    images = [load_image_url(url, param, options) for url, param in urls]
    return ids, image_inputs(processor, ids, images)


def completion_inputs(processor, prompt: Any, images: Any, options: ImageOptions
                      ) -> tuple[list[int], dict[str, torch.Tensor]]:
    """/v1/completions: a raw prompt whose <|image|> tokens ARE image slots, one per entry of `images`."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string (one prompt per request)", "prompt")
    if images is None:
        images = []
    if not isinstance(images, list):
        raise RequestError("images must be an array of 'data:image/...;base64,...' URLs", "images")
    if len(images) > options.max_images:
        raise RequestError(f"images has {len(images)} entries; this server accepts at most {options.max_images} "
                           f"per request (--max-images-per-request)", "images")
    count = prompt.count(processor.image_token)
    if count != len(images):
        raise RequestError(f"the prompt has {count} {processor.image_token} tokens but {len(images)} images were "
                           f"sent in 'images'; send one image per {processor.image_token}", "images")
    text = add_bos(prompt, processor.bos_token, processor.image_token)
    # The same ids as processor(text=prompt): BOS placed by add_bos, plus the tokenizer's own (the published
    # checkpoints were evaluated that way).
    ids = processor.tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
    loaded = [load_image_url(url, f"images[{i}]", options) for i, url in enumerate(images)]
    return ids, image_inputs(processor, ids, loaded)
