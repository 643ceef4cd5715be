"""Loading, saving and initialisation shared by the five model classes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import weights
from ..config import MllamaConfig, MllamaTextConfig


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
_HUB_OPTIONS = ("token", "use_auth_token", "revision", "cache_dir", "local_files_only", "subfolder")
_QUANTIZATION = ("load_in_4bit", "load_in_8bit", "quantization_config")


def _refuse_unhonoured(options: dict[str, Any]) -> None:
    """A keyword that loading would ignore is an error: a model asked for in 4 bits must not come back in 16."""
    quantized = [k for k in _QUANTIZATION if options.get(k) not in (None, False)]
    if quantized:
        raise ValueError(f"from_pretrained({quantized[0]}=...) is not supported: mllama does not quantize; load in "
                         f"dtype=torch.bfloat16 or torch.float16 (half the memory of float32)")
    unknown = sorted(set(options) - set(_HUB_OPTIONS) - set(_QUANTIZATION) - {"low_cpu_mem_usage"})
    if unknown:
        raise ValueError(f"from_pretrained got unsupported arguments {unknown}: it takes config, dtype (or "
                         f"torch_dtype), device_map (or device), compat, attn_implementation, output_loading_info "
                         f"and the Hub options "
                         f"{', '.join(_HUB_OPTIONS)}")


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


class GenerationConfig(dict):
    """generation_config.json as a dict with attribute access (defaults for `generate`)."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


class MllamaPreTrainedModel(nn.Module):
    """Loading, saving and initialisation shared by the five model classes."""

    config_class: type = MllamaConfig
    published_layout = False  # save with the Hub's `language_model.model.` ... names

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
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
        model whose own weights are frozen (what peft asks for)."""
        self.disable_input_require_grads()

        def require_grad(module, inputs, output):
            output.requires_grad_(True)

        get = getattr(self, "get_input_embeddings", None)
        embeddings = get() if get is not None else None
        self._require_grads_hooks = [embeddings.register_forward_hook(require_grad)] if embeddings is not None else []

    def disable_input_require_grads(self) -> None:
        for hook in getattr(self, "_require_grads_hooks", ()):
            hook.remove()
        self._require_grads_hooks = []

    def init_weights(self, std: float | None = None, seed: int | None = None) -> "MllamaPreTrainedModel":
        """Random initialisation like the trained models' recipe: normal(0, 0.02) matrices and embeddings,
        unit norms, zero biases and gates (so a fresh model ignores images until gates are set)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = std if std is not None else getattr(self.config, "initializer_range", 0.02)
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if "norm" in name or "layernorm" in name:
                    p.fill_(1.0 if leaf == "weight" else 0.0)
                elif leaf == "bias" or "gate" in leaf:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
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
    def from_config(cls, config: Any, dtype: torch.dtype | None = None, device: Any = None) -> "MllamaPreTrainedModel":
        with torch.device(device or "cpu"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        return model.init_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, config: Any = None,
                        dtype: Any = "auto", torch_dtype: Any = None, device_map: Any = None, device: Any = None,
                        compat: str | None = None, attn_implementation: str | None = None,
                        output_loading_info: bool = False, **hub_kwargs: Any) -> "MllamaPreTrainedModel":
        """Loads a Hugging Face checkpoint (folder or Hub id, optionally a `subfolder` of it) in either key layout,
        streaming each tensor from the memory-mapped safetensors to `device` (or `device_map`: "auto", "cpu",
        "cuda", "cuda:N") in `dtype`. With `output_loading_info=True` returns (model, info) like transformers:
        info holds "missing_keys", "unexpected_keys", "mismatched_keys" and "error_msgs"."""
        name_or_path = pretrained_model_name_or_path
        _refuse_unhonoured(hub_kwargs)
        if attn_implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"attn_implementation {attn_implementation!r} is not supported: use 'sdpa' or 'eager'")
        token = hub_kwargs.pop("token", None) or hub_kwargs.pop("use_auth_token", None)
        hub = {k: v for k, v in hub_kwargs.items() if k in _HUB_OPTIONS}
        folder = weights.resolve_folder(name_or_path, token=token, **hub)
        if config is None:
            config_path = folder / "config.json"
            if not config_path.is_file():
                raise weights.CheckpointError(f"{name_or_path} has no config.json")
            try:
                config = cls._config_from_dict(json.loads(config_path.read_text()))
            except json.JSONDecodeError as e:
                raise weights.CheckpointError(f"{config_path} is not valid JSON: {e}") from None
        if compat is not None:
            config.compat = compat
        target_dtype = _resolve_dtype(torch_dtype if torch_dtype is not None else dtype, config)
        target = _resolve_device(device, device_map)
        files = weights.weight_files(folder)
        with torch.device("meta"):
            model = cls(config)
        loading_info = weights.load_weights(model, files, target, target_dtype)
        for module in model.modules():
            if hasattr(module, "reset_buffers"):  # buffers computed from the config, not stored
                module.reset_buffers(target)
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            model.generation_config = GenerationConfig(json.loads(gen_path.read_text()))
        model.name_or_path = str(name_or_path)
        return (model.eval(), loading_info) if output_loading_info else model.eval()

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
        generation = dict(self.generation_config) or _generation_defaults(self.config)
        if generation:
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        weights.save_weights(self.checkpoint_state_dict(), folder, max_shard_size)
