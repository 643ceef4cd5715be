"""Our torch image processor against transformers' torchvision `MllamaImageProcessor`, on CPU and CUDA.

    python bench/compare_image_processor_torchvision.py [--n 300] [--devices cpu,cuda] [--seed 0]

Needs torch, torchvision and transformers (torchvision is never a dependency of mllama or its tests, so this runs
on a separate machine). For every generated image both processors run with the real checkpoint settings (CLIP
mean/std; most images at a small tile size to keep it fast, every 20th at 560); the script prints max and mean
|diff| of pixel_values, how many are exactly equal, whether aspect_ratio_ids / aspect_ratio_mask / num_tiles are
equal everywhere, and writes the same as JSON to bench/results/.

Importing this file is cheap and safe (numpy and PIL only): the tests use `generate_image` / `generate_cases`, so
the bench and the CI comparison see the same images.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

MODES = ("RGB", "RGBA", "LA", "P", "P+transparency", "L", "I;16", "I", "F", "CMYK", "1")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Sizes that stress canvas selection: 1 pixel, extreme aspect ratios, camera photos, around tile multiples.
SPECIAL_SIZES = [(1, 1), (1, 2), (2, 1), (1, 2000), (2000, 1), (3000, 4000), (4000, 3000), (7, 1500), (1500, 7)]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """uint8 [H, W, C]: a bilinear blow-up of a few random colours plus Gaussian noise (edges and flat areas)."""
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), channels), dtype=np.uint8)
    layers = [np.asarray(PIL.Image.fromarray(grid[..., c]).resize((width, height), PIL.Image.Resampling.BILINEAR),
                         dtype=np.float32) for c in range(channels)]
    noise = rng.standard_normal(size=(height, width, channels), dtype=np.float32) * float(rng.uniform(2, 40))
    return np.clip(np.stack(layers, axis=-1) + noise, 0, 255).astype(np.uint8)


def generate_image(rng: np.random.Generator, height: int, width: int, mode: str) -> PIL.Image.Image:
    """A seeded test image of the given size in one of MODES."""
    if mode in ("RGB", "RGBA", "CMYK"):
        image = PIL.Image.fromarray(_smooth_noise(rng, height, width, 4 if mode == "RGBA" else 3))
        return image.convert("CMYK") if mode == "CMYK" else image
    gray = _smooth_noise(rng, height, width, 2 if mode == "LA" else 1)
    if mode in ("L", "LA", "1"):
        image = PIL.Image.fromarray(gray if mode == "LA" else gray[..., 0])
        return image.convert("1") if mode == "1" else image
    gray = gray[..., 0]
    if mode.startswith("P"):
        colors = int(rng.integers(2, 256))
        image = PIL.Image.fromarray((gray.astype(np.uint16) * colors // 256).astype(np.uint8))
        image.putpalette(rng.integers(0, 256, size=3 * colors, dtype=np.uint8).tobytes())  # L becomes P
        if mode == "P+transparency":
            image.info["transparency"] = int(rng.integers(0, 2))
        return image
    if mode == "I;16":
        return PIL.Image.fromarray(gray.astype(np.uint16) * 2)  # uint16 -> mode I;16; RGB conversion clips at 255
    if mode == "I":
        return PIL.Image.fromarray(gray.astype(np.int32) * 3 - 100)  # int32 -> mode I, values below 0 and above 255
    if mode == "F":
        return PIL.Image.fromarray(gray.astype(np.float32) * 1.3 - 20.5)  # float32 -> mode F
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _random_size(rng: np.random.Generator, tile: int) -> tuple[int, int]:
    if rng.random() < 0.3:  # within a pixel or two of a tile multiple, where canvas choices flip
        return tuple(int(tile * rng.integers(1, 5) + rng.integers(-2, 3)) or 1 for _ in range(2))
    # log-uniform from 1 pixel to 12 tiles (small tiles) or 3 tiles (560) per side, to bound the work
    longest = 12 * tile if tile < 200 else 3 * tile
    return tuple(max(1, int(np.exp(rng.uniform(0, np.log(longest))))) for _ in range(2))


def generate_cases(n: int = 300, seed: int = 0, tile: int = 56, big_tile: int = 560, big_every: int = 20
                   ) -> list[tuple[str, PIL.Image.Image, int]]:
    """n (name, image, tile size) cases: every mode, SPECIAL_SIZES first, every `big_every`-th at `big_tile`."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        mode = MODES[k % len(MODES)]
        case_tile = big_tile if big_every and k % big_every == big_every - 1 else tile
        if k < len(SPECIAL_SIZES):
            height, width = SPECIAL_SIZES[k]
        else:
            height, width = _random_size(rng, case_tile)
        cases.append((f"{k}:{mode}:{height}x{width}@{case_tile}", generate_image(rng, height, width, mode), case_tile))
    return cases


def _compare(ours, theirs) -> dict:
    ours_pv = ours["pixel_values"].float().cpu()
    theirs_pv = theirs["pixel_values"].float().cpu()
    diff = (ours_pv - theirs_pv).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "exact": bool(diff.max() == 0),
        "ids_equal": bool((ours["aspect_ratio_ids"].cpu() == theirs["aspect_ratio_ids"].cpu()).all()),
        "mask_equal": bool((ours["aspect_ratio_mask"].cpu() == theirs["aspect_ratio_mask"].cpu()).all()),
        "num_tiles_equal": ours["num_tiles"] == theirs["num_tiles"],
        "ours_device": str(ours["pixel_values"].device),
    }


def _float_kernel_one_pixel_wide_error(device: str) -> float:
    """Max error of torch's float antialias resize to a one-pixel-wide output against the same resize done
    transposed: nonzero means the kernel bug that mllama works around is present on this device."""
    import torch
    import torch.nn.functional as F

    column = torch.arange(34.0, device=device).view(1, 1, 34, 1) * 7
    direct = F.interpolate(column, size=(56, 1), mode="bilinear", antialias=True, align_corners=False)
    transposed = F.interpolate(column.transpose(-1, -2), size=(1, 56), mode="bilinear", antialias=True,
                               align_corners=False).transpose(-1, -2)
    return float((direct - transposed).abs().max())


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {"images": 0}
    return {
        "images": len(rows),
        "max_abs": max(r["max_abs"] for r in rows),
        "mean_abs": float(np.mean([r["mean_abs"] for r in rows])),
        "exact_pixel_values": sum(r["exact"] for r in rows),
        "ids_mask_num_tiles_equal": all(r["ids_equal"] and r["mask_equal"] and r["num_tiles_equal"] for r in rows),
    }


def _run_device(device: str, cases, make_ours, make_theirs) -> dict:
    from mllama.processing.image import tile_arrangement

    rows, started = [], time.perf_counter()
    for name, image, tile in cases:
        ours = make_ours(tile)(image, return_tensors="pt", device=device)
        theirs = make_theirs(tile)(image, return_tensors="pt", device=device)
        _, (new_height, new_width) = tile_arrangement(image.height, image.width, 4, tile)
        # where torchvision takes torch's float kernel, one-pixel-wide outputs hit its bug; mllama avoids it
        one_wide = new_width == 1 and new_height != image.height
        rows.append({"case": name, "one_pixel_wide_resize": one_wide, **_compare(ours, theirs)})
    return {
        "device": device,
        **_summary(rows),
        "excluding_one_pixel_wide_resizes": _summary([r for r in rows if not r["one_pixel_wide_resize"]]),
        "one_pixel_wide_resizes": _summary([r for r in rows if r["one_pixel_wide_resize"]]),
        "float_kernel_one_pixel_wide_error": _float_kernel_one_pixel_wide_error(device),
        "seconds": time.perf_counter() - started,
        "worst": sorted(rows, key=lambda r: -r["max_abs"])[:8],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    import torch
    import torchvision  # noqa: F401  (the oracle needs it; fail early with a clear import error)
    import transformers
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor as TheirProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from mllama.processing.image import MllamaImageProcessor as OurProcessor

    def settings(tile: int) -> dict:
        return {"size": {"height": tile, "width": tile}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}

    ours_by_tile, theirs_by_tile = {}, {}
    make_ours = lambda tile: ours_by_tile.setdefault(tile, OurProcessor(**settings(tile)))  # noqa: E731
    make_theirs = lambda tile: theirs_by_tile.setdefault(tile, TheirProcessor(**settings(tile)))  # noqa: E731

    cases = generate_cases(args.n, seed=args.seed)
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    report = {
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "transformers": transformers.__version__, "pillow": PIL.__version__},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "seed": args.seed,
        "results": [_run_device(device, cases, make_ours, make_theirs) for device in devices],
    }
    for result in report["results"]:
        parts = [("all", result), ("excluding 1-px-wide resizes", result["excluding_one_pixel_wide_resizes"]),
                 ("1-px-wide resizes", result["one_pixel_wide_resizes"])]
        for label, part in parts:
            if part["images"]:
                print(f"{result['device']} [{label}]: {part['images']} images, max |diff| {part['max_abs']:.3g}, "
                      f"mean |diff| {part['mean_abs']:.3g}, exactly equal pixel_values {part['exact_pixel_values']}/"
                      f"{part['images']}, ids/mask/num_tiles equal: {part['ids_mask_num_tiles_equal']}")
        print(f"{result['device']}: torch float-kernel 1-px-wide error "
              f"{result['float_kernel_one_pixel_wide_error']:.3g}, {result['seconds']:.1f}s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y-%m-%d')}-image-processor-torchvision.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    ok = all(r["ids_mask_num_tiles_equal"] for r in report["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
