"""The activation names a config's `hidden_act` may hold: the parameter-free ones transformers' configs accept.

The released models use "gelu" (vision) and "silu" (text); the others exist so that configs built for
transformers (tests, small experiments) build the same function here. Each entry is a plain function, so the
choice adds nothing to the state dict.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_written_out(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation spelled with elementary ops (its rounding differs slightly from the fused kernel).
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_erf_written_out(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_10(x: torch.Tensor) -> torch.Tensor:
    return torch.clip(F.gelu(x), -10.0, 10.0)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _relu_squared(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x).sqrt()


def _laplace(x: torch.Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_10": _gelu_10,
    "gelu_fast": _gelu_fast,
    "gelu_new": _gelu_tanh_written_out,
    "gelu_accurate": _gelu_tanh_written_out,
    "gelu_python": _gelu_erf_written_out,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh_written_out,
    "quick_gelu": _quick_gelu,
    "hardswish": F.hardswish,
    "laplace": _laplace,
    "leaky_relu": _leaky_relu,
    "linear": _identity,
    "mish": F.mish,
    "relu": F.relu,
    "relu2": _relu_squared,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "sqrtsoftplus": _sqrt_softplus,
    "tanh": torch.tanh,
}

# Names transformers also accepts whose activation holds learned parameters (they would change the checkpoint).
WITH_PARAMETERS = ("prelu", "xielu")


def check_activation(name: str, part: str) -> None:
    if name in ACTIVATIONS:
        return
    if name in WITH_PARAMETERS:
        raise ValueError(f"hidden_act {name!r} of the {part} model has learned parameters and is not supported: "
                         f"use a parameter-free one, e.g. 'gelu' or 'silu'")
    raise ValueError(f"hidden_act {name!r} of the {part} model is unknown: use one of {sorted(ACTIVATIONS)}")


def activation(name: str, part: str) -> Callable[[torch.Tensor], torch.Tensor]:
    check_activation(name, part)
    return ACTIVATIONS[name]
