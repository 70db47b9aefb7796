"""New models for training from scratch: a config sized for a tokenizer, and a fresh initialisation.

`ChatGLMForCausalLM(config)` alone gets PyTorch's layer defaults (embedding rows of norm ~sqrt(hidden),
uniform linears), made for loading weights over them. A model that will be pretrained starts better
as GPT-2 / Megatron models do: every weight normal with std 0.02, biases zero, norms one, and the two
projections that write into the residual stream (`self_attention.dense`, `mlp.dense_4h_to_h`) scaled
down by sqrt(2 * num_layers) so the stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from glmkit.config import ModelConfig
from glmkit.model import ChatGLMForCausalLM, RMSNorm

INIT_STD = 0.02
RESIDUAL_OUTPUTS = ("self_attention.dense", "mlp.dense_4h_to_h")
VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this (the official 65024 is 508 x 128)


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that holds `vocab_size` ids (pieces plus special tokens)."""
    return math.ceil(vocab_size / multiple) * multiple


def scratch_config(vocab_size: int, **fields: Any) -> ModelConfig:
    """A ModelConfig of the given shape whose embedding holds `vocab_size` ids, padded.

    `fields` are ModelConfig fields (num_layers, hidden_size, ...); a `padded_vocab_size` among them
    must hold the vocabulary.
    """
    padded = fields.pop("padded_vocab_size", None) or padded_vocab_size(vocab_size)
    if padded < vocab_size:
        raise ValueError(f"padded_vocab_size={padded} is smaller than the tokenizer's {vocab_size} ids")
    return ModelConfig(padded_vocab_size=padded, **fields)


def new_model(config: ModelConfig, seed: int = 0) -> ChatGLMForCausalLM:
    """A float32 model of `config` with the initialisation for training from scratch; the same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    model = ChatGLMForCausalLM(config)
    residual_std = INIT_STD / math.sqrt(2 * config.num_layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(RESIDUAL_OUTPUTS) else INIT_STD
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return model
