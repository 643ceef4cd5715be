"""The Llama 3 tokenizer on the `tokenizers` library, with the calling conventions of transformers' fast tokenizers.

Everything that decides ids lives in tokenizer.json (BPE, split regex, special tokens, the BOS post-processor);
this class adds the special-token names from tokenizer_config.json, padding, truncation, tensors and saving.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer

from .chat_template import load_chat_template, save_chat_template
from .feature import BatchFeature

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja")

# transformers' named special tokens, in its order; those a tokenizer has no use for are None.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "do_not_truncate")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _to_id_lists(ids: Any) -> Any:
    # Accept tensors, arrays, ints and nested lists alike; return plain Python ints.
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    if isinstance(ids, np.ndarray):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_id_lists(i) for i in ids]
    return int(ids)


class MllamaTokenizer:
    """Llama 3 byte-level BPE tokenizer (what transformers calls `PreTrainedTokenizerFast` for this model).

    Build it with `MllamaTokenizer.from_pretrained(folder_or_hub_id)`, or from a `tokenizers.Tokenizer` and the
    special-token names."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None = "<|begin_of_text|>",
        eos_token: str | None = "<|eot_id|>",
        pad_token: str | None = "<|finetune_right_pad_id|>",
        unk_token: str | None = None,
        sep_token: str | None = None,
        cls_token: str | None = None,
        mask_token: str | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int = 131_072,
        chat_template: str | dict[str, str] | None = None,
        split_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
        init_kwargs: dict | None = None,
        **extra: Any,
    ):
        self._tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.sep_token = sep_token
        self.cls_token = cls_token
        self.mask_token = mask_token
        self.padding_side = padding_side
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.split_special_tokens = split_special_tokens
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # What tokenizer_config.json held, so that save_pretrained keeps keys this class does not interpret.
        self.init_kwargs = dict(init_kwargs or {})
        # Other keywords (max_length, padding, truncation, ...) are kept and saved the way transformers keeps them;
        # like transformers, a call does not take its defaults from them.
        self.init_kwargs.update(extra)
        # As in transformers, a named special token that the vocabulary lacks is added to it (at the next id).
        for name in _SPECIAL_TOKEN_KEYS:
            token = getattr(self, name)
            if token is not None and self._tokenizer.token_to_id(token) is None:
                self._tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "MllamaTokenizer":
        """Load from a folder with tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat template
        files) or from a Hub repo id. Keyword arguments override tokenizer_config.json (e.g. `padding_side="left"`);
        `token`, `revision`, `cache_dir`, `local_files_only` go to the Hub download."""
        from ..weights import resolve_folder

        hub_kwargs = {k: kwargs.pop(k) for k in ("token", "revision", "cache_dir", "local_files_only") if k in kwargs}
        for ignored in ("use_fast", "trust_remote_code", "legacy"):  # transformers options with nothing to choose here
            kwargs.pop(ignored, None)
        folder = resolve_folder(name_or_path, allow_patterns=TOKENIZER_FILES, **hub_kwargs)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{name_or_path} has no tokenizer.json; convert Meta's tokenizer.model first with "
                f"`python -m mllama.processing.convert_tiktoken tokenizer.model {folder}`"
            )
        config: dict = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        special_map: dict = {}
        if (folder / "special_tokens_map.json").is_file():
            special_map = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))

        init: dict[str, Any] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
            value = config.get(key, special_map.get(key))
            init[key] = _token_content(value)
        for key in ("padding_side", "truncation_side", "model_max_length", "split_special_tokens"):
            if config.get(key) is not None:
                init[key] = config[key]
        # The published files say clean_up_tokenization_spaces=true, but on byte-level BPE that cleanup deletes
        # real spaces before punctuation ("Hello , world" -> "Hello, world"); like transformers 5 we do not apply
        # it by default. An explicit decode(..., clean_up_tokenization_spaces=True) still does.
        init["chat_template"] = load_chat_template(folder, tokenizer_config=config)
        init.update(kwargs)
        return cls(Tokenizer.from_file(str(tokenizer_file)), init_kwargs=config, **init)

    def save_pretrained(self, save_directory: str | os.PathLike, save_jinja_files: bool = True) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the chat template (if any)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(out / "tokenizer.json"))
        config = {k: v for k, v in self.init_kwargs.items() if k != "chat_template"}
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())
        }
        special_map = {k: getattr(self, k) for k in _SPECIAL_TOKEN_KEYS if getattr(self, k) is not None}
        config.update(special_map)
        config.update(
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            model_max_length=self.model_max_length,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            model_input_names=list(self.model_input_names),
            tokenizer_class="PreTrainedTokenizerFast",
        )
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        written = [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
        if self.chat_template is not None:
            written += save_chat_template(out, self.chat_template, jinja=save_jinja_files)
        return [str(p) for p in written]

    # ------------------------------------------------------------------------------------------------------------
    # Vocabulary and special tokens

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def split_special_tokens(self) -> bool:
        """True: special-token text in the input (e.g. "<|eot_id|>" typed by a user) is encoded as plain text,
        as Meta's tokenizer does; False (default, like transformers): it becomes the special token."""
        return self._tokenizer.encode_special_tokens

    @split_special_tokens.setter
    def split_special_tokens(self, value: bool) -> None:
        self._tokenizer.encode_special_tokens = bool(value)

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without the added special tokens (128,000), as transformers reports it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def sep_token_id(self) -> int | None:
        return self._id_of(self.sep_token)

    @property
    def cls_token_id(self) -> int | None:
        return self._id_of(self.cls_token)

    @property
    def mask_token_id(self) -> int | None:
        return self._id_of(self.mask_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"bos_token": "<|begin_of_text|>", ...}."""
        return {k: getattr(self, k) for k in _SPECIAL_TOKEN_KEYS if getattr(self, k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tokenizer.token_to_id(t) for t in self.all_special_tokens]

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return self._tokenizer.get_added_tokens_decoder()

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Vocabulary ids of byte-level token strings ("Ġthe", "<|image|>"); None for a string not in the vocab."""
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, (int, np.integer)) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            return self._tokenizer.id_to_token(int(ids))
        special = set(self._tokenizer.get_added_tokens_decoder()) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in _to_id_lists(ids) if i not in special]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------------------------------------------------------
    # Encoding

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor | np.ndarray:
        """Token ids of one string. With return_tensors the result has a batch axis of 1, as in transformers."""
        ids = self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
                   return_attention_mask=False)["input_ids"]
        if return_tensors is None:
            return ids
        return BatchFeature({"input_ids": [ids]}, tensor_type=return_tensors)["input_ids"]

    def _encode_batch(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[Any]:
        """`tokenizers` Encodings (ids, character offsets) of each text, truncated to max_length if given."""
        if max_length is None:
            return self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        # Truncate before the post-processor adds BOS, so that max_length counts the BOS, as `tokenizers` does.
        budget = max_length - (self._tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0)
        if budget < 0:
            raise ValueError(f"max_length={max_length} leaves no room for the special tokens the tokenizer adds")
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for enc in encodings:
            enc.truncate(budget, direction=self.truncation_side)
            out.append(self._tokenizer.post_process(enc, None, add_special_tokens))
        return out

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        pad_to_multiple_of: int | None = None,
        return_offsets_mapping: bool = False,
        **unused: Any,
    ) -> BatchFeature:
        """Tokenize one string or a batch.

        padding: False / "do_not_pad", True / "longest", or "max_length" (pads to `max_length`, default
        model_max_length). truncation: True / "longest_first" / "only_first" cut each sequence to `max_length`
        (BOS included). padding_side overrides `self.padding_side` for this call. A single string gives flat
        lists (or a [1, S] tensor with return_tensors="pt"/"np")."""
        unknown = {k for k in unused if k not in ("verbose", "return_token_type_ids")}
        if unknown:
            raise TypeError(f"unexpected keyword arguments for the tokenizer: {sorted(unknown)}")
        is_single = isinstance(text, str)
        texts = [text] if is_single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings, got "
                             f"{type(text).__name__} containing {sorted({type(t).__name__ for t in texts})}")

        truncation = _truncation_strategy(truncation, max_length, padding)
        padding = _padding_strategy(padding)
        if padding == "max_length" and max_length is None:
            max_length = self.model_max_length
        if truncation != "do_not_truncate" and max_length is None:
            max_length = self.model_max_length
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        encodings = self._encode_batch(texts, add_special_tokens,
                                       max_length if truncation != "do_not_truncate" else None)
        ids = [e.ids for e in encodings]
        offsets = [list(e.offsets) for e in encodings] if return_offsets_mapping else None
        masks = [[1] * len(x) for x in ids]
        if padding != "do_not_pad":
            target = max_length if padding == "max_length" else max(len(x) for x in ids)
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token; set tokenizer.pad_token (e.g. '<|finetune_right_pad_id|>')")
            if offsets is not None:
                offsets = [_pad_row(row, target, (0, 0), side) for row in offsets]
            ids, masks = _pad(ids, masks, target, self.pad_token_id, side)

        data: dict[str, Any] = {"input_ids": ids}
        if return_attention_mask is not False:
            data["attention_mask"] = masks
        if offsets is not None:
            data["offset_mapping"] = offsets  # (start, end) characters of each token in its text; (0, 0): none
        if return_tensors is not None and len({len(x) for x in ids}) > 1:
            raise ValueError(
                f"sequences have different lengths {sorted({len(x) for x in ids})}; return_tensors="
                f"{return_tensors!r} needs padding=True (or 'max_length') or return_tensors=None"
            )
        if is_single:
            if return_tensors is None:
                data = {k: v[0] for k, v in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str | list[str]:
        """Text of one id sequence (a batch of sequences gives a list of texts). skip_special_tokens drops every
        special token, including `<|image|>` and the header tokens."""
        ids = _to_id_lists(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        sequences = _to_id_lists(sequences)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        texts = self._tokenizer.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
        return [_clean_up_tokenization(t) for t in texts] if clean_up_tokenization_spaces else texts

    # ------------------------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        padding: bool | str | None = None,
        truncation: bool | str = False,
        max_length: int | None = None,
        tokenizer_kwargs: dict | None = None,
        **template_kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | Any:
        """Render a conversation (or a batch) with the chat template. With tokenize=True (the default, as in
        transformers' tokenizers) the rendered text is encoded without adding special tokens: the whole
        BatchFeature (return_dict=True, the default, as in transformers 5), or only the ids (return_dict=False). return_assistant_tokens_mask=True (needs tokenize and
        return_dict) adds "assistant_masks": 1 on the tokens the template wrote inside
        `{% generation %}...{% endgeneration %}`, the assistant's answers, for fine-tuning on them only."""
        from .chat_template import (
            assistant_token_mask, render_chat_template, resolve_template, warn_without_generation_tag,
        )

        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
        template = resolve_template(self.chat_template, chat_template)
        if return_assistant_tokens_mask:
            warn_without_generation_tag(template)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
        rendered = [
            render_chat_template(template, conv, add_generation_prompt=add_generation_prompt, tools=tools,
                                 documents=documents, generation_spans=spans[i] if return_assistant_tokens_mask
                                 else None, **{**self.special_tokens_map, **template_kwargs})
            for i, conv in enumerate(conversations)
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        if padding is None:
            padding = bool(return_tensors) and batched
        out = self(rendered if batched else rendered[0], add_special_tokens=False, padding=padding,
                   truncation=truncation, max_length=max_length, return_tensors=return_tensors,
                   return_offsets_mapping=return_assistant_tokens_mask, **(tokenizer_kwargs or {}))
        if return_assistant_tokens_mask:
            offsets = _to_id_lists(out.data.pop("offset_mapping"))
            rows = offsets if batched or return_tensors is not None else [offsets]
            masks = [assistant_token_mask(row, row_spans) for row, row_spans in zip(rows, spans)]
            if return_tensors is not None:
                out.data["assistant_masks"] = BatchFeature({"m": masks}, tensor_type=return_tensors)["m"]
            else:
                out.data["assistant_masks"] = masks if batched else masks[0]
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, len={len(self)}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, padding_side={self.padding_side!r})")


def _padding_strategy(padding: bool | str | None) -> str:
    if padding is True:
        return "longest"
    if padding is False or padding is None:
        return "do_not_pad"
    if padding in _PADDING_STRATEGIES:
        return padding
    raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _truncation_strategy(truncation: bool | str | None, max_length: int | None, padding: bool | str | None) -> str:
    if truncation is None:
        # transformers: a max_length given without padding or a truncation flag means "truncate to it".
        no_padding = padding is False or padding is None
        return "longest_first" if max_length is not None and no_padding else "do_not_truncate"
    if truncation is True:
        return "longest_first"
    if truncation is False:
        return "do_not_truncate"
    if truncation in _TRUNCATION_STRATEGIES:
        return truncation
    raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', "
                     f"got {truncation!r}")


def _pad_row(row: list, target: int, value: Any, side: str) -> list:
    fill = [value] * max(target - len(row), 0)
    return row + fill if side == "right" else fill + row


def _pad(ids: list[list[int]], masks: list[list[int]], target: int, pad_id: int, side: str):
    padded_ids, padded_masks = [], []
    for x, m in zip(ids, masks):
        n = max(target - len(x), 0)
        if side == "right":
            padded_ids.append(x + [pad_id] * n)
            padded_masks.append(m + [0] * n)
        else:
            padded_ids.append([pad_id] * n + x)
            padded_masks.append([0] * n + m)
    return padded_ids, padded_masks


def _clean_up_tokenization(text: str) -> str:
    # The WordPiece-era cleanup transformers offers: remove the space before punctuation and contractions.
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
