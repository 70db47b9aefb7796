"""glmkit: run, serve and train the ChatGLM3 family of language models in plain PyTorch.

The names below are imported on first use, so `import glmkit` (and `glmkit --help`) stays quick.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "glmkit.chat", "ChatModel": "glmkit.chat",
    "load_model": "glmkit.loader", "save_model": "glmkit.loader",
    "load_tokenizer": "glmkit.tokenizer",
    "tools_system_message": "glmkit.chat_format",
    "ModelConfig": "glmkit.config",
    "Agent": "glmkit.agent.loop",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glmkit' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
