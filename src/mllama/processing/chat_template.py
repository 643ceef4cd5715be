"""Chat templates: finding them in a checkpoint folder, saving them, and rendering them the way transformers does.

Rendering uses Jinja's immutable sandbox with trim_blocks and lstrip_blocks, a `tojson` filter that does not
HTML-escape (the published template prints tool definitions with it), and the globals `raise_exception` and
`strftime_now` that Hub templates expect.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import re
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.exceptions
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
# Named templates other than "default", one <name>.jinja each (transformers' layout).
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class TemplateError(jinja2.exceptions.TemplateError, ValueError):
    """Raised by a template's `raise_exception(message)`, e.g. "Prompting with images is incompatible with system
    messages." Both a ValueError and a jinja2 TemplateError, so either kind of `except` catches it."""


# --------------------------------------------------------------------------------------------------------------
# Files


def load_chat_template(folder: str | os.PathLike, tokenizer_config: Mapping | None = None) -> str | dict | None:
    """The chat template stored in a checkpoint folder, or None.

    Looked up in chat_template.jinja, then chat_template.json ({"chat_template": ...}), then the "chat_template"
    key of tokenizer_config.json (a string, or a list of {"name", "template"} giving a dict of named templates).
    Templates in additional_chat_templates/<name>.jinja join it as named ones (the main one named "default")."""
    folder = Path(folder)
    main = _main_chat_template(folder, tokenizer_config)
    named = {p.stem: p.read_text(encoding="utf-8") for p in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))}
    if not named:
        return main
    return {**({"default": main} if isinstance(main, str) else dict(main or {})), **named}


def _main_chat_template(folder: Path, tokenizer_config: Mapping | None) -> str | dict | None:
    if (folder / CHAT_TEMPLATE_JINJA).is_file():
        return (folder / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_JSON).is_file():
        data = json.loads((folder / CHAT_TEMPLATE_JSON).read_text(encoding="utf-8"))
        template = data.get("chat_template") if isinstance(data, dict) else None
        if template is not None:
            return _named_templates(template)
    if tokenizer_config is None and (folder / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if tokenizer_config and tokenizer_config.get("chat_template") is not None:
        return _named_templates(tokenizer_config["chat_template"])
    return None


def _named_templates(value: Any) -> str | dict[str, str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return {item["name"]: item["template"] for item in value}
    raise ValueError(f"a chat template must be a string or a list of {{'name', 'template'}} dicts, got {value!r}")


def save_chat_template(folder: str | os.PathLike, template: str | dict[str, str], jinja: bool = True) -> list[Path]:
    """Write the template; return the files written. jinja=True: chat_template.jinja for a single template or the
    one named "default", additional_chat_templates/<name>.jinja for the other named ones; jinja=False: all in
    chat_template.json."""
    folder = Path(folder)
    if not jinja:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CHAT_TEMPLATE_JSON
        path.write_text(json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        return [path]
    named = dict(template) if isinstance(template, dict) else {"default": template}
    for name in named:
        _check_template_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in named.items():
        path = folder / CHAT_TEMPLATE_JINJA if name == "default" else folder / CHAT_TEMPLATE_DIR / f"{name}.jinja"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _check_template_name(name: Any) -> None:
    # The name becomes a file name: anything that could leave additional_chat_templates/ is refused.
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") \
            or Path(name).name != name:
        raise ValueError(f"chat template name {name!r} cannot be saved as {CHAT_TEMPLATE_DIR}/<name>.jinja: a "
                         f"name must be a plain file name (no path separators, not '.' or '..')")


def resolve_template(own: str | dict[str, str] | None, requested: str | None) -> str:
    """The template text to render: `requested` may be a template string or the name of one of `own`'s templates."""
    if requested is not None:
        if isinstance(own, dict) and requested in own:
            return own[requested]
        return requested
    if own is None:
        raise ValueError("no chat template: this processor/tokenizer was loaded without one; pass "
                         "chat_template=... (e.g. the contents of chat_template.jinja)")
    if isinstance(own, dict):
        if "default" in own:
            return own["default"]
        raise ValueError(f"several chat templates {sorted(own)} and none named 'default'; pass chat_template=NAME")
    return own


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; chat templates need the plain JSON text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    # Templates may store state on a namespace; refuse underscore names so they cannot reach Python internals.
    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r} on a namespace")


# While render_chat_template records generation spans: (the text pieces rendered so far, the spans found).
_GENERATION_RECORD: contextvars.ContextVar = contextvars.ContextVar("mllama_generation_record", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the text the assistant wrote, for assistant-token masks
    (fine-tuning on the answers only). Renders its body unchanged; when spans are being recorded, the body's
    character range in the output is noted, counted over the pieces already emitted, as transformers does."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        record = _GENERATION_RECORD.get()
        if record is not None:
            pieces, spans = record
            start = sum(len(piece) for piece in pieces)
            spans.append((start, start + len(text)))
        return text


def has_generation_tag(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def assistant_token_mask(offsets: Any, spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a generation span, else 0. Tokens without characters (BOS added
    by the tokenizer, padding) are 0; a span cut by truncation keeps the tokens that remain."""
    return [int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in offsets]


def warn_without_generation_tag(template: str) -> None:
    if not has_generation_tag(template):
        warnings.warn("return_assistant_tokens_mask=True, but the chat template has no {% generation %} block: "
                      "every token is masked 0", stacklevel=3)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template text; rendering a chat is then cheap."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def plain_template_data(value: Any) -> Any:
    """A copy of `value` made only of JSON types. Images, arrays and other objects become "<TypeName>" strings:
    templates only test whether an image is there, and the sandbox does not know which methods of such objects
    are harmful (PIL's `save` writes files)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return plain_template_data(value.item())  # numpy / torch scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any) -> list[dict]:
    """Messages as dicts without None-valued keys (OpenAI-style objects send `content=None`, which templates would
    print as "None"), and OpenAI `image_url` parts turned into `{"type": "image", "url": ...}`."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    out = []
    for i, message in enumerate(messages):
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        elif dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image_url" and "image_url" in part:
                    url = part["image_url"]
                    parts.append({"type": "image", "url": url.get("url", "") if isinstance(url, Mapping) else url})
                else:
                    parts.append(part)
            message["content"] = parts
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: Any,
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    generation_spans: list[tuple[int, int]] | None = None,
    **kwargs: Any,
) -> str:
    """Render one conversation. With a list as `generation_spans`, the (start, end) character range of every
    `{% generation %}` block rendered is appended to it.

    The template sees `messages`, `add_generation_prompt`, `tools`, `documents` and every extra keyword (e.g.
    `bos_token`, `eos_token`, `date_string`, `tools_in_user_message`). A variable that is not passed stays
    undefined, so the template's own default applies (the published template then calls strftime_now for
    today's date). Errors raised by the template come out as TemplateError (a ValueError)."""
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise TypeError(f"tools[{i}] must be a JSON-schema dict like {{'type': 'function', 'function': "
                                f"{{'name': ..., 'description': ..., 'parameters': {{...}}}}}}, got {type(tool).__name__}")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
    compiled = compile_chat_template(template)
    variables = dict(messages=plain_template_data(normalize_messages(messages)),
                     add_generation_prompt=add_generation_prompt, tools=plain_template_data(tools),
                     documents=plain_template_data(documents), **plain_template_data(kwargs))
    try:
        if generation_spans is None:
            return compiled.render(**variables)
        pieces: list[str] = []
        token = _GENERATION_RECORD.set((pieces, generation_spans))
        try:
            for piece in compiled.generate(**variables):
                pieces.append(piece)
        finally:
            _GENERATION_RECORD.reset(token)
        return "".join(pieces)
    except TemplateError:
        raise
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the chat template failed to render: {e}") from e
