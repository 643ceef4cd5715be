"""The image processors against transformers' PIL processor (bit-identical), against each other (the known
cross-backend tolerance), and against the numbers written in the spec (canvas choice, tiling, padding)."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil as TheirPil

from mllama.processing import image as image_module
from mllama.processing.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MllamaImageProcessor,
    MllamaImageProcessorPil,
    get_all_supported_aspect_ratios,
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
    resize_uint8,
)

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "compare_image_processor_torchvision.py"
_spec = importlib.util.spec_from_file_location("image_bench", _BENCH)
image_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_bench)  # numpy + PIL only: torchvision is imported inside its main()

BACKENDS = [MllamaImageProcessorPil, MllamaImageProcessor]
CHECKPOINT_CONFIG = {  # the released preprocessor_config.json (spec §1.4)
    "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
    "do_rescale": True, "do_resize": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
    "max_image_tiles": 4, "resample": 2, "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560},
}


def settings(tile: int) -> dict:
    return {"size": {"height": tile, "width": tile}, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}


_processors: dict = {}


def processor(cls, tile: int = 56):
    """One instance per (class, tile), with the checkpoint's mean/std."""
    return _processors.setdefault((cls, tile), cls(**settings(tile)))


@pytest.fixture(scope="module")
def cases():
    return image_bench.generate_cases(300, seed=0)


def rng_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def same_outputs(ours, theirs) -> bool:
    return (np.array_equal(np.asarray(ours["pixel_values"]), np.asarray(theirs["pixel_values"]))
            and np.array_equal(np.asarray(ours["aspect_ratio_ids"]), np.asarray(theirs["aspect_ratio_ids"]))
            and np.array_equal(np.asarray(ours["aspect_ratio_mask"]), np.asarray(theirs["aspect_ratio_mask"]))
            and ours["num_tiles"] == theirs["num_tiles"])


# --------------------------------------------------------------------------------------------------------------
# Canvas selection and resize targets: values written in the spec, not computed by our code.
# --------------------------------------------------------------------------------------------------------------

def test_supported_aspect_ratios_order():
    assert list(get_all_supported_aspect_ratios(4)) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert list(get_all_supported_aspect_ratios(1)) == [(1, 1)]
    assert len(get_all_supported_aspect_ratios(6)) == 14  # 6+3+2+1+1+1 arrangements with rows*cols <= 6


# (height, width) -> (canvas height, canvas width), aspect ratio id, (resized height, resized width); tile 560.
SPEC_CANVAS_EXAMPLES = [
    ((480, 640), (560, 1120), 2, (480, 640)),      # spec §5.3
    ((300, 300), (560, 560), 1, (560, 560)),
    ((800, 1300), (1120, 1120), 6, (689, 1120)),
    ((1500, 200), (1680, 560), 7, (1500, 200)),
    ((100, 2300), (560, 2240), 4, (97, 2240)),
    ((1, 9999999), (560, 2240), 4, (1, 2240)),
    ((600, 800), (1120, 1120), 6, (600, 800)),     # meta-reference-notes §2.1 table (given there as W x H)
    ((853, 1280), (1120, 1120), 6, (746, 1120)),
    ((800, 300), (1120, 560), 5, (800, 300)),
    ((3000, 100), (2240, 560), 8, (2240, 74)),
    ((3000, 4000), (1120, 1120), 6, (840, 1120)),
    ((50, 50), (560, 560), 1, (560, 560)),
    ((561, 561), (1120, 1120), 6, (561, 561)),
    ((561, 1121), (1120, 1120), 6, (560, 1120)),
]


@pytest.mark.parametrize("size, canvas, ratio_id, resized", SPEC_CANVAS_EXAMPLES)
def test_canvas_and_resize_examples(size, canvas, ratio_id, resized):
    assert get_optimal_tiled_canvas(*size, 4, 560) == canvas
    assert get_image_size_fit_to_canvas(*size, *canvas, 560) == resized
    rows, cols = canvas[0] // 560, canvas[1] // 560
    assert get_all_supported_aspect_ratios(4).index((rows, cols)) + 1 == ratio_id


# test_image_correctly_tiled (transformers): tile 50, 4 tiles; PIL sizes are (width, height).
TILED_CASES = [
    ((80, 95), 6, [1, 1, 1, 1], []),
    ((101, 50), 3, [1, 1, 1, 0], [3]),
    ((20, 39), 1, [1, 0, 0, 0], [1, 2, 3]),
    ((51, 20), 2, [1, 1, 0, 0], [2, 3]),
    ((150, 150), 6, [1, 1, 1, 1], []),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pil_size, ratio_id, mask, empty_tiles", TILED_CASES)
def test_image_correctly_tiled(backend, pil_size, ratio_id, mask, empty_tiles):
    image = PIL.Image.fromarray(rng_image(pil_size[1], pil_size[0]) | 1)  # no black pixel: no tile is all zero
    out = backend(size={"height": 50, "width": 50}, max_image_tiles=4)(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 1, 4, 3, 50, 50)
    assert out["aspect_ratio_ids"].tolist() == [[ratio_id]]
    assert out["aspect_ratio_mask"].tolist() == [[mask]]
    empty = [k for k in range(4) if (out["pixel_values"][0, 0, k] == 0).all()]
    assert empty == empty_tiles


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_correctly_tiled_batch(backend):
    sizes = [[(80, 95)], [(101, 50), (23, 49)]]
    images = [[PIL.Image.fromarray(rng_image(h, w, seed=w) | 1) for w, h in sample] for sample in sizes]
    out = backend(size={"height": 50, "width": 50}, max_image_tiles=4)(images, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 2, 4, 3, 50, 50)
    assert out["aspect_ratio_ids"].tolist() == [[6, 0], [3, 1]]
    assert out["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 1], [1, 0, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]]]
    assert out["num_tiles"] == [[4], [3, 1]]
    assert (out["pixel_values"][0, 1] == 0).all()  # the padding image
    assert (out["pixel_values"][1, 1, 1:] == 0).all() and not (out["pixel_values"][1, 1, 0] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# PIL backend: bit-identical to transformers' MllamaImageProcessorPil.
# --------------------------------------------------------------------------------------------------------------

def test_generated_cases_cover_sizes_and_modes(cases):
    assert len(cases) >= 300
    modes = {image.mode for _, image, _ in cases} | {"P+transparency" for _, image, _ in cases
                                                     if "transparency" in image.info}
    assert set(image_bench.MODES) <= modes
    sizes = {image.size for _, image, _ in cases}
    assert {(1, 1), (2000, 1), (1, 2000), (4000, 3000), (3000, 4000)} <= sizes
    assert sum(tile == 560 for _, _, tile in cases) >= 10


def test_pil_backend_bit_identical_to_transformers(cases):
    mismatches = []
    for name, image, tile in cases:
        ours = processor(MllamaImageProcessorPil, tile)(image, return_tensors="np")
        theirs = processor(TheirPil, tile)(image, return_tensors="np")
        if not same_outputs(ours, theirs):
            mismatches.append(name)
    assert mismatches == []


def _batches(cases, tile: int):
    """Batches with 0 to 4 images per sample (an empty sample is a text-only row)."""
    pool = [image for _, image, case_tile in cases if case_tile == tile]
    layouts = [[1], [2, 1], [1, 3, 2], [4, 0, 1], [2, 2], [3]]
    batches, k = [], 0
    for layout in layouts:
        batches.append([pool[k + i: k + i + n] for i, n in enumerate(layout)])
        k += sum(layout) + len(layout)
    return batches


def test_pil_backend_bit_identical_on_batches(cases):
    for batch in _batches(cases, 56):
        ours = processor(MllamaImageProcessorPil, 56)(batch, return_tensors="np")
        theirs = processor(TheirPil, 56)(batch, return_tensors="np")
        assert same_outputs(ours, theirs), [len(sample) for sample in batch]
        assert ours["pixel_values"].shape[:3] == (len(batch), max(map(len, batch)), 4)


@pytest.mark.parametrize("make_array", [
    lambda: rng_image(70, 90).astype(np.float32),                 # whole numbers in [0, 255]
    lambda: rng_image(70, 90, channels=4),                        # RGBA array, blended onto white
    lambda: rng_image(70, 90, channels=1),                        # one channel, last
    lambda: np.ascontiguousarray(rng_image(70, 90).transpose(2, 0, 1)),  # CHW
    lambda: rng_image(3, 90),                                     # ambiguous 3xWx3: read as channels-first
    lambda: torch.from_numpy(rng_image(70, 90)),                  # tensors go through numpy in both
], ids=["float-0-255", "rgba", "gray-hwc1", "chw", "ambiguous", "tensor"])
def test_pil_backend_bit_identical_on_arrays(make_array):
    array = make_array()
    ours = processor(MllamaImageProcessorPil)(array, return_tensors="np")
    theirs = processor(TheirPil)(array, return_tensors="np")
    assert same_outputs(ours, theirs)


# --------------------------------------------------------------------------------------------------------------
# Torch backend: transformers' own torchvision class needs torchvision, which CI lacks; it is compared by
# bench/compare_image_processor_torchvision.py (bit-identical, 300/300 images, CPU and CUDA). Here the backend is
# held to the spec's cross-backend tolerance against the PIL result, on both of its CPU resize kernels.
# --------------------------------------------------------------------------------------------------------------

def test_torch_backend_matches_pil_backend(cases):
    unresized = 0
    for name, image, tile in cases:
        pil = processor(MllamaImageProcessorPil, tile)(image, return_tensors="pt")
        ours = processor(MllamaImageProcessor, tile)(image, return_tensors="pt")
        assert ours["aspect_ratio_ids"].equal(pil["aspect_ratio_ids"]), name
        assert ours["aspect_ratio_mask"].equal(pil["aspect_ratio_mask"]), name
        assert ours["num_tiles"] == pil["num_tiles"], name
        diff = (ours["pixel_values"] - pil["pixel_values"]).abs()
        (_, resized) = image_module.tile_arrangement(image.height, image.width, 4, tile)
        if resized == (image.height, image.width):  # no resampling: only normalization rounding may differ
            unresized += 1
            assert diff.max() <= 1e-6, name
        assert diff.max() <= 0.1, name
        assert diff.mean() <= 5e-3, name
    assert unresized >= 20  # the exact branch was exercised


def test_torch_backend_float_kernel_matches_pil_backend(cases, monkeypatch):
    """CPUs without AVX2/AVX512 (and CUDA) take the float32 resize path, including its 1-pixel-wide workaround."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    one_pixel_wide = 0
    for name, image, tile in cases[:80]:
        (_, (new_height, new_width)) = image_module.tile_arrangement(image.height, image.width, 4, tile)
        one_pixel_wide += new_width == 1 and new_height != image.height
        pil = processor(MllamaImageProcessorPil, tile)(image, return_tensors="pt")["pixel_values"]
        ours = processor(MllamaImageProcessor, tile)(image, return_tensors="pt")["pixel_values"]
        assert (ours - pil).abs().max() <= 0.1 and (ours - pil).abs().mean() <= 5e-3, name
    assert one_pixel_wide >= 3


def test_torch_backend_output_types_and_device():
    image = PIL.Image.fromarray(rng_image(60, 130))
    out = processor(MllamaImageProcessor)(image, device="cpu")
    assert isinstance(out["pixel_values"], torch.Tensor) and out["pixel_values"].dtype == torch.float32
    assert out["aspect_ratio_ids"].dtype == torch.int64 and out["aspect_ratio_mask"].dtype == torch.int64
    assert out["pixel_values"].device.type == "cpu" and out["num_tiles"] == [[3]]
    as_numpy = processor(MllamaImageProcessor)(image, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and isinstance(as_numpy["num_tiles"], list)
    default_pil = processor(MllamaImageProcessorPil)(image)
    assert isinstance(default_pil["pixel_values"], np.ndarray)  # return_tensors=None keeps each backend's type
    assert np.array_equal(as_numpy["aspect_ratio_mask"], default_pil["aspect_ratio_mask"])


def test_resize_kernels(monkeypatch):
    """The native uint8 kernel (torchvision uses it on CPUs reporting AVX2) and the float path agree within a
    level; 1-pixel-wide outputs, where torch's float antialias kernel is wrong, still match PIL."""
    gen = torch.Generator().manual_seed(0)
    for height, width, new_height, new_width in [(70, 90, 33, 41), (50, 40, 112, 90), (300, 7, 224, 5)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        native = resize_uint8(image, new_height, new_width)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        float_path = resize_uint8(image, new_height, new_width)
        assert (native.int() - float_path.int()).abs().max() <= 1
    column = torch.randint(0, 256, (3, 34, 1), dtype=torch.uint8, generator=gen)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # the float path
    pil = np.asarray(PIL.Image.fromarray(column.permute(1, 2, 0).numpy()).resize((1, 56), PIL.Image.BILINEAR))
    ours = resize_uint8(column, 56, 1).permute(1, 2, 0).numpy()
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------------------------
# Input forms: every way to give the same picture gives the same result.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_array_layouts_and_dtypes_agree(backend):
    hwc = rng_image(45, 100)
    reference = processor(backend)(PIL.Image.fromarray(hwc), return_tensors="np")
    variants = [hwc, hwc.transpose(2, 0, 1), torch.from_numpy(hwc), torch.from_numpy(hwc).permute(2, 0, 1),
                hwc.astype(np.int32), hwc.astype(np.float64)]
    for variant in variants:
        assert same_outputs(processor(backend)(variant, return_tensors="np"), reference)
    unit_floats = hwc.astype(np.float32) / 255  # floats in [0, 1] are scaled by 255 and rounded
    assert same_outputs(processor(backend)(unit_floats, return_tensors="np"), reference)
    assert same_outputs(processor(backend)(torch.from_numpy(unit_floats), return_tensors="np"), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grayscale_inputs_are_replicated(backend):
    gray = rng_image(45, 100, channels=1)[..., 0]
    reference = processor(backend)(PIL.Image.fromarray(gray), return_tensors="np")  # mode L
    for variant in (gray, gray[..., None], gray[None], torch.from_numpy(gray)):
        assert same_outputs(processor(backend)(variant, return_tensors="np"), reference)
    pixels = reference["pixel_values"][0, 0, 0]
    # the three channels hold the same uint8 values, so undoing the per-channel normalization makes them equal
    raw = pixels * np.asarray(OPENAI_CLIP_STD, np.float32)[:, None, None] + np.asarray(OPENAI_CLIP_MEAN,
                                                                                      np.float32)[:, None, None]
    assert np.allclose(raw[0], raw[1], atol=1e-5) and np.allclose(raw[1], raw[2], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transparency_is_composited_onto_white(backend):
    rgba = rng_image(40, 40, channels=4)
    rgba[..., 3] = 0  # fully transparent: every pixel becomes white
    out = backend(size=56)(PIL.Image.fromarray(rgba), return_tensors="np")
    white = backend(size=56)(PIL.Image.new("RGB", (40, 40), "white"), return_tensors="np")
    assert same_outputs(out, white)
    out_array = backend(size=56)(rgba, return_tensors="np")  # a 4-channel array is blended the same way
    assert np.abs(out_array["pixel_values"] - white["pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_paths_urls_and_base64_load_the_same_image(backend, tmp_path):
    png = io.BytesIO()
    PIL.Image.fromarray(rng_image(33, 77)).save(png, format="PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(png.getvalue())
    encoded = base64.b64encode(png.getvalue()).decode()
    reference = processor(backend)(PIL.Image.open(path), return_tensors="np")
    for source in (str(path), path, png.getvalue(), encoded, "data:image/png;base64," + encoded):
        assert same_outputs(processor(backend)(source, return_tensors="np"), reference)
    mixed = processor(backend)([[path], [encoded, PIL.Image.open(path)]], return_tensors="np")
    assert mixed["num_tiles"] == [reference["num_tiles"][0], reference["num_tiles"][0] * 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nesting_forms(backend):
    images = [rng_image(30 + 10 * k, 60, seed=k) for k in range(3)]
    proc = processor(backend)
    assert proc(images[0], return_tensors="np")["pixel_values"].shape[:2] == (1, 1)
    flat = proc(images, return_tensors="np")
    assert flat["pixel_values"].shape[:2] == (1, 3)
    assert same_outputs(proc(tuple(images), return_tensors="np"), flat)
    assert same_outputs(proc([images], return_tensors="np"), flat)
    stacked = np.stack([rng_image(30, 60, seed=k) for k in range(2)])  # [N, H, W, C]: the images of one sample
    assert proc(stacked, return_tensors="np")["pixel_values"].shape[:2] == (1, 2)
    assert proc([stacked, stacked[:1]], return_tensors="np")["num_tiles"] == [[2, 2], [2]]
    nested = proc([[images[0]], [], images[1:]], return_tensors="np")
    assert nested["pixel_values"].shape[:2] == (3, 2)
    assert nested["aspect_ratio_ids"][1].tolist() == [0, 0]
    assert nested["aspect_ratio_mask"][1].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert nested["num_tiles"][1] == [] and (nested["pixel_values"][1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_edge_cases_do_not_crash(backend):
    proc = processor(backend)
    for size in [(1, 1), (1, 100), (100, 1)]:  # test_ambiguous_channel_pil_image (PIL sizes)
        out = proc(PIL.Image.fromarray(rng_image(size[1], size[0])), return_tensors="np")
        assert out["pixel_values"].shape == (1, 1, 4, 3, 56, 56)
    tall = PIL.Image.new("L", (1, 9_999_999), 200)  # test_resize_impractical_aspect_ratio (1 wide, 9999999 high)
    out = proc(tall, return_tensors="np")
    assert out["aspect_ratio_ids"].tolist() == [[8]] and out["num_tiles"] == [[4]]  # (4, 1): resized to 224x1
    column = out["pixel_values"][0, 0, :, :, :, 0]  # the one real pixel column of each tile
    assert np.allclose(column, ((200 / 255 - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD))
                       .astype(np.float32)[None, :, None], atol=1e-5)
    channels_last_1x1 = np.full((1, 1, 3), 0.5, dtype=np.float32)  # test_call_channels_last
    out = proc(channels_last_1x1, input_data_format="channels_last", return_tensors="np")
    assert out["pixel_values"].shape == (1, 1, 4, 3, 56, 56)


# --------------------------------------------------------------------------------------------------------------
# Padding conventions.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_conventions(backend):
    image = rng_image(30, 70) | 1  # canvas 56 x 112 (1 x 2 tiles), no resize
    out = backend(**settings(56), max_image_tiles=4)([[image], [image, image]], return_tensors="np")
    pixels = out["pixel_values"]
    pad_value = (-np.float32(OPENAI_CLIP_MEAN) / np.float32(OPENAI_CLIP_STD)).astype(np.float32)
    tiles = pixels[0, 0]
    assert np.allclose(tiles[0, :, 30:, :], pad_value[:, None, None], atol=1e-6)  # below the image: 0 in uint8
    assert np.allclose(tiles[1, :, :, 14:], pad_value[:, None, None], atol=1e-6)  # right of it (70 - 56 = 14)
    assert not np.isclose(tiles[1, :, :30, :14], pad_value[:, None, None], atol=1e-6).all()
    assert (tiles[2:] == 0).all()  # padding tiles are 0.0, not -mean/std
    assert (pixels[0, 1] == 0).all()  # padding image
    assert out["aspect_ratio_ids"].tolist() == [[2, 0], [2, 2]]
    assert out["aspect_ratio_mask"].tolist() == [[[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 0, 0], [1, 1, 0, 0]]]
    assert np.array_equal(pixels[1, 0], pixels[0, 0]) and np.array_equal(pixels[1, 1], pixels[0, 0])


# --------------------------------------------------------------------------------------------------------------
# Errors name the image and what is valid.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("images, needle", [
    (lambda im: [[im], im], "mismatched nesting"),
    (lambda im: [[[im]]], "image 0 of sample 0: mismatched nesting"),
    (lambda im: [[im], [im, 42]], "image 1 of sample 1: unsupported image type"),
    (lambda im: [[im], [im, b"not an image"]], "image 1 of sample 1"),
    (lambda im: [im, "data:image/png;base64,!!!!"], "image 1 of sample 0"),
    (lambda im: [im, "missing-file.png"], "image 1 of sample 0: no image file"),
    (lambda im: [im, PIL.Image.new("RGB", (0, 5))], "image 1 of sample 0: the image is empty"),
    (lambda im: [im, np.zeros((0, 4, 3), np.uint8)], "image 1 of sample 0: the image is empty"),
    (lambda im: [im, np.zeros((5, 6, 2), np.uint8)], "image 1 of sample 0: cannot find the channel axis"),
    (lambda im: [im, np.zeros((5, 6, 7), np.uint8)], "image 1 of sample 0: cannot find the channel axis"),
    (lambda im: [im, np.full((5, 6, 3), 300.5)], "image 1 of sample 0: float pixel values span"),
    (lambda im: [im, np.full((5, 6, 3), np.nan)], "image 1 of sample 0: the image contains NaN"),
    (lambda im: [im, np.zeros((5, 6, 3), bool)], "image 1 of sample 0: unsupported pixel dtype"),
    (lambda im: [im, np.zeros((5, 6, 3), np.int16) - 1], "image 1 of sample 0: integer pixel values"),
    (lambda im: {"image": im}, "images: unsupported input"),
    (lambda im: [], "empty list"),
    (lambda im: [[], []], "every sample is empty"),
    (lambda im: np.zeros((1, 2, 3, 4, 5), np.uint8), "images: unsupported input"),
])
def test_input_errors_name_the_image(backend, images, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        processor(backend)(images(PIL.Image.fromarray(rng_image(8, 8))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgb_only_when_conversion_is_off(backend):
    proc = backend(size=56, do_convert_rgb=False)
    rgb = PIL.Image.fromarray(rng_image(20, 30))
    assert same_outputs(proc(rgb, return_tensors="np"), backend(size=56)(rgb, return_tensors="np"))
    with pytest.raises(ValueError, match="image 0 of sample 0: .*do_convert_rgb=False"):
        proc(rgb.convert("L"))
    with pytest.raises(ValueError, match="image 0 of sample 0: the image has 2 channels; expected 1"):
        backend(size=56)(np.zeros((5, 6, 2), np.uint8), input_data_format="channels_last")


# --------------------------------------------------------------------------------------------------------------
# Options, defaults and serialization.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options, needle", [
    ({"do_pad": False}, "do_pad=False is not supported"),
    ({"do_resize": False}, "do_resize=False is not supported"),
    ({"size": {"height": 56, "width": 112}}, "size must be square"),
    ({"size": {"shortest_edge": 56}}, "'height' and 'width'"),
    ({"max_image_tiles": 0}, "max_image_tiles must be a positive integer"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be one number or 3 numbers"),
])
def test_invalid_options_are_rejected(backend, options, needle):
    with pytest.raises(ValueError, match=needle):
        backend(**options)
    with pytest.raises(ValueError, match=needle):  # also as a per-call override
        backend()(PIL.Image.new("RGB", (4, 4)), **options)


def test_unknown_call_option_is_an_error():
    with pytest.raises(TypeError, match="unknown image processor options"):
        MllamaImageProcessorPil()(PIL.Image.new("RGB", (4, 4)), do_center_crop=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_defaults_match_transformers(backend):
    ours = backend().to_dict()
    theirs = TheirPil().to_dict()
    for key, value in ours.items():
        assert theirs[key] == value and type(theirs[key]) is type(value), key  # tuples where transformers has them
    assert ours["size"] == {"height": 224, "width": 224} and ours["image_mean"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_call_overrides(backend):
    image = rng_image(100, 150)
    direct = backend(**settings(112), max_image_tiles=2)(image, return_tensors="np")
    overridden = backend()(image, return_tensors="np", max_image_tiles=2, **settings(112))
    assert same_outputs(direct, overridden) and direct["pixel_values"].shape == (1, 1, 2, 3, 112, 112)
    unnormalized = backend(size=56, do_normalize=False, do_rescale=False)(image, return_tensors="np")
    values = unnormalized["pixel_values"][0, 0, :unnormalized["num_tiles"][0][0]]
    assert values.max() > 1 and np.array_equal(values, np.round(values))  # raw uint8 levels as float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_load_round_trip(backend, tmp_path):
    original = backend(**settings(112), max_image_tiles=3, resample=3)
    written = original.save_pretrained(tmp_path / "saved")
    on_disk = json.loads(Path(written[0]).read_text())
    assert Path(written[0]).name == "preprocessor_config.json"
    assert on_disk["image_processor_type"] == "MllamaImageProcessor" and on_disk["max_image_tiles"] == 3
    assert on_disk["size"] == {"height": 112, "width": 112} and on_disk["resample"] == 3
    loaded = backend.from_pretrained(tmp_path / "saved")
    assert loaded.to_dict() == original.to_dict()
    assert backend.from_pretrained(written[0]).to_dict() == original.to_dict()  # the json file itself
    image = rng_image(90, 200)
    assert same_outputs(loaded(image, return_tensors="np"), original(image, return_tensors="np"))
    assert backend.from_pretrained(tmp_path / "saved", max_image_tiles=2).max_image_tiles == 2


def test_checkpoint_config_interoperates_with_transformers(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(CHECKPOINT_CONFIG))
    ours = MllamaImageProcessorPil.from_pretrained(folder)
    assert ours.size == {"height": 560, "width": 560} and ours.image_mean == OPENAI_CLIP_MEAN
    image = rng_image(500, 900)
    assert same_outputs(ours(image, return_tensors="np"), TheirPil.from_pretrained(folder)(image, return_tensors="np"))
    ours.save_pretrained(tmp_path / "ours")  # transformers reads what we write, and we read what it writes
    assert same_outputs(TheirPil.from_pretrained(tmp_path / "ours")(image, return_tensors="np"),
                        ours(image, return_tensors="np"))
    TheirPil.from_pretrained(folder).save_pretrained(tmp_path / "theirs")
    assert MllamaImageProcessor.from_pretrained(tmp_path / "theirs").to_dict() == ours.to_dict()


def test_from_pretrained_hub_id_downloads_the_config(tmp_path, monkeypatch):
    import huggingface_hub

    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps(CHECKPOINT_CONFIG))
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        return str(config)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = MllamaImageProcessor.from_pretrained("meta-llama/Llama-3.2-11B-Vision-Instruct", revision="main")
    assert calls == [("meta-llama/Llama-3.2-11B-Vision-Instruct", "preprocessor_config.json", "main")]
    assert loaded.size == {"height": 560, "width": 560}

    def failing_download(repo_id, filename, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(ValueError, match="could not find preprocessor_config.json for 'nobody/nothing'"):
        MllamaImageProcessor.from_pretrained("nobody/nothing")
