"""Finding checkpoints (local folder or Hub), mapping their tensor names, streaming them in, and saving.

Names: every key is first brought to one canonical form, the names of transformers 5's in-memory
`MllamaForConditionalGeneration` (`model.vision_model.`, `model.language_model.`, `model.multi_modal_projector.`,
`lm_head.`); each model class then says which canonical prefixes it holds and under which of its own names.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .quantization import FP8, quantize_rows

CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model")
_TEXT_ROOTS = ("embed_tokens.", "layers.", "norm.", "rotary_emb.")
_VISION_ROOTS = ("patch_embedding.", "class_embedding", "gated_positional_embedding.",
                 "pre_tile_positional_embedding.", "post_tile_positional_embedding.", "layernorm_pre.",
                 "layernorm_post.", "transformer.", "global_transformer.")


class CheckpointError(OSError):
    """A checkpoint that cannot be found, read or matched to the model; the message is one line for users."""


# ---------------------------------------------------------------------------------------------------------------
# Locating files


def _hub_errors():
    from huggingface_hub import errors

    return errors


def resolve_folder(name_or_path: str | os.PathLike, *, token: str | bool | None = None, revision: str | None = None,
                   cache_dir: str | None = None, local_files_only: bool = False,
                   allow_patterns: Iterable[str] = CHECKPOINT_FILES, subfolder: str = "", **unused) -> Path:
    """A local folder as is, or a Hub repo id downloaded (or found in the cache) as a snapshot folder; with
    `subfolder`, that folder inside it (only its files are downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _inside(path, subfolder, name_or_path)
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name!r} is neither a checkpoint folder nor a Hub repo id like "
                              f"'meta-llama/Llama-3.2-11B-Vision-Instruct'")
    from huggingface_hub import snapshot_download

    errors = _hub_errors()
    try:
        patterns = [f"{subfolder.strip('/')}/{p}" for p in allow_patterns] if subfolder else list(allow_patterns)
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only, allow_patterns=patterns)
    except errors.GatedRepoError:
        raise CheckpointError(f"{name} is gated: accept its license on huggingface.co and set HF_TOKEN "
                              f"(or run `huggingface-cli login`)") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{name} was not found on the Hub (or is private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"revision {revision!r} of {name} does not exist") from None
    except errors.LocalEntryNotFoundError:
        raise CheckpointError(f"{name} is not in the local cache and the Hub cannot be reached "
                              f"(offline or HF_HUB_OFFLINE=1): download it first or pass a local folder") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not download {name}: {first}") from None
    return _inside(Path(folder), subfolder, name_or_path)


def _inside(folder: Path, subfolder: str, name_or_path: str | os.PathLike) -> Path:
    if not subfolder:
        return folder
    inner = folder / subfolder
    if not inner.is_dir():
        raise CheckpointError(f"{name_or_path} has no subfolder {subfolder!r}")
    return inner


def resolve_file(name_or_path: str | os.PathLike, filename: str, **kwargs) -> Path:
    folder = resolve_folder(name_or_path, allow_patterns=(filename,), **kwargs)
    path = folder / filename
    if not path.is_file():
        where = f"{name_or_path}/{kwargs['subfolder']}" if kwargs.get("subfolder") else name_or_path
        raise CheckpointError(f"{where} has no {filename}")
    return path


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when it is sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks the shards {missing[:3]} listed in model.safetensors.index.json")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    raise CheckpointError(f"{folder} has no safetensors weights (model.safetensors or an index); "
                          f"Meta's consolidated.pth checkpoints must be converted first")


# ---------------------------------------------------------------------------------------------------------------
# Names


def canonical_key(key: str) -> str:
    """Any supported checkpoint name -> transformers 5 in-memory name of MllamaForConditionalGeneration."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_model.", "model.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("language_model."):  # a saved MllamaModel
        return "model." + key
    if key.startswith("model.") and key[6:].startswith(_TEXT_ROOTS):  # a saved MllamaForCausalLM
        return "model.language_model." + key[6:]
    if key.startswith(_TEXT_ROOTS):  # a saved MllamaTextModel
        return "model.language_model." + key
    if key.startswith(_VISION_ROOTS):  # a saved MllamaVisionModel
        return "model.vision_model." + key
    return key


def published_key(canonical: str) -> str:
    """Canonical name -> the layout of the published Hub checkpoints."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_model.", "vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if canonical.startswith(new):
            return old + canonical[len(new):]
    return canonical


# Per model class: (canonical prefix, own prefix) pairs; canonical keys outside them belong to other parts of a
# full Mllama checkpoint and are skipped (e.g. the vision tower when loading MllamaForCausalLM).
CLASS_PREFIXES = {
    "MllamaForConditionalGeneration": (("model.", "model."), ("lm_head.", "lm_head.")),
    "MllamaModel": (("model.", ""),),
    "MllamaForCausalLM": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "MllamaTextModel": (("model.language_model.", ""),),
    "MllamaVisionModel": (("model.vision_model.", ""),),
}
_KNOWN_PREFIXES = ("model.vision_model.", "model.language_model.", "model.multi_modal_projector.", "lm_head.")


def own_key(class_name: str, canonical: str) -> str | None:
    for src, dst in CLASS_PREFIXES[class_name]:
        if canonical.startswith(src):
            return dst + canonical[len(src):]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading


class _Progress:
    """A one-line bar on a terminal; silent when stderr is not a tty."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.enabled = total > 1 and sys.stderr.isatty()
        self.start = time.monotonic()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            elapsed = time.monotonic() - self.start
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"shards {elapsed:.0f}s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


class StateDictSource:
    """An in-memory state dict read the way a safetensors file is (keys() and get_tensor)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> Iterable[str]:
        return self.state.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


class RandomSource:
    """Random weights at a model's shapes, read the way a safetensors file is (load_format="dummy": speed and
    memory measured without a checkpoint; the answers are noise). Each tensor is made on `device` when it is
    read, so loading with quantize quantizes it there at once and the unquantized model never exists. Values:
    normal(0, 0.02), norms' weights 1 and biases 0, the tanh gates 0.7 (non-zero: cross-attention counts).
    An FP8 layer gets a weight to quantize and no stored scale (see load_weights' quantize)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None, seed: int = 0):
        self.shapes = {}
        for name, tensor in model.state_dict().items():
            if _stored_dtype(model, name) and not name.endswith(".weight"):
                continue  # an FP8 layer's scale: made by quantizing its weight
            self.shapes[name] = (tensor.shape, tensor.is_floating_point())
        self.device, self.dtype = device, dtype or torch.bfloat16
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def keys(self) -> Iterable[str]:
        return self.shapes.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        shape, floating = self.shapes[key]
        dtype = self.dtype
        if not floating:
            return torch.zeros(shape, dtype=torch.long, device=self.device)
        leaf = key.rsplit(".", 1)[-1]
        if "gate" in leaf:
            return torch.full(shape, 0.7, dtype=dtype, device=self.device)
        if "norm" in key:
            return torch.full(shape, 1.0 if leaf == "weight" else 0.0, dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, device=self.device).normal_(0, 0.02, generator=self.generator)


def open_files(files: list[Path], device: torch.device) -> Iterable[tuple[str, object]]:
    """(file name, open safetensors handle) for each file in turn, memory-mapped, with a progress bar."""
    from safetensors import safe_open

    progress = _Progress(len(files), "Loading weights")
    open_device = str(device) if device.type in ("cuda", "cpu") else "cpu"
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device=open_device)
        except Exception as e:  # safetensors' own error type is not importable in every version
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        with handle:
            yield file.name, handle
        progress.step()


def _stored_dtype(model: nn.Module, name: str) -> bool:
    """Whether tensor `name` keeps the dtype it is stored in (its module lists it in `stored_dtypes`)."""
    module_name, _, attr = name.rpartition(".")
    return attr in getattr(model.get_submodule(module_name) if module_name else model, "stored_dtypes", ())


def _check_fp8(key: str, source_name: str, tensor: torch.Tensor, name: str) -> None:
    if name.endswith(".weight") and tensor.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"tensor {key} in {source_name} is {str(tensor.dtype).removeprefix('torch.')}: the "
                              f"quantization_config makes {name} an FP8 layer, whose weight must be F8_E4M3")
    if name.endswith(".weight_scale") and (not tensor.is_floating_point() or tensor.element_size() < 2):
        raise CheckpointError(f"tensor {key} in {source_name} is {str(tensor.dtype).removeprefix('torch.')}: an "
                              f"FP8 layer's weight_scale must be float32, bfloat16 or float16")
    if name.endswith(".weight_scale") and not bool((tensor.float() > 0).all() and tensor.float().isfinite().all()):
        raise CheckpointError(f"tensor {key} in {source_name} holds scales that are not positive and finite: an FP8 "
                              f"layer's weight_scale multiplies its output channels")


def load_weights(model: nn.Module, sources: Iterable[tuple[str, object]], device: torch.device,
                 dtype: torch.dtype | None, strict: bool = True, ignore_mismatched_sizes: bool = False,
                 quantize: bool = False) -> dict:
    """Streams tensors from `sources` ((name, handle) pairs: open_files' memory-mapped safetensors, or a
    StateDictSource) into `model` (built on the meta device), one at a time, straight to `device` and `dtype`:
    host memory never holds more than one tensor beyond the result.

    Returns transformers' loading info: {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}.
    A missing tensor or a shape mismatch is an error (a model with random parts is not what was asked for),
    unless `strict=False` (missing tensors are then reported, left for the caller to initialise, allocated on
    `device`) or `ignore_mismatched_sizes` (such tensors are reported as (name, stored shape, model shape) and
    left like missing ones). A tensor the model has no place for is only reported, with a warning unless it
    belongs to another part of a Mllama checkpoint (the vision tower when loading MllamaForCausalLM), as
    transformers loads such checkpoints. With `quantize`, an FP8 layer's weight stored in another dtype is
    quantized on `device` as it is read (its weight_scale then comes from there, not from the checkpoint).
    """
    class_name = type(model).__name__
    expected = {name: p.shape for name, p in model.state_dict().items()}
    seen: set[str] = set()
    unexpected: list[str] = []  # named like the model's own tensors where the prefix maps, else as stored
    other_parts: list[str] = []
    mismatched: set[tuple[str, torch.Size, torch.Size]] = set()
    for source_name, handle in sources:
        for key in handle.keys():
            canonical = canonical_key(key)
            name = own_key(class_name, canonical)
            if name is None:
                (other_parts if canonical.startswith(_KNOWN_PREFIXES) else unexpected).append(key)
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            if name not in expected:
                unexpected.append(name)
                continue
            try:
                tensor = handle.get_tensor(key)
            except Exception as e:  # safetensors raises its own error types for damaged data
                raise CheckpointError(f"tensor {key} in {source_name} cannot be read: {e}") from None
            if tensor.shape != expected[name]:
                if ignore_mismatched_sizes:
                    mismatched.add((name, tensor.shape, expected[name]))
                    continue
                raise CheckpointError(f"tensor {key} in {source_name} has shape {list(tensor.shape)}, the model "
                                      f"expects {list(expected[name])} for {name} (config does not match "
                                      f"the weights? ignore_mismatched_sizes=True loads the rest)")
            if quantize and _stored_dtype(model, name) and name.endswith(".weight") and tensor.dtype != FP8:
                weight, scale = quantize_rows(tensor.to(device))
                _set_tensor(model, name, weight)
                _set_tensor(model, name + "_scale", scale)
                seen.update((name, name + "_scale"))
                continue
            if _stored_dtype(model, name):  # an FP8 layer's weight and scale: as stored, never cast
                _check_fp8(key, source_name, tensor, name)
                target_dtype = tensor.dtype
            else:
                target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, name, tensor.to(device=device, dtype=target_dtype))
            seen.add(name)
    mismatched_names = {m[0] for m in mismatched}
    absent = sorted(set(expected) - seen - {n for n in expected if n.endswith("rotary_emb.inv_freq")})
    missing = [n for n in absent if n not in mismatched_names]
    if missing and strict:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors of {class_name}, e.g. {missing[:3]} "
                              f"(output_loading_info=True loads it with those initialised afresh, and lists them)")
    placeholders = model.state_dict(keep_vars=True)
    for name in absent:
        meta = placeholders[name]
        kept_dtype = dtype if dtype is not None and meta.is_floating_point() and not _stored_dtype(model, name) \
            else meta.dtype
        _set_tensor(model, name, torch.empty(meta.shape, device=device, dtype=kept_dtype))
    if unexpected:
        warnings.warn(f"the checkpoint has {len(unexpected)} tensors that {class_name} does not have, ignored: "
                      f"{sorted(unexpected)[:3]}", stacklevel=3)
    if mismatched:
        warnings.warn(f"{len(mismatched)} tensors of the checkpoint do not fit {class_name} and were initialised "
                      f"afresh (ignore_mismatched_sizes): "
                      + "; ".join(f"{n}: stored {list(a)}, model {list(b)}" for n, a, b in sorted(mismatched)[:3]),
                      stacklevel=3)
    return {"missing_keys": set(missing), "unexpected_keys": set(unexpected) | set(other_parts),
            "mismatched_keys": mismatched, "error_msgs": []}


# ---------------------------------------------------------------------------------------------------------------
# Saving

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(number * scale)


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> None:
    """Writes `state` (already in checkpoint names) as safetensors shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().nbytes() != nbytes:  # a view into a fused matrix: safetensors wants its own
            tensor = tensor.clone()
        shards[-1][name] = tensor
        size += nbytes
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
