"""The training methods: which parameters train, and what a finished run writes.

- full: every parameter trains; the output is a whole checkpoint in the official layout.
- lora: adapters on the linears (glmkit.lora) train, the base is frozen; the output is the adapter.
- ptuning: P-Tuning v2, only `transformer.prefix_encoder` trains; the output is the prefix alone,
  in the official layout (glmkit.loader.save_prefix).

Trainable parameters are float32 whatever the base dtype: bf16 autocast does the compute, and the
optimizer updates full-precision weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from glmkit.lora import apply_lora, save_adapter
from glmkit.model import PrefixEncoder

from .config import TrainConfig

PREFIX_ENCODER = "transformer.prefix_encoder."
PREFIX_DROPOUT = 0.1  # the official model's dropout on the prefix, active in training only


def prepare(model: nn.Module, config: TrainConfig) -> list[str]:
    """Set up `model` for `config.method` (in place); return the names of the parameters that train."""
    if config.method == "lora":
        apply_lora(model, config.lora_targets, config.lora_r, config.lora_alpha, config.lora_dropout)
    elif config.method == "ptuning":
        add_prefix_encoder(model, config.pre_seq_len, config.prefix_projection)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(PREFIX_ENCODER))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return names


def add_prefix_encoder(model: nn.Module, pre_seq_len: int, prefix_projection: bool) -> None:
    """Give `model` a fresh P-Tuning v2 prefix, as the official model builds it for `pre_seq_len`.

    A model that already has one (loaded with a prefix checkpoint) keeps it, if its shape agrees.
    """
    config = model.config
    if config.pre_seq_len:
        if (config.pre_seq_len, config.prefix_projection) != (pre_seq_len, prefix_projection):
            raise ValueError(f"the model already has a prefix of pre_seq_len={config.pre_seq_len}, "
                             f"prefix_projection={config.prefix_projection}; asked for {pre_seq_len}, {prefix_projection}")
        return
    config = dataclasses.replace(config, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    transformer = model.transformer
    device = model.transformer.embedding.word_embeddings.weight.device
    # The model and its transformer share one config object; both read pre_seq_len from it.
    model.config = transformer.config = config
    transformer.prefix_encoder = PrefixEncoder(config).to(device=device, dtype=torch.float32)
    transformer.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)


def save_output(model: nn.Module, config: TrainConfig, out_dir: Path, tokenizer_path: Path | None,
                base_model: str | None = None) -> Path:
    """Write what the run produced into `out_dir`: the checkpoint, the adapter or the prefix."""
    from glmkit.loader import save_model, save_prefix

    if config.method == "lora":
        return save_adapter(model, out_dir, base_model=base_model)
    if config.method == "ptuning":
        return save_prefix(model, out_dir)
    return save_model(model, out_dir, tokenizer_path=tokenizer_path)
