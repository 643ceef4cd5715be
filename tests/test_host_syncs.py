"""Host reads of device values in the prefill happen before the vision encoder is queued: a read after it would
make the host wait for the whole encoder before it can queue the text prefill (on a GPU, the two overlap)."""
from __future__ import annotations

import pytest
import torch

from conftest import BOS, IMAGE, randomize, tiny_config
from test_parity import make_inputs
from mllama import MllamaForConditionalGeneration


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=2).eval()


def test_no_host_read_between_the_vision_encoder_and_the_text_prefill(model, monkeypatch):
    inputs = make_inputs([[BOS, IMAGE, 5, 6, 7], [BOS, 8, IMAGE, 9, 10]], [[2], [4]], 28)
    events = []
    # the first encoder work queued is the embedding of the patches
    vision = model.model.vision_model
    original_embed = vision.embed

    def embed(*args, **kwargs):
        events.append("vision")
        return original_embed(*args, **kwargs)

    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: (events.append(_n), _o(self))[1])
    original_int, original_bool = torch.Tensor.__int__, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: (events.append("int"), original_int(self))[1])
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: (events.append("bool"), original_bool(self))[1])
    monkeypatch.setattr(vision, "embed", embed)
    with torch.no_grad():
        model(**inputs)
    monkeypatch.undo()
    assert "vision" in events
    after = events[events.index("vision") + 1:]
    assert after == [], f"host reads after the vision encoder was queued: {after}"
    assert len(events) > 1  # the probe sees the reads that happen before it (ids check, tile counts)


def test_bad_ids_are_refused_before_any_image_is_encoded(model, monkeypatch):
    inputs = make_inputs([[BOS, IMAGE, 5, 6, 7]], [[2]], 28)
    inputs["input_ids"][0, 3] = model.model.language_model.embed_tokens.num_embeddings + 3
    monkeypatch.setattr(model.model.vision_model, "forward",
                        lambda *a, **k: pytest.fail("the vision encoder ran before the ids were checked"))
    with pytest.raises(ValueError, match="outside the embedding table"):
        model(**inputs)
