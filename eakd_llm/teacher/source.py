"""Where the teacher's side of the loss comes from: a live model run on each batch, or an offline top-k cache.

Both sources answer the same three questions for a batch, which is all the loss paths ask of a teacher:

* :meth:`fused_side`: what :func:`eakd_llm.loss.chunked.fused_distillation_loss` consumes -- the teacher's final hidden
  states with its (gathered) head, an :class:`~eakd_llm.loss.chunked.LMHead`, or the cached :class:`SparseTeacher`;
* :meth:`full_side`: what :func:`eakd_llm.loss.distillation.distillation_loss` consumes -- full logits or the cached
  entries;
* :meth:`wrap_collator`: the data collator that feeds it (a cache adds each batch's entries to it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import torch
from torch import nn

from ..loss.chunked import LMHead
from ..loss.distillation import SparseTeacher
from ..models.loading import final_hidden_states, logit_transform
from ..models.sharding import full_head, unwrap_causal_lm
from .cache import CachedTeacherCollator, TeacherCache, sparse_teacher_of


class TeacherSource(Protocol):
    model: nn.Module | None  # the live teacher (None for a cache): placement, packing check, generation

    def wrap_collator(self, collator: Callable) -> Callable: ...

    def fused_side(self, batch: Mapping[str, torch.Tensor],
                   forward_inputs: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager: ...

    def full_side(self, batch: Mapping[str, torch.Tensor], forward_inputs: Mapping[str, torch.Tensor],
                  vocab_size: int) -> torch.Tensor | SparseTeacher: ...


class LiveTeacher:
    """A frozen teacher model, already placed for the run (ZeRO-3 engine, FSDP shards or a plain copy); it is
    unwrapped once here, not per batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.causal_lm = unwrap_causal_lm(model)
        self.logit_scale, self.softcap = logit_transform(self.causal_lm)

    def wrap_collator(self, collator: Callable) -> Callable:
        return collator

    @contextlib.contextmanager
    def fused_side(self, batch: Mapping[str, torch.Tensor],
                   forward_inputs: Mapping[str, torch.Tensor]) -> Iterator[LMHead]:
        """The teacher's final hidden states (aligned with ``labels[:, 1:]``) and its head, gathered once for the
        call when sharded and released when the context closes."""
        with torch.no_grad():
            hidden = final_hidden_states(self.model, **forward_inputs)[:, :-1]
        with full_head(self.causal_lm.get_output_embeddings()) as (weight, bias):
            yield LMHead(hidden, weight, bias, self.logit_scale, self.softcap)

    def full_side(self, batch: Mapping[str, torch.Tensor], forward_inputs: Mapping[str, torch.Tensor],
                  vocab_size: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**forward_inputs, use_cache=False).logits[:, :-1, :vocab_size]


class CachedTeacher:
    """The teacher's top-k entries stored by ``eakd-llm cache-teacher``: no teacher model is loaded, and every batch
    carries its entries (added by the collator, in the order of its loss positions)."""

    model = None

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def wrap_collator(self, collator: Callable) -> Callable:
        return CachedTeacherCollator(collator, self.cache)

    @contextlib.contextmanager
    def fused_side(self, batch: Mapping[str, torch.Tensor],
                   forward_inputs: Mapping[str, torch.Tensor]) -> Iterator[SparseTeacher]:
        yield self._entries(batch)

    def full_side(self, batch: Mapping[str, torch.Tensor], forward_inputs: Mapping[str, torch.Tensor],
                  vocab_size: int) -> SparseTeacher:
        return self._entries(batch)

    @staticmethod
    def _entries(batch: Mapping[str, torch.Tensor]) -> SparseTeacher:
        sparse = sparse_teacher_of(batch)
        if sparse is None:
            raise ValueError("a batch without cached teacher entries reached a run trained from a teacher cache; "
                             "its collator must be CachedTeacher.wrap_collator(...)")
        return sparse
