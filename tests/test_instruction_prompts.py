"""The project's instruction prompt set: its families and sizes, a split whose test prompts are unseen in training
(by entity and by a held-out template), determinism, and the committed file being the generator's output."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from eakd_llm.data.dataset import prompt_key
from eakd_llm.data.instruction_prompts import DEFAULT_PATH, FAMILIES, SPLITS, generate_prompt_set, groups
from eakd_llm.teacher.answers import read_prompt_file

REPO = Path(__file__).resolve().parents[1]
ID = re.compile(r"^(?P<family>[a-z]+)-(?P<group>[a-z-]+)-t(?P<template>\d+)-e(?P<entity>\d+)$")


def test_committed_file_is_the_generators_output_and_reads_as_a_prompt_file():
    path = REPO / DEFAULT_PATH
    committed = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    stale = "stale: rewrite it with `python -m eakd_llm.data.instruction_prompts`"
    assert committed == generate_prompt_set(0), stale
    records = read_prompt_file(str(path))  # ids unique, splits valid, prompts non-empty
    assert len(records) == len(committed)


def test_families_sizes_and_short_prompts():
    records = generate_prompt_set(0)
    assert 800 <= len(records) <= 1500
    per_family = Counter(r["family"] for r in records)
    assert set(per_family) == set(FAMILIES)
    assert min(per_family.values()) >= 100, per_family
    per_split = Counter(r["split"] for r in records)
    assert set(per_split) == set(SPLITS)
    assert per_split["train"] > per_split["test"] > per_split["validation"] >= 100
    for family in FAMILIES:  # every family is in every split
        assert {r["split"] for r in records if r["family"] == family} == set(SPLITS)
    assert max(len(r["prompt"].split()) for r in records) <= 30
    assert len({r["id"] for r in records}) == len(records)


def test_test_prompts_are_unseen_in_training():
    records = generate_prompt_set(0)
    by_split = {split: [r for r in records if r["split"] == split] for split in SPLITS}
    train_keys = {prompt_key(r["prompt"]) for r in by_split["train"]}
    for split in ("validation", "test"):
        assert not train_keys & {prompt_key(r["prompt"]) for r in by_split[split]}
    # by entity: no test or validation entity of a group appears in training, under any template
    parsed = {split: [ID.match(r["id"]).groupdict() for r in rows] for split, rows in by_split.items()}
    entities = {split: {(p["family"], p["group"], p["entity"]) for p in rows} for split, rows in parsed.items()}
    assert not entities["train"] & entities["test"] and not entities["train"] & entities["validation"]
    assert not entities["test"] & entities["validation"]
    # by template: each group's last template never appears in training but does in test
    for group in groups(0):
        last = str(len(group.templates) - 1)
        mine = {split: {p["template"] for p in rows if p["family"] == group.family and p["group"] == group.name}
                for split, rows in parsed.items()}
        assert last not in mine["train"] and last in mine["test"], group.name
        assert mine["train"] == {str(t) for t in range(len(group.templates) - 1)}


def test_generator_is_deterministic_and_the_seed_changes_the_split():
    assert generate_prompt_set(0) == generate_prompt_set(0)
    other = generate_prompt_set(1)
    assert other != generate_prompt_set(0)
    split_of = {r["id"]: r["split"] for r in generate_prompt_set(0)}
    assert any(split_of.get(r["id"]) not in (None, r["split"]) for r in other)


def test_prompts_read_naturally():
    prompts = [r["prompt"] for r in generate_prompt_set(0)]
    assert "What is the capital of France?" in prompts or any("France" in p for p in prompts)
    assert "Where does an owl usually live?" in prompts or "What does an owl eat?" in prompts or any(
        "an owl" in p for p in prompts)
    assert not [p for p in prompts if re.search(r"\ba (owl|elephant|octopus|eagle|ant|eel|apple|onion)\b", p)]
    assert not [p for p in prompts if "{" in p or "}" in p]  # every slot filled
