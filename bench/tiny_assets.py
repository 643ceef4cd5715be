"""The tokenizer and chat-template files of `mllama create-tiny` copied to /tmp/assets, for the serve benches:
    PYTHONPATH=src python bench/tiny_assets.py TOKENIZER_MODEL"""
import os
import shutil
import sys

from mllama.cli import create_tiny

folder = create_tiny('/tmp/tiny', sys.argv[1])
os.makedirs('/tmp/assets', exist_ok=True)
for name in os.listdir(folder):
    if name.startswith(('tokenizer', 'special_tokens', 'chat_template')):
        shutil.copy(folder / name, '/tmp/assets/' + name)
