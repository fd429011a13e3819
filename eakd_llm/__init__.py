"""eakd-llm: Entropy-based Adaptive Knowledge Distillation (EA-KD) for causal language models.

The subpackages, each importing only from those listed before it (``docs/layout.md``; ``tests/test_layering.py``):
``loss`` → ``config`` → ``data`` → ``models`` → ``teacher`` → ``training`` → ``evaluation`` → ``studies``, with the
``eakd-llm`` command (``cli``) on top.

The public names below are imported on first use, so ``import eakd_llm.loss.distillation`` stays pure torch and the
command line starts without loading transformers for commands that do not need it.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "ConfigError": "config.eakd_config",
    "EAKDConfig": "config.eakd_config",
    "EAKDTrainer": "training.trainer",
    "LMHead": "loss.chunked",
    "LossSettings": "loss.distillation",
    "SparseTeacher": "loss.distillation",
    "distillation_loss": "loss.distillation",
    "fused_distillation_loss": "loss.chunked",
    "load_recipe": "config.recipe",
    "run_training": "training.train",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'eakd_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
