"""Adapters (LoRA and the others peft makes) on mllama's models, through peft: the `finetune` extra.

peft works on mllama's models as they are: their projections are plain nn.Linear modules named as transformers
names them (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`, the vision tower's and
the cross-attention layers' too), so `peft.get_peft_model(model, LoraConfig(...))` and
`PeftModel.from_pretrained(model, path)` need nothing from here, and an adapter saved by either side loads into
the other. This module gives the models transformers' own adapter methods (`model.load_adapter(path)` and the
rest of its PeftAdapterMixin that inference needs).

Adapters run in the plain modules: generate's fast path and the serving engine fuse the projections' weights
and refuse a model with adapter layers (engine.decode.unsupported); merge them first (`merge_and_unload()`, on a
PeftModel or on the model) to use those.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

PREFIX = "base_model.model."  # how peft's saved adapters name a module of the model they were made on


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("adapters need peft: pip install 'mllama[finetune]'") from None
    return peft


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False, **hub_kwargs) -> None:
    """Adds the adapter saved at `path` (a folder with adapter_config.json and its weights, or a Hub id) to
    `model` under `adapter_name`, and makes it the active one. Its weights must cover exactly the layers its
    config targets: a missing or unexpected tensor is an error naming it."""
    peft = _peft()
    from peft.utils import load_peft_weights

    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"an adapter named {adapter_name!r} is loaded already: give another adapter_name")
    config = peft.PeftConfig.from_pretrained(str(path), **hub_kwargs)
    config.inference_mode = not is_trainable
    weights = load_peft_weights(str(path), device=str(next(model.parameters()).device), **hub_kwargs)
    weights = {key[len(PREFIX):] if key.startswith(PREFIX) else key: value for key, value in weights.items()}
    peft.inject_adapter_in_model(config, model, adapter_name)
    result = peft.set_peft_model_state_dict(model, weights, adapter_name)
    unexpected = [key for key in result.unexpected_keys]
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key or key.endswith(f".{adapter_name}")]
    if unexpected or missing:
        delete_adapter(model, adapter_name, config)
        raise ValueError(f"the adapter at {path} does not fit this model: "
                         + (f"unexpected tensors {unexpected[:5]}" if unexpected else "")
                         + ("; " if unexpected and missing else "")
                         + (f"missing tensors {missing[:5]}" if missing else ""))
    model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: config}
    set_adapter(model, adapter_name)
    if not is_trainable:
        for name, parameter in model.named_parameters():
            if f".{adapter_name}." in name:
                parameter.requires_grad_(False)


def _tuner_layers(model: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def active_adapters(model: nn.Module) -> list[str]:
    layers = _tuner_layers(model) if getattr(model, "peft_config", None) else []
    return list(layers[0].active_adapters) if layers else []


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes one loaded adapter the active one (the others stay loaded, unused)."""
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"no adapter named {adapter_name!r} is loaded (loaded: {sorted(getattr(model, 'peft_config', {}))})")
    for layer in _tuner_layers(model):
        layer.set_adapter(adapter_name)


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    if not getattr(model, "peft_config", None):
        raise ValueError("no adapter is loaded")
    for layer in _tuner_layers(model):
        layer.enable_adapters(enabled)


def delete_adapter(model: nn.Module, adapter_name: str, config=None) -> None:
    """Removes an adapter's layers and weights (the model's own weights are untouched)."""
    peft = _peft()
    configs = getattr(model, "peft_config", {})
    config = configs.get(adapter_name, config)
    if config is None:
        raise ValueError(f"no adapter named {adapter_name!r} is loaded")
    for layer in _tuner_layers(model):
        layer.delete_adapter(adapter_name)
    model.peft_config = {name: c for name, c in configs.items() if name != adapter_name}
    if not model.peft_config:
        _unwrap(model, peft)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Adds the active adapters into the model's own weights and removes every adapter layer: the model is a
    plain one again (save_pretrained then writes a checkpoint in the published layout)."""
    peft = _peft()
    if not getattr(model, "peft_config", None):
        raise ValueError("no adapter is loaded")
    for layer in _tuner_layers(model):
        layer.merge()
    _unwrap(model, peft)
    model.peft_config = {}
    return model


def _unwrap(model: nn.Module, peft) -> None:
    """Puts each adapter layer's base layer back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
