"""Training on the plain modules: the loss and the gradient of every parameter equal transformers' (with Meta's
two behaviours patched in, DECISIONS.md), gradient checkpointing changes nothing but what is kept, labels are
masked as the documentation page asks, and frozen parts get no gradient."""
from __future__ import annotations

import pytest
import torch

import oracle
from conftest import IMAGE, PAD, randomize, tiny_config
from test_parity import CASES, make_inputs
from mllama import MllamaForConditionalGeneration
from mllama.training import IGNORE_INDEX, answer_mask_of, labels_of, parts_of, set_trainable


def _model(seed: int = 7) -> MllamaForConditionalGeneration:
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=seed).train()


def _batch() -> dict:
    inputs = make_inputs(*CASES["padded_batch"], 28)
    inputs["labels"] = labels_of(inputs["input_ids"], IMAGE, inputs["attention_mask"])
    return inputs


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_loss_and_every_gradient_equal_transformers():
    ours = _model()
    theirs = oracle.hf_model(ours).train()
    inputs = _batch()
    with oracle.meta_fixes():
        loss_ours = ours(**inputs).loss
        loss_theirs = theirs(**inputs).loss
        loss_ours.backward()
        loss_theirs.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5 * abs(loss_theirs.item())
    ours_grads, theirs_grads = _gradients(ours), _gradients(theirs)
    names = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_grads) == names  # every parameter gets a gradient, in both
    # Per parameter, the difference's norm relative to the gradient's: 1e-5 for every matrix and vector; a scalar
    # gate's gradient is one sum over all it scales, with cancellation, and gets 1e-4 (5e-6 was seen).
    def rel(n: str) -> float:
        return ((ours_grads[n] - theirs_grads[n]).norm() / theirs_grads[n].norm().clamp(min=1e-12)).item()

    tensors = max(rel(n) for n in names if theirs_grads[n].numel() > 1)
    gates = max(rel(n) for n in names if theirs_grads[n].numel() == 1)
    print(f"relative gradient differences: tensors {tensors:.1e}, scalar gates {gates:.1e}")
    assert tensors <= 1e-5 and gates <= 1e-4, (tensors, gates)


def test_gradient_checkpointing_recomputes_layers_and_changes_no_gradient():
    plain, checkpointed = _model(), _model()
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    calls = {"text": 0, "vision": 0}
    text_layer = checkpointed.model.language_model.layers[0]
    vision_layer = checkpointed.model.vision_model.transformer.layers[0]
    text_layer.register_forward_pre_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    vision_layer.register_forward_pre_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    for model in (plain, checkpointed):
        model(**_batch()).loss.backward()
    assert calls == {"text": 2, "vision": 2}  # forward, then again in the backward pass (its start: a
    # recomputation stops once it has what the backward pass needs, so a hook on the end would not see it)
    a, b = _gradients(plain), _gradients(checkpointed)
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-7) for n in a)
    checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.is_gradient_checkpointing


def test_labels_skip_images_padding_and_what_is_not_an_answer():
    ids = torch.tensor([[128000, IMAGE, 5, 6, 7, 8], [128000, 9, 10, 11, PAD, PAD]])
    mask = (ids != PAD).long()
    answers = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    assert labels_of(ids, IMAGE, mask).tolist() == [[128000, IGNORE_INDEX, 5, 6, 7, 8],
                                                    [128000, 9, 10, 11, IGNORE_INDEX, IGNORE_INDEX]]
    assert labels_of(ids, IMAGE, mask, answers).tolist() == [[IGNORE_INDEX] * 3 + [6, 7, IGNORE_INDEX],
                                                             [IGNORE_INDEX] * 2 + [10, 11] + [IGNORE_INDEX] * 2]
    with pytest.raises(ValueError, match="answer_mask has shape"):
        labels_of(ids, IMAGE, mask, answers[:, :3])


def test_frozen_parts_get_no_gradient_and_the_rest_do():
    model = _model()
    counts = set_trainable(model, vision=False, projector=False, text=False, cross=True)
    assert counts["vision"] == counts["projector"] == counts["text"] == 0 and counts["cross"] > 0
    model(**_batch()).loss.backward()
    cross = {id(p) for m in parts_of(model)["cross"] for p in m.parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in cross), name
    assert set_trainable(model, vision=True)["vision"] == sum(p.numel() for p in model.model.vision_model.parameters())
    with pytest.raises(ValueError, match="unknown parts \\['encoder'\\]"):
        set_trainable(model, encoder=False)
    with pytest.raises(ValueError, match="text must be True or False"):
        set_trainable(model, text="lora")


def test_the_answer_mask_covers_each_assistant_answer_through_its_end_token(tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Hello there"}]},
                    {"role": "user", "content": [{"type": "text", "text": "And the assistant said?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Nothing more"}]}]
    batch = processor.apply_chat_template([conversation, conversation[:2]], tokenize=True, return_tensors="pt",
                                          return_dict=True, padding=True)
    ids = batch["input_ids"]
    mask = answer_mask_of(ids, processor.tokenizer)
    decode = processor.tokenizer.decode
    assert decode(ids[0][mask[0].bool()], skip_special_tokens=False) == "Hello there<|eot_id|>Nothing more<|eot_id|>"
    assert decode(ids[1][mask[1].bool()], skip_special_tokens=False) == "Hello there<|eot_id|>"
    length = int(batch["attention_mask"][1].sum())
    cut = ids[1:, :length - 2]  # an answer truncated before its end token runs to the end
    assert decode(cut[0][answer_mask_of(cut, processor.tokenizer)[0].bool()]) == "Hello"
