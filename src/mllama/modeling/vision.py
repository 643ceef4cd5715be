"""The vision encoder: a ViT over up to 4 tiles of one image, attended jointly, with aspect-ratio embeddings.

Parameter names are the checkpoint's (`vision_model.` prefix on the Hub).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import MllamaVisionConfig
from .activations import activation
from .attention import attend
from .base import MllamaPreTrainedModel
from .outputs import ModelOutput, config_default, finish


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    """One row per aspect-ratio id (row 0 = padding image) holding an embedding for each of the T tiles."""

    def __init__(self, config: MllamaVisionConfig, is_gated: bool = True):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.is_gated = is_gated
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.max_num_tiles * self.hidden_size)
        if is_gated:
            self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_state: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # hidden_state [B*N, T, tokens, D]; the tile's embedding is added to every token of that tile
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        if self.is_gated:
            emb = emb * self.gate.tanh()
        return hidden_state + emb


class MllamaPrecomputedPositionEmbedding(nn.Module):
    """Per-token positional embedding, blended by a gate with a per-(aspect ratio, tile, token) embedding."""

    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.num_patches = config.num_patches
        self.hidden_size = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.num_patches, self.hidden_size))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                           self.max_num_tiles * self.num_patches * self.hidden_size)

    def forward(self, hidden_state: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # hidden_state [B*N, T, 1601, D]
        gate = self.gate.tanh()
        hidden_state = hidden_state + (1 - gate) * self.embedding
        tile = self.tile_embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, self.num_patches,
                                                             self.hidden_size)
        return hidden_state + gate * tile


class MllamaVisionAttention(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.config = config  # its _attn_implementation is read at each call (set_attn_implementation changes it)
        self.num_heads = config.attention_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                valid_groups: ValidGroups | None = None) -> torch.Tensor:
        """`mask` is the additive mask of `vision_attention_mask`; with `valid_groups` instead, the tokens of each
        row are already ordered valid-first (see `vision_token_order`) and no mask is needed."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        if valid_groups is None:
            out = attend(q, k, v, mask, self.config._attn_implementation).transpose(1, 2)
        else:
            out = reordered_attention(q, k, v, valid_groups)
        return self.o_proj(out.reshape(b, s, -1))


# (valid-token count V, rows of the batch having that V, or None when it is every row)
ValidGroups = list[tuple[int, "torch.Tensor | None"]]


def _valid_first_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int) -> torch.Tensor:
    """The mask rule of `vision_attention_mask` for rows whose first `count` tokens are the valid ones, written
    as unmasked SDPA calls (which may run the flash kernel; an arbitrary additive mask rules it out).
    q, k, v [B, H, S, hd] -> [B, S, H, hd] (token-major, as the output projection reads it)."""
    seq = q.shape[2]
    if count == 0:
        # Every pair is blocked: each score becomes the same finfo.min, so the mask form's softmax is uniform over
        # all keys. Reproduce that instead of attending to nothing (which would give NaN).
        return v.mean(dim=2, keepdim=True).expand_as(q).transpose(1, 2)
    # exact: valid queries see every key, valid or padding, so they need no mask at all. All rows are computed
    # (attention rows are independent; the few padding rows cost ~0.4% more) and the padding rows then replaced:
    # joining two results would copy the whole output (on the H200 that copy took 2 ms of the 50 ms encoder).
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    if count == seq:
        return out
    # exact: padding queries see only the valid keys, which are the first `count` after the reordering
    tail = F.scaled_dot_product_attention(q[:, :, count:], k[:, :, :count], v[:, :, :count]).transpose(1, 2)
    if out.requires_grad:  # autograd keeps the attention output for the backward pass: no writing into it
        return torch.cat([out[:, :count], tail], dim=1)
    out[:, count:] = tail
    return out


def reordered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: ValidGroups) -> torch.Tensor:
    """Attention over valid-first rows, q/k/v [B, H, S, hd] -> [B, S, H, hd]; rows with different valid counts
    are run group by group."""
    if len(groups) == 1 and groups[0][1] is None:
        return _valid_first_attention(q, k, v, groups[0][0])     # the usual case: one V for the whole batch
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    for count, rows in groups:
        part = _valid_first_attention(q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows),
                                      count)
        out.index_copy_(0, rows, part)
    return out


class MllamaVisionMLP(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = activation(config.hidden_act, "vision")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class MllamaVisionEncoderLayer(nn.Module):
    def __init__(self, config: MllamaVisionConfig, is_gated: bool = False):
        super().__init__()
        self.is_gated = is_gated
        self.self_attn = MllamaVisionAttention(config)
        self.mlp = MllamaVisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                valid_groups: ValidGroups | None = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask, valid_groups)
        x = x + (self.gate_attn.tanh() * h if self.is_gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.is_gated else h)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, config: MllamaVisionConfig, num_layers: int, is_gated: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, is_gated) for _ in range(num_layers))
        self.gradient_checkpointing = False  # see MllamaPreTrainedModel.gradient_checkpointing_enable
        self.checkpoint_kwargs: dict = {"use_reentrant": False}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: tuple[int, ...] = (),
                keep_outputs: bool = False, valid_groups: ValidGroups | None = None,
                states: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs all layers; also returns the states at the indices in `keep`: each listed layer's input
        (Meta's rule, which the weights were trained with) or, with keep_outputs, its output (transformers).
        With `valid_groups`, x is in valid-first token order and so are the returned states. `states`: a list
        that gets every layer's output appended."""
        kept = []
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if i in keep and not keep_outputs:
                kept.append(x)
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, valid_groups, **self.checkpoint_kwargs)
            else:
                x = layer(x, mask, valid_groups)
            if i in keep and keep_outputs:
                kept.append(x)
            if states is not None:
                states.append(x)
        return x, kept


def vision_valid_tokens(aspect_ratio_mask: torch.Tensor, num_tokens: int, num_pad: int) -> torch.Tensor:
    """[B*N, T*L] bool: True for the real tokens of the image's tiles, False for padding.

    Padding = the `num_pad` tokens appended to each tile, and every token of a tile beyond the image's tiles.
    """
    bn, tiles = aspect_ratio_mask.shape
    valid = aspect_ratio_mask.bool()[:, :, None].expand(bn, tiles, num_tokens + num_pad).clone()
    if num_pad:
        valid[:, :, num_tokens:] = False
    return valid.reshape(bn, -1)


def vision_attention_mask(aspect_ratio_mask: torch.Tensor, num_tokens: int, num_pad: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B*N, 1, T*L, T*L] that blocks only (padding query, padding key) pairs.

    Real tokens attend to padding (Meta's encoder does; the weights were trained so), padding attends to real.
    """
    invalid = ~vision_valid_tokens(aspect_ratio_mask, num_tokens, num_pad)
    blocked = invalid[:, :, None] & invalid[:, None, :]
    mask = torch.zeros(blocked.shape, dtype=dtype, device=aspect_ratio_mask.device)
    return mask.masked_fill_(blocked, torch.finfo(dtype).min).unsqueeze(1)


def vision_token_order(aspect_ratio_mask: torch.Tensor, num_tokens: int,
                       num_pad: int) -> tuple[torch.Tensor, torch.Tensor, ValidGroups]:
    """The valid-first order that lets `reordered_attention` compute the masked attention without a mask.

    Returns `order` [B*N, T*L] (row r of the reordered sequence is token order[r] of the original one; valid tokens
    first, each group in its original order), `inverse` (its inverse permutation) and the rows grouped by valid
    count. Attention is order-free except through the mask and everything else in the encoder is per token, so the
    reordering is applied once before the stacks and undone once after. The grouping reads the counts on the host:
    one sync per forward, not per layer.
    """
    valid = vision_valid_tokens(aspect_ratio_mask, num_tokens, num_pad)
    # stable sort on the "is padding" flag: valid tokens (0) first, padding (1) last
    order = torch.argsort((~valid).to(torch.int32), dim=1, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)
    counts = valid.sum(dim=1)
    distinct = sorted(set(counts.tolist()))
    if len(distinct) == 1:
        groups: ValidGroups = [(distinct[0], None)]
    else:
        groups = [(c, torch.nonzero(counts == c).flatten()) for c in distinct]
    return order, inverse, groups


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B*N, S, F] -> x[r, index[r, i]] for every row r; index [B*N, S'] (S' may be smaller than S)."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class MllamaPatchEmbedding(nn.Conv2d):
    """The tiles' bias-free stride-p convolution into patch features, [tiles, C, H, W] -> [tiles, D, H/p, W/p],
    computed as one matrix product over the flattened patches (the same sums): on the H200 cuDNN ran this
    convolution in 0.46 ms, as long as ten of the encoder's big matrix products. A module (not the weight used
    directly) so that forward hooks on it fire, such as enable_input_require_grads'."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int):
        super().__init__(in_channels, out_channels, kernel_size=patch_size, stride=patch_size, padding="valid",
                         bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tiles, c, h, w = pixels.shape
        p = self.kernel_size[0]
        gh, gw = h // p, w // p
        x = pixels[:, :, :gh * p, :gw * p].reshape(tiles, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(tiles, gh * gw, c * p * p) @ self.weight.reshape(self.out_channels, -1).t()
        return x.transpose(1, 2).reshape(tiles, self.out_channels, gh, gw)   # a view of the [tiles, P*P, D] product


class MllamaVisionModel(MllamaPreTrainedModel):
    config_class = MllamaVisionConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: MllamaVisionConfig):
        super().__init__(config)
        # True: attention on valid-first reordered tokens with unmasked SDPA calls (flash-eligible, same function);
        # False: the additive-mask form. Either can be chosen per call with forward(..., exact_reorder=...).
        # With attn_implementation "eager" the mask form always runs (its softmax written out).
        self.exact_reorder = True
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.num_patches = config.num_patches
        self.intermediate_layers_indices = tuple(config.intermediate_layers_indices)

        self.patch_embedding = MllamaPatchEmbedding(config.num_channels, self.hidden_size, self.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(self.hidden_size))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(config)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config, is_gated=True)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config, is_gated=True)
        self.layernorm_pre = nn.LayerNorm(self.hidden_size)
        self.layernorm_post = nn.LayerNorm(self.hidden_size)
        self.transformer = MllamaVisionEncoder(config, config.num_hidden_layers, is_gated=False)
        self.global_transformer = MllamaVisionEncoder(config, config.num_global_layers, is_gated=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.patch_embedding  # what transformers answers (the first layer the pixels meet)

    def get_output_embeddings(self) -> None:
        return None

    def resize_token_embeddings(self, *args, **kwargs):
        raise ValueError("MllamaVisionModel has no token embeddings to resize: resize those of the text model "
                         "(MllamaForConditionalGeneration, MllamaModel or MllamaTextModel)")

    @property
    def num_pad(self) -> int:
        # Each tile's token count is padded up to a multiple of 8 (1601 -> 1608), as in Meta's encoder.
        return (8 - self.num_patches % 8) % 8

    def embed(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """Tiles -> [B*N, T, L, D] tokens after layernorm_pre, with the zero padding tokens appended."""
        b, n, t, c, h, w = pixel_values.shape
        if t != self.max_num_tiles:
            raise ValueError(f"pixel_values has {t} tiles per image; this model expects max_num_tiles="
                             f"{self.max_num_tiles}")
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"pixel_values tiles are {h}x{w}; this model expects {self.image_size}x"
                             f"{self.image_size}")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(b * n * t, c, h, w).to(weight.device, weight.dtype))
        x = x.flatten(2).transpose(1, 2)                                   # [B*N*T, P*P, D]
        ids = aspect_ratio_ids.reshape(b * n, 1).to(weight.device)
        x = self.pre_tile_positional_embedding(x.reshape(b * n, t, -1, self.hidden_size), ids)
        cls = self.class_embedding.to(x.dtype).expand(b * n * t, 1, self.hidden_size)
        x = torch.cat([cls, x.reshape(b * n * t, -1, self.hidden_size)], dim=1)   # [B*N*T, 1601, D]
        x = self.gated_positional_embedding(x.reshape(b * n, t, self.num_patches, self.hidden_size), ids)
        x = self.layernorm_pre(x)
        return F.pad(x, (0, 0, 0, self.num_pad))                           # [B*N, T, 1608, D]

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor, exact_reorder: bool | None = None, return_dict: bool | None = None,
                output_hidden_states: bool | None = None, **unused) -> ModelOutput | tuple:
        """Pixels [B, N, T, 3, H, W] -> last_hidden_state [B, N, T, num_patches, D * (1 + intermediate layers)].
        With output_hidden_states (or the config's), also hidden_states: the encoder's input (the embeddings
        after layernorm_pre) and every local and then global layer's output, each [B, N, T, num_patches, D]
        (tile padding dropped). transformers answers (last_hidden_state,) there."""
        b, n, t = pixel_values.shape[:3]
        if output_hidden_states is None:
            output_hidden_states = config_default(self.config, "output_hidden_states", False)
        device = self.patch_embedding.weight.device
        tile_mask = aspect_ratio_mask.reshape(b * n, t).to(device)
        reorder = self._reorders(exact_reorder, device)
        # The order reads the valid counts on the host: before any encoder work is queued, so that nothing waits.
        order = vision_token_order(tile_mask, self.num_patches, self.num_pad) if reorder else None
        x = self.embed(pixel_values, aspect_ratio_ids)
        length = x.shape[2]
        ids = aspect_ratio_ids.reshape(b * n, 1).to(x.device)
        if reorder:
            return finish(self._forward_reordered(x, ids, order, b, n, output_hidden_states), return_dict,
                          self.config)
        mask = vision_attention_mask(tile_mask, self.num_patches, self.num_pad, x.dtype)
        x = x.reshape(b * n, t * length, self.hidden_size)
        states = [x] if output_hidden_states else None
        x, kept = self.transformer(x, mask, keep=self.intermediate_layers_indices,
                                   keep_outputs=self.config.compat == "transformers", states=states)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(b * n, t, length, self.hidden_size), ids)
        x, _ = self.global_transformer(x.reshape(b * n, t * length, self.hidden_size), mask, states=states)
        x = x.reshape(b * n, t, length, self.hidden_size)[:, :, :self.num_patches]
        # Intermediate features are interleaved: feature index = channel * len(kept) + which layer.
        inter = torch.stack(kept, dim=-1).reshape(b * n, t, length, -1)[:, :, :self.num_patches]
        out = torch.cat([x, inter], dim=-1).reshape(b, n, t, self.num_patches, -1)   # [B, N, T, 1601, 7680]
        hidden = None if states is None else tuple(
            s.reshape(b * n, t, length, self.hidden_size)[:, :, :self.num_patches] for s in states)
        return finish(ModelOutput(last_hidden_state=out, hidden_states=self._per_image(hidden, b, n)), return_dict,
                      self.config)

    def _per_image(self, states: tuple[torch.Tensor, ...] | None, b: int, n: int) -> tuple[torch.Tensor, ...] | None:
        """Recorded states [B*N, T, num_patches, D] (or flattened tiles) -> [B, N, T, num_patches, D] each."""
        if states is None:
            return None
        return tuple(s.reshape(b, n, self.max_num_tiles, self.num_patches, self.hidden_size) for s in states)

    def _reorders(self, exact_reorder: bool | None, device: torch.device) -> bool:
        """Whether this call runs the valid-first reordered form (see exact_reorder) rather than the mask form."""
        if self.config._attn_implementation == "eager":
            if exact_reorder:
                raise ValueError("exact_reorder=True computes the vision attention with SDPA calls, but this model's "
                                 "attn_implementation is 'eager' (the mask form): leave exact_reorder unset, or "
                                 "call set_attn_implementation('sdpa')")
            return False
        reorder = self.exact_reorder if exact_reorder is None else exact_reorder
        # On the meta device (shape-only runs) the valid counts cannot be read, so the mask form is used there.
        return reorder and device.type != "meta"

    def _forward_reordered(self, x: torch.Tensor, ids: torch.Tensor, token_order: tuple, b: int,
                           n: int, output_hidden_states: bool = False) -> ModelOutput:
        """`forward` on valid-first reordered tokens (`token_order`: what vision_token_order returns): the same
        function as the mask form, without a mask."""
        bn, t, length = x.shape[:3]
        order, inverse, groups = token_order
        x = _gather_tokens(x.reshape(bn, t * length, self.hidden_size), order)
        states = [x] if output_hidden_states else None
        x, kept = self.transformer(x, None, keep=self.intermediate_layers_indices,
                                   keep_outputs=self.config.compat == "transformers", valid_groups=groups,
                                   states=states)
        x = self.layernorm_post(x)
        # The post-tile embedding is per tile, not per token: take each tile's embedding from the module itself
        # (added to zeros, so the values are exactly those it adds) and give every token the one of its own tile.
        tile_emb = self.post_tile_positional_embedding(x.new_zeros(bn, t, 1, self.hidden_size), ids)
        x = x + _gather_tokens(tile_emb.reshape(bn, t, self.hidden_size), torch.div(order, length,
                                                                                    rounding_mode="floor"))
        x, _ = self.global_transformer(x, None, valid_groups=groups, states=states)
        # Undo the reordering once, on the final and intermediate features together, gathering only the tokens the
        # output keeps (the first num_patches of every tile; the tile padding is dropped as in the mask form).
        inter = torch.stack(kept, dim=-1).reshape(bn, t * length, -1)   # channel * len(kept) + layer, as there
        keep_tokens = inverse.reshape(bn, t, length)[:, :, :self.num_patches].reshape(bn, t * self.num_patches)
        out = _gather_tokens(torch.cat([x, inter], dim=-1), keep_tokens)
        hidden = None if states is None else tuple(_gather_tokens(s, keep_tokens) for s in states)
        return ModelOutput(last_hidden_state=out.reshape(b, n, t, self.num_patches, -1),
                           hidden_states=self._per_image(hidden, b, n))

