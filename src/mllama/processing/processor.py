"""MllamaProcessor: prompts and images in, the model's inputs out (ids, masks, pixels, aspect ratios).

Mllama puts exactly one `<|image|>` token per image in the text (no placeholder expansion: images enter through
cross-attention), so the processor's work is to check that tokens and images agree, to place BOS the way the
published checkpoints expect, and to build the cross-attention mask (rules in cross_attention_mask.py).
"""
# No `from __future__ import annotations`: __call__'s `**kwargs: Unpack[...]` must be a real object, the way
# transformers (and its tests) recognise a processor with per-modality keyword arguments.
import json
import os
from pathlib import Path
from typing import Any, Sequence, TypedDict

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

from .chat_template import (
    CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON, assistant_token_mask, load_chat_template,
    normalize_messages, render_chat_template, resolve_template, save_chat_template, warn_without_generation_tag,
)
from .cross_attention_mask import cross_attention_mask
from .feature import BatchFeature
from .tokenizer import TOKENIZER_FILES, MllamaTokenizer

IMAGE_TOKEN = "<|image|>"
PYTHON_TOKEN = "<|python_tag|>"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
PROCESSOR_FILES = TOKENIZER_FILES + (PREPROCESSOR_CONFIG, PROCESSOR_CONFIG)



class MllamaTextKwargs(TypedDict, total=False):
    """Tokenizer options of MllamaProcessor.__call__ (flat, or in `text_kwargs`)."""
    add_special_tokens: bool
    padding: bool | str
    truncation: bool | str | None
    max_length: int | None
    padding_side: str | None
    return_attention_mask: bool | None
    pad_to_multiple_of: int | None
    return_offsets_mapping: bool


class MllamaImagesKwargs(TypedDict, total=False):
    """Image processor options of MllamaProcessor.__call__ (flat, or in `images_kwargs`); `device` only for the
    torch backend."""
    do_convert_rgb: bool | None
    do_resize: bool | None
    size: dict | int | None
    resample: int | None
    do_rescale: bool | None
    rescale_factor: float | None
    do_normalize: bool | None
    image_mean: float | Sequence[float] | None
    image_std: float | Sequence[float] | None
    do_pad: bool | None
    max_image_tiles: int | None
    input_data_format: str | None
    device: Any


class MllamaCommonKwargs(TypedDict, total=False):
    return_tensors: str | None


class MllamaProcessorKwargs(MllamaTextKwargs, MllamaImagesKwargs, MllamaCommonKwargs, total=False):
    """Every keyword of MllamaProcessor.__call__: options flat, or grouped by what they configure. A flat option
    wins over the tokenizer's own init options; the same option both flat and in its group is an error."""
    text_kwargs: MllamaTextKwargs
    images_kwargs: MllamaImagesKwargs
    common_kwargs: MllamaCommonKwargs


_TEXT_KEYS = tuple(MllamaTextKwargs.__annotations__)
_IMAGE_KEYS = tuple(MllamaImagesKwargs.__annotations__)
# Where each group's options may come from: `return_tensors` is read from text_kwargs too, as in transformers.
_GROUP_KEYS = {"text_kwargs": _TEXT_KEYS + ("return_tensors",), "images_kwargs": _IMAGE_KEYS,
               "common_kwargs": ("return_tensors",)}
# Image-part keys that carry the image itself, in the order transformers reads them.
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
# Image processor types of published checkpoints and of transformers' two backends.
_TORCH_TYPES = ("MllamaImageProcessor", "MllamaImageProcessorFast")
_PIL_TYPES = ("MllamaImageProcessorPil",)


def add_bos(prompt: str, bos_token: str | None, image_token: str = IMAGE_TOKEN) -> str:
    """Place BOS the way transformers' MllamaProcessor does: a prompt that already contains BOS is left alone;
    otherwise BOS goes right after the leading image tokens ("<|image|>Hi" -> "<|image|><|begin_of_text|>Hi",
    "Hi" -> "<|begin_of_text|>Hi"). The tokenizer may add its own BOS in front as well (the published tokenizer
    does), which is what the published checkpoints were evaluated with."""
    if not bos_token or bos_token in prompt:
        return prompt
    rest = prompt
    leading = 0
    while rest.startswith(image_token):
        rest = rest[len(image_token):]
        leading += 1
    return image_token * leading + bos_token + rest


class MllamaProcessor:
    """Image processor + tokenizer for Llama 3.2-Vision.

    `processor(images=..., text=...)` returns a BatchFeature with input_ids, attention_mask, cross_attention_mask
    (when there are text and images), pixel_values, aspect_ratio_ids and aspect_ratio_mask."""

    def __init__(self, image_processor: Any, tokenizer: MllamaTokenizer, chat_template: str | dict | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; a Llama 3.2-Vision tokenizer has it at "
                             f"id 128256 (convert Meta's tokenizer.model with mllama.processing.convert_tiktoken)")
        self.python_token = PYTHON_TOKEN
        self.python_token_id = tokenizer.convert_tokens_to_ids(PYTHON_TOKEN)
        self.bos_token = tokenizer.bos_token
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, backend: str | None = None,
                        **kwargs: Any) -> "MllamaProcessor":
        """Load tokenizer files, preprocessor_config.json and the chat template from a folder or Hub repo id.

        The image backend follows `image_processor_type` ("MllamaImageProcessor"/"...Fast": torch,
        "MllamaImageProcessorPil": PIL); `backend="torch"` or `"pil"` overrides it. Image options (size=...,
        max_image_tiles=...) go to the image processor, other keywords (padding_side=..., cls_token=...) to the
        tokenizer. `image_processor=` or `tokenizer=` give a ready component to use instead of loading it."""
        from ..weights import resolve_folder
        from .image import _OPTIONS as IMAGE_OPTIONS

        hub_kwargs = {k: kwargs.pop(k) for k in ("token", "revision", "cache_dir", "local_files_only") if k in kwargs}
        folder = resolve_folder(name_or_path, allow_patterns=PROCESSOR_FILES, **hub_kwargs)
        chat_template = kwargs.pop("chat_template", None)
        image_processor, tokenizer = kwargs.pop("image_processor", None), kwargs.pop("tokenizer", None)
        image_kwargs = {k: kwargs.pop(k) for k in IMAGE_OPTIONS if k in kwargs}
        for component, options in ((image_processor, image_kwargs), (tokenizer, kwargs)):
            if component is not None and options:
                raise ValueError(f"options {sorted(options)} would configure a component that was passed ready-made "
                                 f"({type(component).__name__}); set them on that object instead")
        if tokenizer is None:
            tokenizer = MllamaTokenizer.from_pretrained(folder, **kwargs)
        if image_processor is None:
            image_processor = load_image_processor(folder, backend=backend, **image_kwargs)
        if chat_template is None:
            chat_template = load_chat_template(folder)
        return cls(image_processor, tokenizer, chat_template=chat_template)

    def save_pretrained(self, save_directory: str | os.PathLike, save_jinja_files: bool = True) -> list[str]:
        """Write the tokenizer files, preprocessor_config.json and the chat template (chat_template.jinja, or
        chat_template.json with save_jinja_files=False)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        written = list(self.image_processor.save_pretrained(out))
        tokenizer = self.tokenizer
        # The processor's template is the one that counts; do not let the tokenizer write a second, different one.
        own_template, tokenizer.chat_template = tokenizer.chat_template, None
        try:
            written += tokenizer.save_pretrained(out)
        finally:
            tokenizer.chat_template = own_template
        for stale in [out / CHAT_TEMPLATE_JINJA, out / CHAT_TEMPLATE_JSON, *(out / CHAT_TEMPLATE_DIR).glob("*.jinja")]:
            if stale.is_file():
                stale.unlink()
        if self.chat_template is not None:
            written += [str(p) for p in save_chat_template(out, self.chat_template, jinja=save_jinja_files)]
        # transformers 5 writes processor_config.json (and no preprocessor_config.json); we write both, so that
        # readers of either layout find the image settings.
        self.to_json_file(out / PROCESSOR_CONFIG)
        written.append(str(out / PROCESSOR_CONFIG))
        return written

    @classmethod
    def get_attributes(cls) -> list[str]:
        """The sub-processors this processor is made of, as transformers' ProcessorMixin lists them."""
        return ["image_processor", "tokenizer"]

    def to_dict(self) -> dict[str, Any]:
        """What transformers writes to processor_config.json: the image processor's settings (the tokenizer and
        the chat template have their own files) and the processor class."""
        return {"image_processor": self.image_processor.to_dict(), "processor_class": type(self).__name__}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    @property
    def model_input_names(self) -> list[str]:
        image_names = [n for n in self.image_processor.model_input_names if n != "num_tiles"]
        return list(self.tokenizer.model_input_names) + image_names + ["cross_attention_mask"]

    # ------------------------------------------------------------------------------------------------------------
    # Processing

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None,
                 **kwargs: Unpack[MllamaProcessorKwargs]) -> BatchFeature:
        """Process prompts and images.

        text: a prompt or a list of prompts, each with one `<|image|>` per image of that sample.
        images: one image (for one prompt), a list of images (the images of ONE prompt), or a list of lists
        (one list per prompt, possibly empty). Keywords (MllamaProcessorKwargs): tokenizer options (padding=...,
        max_length=...), image options (size=..., max_image_tiles=...) and return_tensors, flat or grouped in
        `text_kwargs`, `images_kwargs` and `common_kwargs`."""
        if images is None and text is None:
            raise ValueError("MllamaProcessor needs text=..., images=... or both")
        tok_kwargs, image_kwargs, return_tensors = self._merge_kwargs(dict(kwargs))

        prompts = self._prompts(text)
        samples = self._nest_images(images) if images is not None else None
        if prompts is not None:
            self._check_image_counts(prompts, samples)
            prompts = [add_bos(p, self.bos_token, self.image_token) for p in prompts]

        data: dict[str, Any] = {}
        if prompts is not None:
            text_inputs = self.tokenizer(prompts, **tok_kwargs)
            ids = text_inputs["input_ids"]
            self._check_truncation(prompts, ids)
            data.update(text_inputs.data)
        if samples is not None:
            image_inputs = self.image_processor(samples, **image_kwargs)
            num_tiles = image_inputs.data.pop("num_tiles")
            if prompts is not None:
                pixel_values = image_inputs["pixel_values"]
                mask = cross_attention_mask(ids, num_tiles, self.image_token_id, max_num_tiles=pixel_values.shape[2])
                # Like transformers: a numpy array unless tensors of another kind are asked for.
                data["cross_attention_mask"] = mask if return_tensors == "pt" else mask.numpy()
            data.update(image_inputs.data)
        return BatchFeature(data, tensor_type=return_tensors)

    def _merge_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """(tokenizer options, image options, return_tensors) from __call__'s keywords, as transformers merges
        them; lowest to highest priority: the tokenizer's init options (e.g. padding="max_length" given to its
        from_pretrained), common_kwargs, text_kwargs / images_kwargs, flat keywords."""
        groups = {name: dict(kwargs.pop(name, None) or {}) for name in _GROUP_KEYS}
        flat_keys = _GROUP_KEYS["text_kwargs"] + _IMAGE_KEYS
        for name, given, valid in [("keyword arguments", kwargs, flat_keys),
                                   *((name, groups[name], keys) for name, keys in _GROUP_KEYS.items())]:
            unknown = sorted(set(given) - set(valid))
            if unknown:
                raise TypeError(f"MllamaProcessor got unknown {name} {unknown}; valid ones are {list(valid)}")
        for name in ("text_kwargs", "images_kwargs"):
            twice = sorted(set(groups[name]) & set(kwargs))
            if twice:
                raise ValueError(f"{twice} passed twice, in {name} and as keyword arguments; pass each once")
        init = getattr(self.tokenizer, "init_kwargs", None) or {}
        text = {key: getattr(self.tokenizer, key, init[key]) for key in _TEXT_KEYS if key in init}
        text.update(groups["common_kwargs"])
        text.update(groups["text_kwargs"])
        text.update({key: value for key, value in kwargs.items() if key in _GROUP_KEYS["text_kwargs"]})
        images = {**groups["images_kwargs"], **{key: value for key, value in kwargs.items() if key in _IMAGE_KEYS}}
        return text, images, text.pop("return_tensors", None)

    @staticmethod
    def _prompts(text: Any) -> list[str] | None:
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            return list(text)
        raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")

    @staticmethod
    def _nest_images(images: Any) -> list[list[Any]]:
        from .image import nest_images  # the one place that decides how image inputs nest

        return nest_images(images)

    def _check_image_counts(self, prompts: list[str], samples: list[list[Any]] | None) -> None:
        in_text = [p.count(self.image_token) for p in prompts]
        if samples is None:
            if any(in_text):
                raise ValueError(f"the prompts contain {sum(in_text)} {self.image_token} tokens (per prompt: "
                                 f"{in_text}) but no images were passed; pass images=... with one image per token")
            return
        given = [len(s) for s in samples]
        if in_text == given:
            return
        hint = ""
        if len(samples) == 1 and len(prompts) > 1:
            hint = (" A flat list of images is read as the images of ONE prompt; for a batch pass one list per "
                    "prompt, e.g. images=[[img_a], [img_b]].")
        raise ValueError(f"each prompt needs one {self.image_token} token per image of that prompt: found "
                         f"{in_text} {self.image_token} tokens per prompt and {given} images per sample.{hint}")

    def _check_truncation(self, prompts: list[str], ids: list[list[int]]) -> None:
        in_ids = [list(row).count(self.image_token_id) for row in ids]
        in_text = [p.count(self.image_token) for p in prompts]
        if in_ids != in_text:
            raise ValueError(f"truncation removed {self.image_token} tokens: the prompts have {in_text} but the "
                             f"token ids keep {in_ids}. Increase max_length or disable truncation, or move the "
                             f"images earlier in the prompt.")

    # ------------------------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, *args: Any, **kwargs: Any) -> str | list[str]:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True,
                                        clean_up_tokenization_spaces: bool = False, **kwargs: Any) -> list[str]:
        """Texts of generated id sequences, special tokens dropped by default."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens,
                                           clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        processor_kwargs: dict | None = None,
        return_assistant_tokens_mask: bool = False,
        **template_kwargs: Any,
    ) -> str | list[str] | BatchFeature | Any:
        """Render a conversation (or a batch of them) with the chat template.

        tokenize=False: the prompt text (a list for a batch). tokenize=True: images in the messages
        (`{"type": "image", "url"|"path"|"image"|"base64": ...}`) are loaded and the prompt is processed like
        `processor(text=..., images=...)`, without a second BOS when the prompt starts with one; return_dict=True
        gives the whole BatchFeature, otherwise only input_ids. Extra keywords are template variables
        (date_string=..., tools_in_user_message=...), except tokenizer options (padding=..., max_length=...),
        which go to the processor, as do the entries of `processor_kwargs`.

        return_assistant_tokens_mask=True (with tokenize=True, return_dict=True) adds "assistant_masks", one row per
        prompt: 1 on the tokens the template wrote inside `{% generation %}...{% endgeneration %}`."""
        template = resolve_template(self.chat_template, chat_template)
        if return_assistant_tokens_mask:
            warn_without_generation_tag(template)
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and \
            isinstance(conversation[0], (list, tuple))
        conversations = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        call_kwargs = dict(processor_kwargs or {})
        for key in _TEXT_KEYS:
            if key in template_kwargs:
                call_kwargs[key] = template_kwargs.pop(key)

        variables = {**self.tokenizer.special_tokens_map, **template_kwargs}
        spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
        prompts = [render_chat_template(template, c, add_generation_prompt=add_generation_prompt, tools=tools,
                                        documents=documents, **variables,
                                        generation_spans=row_spans if return_assistant_tokens_mask else None)
                   for c, row_spans in zip(conversations, spans)]
        if not tokenize:
            return prompts if batched else prompts[0]

        batch_images = [self._images_in(c, i) for i, c in enumerate(conversations)]
        if self.bos_token is not None and prompts[0].startswith(self.bos_token):
            # The template wrote BOS itself; a tokenizer BOS on top would give BOS BOS.
            call_kwargs.setdefault("add_special_tokens", False)
        has_images = any(batch_images)
        with_mask = return_assistant_tokens_mask and return_dict
        if with_mask:
            call_kwargs["text_kwargs"] = {**call_kwargs.get("text_kwargs", {}), "return_offsets_mapping": True}
        out = self(text=prompts if batched else prompts[0], images=batch_images if has_images else None,
                   return_tensors=return_tensors, **call_kwargs)
        if with_mask:
            # Offsets count in the text the tokenizer saw, spans in the rendered prompt; they differ where BOS was
            # inserted (add_bos), and transformers compares them as they are: so do we, to give its masks.
            offsets = out.data.pop("offset_mapping")
            offsets = offsets.tolist() if hasattr(offsets, "tolist") else offsets
            masks = [assistant_token_mask(row, row_spans) for row, row_spans in zip(offsets, spans)]
            out.data["assistant_masks"] = BatchFeature({"m": masks}, tensor_type=return_tensors)["m"]
        return out if return_dict else out["input_ids"]

    @staticmethod
    def _images_in(conversation: list[dict], index: int) -> list[Any]:
        from .image_io import load_image

        images = []
        for m, message in enumerate(conversation):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for p, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "image"):
                    continue
                key = next((k for k in _IMAGE_SOURCE_KEYS if k in part), None)
                where = f"conversation {index}, message {m}, content part {p}"
                if key is None:
                    raise ValueError(f"{where}: an image part needs one of the keys {list(_IMAGE_SOURCE_KEYS)} "
                                     f"(a PIL image, URL, file path or base64 string) when tokenize=True")
                images.append(load_image(part[key], position=f"image {len(images)} of {where}"))
        return images

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_processor={self.image_processor!r}, tokenizer={self.tokenizer!r})"


def load_image_processor(folder: str | os.PathLike, backend: str | None = None, **options: Any) -> Any:
    """The image processor described by folder/preprocessor_config.json, on the backend its type names
    (or `backend`: "torch" or "pil")."""
    from .image import MllamaImageProcessor, MllamaImageProcessorPil

    path = Path(folder) / PREPROCESSOR_CONFIG
    nested = Path(folder) / PROCESSOR_CONFIG
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    elif nested.is_file() and isinstance(json.loads(nested.read_text(encoding="utf-8")).get("image_processor"), dict):
        # the layout transformers 5 saves: the image settings nested in processor_config.json
        path = nested
        config = json.loads(nested.read_text(encoding="utf-8"))["image_processor"]
    else:
        raise FileNotFoundError(f"{folder} has no {PREPROCESSOR_CONFIG} (nor an image_processor entry in "
                                f"{PROCESSOR_CONFIG}); a processor folder needs the image processor settings as "
                                f"well as the tokenizer files")
    kind = config.get("image_processor_type", "MllamaImageProcessor")
    if backend is None:
        if kind in _TORCH_TYPES:
            backend = "torch"
        elif kind in _PIL_TYPES:
            backend = "pil"
        else:
            raise ValueError(f"{path}: image_processor_type {kind!r} is not a Mllama image processor; expected one "
                             f"of {list(_TORCH_TYPES + _PIL_TYPES)}")
    classes = {"torch": MllamaImageProcessor, "pil": MllamaImageProcessorPil}
    if backend not in classes:
        raise ValueError(f"backend must be 'torch' or 'pil', got {backend!r}")
    return classes[backend].from_dict(config, **options)


class AutoProcessor:
    """`AutoProcessor.from_pretrained(...)` as in transformers; every checkpoint here is Mllama, so it returns an
    MllamaProcessor."""

    def __init__(self):
        raise TypeError("use AutoProcessor.from_pretrained(folder_or_repo_id)")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> MllamaProcessor:
        return MllamaProcessor.from_pretrained(name_or_path, **kwargs)
