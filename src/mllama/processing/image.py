"""The Mllama image processors: pick a tile canvas, resize without distortion, pad, normalize, cut into tiles.

Two backends run the same algorithm and differ only in the resize kernel and float rounding:

* `MllamaImageProcessorPil` (PIL + numpy) is bit-identical to transformers' `MllamaImageProcessorPil`, which is
  itself bit-identical to Meta's reference transform in fp32.
* `MllamaImageProcessor` (pure torch, CPU or CUDA) makes torchvision's choices of resize kernel and float order,
  so it equals transformers' default (torchvision) `MllamaImageProcessor` bit for bit on uint8 images (measured:
  bench/compare_image_processor_torchvision.py). It differs from PIL by one or two uint8 levels where an image is
  resized (|diff| <= ~0.03 after CLIP normalization) and by ~1e-7 where it is not.

Both backends turn every input into uint8 RGB first. Float arrays are read as 0..255 when they hold whole numbers,
else as 0..1 (scaled by 255 and rounded); transformers instead resizes float tensors in float (torchvision backend)
or rescales [0, 1] floats twice (PIL backend), so float inputs are where we knowingly differ from it.

Output layout: pixel_values [batch, max_images, max_tiles, 3, tile, tile] float32, padding tiles and padding
images 0.0; aspect_ratio_ids [batch, max_images] (0 = padding image); aspect_ratio_mask [batch, max_images,
max_tiles] with tile 0 set for every image slot; num_tiles, a list of lists.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .feature import BatchFeature
from .image_io import VALID_SOURCES, load_image

CONFIG_NAME = "preprocessor_config.json"
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # what the released checkpoints use
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------------------------------------------------------
# Canvas selection: the one implementation both backends use.
# ---------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def get_all_supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (tiles high, tiles wide) arrangement with at most `max_image_tiles` tiles, rows as the outer loop.

    The order is part of the model: aspect_ratio_id = 1 + index here selects rows of the trained tile tables.
    For 4 tiles: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1).
    """
    limit = max_image_tiles + 1
    return tuple((rows, cols) for rows in range(1, limit) for cols in range(1, limit) if rows * cols <= max_image_tiles)


@lru_cache(maxsize=4096)
def get_optimal_tiled_canvas(image_height: int, image_width: int, max_image_tiles: int,
                             tile_size: int) -> tuple[int, int]:
    """The (height, width) in pixels of the tile canvas an image is fitted into.

    Prefer the least upscaling among canvases that hold the whole image, else the least downscaling; among
    canvases with exactly that scale, the smallest area, then the first in list order.
    """
    canvases = [(rows * tile_size, cols * tile_size) for rows, cols in get_all_supported_aspect_ratios(max_image_tiles)]
    # float64 ratios, compared for exact equality, as the reference does: ties must tie the same way
    scales = [min(height / image_height, width / image_width) for height, width in canvases]
    upscales = [scale for scale in scales if scale >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [canvas for canvas, scale in zip(canvases, scales) if scale == chosen]
    return min(candidates, key=lambda canvas: canvas[0] * canvas[1])  # min() keeps the first of equal areas


def get_image_size_fit_to_canvas(image_height: int, image_width: int, canvas_height: int, canvas_width: int,
                                 tile_size: int) -> tuple[int, int]:
    """The (height, width) to resize an image to inside its canvas, keeping its aspect ratio.

    Images only grow until their short side reaches one tile, and shrink until they fit the canvas; an image
    that already lies between those bounds keeps its size.
    """
    target_width = min(max(image_width, tile_size), canvas_width)
    target_height = min(max(image_height, tile_size), canvas_height)
    scale_height = target_height / image_height
    scale_width = target_width / image_width
    if scale_width < scale_height:
        # "or 1": a 1x9999999 image would otherwise become 0 pixels high
        return min(math.floor(image_height * scale_width) or 1, target_height), target_width
    return target_height, min(math.floor(image_width * scale_height) or 1, target_width)


def tile_arrangement(image_height: int, image_width: int, max_image_tiles: int, tile_size: int
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tiles high, tiles wide), (resized height, resized width)) for an image of the given size."""
    canvas_height, canvas_width = get_optimal_tiled_canvas(image_height, image_width, max_image_tiles, tile_size)
    new_size = get_image_size_fit_to_canvas(image_height, image_width, canvas_height, canvas_width, tile_size)
    return (canvas_height // tile_size, canvas_width // tile_size), new_size


def build_aspect_ratio_outputs(aspect_ratios: list[list[tuple[int, int]]], max_image_tiles: int
                               ) -> tuple[np.ndarray, np.ndarray]:
    """aspect_ratio_ids [B, N] and aspect_ratio_mask [B, N, max_tiles] (int64) from each image's (rows, cols)."""
    supported = get_all_supported_aspect_ratios(max_image_tiles)
    max_images = max(len(sample) for sample in aspect_ratios)
    ids = np.zeros((len(aspect_ratios), max_images), dtype=np.int64)
    mask = np.zeros((len(aspect_ratios), max_images, max_image_tiles), dtype=np.int64)
    # Tile 0 is on for every slot, padding images included: Meta pads aspect ratios with (1, 1).
    mask[:, :, 0] = 1
    for i, sample in enumerate(aspect_ratios):
        for j, (rows, cols) in enumerate(sample):
            ids[i, j] = supported.index((rows, cols)) + 1
            mask[i, j, : rows * cols] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Input structure and conversion to uint8 RGB, shared by both backends.
# ---------------------------------------------------------------------------------------------------------------

def _is_array(item: Any) -> bool:
    return isinstance(item, (np.ndarray, torch.Tensor))


def _is_single_image(item: Any) -> bool:
    if _is_array(item):
        return item.ndim in (2, 3)
    return isinstance(item, (PIL.Image.Image, str, bytes, bytearray, os.PathLike))


def _is_image_stack(item: Any) -> bool:
    return _is_array(item) and item.ndim == 4


def nest_images(images: Any) -> list[list[Any]]:
    """Arrange the input as one list of images per sample.

    Accepted: one image; a list of images (one sample); a list of lists (one list per sample, lists may be
    empty for text-only samples); a 4-D array (the images of one sample) or a list of 4-D arrays (one per sample).
    """
    if _is_single_image(images):
        return [[images]]
    if _is_image_stack(images):
        return [list(images)]
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images: unsupported input of type {type(images).__name__}. {VALID_SOURCES} Pass one "
                         f"image, a list of images, or a list of lists of images (one list per sample).")
    if len(images) == 0:
        raise ValueError("images: got an empty list; pass at least one image")
    is_list = [isinstance(item, (list, tuple)) for item in images]
    is_stack = [_is_image_stack(item) for item in images]
    if all(is_list):
        samples = [list(sample) for sample in images]
    elif all(is_stack):
        samples = [list(stack) for stack in images]
    elif any(is_list) or any(is_stack):
        odd = is_list.index(True) if any(is_list) else is_stack.index(True)
        single = next(k for k in range(len(images)) if not (is_list[k] or is_stack[k]))
        raise ValueError(f"images: mismatched nesting, item {odd} is a list (or 4-D array) of images but item "
                         f"{single} is a single image; pass either a list of images (one sample) or a list of "
                         f"lists of images (one list per sample)")
    else:
        samples = [list(images)]
    for i, sample in enumerate(samples):
        for j, item in enumerate(sample):
            if isinstance(item, (list, tuple)) or _is_image_stack(item):
                raise ValueError(f"image {j} of sample {i}: mismatched nesting, found a list or 4-D array where a "
                                 f"single image belongs; at most two levels (samples, then images) are allowed")
    if not any(samples):
        raise ValueError("images: every sample is empty; pass at least one image")
    return samples


def pil_to_rgb_image(image: PIL.Image.Image, position: str = "image 0") -> PIL.Image.Image:
    """The image in mode RGB, loaded. Transparency is composited onto white (transformers' rule; Meta's reference
    drops alpha). An RGB image without transparency comes back as itself, not as a copy."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        if image.mode == "RGB":
            image.load()  # what convert("RGB") would do before copying
            return image
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"{position}: PIL cannot convert an image of mode {image.mode!r} to RGB ({exc}); "
                         f"convert it to RGB, RGBA or L first") from None


def pil_to_rgb_array(image: PIL.Image.Image, position: str = "image 0") -> np.ndarray:
    """HWC uint8 RGB. Transparency is composited onto white (transformers' rule; Meta's reference drops alpha)."""
    return np.array(pil_to_rgb_image(image, position))


def pil_rgb_planes(image: PIL.Image.Image) -> torch.Tensor:
    """A loaded RGB PIL image as a contiguous [3, H, W] uint8 tensor (CPU).

    PIL packs each band straight into a plane, which costs what packing the interleaved HWC bytes does; moving
    HWC to CHW afterwards would cost as much again (a 3-byte-strided gather).
    """
    width, height = image.size
    planes = torch.empty((3, height, width), dtype=torch.uint8)
    flat = planes.numpy().reshape(3, -1)
    for channel, band in enumerate("RGB"):
        flat[channel] = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8)
    return planes


def _is_channels_last(shape: Sequence[int], input_data_format: str | None, position: str) -> bool:
    fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format))
    if fmt in ("channels_last", "last"):
        return True
    if fmt in ("channels_first", "first"):
        return False
    if fmt is not None:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")
    # As in transformers, a shape that fits both readings (e.g. 3x10x3) is taken as channels-first.
    if shape[0] in (1, 3, 4):
        return False
    if shape[-1] in (1, 3, 4):
        return True
    raise ValueError(f"{position}: cannot find the channel axis of an array of shape {tuple(shape)}; expected "
                     f"1, 3 or 4 channels first (CHW) or last (HWC), or pass input_data_format")


def _uint8_rule(is_float: bool, low: float, high: float, whole: bool, position: str) -> str:
    """How to turn pixel values into uint8: 'cast' (already 0..255 whole numbers) or 'scale' (floats in [0, 1])."""
    if whole and 0 <= low and high <= 255:
        return "cast"  # checked first, like transformers: a float image of 0.0/1.0 values counts as 0..255
    if is_float and 0 <= low and high <= 1:
        return "scale"
    kind = "float" if is_float else "integer"
    raise ValueError(f"{position}: {kind} pixel values span [{low}, {high}]; expected whole numbers in [0, 255] "
                     f"or floats in [0, 1] (convert 16-bit images to 8 bits first)")


def _check_array(image: np.ndarray | torch.Tensor, position: str) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"{position}: an image array must be 2-D (HW) or 3-D (HWC or CHW), got shape "
                         f"{tuple(image.shape)}")
    if any(size == 0 for size in image.shape):
        raise ValueError(f"{position}: the image is empty (shape {tuple(image.shape)}); it needs at least 1x1 pixel")
    dtype_ok = (image.dtype != torch.bool and not image.is_complex()) if isinstance(image, torch.Tensor) else (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating))
    if not dtype_ok:
        raise ValueError(f"{position}: unsupported pixel dtype {image.dtype}; expected uint8, another integer type "
                         f"with values in [0, 255], or float")


def array_to_uint8_hwc(image: np.ndarray, position: str, input_data_format: str | None = None) -> np.ndarray:
    """A numpy image (HW, HWC or CHW; any real dtype) as HWC uint8 with 1, 3 or 4 channels."""
    _check_array(image, position)
    if image.ndim == 2:
        image = image[:, :, None]  # grayscale; there is no channel axis to find
    elif not _is_channels_last(image.shape, input_data_format, position):
        image = np.moveaxis(image, 0, -1)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    is_float = np.issubdtype(image.dtype, np.floating)
    if is_float and not np.isfinite(image).all():
        raise ValueError(f"{position}: the image contains NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    whole = not is_float or bool((image == np.floor(image)).all())
    if _uint8_rule(is_float, low, high, whole, position) == "scale":
        return np.round(image.astype(np.float64) * 255).astype(np.uint8)
    return image.astype(np.uint8)


def tensor_to_uint8_chw(image: torch.Tensor, position: str, input_data_format: str | None = None) -> torch.Tensor:
    """A torch image (HW, HWC or CHW; any real dtype) as CHW uint8 on its own device, 1, 3 or 4 channels."""
    _check_array(image, position)
    image = image.detach()
    if image.dtype in (torch.uint16, torch.uint32, torch.uint64):
        image = image.to(torch.int64)  # min/max are not implemented for these on every device
    if image.ndim == 2:
        image = image[None]  # grayscale; there is no channel axis to find
    elif _is_channels_last(image.shape, input_data_format, position):
        image = image.permute(2, 0, 1)
    if image.dtype == torch.uint8:
        return image
    is_float = image.is_floating_point()
    if is_float and not torch.isfinite(image).all():
        raise ValueError(f"{position}: the image contains NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    whole = not is_float or bool((image == image.floor()).all())
    if _uint8_rule(is_float, low, high, whole, position) == "scale":
        return (image.to(torch.float64) * 255).round().to(torch.uint8)
    return image.to(torch.uint8)


def _channel_error(position: str, channels: int, do_convert_rgb: bool) -> ValueError:
    if not do_convert_rgb:
        return ValueError(f"{position}: the image has {channels} channel(s) but do_convert_rgb=False accepts only "
                          f"3-channel RGB; pass do_convert_rgb=True to convert grayscale and RGBA")
    return ValueError(f"{position}: the image has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")


# ---------------------------------------------------------------------------------------------------------------
# Options shared by both backends.
# ---------------------------------------------------------------------------------------------------------------

_OPTIONS = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "do_pad", "max_image_tiles")
# Keys found in preprocessor_config.json files that carry no option for this processor.
_METADATA_KEYS = {"image_processor_type", "processor_class", "auto_map", "feature_extractor_type",
                  "_processor_class", "default_to_square", "data_format", "input_data_format", "return_tensors",
                  "device", "disable_grouping", "do_center_crop", "crop_size", "pad_size", "_valid_processor_keys"}


def _normalize_size(size: Any) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or not size.get("height") or not size.get("width"):
        raise ValueError(f"size must be a dict with positive 'height' and 'width' (the tile size), got {size!r}")
    if size["height"] != size["width"]:
        raise ValueError(f"size must be square (tiles are square), got height={size['height']} "
                         f"width={size['width']}")
    return {"height": int(size["height"]), "width": int(size["width"])}


def _normalize_stats(name: str, value: Any) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or 3 numbers (one per RGB channel), got {value!r}")
    if name == "image_std" and any(v == 0 for v in values):
        raise ValueError(f"image_std must not contain 0, got {value!r}")
    return values


def _missing_options(opts: dict[str, Any]) -> list[str]:
    """Options set to None that processing needs: transformers accepts them when the processor is built and refuses
    them when an image is processed (the size and resample of the resize always; the rescale factor, mean and std
    only when rescaling or normalizing)."""
    needed = ["size", "resample"]
    if opts["do_rescale"]:
        needed.append("rescale_factor")
    if opts["do_normalize"]:
        needed += ["image_mean", "image_std"]
    return [name for name in needed if opts[name] is None]


def _validate_options(opts: dict[str, Any], processing: bool = True) -> dict[str, Any]:
    """Check the options; with processing=True also return them in the working form (size dict, 3-float lists).

    An explicit None means what it means in transformers: off for the do_* switches (do_resize and do_pad cannot be
    off), and, for a value that processing needs, an error when an image is processed."""
    if not opts["do_pad"]:
        raise ValueError("do_pad=False is not supported: every image is padded to its tile canvas, which the model "
                         "requires (the same rule as transformers)")
    if not opts["do_resize"]:
        raise ValueError("do_resize=False is not supported: images must be fitted to a tile canvas (the same rule "
                         "as transformers)")
    tiles = opts["max_image_tiles"]
    if not isinstance(tiles, (int, np.integer)) or isinstance(tiles, bool) or tiles <= 0:
        raise ValueError(f"max_image_tiles must be a positive integer, got {tiles!r}")
    opts["max_image_tiles"] = int(tiles)
    if opts["size"] is not None:
        opts["size"] = _normalize_size(opts["size"])
    for name in ("image_mean", "image_std"):
        if opts[name] is not None:
            _normalize_stats(name, opts[name])
    if not processing:
        return opts
    missing = _missing_options(opts)
    if missing:
        raise ValueError(f"{', '.join(missing)} cannot be None when images are processed: the resize needs size "
                         f"and resample, do_rescale=True needs rescale_factor, do_normalize=True needs image_mean "
                         f"and image_std")
    for name in ("image_mean", "image_std"):
        if opts[name] is not None:
            opts[name] = _normalize_stats(name, opts[name])
    opts["resample"] = int(opts["resample"])
    if opts["rescale_factor"] is not None:
        opts["rescale_factor"] = float(opts["rescale_factor"])
    return opts


def _stored(name: str, value: Any) -> Any:
    # The attribute as kept: the size as a dict, mean and std as lists of floats (to_dict gives them as tuples,
    # as transformers does), the rest as given (resample stays a PIL enum when it is one).
    if name == "size" and value is not None:
        return _normalize_size(value)
    if name in ("image_mean", "image_std") and isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"'{path}' is not valid JSON ({exc})") from None


class _MllamaImageProcessorBase:
    """Options, (de)serialization and batching common to both backends; subclasses supply `_encode`."""

    model_input_names = ["pixel_values", "num_tiles", "aspect_ratio_ids", "aspect_ratio_mask"]

    do_convert_rgb = True
    do_resize = True
    size = {"height": 224, "width": 224}
    resample = PIL.Image.Resampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_pad = True
    max_image_tiles = 4

    def __init__(self, **kwargs: Any):
        # An option left out takes the class default; one passed as None stays None, as in transformers.
        options = {name: kwargs.pop(name) if name in kwargs else copy.deepcopy(getattr(type(self), name))
                   for name in _OPTIONS}
        # Like transformers, other keywords become attributes that to_dict and save_pretrained keep.
        extra = {name: value for name, value in kwargs.items() if name not in _METADATA_KEYS}
        if extra:
            warnings.warn(f"{type(self).__name__}: {sorted(extra)} are not Mllama image options; they are kept as "
                          f"attributes (and saved) but do not change the processing", stacklevel=2)
        _validate_options(dict(options), processing=False)
        for name, value in options.items():
            setattr(self, name, _stored(name, value))
        for name, value in extra.items():
            setattr(self, name, value)

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown image processor options {unknown}; valid options are {list(_OPTIONS)}")
        opts = {name: getattr(self, name) for name in _OPTIONS}
        # An explicit None overrides too (transformers: do_normalize=None means no normalization), except for
        # do_resize and do_pad, whose per-call values transformers does not read.
        opts.update({name: value for name, value in overrides.items()
                     if value is not None or name not in ("do_resize", "do_pad")})
        return _validate_options(opts)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The options as transformers' to_dict gives them: tuples stay tuples, explicit Nones are kept, attributes
        set on the instance are included, and both backends name themselves "MllamaImageProcessor", so either
        loads the other's file."""
        out = {name: copy.deepcopy(value) for name, value in vars(self).items() if not name.startswith("_")}
        for name in ("image_mean", "image_std"):
            if isinstance(out[name], list):
                out[name] = tuple(out[name])
        out["image_processor_type"] = "MllamaImageProcessor"
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write preprocessor_config.json into `save_directory` (created if missing)."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_pretrained needs a directory, but '{folder}' is a file")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return [str(path)]

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any):
        return cls(**{**config, **overrides})

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike):
        """The image processor whose options a json file (as written by to_json_file) holds."""
        return cls.from_dict(_read_json(Path(json_file)))

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, **overrides: Any):
        """Load from a folder holding preprocessor_config.json, the json file itself, or a Hub model id."""
        path = Path(pretrained)
        if path.is_dir():
            path = path / CONFIG_NAME
            if not path.is_file():
                raise ValueError(f"no {CONFIG_NAME} in the folder '{pretrained}'")
        elif not path.is_file():
            from huggingface_hub import hf_hub_download  # only needed for Hub ids

            try:
                path = Path(hf_hub_download(str(pretrained), CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                                            token=token, local_files_only=local_files_only))
            except Exception as exc:
                raise ValueError(f"could not find {CONFIG_NAME} for '{pretrained}': it is not a local folder or "
                                 f"file, and the Hub download failed ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(_read_json(path), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def _batch(self, samples: list[list[Any]], opts: dict[str, Any], encode_one) -> tuple[list, list, list]:
        """Run `encode_one(item, position)` -> (tiles or image, (rows, cols)) over every image, keeping the nesting;
        num_tiles is rows * cols of each."""
        tiles, ratios, num_tiles = [], [], []
        for i, sample in enumerate(samples):
            sample_tiles, sample_ratios = [], []
            for j, item in enumerate(sample):
                position = f"image {j} of sample {i}"
                if not _is_array(item):
                    item = load_image(item, position=position)
                image_tiles, ratio = encode_one(item, position)
                sample_tiles.append(image_tiles)
                sample_ratios.append(ratio)
            tiles.append(sample_tiles)
            ratios.append(sample_ratios)
            num_tiles.append([rows * cols for rows, cols in sample_ratios])
        return tiles, ratios, num_tiles


# ---------------------------------------------------------------------------------------------------------------
# PIL + numpy backend.
# ---------------------------------------------------------------------------------------------------------------

class MllamaImageProcessorPil(_MllamaImageProcessorBase):
    """Mllama image processor on PIL and numpy: bit-identical to transformers' MllamaImageProcessorPil."""

    def preprocess(self, images: Any, *, return_tensors: str | None = None, input_data_format: str | None = None,
                   **overrides: Any) -> BatchFeature:
        """Process one image, a list of images (one sample) or a list of lists (one per sample).

        `return_tensors`: "pt", "np" or None (numpy arrays). Option overrides (size=..., image_mean=...) apply to
        this call only.
        """
        opts = self._options(overrides)
        samples = nest_images(images)
        tiles, ratios, num_tiles = self._batch(
            samples, opts, lambda item, position: self._encode(item, position, opts, input_data_format))
        tile = opts["size"]["height"]
        max_images = max(len(sample) for sample in samples)
        pixel_values = np.zeros((len(samples), max_images, opts["max_image_tiles"], 3, tile, tile), dtype=np.float32)
        for i, sample_tiles in enumerate(tiles):
            for j, image_tiles in enumerate(sample_tiles):
                pixel_values[i, j, : image_tiles.shape[0]] = image_tiles
        ids, mask = build_aspect_ratio_outputs(ratios, opts["max_image_tiles"])
        data = {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask,
                "num_tiles": num_tiles}
        return BatchFeature(data, tensor_type=return_tensors, skip=("num_tiles",))

    def _to_rgb(self, item: Any, position: str, opts: dict, input_data_format: str | None) -> np.ndarray:
        if isinstance(item, PIL.Image.Image):
            if opts["do_convert_rgb"]:
                return pil_to_rgb_array(item, position)
            item = np.array(item)
            input_data_format = "channels_last"
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        image = array_to_uint8_hwc(item, position, input_data_format)
        channels = image.shape[-1]
        if channels == 3:
            return image
        if not opts["do_convert_rgb"] or channels not in (1, 4):
            raise _channel_error(position, channels, opts["do_convert_rgb"])
        if channels == 1:
            return np.repeat(image, 3, axis=-1)
        # float64 blend onto white, rounded half-to-even: transformers' numpy rule, kept for bit-identity
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)

    def _encode(self, item: Any, position: str, opts: dict, input_data_format: str | None
                ) -> tuple[np.ndarray, tuple[int, int]]:
        image = self._to_rgb(item, position, opts, input_data_format)  # [H, W, 3] uint8
        tile = opts["size"]["height"]
        (rows, cols), (new_height, new_width) = tile_arrangement(*image.shape[:2], opts["max_image_tiles"], tile)
        if (new_height, new_width) != image.shape[:2]:
            resized = PIL.Image.fromarray(image).resize((new_width, new_height), resample=opts["resample"])
            image = np.asarray(resized)
        # Pad bottom/right with 0 in uint8, so padding normalizes to -mean/std like the reference's black canvas.
        canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.uint8)
        canvas[:new_height, :new_width] = image
        # Elementwise maths in contiguous HWC, in place: the values do not depend on layout or on in-place ops.
        if opts["do_rescale"]:
            # float64 product, then float32: the reference's order, which makes the result bit-identical
            scaled = canvas.astype(np.float64)
            scaled *= opts["rescale_factor"]
            pixels = scaled.astype(np.float32)
        else:
            pixels = canvas.astype(np.float32)
        if opts["do_normalize"]:
            pixels -= np.asarray(opts["image_mean"], dtype=np.float32)
            pixels /= np.asarray(opts["image_std"], dtype=np.float32)
        tiles = pixels.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3)  # [rows, cols, 3, tile, tile]
        return tiles.reshape(rows * cols, 3, tile, tile), (rows, cols)  # row-major tiles


# ---------------------------------------------------------------------------------------------------------------
# Torch backend.
# ---------------------------------------------------------------------------------------------------------------

_TORCH_MODES = {PIL.Image.Resampling.NEAREST.value: "nearest", PIL.Image.Resampling.BILINEAR.value: "bilinear",
                PIL.Image.Resampling.BICUBIC.value: "bicubic"}


def _native_resize(device: torch.device, mode: str) -> bool:
    """Whether resize_uint8 runs torch's uint8 kernel (torchvision's choice) rather than float32 and rounding."""
    on_cpu = device.type == "cpu"
    return mode == "nearest" or (on_cpu and (
        mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")))


def resize_uint8(image: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of a [C, H, W] uint8 tensor to uint8, choosing kernels the way torchvision (0.26) does.

    On CPU, torchvision runs torch's native uint8 kernel for bicubic, and for bilinear when the CPU capability is
    AVX2 or AVX512; elsewhere (CUDA, other CPUs) it resizes in float32 and rounds. Following the same choice
    makes the result equal to transformers' default backend, not just close.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    smooth = mode != "nearest"
    kwargs = {"mode": mode, "antialias": smooth, "align_corners": False if smooth else None}
    on_cpu = image.device.type == "cpu"
    if _native_resize(image.device, mode):
        return F.interpolate(image[None], size=(height, width), **kwargs)[0]
    if smooth and on_cpu and width == 1 and height > 1:
        # torch's float antialias kernel on CPU returns wrong values (off by up to 255) when the output is one pixel
        # wide (torch 2.11 and 2.13; CUDA is fine). Such outputs come from 1-pixel-wide images. The filters are
        # separable, so resizing the transposed image is the same maths through a code path that works.
        return resize_uint8(image.transpose(-1, -2), width, height, mode).transpose(-1, -2)
    resized = F.interpolate(image[None].to(torch.float32), size=(height, width), **kwargs)[0]
    if mode == "bicubic":
        resized = resized.clamp_(0, 255)  # bicubic overshoots; bilinear weights are positive and cannot
    return resized.round_().to(torch.uint8)


def _fill_tiles(out: torch.Tensor, image: torch.Tensor, cols: int) -> None:
    """Cut a [3, H, W] uint8 image into the row-major float tiles out[k] ([tiles, 3, tile, tile]); the canvas
    beyond the image is 0.0, as uint8 zero padding converts to. The uint8 -> float32 conversion is exact, so
    converting while cutting gives what converting the padded uint8 canvas would."""
    tile = out.shape[-1]
    height, width = image.shape[-2:]
    for k in range(out.shape[0]):
        top, left = (k // cols) * tile, (k % cols) * tile
        inside_h, inside_w = min(max(height - top, 0), tile), min(max(width - left, 0), tile)
        dst = out[k]
        if not (inside_h and inside_w):
            dst.zero_()
            continue
        dst[:, :inside_h, :inside_w].copy_(image[:, top:top + inside_h, left:left + inside_w])
        if inside_w < tile:
            dst[:, :inside_h, inside_w:].zero_()
        if inside_h < tile:
            dst[:, inside_h:].zero_()


class MllamaImageProcessor(_MllamaImageProcessorBase):
    """Mllama image processor in pure torch; runs on CPU or CUDA tensors (`device=`), no torchvision needed.

    Follows transformers' default (torchvision) backend: same canvas, antialiased tensor resize, uint8 zero
    padding, rescale folded into normalization ((x - 255*mean) / (255*std) in float32).
    """

    def preprocess(self, images: Any, *, return_tensors: str | None = None, input_data_format: str | None = None,
                   device: str | torch.device | None = None, **overrides: Any) -> BatchFeature:
        """Process one image, a list of images (one sample) or a list of lists (one per sample).

        `device`: where the work happens and the tensors end up; by default the device of the first tensor
        input, else CPU. `return_tensors`: "pt", "np" or None (torch tensors).
        """
        opts = self._options(overrides)
        if opts["resample"] not in _TORCH_MODES:
            raise ValueError(f"resample={opts['resample']} is not available on tensors; use 0 (NEAREST), "
                             f"2 (BILINEAR) or 3 (BICUBIC), or MllamaImageProcessorPil")
        samples = nest_images(images)
        if device is None:
            device = next((item.device for sample in samples for item in sample
                           if isinstance(item, torch.Tensor)), torch.device("cpu"))
        device = torch.device(device)
        # Every image fitted to its canvas, in uint8; then written, tile by tile, straight into pixel_values and
        # normalized there in place: no padded canvas, tile stack or float temporaries per image.
        resized, ratios, num_tiles = self._batch(
            samples, opts, lambda item, position: self._encode(item, position, opts, input_data_format, device))
        tile = opts["size"]["height"]
        max_images = max(len(sample) for sample in samples)
        pixel_values = torch.empty((len(samples), max_images, opts["max_image_tiles"], 3, tile, tile),
                                   dtype=torch.float32, device=device)
        for i, (sample_images, sample_ratios) in enumerate(zip(resized, ratios)):
            for j, (image, (rows, cols)) in enumerate(zip(sample_images, sample_ratios)):
                tiles = pixel_values[i, j, : rows * cols]
                _fill_tiles(tiles, image, cols)
                self._rescale_and_normalize_(tiles, opts)
                pixel_values[i, j, rows * cols:].zero_()  # padding tiles
            pixel_values[i, len(sample_images):].zero_()  # padding images
        ids, mask = build_aspect_ratio_outputs(ratios, opts["max_image_tiles"])
        data = {"pixel_values": pixel_values, "aspect_ratio_ids": torch.from_numpy(ids).to(device),
                "aspect_ratio_mask": torch.from_numpy(mask).to(device), "num_tiles": num_tiles}
        return BatchFeature(data, tensor_type=return_tensors, skip=("num_tiles",))

    def _to_rgb(self, item: Any, position: str, opts: dict, input_data_format: str | None,
                device: torch.device) -> torch.Tensor:
        if isinstance(item, PIL.Image.Image):  # only with do_convert_rgb=False: _encode converts the others
            item, input_data_format = np.array(item), "channels_last"
        if isinstance(item, np.ndarray):
            # numpy dtypes torch lacks (big-endian, uint16 ...) are handled by the numpy conversion
            item = torch.from_numpy(array_to_uint8_hwc(item, position, input_data_format))
            item, input_data_format = item.permute(2, 0, 1), "channels_first"
        image = tensor_to_uint8_chw(item.to(device), position, input_data_format)
        channels = image.shape[0]
        if channels == 3:
            return image
        if not opts["do_convert_rgb"] or channels not in (1, 4):
            raise _channel_error(position, channels, opts["do_convert_rgb"])
        if channels == 1:
            return image.expand(3, -1, -1)
        # torchvision's blend: float32 in [0, 1], then back to uint8 by truncating x * 255.999
        pixels = image.to(torch.float32).mul_(1.0 / 255)
        alpha = pixels[3:]
        return (pixels[:3] * alpha + (1 - alpha)).mul(255.999).to(torch.uint8)

    def _encode(self, item: Any, position: str, opts: dict, input_data_format: str | None, device: torch.device
                ) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (the [3, h, w] uint8 image resized to fit its canvas, any strides; (rows, cols))."""
        tile = opts["size"]["height"]
        mode = _TORCH_MODES[opts["resample"]]
        if isinstance(item, PIL.Image.Image) and opts["do_convert_rgb"]:
            # The common case (decoded files): ask PIL for the layout the next step reads fastest.
            rgb = pil_to_rgb_image(item, position)
            width, height = rgb.size
            (rows, cols), new_size = tile_arrangement(height, width, opts["max_image_tiles"], tile)
            if new_size == (height, width):
                image = pil_rgb_planes(rgb).to(device)  # tiles are cut from CHW planes
            else:
                image = torch.from_numpy(np.array(rgb)).to(device).permute(2, 0, 1)  # HWC, as the resize reads
        else:
            image = self._to_rgb(item, position, opts, input_data_format, device)  # [3, H, W] uint8
            (rows, cols), new_size = tile_arrangement(*image.shape[-2:], opts["max_image_tiles"], tile)
        if new_size != tuple(image.shape[-2:]):
            if not (image.device.type == "cpu" and mode != "nearest" and _native_resize(image.device, mode)):
                # torch's uint8 antialias kernels on CPU give the same values for any memory layout (channels
                # last is what they work in); every other kernel gets the contiguous CHW image it always got.
                image = image.contiguous()
            image = resize_uint8(image, *new_size, mode)
        elif image.stride(-1) != 1:
            image = image.contiguous()  # one strided copy in uint8, then the float conversion runs vectorized
        return image, (rows, cols)

    @staticmethod
    def _rescale_and_normalize_(tiles: torch.Tensor, opts: dict) -> None:
        """In place on float32 tiles holding 0..255: the same float32 operations as transformers' tensor backend."""
        mean, std = opts["image_mean"], opts["image_std"]
        if opts["do_normalize"]:
            mean = torch.tensor(mean, dtype=torch.float32, device=tiles.device)
            std = torch.tensor(std, dtype=torch.float32, device=tiles.device)
            if opts["do_rescale"]:
                # folding 1/rescale_factor into mean and std (float32) is what transformers' tensor backend does
                mean, std = mean * (1.0 / opts["rescale_factor"]), std * (1.0 / opts["rescale_factor"])
            tiles.sub_(mean[:, None, None]).div_(std[:, None, None])
        elif opts["do_rescale"]:
            tiles.mul_(opts["rescale_factor"])
