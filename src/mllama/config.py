"""The three Mllama configs, read from and written to config.json in both generations.

The published checkpoints (transformers 4.45 era) spell RoPE as `rope_theta` + `rope_scaling`; transformers 5
writes one `rope_parameters` dict. Both are read; the published form is written by default so that every
transformers version can load what we save.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

COMPAT_MODES = ("meta", "transformers")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "yarn")
DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]

# Keys of transformers' PretrainedConfig boiler-plate that carry no meaning for these models.
_BOILERPLATE = {
    "transformers_version", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "_name_or_path", "torchscript",
    "use_bfloat16", "pruned_heads", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "is_decoder", "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "tf_legacy_loss", "_attn_implementation_autoset", "model_type", "base_config_key",
}
_HUB_OPTIONS = ("token", "revision", "cache_dir", "local_files_only", "subfolder")
# Keys transformers writes as null when they are unset (every sub-config of its to_dict has them).
_UNSET_WHEN_NONE = {"architectures", "dtype", "torch_dtype"}


def _check_activation(name: str, part: str) -> None:
    from .modeling.activations import check_activation

    check_activation(name, part)


def _check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES} ('meta' = Meta's reference model, the default; "
                         f"'transformers' = transformers >= 4.56 behaviour), got {compat!r}")
    return compat


class _ConfigBase:
    """Plain attribute container with dict/json round-trips; unknown keys are kept and written back."""

    model_type = ""
    attribute_map: dict[str, str] = {}
    # What transformers' code asks of every config: Mllama is a decoder (its cross-attention reads image states,
    # not an encoder's cache), the sub-config classes by attribute name, and every argument has a default.
    is_encoder_decoder = False
    sub_configs: dict[str, type] = {}
    has_no_defaults_at_init = False

    def __init__(self, **extra: Any):
        labels = {key: extra.pop(key) for key in ("num_labels", "id2label", "label2id") if key in extra}
        attn = extra.pop("attn_implementation", extra.pop("_attn_implementation", None))
        for key, value in extra.items():
            if key in _BOILERPLATE or (key in _UNSET_WHEN_NONE and value is None):
                continue
            setattr(self, key, value)
        self._set_labels(**labels)
        if attn is not None or "_attn_implementation_internal" not in self.__dict__:
            self._attn_implementation = attn

    @property
    def _attn_implementation(self) -> str | None:
        """The attention kernel the models built from this config use ('eager' or 'sdpa'; None = the default,
        sdpa). Set on a composite config, it sets every sub-config too; a dict sets those it names, by attribute
        name ('' for the composite itself), and leaves the others as they are, as transformers does."""
        return self.__dict__.get("_attn_implementation_internal")

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        current = self.__dict__.get("_attn_implementation_internal")
        own = value.get("", current) if isinstance(value, dict) else value
        if isinstance(value, dict) and set(value) - {"", *self.sub_configs}:
            raise ValueError(f"attn_implementation keys {sorted(set(value) - {'', *self.sub_configs})} name no "
                             f"sub-config of {type(self).__name__}: valid keys are {sorted(self.sub_configs)} and ''")
        if own is not None and own not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {own!r} is not supported: use one of {ATTN_IMPLEMENTATIONS}")
        object.__setattr__(self, "_attn_implementation_internal", own)
        for key in self.sub_configs:
            sub = self.__dict__.get(key)
            if sub is not None:
                if not isinstance(value, dict):
                    sub._attn_implementation = value
                elif key in value:  # a sub-config the dict leaves out keeps its choice
                    sub._attn_implementation = value[key]

    # Class labels: no Mllama head classifies, but transformers' configs carry them (LABEL_i names, 2 by default);
    # they are kept out of config.json as transformers' defaults are.
    def _set_labels(self, num_labels: int | None = None, id2label: dict | None = None,
                    label2id: dict | None = None) -> None:
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
        elif num_labels is not None or "_id2label" not in self.__dict__:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        else:
            id2label = self._id2label
        object.__setattr__(self, "_id2label", id2label)
        object.__setattr__(self, "_label2id", dict(label2id) if label2id is not None
                           else {v: k for k, v in id2label.items()})

    @property
    def num_labels(self) -> int:
        return len(self._id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != self.num_labels:
            self._set_labels(num_labels=value)

    @property
    def id2label(self) -> dict:
        return self._id2label

    @id2label.setter
    def id2label(self, value: dict) -> None:
        self._set_labels(id2label=value)

    @property
    def label2id(self) -> dict:
        return self._label2id

    @label2id.setter
    def label2id(self, value: dict) -> None:
        object.__setattr__(self, "_label2id", dict(value))

    def __iter__(self):
        """The attribute names, as transformers' configs iterate."""
        return iter([key for key in self.__dict__ if not key.startswith("_")])

    def __getattr__(self, name: str) -> Any:
        target = type(self).attribute_map.get(name)
        if target is not None:
            return getattr(self, target)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(type(self).attribute_map.get(name, name), value)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, default=str)}"

    def to_dict(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            out[key] = value.to_dict() if isinstance(value, _ConfigBase) else copy.deepcopy(value)
        if out.get("compat") == "meta":  # the default is not written, so that transformers reads the file as its own
            del out["compat"]
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any):
        """Like transformers: keyword arguments naming an attribute override it (a dict for a sub-config updates
        it), the others are returned with `return_unused_kwargs=True` and otherwise dropped."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        data = dict(config_dict)
        data.pop("model_type", None)
        config = cls(**data)
        overrides, unused = {}, {}
        for key, value in kwargs.items():
            if key in ("dtype", "torch_dtype") and value == "auto":
                continue
            if not (key in ("dtype", "torch_dtype") or hasattr(config, key)):
                unused[key] = value
                continue
            current = getattr(config, key, None)
            if isinstance(current, _ConfigBase) and isinstance(value, dict):
                value = {**current.to_dict(), **value}
            overrides[key] = value
        if overrides:  # built again, so that the overridden values are validated like any others
            config = cls(**{**data, **overrides})
        return (config, unused) if return_unused_kwargs else config

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> "_ConfigBase":
        """The text decoder's config: `text_config` of a composite config, else the config itself. Mllama has no
        text encoder section, so asking for the encoder side alone (encoder=True or decoder=False) gives self."""
        decoder_side = decoder == encoder or bool(decoder)
        text = self.__dict__.get("text_config")
        return text if decoder_side and text is not None else self

    def to_diff_dict(self) -> dict:
        """The entries of to_dict() that differ from a default-built config of this class (model_type always;
        a sub-config by its own differences)."""
        mine, default = self.to_dict(), type(self)().to_dict()
        out = {}
        for key, value in mine.items():
            sub = self.__dict__.get(key)
            if isinstance(sub, _ConfigBase):
                value = sub.to_diff_dict()
            if key == "model_type" or key not in default or default[key] != mine[key]:
                out[key] = value
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        """`use_diff` is accepted for transformers' signature; the dict never holds transformers' boiler-plate
        keys, so both values give every meaningful field."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.to_json_file(Path(folder) / "config.json")

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike):
        try:
            data = json.loads(Path(json_file).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Where to find config.json (token, revision, cache_dir, local_files_only, subfolder); every other
        keyword overrides an attribute as in from_dict (a dict updates a sub-config)."""
        from .weights import resolve_file

        where = {key: kwargs.pop(key) for key in _HUB_OPTIONS if key in kwargs}
        path = resolve_file(pretrained_model_name_or_path, "config.json", **where)
        data = json.loads(Path(path).read_text())
        # A sub-config asked for from a full Mllama config.json: take the relevant part.
        key = getattr(cls, "base_config_key", None)
        if key and data.get("model_type") == "mllama" and key in data:
            data = data[key]
        return cls.from_dict(data, **kwargs)


class MllamaVisionConfig(_ConfigBase):
    model_type = "mllama_vision_model"
    base_config_key = "vision_config"
    attribute_map = {"num_attention_heads": "attention_heads"}

    def __init__(
        self,
        hidden_size: int = 1280,
        hidden_act: str = "gelu",
        num_hidden_layers: int = 32,
        num_global_layers: int = 8,
        attention_heads: int = 16,
        num_channels: int = 3,
        intermediate_size: int = 5120,
        vision_output_dim: int = 7680,
        image_size: int = 448,
        patch_size: int = 14,
        norm_eps: float = 1e-5,
        max_num_tiles: int = 4,
        intermediate_layers_indices: list[int] | None = None,
        supported_aspect_ratios: list[list[int]] | None = None,
        initializer_range: float = 0.02,
        compat: str = "meta",
        **extra: Any,
    ):
        if "num_attention_heads" in extra:
            attention_heads = extra.pop("num_attention_heads")
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.num_global_layers = num_global_layers
        self.attention_heads = attention_heads
        self.num_channels = num_channels
        self.intermediate_size = intermediate_size
        self.vision_output_dim = vision_output_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.norm_eps = norm_eps
        self.max_num_tiles = max_num_tiles
        self.intermediate_layers_indices = list(
            intermediate_layers_indices if intermediate_layers_indices is not None else [3, 7, 15, 23, 30])
        default_ratios = supported_aspect_ratios is None
        self.supported_aspect_ratios = [list(r) for r in (DEFAULT_ASPECT_RATIOS if default_ratios
                                                          else supported_aspect_ratios)]
        self.initializer_range = initializer_range
        self.compat = _check_compat(compat)
        super().__init__(**extra)
        self._validate(default_ratios)

    def _validate(self, default_ratios: bool) -> None:
        size = self.image_size
        if isinstance(size, dict):
            size = [size.get("height"), size.get("width")]
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"image_size must describe square tiles (one int), got {self.image_size!r}")
            self.image_size = size = int(size[0])
        if size % self.patch_size:
            raise ValueError(f"image_size ({size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by attention_heads "
                             f"({self.attention_heads})")
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"intermediate_layers_indices {bad} out of range: valid indices are 0.."
                             f"{self.num_hidden_layers - 1} (num_hidden_layers={self.num_hidden_layers})")
        expected = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        if self.vision_output_dim != expected:
            raise ValueError(f"vision_output_dim ({self.vision_output_dim}) must equal hidden_size x (1 + "
                             f"len(intermediate_layers_indices)) = {expected}")
        if default_ratios and self.max_num_tiles != 4:
            raise ValueError("max_num_tiles must be 4 with the default supported_aspect_ratios; pass "
                             "supported_aspect_ratios for other tile counts")
        for ratio in self.supported_aspect_ratios:
            if len(ratio) != 2 or ratio[0] < 1 or ratio[1] < 1 or ratio[0] * ratio[1] > self.max_num_tiles:
                raise ValueError(f"supported_aspect_ratios entry {ratio} is not (rows, cols) with rows*cols <= "
                                 f"max_num_tiles ({self.max_num_tiles})")
        _check_activation(self.hidden_act, "vision")

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @property
    def num_patches(self) -> int:
        """Tokens per tile including the class token (1601 for 560-pixel tiles)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads


def _rope_from_legacy(theta: float | None, scaling: dict | None) -> dict:
    params = dict(scaling or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params["rope_theta"] = float(theta if theta is not None else params.get("rope_theta", 500000.0))
    return params


class MllamaTextConfig(_ConfigBase):
    model_type = "mllama_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        hidden_act: str = "silu",
        num_hidden_layers: int = 40,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        intermediate_size: int = 14336,
        rope_parameters: dict | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        cross_attention_layers: list[int] | None = None,
        dropout: float = 0.0,
        bos_token_id: int | None = 128000,
        eos_token_id: int | list[int] | None = 128001,
        pad_token_id: int | None = 128004,
        compat: str = "meta",
        **extra: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        if rope_parameters is not None:
            self.rope_parameters = _rope_from_legacy(rope_parameters.get("rope_theta", rope_theta), rope_parameters)
        else:
            self.rope_parameters = _rope_from_legacy(rope_theta, rope_scaling)
        if self.rope_parameters["rope_type"] in ("llama3", "yarn"):
            self.rope_parameters.setdefault("original_max_position_embeddings", max_position_embeddings)
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.cross_attention_layers = list(cross_attention_layers if cross_attention_layers is not None
                                           else [3, 8, 13, 18, 23, 28, 33, 38])
        self.dropout = dropout
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.compat = _check_compat(compat)
        super().__init__(**extra)
        self._validate()

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        layers = self.cross_attention_layers
        # Entries at or past num_hidden_layers name no layer and are ignored, as transformers does (its default list
        # [3, 8, ..., 38] stays in small configs); they are kept so that the config round-trips unchanged.
        bad = [i for i in layers if not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} are not layer indices: valid indices are 1.."
                             f"{self.num_hidden_layers - 1} (num_hidden_layers={self.num_hidden_layers})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"cross_attention_layers has repeated entries: {layers}")
        if 0 in layers:
            # The cache length and positions are read from the first layer, which must be a self-attention one.
            raise ValueError("cross_attention_layers must not contain 0: layer 0 has to be a self-attention layer")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported: use one of {ROPE_TYPES}")
        needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor"), "linear": ("factor",),
                  "dynamic": ("factor",), "yarn": ("factor",)}
        missing = [k for k in needed.get(rope_type, ()) if k not in self.rope_parameters]
        if missing:
            raise ValueError(f"rope_parameters for rope_type {rope_type!r} lacks {missing}")
        _check_activation(self.hidden_act, "text")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def present_cross_attention_layers(self) -> list[int]:
        """The entries of cross_attention_layers that name a layer of this model."""
        return [i for i in self.cross_attention_layers if i < self.num_hidden_layers]

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @property
    def rope_scaling(self) -> dict | None:
        scaling = {k: v for k, v in self.rope_parameters.items() if k != "rope_theta"}
        return None if scaling.get("rope_type") == "default" and len(scaling) == 1 else scaling

    def to_dict(self, config_format: str = "published") -> dict:
        out = super().to_dict()
        if config_format == "published":
            del out["rope_parameters"]
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = self.rope_scaling
        elif config_format != "transformers5":
            raise ValueError(f"config_format must be 'published' or 'transformers5', got {config_format!r}")
        return out


class MllamaConfig(_ConfigBase):
    model_type = "mllama"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs = {"text_config": MllamaTextConfig, "vision_config": MllamaVisionConfig}

    def __init__(
        self,
        vision_config: MllamaVisionConfig | dict | None = None,
        text_config: MllamaTextConfig | dict | None = None,
        image_token_index: int = 128256,
        compat: str | None = None,
        **extra: Any,
    ):
        if "image_token_id" in extra:
            image_token_index = extra.pop("image_token_id")
        if isinstance(vision_config, dict):
            vision_config = MllamaVisionConfig.from_dict(vision_config)
        if isinstance(text_config, dict):
            text_config = MllamaTextConfig.from_dict(text_config)
        self.vision_config = vision_config if vision_config is not None else MllamaVisionConfig()
        self.text_config = text_config if text_config is not None else MllamaTextConfig()
        self.image_token_index = image_token_index
        super().__init__(**extra)
        if compat is not None:
            self.compat = compat

    # `compat` lives in the sub-configs (the vision and text models are built from them alone); setting it here
    # sets both, so `MllamaConfig(..., compat="transformers")` switches the whole model.
    @property
    def compat(self) -> str:
        return self.text_config.compat

    @compat.setter
    def compat(self, value: str) -> None:
        self.text_config.compat = self.vision_config.compat = _check_compat(value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compat":
            object.__setattr__(self, name, value)  # goes through the property
        else:
            super().__setattr__(name, value)

    def to_dict(self, config_format: str = "published") -> dict:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict(config_format)
        out["vision_config"] = self.vision_config.to_dict()
        out.setdefault("architectures", ["MllamaForConditionalGeneration"])
        return out

    @classmethod
    def llama_3_2_11b(cls, instruct: bool = True, **overrides: Any) -> "MllamaConfig":
        """The shapes of Llama-3.2-11B-Vision(-Instruct)."""
        return cls._preset(hidden=4096, layers=32, cross=8, heads=32, ffn=14336, instruct=instruct, **overrides)

    @classmethod
    def llama_3_2_90b(cls, instruct: bool = True, **overrides: Any) -> "MllamaConfig":
        """The shapes of Llama-3.2-90B-Vision(-Instruct)."""
        return cls._preset(hidden=8192, layers=80, cross=20, heads=64, ffn=28672, instruct=instruct, **overrides)

    @classmethod
    def _preset(cls, hidden: int, layers: int, cross: int, heads: int, ffn: int, instruct: bool,
                **overrides: Any) -> "MllamaConfig":
        freq = math.ceil(layers / cross)
        total = layers + cross
        text = MllamaTextConfig(
            hidden_size=hidden, num_hidden_layers=total, num_attention_heads=heads, num_key_value_heads=8,
            intermediate_size=ffn, cross_attention_layers=list(range(freq - 1, total, freq + 1)),
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            eos_token_id=[128001, 128008, 128009] if instruct else 128001,
        )
        vision = MllamaVisionConfig(image_size=560)
        return cls(vision_config=vision, text_config=text, torch_dtype="bfloat16", **overrides)


PRESETS = {
    "11b": lambda: MllamaConfig.llama_3_2_11b(instruct=False),
    "11b-instruct": lambda: MllamaConfig.llama_3_2_11b(instruct=True),
    "90b": lambda: MllamaConfig.llama_3_2_90b(instruct=False),
    "90b-instruct": lambda: MllamaConfig.llama_3_2_90b(instruct=True),
}
