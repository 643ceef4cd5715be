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

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        if key == "past_key_values":
            key = "cache"
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())
