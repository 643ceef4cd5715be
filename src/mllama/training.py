"""What fine-tuning needs beside the model's own loss (`labels=` in forward): labels masked as the documentation
page asks (never the <|image|> token, never padding, and optionally only the assistant's answers), and which
parts of the model train.

Training runs the plain modules (the fast paths of generate and the serving engine are inference-only);
`model.gradient_checkpointing_enable()` recomputes each decoder and vision encoder layer in the backward pass.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100  # labels the loss skips (modeling.mllama.causal_lm_loss)

PARTS = ("vision", "projector", "cross", "text")


def labels_of(input_ids: torch.Tensor, image_token_id: int, attention_mask: torch.Tensor | None = None,
              answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for `input_ids` [batch, length]: the ids themselves, with IGNORE_INDEX where the loss must not
    look: the <|image|> token (the model never predicts it), padding (attention_mask 0) and, given an
    `answer_mask` (answer_mask_of), everything outside the assistant's answers."""
    labels = input_ids.clone()
    drop = input_ids == image_token_id
    for name, mask in (("attention_mask", attention_mask), ("answer_mask", answer_mask)):
        if mask is None:
            continue
        mask = torch.as_tensor(mask, device=input_ids.device)
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; input_ids has {tuple(input_ids.shape)}")
        drop |= mask == 0
    return labels.masked_fill(drop, IGNORE_INDEX)


def answer_mask_of(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """1 over the assistant's answers in chat-formatted ids, 0 elsewhere: after each
    "<|start_header_id|>assistant<|end_header_id|>\\n\\n" the answer's tokens through its <|eot_id|> (so that the
    model learns to end it; an answer cut off by truncation runs to the end). The published chat template has no
    {% generation %} block, so the processor's return_assistant_tokens_mask marks nothing: this is the mask to
    give labels_of instead."""
    def ids(text: str, special: bool = False) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(text)] if special else tokenizer.encode(text, add_special_tokens=False)

    header = ids("<|start_header_id|>", True) + ids("assistant") + ids("<|end_header_id|>", True) + ids("\n\n")
    eot = ids("<|eot_id|>", True)[0]
    mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(input_ids.tolist()):
        i = 0
        while i <= len(sequence) - len(header):
            if sequence[i:i + len(header)] != header:
                i += 1
                continue
            start = end = i + len(header)
            while end < len(sequence) and sequence[end] != eot:
                end += 1
            mask[row, start:end + 1] = 1
            i = end + 1
    return mask


def parts_of(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each part of an Mllama model: "vision" (the vision tower), "projector" (vision -> text),
    "cross" (the cross-attention decoder layers), "text" (the self-attention decoder layers, embeddings, final
    norm and lm_head). A text-only model has the last two."""
    inner = getattr(model, "model", model)
    text = getattr(inner, "language_model", inner)
    cross = [layer for layer in text.layers if hasattr(layer, "cross_attn")]
    plain = [layer for layer in text.layers if not hasattr(layer, "cross_attn")]
    parts = {"cross": cross, "text": plain + [text.embed_tokens, text.norm]
             + ([model.lm_head] if hasattr(model, "lm_head") else [])}
    if hasattr(inner, "vision_model"):
        parts["vision"] = [inner.vision_model]
        parts["projector"] = [inner.multi_modal_projector]
    return parts


def set_trainable(model: nn.Module, **parts: bool) -> dict[str, int]:
    """Which parts train (PARTS: vision, projector, cross, text; each True or False; parts not named stay as
    they are), as torchtune's recipes offer (frozen or full; LoRA adapters come on top of frozen parts). Returns
    the number of trainable parameters per part."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}: the parts are {', '.join(PARTS)}")
    found = parts_of(model)
    for name, trainable in parts.items():
        if name not in found:
            raise ValueError(f"this model has no {name} part (a text-only model has cross and text)")
        if not isinstance(trainable, bool):
            raise ValueError(f"{name} must be True or False, got {trainable!r}")
        for module in found[name]:
            module.requires_grad_(trainable)
    return {name: sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
            for name, modules in found.items()}
