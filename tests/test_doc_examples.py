"""The documentation page's two usage examples, verbatim except for the import, the model id (a local tiny
checkpoint) and the image URL (served from 127.0.0.1)."""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import threading

import pytest
from PIL import Image

INSTRUCT = '''
from transformers import AutoProcessor, MllamaForConditionalGeneration


model_id = "meta-llama/Llama-3.2-11B-Vision-Instruct"
model = MllamaForConditionalGeneration.from_pretrained(model_id, device_map="auto")
processor = AutoProcessor.from_pretrained(model_id)

messages = [
    [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": "https://llava-vl.github.io/static/images/view.jpg"},
                {"type": "text", "text": "What does the image show?"}
            ]
        }
    ],
]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=25)
print(processor.decode(output[0]))
'''

BASE = '''
import requests
from PIL import Image

from transformers import AutoProcessor, MllamaForConditionalGeneration


model_id = "meta-llama/Llama-3.2-11B-Vision"
model = MllamaForConditionalGeneration.from_pretrained(model_id, device_map="auto")
processor = AutoProcessor.from_pretrained(model_id)

prompt = "<|image|>If I had to write a haiku for this one"
url = "https://llava-vl.github.io/static/images/view.jpg"
raw_image = Image.open(requests.get(url, stream=True).raw)

inputs = processor(text=prompt, images=raw_image, return_tensors="pt").to(model.device)
output = model.generate(**inputs, do_sample=False, max_new_tokens=25)
print(processor.decode(output[0], skip_special_tokens=True))
'''


@contextlib.contextmanager
def image_server(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def localise(source: str, model_dir, base_url: str) -> str:
    out = source.replace("from transformers import", "from mllama import")
    out = out.replace('"meta-llama/Llama-3.2-11B-Vision-Instruct"', repr(str(model_dir)))
    out = out.replace('"meta-llama/Llama-3.2-11B-Vision"', repr(str(model_dir)))
    out = out.replace("https://llava-vl.github.io/static/images/view.jpg", f"{base_url}/view.jpg")
    assert out.count("mllama") == 1 and "transformers" not in out
    return out


@pytest.mark.parametrize("name,source", [("instruct", INSTRUCT), ("base", BASE)])
def test_documentation_example_runs(name, source, tiny_checkpoint, tmp_path, capsys):
    Image.radial_gradient("L").convert("RGB").resize((640, 480)).save(tmp_path / "view.jpg")
    with image_server(tmp_path) as base_url:
        exec(compile(localise(source, tiny_checkpoint, base_url), f"<doc example {name}>", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed
    if name == "instruct":
        # the prompt is printed back with its special tokens, then 25 new tokens
        assert printed.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What does")
    else:
        assert printed.startswith("If I had to write a haiku for this one")
