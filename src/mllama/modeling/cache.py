"""Key/value cache: self-attention K/V that grow with the text, cross-attention K/V computed once per image set."""
from __future__ import annotations

import torch

from .attention import attend


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of one token's K and V in one attention layer."""
    text = getattr(config, "text_config", config)
    return 2 * text.num_key_value_heads * text.head_dim * torch.finfo(dtype).bits // 8


class MllamaCache:
    """Per-layer caches, keyed by layer index.

    Self-attention layers: k/v [B, kv_heads, length, head_dim]. With `max_length` (see `allocate`) the buffers are
    preallocated and written in place; otherwise they grow by concatenation.
    Cross-attention layers: k (after k_norm) / v [B, kv_heads, images*tiles*tokens, head_dim], stored once and
    reused on every later step.
    The layers reach the cache through `attend` and `cross_attend` (the attention over what it holds), so that an
    engine can give them a cache of another layout (engine.caches: static buffers, pages) and keep their math. `cross_tiles`: indices into the images*tiles axis of the tiles those k/v hold when
    padding tiles were dropped (MllamaModel.kept_tiles), else None; later steps select those mask columns.
    """

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length
        self.key: dict[int, torch.Tensor] = {}
        self.value: dict[int, torch.Tensor] = {}
        self.cross_key: dict[int, torch.Tensor] = {}
        self.cross_value: dict[int, torch.Tensor] = {}
        self.cross_tiles: torch.Tensor | None = None
        self.seq_length = 0

    @classmethod
    def allocate(cls, config, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype) -> "MllamaCache":
        """A cache whose self-attention buffers hold `max_length` tokens, allocated up front."""
        text = getattr(config, "text_config", config)
        cache = cls(max_length)
        shape = (batch_size, text.num_key_value_heads, max_length, text.head_dim)
        cross = set(text.cross_attention_layers)
        for i in range(text.num_hidden_layers):
            if i not in cross:
                cache.key[i] = torch.zeros(shape, device=device, dtype=dtype)
                cache.value[i] = torch.zeros(shape, device=device, dtype=dtype)
        return cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's k/v after the cached ones; returns all k/v so far."""
        start, end = self.seq_length, self.seq_length + k.shape[2]
        if self.max_length is None:
            if layer_idx in self.key:
                k = torch.cat([self.key[layer_idx], k], dim=2)
                v = torch.cat([self.value[layer_idx], v], dim=2)
            self.key[layer_idx], self.value[layer_idx] = k, v
            return k, v
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} tokens; this step would need {end}")
        self.key[layer_idx][:, :, start:end] = k
        self.value[layer_idx][:, :, start:end] = v
        return self.key[layer_idx][:, :, :end], self.value[layer_idx][:, :, :end]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               implementation: str | None = None, weights: list | None = None) -> torch.Tensor:
        """Self-attention of this step's queries over the cached keys and this step's (stored first)."""
        k, v = self.update(layer_idx, k, v)
        return attend(q, k, v, mask, implementation, weights)

    def cross_attend(self, layer_idx: int, q: torch.Tensor, mask: torch.Tensor | None,
                     implementation: str | None = None, weights: list | None = None) -> torch.Tensor:
        """Cross-attention of this step's queries over the stored vision k/v."""
        return attend(q, self.cross_key[layer_idx], self.cross_value[layer_idx], mask, implementation, weights)

    def update_cross(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores vision k/v; images given on a later call are appended to the earlier ones (multi-turn)."""
        if layer_idx in self.cross_key:
            k = torch.cat([self.cross_key[layer_idx], k], dim=2)
            v = torch.cat([self.cross_value[layer_idx], v], dim=2)
        self.cross_key[layer_idx], self.cross_value[layer_idx] = k, v
        return k, v

    def has_cross(self, layer_idx: int) -> bool:
        return layer_idx in self.cross_key

    def cross_length(self) -> int:
        return next(iter(self.cross_key.values())).shape[2] if self.cross_key else 0

    def advance(self, num_tokens: int) -> None:
        self.seq_length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the batch rows in `index` (in that order), e.g. to drop finished sequences."""
        for store in (self.key, self.value, self.cross_key, self.cross_value):
            for i in store:
                store[i] = store[i].index_select(0, index.to(store[i].device))
