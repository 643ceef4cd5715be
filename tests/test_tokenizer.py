"""The converted tokenizer against tiktoken on Meta's tokenizer.model, and MllamaTokenizer against transformers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_tokenizer import (  # noqa: F401  (fixtures)
    hf_tokenizer, meta_tokenizer_model, tik, tokenizer, tokenizer_dir,
)
from mllama.processing.convert_tiktoken import (
    build_tokenizer, llama32_vision_special_tokens, load_tiktoken_ranks, main, vocab_and_merges,
)
from mllama.processing.tokenizer import MllamaTokenizer

SPECIAL_TEXTS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|image|>",
                 "<|python_tag|>", "<|eom_id|>", "<|reserved_special_token_2|>", "<|reserved_special_token_246|>",
                 "<|finetune_right_pad_id|>", "<|end_of_text|>"]


# ------------------------------------------------------------------------------------------------------------------
# A corpus that stresses every branch of the split regex and of byte-level BPE.


def _code_chunks(limit: int) -> list[str]:
    # Real source text: Python, Markdown and JSON from packages that are installed anyway.
    import jinja2
    import tiktoken

    roots = [Path(jinja2.__file__).parent, Path(tiktoken.__file__).parent, Path(meta_tokenizer_model()).parents[1]]
    chunks = []
    rng = random.Random(1)
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".py", ".md", ".json", ".jinja", ".txt") or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for start in range(0, min(len(text), 20_000), 1500):
                chunks.append(text[start:start + rng.randint(200, 1500)])
    rng.shuffle(chunks)
    return chunks[:limit]


MULTILINGUAL = [
    "日本語のテキストと漢字、ひらがな、カタカナ。", "中文分词测试：我爱北京天安门！", "한국어 문장입니다. 띄어쓰기도 있어요.",
    "العربية: مرحبا بالعالم، كيف حالك؟ ١٢٣٤٥", "עברית: שלום עולם! מה שלומך?", "हिन्दी में लिखा गया वाक्य। १२३",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ", "Ελληνικά: Καλημέρα κόσμε", "Русский текст с ёжиком и Ъ.",
    "emoji 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵, skin 👍🏽, keycap 1️⃣", "Zalgo: Z̴̡̛͉a̷͙̓l̶̰̈́g̸̣̈o̵͖͌",
    "combining: e\u0301 vs \u00e9, n\u0303, a\u030a\u0323", "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≤ ∞ ⊗ ∮", "RTL\u200fmark\u200eLTR\u202atext\u202c",
    "zero\u200bwidth\u200cjoin\u200dhere\ufeffBOM", "Fullwidth ＡＢＣ１２３！", "Tamil தமிழ் Bengali বাংলা Georgian ქართული",
    "Amharic ሰላም Khmer ភាសាខ្មែរ Tibetan བོད་ཡིག", "Mixed 混合 text with 123 and ١٢٣ and ①②③ Ⅻ ½",
    "I'M, you'Re, THEY'LL, she'D, it'S, we'VE, don'T", "'s's't're've'm'll'd", "Ü̈ber ǅ ß ẞ ﬁ ﬂ",
]

WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000", "\u2028", "\u0085",
              "\n\n\n", "    ", "\t\t", " \n ", "\u2029"]

BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
          (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2190, 0x22FF), (0x3040, 0x30FF),
          (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F6FF), (0x20000, 0x200FF)]


def build_corpus() -> list[str]:
    rng = random.Random(1234)
    corpus: list[str] = []
    corpus += _code_chunks(900)
    for _ in range(700):  # multilingual sentences glued with spaces, newlines and punctuation
        parts = rng.sample(MULTILINGUAL, k=rng.randint(1, 4))
        corpus.append(rng.choice([" ", "\n", "", ". ", "\n\n"]).join(parts))
    for _ in range(500):  # digit runs and number formats
        n = rng.randint(1, 40)
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        corpus.append(rng.choice(["", "x", " ", "$", "-", "v"]) + digits + rng.choice(["", ".5", ",000", "%", "e-3"]))
        corpus.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 8))))
    for _ in range(600):  # whitespace runs around words
        pieces = []
        for _ in range(rng.randint(1, 8)):
            pieces.append("".join(rng.choice(WHITESPACE) for _ in range(rng.randint(0, 6))))
            pieces.append(rng.choice(["word", "Word", "x", "123", "!?", "é", "中文", "'s", "()", "def", ""]))
        corpus.append("".join(pieces))
    for n in (50, 200, 1000, 3000):  # long whitespace runs
        corpus.append(" " * n + "end")
        corpus.append("start" + "\n" * n)
        corpus.append("a" + " \t" * n + "b")
    ascii_pool = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    for _ in range(500):  # random ASCII
        corpus.append("".join(rng.choice(ascii_pool) for _ in range(rng.randint(1, 120))))
    for _ in range(800):  # random code points from many blocks
        chars = []
        for _ in range(rng.randint(1, 60)):
            lo, hi = rng.choice(BLOCKS)
            chars.append(chr(rng.randint(lo, hi)))
        corpus.append("".join(chars))
    for _ in range(200):  # random bytes, decoded with replacement characters
        corpus.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))).decode("utf-8", "replace"))
    corpus += ["", " ", "\n", "a", "  leading", "trailing  ", "\u00a0\u00a0x", "x" * 5000, "🙂" * 300]
    return corpus


CORPUS = build_corpus()


def _with_specials(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(1, 6)):
            pieces.append(rng.choice(CORPUS[:2000])[: rng.randint(0, 60)])
            pieces.append(rng.choice(SPECIAL_TEXTS))
        out.append(rng.choice(["", " ", "\n"]).join(pieces))
    return out


# ------------------------------------------------------------------------------------------------------------------
# The converter


def test_corpus_is_large_and_varied():
    assert len(CORPUS) > 4000
    joined = "".join(CORPUS)
    for needle in ("日本", "👩‍👩", "\u0301", "\u05e9", "def ", "\r\n", "\u3000", "0123"):
        assert needle in joined or any(needle in s for s in CORPUS)


def test_converter_layout(tokenizer_dir):
    specials = llama32_vision_special_tokens()
    assert len(specials) == 257
    assert specials[:11] == ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                             "<|python_tag|>"]
    # The published checkpoints: 128011 is reserved_2 (Meta's <|image|> slot), <|image|> is appended at 128256.
    assert specials[11] == "<|reserved_special_token_2|>" and specials[255] == "<|reserved_special_token_246|>"
    assert specials[256] == "<|image|>"
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert len(data["model"]["vocab"]) == 128000
    assert len(data["model"]["merges"]) == 280147
    assert data["model"]["ignore_merges"] is True
    assert [t["id"] for t in data["added_tokens"]] == list(range(128000, 128257))
    assert all(t["special"] for t in data["added_tokens"])
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == \
        ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
    assert (tokenizer_dir / "chat_template.jinja").read_text() == \
        (Path(__file__).resolve().parent / "data/llama32-vision-instruct-chat-template.jinja").read_text()


def test_converter_matches_transformers_tiktoken_converter(tokenizer_dir):
    # transformers' TikTokenConverter reconstructs merges the same way; vocab and merge ORDER must agree.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    theirs = json.loads(TikTokenConverter(vocab_file=str(meta_tokenizer_model())).converted().to_str())
    ours = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert [tuple(m) for m in ours["model"]["merges"]] == [tuple(m) for m in theirs["model"]["merges"]]
    assert ours["pre_tokenizer"] == theirs["pre_tokenizer"]


def test_cli_base_model(tmp_path, capsys):
    main([str(meta_tokenizer_model()), str(tmp_path / "base")])
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|end_of_text|>" and config["pad_token"] == "<|finetune_right_pad_id|>"
    assert not (tmp_path / "base" / "chat_template.jinja").exists()
    base = MllamaTokenizer.from_pretrained(tmp_path / "base")
    assert base.eos_token_id == 128001 and base.chat_template is None
    main([str(meta_tokenizer_model()), str(tmp_path / "inst"), "--instruct"])
    inst = MllamaTokenizer.from_pretrained(tmp_path / "inst")
    assert inst.eos_token_id == 128009 and "Cutting Knowledge Date" in inst.chat_template


def test_merge_reconstruction_on_a_toy_vocabulary():
    # Every split whose halves are tokens is a merge, ordered by (rank of whole, left, right).
    ranks = {bytes([b]): b for b in range(256)}
    for i, tok in enumerate([b"ab", b"bc", b"abc", b"cab"]):
        ranks[tok] = 256 + i
    _, merges = vocab_and_merges(ranks)
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("c", "ab")]


def test_rejects_a_file_that_is_not_llama3(tmp_path):
    path = tmp_path / "tiny.model"
    path.write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match="ranks 0..127999"):
        build_tokenizer(load_tiktoken_ranks(path))


# ------------------------------------------------------------------------------------------------------------------
# Ids against tiktoken


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer_dir):
    # Special-token text encoded as plain text, as Meta's Tokenizer.encode does by default.
    return MllamaTokenizer.from_pretrained(tokenizer_dir, split_special_tokens=True)


def test_ids_identical_to_tiktoken_on_plain_text(plain_tokenizer, tik):
    ours = plain_tokenizer.backend_tokenizer.encode_batch(CORPUS, add_special_tokens=False)
    mismatches = []
    for text, enc in zip(CORPUS, ours):
        if enc.ids != tik.encode(text, allowed_special=set(), disallowed_special=()):
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]!r}"


def test_ids_identical_to_tiktoken_with_specials_recognised(tokenizer, tik):
    # The default (transformers') behaviour: "<|begin_of_text|>" in the text (the corpus has some) is the token.
    ours = tokenizer.backend_tokenizer.encode_batch(CORPUS, add_special_tokens=False)
    assert sum("<|begin_of_text|>" in t for t in CORPUS) > 0
    mismatches = [t for t, enc in zip(CORPUS, ours) if enc.ids != tik.encode(t, allowed_special="all")]
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]!r}"


def test_ids_with_bos_equal_tiktoken_plus_bos(plain_tokenizer, tik):
    for text in CORPUS[::7]:
        assert plain_tokenizer.encode(text) == [128000] + tik.encode(text, disallowed_special=())


def test_special_token_text(tokenizer, plain_tokenizer, tik):
    rng = random.Random(7)
    texts = _with_specials(rng, 800)
    # Default (as transformers): special-token text becomes the special token.
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == tik.encode(text, allowed_special="all"), text
    # split_special_tokens=True: encoded as plain text, as Meta's Tokenizer.encode does.
    for text in texts:
        assert plain_tokenizer.encode(text, add_special_tokens=False) == \
            tik.encode(text, allowed_special=set(), disallowed_special=()), text


def test_meta_tokenizer_agrees_where_ids_coincide(tokenizer, plain_tokenizer):
    # Meta's own wrapper (llama-models) on the 11 named specials; <|image|> is 128011 there, 128256 here.
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(meta_tokenizer_model())
    text = "<|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image.<|eot_id|>"
    meta_ids = meta.encode(text, bos=True, eos=False, allowed_special="all")
    assert [128256 if i == 128011 else i for i in meta_ids] == tokenizer.encode(text)
    for sample in CORPUS[::25]:
        if len(sample) < 20000:
            assert meta.encode(sample, bos=True, eos=False, allowed_special=set(), disallowed_special=()) == \
                plain_tokenizer.encode(sample)


def test_known_ids(tokenizer):
    assert tokenizer.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert tokenizer.encode("<|image|>If I had to write a haiku for this one")[:4] == [128000, 128256, 2746, 358]


# ------------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_round_trips(tokenizer, tik):
    for text in CORPUS:
        ids = tik.encode(text, disallowed_special=())
        assert tokenizer.decode(ids) == text
    decoded = tokenizer.batch_decode([tik.encode(t, disallowed_special=()) for t in CORPUS[:300]])
    assert decoded == CORPUS[:300]


def test_decode_of_partial_utf8_matches_tiktoken(tokenizer, tik):
    # Arbitrary id sequences cut multi-byte characters; both decoders replace invalid bytes with U+FFFD.
    rng = random.Random(3)
    for _ in range(500):
        ids = [rng.randrange(128000) for _ in range(rng.randint(1, 12))]
        assert tokenizer.decode(ids) == tik.decode(ids), ids


def test_decode_options_match_transformers(tokenizer):
    hf = hf_tokenizer(True)
    ids = [128000, 128256, 9906, 1174, 1917, 0, 128009, 128006, 78191, 128007]
    for skip in (False, True):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello , world!assistant"
    assert tokenizer.decode(torch.tensor(ids)) == hf.decode(ids)
    assert tokenizer.decode(np.array(ids)) == hf.decode(ids)
    assert tokenizer.decode(9906) == "Hello"
    batch = torch.tensor([ids, ids[::-1]])
    assert tokenizer.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)
    # Byte-level BPE keeps "Hello , world" by default; an explicit request applies the old cleanup.
    assert tokenizer.decode([9906, 1174, 1917]) == "Hello , world"
    assert tokenizer.decode([9906, 1174, 1917], clean_up_tokenization_spaces=True) == "Hello, world"


# ------------------------------------------------------------------------------------------------------------------
# The tokenizer API against transformers' PreTrainedTokenizerFast on the same files


def test_special_tokens_and_sizes(tokenizer):
    hf = hf_tokenizer(True)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (128000, 128009, 128004)
    assert tokenizer.vocab_size == hf.vocab_size == 128000
    assert len(tokenizer) == len(hf) == 128257
    assert tokenizer.padding_side == hf.padding_side == "right"
    assert tokenizer.special_tokens_map == hf.special_tokens_map
    assert tokenizer.model_max_length == 131072
    tokens = ["<|image|>", "Ġthe", "<|eot_id|>", "not-a-token"]
    assert tokenizer.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens) == [128256, 279, 128009, None]
    assert tokenizer.convert_tokens_to_ids("<|python_tag|>") == 128010
    assert tokenizer.convert_ids_to_tokens([128256, 279, 9906]) == hf.convert_ids_to_tokens([128256, 279, 9906])
    assert tokenizer.convert_ids_to_tokens(128006) == "<|start_header_id|>"
    assert tokenizer.chat_template == hf.chat_template


CALL_CASES = [
    dict(),
    dict(padding=True),
    dict(padding="longest", padding_side="left"),
    dict(padding="max_length", max_length=24),
    dict(padding="max_length", max_length=24, padding_side="left"),
    dict(truncation=True, max_length=5),
    dict(truncation=True, max_length=5, padding=True),
    dict(max_length=4),
    dict(padding=True, pad_to_multiple_of=8),
    dict(add_special_tokens=False, padding=True),
    dict(padding=True, return_attention_mask=False),
]


@pytest.mark.parametrize("kwargs", CALL_CASES)
@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
def test_call_matches_transformers(tokenizer, kwargs, return_tensors):
    hf = hf_tokenizer(True)
    batch = ["Hello world", "A much longer sentence, with commas and 123456 digits", "短い", "<|image|>x"]
    if return_tensors is not None and not kwargs.get("padding"):
        # Ragged lengths cannot become one tensor: we refuse (transformers too for "pt"; for "np" it would
        # build an object array, which no model accepts).
        with pytest.raises(ValueError, match="padding=True"):
            tokenizer(batch, return_tensors=return_tensors, **kwargs)
        if return_tensors == "pt":
            with pytest.raises(ValueError):
                hf(batch, return_tensors=return_tensors, **kwargs)
        batch = batch[:1]
    ours = tokenizer(batch, return_tensors=return_tensors, **kwargs)
    theirs = hf(batch, return_tensors=return_tensors, **kwargs)
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs:
        a, b = ours[key], theirs[key]
        if return_tensors == "pt":
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), key
        elif return_tensors == "np":
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), key
        else:
            assert a == b, key


def test_single_string_call(tokenizer):
    hf = hf_tokenizer(True)
    assert dict(tokenizer("hi there")) == dict(hf("hi there"))
    pt = tokenizer("hi there", return_tensors="pt")
    assert pt["input_ids"].shape == (1, 3) and torch.equal(pt["input_ids"], hf("hi there", return_tensors="pt")["input_ids"])
    assert torch.equal(tokenizer.encode("hi there", return_tensors="pt"), hf.encode("hi there", return_tensors="pt"))
    assert tokenizer.encode("hello there you are", truncation=True, max_length=3) == [128000, 15339, 1070]


def test_padding_side_attribute_is_settable(tokenizer_dir):
    left = MllamaTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    out = left(["a", "a b c"], padding=True)
    assert out["input_ids"][0][0] == 128004 and out["attention_mask"][0][:2] == [0, 0]
    left.padding_side = "right"
    assert left(["a", "a b c"], padding=True)["input_ids"][0][-1] == 128004
    with pytest.raises(ValueError, match="padding_side"):
        left(["a", "b c"], padding=True, padding_side="middle")


def test_bad_inputs_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        tokenizer([1, 2, 3])
    with pytest.raises(ValueError, match="padding must be"):
        tokenizer("a", padding="sideways")
    with pytest.raises(TypeError, match="unexpected keyword"):
        tokenizer("a", return_tensor="pt")


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"} <= \
        {p.name for p in tmp_path.iterdir()}
    again = MllamaTokenizer.from_pretrained(tmp_path)
    text = "<|image|>Round trip ✓ 12345"
    assert again.encode(text) == tokenizer.encode(text)
    assert (again.bos_token, again.eos_token, again.pad_token) == (tokenizer.bos_token, tokenizer.eos_token,
                                                                   tokenizer.pad_token)
    assert again.chat_template == tokenizer.chat_template
    # transformers reads our saved folder too.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text) == tokenizer.encode(text) and hf.eos_token == "<|eot_id|>" and len(hf) == 128257


def test_tokenizer_apply_chat_template(tokenizer):
    hf = hf_tokenizer(True)
    chat = [{"role": "user", "content": "Who are you?"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, date_string="1 Jan 2025")
    assert text == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, date_string="1 Jan 2025")
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, date_string="1 Jan 2025", return_dict=False)
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1


def test_left_truncation_matches_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    ours = MllamaTokenizer.from_pretrained(tokenizer_dir, truncation_side="left")
    theirs = AutoTokenizer.from_pretrained(str(tokenizer_dir), truncation_side="left")
    batch = ["one two three four five", "six seven"]
    assert dict(ours(batch, truncation=True, max_length=3)) == dict(theirs(batch, truncation=True, max_length=3))
    assert ours("one two three four five", max_length=3)["input_ids"] == [128000, 3116, 4330]
    with pytest.raises(ValueError, match="truncation_side"):
        MllamaTokenizer.from_pretrained(tokenizer_dir, truncation_side="middle")
