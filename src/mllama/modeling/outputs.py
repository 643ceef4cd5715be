"""Results of a forward pass: read by attribute (`out.logits`), by key (`out["logits"]`) or by position."""
from __future__ import annotations

from typing import Any


class ModelOutput(dict):
    """A dict of the fields that are set (None values are left out), in the order given."""

    def __init__(self, **fields: Any):
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name: str) -> Any:
        if name == "past_key_values":
            name = "cache"
        if name in self:
            return self[name]
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, (int, slice)):  # by position among the fields that are set, as transformers' outputs
            return self.to_tuple()[key]
        if key == "past_key_values":
            key = "cache"
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        return super().__contains__("cache" if key == "past_key_values" else key)

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


def config_default(config: Any, name: str, default: Any) -> Any:
    """A forward option's default from the model's config (or its text config), as transformers reads them:
    output_attentions, output_hidden_states, use_return_dict (alias return_dict)."""
    for part in (config, getattr(config, "text_config", None)):
        for key in ((name, "return_dict") if name == "use_return_dict" else (name,)):
            value = getattr(part, key, None) if part is not None else None
            if value is not None:
                return value
    return default


def finish(out: ModelOutput, return_dict: bool | None, config: Any) -> ModelOutput | tuple:
    """`out`, or with return_dict=False (given or the config's) the tuple of its set fields."""
    if return_dict is None:
        return_dict = config_default(config, "use_return_dict", True)
    return out if return_dict else out.to_tuple()
