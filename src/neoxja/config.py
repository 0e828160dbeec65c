"""Model configurations: `GPTNeoXJapaneseConfig` (ABEJA) and `GPTNeoXConfig` (rinna), read from and written to
`config.json` with the same field names, defaults and validation rules as the reference.

Both config.json generations are read: the older one (`rotary_pct`, `rotary_emb_base`, `rope_scaling`) and the
current one (`rope_parameters`). The current one is written. Keys neoxja does not know are kept and written back.
The derived properties at the bottom of `NeoXConfig` (head_dim, rotary_dim, biases, residual form) are what the
single model implementation in modeling.py reads, so one code path serves both families."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import CheckpointError, ConfigError
from .files import write_atomic
from .hub import pop_hub_args, resolve_file

CONFIG_NAME = "config.json"
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")
# Required keys per rope_type, beyond rope_type / rope_theta / partial_rotary_factor.
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
# Keys the reference writes that neoxja derives or ignores rather than keeps as unknown extras.
_DROPPED_KEYS = {"transformers_version", "_name_or_path", "neoxja_version"}


@dataclass(init=False, eq=False)
class NeoXConfig:
    """Fields shared by both families; subclasses set the family's defaults."""

    model_type: ClassVar[str] = ""
    default_partial_rotary_factor: ClassVar[float] = 1.0

    vocab_size: int = 32000
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    bos_token_id: int | None = 31996
    eos_token_id: int | list[int] | None = 31999
    pad_token_id: int | None = None
    rope_parameters: dict[str, Any] | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    is_decoder: bool = False
    tie_word_embeddings: bool = True
    dtype: str | None = None
    architectures: list[str] | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- construction -------------------------------------------------------------------------------------
    def __init__(self, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(self) if f.name != "extra"}
        legacy = {key: kwargs.pop(key) for key in ("rotary_pct", "rotary_emb_base", "rope_scaling") if key in kwargs}
        if "torch_dtype" in kwargs:  # the older spelling of `dtype`
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        extra = dict(kwargs.pop("extra", None) or {})
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            if f.name in kwargs:
                value = kwargs.pop(f.name)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = f.default_factory()  # type: ignore[misc]
            else:
                value = f.default
            setattr(self, f.name, value)
        extra.update({k: v for k, v in kwargs.items() if k not in known and k not in _DROPPED_KEYS})
        self.extra = extra
        if self.dtype is not None:
            self.dtype = str(self.dtype).replace("torch.", "")
        self.rope_parameters = self._standard_rope_parameters(self.rope_parameters, legacy)
        self.validate()

    def _standard_rope_parameters(self, rope: dict | None, legacy: dict) -> dict[str, Any]:
        """One dict with rope_type, rope_theta and partial_rotary_factor, whichever generation the input was.

        A key already in the dict wins over the legacy top-level key (set-if-absent), as in the reference."""
        params = dict(legacy.get("rope_scaling") or rope or {})
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", legacy.get("rotary_emb_base", 10000.0))
        params.setdefault("partial_rotary_factor", legacy.get("rotary_pct", self.default_partial_rotary_factor))
        if params["rope_type"] in ("yarn", "longrope", "llama3"):
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return params

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject values the model cannot be built from, naming the field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _require(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                     and getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        _require(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
                 f"divisible by num_attention_heads ({self.num_attention_heads})")
        _require(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act, f"one of {', '.join(ACTIVATIONS)}")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            _require(_is_number(value) and 0.0 <= value < 1.0, name, value, "a number in [0, 1)")
        _require(_is_number(self.layer_norm_eps) and self.layer_norm_eps > 0, "layer_norm_eps",
                 self.layer_norm_eps, "a positive number")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            _require(value is None or _is_token_id(value), name, value, "a non-negative integer or null")
        eos = self.eos_token_id
        _require(eos is None or _is_token_id(eos) or (isinstance(eos, list) and all(map(_is_token_id, eos))),
                 "eos_token_id", eos, "a non-negative integer, a list of them, or null")
        if self.dtype is not None:
            _require(self.dtype in ("float32", "float16", "bfloat16", "auto"), "dtype", self.dtype,
                     "float32, float16, bfloat16 or auto")
        self._validate_rope()

    def _validate_rope(self) -> None:
        rope = self.rope_parameters
        kind = rope["rope_type"]
        _require(kind in ROPE_REQUIRED, "rope_parameters.rope_type", kind, f"one of {', '.join(ROPE_REQUIRED)}")
        _require(_is_number(rope["rope_theta"]) and rope["rope_theta"] > 0, "rope_parameters.rope_theta",
                 rope["rope_theta"], "a positive number")
        prf = rope["partial_rotary_factor"]
        _require(_is_number(prf) and 0 < prf <= 1, "rope_parameters.partial_rotary_factor", prf, "in (0, 1]")
        _require(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0, "rope_parameters.partial_rotary_factor", prf,
                 f"such that int(head_dim * factor) is even and >= 2 (head_dim {self.head_dim})")
        for key in ROPE_REQUIRED[kind]:
            _require(rope.get(key) is not None, f"rope_parameters.{key}", None, f"set for rope_type {kind!r}")
        if kind in ("linear", "dynamic", "llama3"):
            _require(_is_number(rope["factor"]) and rope["factor"] >= 1, "rope_parameters.factor", rope["factor"],
                     "a number >= 1")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                value = rope[key]
                _require(isinstance(value, list) and len(value) == self.rotary_dim // 2, f"rope_parameters.{key}",
                         value if not isinstance(value, list) else f"a list of {len(value)}",
                         f"a list of rotary_dim/2 = {self.rotary_dim // 2} numbers")

    # ---- derived values the model reads -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters["partial_rotary_factor"])

    @property
    def rotary_pct(self) -> float:
        return self.rope_parameters["partial_rotary_factor"]

    @property
    def rotary_emb_base(self) -> float:
        return self.rope_parameters["rope_theta"]

    @property
    def rope_scaling(self) -> dict[str, Any]:
        return self.rope_parameters

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    # Architecture switches (plain class attributes, not config fields, unless a family makes them fields).
    use_parallel_residual = False
    attention_bias = False  # biases on query_key_value and attention.dense
    mlp_bias = False
    last_layer_dense_bias = False  # ABEJA's separate bias on the last layer's attention output

    # ---- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = _plain(getattr(self, f.name))
        out.update(self.extra)
        if out.get("architectures") is None:
            out.pop("architectures", None)
        if out.get("dtype") is None:
            out.pop("dtype", None)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        return write_atomic(path / CONFIG_NAME, self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "NeoXConfig":
        data = {**data, **overrides}
        model_type = data.pop("model_type", cls.model_type)
        if cls.model_type and model_type != cls.model_type:
            raise ConfigError(f"config.json has model_type {model_type!r}, but {cls.__name__} needs "
                              f"{cls.model_type!r}; use AutoConfig to pick the class from the file")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "NeoXConfig":
        return cls.from_dict(read_config_dict(path))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "NeoXConfig":
        hub_args = pop_hub_args(kwargs)
        path = resolve_file(name_or_path, CONFIG_NAME, **hub_args)
        return cls.from_dict(read_config_dict(path), **kwargs)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]


@dataclass(init=False, eq=False)
class GPTNeoXJapaneseConfig(NeoXConfig):
    """ABEJA GPT-NeoX-Japanese: no linear biases except the last layer's attention `dense_bias`,
    sequential residuals, MLP width hidden_size * intermediate_multiple_size, tied head by default."""

    model_type: ClassVar[str] = "gpt_neox_japanese"

    intermediate_multiple_size: int = 4
    attention_dropout: float = 0.1

    last_layer_dense_bias = True

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.intermediate_multiple_size)

    def validate(self) -> None:
        _require(_is_number(self.intermediate_multiple_size) and self.intermediate_multiple_size > 0,
                 "intermediate_multiple_size", self.intermediate_multiple_size, "a positive number")
        super().validate()


@dataclass(init=False, eq=False)
class GPTNeoXConfig(NeoXConfig):
    """Plain GPT-NeoX (rinna japanese-gpt-neox-3.6b and family): biases on every linear layer (attention ones
    switchable by attention_bias), optional parallel residual, untied head by default."""

    model_type: ClassVar[str] = "gpt_neox"
    default_partial_rotary_factor: ClassVar[float] = 0.25

    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    classifier_dropout: float = 0.1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    use_parallel_residual: bool = True
    attention_bias: bool = True

    mlp_bias = True

    def validate(self) -> None:
        _require(isinstance(self.intermediate_size, int) and self.intermediate_size > 0, "intermediate_size",
                 self.intermediate_size, "a positive integer")
        super().validate()


CONFIG_CLASSES: dict[str, type[NeoXConfig]] = {
    GPTNeoXJapaneseConfig.model_type: GPTNeoXJapaneseConfig,
    GPTNeoXConfig.model_type: GPTNeoXConfig,
}


class AutoConfig:
    """Picks the config class from config.json's `model_type`."""

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> NeoXConfig:
        return config_class_for(model_type)(**kwargs)

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> NeoXConfig:
        hub_args = pop_hub_args(kwargs)
        path = resolve_file(name_or_path, CONFIG_NAME, **hub_args)
        data = read_config_dict(path)
        return config_class_for(data.get("model_type")).from_dict(data, **kwargs)


def config_class_for(model_type: str | None) -> type[NeoXConfig]:
    try:
        return CONFIG_CLASSES[model_type]  # type: ignore[index]
    except KeyError:
        raise ConfigError(f"model_type {model_type!r} is not supported by neoxja (supported: "
                          f"{', '.join(CONFIG_CLASSES)})") from None


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name} = {value!r} is invalid: it must be {expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else value
