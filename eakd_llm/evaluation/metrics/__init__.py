"""Local ``evaluate`` metric modules (loadable offline with ``evaluate.load(path)``).

``rouge_l/rouge_l.py``: ROUGE-L F-measure, the best over several references per prediction, as MiniLLM / DistiLLM
score instruction-following benchmarks (see :mod:`eakd_llm.evaluation.protocol`).
"""

from __future__ import annotations

import os

ROUGE_L_METRIC_PATH: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rouge_l")

__all__ = ["ROUGE_L_METRIC_PATH"]
