"""eakd-llm: Entropy-based Adaptive Knowledge Distillation (EA-KD) for causal language models."""

__version__ = "0.1.0"
