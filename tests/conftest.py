"""Shared fixtures; the helpers behind them live in tests/tiny.py."""

from __future__ import annotations

import pytest
import tiny


@pytest.fixture(scope="session")
def tokenizer_path():
    return tiny.tokenizer_path()


@pytest.fixture(scope="session")
def tok():
    return tiny.real_tokenizer()
