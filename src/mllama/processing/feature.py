"""A dict of model inputs that moves to a device in one call, as returned by the processors."""
from __future__ import annotations

from collections import UserDict
from typing import Any

import numpy as np
import torch


def _to_tensor(value: Any, tensor_type: str | None) -> Any:
    if tensor_type is None or value is None:
        return value
    if tensor_type == "pt":
        if isinstance(value, torch.Tensor):
            return value
        return torch.as_tensor(np.asarray(value))
    if tensor_type == "np":
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")


class BatchFeature(UserDict):
    """Model inputs by name. Attribute access and `.to(device|dtype)` work like transformers' BatchFeature;
    `.to(dtype)` only casts floating-point tensors so token ids stay integers."""

    def __init__(self, data: dict | None = None, tensor_type: str | None = None, skip: tuple = ()):
        super().__init__()
        for key, value in (data or {}).items():
            self.data[key] = value if key in skip else _to_tensor(value, tensor_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        dtype = kwargs.get("dtype")
        device = kwargs.get("device")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        out = BatchFeature()
        for key, value in self.data.items():
            if isinstance(value, torch.Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(device=device, dtype=dtype)
                elif device is not None:
                    value = value.to(device=device)
            out.data[key] = value
        return out
