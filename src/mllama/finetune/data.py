"""Fine-tuning data: JSONL with one chat conversation per line in OpenAI's message format, turned into batches
of model inputs whose labels are the assistant's answers only.

A line is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..." | [parts]}, ...]}`; parts
are `{"type": "text", "text": ...}` and `{"type": "image_url", "image_url": {"url": ...}}` (or `"image_url":
"..."`), the URL a `data:image/...;base64,` URL, a file path (relative to the JSONL file's folder) or, with
`allow_urls`, an http(s) URL. Every line is checked when it is read; a bad one (not JSON, no assistant answer,
an image that cannot be read, too many tokens) becomes a BadExample naming its line and what is wrong, for the
caller to skip or stop on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..processing.image_io import load_image
from ..training import answer_mask_of, labels_of

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    line: int  # 1-based, in the JSONL file
    messages: list[dict]  # the processor's form: images loaded ({"type": "image", "image": PIL.Image})
    tokens: int  # its length once templated


class BadExample(ValueError):
    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


def read_examples(path: str | Path, processor, *, max_length: int, allow_urls: bool = False
                  ) -> tuple[list[Example], list[BadExample]]:
    """Every line of a JSONL file, checked: (the good examples, the bad ones), both in file order. Empty lines
    are skipped."""
    path = Path(path)
    good, bad = [], []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                messages = _messages(text, path.parent, allow_urls)
                ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
                tokens = len(ids[0] if ids and isinstance(ids[0], list) else ids)
            except BadExample as e:
                bad.append(BadExample(number, e.reason))
                continue
            except ValueError as e:  # the processor's or the template's own message
                bad.append(BadExample(number, str(e)))
                continue
            if tokens > max_length:
                bad.append(BadExample(number, f"{tokens} tokens, more than the maximum length of {max_length}"))
                continue
            good.append(Example(number, messages, tokens))
    return good, bad


def _messages(text: str, folder: Path, allow_urls: bool) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadExample(0, f"not JSON ({e.msg} at column {e.colno})") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadExample(0, 'expected an object with "messages": a non-empty list of chat messages')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadExample(0, f"messages[{i}] must be an object with a role in {', '.join(ROLES)}")
        out.append({"role": message["role"], "content": _content(message.get("content"), f"messages[{i}]", folder,
                                                                  allow_urls)})
    if not any(m["role"] == "assistant" and any(p["type"] == "text" and p["text"].strip() for p in m["content"])
               for m in out):
        raise BadExample(0, "no assistant answer to learn from")
    return out


def _content(content: Any, where: str, folder: Path, allow_urls: bool) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadExample(0, f"{where}.content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append({"type": "image", "image": _image(url, f"{where}.content[{j}]", folder, allow_urls)})
        else:
            raise BadExample(0, f"{where}.content[{j}] must be a text part or an image_url part")
    return parts


def _image(url: Any, where: str, folder: Path, allow_urls: bool):
    if not isinstance(url, str) or not url.strip():
        raise BadExample(0, f"{where}: the image URL must be a non-empty string")
    remote = url.strip()[:8].lower().startswith(("http://", "https://"))
    if remote and not allow_urls:
        raise BadExample(0, f"{where}: an http(s) image URL; allow them with allow_urls (--allow-image-urls), or "
                            f"give a file path or a data: URL")
    source = url if remote or url.strip()[:5].lower() == "data:" else str(folder / url)
    try:
        image = load_image(source, position=where)
        image.load()
    except (ValueError, OSError) as e:
        raise BadExample(0, str(e)) from None
    return image


def collate(examples: list[Example], processor) -> dict[str, torch.Tensor]:
    """A batch: the examples templated and padded together (any number of images and tiles each; the
    processor pads them), with `labels` on the assistant's answers only (labels_of)."""
    batch = processor.apply_chat_template([e.messages for e in examples], tokenize=True, return_dict=True,
                                          return_tensors="pt", padding=True)
    batch = dict(batch)
    ids = batch["input_ids"]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    batch["labels"] = labels_of(ids, image_token, batch.get("attention_mask"),
                                answer_mask_of(ids, processor.tokenizer))
    return batch
