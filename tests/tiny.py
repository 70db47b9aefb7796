"""What many tests share: the real tokenizer's path and tiny random models and checkpoints.

The official tokenizer is read from ../shared/testdata (never copied into the project); tests that
need it are skipped, saying so, where that folder is absent.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from glmkit.config import ModelConfig
from glmkit.model import ChatGLMForCausalLM

TOKENIZER_MODEL = Path(__file__).resolve().parents[2] / "shared/testdata/chatglm3/tokenizer.model"


def tokenizer_path() -> Path:
    if not TOKENIZER_MODEL.is_file():
        pytest.skip(f"the real ChatGLM3 tokenizer is not at {TOKENIZER_MODEL} (shared test data)")
    return TOKENIZER_MODEL


def real_tokenizer():
    from glmkit.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path())


def tiny_model(seed: int = 0, **overrides) -> ChatGLMForCausalLM:
    """The `tiny` preset with seed-fixed random weights, float32, eval mode."""
    torch.manual_seed(seed)
    config = dataclasses.replace(ModelConfig.preset("tiny"), **overrides)
    return ChatGLMForCausalLM(config).eval()


def make_tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random checkpoint in the official layout, with the real tokenizer.model beside it."""
    from glmkit.loader import save_model

    source = tokenizer_path()  # skips when the tokenizer is absent
    save_model(tiny_model(seed, **overrides), folder)
    shutil.copyfile(source, folder / "tokenizer.model")
    return folder
