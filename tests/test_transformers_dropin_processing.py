"""Processor, tokenizer and image processors used the way transformers' own tests use them: serialization
(to_dict / to_json_string / to_json_file / save_pretrained), get_attributes, tokenizer init keywords, assistant-token
masks from `{% generation %}` templates, and explicit None image options. transformers is the oracle: the same
inputs go to both, the outputs must be equal."""
from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MllamaProcessor as TheirProcessor
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil as TheirPil

from conftest_tokenizer import converted_dir, hf_tokenizer, template_text  # noqa: F401
from mllama.processing.image import MllamaImageProcessor, MllamaImageProcessorPil
from mllama.processing.processor import MllamaProcessor
from mllama.processing.tokenizer import MllamaTokenizer

BACKENDS = [MllamaImageProcessorPil, MllamaImageProcessor]
TILE = 56
OPTIONS = dict(size={"height": TILE, "width": TILE}, max_image_tiles=4,
               image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])

# A small template in the published one's format whose assistant turns sit in {% generation %} blocks.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% set ns = namespace(text='') %}{% if m['content'] is string %}{% set ns.text = m['content'] %}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{% set ns.text = ns.text + '<|image|>' %}"
    "{% else %}{% set ns.text = ns.text + c['text'] %}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ ns.text }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ ns.text }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal, a blue-green."}]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _plain(value):
    """Tensors and arrays as nested lists, so that two outputs compare with ==."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    return value


def assert_same_output(ours, theirs):
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs.keys():
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), key
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        else:
            assert a == b, key


@pytest.fixture(scope="module")
def tokenizer():
    return MllamaTokenizer.from_pretrained(converted_dir(True))


# ------------------------------------------------------------------------------------------------------------------
# to_dict / to_json_string / to_json_file, tuples where transformers has tuples


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, OPTIONS, dict(OPTIONS, resample=3, max_image_tiles=2, do_convert_rgb=False)])
def test_image_processor_serialization_matches_transformers(backend, options, tmp_path):
    ours, theirs = backend(**options), TheirPil(**options)
    assert ours.to_dict() == theirs.to_dict()
    assert {k: type(v) for k, v in ours.to_dict().items()} == {k: type(v) for k, v in theirs.to_dict().items()}
    assert isinstance(ours.to_dict()["image_mean"], tuple)  # transformers' tuples, not lists
    assert ours.to_json_string() == theirs.to_json_string()
    ours.to_json_file(tmp_path / "ours.json")
    theirs.to_json_file(tmp_path / "theirs.json")
    assert (tmp_path / "ours.json").read_text() == (tmp_path / "theirs.json").read_text()
    assert backend.from_pretrained(tmp_path / "ours.json").to_dict() == ours.to_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_processor_serialization_and_get_attributes_match_transformers(backend, tokenizer, tmp_path):
    ours = MllamaProcessor(backend(**OPTIONS), tokenizer, chat_template=template_text())
    theirs = TheirProcessor(TheirPil(**OPTIONS), hf_tokenizer(True), chat_template=template_text())
    assert MllamaProcessor.get_attributes() == TheirProcessor.get_attributes()
    assert ours.get_attributes() == theirs.get_attributes()
    assert ours.to_dict() == theirs.to_dict()
    assert ours.to_json_string() == theirs.to_json_string()
    ours.to_json_file(tmp_path / "ours.json")
    theirs.to_json_file(tmp_path / "theirs.json")
    assert (tmp_path / "ours.json").read_text() == (tmp_path / "theirs.json").read_text()


def test_processor_save_pretrained_is_consistent_with_transformers(tokenizer, tmp_path):
    ours = MllamaProcessor(MllamaImageProcessorPil(**OPTIONS), tokenizer, chat_template=template_text())
    theirs = TheirProcessor(TheirPil(**OPTIONS), hf_tokenizer(True), chat_template=template_text())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    # the same processor_config.json, and it is what to_json_string says
    assert (tmp_path / "ours/processor_config.json").read_text() == (tmp_path / "theirs/processor_config.json").read_text()
    assert (tmp_path / "ours/processor_config.json").read_text() == ours.to_json_string()
    # each side loads what the other wrote (transformers 5 writes no preprocessor_config.json)
    assert not (tmp_path / "theirs/preprocessor_config.json").exists()
    assert MllamaProcessor.from_pretrained(tmp_path / "theirs").to_dict() == theirs.to_dict()
    assert TheirProcessor.from_pretrained(tmp_path / "ours").to_dict() == ours.to_dict()
    image = _image(130, 50)
    assert_same_output(MllamaProcessor.from_pretrained(tmp_path / "theirs", backend="pil")(
        images=[image], text="<|image|>Describe it", return_tensors="pt"),
        theirs(images=[image], text="<|image|>Describe it", return_tensors="pt"))


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer keywords that transformers accepts at from_pretrained


@pytest.mark.parametrize("kwargs", [
    dict(max_length=5), dict(padding="max_length", max_length=5, truncation=True), dict(padding="longest"),
    dict(truncation=True, model_max_length=4), dict(padding_side="left", padding=True),
    dict(truncation_side="left", model_max_length=3), dict(some_unknown_option=3),
])
def test_tokenizer_from_pretrained_init_keywords(kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = type(hf_tokenizer(True)).from_pretrained(str(converted_dir(True)), **kwargs)
    ours = MllamaTokenizer.from_pretrained(converted_dir(True), **kwargs)
    for name in ("padding_side", "truncation_side", "model_max_length"):
        assert getattr(ours, name) == getattr(theirs, name), name
    texts = ["hi", "hello world how are you today"]
    for call in (dict(), dict(padding=True), dict(truncation=True, max_length=4), dict(padding="max_length", max_length=9)):
        assert ours(texts, **call)["input_ids"] == theirs(texts, **call)["input_ids"], call
        assert ours(texts[1], **call)["input_ids"] == theirs(texts[1], **call)["input_ids"], call
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved_ours = json.loads((tmp_path / "ours/tokenizer_config.json").read_text())
    saved_theirs = json.loads((tmp_path / "theirs/tokenizer_config.json").read_text())
    for key in kwargs:
        assert saved_ours.get(key) == saved_theirs.get(key), key


# ------------------------------------------------------------------------------------------------------------------
# Assistant-token masks from {% generation %}


@pytest.mark.parametrize("call", [
    dict(), dict(add_generation_prompt=True), dict(return_tensors="pt"), dict(truncation=True, max_length=15),
])
def test_tokenizer_assistant_tokens_mask_matches_transformers(tokenizer, call):
    kwargs = dict(chat_template=GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                  return_assistant_tokens_mask=True, **call)
    ours = tokenizer.apply_chat_template(CHAT, **kwargs)
    theirs = hf_tokenizer(True).apply_chat_template(CHAT, **kwargs)
    assert 1 in torch.as_tensor(_plain(theirs["assistant_masks"]))  # the template marks some tokens
    for key in ("input_ids", "attention_mask", "assistant_masks"):
        assert _plain(ours[key]) == _plain(theirs[key]), key
    assert "offset_mapping" not in ours


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_tokenizer_assistant_tokens_mask_batched_and_padded(tokenizer, padding_side):
    batch = [CHAT, CHAT[:2]]
    kwargs = dict(chat_template=GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                  return_assistant_tokens_mask=True, padding=True, return_tensors="pt")
    hf = hf_tokenizer(True)
    old_side, hf.padding_side = hf.padding_side, padding_side
    try:
        theirs = hf.apply_chat_template(batch, **kwargs)
    finally:
        hf.padding_side = old_side
    ours = MllamaTokenizer.from_pretrained(converted_dir(True), padding_side=padding_side).apply_chat_template(
        batch, **kwargs)
    for key in ("input_ids", "attention_mask", "assistant_masks"):
        assert torch.equal(ours[key], theirs[key]), key


def test_tokenizer_assistant_tokens_mask_needs_return_dict(tokenizer):
    for kwargs in (dict(return_dict=False), dict(tokenize=False, return_dict=True)):
        with pytest.raises(ValueError, match="return_dict"):
            hf_tokenizer(True).apply_chat_template(CHAT, chat_template=GENERATION_TEMPLATE,
                                                   return_assistant_tokens_mask=True, **kwargs)
        with pytest.raises(ValueError, match="return_dict"):
            tokenizer.apply_chat_template(CHAT, chat_template=GENERATION_TEMPLATE, return_assistant_tokens_mask=True,
                                          **kwargs)


@pytest.mark.parametrize("template", [GENERATION_TEMPLATE, GENERATION_TEMPLATE.replace("{{ bos_token }}", ""),
                                      "published"])
@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_processor_assistant_tokens_mask_matches_transformers(tokenizer, template, return_tensors):
    template = template_text() if template == "published" else template
    ours = MllamaProcessor(MllamaImageProcessorPil(**OPTIONS), tokenizer, chat_template=template)
    theirs = TheirProcessor(TheirPil(**OPTIONS), hf_tokenizer(True), chat_template=template)
    image = _image(130, 50)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
                    {"role": "assistant", "content": "A striped box."}]
    batch = [conversation, [{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "And this one?"}]}]]
    for conv, extra in ((conversation, {}), (batch, {"padding": True})):
        kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                      return_tensors=return_tensors, processor_kwargs=extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the published template has no {% generation %}: both warn
            got, want = ours.apply_chat_template(conv, **kwargs), theirs.apply_chat_template(conv, **kwargs)
        assert_same_output(got, want)


# ------------------------------------------------------------------------------------------------------------------
# An explicit None for an image option means what it means in transformers


_NONE_OPTIONS = ["do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std", "do_pad", "max_image_tiles"]


def _outcome(make, run):
    """('error', None) if building or running raises, else ('ok', pixel_values as float64 numpy)."""
    try:
        processor = make()
        values = run(processor)
    except Exception:  # transformers raises ValueError, AttributeError or its strict-dataclass error
        return "error", None
    return "ok", np.asarray(values, dtype=np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", _NONE_OPTIONS)
@pytest.mark.parametrize("where", ["init", "call"])
def test_explicit_none_image_option_matches_transformers(backend, name, where):
    image = _image(2 * TILE, TILE, seed=4)  # fits a 1x2 canvas exactly: no resize, so both backends agree to 1e-6
    options = dict(OPTIONS)
    if where == "init":
        options[name] = None
        ours = _outcome(lambda: backend(**options), lambda p: _plain(p(image, return_tensors="np")["pixel_values"]))
        theirs = _outcome(lambda: TheirPil(**options), lambda p: p(image, return_tensors="np")["pixel_values"])
    else:
        ours = _outcome(lambda: backend(**options),
                        lambda p: _plain(p(image, return_tensors="np", **{name: None})["pixel_values"]))
        theirs = _outcome(lambda: TheirPil(**options),
                          lambda p: p(image, return_tensors="np", **{name: None})["pixel_values"])
    assert ours[0] == theirs[0], (name, where, ours[0], theirs[0])
    if theirs[0] == "ok":
        np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-5)
    if where == "init" and theirs[0] == "ok":
        assert backend(**options).to_dict() == TheirPil(**options).to_dict()


# ------------------------------------------------------------------------------------------------------------------
# Processor keywords by modality: text_kwargs / images_kwargs / common_kwargs, flat, and the tokenizer's defaults


@functools.lru_cache(maxsize=None)
def _tokenizer_pair(tokenizer_kwargs: tuple = ()):
    kwargs = dict(tokenizer_kwargs)
    return (MllamaTokenizer.from_pretrained(converted_dir(True), **kwargs),
            type(hf_tokenizer(True)).from_pretrained(str(converted_dir(True)), **kwargs) if kwargs else hf_tokenizer(True))


def _processor_pair(tokenizer_kwargs: dict | None = None):
    ours, theirs = _tokenizer_pair(tuple(sorted((tokenizer_kwargs or {}).items())))
    return MllamaProcessor(MllamaImageProcessorPil(**OPTIONS), ours), TheirProcessor(TheirPil(**OPTIONS), theirs)


def test_processor_call_has_typed_kwargs():
    import inspect
    import typing

    unpack = getattr(typing, "Unpack", None) or __import__("typing_extensions").Unpack
    kwargs = [p for p in inspect.signature(MllamaProcessor.__call__).parameters.values() if p.kind == p.VAR_KEYWORD]
    assert kwargs[0].annotation.__origin__ is unpack  # what transformers' tests look for


@pytest.mark.parametrize("tokenizer_kwargs, call", [
    ({}, dict(common_kwargs={"return_tensors": "pt"}, images_kwargs={"do_rescale": True, "rescale_factor": -1.0},
              text_kwargs={"padding": "max_length", "max_length": 30})),
    ({}, dict(return_tensors="pt", rescale_factor=-1.0, padding="max_length", max_length=30)),
    ({}, dict(text_kwargs={}, return_tensors="pt", padding=True)),
    ({}, dict(text_kwargs={"return_tensors": "np", "padding": True}, images_kwargs={"do_normalize": False})),
    ({"padding": "max_length", "max_length": 25}, dict(return_tensors="pt")),
    ({"padding": "max_length", "max_length": 25}, dict(return_tensors="pt", max_length=28)),
    ({"padding": "longest"}, dict(return_tensors="pt", padding="max_length", max_length=27)),
])
def test_processor_kwargs_merge_like_transformers(tokenizer_kwargs, call):
    ours, theirs = _processor_pair(tokenizer_kwargs)
    text, images = ["<|image|>lower newer", "<|image|>upper older longer string"], [[_image(70, 40)], [_image(40, 70)]]
    assert_same_output(ours(text=text, images=images, **call), theirs(text=text, images=images, **call))


@pytest.mark.parametrize("call", [
    dict(images_kwargs={"do_rescale": True, "rescale_factor": -1.0}, do_rescale=True),
    dict(padding="max_length", text_kwargs={"padding": "do_not_pad"}),
])
def test_processor_refuses_doubly_passed_kwargs_like_transformers(call):
    ours, theirs = _processor_pair()
    for processor in (ours, theirs):
        with pytest.raises(ValueError):
            processor(text="<|image|>hi", images=[_image(40, 40)], return_tensors="pt", **call)


def test_processor_refuses_unknown_kwargs():
    ours, _ = _processor_pair()
    with pytest.raises(TypeError, match="not_an_option"):
        ours(text="hi", not_an_option=1)
    with pytest.raises(TypeError, match="padding"):  # a tokenizer option in the image group
        ours(text="<|image|>hi", images=[_image(40, 40)], images_kwargs={"padding": True})


# ------------------------------------------------------------------------------------------------------------------
# Image processors: options that are not Mllama's are kept and saved; from_json_file


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_processor_keeps_extra_options_like_transformers(backend, tmp_path):
    with pytest.warns(UserWarning, match="custom_flag"):
        ours = backend(**OPTIONS, custom_flag="x")
    theirs = TheirPil(**OPTIONS, custom_flag="x")
    ours.is_override, theirs.is_override = True, True
    assert ours.custom_flag == "x"
    assert ours.to_dict() == theirs.to_dict()
    ours.to_json_file(tmp_path / "ours.json")
    with pytest.warns(UserWarning):
        again = backend.from_json_file(tmp_path / "ours.json")
    assert again.is_override is True and again.to_dict() == ours.to_dict()
    assert TheirPil.from_json_file(tmp_path / "ours.json").to_dict() == again.to_dict()


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer: transformers' named special tokens (cls, sep, mask: None unless given, added to the vocabulary if new)


def test_tokenizer_extra_special_tokens_like_transformers(tokenizer):
    plain, their_plain = tokenizer, hf_tokenizer(True)
    for name in ("cls_token", "sep_token", "mask_token", "cls_token_id", "sep_token_id", "mask_token_id"):
        assert getattr(plain, name) is None and getattr(their_plain, name) is None, name
    kwargs = dict(cls_token="(CLS)", sep_token="(SEP)", mask_token="<|image|>")
    ours = MllamaTokenizer.from_pretrained(converted_dir(True), **kwargs)
    theirs = type(their_plain).from_pretrained(str(converted_dir(True)), **kwargs)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.cls_token_id, ours.sep_token_id, ours.mask_token_id, len(ours)) == \
        (theirs.cls_token_id, theirs.sep_token_id, theirs.mask_token_id, len(theirs))
    assert ours.encode("a (CLS) b (SEP)") == theirs.encode("a (CLS) b (SEP)")


def test_tokenizer_apply_chat_template_returns_dict_by_default_like_transformers(tokenizer):
    chat = [{"role": "user", "content": "Who are you?"}]
    ours, theirs = tokenizer.apply_chat_template(chat), hf_tokenizer(True).apply_chat_template(chat)
    assert ours["input_ids"] == theirs["input_ids"] and ours["attention_mask"] == theirs["attention_mask"]
    assert tokenizer.apply_chat_template(chat, return_dict=False) == theirs["input_ids"]


# ------------------------------------------------------------------------------------------------------------------
# Processor.from_pretrained: keywords go to the component they configure; ready components are used as given


def test_processor_from_pretrained_routes_kwargs_and_takes_components(tokenizer, tmp_path):
    MllamaProcessor(MllamaImageProcessorPil(**OPTIONS), tokenizer, chat_template=template_text()).save_pretrained(
        tmp_path)
    loaded = MllamaProcessor.from_pretrained(tmp_path, cls_token="(CLS)", sep_token="(SEP)", do_normalize=False)
    assert (loaded.tokenizer.cls_token, loaded.tokenizer.sep_token) == ("(CLS)", "(SEP)")
    assert loaded.image_processor.do_normalize is False
    image_processor = MllamaImageProcessor(**OPTIONS)
    given = MllamaProcessor.from_pretrained(tmp_path, image_processor=image_processor, tokenizer=tokenizer)
    assert given.image_processor is image_processor and given.tokenizer is tokenizer
    with pytest.raises(ValueError, match="do_normalize"):
        MllamaProcessor.from_pretrained(tmp_path, image_processor=image_processor, do_normalize=False)


# ------------------------------------------------------------------------------------------------------------------
# Named chat templates: transformers' file layout, and names that would leave the folder refused


def test_processor_saves_named_chat_templates_like_transformers(tokenizer, tmp_path):
    from mllama.processing.chat_template import load_chat_template

    templates = {"default": "{{ 'a' }}", "secondary": "{{ 'b' }}"}
    ours = MllamaProcessor(MllamaImageProcessorPil(**OPTIONS), tokenizer, chat_template=templates)
    ours.save_pretrained(tmp_path)
    # transformers' layout (its processor writes these two files, and reads them back as the same dict)
    saved = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jinja")}
    assert saved == {"chat_template.jinja", "additional_chat_templates/secondary.jinja"}
    again = MllamaProcessor.from_pretrained(tmp_path)
    assert again.chat_template == templates == again.tokenizer.chat_template
    ours.chat_template = "{{ 'c' }}"  # saving a single template over the folder leaves no named ones behind
    ours.save_pretrained(tmp_path)
    assert load_chat_template(tmp_path) == "{{ 'c' }}"


@pytest.mark.parametrize("name", ["../../PWNED", "sub/name", "..", ""])
def test_chat_template_names_that_leave_the_folder_are_refused(tokenizer, name, tmp_path):
    processor = MllamaProcessor(MllamaImageProcessorPil(**OPTIONS), tokenizer,
                                chat_template={"default": "a", name: "attacker content"})
    with pytest.raises(ValueError, match="plain file name"):
        processor.save_pretrained(tmp_path / "a" / "save")
    assert not list(tmp_path.rglob("*.jinja"))
