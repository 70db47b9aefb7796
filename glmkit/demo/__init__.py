"""glmkit-demo: a tiny bilingual ChatGLM3-architecture model that glmkit trains from nothing.

synth (the synthetic conversations and corpus), content (their words), build (the recipe:
`python -m glmkit.demo.build --out DIR --seed 0`), evaluate (tool use on held-out prompts).
The built model ships in `model/` beside this file; `model_dir()` finds it.
"""

from __future__ import annotations

from pathlib import Path

from .content import NAME

MODEL_DIR = Path(__file__).resolve().parent / "model"


def model_dir() -> Path:
    """The bundled demo model's folder; FileNotFoundError, saying how to build it, when it is absent."""
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the bundled {NAME} model is not at {MODEL_DIR}; build it with "
                                f"`python -m glmkit.demo.build --out DIR` and copy DIR/model there")
    return MODEL_DIR
