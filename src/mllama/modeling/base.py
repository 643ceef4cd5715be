"""Loading, saving and initialisation shared by the five model classes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import weights
from ..config import ATTN_IMPLEMENTATIONS, MllamaConfig, MllamaTextConfig
from ..quantization import DEFAULT_SCHEME, check_quantize, fp8_scheme, use_fp8


def _resolve_dtype(dtype: Any, config: Any) -> torch.dtype | None:
    """None = keep the stored dtype; "auto" = the dtype the config names (else the stored one)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        named = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        return getattr(torch, named) if isinstance(named, str) and hasattr(torch, named) else None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"dtype must be a torch.dtype, a name like 'bfloat16', or 'auto', got {dtype!r}")


def _resolve_device(device: Any, device_map: Any) -> torch.device:
    choice = device if device is not None else device_map
    if isinstance(choice, dict):
        targets = set(choice.values())
        if len(targets) != 1:
            raise ValueError("device_map dicts that spread the model over several devices are not supported: "
                             "give one device")
        choice = targets.pop()
    if choice is None:
        return torch.device("cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(choice, int):
        return torch.device("cuda", choice)
    try:
        dev = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {choice!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return dev


# What from_pretrained passes on to the Hub download; low_cpu_mem_usage is what loading always does (one tensor at
# a time, straight to its device), so either value is honoured.
LOAD_FORMATS = ("safetensors", "dummy")
_HUB_OPTIONS = ("token", "use_auth_token", "revision", "cache_dir", "local_files_only", "subfolder")
_QUANTIZATION = ("load_in_4bit", "load_in_8bit", "quantization_config")


def _refuse_unhonoured(options: dict[str, Any]) -> None:
    """A keyword that loading would ignore is an error: a model asked for in 4 bits must not come back in 16."""
    quantized = [k for k in _QUANTIZATION if options.get(k) not in (None, False)]
    if quantized:
        raise ValueError(f"from_pretrained({quantized[0]}=...) is not supported: mllama quantizes to FP8 only, "
                         f"with quantize='fp8' (or load in dtype=torch.bfloat16 or torch.float16)")
    unknown = sorted(set(options) - set(_HUB_OPTIONS) - set(_QUANTIZATION) - {"low_cpu_mem_usage"})
    if unknown:
        raise ValueError(f"from_pretrained got unsupported arguments {unknown}: it takes config, dtype (or "
                         f"torch_dtype), device_map (or device), compat, attn_implementation, output_loading_info "
                         f"and the Hub options "
                         f"{', '.join(_HUB_OPTIONS)}")


def _stored_quantization(config: Any, folder: Path | None) -> dict | None:
    """The quantization_config a checkpoint was stored with (config.json's top level, also when only its text
    model is loaded), or None."""
    quantization = getattr(config, "quantization_config", None)
    stored = None if folder is None else folder / "config.json"
    if quantization is None and stored is not None and stored.is_file():
        quantization = json.loads(stored.read_text()).get("quantization_config")
    return quantization


def module_names(class_name: str, name: str) -> tuple[str, ...]:
    """A module's names: its own in `class_name`, and in both checkpoint layouts (what an ignore list may use)."""
    dotted = name + "."
    for canonical_prefix, own_prefix in weights.CLASS_PREFIXES[class_name]:
        if dotted.startswith(own_prefix):
            canonical = canonical_prefix + dotted[len(own_prefix):]
            return name, canonical.rstrip("."), weights.published_key(canonical).rstrip(".")
    return (name,)


def _check_attn_implementation(requested: str | dict | None) -> None:
    """A name (or a dict of names by sub-config, "" for the model itself) that mllama implements, or None."""
    for name in requested.values() if isinstance(requested, dict) else (requested,):
        if name is not None and name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f'Specified `attn_implementation="{name}"` is not supported: mllama implements "sdpa" '
                             f'(torch.nn.functional.scaled_dot_product_attention, the default; it runs flash '
                             f'kernels where the inputs allow) and "eager" (the softmax written out)')


def _generation_defaults(config: Any) -> dict:
    """What transformers writes as generation_config.json for a model that has none: the text decoder's token ids
    and use_cache (a vision encoder alone generates nothing and gets no file)."""
    text = config.get_text_config(decoder=True)
    if not isinstance(text, MllamaTextConfig):
        return {}
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, key, None) is not None:
            out[key] = getattr(text, key)
    out["use_cache"] = text.use_cache
    return out


def _init_parameter(name: str, p: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name or "layernorm" in name:
        p.fill_(1.0 if leaf == "weight" else 0.0)
    elif leaf == "bias" or "gate" in leaf:
        p.zero_()
    else:
        p.copy_(torch.randn(p.shape, generator=gen) * std)


_INITIALIZED = "_mllama_initialized"  # set on a parameter that holds its initial, loaded or resized values


def mark_initialized(tensor: torch.Tensor) -> torch.Tensor:
    setattr(tensor, _INITIALIZED, True)
    return tensor


def is_initialized(tensor: torch.Tensor) -> bool:
    return getattr(tensor, _INITIALIZED, False)


def resized_rows(requested: int | None, current: int, pad_to_multiple_of: int | None) -> int:
    """The row count resize_token_embeddings gives a table of `current` rows: `requested` (or `current`),
    rounded up to a multiple of `pad_to_multiple_of`."""
    rows = current if requested is None else requested
    if pad_to_multiple_of is None:
        return rows
    if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1:
        # The first sentence is the one transformers raises (its tests match it, typo included).
        raise ValueError(f"Asking to pad the embedding matrix to a multiple of `{pad_to_multiple_of}`, which is not "
                         f"and integer. Please make sure to pass an integer: pad_to_multiple_of must be a positive "
                         f"int or None")
    return -(-rows // pad_to_multiple_of) * pad_to_multiple_of


def copy_resized(old: torch.Tensor, new: torch.Tensor, mean_resizing: bool, std: float) -> None:
    """Fills the resized table `new` from `old`: the common rows copied; added rows the mean of the old ones
    (transformers samples them around that mean with 1e-9 of the covariance), or normal(0, std) without
    mean_resizing. Marks `new` initialised (post_init leaves it alone)."""
    keep = min(old.shape[0], new.shape[0])
    with torch.no_grad():
        new[:keep] = old[:keep]
        if new.shape[0] > keep:
            if mean_resizing:
                new[keep:] = old.float().mean(dim=0).to(new.dtype)
            else:
                new[keep:] = torch.randn_like(new[keep:]) * std
    new.requires_grad_(old.requires_grad)
    mark_initialized(new)


class GenerationConfig(dict):
    """generation_config.json as a dict with attribute access (defaults for `generate`): setting an attribute
    sets the key that generate reads, as `model.generation_config.max_new_tokens = 5` does in transformers."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self.pop(name, None)


class MllamaPreTrainedModel(nn.Module):
    """Loading, saving and initialisation shared by the five model classes."""

    config_class: type = MllamaConfig
    published_layout = False  # save with the Hub's `language_model.model.` ... names
    # The attribute that holds the model body (transformers' values per class; `base_model` is this model itself
    # where no such attribute exists, e.g. MllamaForCausalLM's "language_model").
    base_model_prefix = "model"
    _keys_to_ignore_on_load_missing = None  # every tensor is expected in a checkpoint
    # Attention implementations (see set_attn_implementation): sdpa and eager; no flash-attention or flex kernels
    # of their own, and not the attention-interface backend that vLLM and TGI plug their kernels into.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig()
        # The config's choice, resolved: unset means sdpa. Only this config's: a composite model's parts resolve
        # their own sub-configs.
        config._attn_implementation_internal = config._attn_implementation or "sdpa"

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # the attention layers read the implementation from their config at each call

    def set_attn_implementation(self, attn_implementation: str | dict) -> None:
        """Switches the attention of this model and its parts to "eager" or "sdpa" from the next call on. A dict
        sets them one by one: "" for the model's own config, "text_config" and "vision_config" for the parts of a
        composite model; a part left out keeps its implementation."""
        _check_attn_implementation(attn_implementation)
        self.config._attn_implementation = attn_implementation

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: its first parameter's, FP8 layers' stored tensors aside."""
        for module in self.modules():
            kept = getattr(module, "stored_dtypes", ())
            for name, p in module.named_parameters(recurse=False):
                if name not in kept:
                    return p.dtype
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------------------------
    # Training hooks that peft, TRL and transformers' Trainer call

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"  # transformers says so for all five classes, the vision model's included

    @classmethod
    def can_generate(cls) -> bool:
        return callable(getattr(cls, "generate", None))

    # Adapters (transformers' PeftAdapterMixin names; mllama.adapters, through peft)

    def load_adapter(self, path, adapter_name: str = "default", is_trainable: bool = False, **hub_kwargs) -> None:
        from ..adapters import load_adapter
        load_adapter(self, path, adapter_name, is_trainable, **hub_kwargs)

    def set_adapter(self, adapter_name: str) -> None:
        from ..adapters import set_adapter
        set_adapter(self, adapter_name)

    def active_adapters(self) -> list[str]:
        from ..adapters import active_adapters
        return active_adapters(self)

    def enable_adapters(self) -> None:
        from ..adapters import enable_adapters
        enable_adapters(self, True)

    def disable_adapters(self) -> None:
        from ..adapters import enable_adapters
        enable_adapters(self, False)

    def delete_adapter(self, adapter_name: str) -> None:
        from ..adapters import delete_adapter
        delete_adapter(self, adapter_name)

    def merge_and_unload(self) -> "MllamaPreTrainedModel":
        from ..adapters import merge_and_unload
        return merge_and_unload(self)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """While training, each decoder layer and each vision encoder layer runs under torch.utils.checkpoint
        (its activations recomputed in the backward pass); `gradient_checkpointing_kwargs` go to that call
        (default use_reentrant=False). Caches are not used then."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                module.checkpoint_kwargs = kwargs
        # With use_reentrant=True a checkpointed layer passes gradients only when its input needs them.
        if self.main_input_name == "input_ids":
            self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        """The input embeddings' output requires grad, so that gradients reach checkpointed or adapted layers of a
        model whose own weights are frozen (what peft asks for): those of this model and of every model inside it
        (the text embeddings and the vision tower's patch embedding of the composite models)."""
        self.disable_input_require_grads()

        def require_grad(module, inputs, output):
            output.requires_grad_(True)

        layers = {}
        for module in self.modules():
            get = getattr(module, "get_input_embeddings", None) if isinstance(module, MllamaPreTrainedModel) else None
            embeddings = get() if get is not None else None
            if embeddings is not None:
                layers[id(embeddings)] = embeddings
        self._require_grads_hooks = [layer.register_forward_hook(require_grad) for layer in layers.values()]

    def disable_input_require_grads(self) -> None:
        for hook in getattr(self, "_require_grads_hooks", ()):
            hook.remove()
        self._require_grads_hooks = []

    def init_weights(self, std: float | None = None, seed: int | None = None) -> "MllamaPreTrainedModel":
        """Random initialisation like the trained models' recipe: normal(0, 0.02) matrices and embeddings,
        unit norms, zero biases and gates (so a fresh model ignores images until gates are set)."""
        return self._initialize(std, seed, only_new=False)

    def post_init(self) -> None:
        """The end of construction (each class's __init__ calls it): initialises the parameters that are not
        initialised yet (none on the meta device; loaded or resized ones count as initialised, so a second call
        changes nothing), and with `config.gradient_checkpointing` set enables gradient checkpointing and removes
        that attribute from the config (so that it is not saved)."""
        self._initialize(None, None, only_new=True)
        if self.supports_gradient_checkpointing and getattr(self.config, "gradient_checkpointing", False):
            self.gradient_checkpointing_enable()
            delattr(self.config, "gradient_checkpointing")

    def _initialize(self, std: float | None, seed: int | None, only_new: bool) -> "MllamaPreTrainedModel":
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = std if std is not None else getattr(self.config, "initializer_range", 0.02)
        fresh = set()
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.device.type == "meta" or (only_new and is_initialized(p)):
                    continue
                _init_parameter(name, p, std, gen)
                mark_initialized(p)
                fresh.add(id(p))
            for m in self.modules():
                if isinstance(m, nn.Embedding) and m.padding_idx is not None and id(m.weight) in fresh:
                    m.weight[m.padding_idx].zero_()
                if hasattr(m, "reset_buffers"):  # computed buffers: garbage after to_empty() of a meta-built model
                    m.reset_buffers(next(m.buffers()).device)
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def _config_from_dict(cls, data: dict) -> Any:
        config_class = cls.config_class
        if config_class is not MllamaConfig and data.get("model_type") == "mllama":
            data = data[config_class.base_config_key]
        return config_class.from_dict(data)

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None, device: Any = None,
                    attn_implementation: str | None = None, torch_dtype: torch.dtype | None = None
                    ) -> "MllamaPreTrainedModel":
        """A freshly initialised model (see init_weights) built on `device` in `dtype` (alias torch_dtype)."""
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation  # the config checks the name
        dtype = _resolve_dtype(torch_dtype if dtype is None else dtype, config)
        with torch.device(device or "cpu"):
            model = cls(config)
        return model if dtype is None else model.to(dtype)

    _from_config = from_config  # the name transformers' composite models build their parts with

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *, config: Any = None,
                        dtype: Any = "auto", torch_dtype: Any = None, device_map: Any = None, device: Any = None,
                        compat: str | None = None, attn_implementation: str | dict | None = None,
                        output_loading_info: bool = False, state_dict: dict[str, torch.Tensor] | None = None,
                        ignore_mismatched_sizes: bool = False, quantize: str | None = None,
                        load_format: str = "safetensors", **hub_kwargs: Any) -> "MllamaPreTrainedModel":
        """Loads a Hugging Face checkpoint (folder or Hub id, optionally a `subfolder` of it) in either key layout,
        streaming each tensor from the memory-mapped safetensors to `device` (or `device_map`: "auto", "cpu",
        "cuda", "cuda:N") in `dtype`. `state_dict` (names as this class's or a checkpoint's) replaces the stored
        weights; with pretrained_model_name_or_path=None it is the only source and `config` is required.
        With `output_loading_info=True` returns (model, info) like transformers: info holds "missing_keys",
        "unexpected_keys", "mismatched_keys" and "error_msgs"; tensors the checkpoint lacks are then initialised
        afresh (as init_weights does) and listed, where without it they are an error. `ignore_mismatched_sizes`:
        tensors whose stored shape differs from the model's are initialised afresh and listed, not an error.
        A compressed-tensors FP8 checkpoint loads as it is stored (mllama.quantization); `quantize="fp8"` makes
        the text model's linear layers FP8 from a bf16 checkpoint, each weight quantized on `device` as it is
        read (the whole model never exists in bf16 there). `load_format="dummy"` reads only the config and gives
        random weights at its shapes (weights.RandomSource: for measuring speed and memory; quantized likewise)."""
        name_or_path = pretrained_model_name_or_path
        if torch.empty(0).device.type == "meta":
            raise RuntimeError("You are using `from_pretrained` with a meta device context manager (or "
                               "torch.set_default_device('meta')): weights cannot be loaded onto the meta device; "
                               "build the model under it with the class itself, or load outside the context")
        _refuse_unhonoured(hub_kwargs)
        _check_attn_implementation(attn_implementation)
        if name_or_path is None and (state_dict is None or config is None):
            raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=")
        folder = None if name_or_path is None else cls._checkpoint_folder(name_or_path, hub_kwargs)
        if config is None:
            config = cls._read_config(folder, name_or_path)
        check_quantize(quantize)
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={load_format!r} is not supported: use 'safetensors' (the checkpoint's "
                             f"weights) or 'dummy' (random weights at the config's shapes, for benchmarks)")
        if load_format == "dummy" and state_dict is not None:
            raise ValueError("load_format='dummy' makes random weights: it takes no state_dict")
        quantization = _stored_quantization(config, folder)
        scheme = fp8_scheme(quantization) if quantization is not None else None  # (refuses any other scheme)
        if scheme is None and quantize == "fp8":
            scheme, quantization = DEFAULT_SCHEME, DEFAULT_SCHEME.config()
        if compat is not None:
            config.compat = compat
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        target_dtype = _resolve_dtype(torch_dtype if torch_dtype is not None else dtype, config)
        target = _resolve_device(device, device_map)
        with torch.device("meta"):
            model = cls(config)
        if scheme is not None:  # the Linear layers stored in FP8 become Fp8Linear before their weights load
            use_fp8(model, scheme, lambda name: module_names(cls.__name__, name))
            model.config.quantization_config = quantization  # (saved again as it came)
        if load_format == "dummy":
            sources = [("random weights", weights.RandomSource(model, target, target_dtype))]
        elif state_dict is not None:
            sources = [("state_dict", weights.StateDictSource(state_dict))]
        else:
            sources = weights.open_files(weights.weight_files(folder), target)
        loading_info = weights.load_weights(model, sources, target, target_dtype, strict=not output_loading_info,
                                            ignore_mismatched_sizes=ignore_mismatched_sizes,
                                            quantize=quantize == "fp8" or load_format == "dummy")
        fresh = loading_info["missing_keys"] | {m[0] for m in loading_info["mismatched_keys"]}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name not in fresh:
                mark_initialized(tensor)
        model.post_init()  # initialises what the checkpoint lacked; recomputes the buffers not stored
        for module in model.modules():
            if hasattr(module, "reset_buffers"):  # buffers computed from the config, not stored
                module.reset_buffers(target)
        gen_path = None if folder is None else folder / "generation_config.json"
        if gen_path is not None and gen_path.is_file():
            model.generation_config = GenerationConfig(json.loads(gen_path.read_text()))
        model.name_or_path = str(name_or_path) if name_or_path is not None else ""
        return (model.eval(), loading_info) if output_loading_info else model.eval()

    @staticmethod
    def _checkpoint_folder(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
        token = hub_kwargs.pop("token", None) or hub_kwargs.pop("use_auth_token", None)
        hub = {k: v for k, v in hub_kwargs.items() if k in _HUB_OPTIONS}
        return weights.resolve_folder(name_or_path, token=token, **hub)

    @classmethod
    def _read_config(cls, folder: Path, name_or_path: str | os.PathLike) -> Any:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise weights.CheckpointError(f"{name_or_path} has no config.json")
        try:
            return cls._config_from_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise weights.CheckpointError(f"{config_path} is not valid JSON: {e}") from None

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """State in the published checkpoint names (for the composite models) or transformers' own names."""
        prefixes = weights.CLASS_PREFIXES[type(self).__name__]
        out = {}
        for name, tensor in self.state_dict().items():
            for canonical_prefix, own_prefix in prefixes:
                if name.startswith(own_prefix):
                    canonical = canonical_prefix + name[len(own_prefix):]
                    break
            if self.published_layout:
                out[weights.published_key(canonical)] = tensor
            else:
                out[name] = tensor
        return out

    def save_pretrained(self, folder: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True, config_format: str = "published", **unused) -> None:
        """Writes config.json, generation_config.json and sharded safetensors with their index."""
        if not safe_serialization:
            raise ValueError("only safetensors checkpoints are written (safe_serialization=True)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self.config.to_dict(config_format) if isinstance(self.config, (MllamaConfig, MllamaTextConfig)) \
            else self.config.to_dict()
        data["architectures"] = [type(self).__name__]
        data["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        generation = (dict(self.generation_config) or _generation_defaults(self.config)) if self.can_generate() else {}
        if generation:  # only a model that generates has one (MllamaModel and the two encoders do not)
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        weights.save_weights(self.checkpoint_state_dict(), folder, max_shard_size)
