"""The text decoder: Llama 3.1 self-attention layers with gated cross-attention layers inserted among them.

Parameter names are the checkpoint's (`language_model.model.` prefix on the Hub).
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ROPE_TYPES, MllamaTextConfig
from ..quantization import linear
from .activations import activation
from .attention import attend
from .base import MllamaPreTrainedModel, copy_resized, resized_rows
from .cache import MllamaCache
from .outputs import ModelOutput, config_default, finish


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, cast back, then scale: the order Meta's and transformers' RMSNorm share.
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MllamaTextRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: MllamaTextConfig, device: torch.device | str | None = None,
                  seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with the config's scaling: llama3 (the published checkpoints),
    linear, yarn, or dynamic NTK (whose base grows with `seq_len` past max_position_embeddings)."""
    params = config.rope_parameters
    kind, theta, dim = params["rope_type"], params["rope_theta"], config.head_dim
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type {kind!r} is not supported: use one of {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters.partial_rotary_factor {params['partial_rotary_factor']} is not supported: "
                         f"Mllama rotates every head dimension (1.0)")
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = params["factor"]
        theta = theta * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv = 1.0 / (theta ** exponent)
    if kind == "linear":
        inv = inv / params["factor"]
    elif kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_ctx = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_ctx / low, inv / factor, torch.where(wavelen < old_ctx / high, inv, blended))
    elif kind == "yarn":
        inv = _yarn_blend(inv, params, dim, theta, params.get("original_max_position_embeddings",
                                                              config.max_position_embeddings))
    return inv


def _yarn_blend(inv: torch.Tensor, params: dict, dim: int, theta: float, old_ctx: int) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context `old_ctx` are
    interpolated (divided by the factor), those turning more than beta_fast times are kept, a linear ramp between."""

    def dim_of(turns: float) -> float:  # the frequency index that turns `turns` times over old_ctx positions
        return dim * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv.device) - low) / max(high - low, 1e-3))
    keep = 1 - ramp.clamp(0, 1)
    return inv / params["factor"] * (1 - keep) + inv * keep


def rope_attention_scale(config: MllamaTextConfig) -> float:
    """The factor YaRN applies to cos and sin (1 for the other scalings)."""
    params = config.rope_parameters
    if params["rope_type"] != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


class MllamaRotaryEmbedding(nn.Module):
    """cos and sin tables [B, S, head_dim] for the given positions, called as transformers' rotary modules are
    (`rotary_emb(x, position_ids)`, x giving only the device); they stay in float32, as Meta rotates."""

    def __init__(self, config: MllamaTextConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config, device), persistent=False)
        self.attention_scale = rope_attention_scale(config)

    def reset_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = rope_inv_freq(self.config, device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = position_ids.to(x.device)
        inv_freq = self.inv_freq.to(x.device)
        if self.config.rope_parameters["rope_type"] == "dynamic":  # the base follows this call's longest position
            inv_freq = rope_inv_freq(self.config, x.device, int(position_ids.max()) + 1)
        freqs = position_ids.float()[..., None] * inv_freq                # [B, S, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()                                   # [B, S, head_dim] fp32
        if self.attention_scale != 1.0:
            cos, sin = cos * self.attention_scale, sin * self.attention_scale
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Half-split layout (the conversion to HF permuted q/k rows so); rotated in fp32 as Meta does.
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def run_layer(owner: nn.Module, layer: nn.Module, *args, attentions: list | None = None) -> torch.Tensor:
    """layer(*args), under torch.utils.checkpoint when `owner` has gradient checkpointing on and is training.
    Attention weights come back through the return value there: a recomputation must not append them twice."""
    if not (owner.gradient_checkpointing and owner.training and torch.is_grad_enabled()):
        return layer(*args, weights=attentions)

    def run(*inputs):
        found = [] if attentions is not None else None
        out = layer(*inputs, weights=found)
        return out if found is None else (out, *found)

    result = torch.utils.checkpoint.checkpoint(run, *args, **owner.checkpoint_kwargs)
    if attentions is None:
        return result
    attentions.extend(result[1:])
    return result[0]


def wrapped(projection: nn.Module) -> bool:
    """Whether an adapter wraps a projection (peft's layers keep the original as `base_layer`): its output is
    then more than its weight's product, so a fused matrix made of the weights must not stand in for it."""
    return hasattr(projection, "base_layer")


class MllamaTextMLP(nn.Module):
    def __init__(self, config: MllamaTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = activation(config.hidden_act, "text")
        self.w13: torch.Tensor | None = None  # gate|up in one matrix, set by engine.decode.fuse_projections
        self.w13_scale: torch.Tensor | None = None  # its per-channel scales when the layers are FP8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None and not wrapped(self.gate_proj):
            gate, up = linear(x, self.w13, self.w13_scale).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(gate) * up)


class MllamaTextSelfAttention(nn.Module):
    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config  # its _attn_implementation is read at each call (set_attn_implementation changes it)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        self.wqkv: torch.Tensor | None = None  # q|k|v in one matrix, set by engine.decode.fuse_projections
        self.wqkv_scale: torch.Tensor | None = None  # its per-channel scales when the layers are FP8

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is None or wrapped(self.q_proj):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.num_kv_heads * self.head_dim
        return linear(x, self.wqkv, self.wqkv_scale).split([self.num_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: MllamaCache | None, weights: list | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = apply_rope(q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        implementation = self.config._attn_implementation
        if cache is None:
            out = attend(q, k, v, mask, implementation, weights)
        else:  # the cache stores this step's k/v and attends over all it holds (see MllamaCache.attend)
            out = cache.attend(self.layer_idx, q, k, v, mask, implementation, weights)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MllamaTextCrossAttention(nn.Module):
    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.config = config
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        self.q_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project_kv(self, cross_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tokens [B, K, dim] -> k (after k_norm), v, each [B, kv_heads, K, head_dim]."""
        b, n, _ = cross_states.shape
        k = self.k_norm(self.k_proj(cross_states).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(cross_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, cross_states: torch.Tensor | None, mask: torch.Tensor | None,
                row_mask: torch.Tensor | None, cache: MllamaCache | None, weights: list | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        implementation = self.config._attn_implementation
        if cross_states is not None:
            k, v = self.project_kv(cross_states)
            if cache is not None:
                k, v = cache.update_cross(self.layer_idx, k, v)
            out = attend(q, k, v, mask, implementation, weights)
        else:  # vision k/v stored by an earlier step
            out = cache.cross_attend(self.layer_idx, q, mask, implementation, weights)
        if row_mask is not None and self.config.compat == "meta":
            # Meta zeroes the attention output of rows that see no image; transformers does not (#39379).
            out = out * row_mask
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MllamaSelfAttentionDecoderLayer(nn.Module):
    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MllamaTextSelfAttention(config, layer_idx)
        self.mlp = MllamaTextMLP(config)
        self.input_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: MllamaCache | None, weights: list | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, weights)
        return x + self.mlp(self.post_attention_layernorm(x))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        self.cross_attn = MllamaTextCrossAttention(config, layer_idx)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MllamaTextMLP(config)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        self.input_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cross_states: torch.Tensor | None, mask: torch.Tensor | None,
                row_mask: torch.Tensor | None, cache: MllamaCache | None, weights: list | None = None) -> torch.Tensor:
        h = self.cross_attn(self.input_layernorm(x), cross_states, mask, row_mask, cache, weights)
        x = x + self.cross_attn_attn_gate.tanh() * h
        h = self.mlp(self.post_attention_layernorm(x))
        if row_mask is not None:
            h = row_mask[:, 0] * h
        return x + self.cross_attn_mlp_gate.tanh() * h


def prepare_cross_attention_mask(mask: torch.Tensor, tokens_per_tile: int, dtype: torch.dtype,
                                 keep_tiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile 0/1 mask [B, S, N, T] -> additive mask [B, 1, S, K*tokens] and row mask [B, 1, S, 1].

    K = N*T, or with `keep_tiles` (indices into the N*T tiles whose vision tokens were kept, see
    MllamaModel.kept_tiles) only those tiles' columns.
    Rows that see no image get an all-zero additive row (a finite softmax) and row mask 0: their attention
    output (Meta) and MLP output (both) are then zeroed by the caller.
    """
    b, s = mask.shape[:2]
    mask = mask.reshape(b, s, -1)                                                   # [B, S, N*T]
    if keep_tiles is not None:
        mask = mask.index_select(2, keep_tiles.to(mask.device))
    visible = mask.bool().repeat_interleave(tokens_per_tile, dim=2)[:, None]
    row_mask = visible.any(dim=-1, keepdim=True)
    additive = torch.zeros(visible.shape, dtype=dtype, device=mask.device)
    additive.masked_fill_(~visible & row_mask, torch.finfo(dtype).min)
    return additive, row_mask.to(dtype)


def self_attention_mask(attention_mask: torch.Tensor | None, batch: int, query_len: int, past_len: int,
                        dtype: torch.dtype, device: torch.device,
                        packed: torch.Tensor | None = None) -> torch.Tensor | None:
    """Additive causal + padding mask [B, 1, S, past+S], or None when nothing needs masking.

    A 4-D attention_mask is one already prepared, used as given: floats are additive (0 = attend), booleans
    True = attend, over [B or 1, 1 or heads, S, at least past+S]. `packed` [B, S] (see packed_sequences): tokens
    attend only within their own sequence.
    """
    total = past_len + query_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return _prepared_mask(attention_mask, query_len, total, dtype, device)
    # the shortcut reads the mask on the host, which a compiled graph cannot: compiled, the mask is always built
    shortcut = query_len == 1 and not torch.compiler.is_compiling()
    if attention_mask is not None:
        if attention_mask.shape[-1] < total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the cache and the "
                             f"input span {total}: pass a mask over past and new tokens")
        keep = attention_mask[:, :total].to(device=device).bool()
        if shortcut and bool(keep.all()):
            return None
    elif shortcut:
        return None
    q_pos = torch.arange(past_len, total, device=device)
    allowed = torch.arange(total, device=device)[None, :] <= q_pos[:, None]         # [S, total]
    allowed = allowed[None].expand(batch, -1, -1)
    if attention_mask is not None:
        allowed = allowed & keep[:, None, :]
    if packed is not None:  # (no past tokens then: total == S)
        allowed = allowed & (packed[:, :, None] == packed[:, None, :]).to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _prepared_mask(mask: torch.Tensor, query_len: int, total: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    if mask.shape[-2] != query_len or mask.shape[-1] < total:
        raise ValueError(f"a 4-D attention_mask must be [batch, 1, {query_len} new tokens, >= {total} positions "
                         f"(cache and input)], got {list(mask.shape)}")
    mask = mask[..., :total].to(device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    if not mask.is_floating_point():
        raise ValueError(f"a 4-D attention_mask must be additive floats (0 = attend) or booleans (True = "
                         f"attend), got {mask.dtype}")
    return mask.to(dtype)


def packed_sequences(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Sequences packed into one row (padding-free batches, e.g. DataCollatorWithFlattening) are told apart by
    their positions: a new one starts wherever a position does not follow the one before. Returns the sequence
    index of every token [B, S], or None when each row holds one sequence (read on the host; compiled, the index
    is always returned)."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    index = (step != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and not bool(index[:, -1].any()):
        return None
    return index


class MllamaTextModel(MllamaPreTrainedModel):
    config_class = MllamaTextConfig
    base_model_prefix = "language_model.model"

    def __init__(self, config: MllamaTextConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        # 8 extra rows: Meta's learnable embeddings; row vocab_size is the <|image|> token.
        num_embeddings = config.vocab_size + 8
        pad = config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < num_embeddings else None
        self.embed_tokens = nn.Embedding(num_embeddings, config.hidden_size, padding_idx=pad)
        cross = set(config.cross_attention_layers)
        self.layers = nn.ModuleList(
            MllamaCrossAttentionDecoderLayer(config, i) if i in cross else MllamaSelfAttentionDecoderLayer(config, i)
            for i in range(config.num_hidden_layers))
        self.norm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MllamaRotaryEmbedding(config)
        self.gradient_checkpointing = False  # see MllamaPreTrainedModel.gradient_checkpointing_enable
        self.checkpoint_kwargs: dict = {"use_reentrant": False}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> None:
        return None  # no lm_head here (transformers' answer too)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """The input table with `new_num_tokens` rows (rounded up to a multiple of `pad_to_multiple_of`): old rows
        kept, new rows their mean (or random without mean_resizing); config.vocab_size follows."""
        old = self.embed_tokens
        rows = resized_rows(new_num_tokens, old.num_embeddings, pad_to_multiple_of)
        pad = old.padding_idx if old.padding_idx is not None and old.padding_idx < rows else None
        new = nn.Embedding(rows, old.embedding_dim, padding_idx=pad, device=old.weight.device, dtype=old.weight.dtype)
        copy_resized(old.weight, new.weight, mean_resizing, self.config.initializer_range)
        self.embed_tokens = new
        self.config.vocab_size = self.vocab_size = rows
        return new

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        rows = self.embed_tokens.num_embeddings
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= rows):
            bad = input_ids[(input_ids < 0) | (input_ids >= rows)][:5].tolist()
            raise ValueError(f"input_ids contain ids {bad} outside the embedding table: valid ids are 0..{rows - 1}")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        full_text_row_masked_out_mask: torch.Tensor | None = None,
        cache: MllamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: MllamaCache | None = None,
        output_hidden_states: bool | None = None,
        cross_tiles: torch.Tensor | None = None,
        ids_checked: bool = False,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **unused,
    ) -> ModelOutput | tuple:
        """cross_tiles: indices into the N*T tiles of cross_attention_mask whose vision tokens
        cross_attention_states hold (the others were dropped, see MllamaModel.kept_tiles); None = all tiles.
        It is recorded in the cache, whose later steps select the same mask columns.
        output_attentions: the softmax weights of every layer that runs (self or cross), formed explicitly."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = config_default(self.config, "output_hidden_states", False)
        if output_attentions is None:
            output_attentions = config_default(self.config, "output_attentions", False)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, cache = False, None  # a recomputed layer would write its k/v into the cache a second time
        if use_cache and cache is None:
            cache = MllamaCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is None:
            # (MllamaModel checks them before the vision encoder.) The check reads the ids on the host, which a
            # compiled graph cannot: compiled, an id outside the table fails in the embedding lookup instead.
            if past_len == 0 and not ids_checked and not torch.compiler.is_compiling():
                self._check_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))
        x = inputs_embeds
        b, s = x.shape[:2]
        # Without a mask or a cache (as transformers), given positions that restart mark packed sequences.
        packed = None
        if position_ids is not None and attention_mask is None and cache is None:
            packed = packed_sequences(position_ids.expand(b, -1))
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=x.device)[None].expand(b, -1)
        cos, sin = (t[:, None] for t in self.rotary_emb(x, position_ids))      # [B, 1, S, head_dim]
        self_mask = self_attention_mask(attention_mask, b, s, past_len, x.dtype, x.device, packed)

        if cache is not None and cross_attention_states is not None:
            if cache.cross_length() and (cross_tiles is not None or cache.cross_tiles is not None):
                raise ValueError("images given on a later call cannot be appended to cached images when padding "
                                 "tiles were dropped: set model.model.drop_padding_tiles = False for such caches")
            cache.cross_tiles = cross_tiles
        cross_mask, row_mask = self._cross_masks(cross_attention_mask, full_text_row_masked_out_mask,
                                                 cross_attention_states, cross_tiles, cache, past_len, s, x.dtype)
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if cross_attention_states is None and (cache is None or not cache.has_cross(i)):
                    continue  # text only: no image anywhere, so the layer is the identity (and records nothing)
                args = (x, cross_attention_states, cross_mask, row_mask, cache)
            else:
                args = (x, cos, sin, self_mask, cache)
            if hidden_states is not None:
                hidden_states.append(x)
            x = run_layer(self, layer, *args, attentions=attentions)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        if cache is not None:
            cache.advance(s)
        out = ModelOutput(last_hidden_state=x, cache=cache if use_cache else None,
                          hidden_states=tuple(hidden_states) if hidden_states is not None else None,
                          attentions=tuple(attentions) if attentions is not None else None)
        return finish(out, return_dict, self.config)

    def _cross_masks(self, mask, row_mask, cross_states, cross_tiles, cache, past_len, s, dtype):
        if mask is None:
            return None, row_mask
        if cross_states is not None:
            kv_len = cross_states.shape[1] + (cache.cross_length() if cache is not None else 0)
        elif cache is not None and cache.cross_length():
            kv_len, cross_tiles = cache.cross_length(), cache.cross_tiles
        else:
            return None, None  # no image anywhere: cross layers are skipped
        if mask.is_floating_point() and mask.shape[1] == 1 and mask.shape[-1] == kv_len:
            return mask, row_mask  # already additive [B, 1, S, vision tokens] (transformers' text-model convention)
        # otherwise per tile [B, S, N, T], 1 = the row sees the tile, in any dtype (float masks as the ints)
        if mask.shape[1] > s:  # a mask over the whole sequence: keep the rows of this step
            mask = mask[:, past_len:past_len + s]
        if mask.shape[1] != s:
            raise ValueError(f"cross_attention_mask has {mask.shape[1]} rows for {s} new tokens")
        images_tiles = mask.shape[2] * mask.shape[3] if cross_tiles is None else cross_tiles.numel()
        if kv_len % images_tiles:
            raise ValueError(f"cross_attention_mask covers {mask.shape[2]} images x {mask.shape[3]} tiles "
                             f"({images_tiles} kept), which does not divide the {kv_len} vision tokens given")
        return prepare_cross_attention_mask(mask.to(cross_states.device if cross_states is not None
                                                    else self.norm.weight.device), kv_len // images_tiles, dtype,
                                            cross_tiles)
