"""Fine-tuning data: JSONL conversations in OpenAI's format read and checked line by line (a bad line is named
with its line number and what is wrong, never a traceback), then batched with any number of images per sample
and labels on the assistant's answers only."""
from __future__ import annotations

import base64
import io
import json

import PIL.Image
import pytest
import torch

from mllama.finetune.data import collate, read_examples

IGNORE = -100


def _data_url(color) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(question, answer, images=()):
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images] + [{"type": "text",
                                                                                        "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from mllama.processing.processor import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_checkpoint))


def test_lines_are_read_checked_and_batched_with_labels_on_the_answers(tmp_path, processor):
    PIL.Image.new("RGB", (60, 20), (0, 90, 200)).save(tmp_path / "blue.png")
    lines = [
        json.dumps(_chat("What is this?", "A red square.", [_data_url((200, 0, 0))])),  # 1
        "{not json",  # 2
        json.dumps({"messages": [{"role": "user", "content": "Only a question"}]}),  # 3
        json.dumps(_chat("And this?", "Blue.", ["blue.png"])),  # 4
        "",  # (an empty line is no example)
        json.dumps(_chat("Missing", "x", ["nowhere.png"])),  # 6
        json.dumps(_chat("Remote", "x", ["https://example.com/a.png"])),  # 7
        json.dumps(_chat("Long " * 300, "x")),  # 8
        json.dumps({"messages": [{"role": "user", "content": "Text only"}, {"role": "assistant",
                                                                           "content": "Fine, thanks."},
                                 {"role": "user", "content": "Two images?"},
                                 {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]}),  # 9
        json.dumps({"messages": [{"role": "robot", "content": "?"}]}),  # 10
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    good, bad = read_examples(tmp_path / "data.jsonl", processor, max_length=256)
    assert [e.line for e in good] == [1, 4, 9]
    assert all(10 < e.tokens < 256 for e in good), [e.tokens for e in good]
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == [2, 3, 6, 7, 8, 10]
    assert reasons[2].startswith("not JSON") and "no assistant answer" in reasons[3]
    assert "nowhere.png" in reasons[6] and "allow_urls" in reasons[7]
    assert "more than the maximum length of 256" in reasons[8] and "role in system, user, assistant" in reasons[10]
    assert str(bad[0]).startswith("line 2: ")
    batch = collate(good, processor)  # one image, one image, none: padded together
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and batch["pixel_values"].shape[:2] == (3, 1)
    decode = processor.tokenizer.decode
    learned = [decode(ids[i][labels[i] != IGNORE], skip_special_tokens=False) for i in range(3)]
    assert learned == ["A red square.<|eot_id|>", "Blue.<|eot_id|>", "Fine, thanks.<|eot_id|>No.<|eot_id|>"]
    assert torch.equal(labels[labels != IGNORE], ids[labels != IGNORE])  # the labels are the ids themselves


def test_a_batch_trains_the_tiny_model(tiny_checkpoint, tmp_path, processor):
    from mllama import MllamaForConditionalGeneration

    (tmp_path / "d.jsonl").write_text(json.dumps(_chat("Hi", "Hello.", [_data_url((9, 9, 9))])) + "\n"
                                      + json.dumps(_chat("Bye", "Goodbye.")) + "\n")
    good, bad = read_examples(tmp_path / "d.jsonl", processor, max_length=512)
    assert not bad and len(good) == 2
    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).train()
    loss = model(**collate(good, processor)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
