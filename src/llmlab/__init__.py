"""llmlab: one hackable PyTorch codebase for making a language model end to end.

The public surface: `Tokenizer`, `ModelConfig`, `Transformer` (imported lazily so `llmlab --help` and
the tokenizer stay fast to start).
"""

__version__ = "0.1.0"

__all__ = ["Tokenizer", "ModelConfig", "Transformer", "__version__"]

_LAZY = {
    "Tokenizer": ("llmlab.tokenizer", "Tokenizer"),
    "ModelConfig": ("llmlab.model", "ModelConfig"),
    "Transformer": ("llmlab.model", "Transformer"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmlab' has no attribute {name!r}")
