"""config.py: the official config.json files of the ChatGLM3 family read exactly; unsupported ones are refused.

The config files are written by the tests with the official keys and values (as published with each
checkpoint), so no download is needed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from glmkit.config import ConfigError, ModelConfig


def official_config(**overrides) -> dict:
    """THUDM/chatglm3-6b's config.json; the other variants differ in the keys given."""
    config = {
        "_name_or_path": "THUDM/chatglm3-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 13696,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 4096,
        "kv_channels": 128,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 32,
        "num_layers": 28,
        "original_rope": True,
        "padded_vocab_size": 65024,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 8192,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "pre_seq_len": None,
        "prefix_projection": False,
    }
    config.update(overrides)
    return config


VARIANTS = {  # name: (the keys that differ from chatglm3-6b, expected seq_length, expected rope_ratio)
    "chatglm3-6b": ({}, 8192, 1.0),
    "chatglm3-6b-base": ({"_name_or_path": "THUDM/chatglm3-6b-base", "seq_length": 32768}, 32768, 1.0),
    "chatglm3-6b-32k": ({"_name_or_path": "THUDM/chatglm3-6b-32k", "seq_length": 32768, "rope_ratio": 50},
                        32768, 50.0),
    "chatglm3-6b-128k": ({"_name_or_path": "THUDM/chatglm3-6b-128k", "seq_length": 131072, "rope_ratio": 500},
                         131072, 500.0),
}


def write(tmp_path: Path, config: dict | list | str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_configs_read_exactly(tmp_path, variant):
    overrides, seq_length, rope_ratio = VARIANTS[variant]
    config = ModelConfig.from_json(write(tmp_path, official_config(**overrides)))
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (28, 4096, 13696)
    assert (config.num_attention_heads, config.kv_channels, config.multi_query_group_num) == (32, 128, 2)
    assert config.multi_query_attention and config.num_kv_groups == 2
    assert (config.padded_vocab_size, config.layernorm_epsilon) == (65024, 1e-5)
    assert (config.seq_length, config.rope_ratio, config.rope_base) == (seq_length, rope_ratio, 10000.0 * rope_ratio)
    assert (config.pre_seq_len, config.prefix_projection) == (None, False)
    assert not config.tie_word_embeddings
    # The shapes the checkpoint's tensors have.
    assert config.qkv_size == 4608  # 32 query heads + 2 x 2 KV groups, 128 dims each
    assert config.rotary_dim == 64
    assert config.prefix_size == 28 * 2 * 2 * 128
    # Keys glmkit does not use are kept, not lost.
    assert config.extra["torch_dtype"] == "float16" and config.extra["eos_token_id"] == 2
    assert config.extra["auto_map"]["AutoConfig"] == "configuration_chatglm.ChatGLMConfig"
    # The named preset is the same model.
    assert dataclasses.replace(config, extra={}) == ModelConfig.preset(variant)


def test_rope_ratio_absent_or_null_means_one(tmp_path):
    assert "rope_ratio" not in official_config()
    assert ModelConfig.from_json(write(tmp_path, official_config())).rope_ratio == 1.0
    assert ModelConfig.from_json(write(tmp_path, official_config(rope_ratio=None))).rope_ratio == 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_keeps_every_official_key(tmp_path, variant):
    original = official_config(**VARIANTS[variant][0])
    config = ModelConfig.from_json(write(tmp_path, original))
    config.save_json(tmp_path / "saved.json")
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert {k: saved[k] for k in original} == original
    assert saved["rope_ratio"] == VARIANTS[variant][2]
    assert ModelConfig.from_json(tmp_path / "saved.json") == config


def test_round_trip_of_a_prefix_config(tmp_path):
    config = dataclasses.replace(ModelConfig.preset("tiny"), pre_seq_len=128, prefix_projection=True)
    config.save_json(tmp_path / "config.json")
    again = ModelConfig.from_json(tmp_path / "config.json")
    assert dataclasses.replace(again, extra={}) == config
    assert (again.pre_seq_len, again.prefix_projection) == (128, True)


def test_round_trip_of_a_config_built_in_code_is_equal(tmp_path):
    config = ModelConfig.preset("tiny")
    config.save_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config


def test_first_generation_chatglm_6b_is_refused_by_name(tmp_path):
    glm1 = {  # THUDM/chatglm-6b's config.json
        "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
        "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28,
        "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
        "use_cache": True, "vocab_size": 130528,
    }
    with pytest.raises(ConfigError, match="first-generation ChatGLM-6B.*inner_hidden_size.*ChatGLM2/ChatGLM3"):
        ModelConfig.from_json(write(tmp_path, glm1))


@pytest.mark.parametrize("model_type", ["llama", "glm", "glm4"])
def test_wrong_model_type(tmp_path, model_type):
    with pytest.raises(ConfigError, match=f"unsupported model_type '{model_type}'.*'chatglm'"):
        ModelConfig.from_json(write(tmp_path, official_config(model_type=model_type)))


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", 0, "num_layers=0; it must be a positive integer"),
    ("hidden_size", -4096, "hidden_size=-4096; it must be a positive integer"),
    ("multi_query_group_num", 0, "multi_query_group_num=0; it must be a positive integer"),
    ("multi_query_group_num", 3, "num_attention_heads=32 is not a multiple of the 3 KV groups"),
    ("kv_channels", 126, "kv_channels=126: rotary pairs on half of each head need a multiple of 4"),
    ("rope_ratio", 0, "rope_ratio=0; it must be a positive number"),
    ("rope_ratio", -50, "rope_ratio=-50; it must be a positive number"),
    ("pre_seq_len", 0, "pre_seq_len=0; it must be a positive integer"),
    ("add_bias_linear", True, "add_bias_linear=True; glmkit implements ChatGLM2/3 models, which have "
                              "add_bias_linear=False"),
    ("add_qkv_bias", False, "add_qkv_bias=False"),
    ("rmsnorm", False, "rmsnorm=False"),
    ("post_layer_norm", False, "post_layer_norm=False"),
    ("original_rope", False, "original_rope=False"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("apply_residual_connection_post_layernorm", True, "apply_residual_connection_post_layernorm=True"),
])
def test_invalid_values_are_refused_by_name(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_json(write(tmp_path, official_config(**{key: value})))


def test_multi_head_attention_is_allowed():
    config = ModelConfig.from_dict(official_config(multi_query_attention=False))
    assert config.num_kv_groups == 32 and config.qkv_size == 3 * 4096


@pytest.mark.parametrize("key, value", [
    ("num_layers", "28"), ("hidden_size", None), ("num_layers", 2.5), ("rope_ratio", "50"),
])
def test_values_of_the_wrong_type_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(official_config(**{key: value}))


def test_file_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        ModelConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ModelConfig.from_json(write(tmp_path, "{\"num_layers\": 28,"))
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        ModelConfig.from_json(write(tmp_path, [1, 2]))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'chatglm3-7b'; known: chatglm3-6b, "):
        ModelConfig.preset("chatglm3-7b")
