"""ModelConfig: the shape of a GLM model, read from and written to the official config.json.

Field names are the official ones (`num_layers`, `multi_query_group_num`, `kv_channels`, ...) so nobody
translates. Values that every ChatGLM3 checkpoint shares (RMSNorm, no linear biases but the QKV one,
original rotary) are checked here once, so the model file never branches on them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that glmkit cannot run, with the reason."""


# Settings ChatGLM3 always has; any other value describes a model glmkit does not implement.
_REQUIRED_VALUES = {
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
    "tie_word_embeddings": False,
}

_POSITIVE_INTS = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                  "multi_query_group_num", "padded_vocab_size", "seq_length"}
_POSITIVE_FLOATS = {"layernorm_epsilon", "rope_ratio"}
# Written by to_dict and always the same: not worth keeping in `extra`.
_DEFAULT_ARCHITECTURES = ["ChatGLMModel"]

# Keys only the first-generation ChatGLM-6B (2D positions, GELU, LayerNorm) carries.
_GLM1_KEYS = {"position_encoding_2d", "inner_hidden_size", "max_sequence_length", "layernorm_position"}


@dataclass
class ModelConfig:
    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    padded_vocab_size: int = 65024
    seq_length: int = 8192
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    rmsnorm: bool = True
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    tie_word_embeddings: bool = False
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # Keys of config.json that glmkit neither uses nor rejects, kept so a saved config round-trips.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_groups) * self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Rotary embedding covers the first half of each head's dims."""
        return self.kv_channels // 2

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio

    @property
    def prefix_size(self) -> int:
        """Width of one P-Tuning v2 prefix row: a key and a value per layer and KV group."""
        return self.num_layers * 2 * self.num_kv_groups * self.kv_channels

    def num_parameters(self, include_embedding: bool = True) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        attn = h * self.qkv_size + self.qkv_size + self.num_attention_heads * self.kv_channels * h
        layer = attn + h * 2 * f + f * h + 2 * h
        n = self.num_layers * layer + h + self.padded_vocab_size * h  # blocks, final norm, output layer
        return n + (self.padded_vocab_size * h if include_embedding else 0)

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        for name, want in _REQUIRED_VALUES.items():
            got = getattr(self, name)
            if got != want:
                raise ConfigError(f"config has {name}={got!r}; glmkit implements ChatGLM2/3 models, which "
                                  f"have {name}={want!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _POSITIVE_INTS or (f.name == "pre_seq_len" and value is not None):
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"config has {f.name}={value!r}; it must be a positive integer")
            elif f.name in _POSITIVE_FLOATS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ConfigError(f"config has {f.name}={value!r}; it must be a positive number")
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise ConfigError(f"config has {f.name}={value!r}; it must be true or false")
        if self.num_attention_heads % self.num_kv_groups:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of the "
                              f"{self.num_kv_groups} KV groups (multi_query_group_num)")
        if self.kv_channels % 4:
            raise ConfigError(f"kv_channels={self.kv_channels}: rotary pairs on half of each head need a "
                              "multiple of 4")

    # ---- official config.json -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "chatglm")
        if model_type != "chatglm":
            raise ConfigError(f"unsupported model_type {model_type!r}: glmkit runs ChatGLM3 checkpoints "
                              "(model_type 'chatglm')")
        glm1 = sorted(_GLM1_KEYS & d.keys())
        if glm1:
            raise ConfigError("this is the first-generation ChatGLM-6B layout (2D positions, GELU, LayerNorm; "
                              f"keys {glm1}), which glmkit does not run; use a ChatGLM2/ChatGLM3 checkpoint")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        if extra.get("architectures") == _DEFAULT_ARCHITECTURES:
            del extra["architectures"]
        if kwargs.get("rope_ratio") is None:
            kwargs.pop("rope_ratio", None)  # absent or null means 1
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out = {"model_type": "chatglm", **self.extra, **d}
        out.setdefault("architectures", _DEFAULT_ARCHITECTURES)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS: dict[str, dict[str, Any]] = {
    "chatglm3-6b": {},
    "chatglm3-6b-base": {"seq_length": 32768},
    "chatglm3-6b-32k": {"seq_length": 32768, "rope_ratio": 50},
    "chatglm3-6b-128k": {"seq_length": 131072, "rope_ratio": 500},
    # Small enough for unit tests, with the same structure (MQA groups, padded vocab).
    "tiny": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 160, "num_attention_heads": 4,
             "kv_channels": 16, "multi_query_group_num": 2, "padded_vocab_size": 65024, "seq_length": 2048},
}
