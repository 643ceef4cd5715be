"""The composite models (vision tower + projector + text decoder + lm_head) and loading/saving for all five."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MllamaConfig, MllamaTextConfig
from ..generation import GenerationMixin
from .base import MllamaPreTrainedModel, copy_resized
from .outputs import ModelOutput, config_default, finish
from .text import MllamaTextModel
from .vision import MllamaVisionModel

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, image_token_id: int | None = None,
                   num_items_in_batch: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t+1]; -100 is ignored.

    Labels outside the lm_head's range (the <|image|> token is one: it has an input embedding but no output
    row) are refused with a message rather than left to fail inside the kernel.
    """
    vocab = logits.shape[-1]
    labels = labels.to(logits.device)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        values = sorted(set(labels[bad].tolist()))[:5]
        hint = (f"; {image_token_id} is the <|image|> token, which the model never predicts: set those labels "
                f"to -100" if image_token_id in values else "")
        raise ValueError(f"labels contain ids {values} outside 0..{vocab - 1} (or -100 to ignore){hint}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().reshape(-1, vocab), shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _keep_logits(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


class _EmbeddingsMixin:
    """Input/output embedding access and resizing shared by the two models with an lm_head."""

    def _text_config(self) -> MllamaTextConfig:
        return getattr(self.config, "text_config", self.config)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new: nn.Linear) -> None:
        self.lm_head = new

    def _get_resized_lm_head(self, old_lm_head: nn.Linear, new_num_tokens: int | None = None,
                             transposed: bool = False, mean_resizing: bool = True) -> nn.Linear:
        """A copy of `old_lm_head` with `new_num_tokens` output rows; new rows are the mean of the old ones
        (transformers samples them around that mean with 1e-9 of the covariance) or random with
        mean_resizing=False. `transposed`: the weight is stored [in, out] (mllama's never is)."""
        if new_num_tokens is None:
            return old_lm_head
        if transposed:
            raise ValueError("transposed=True is for lm_heads stored [in_features, out_features]; nn.Linear's weight "
                             "is [out_features, in_features]: pass transposed=False")
        new = nn.Linear(old_lm_head.in_features, new_num_tokens, bias=old_lm_head.bias is not None,
                        device=old_lm_head.weight.device, dtype=old_lm_head.weight.dtype)
        std = self._text_config().initializer_range
        copy_resized(old_lm_head.weight, new.weight, mean_resizing, std)
        if old_lm_head.bias is not None:
            copy_resized(old_lm_head.bias, new.bias, mean_resizing, std)
        return new

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resizes the input embeddings and the (untied) lm_head to `new_num_tokens` rows (rounded up to a
        multiple of `pad_to_multiple_of`); the text config's vocab_size follows."""
        embeddings = self.model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.set_output_embeddings(self._get_resized_lm_head(self.lm_head, embeddings.num_embeddings,
                                                             mean_resizing=mean_resizing))
        return embeddings


class MllamaForCausalLM(_EmbeddingsMixin, MllamaPreTrainedModel, GenerationMixin):
    """The text decoder with its lm_head; loads only the text weights of a full Mllama checkpoint."""

    config_class = MllamaTextConfig
    base_model_prefix = "language_model"
    # Its forward traces into one graph (torch.compile(fullgraph=True)): host reads are skipped while compiling.
    # The composite models do not claim it (transformers neither).
    _can_compile_fullgraph = True

    def __init__(self, config: MllamaTextConfig):
        if isinstance(config, MllamaConfig):
            config = config.text_config
        super().__init__(config)
        self.model = MllamaTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cross_attention_states=None,
                cross_attention_mask=None, full_text_row_masked_out_mask=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, past_key_values=None,
                output_hidden_states: bool | None = None, num_items_in_batch=None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **unused) -> ModelOutput | tuple:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask,
                         full_text_row_masked_out_mask=full_text_row_masked_out_mask,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, return_dict=True)
        logits = self.lm_head(_keep_logits(out.last_hidden_state, logits_to_keep)).float()
        loss = causal_lm_loss(logits, labels, None, num_items_in_batch) if labels is not None else None
        return finish(ModelOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                  attentions=out.attentions), return_dict, self.config)


class MllamaModel(MllamaPreTrainedModel):
    """Vision tower, projector and text decoder; returns the decoder's last hidden state."""

    config_class = MllamaConfig
    published_layout = True
    drop_padding_tiles = True  # see kept_tiles; False keeps every tile's vision tokens

    def __init__(self, config: MllamaConfig):
        super().__init__(config)
        self.vision_model = MllamaVisionModel(config.vision_config)
        self.language_model = MllamaTextModel(config.text_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.vision_output_dim,
                                               config.text_config.hidden_size, bias=True)
        self.post_init()

    @property
    def vocab_size(self) -> int:
        return self.language_model.vocab_size

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> None:
        return None  # the lm_head belongs to MllamaForConditionalGeneration

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resizes the text model's input embeddings (there is no lm_head here) and the text vocab_size."""
        return self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def kept_tiles(self, cross_attention_mask: torch.Tensor | None, pixel_values: torch.Tensor,
                   keep_all: bool = False) -> torch.Tensor | None:
        """Indices into the N*T tiles of the tiles that some row of the batch sees, or None to keep them all.

        Under Meta's semantics a key masked for every row contributes nothing (rows that see no image are
        zeroed), so the tokens of the other tiles can leave after the vision encoder, which still needs them, and
        before the projector and the cross k/v. transformers' unmasked rows attend to every key: nothing dropped.
        Later decode steps must not see a tile that no row of this mask saw (generate's never do).
        """
        mask = cross_attention_mask
        if (not self.drop_padding_tiles or self.config.text_config.compat != "meta" or mask is None or keep_all
                or mask.shape[2:] != pixel_values.shape[1:3]):  # (a per-tile mask, int or float, only)
            return None
        seen = mask.reshape(mask.shape[0] * mask.shape[1], -1).bool().any(dim=0)     # [N*T]
        if int(seen.sum()) in (0, seen.numel()):
            return None  # nothing to drop, or no row sees an image (then every cross layer is the identity)
        return seen.nonzero()[:, 0]

    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor, keep_tiles: torch.Tensor | None = None,
                      vision_runner=None) -> torch.Tensor:
        """Pixels [B, N, T, 3, H, W] -> projected vision tokens [B, N*T*1601, hidden], image-major; with
        `keep_tiles` (indices into the N*T tiles) only those tiles' tokens. `vision_runner`: something that
        computes vision_model's function another way (engine.fast.VisionGraphs replays it as CUDA graphs)."""
        encoder = self.vision_model if vision_runner is None else vision_runner
        return self.project_images(encoder(pixel_values, aspect_ratio_ids, aspect_ratio_mask).last_hidden_state,
                                   keep_tiles)

    def project_images(self, vision: torch.Tensor, keep_tiles: torch.Tensor | None = None) -> torch.Tensor:
        """The vision model's features [B, N, T, 1601, 7680] -> projected vision tokens, as in encode_images."""
        vision = vision.flatten(1, 2)                                        # [B, N*T, 1601, 7680]
        if keep_tiles is not None:
            vision = vision.index_select(1, keep_tiles.to(vision.device))
        projected = self.multi_modal_projector(vision)                       # [B, K, 1601, hidden]
        return projected.reshape(projected.shape[0], -1, projected.shape[-1])

    def check_image_inputs(self, input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                           cross_attention_mask) -> None:
        """The checks of a forward with images, the ids' included: all host reads, so a caller runs them before
        it queues the vision encoder (after it, they would hold the text prefill's launches until it finished)."""
        if pixel_values.dim() != 6:
            raise ValueError(f"pixel_values must be [batch, images, tiles, 3, height, width], got shape "
                             f"{list(pixel_values.shape)}")
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("pixel_values need aspect_ratio_ids and aspect_ratio_mask (the processor returns "
                             "all three)")
        if cross_attention_mask is not None and cross_attention_mask.shape[2] != pixel_values.shape[1]:
            raise ValueError(f"cross_attention_mask covers {cross_attention_mask.shape[2]} images per sample "
                             f"but pixel_values has {pixel_values.shape[1]}")
        if input_ids is not None:
            self.language_model._check_ids(input_ids)

    def forward(self, input_ids=None, pixel_values=None, aspect_ratio_mask=None, aspect_ratio_ids=None,
                attention_mask=None, cross_attention_mask=None, cross_attention_states=None, position_ids=None,
                cache=None, inputs_embeds=None, use_cache=None, past_key_values=None,
                output_hidden_states: bool | None = None, cross_tiles=None,
                ids_checked: bool = False, output_attentions: bool | None = None, return_dict: bool | None = None,
                **unused) -> ModelOutput | tuple:
        """Two arguments serve callers that encode the images themselves (the engines, which replay the vision
        encoder as CUDA graphs) and cannot live outside the forward: cross_tiles, with cross_attention_states
        from encode_images(keep_tiles=kept_tiles(...)), names the tiles those states hold (the mask's other
        columns are dropped to match); ids_checked says the caller checked the ids (check_image_inputs), since
        the check reads them on the host, which a captured graph cannot. With output_attentions every tile is
        kept, so that the cross-attention weights cover all vision tokens."""
        if output_attentions is None:
            output_attentions = config_default(self.config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = config_default(self.config, "output_hidden_states", False)
        image_outputs = None
        if pixel_values is not None and cross_attention_states is not None:
            raise ValueError("pass pixel_values or cross_attention_states, not both")
        if pixel_values is not None:
            if not ids_checked:
                self.check_image_inputs(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                                        cross_attention_mask)
            ids_checked = True
            cross_tiles = self.kept_tiles(cross_attention_mask, pixel_values, keep_all=bool(output_attentions))
            image_outputs = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            cross_attention_states = self.project_images(image_outputs.last_hidden_state, cross_tiles)
        out = self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  ids_checked=ids_checked,
                                  cross_attention_states=cross_attention_states,
                                  cross_attention_mask=cross_attention_mask, cross_tiles=cross_tiles,
                                  cache=cache if cache is not None else past_key_values,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                  return_dict=True)
        if image_outputs is not None:  # the vision model's output, last as in transformers
            out["image_outputs"] = ModelOutput(last_hidden_state=image_outputs.last_hidden_state)
        return finish(out, return_dict, self.config)


class MllamaForConditionalGeneration(_EmbeddingsMixin, MllamaPreTrainedModel, GenerationMixin):
    """Images + text in, next-token logits out."""

    config_class = MllamaConfig
    published_layout = True

    def __init__(self, config: MllamaConfig):
        super().__init__(config)
        self.model = MllamaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    @property
    def vision_model(self) -> MllamaVisionModel:
        return self.model.vision_model

    @property
    def language_model(self) -> MllamaTextModel:
        return self.model.language_model

    def forward(self, input_ids=None, pixel_values=None, aspect_ratio_mask=None, aspect_ratio_ids=None,
                attention_mask=None, cross_attention_mask=None, cross_attention_states=None, position_ids=None,
                cache=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values=None,
                output_hidden_states: bool | None = None, num_items_in_batch=None,
                cross_tiles=None, ids_checked: bool = False, output_attentions: bool | None = None,
                return_dict: bool | None = None, **unused) -> ModelOutput | tuple:
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, aspect_ratio_mask=aspect_ratio_mask,
                         aspect_ratio_ids=aspect_ratio_ids, attention_mask=attention_mask,
                         cross_attention_mask=cross_attention_mask, cross_attention_states=cross_attention_states,
                         position_ids=position_ids, cache=cache if cache is not None else past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         cross_tiles=cross_tiles, ids_checked=ids_checked,
                         output_attentions=output_attentions, return_dict=True)
        logits = self.lm_head(_keep_logits(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.image_token_index, num_items_in_batch)
        return finish(ModelOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                  attentions=out.attentions, image_outputs=out.image_outputs), return_dict,
                      self.config)
