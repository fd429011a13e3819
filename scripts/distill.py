#!/usr/bin/env python
"""Distil with a recipe: ``accelerate launch [--config_file recipes/accelerate_configs/X.yaml] scripts/distill.py
RECIPE.yaml [--key value ...]``. Same code as ``eakd-llm train``."""

import sys

from eakd_llm.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
