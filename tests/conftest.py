"""Shared fixtures: one small offline tiny stack (data, tokenizer, random teacher/student) per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory) -> dict[str, str]:
    from eakd_llm.synthetic import prepare_tiny_stack

    root = tmp_path_factory.mktemp("tiny")
    return prepare_tiny_stack(str(root), num_train=400, num_validation=40, num_test=40, vocab_size=512, seed=0)
