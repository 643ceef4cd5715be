"""Chat templates: rendering identical to transformers on the published instruct template, the vectorized
apply_chat_template, and reading templates from the three places checkpoints keep them."""
from __future__ import annotations

import base64
import functools
import http.server
import json
import threading
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from conftest_tokenizer import hf_tokenizer, template_text, tokenizer, tokenizer_dir  # noqa: F401  (fixtures)
from mllama.processing.chat_template import TemplateError, load_chat_template, render_chat_template
from mllama.processing.image import MllamaImageProcessorPil
from mllama.processing.image_io import load_image
from mllama.processing.processor import MllamaProcessor

TILE = 56
IMAGE_OPTIONS = dict(size={"height": TILE, "width": TILE}, max_image_tiles=4)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city; returns <json> & never HTML-escapes 'quotes'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                       "required": ["city"]},
    },
}]

IMG = {"type": "image"}
CONVERSATIONS = {
    "text_single": [{"role": "user", "content": "Who are you?"}],
    "text_multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]},
    ],
    "system": [
        {"role": "system", "content": "  You are a pirate.  "},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "image_first": [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe this image in two sentences"}]}],
    "image_last": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMG]}],
    "images_across_turns": [
        {"role": "user", "content": [IMG, {"type": "text", "text": "First image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one: "}, IMG, {"type": "text", "text": "?"}]},
    ],
    "two_adjacent_images": [{"role": "user", "content": [IMG, IMG, {"type": "text", "text": "Compare."}]}],
    "empty_system_with_image": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [IMG, {"type": "text", "text": "ok"}]},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22 degrees and <sunny>"},
        {"role": "ipython", "content": {"temp": 22}},
    ],
    "content_none_dropped": [{"role": "user", "content": "hello", "name": None}],
}


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import MllamaProcessor as HFProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil as HFImageProcessor

    return HFProcessor(HFImageProcessor(**IMAGE_OPTIONS), hf_tokenizer(True), chat_template=template_text())


@pytest.fixture(scope="module")
def processor(tokenizer):
    return MllamaProcessor(MllamaImageProcessorPil(**IMAGE_OPTIONS), tokenizer, chat_template=template_text())


# ------------------------------------------------------------------------------------------------------------------
# Text rendering against transformers


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("variables", [
    dict(date_string="23 Sep 2024"),
    dict(),  # the template's own default: strftime_now("%d %b %Y")
    dict(date_string="1 Jan 2025", tools=TOOLS),
    dict(date_string="1 Jan 2025", tools=TOOLS, tools_in_user_message=False),
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(processor, hf_processor, name, variables, add_generation_prompt):
    conversation = CONVERSATIONS[name]
    has_images = name.startswith(("image", "images", "two", "empty"))
    ours = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **variables)
    theirs = hf_processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **variables)
    assert ours == theirs
    assert ours.startswith("<|begin_of_text|>")
    assert ours.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == add_generation_prompt
    if has_images:
        assert "Cutting Knowledge Date" not in ours
    else:
        date = variables.get("date_string") or datetime.now().strftime("%d %b %Y")
        assert f"Today Date: {date}\n\n" in ours


def test_known_renderings(processor):
    text = processor.apply_chat_template(CONVERSATIONS["text_single"], add_generation_prompt=True,
                                         date_string="23 Sep 2024")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                    "2023\nToday Date: 23 Sep 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are "
                    "you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    text = processor.apply_chat_template(CONVERSATIONS["image_first"], add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image in "
                    "two sentences<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # Tool JSON is printed without HTML escaping and with indent=4.
    text = processor.apply_chat_template(CONVERSATIONS["text_single"], tools=TOOLS, date_string="x")
    assert "returns <json> & never HTML-escapes 'quotes'" in text and '\n    "type": "function"' in text
    assert "Environment: ipython\n" in text
    text = processor.apply_chat_template(CONVERSATIONS["tool_calls"], date_string="x")
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"22 degrees and <sunny>"<|eot_id|>' in text


def test_string_and_list_content_render_alike(processor):
    as_string = [{"role": "user", "content": "Same text"}]
    as_list = [{"role": "user", "content": [{"type": "text", "text": "Same text"}]}]
    assert processor.apply_chat_template(as_string, date_string="d") == \
        processor.apply_chat_template(as_list, date_string="d")


def test_batch_rendering(processor, hf_processor):
    batch = [CONVERSATIONS["text_single"], CONVERSATIONS["image_first"]]
    ours = processor.apply_chat_template(batch, add_generation_prompt=True, date_string="2 Feb 2024")
    assert isinstance(ours, list) and len(ours) == 2
    assert ours == hf_processor.apply_chat_template(batch, add_generation_prompt=True, date_string="2 Feb 2024")


def test_images_with_system_message_raise(processor, hf_processor):
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS["image_first"]]
    with pytest.raises(TemplateError, match="Prompting with images is incompatible with system messages"):
        processor.apply_chat_template(conversation)
    with pytest.raises(ValueError, match="incompatible with system messages"):  # TemplateError is a ValueError
        processor.apply_chat_template(conversation)
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="incompatible with system messages"):
        hf_processor.apply_chat_template(conversation)


def test_two_tool_calls_raise(processor):
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]}]
    with pytest.raises(TemplateError, match="only supports single tool-calls"):
        processor.apply_chat_template(conversation)


def test_render_function_directly():
    # bos/eos come from the caller; undefined variables keep the template's defaults.
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}" \
               "{% if date_string is defined %}{{ date_string }}{% endif %}{{ extra }}"
    out = render_chat_template(template, [{"role": "user", "content": "hi"}], bos_token="<s>", extra="!")
    assert out == "<s>[user:hi]!"
    assert render_chat_template(template, [], bos_token="", date_string="D", extra="") == "D"
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)
    with pytest.raises(TemplateError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", [])
    # The sandbox refuses attribute tricks.
    with pytest.raises(Exception):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    # Objects such as PIL images never reach the template; it sees a placeholder.
    out = render_chat_template("{{ messages[0].content[0].image }}", [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (2, 2))}]}])
    assert out == "<Image>"


def test_minimal_template_known_ids(processor):
    # transformers' own test template (BOS once, header, content, eot): known token ids from its test suite.
    minimal = ("{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
               "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
               "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
               "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
               "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
               "{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    chat = [{"role": "system", "content": "This is a test sentence."},
            {"role": "user", "content": "This is a response."}]
    ids = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, chat_template=minimal)
    assert ids == [[128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 882, 128007,
                    271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]]


# ------------------------------------------------------------------------------------------------------------------
# Vectorized apply_chat_template: images from a URL, a path, a PIL image and base64


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    paths = {}
    for name, (w, h) in {"wide.png": (120, 45), "tall.png": (35, 110), "square.jpg": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        paths[name] = folder / name
    return folder, paths


@pytest.fixture(scope="module")
def http_url(image_files):
    folder, _ = image_files
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def _vision_conversations(http_url, paths):
    square = Image.open(paths["square.jpg"])
    square.load()
    b64 = base64.b64encode(paths["tall.png"].read_bytes()).decode()
    first = [{"role": "user", "content": [
        {"type": "image", "url": f"{http_url}/wide.png"},
        {"type": "text", "text": "What does the image show?"}]}]
    second = [
        {"role": "user", "content": [{"type": "image", "path": str(paths["tall.png"])},
                                     {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A tall picture."},
        {"role": "user", "content": [{"type": "text", "text": "Now these:"}, {"type": "image", "image": square},
                                     {"type": "image", "base64": b64}]},
    ]
    return first, second


def test_vectorized_single(processor, hf_processor, http_url, image_files):
    _, paths = image_files
    conversation, _ = _vision_conversations(http_url, paths)
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    image = load_image(f"{http_url}/wide.png")
    expected = processor(text=text, images=[[image]], add_special_tokens=False, return_tensors="pt")
    assert set(out) == set(expected)
    for key in expected:
        assert torch.equal(out[key], expected[key]), key
    # One BOS only: the template wrote it, so the tokenizer must not add another; then the image.
    assert out["input_ids"][0, :2].tolist() == [128000, 128006] and (out["input_ids"] == 128000).sum() == 1
    theirs = hf_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt")
    for key in theirs:
        assert torch.equal(out[key], theirs[key]), key
    moved = out.to("cpu")
    assert moved["input_ids"].device.type == "cpu"
    half = out.to(torch.bfloat16)
    assert half["pixel_values"].dtype == torch.bfloat16 and half["input_ids"].dtype == torch.int64
    ids_only = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_tensors="pt")
    assert torch.equal(ids_only, out["input_ids"])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_vectorized_batch(processor, hf_processor, http_url, image_files, padding_side):
    _, paths = image_files
    batch = list(_vision_conversations(http_url, paths))
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                  processor_kwargs={"padding": True, "padding_side": padding_side})
    out = processor.apply_chat_template(batch, **kwargs)
    texts = processor.apply_chat_template(batch, add_generation_prompt=True)
    square = Image.open(paths["square.jpg"])
    images = [[load_image(f"{http_url}/wide.png")],
              [load_image(str(paths["tall.png"])), square, load_image(base64.b64encode(paths["tall.png"].read_bytes()).decode())]]
    expected = processor(text=texts, images=images, add_special_tokens=False, padding=True,
                         padding_side=padding_side, return_tensors="pt")
    for key in expected:
        assert torch.equal(out[key], expected[key]), key
    assert out["pixel_values"].shape[:3] == (2, 3, 4) and out["cross_attention_mask"].shape[2] == 3
    theirs = hf_processor.apply_chat_template(batch, **kwargs)
    for key in theirs:
        assert torch.equal(out[key], theirs[key]), key
    # Padding options may also be passed as plain keywords.
    again = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", padding=True, padding_side=padding_side)
    assert torch.equal(again["input_ids"], out["input_ids"])


def test_vectorized_text_only(processor, hf_processor):
    chat = CONVERSATIONS["text_multi_turn"]
    ours = processor.apply_chat_template(chat, tokenize=True, return_dict=True, date_string="3 Mar 2024")
    theirs = hf_processor.apply_chat_template(chat, tokenize=True, return_dict=True, date_string="3 Mar 2024")
    assert set(ours) == {"input_ids", "attention_mask"} and ours["input_ids"] == theirs["input_ids"]


def test_vectorized_image_part_without_source(processor):
    with pytest.raises(ValueError, match="message 0, content part 0: an image part needs one of the keys"):
        processor.apply_chat_template(CONVERSATIONS["image_first"], tokenize=True)


def test_openai_image_url_parts(processor, http_url):
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{http_url}/wide.png"}},
                                         {"type": "text", "text": "What is it?"}]}]
    out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert (out["input_ids"] == 128256).sum() == 1 and out["pixel_values"].shape[1] == 1


# ------------------------------------------------------------------------------------------------------------------
# Where templates are read from


def test_template_sources(tmp_path):
    template = "{{ bos_token }}X"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "chat_template.jinja").write_text(template)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": template}, {"name": "tool_use", "template": "T"}]}))
    for name in "abc":
        assert load_chat_template(tmp_path / name) == template
    assert load_chat_template(tmp_path / "d") == {"default": template, "tool_use": "T"}
    assert load_chat_template(tmp_path) is None
    # .jinja wins over the others.
    (tmp_path / "b" / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path / "b") == "J"


def test_named_templates_and_missing_template(tokenizer):
    proc = MllamaProcessor(MllamaImageProcessorPil(**IMAGE_OPTIONS), tokenizer,
                           chat_template={"default": "{{ bos_token }}D", "other": "O"})
    assert proc.apply_chat_template([]) == "<|begin_of_text|>D"
    assert proc.apply_chat_template([], chat_template="other") == "O"
    bare = MllamaProcessor(MllamaImageProcessorPil(**IMAGE_OPTIONS), tokenizer, chat_template=None)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_block_whitespace_rules_match_transformers(processor, hf_processor):
    # The published template strips with {%- everywhere; this one depends on trim_blocks AND lstrip_blocks.
    template = ("{% for m in messages %}\n"
                "    {% if m.role == 'user' %}\n"
                "U: {{ m.content }}\n"
                "    {% else %}\n"
                "A: {{ m.content }}\n"
                "    {% endif %}\n"
                "{% endfor %}\n"
                "{% if add_generation_prompt %}A:{% endif %}")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = processor.apply_chat_template(chat, chat_template=template, add_generation_prompt=True)
    assert ours == "U: hi\nA: yo\nA:"
    assert ours == hf_processor.apply_chat_template(chat, chat_template=template, add_generation_prompt=True)
