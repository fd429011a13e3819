#!/usr/bin/env python
"""Evaluate a model on instruction benchmarks (MiniLLM/DistiLLM protocol). Same code as ``eakd-llm eval``."""

import os
import sys

# This file shares its name with the `evaluate` library: keep its folder off the import path so that
# `import evaluate` finds the library, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from eakd_llm.evaluation.protocol import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
