"""MllamaProcessor against transformers' MllamaProcessor built on the same converted tokenizer and on transformers'
MllamaImageProcessorPil, plus the cross-attention-mask rules on their own."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest_tokenizer import converted_dir, hf_tokenizer, template_text, tokenizer, tokenizer_dir  # noqa: F401
from mllama.processing.cross_attention_mask import (
    cross_attention_mask, dense_cross_attention_mask, extend_cross_attention_mask, image_token_spans,
)
from mllama.processing.image import MllamaImageProcessor, MllamaImageProcessorPil
from mllama.processing.processor import AutoProcessor, MllamaProcessor, add_bos

I, BOS = 128256, 128000
TILE = 56  # small tiles keep the image work cheap; the tile geometry is the same as at 560
IMAGE_OPTIONS = dict(size={"height": TILE, "width": TILE}, max_image_tiles=4,
                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


WIDE, TALL, SQUARE, SMALL = _image(130, 50, 0), _image(40, 150, 1), _image(90, 90, 2), _image(20, 30, 3)


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import MllamaProcessor as HFProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil as HFImageProcessor

    return HFProcessor(HFImageProcessor(**IMAGE_OPTIONS), hf_tokenizer(True), chat_template=template_text())


@pytest.fixture(scope="module")
def processor(tokenizer):
    return MllamaProcessor(MllamaImageProcessorPil(**IMAGE_OPTIONS), tokenizer, chat_template=template_text())


def assert_same(ours, theirs, return_tensors):
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, key
            assert np.array_equal(a, b), key
        else:
            assert a == b, key


# ------------------------------------------------------------------------------------------------------------------
# The sparse spans (spec §6.1) and the dense mask


@pytest.mark.parametrize("ids, spans", [
    ([5, I, 6, I, 7], [[1, 3], [3, 5]]),
    ([I, I, 5, 6], [[0, 4], [1, 4]]),
    ([5, I, I, 6, I, 7, 8], [[1, 4], [2, 4], [4, 7]]),
    ([5, I, 6, I, I], [[1, 3], [3, 5], [4, 5]]),
    ([5, I, 6], [[1, -1]]),
    ([5, 6, 7], []),
    ([I, I, I], [[0, 3], [1, 3], [2, 3]]),
])
def test_spans(ids, spans):
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    assert image_token_spans(ids, I) == spans
    assert image_token_spans(torch.tensor(ids), I) == spans
    assert get_cross_attention_token_mask(ids, I) == spans


def test_dense_mask_rules():
    ids = [[BOS, 5, I, 6, I, I, 7, 8], [9, 9, 9, I, 4, 4, 0, 0]]
    mask = cross_attention_mask(ids, num_tiles=[[2, 4, 1], [3]], image_token_id=I, max_num_tiles=4)
    assert mask.shape == (2, 8, 3, 4) and mask.dtype == torch.int64
    # Text before the first image sees nothing.
    assert mask[0, :2].sum() == 0 and mask[1, :3].sum() == 0
    # Image 0 (2 tiles) from its token to the next image token; padding tiles stay 0.
    assert mask[0, 2:4, 0, :2].all() and mask[0, 4:, 0].sum() == 0 and mask[0, :, 0, 2:].sum() == 0
    # Adjacent images 1 and 2 both reach the end of the sequence.
    assert mask[0, 4:, 1, :].all() and mask[0, 5:, 2, :1].all() and mask[0, 4, 2].sum() == 0
    # A lone image runs to the end, pad rows included; the missing images of sample 1 stay 0.
    assert mask[1, 3:, 0, :3].all() and mask[1, :, 1:].sum() == 0
    from transformers.models.mllama.processing_mllama import convert_sparse_cross_attention_mask_to_dense

    spans = [image_token_spans(r, I) for r in ids]
    theirs = convert_sparse_cross_attention_mask_to_dense(spans, [[2, 4, 1], [3]], 4, 8)
    assert np.array_equal(mask.numpy(), theirs)
    assert torch.equal(dense_cross_attention_mask(spans, [[2, 4, 1], [3]], 4, 8), mask)


def test_extend_mask_repeats_last_row():
    mask = cross_attention_mask([[BOS, I, 5]], [[2]], I, 4)
    longer = extend_cross_attention_mask(mask, 3)
    assert longer.shape == (1, 6, 1, 4) and torch.equal(longer[:, 3:], mask[:, -1:].expand(-1, 3, -1, -1))


def test_add_bos_rule():
    bos = "<|begin_of_text|>"
    assert add_bos("<|image|>If I", bos) == "<|image|><|begin_of_text|>If I"
    assert add_bos("<|image|><|image|>x", bos) == "<|image|><|image|><|begin_of_text|>x"
    assert add_bos("hi", bos) == "<|begin_of_text|>hi"
    assert add_bos(" <|image|>x", bos) == "<|begin_of_text|> <|image|>x"
    assert add_bos("a<|begin_of_text|>b", bos) == "a<|begin_of_text|>b"


# ------------------------------------------------------------------------------------------------------------------
# Against transformers' MllamaProcessor

CASES = {
    "single": (["<|image|>If I had to write a haiku for this one"], [[WIDE]]),
    "text_only": (["This is a test sentence.", "Another, longer, text-only prompt here."], None),
    "interleaved": (["Look <|image|> and then <|image|> and compare them."], [[TALL, SQUARE]]),
    "adjacent_leading": (["<|image|><|image|>Compare these two images."], [[WIDE, SMALL]]),
    "adjacent_middle_and_last": (["A <|image|><|image|> B <|image|>"], [[SQUARE, WIDE, TALL]]),
    "batch_uneven": (["<|image|>Short.", "Some text first <|image|><|image|> then a much longer tail of words."],
                     [[SQUARE], [TALL, WIDE]]),
    "batch_with_imageless_sample": (["<|image|>Describe.", "No image in this one, just words."], [[WIDE], []]),
    "bos_already_present": (["<|begin_of_text|><|image|>Hi there"], [[SMALL]]),
    "chat_prompt": (["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is it?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n"], [[TALL]]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kwargs", [
    dict(padding=True, return_tensors="pt"),
    dict(padding=True, padding_side="left", return_tensors="pt"),
    dict(padding="max_length", max_length=40, return_tensors="np"),
    dict(padding=True, add_special_tokens=False, return_tensors="pt"),
    dict(padding=True),
])
def test_matches_transformers(processor, hf_processor, case, kwargs):
    text, images = CASES[case]
    ours = processor(text=text, images=images, **kwargs)
    theirs = hf_processor(text=text, images=images, **kwargs)
    assert_same(ours, theirs, kwargs.get("return_tensors"))
    assert "num_tiles" not in ours
    if images is not None:
        assert {"cross_attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"} <= set(ours)


def test_known_ids_and_double_bos(processor):
    # HF's integration-test expectation for the base prompt: the tokenizer's BOS, the image, the inserted BOS.
    out = processor(text="<|image|>If I had to write a haiku for this one", images=WIDE, return_tensors="pt")
    assert out["input_ids"][0, :4].tolist() == [BOS, I, BOS, 2746]
    assert out["cross_attention_mask"].shape == (1, out["input_ids"].shape[1], 1, 4)
    assert out["cross_attention_mask"][0, 0].sum() == 0 and out["cross_attention_mask"][0, 1:, 0, :3].all()
    assert out["pixel_values"].shape == (1, 1, 4, 3, TILE, TILE)
    text_only = processor(text="If I had", return_tensors="pt")
    assert text_only["input_ids"][0, :3].tolist() == [BOS, BOS, 2746] and set(text_only) == {"input_ids",
                                                                                           "attention_mask"}


def test_left_padding_mask_rows(processor):
    out = processor(text=["<|image|>a", "Some words <|image|><|image|> end"], images=[[SQUARE], [WIDE, TALL]],
                    padding=True, padding_side="left", return_tensors="pt")
    ids, mask = out["input_ids"], out["cross_attention_mask"]
    pads = int((out["attention_mask"][0] == 0).sum())
    assert pads > 0 and mask[0, :pads].sum() == 0  # left padding sees no image
    first = ids[1].tolist().index(I)
    assert mask[1, :first].sum() == 0 and mask[1, first:, 0].sum() > 0 and mask[1, first + 1:, 1].sum() > 0


def test_images_only(processor, hf_processor):
    ours = processor(images=[[WIDE, TALL]], return_tensors="pt")
    theirs = hf_processor(images=[[WIDE, TALL]], return_tensors="pt")
    assert_same(ours, theirs, "pt")
    assert set(ours) == {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}


def test_model_input_names(processor, hf_processor):
    assert set(processor.model_input_names) == set(hf_processor.model_input_names)
    assert "num_tiles" not in processor.model_input_names


# ------------------------------------------------------------------------------------------------------------------
# Errors: both implementations refuse, ours says what to do


@pytest.mark.parametrize("text, images, message", [
    (["<|image|><|image|>two tokens"], [[WIDE]], "one <|image|> token per image"),
    (["no tokens"], [[WIDE]], "one <|image|> token per image"),
    (["<|image|>needs an image"], None, "no images were passed"),
    (["<|image|>a", "<|image|>b"], [WIDE, TALL], "A flat list of images is read as the images of ONE prompt"),
    (["<|image|>a", "<|image|>b"], [[WIDE]], "one <|image|> token per image"),
])
def test_count_errors(processor, hf_processor, text, images, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images)
    with pytest.raises(ValueError):
        hf_processor(text=text, images=images)


def test_truncation_cutting_image_tokens_raises(processor, hf_processor):
    text = "Some words before the image <|image|> and after"
    with pytest.raises(ValueError, match="truncation removed <|image|> tokens"):
        processor(text=text, images=WIDE, truncation=True, max_length=3)
    with pytest.raises(ValueError):
        hf_processor(text=text, images=WIDE, truncation=True, max_length=3)
    # A max_length that keeps the image token is fine and identical.
    assert_same(processor(text=text, images=WIDE, truncation=True, max_length=9, return_tensors="pt"),
                hf_processor(text=text, images=WIDE, truncation=True, max_length=9, return_tensors="pt"), "pt")


def test_bad_text_type(processor):
    with pytest.raises(ValueError, match="string or a list of strings"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="text=..., images=..."):
        processor()


# ------------------------------------------------------------------------------------------------------------------
# Decoding


def test_decoding_matches_transformers(processor, hf_processor):
    generated = torch.tensor([[BOS, I, BOS, 9906, 1174, 1917, 0, 128009], [BOS, 2028, 374, 264, 1296, 13, 128004,
                                                                           128004]])
    assert processor.batch_decode(generated) == hf_processor.batch_decode(generated)
    assert processor.decode(generated[0]) == hf_processor.decode(generated[0])
    assert processor.decode(generated[0], skip_special_tokens=True) == "Hello , world!"
    assert processor.post_process_image_text_to_text(generated) == \
        hf_processor.post_process_image_text_to_text(generated) == ["Hello , world!", "This is a test."]


# ------------------------------------------------------------------------------------------------------------------
# Loading and saving


def _processor_folder(tmp_path, image_processor_type: str):
    folder = tmp_path / image_processor_type
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((converted_dir(True) / name).read_bytes())
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template_text()}))
    config = {"image_processor_type": image_processor_type, "do_convert_rgb": True, "do_normalize": True,
              "do_pad": True, "do_rescale": True, "do_resize": True, "resample": 2,
              "rescale_factor": 0.00392156862745098, **IMAGE_OPTIONS}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind, expected", [("MllamaImageProcessor", MllamaImageProcessor),
                                            ("MllamaImageProcessorFast", MllamaImageProcessor),
                                            ("MllamaImageProcessorPil", MllamaImageProcessorPil)])
def test_auto_processor_picks_backend(tmp_path, kind, expected):
    folder = _processor_folder(tmp_path, kind)
    proc = AutoProcessor.from_pretrained(folder)
    assert isinstance(proc, MllamaProcessor) and type(proc.image_processor) is expected
    assert proc.image_processor.size == {"height": TILE, "width": TILE}
    assert proc.chat_template == template_text()
    assert type(AutoProcessor.from_pretrained(folder, backend="pil").image_processor) is MllamaImageProcessorPil
    assert type(AutoProcessor.from_pretrained(folder, backend="torch").image_processor) is MllamaImageProcessor
    with pytest.raises(ValueError, match="backend"):
        AutoProcessor.from_pretrained(folder, backend="tensorflow")


def test_torch_backend_close_to_pil(tmp_path, processor):
    folder = _processor_folder(tmp_path, "MllamaImageProcessor")
    proc = AutoProcessor.from_pretrained(folder)
    text = ["<|image|>a", "b <|image|><|image|>"]
    images = [[WIDE], [TALL, SQUARE]]
    ours = proc(text=text, images=images, padding=True, return_tensors="pt")
    pil = processor(text=text, images=images, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(ours[key], pil[key]), key
    assert (ours["pixel_values"] - pil["pixel_values"]).abs().max() < 0.1


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"} <= names
    assert "chat_template.json" not in names
    again = MllamaProcessor.from_pretrained(tmp_path, backend="pil")
    assert again.chat_template == processor.chat_template
    args = dict(text=["<|image|>x", "y"], images=[[SQUARE], []], padding=True, return_tensors="pt")
    assert_same(again(**args), processor(**args), "pt")
    processor.save_pretrained(tmp_path / "json", save_jinja_files=False)
    assert json.loads((tmp_path / "json" / "chat_template.json").read_text())["chat_template"] == template_text()
    assert MllamaProcessor.from_pretrained(tmp_path / "json").chat_template == template_text()
    # transformers reads the saved tokenizer too.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).encode("<|image|>hi") == [BOS, I, 6151]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        MllamaProcessor.from_pretrained(tmp_path)
