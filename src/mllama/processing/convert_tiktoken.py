"""Convert Meta's tiktoken `tokenizer.model` into tokenizer.json + tokenizer_config.json for the `tokenizers` library.

The result has the layout of the published Llama 3.2-Vision checkpoints: 128,000 byte-level BPE tokens, 256 special
tokens at 128000..128255 and `<|image|>` appended at 128256 (Meta's own tokenizer keeps `<|image|>` at 128011 and
rewrites it to 128256 before the model sees it; the published checkpoints bake that rewrite into the vocabulary).

Command line:
    python -m mllama.processing.convert_tiktoken tokenizer.model OUT_DIR [--instruct] [--chat-template FILE]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Meta's `Tokenizer.pat_str` (llama3/tokenizer.py): cl100k-style chunking with digit groups of at most three.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_BASE_TOKENS = 128_000
NUM_RESERVED_SPECIAL_TOKENS = 256
BOS_TOKEN = "<|begin_of_text|>"
BASE_EOS_TOKEN = "<|end_of_text|>"
INSTRUCT_EOS_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
IMAGE_TOKEN = "<|image|>"
MODEL_MAX_LENGTH = 131_072

_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


def llama32_vision_special_tokens() -> list[str]:
    """The 257 special tokens in id order, starting at 128000, as in the published HF checkpoints.

    Meta names 128011 `<|image|>`; the published checkpoints name it `<|reserved_special_token_2|>`, continue the
    reserved numbering from there (…_246 at 128255) and add `<|image|>` as 128256."""
    # The named list already holds reserved_special_token_0 and _1, so numbering continues at 2.
    num_reserved = NUM_RESERVED_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + num_reserved)]
    return _NAMED_SPECIAL_TOKENS + reserved + [IMAGE_TOKEN]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to U+0100 onwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `<base64 token> <rank>` per line. Blank lines are skipped, as Meta's loader does."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_no}: expected '<base64 token> <rank>', got {line[:80]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and a merge list that makes `tokenizers`' BPE reproduce tiktoken.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. `tokenizers` applies
    merges by their position in the list. Listing every split (left, right) of every token whose two halves are
    tokens, ordered by (rank of the whole, rank of left, rank of right), gives the same result: whichever way the
    pieces of a token were formed, a merge that yields it exists at the token's priority."""
    # bytes.decode("latin-1") turns each byte into the code point of the same value; translate maps it on.
    table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})

    def to_str(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    candidates: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left = ranks.get(token[:i])
            if left is None:
                continue
            right = ranks.get(token[i:])
            if right is None:
                continue
            candidates.append((rank, left, right, token[:i], token[i:]))
    candidates.sort()
    merges = [(to_str(left), to_str(right)) for _, _, _, left, right in candidates]
    return vocab, merges


def build_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` object: BPE + Meta's split regex + byte-level mapping + the specials + a BOS post-processor."""
    if len(ranks) != NUM_BASE_TOKENS or sorted(ranks.values()) != list(range(NUM_BASE_TOKENS)):
        raise ValueError(
            f"expected Meta's Llama 3 tokenizer.model with ranks 0..{NUM_BASE_TOKENS - 1}, "
            f"got {len(ranks)} tokens; is this the Llama 3 / 3.1 / 3.2 file?"
        )
    vocab, merges = vocab_and_merges(ranks)
    # ignore_merges: a pre-token that is itself in the vocabulary is emitted whole, as tiktoken does.
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            # The regex did the chunking; ByteLevel only maps bytes to characters.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = llama32_vision_special_tokens()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for offset, token in enumerate(specials):
        if tok.token_to_id(token) != NUM_BASE_TOKENS + offset:
            raise AssertionError(f"special token {token} got id {tok.token_to_id(token)}, not {NUM_BASE_TOKENS + offset}")
    # The published tokenizer adds BOS on encode (HF's integration tests expect a leading 128000).
    bos_id = NUM_BASE_TOKENS
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tok


def tokenizer_config(instruct: bool) -> dict:
    """tokenizer_config.json in the published form (readable by transformers' PreTrainedTokenizerFast too)."""
    specials = llama32_vision_special_tokens()
    added = {
        str(NUM_BASE_TOKENS + i): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for i, t in enumerate(specials)
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": INSTRUCT_EOS_TOKEN if instruct else BASE_EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        # Byte-level BPE must not have spaces before punctuation removed on decode.
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def default_chat_template_path() -> Path:
    """The published Llama-3.2-Vision-Instruct chat template shipped as package data."""
    return Path(str(resources.files("mllama").joinpath("data/llama32-vision-instruct-chat-template.jinja")))


def convert(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    instruct: bool = False,
    chat_template: str | os.PathLike | None = None,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`.

    With `instruct=True` the eos token is `<|eot_id|>` and, unless `chat_template` names another file, the
    published instruct chat template is written as chat_template.jinja."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(load_tiktoken_ranks(model_path))
    tok.save(str(out / "tokenizer.json"))
    config = tokenizer_config(instruct)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    if chat_template is None and instruct:
        chat_template = default_chat_template_path()
    if chat_template is not None:
        shutil.copyfile(chat_template, out / "chat_template.jinja")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mllama.processing.convert_tiktoken",
        description="Convert Meta's tiktoken tokenizer.model to tokenizer.json + tokenizer_config.json.",
    )
    parser.add_argument("model", help="path to Meta's tokenizer.model (base64 token + rank per line)")
    parser.add_argument("out_dir", help="folder to write the tokenizer files into")
    parser.add_argument("--instruct", action="store_true",
                        help="eos <|eot_id|> and the instruct chat template (default: base model, eos <|end_of_text|>)")
    parser.add_argument("--chat-template", default=None, help="a .jinja file to write as chat_template.jinja")
    args = parser.parse_args(argv)
    out = convert(args.model, args.out_dir, instruct=args.instruct, chat_template=args.chat_template)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
