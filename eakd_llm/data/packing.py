"""Packing: several examples per row, kept apart by per-document ``position_ids``.

Short instruction data wastes most of a padded batch. With ``packing: true`` each micro-batch's examples are packed
into as few rows of at most ``max_length`` tokens as fit (first-fit decreasing, :func:`plan_rows`). Every document's
``position_ids`` restart at 0 and the batch carries no ``attention_mask``: transformers then builds a block-diagonal
causal mask from the position ids (``masking_utils.find_packed_sequence_indices``; flash-attention kernels use them as
sequence boundaries), so no token attends across a document boundary. ``sequence_ids`` numbers the documents, so
sequence-level EA averages the entropies of each document, not of a row. The loss is the padded batch's loss.

Whether a model really keeps packed documents apart depends on its code and attention kernel:
:func:`eakd_llm.models.isolation.check_isolation` runs it once on two packed documents and refuses to train when the
second one's hidden states differ from the same document run alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..loss.distillation import IGNORE_INDEX


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices per row: first-fit decreasing into rows of at most ``capacity`` tokens (an example longer than
    ``capacity`` gets a row of its own). Rows keep their examples in the original order."""
    rows: list[list[int]] = []
    space: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(space):
            if lengths[index] <= free:
                rows[row].append(index)
                space[row] -= lengths[index]
                break
        else:
            rows.append([index])
            space.append(capacity - lengths[index])
    return [sorted(row) for row in rows]


def pack_batch(features: Sequence[Mapping[str, Any]], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids`` and ``sequence_ids`` ``[R, L]`` of the packed examples, and
    ``example_order``: the examples' indices in the order their documents appear (row-major).

    Labels are ``-100`` on padding and on every document's first token (nothing in its document precedes it: it must
    not be predicted from the previous document's last token). ``sequence_ids`` is the document's number (in row-major
    order of appearance) on its tokens and ``-1`` on padding; padding's position ids restart at 0 too, so it forms a
    block of its own.
    """
    lengths = [len(f["input_ids"]) for f in features]
    rows = plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "sequence_ids": torch.full((len(rows), width), -1, dtype=torch.long),
    }
    document = 0
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            n = lengths[index]
            span = slice(offset, offset + n)
            batch["input_ids"][r, span] = torch.as_tensor(features[index]["input_ids"])
            labels = torch.as_tensor(features[index]["labels"]).clone()
            labels[0] = IGNORE_INDEX
            batch["labels"][r, span] = labels
            batch["position_ids"][r, span] = torch.arange(n)
            batch["sequence_ids"][r, span] = document
            document += 1
            offset += n
        batch["position_ids"][r, offset:] = torch.arange(width - offset)
    batch["example_order"] = torch.tensor([index for row in rows for index in row], dtype=torch.long)
    return batch


def padding_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of a collated batch's positions that hold no token of any example."""
    if "sequence_ids" in batch:
        real = int((batch["sequence_ids"] >= 0).sum())
    else:
        real = int(batch["attention_mask"].sum())
    return 1.0 - real / batch["input_ids"].numel()
