"""The trainer's two ways to compute ``(1 - kd_ratio) * CE + kd_ratio * kd_scale * (EA-)KD`` for a batch.

* :func:`fused_head_loss`: from both models' final hidden states and heads, chunk by chunk
  (:func:`eakd_llm.loss.chunked.fused_distillation_loss`): never holds full-vocabulary logits. The default.
* :func:`full_logits_loss`: the reference path, from full logits (:func:`eakd_llm.loss.distillation.distillation_loss`);
  used when the models cannot take the fused path (:func:`fused_blocker` says why).

Both return ``(loss, stats, bad)``: ``bad`` names the inputs holding non-finite values (``[]`` when all are finite),
and the caller decides to stop or skip the batch.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..loss.chunked import LMHead, fused_distillation_loss
from ..loss.distillation import IGNORE_INDEX, LossSettings, SparseTeacher, distillation_loss
from ..models.loading import logit_transform
from ..models.sharding import full_head, head_forward, is_sharded, zero3_trainable

logger = logging.getLogger(__name__)


def full_logits_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | None,
    labels: torch.Tensor,
    settings: LossSettings,
    denominator: torch.Tensor,
    vocab_size: int | None,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], list[str]]:
    """The loss from the student's full logits ``[B, T, V_s]`` and the teacher's (``[B, T, V]``) or its cached
    entries; ``loss`` is ``None`` when an input is not finite on the loss positions (the prompt and padding may hold
    anything)."""
    mask = labels != IGNORE_INDEX
    bad = [] if teacher is None else _nonfinite_teacher(teacher, mask)
    if not torch.isfinite(student_logits[mask]).all():
        bad.append("student")
    if bad:
        return None, {}, bad
    num_tokens = mask.sum().clamp(min=1)
    ce_sum = F.cross_entropy(student_logits[mask].float(), labels[mask], reduction="sum")
    loss = (1.0 - settings.kd_ratio) * ce_sum / denominator
    stats: dict[str, torch.Tensor] = {"ce_loss": ce_sum.detach() / num_tokens}
    if teacher is not None:
        kd, kd_stats = distillation_loss(student_logits[..., :vocab_size], teacher, labels, settings,
                                         sequence_ids=sequence_ids, num_items_in_batch=denominator, return_stats=True)
        loss = loss + settings.kd_ratio * settings.kd_scale * kd
        stats["kd_loss"] = settings.kd_scale * kd.detach() * denominator / num_tokens
        stats.update(kd_stats)
    return loss, stats, []


def fused_head_loss(
    student: nn.Module,
    student_hidden: torch.Tensor,
    teacher: LMHead | SparseTeacher | None,
    labels: torch.Tensor,
    settings: LossSettings,
    denominator: torch.Tensor,
    vocab_size: int | None,
    sequence_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    compile: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """The loss from the student's final hidden states and its ``lm_head`` (``student``: the unwrapped causal LM)
    and the teacher's side (:meth:`eakd_llm.teacher.source.LiveTeacher.fused_side`).

    A frozen sharded student head (a ZeRO-3 partition, an FSDP2 ``DTensor``) is gathered for the call and released
    when it returns: the fused loss computes its gradients during the forward call, so the backward pass never needs
    it again. A trainable ZeRO-3 student head is instead called as a module whose forward is the fused loss: ZeRO-3's
    own hooks gather its parameters for the call, gather them again for the backward, and reduce-scatter their
    gradient like any layer's.
    """
    head = student.get_output_embeddings()
    scale, softcap = logit_transform(student)
    stats: dict[str, torch.Tensor] = {}

    def loss_from_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        loss, call_stats = fused_distillation_loss(
            LMHead(hidden, weight, bias, scale, softcap), teacher, labels, settings, vocab_size=vocab_size,
            sequence_ids=sequence_ids, num_items_in_batch=denominator, chunk_size=chunk_size, compile=compile,
            return_stats=True,
        )
        stats.update(call_stats)
        return loss

    s_weight = None  # a trainable ZeRO-3 head is partitioned again after the call: not inspectable below
    if zero3_trainable(head):
        with head_forward(head, lambda hidden: loss_from_head(hidden, head.weight, head.bias)):
            loss = head(student_hidden)
    else:
        with full_head(head) as (s_weight, s_bias):
            loss = loss_from_head(student_hidden, s_weight, s_bias)
    bad = []
    if not torch.isfinite(loss):  # e.g. an overflow in the projection: name the culprit
        mask = labels != IGNORE_INDEX
        if teacher is not None:
            bad = _nonfinite_teacher(teacher, mask)
        if any(t is not None and not torch.isfinite(t).all() for t in (student_hidden, s_weight)):
            bad.append("student")
        bad = bad or ["teacher or student"]
    return loss, stats, bad


def _nonfinite_teacher(teacher: torch.Tensor | LMHead | SparseTeacher, mask: torch.Tensor) -> list[str]:
    """``["teacher"]`` when the teacher's side holds values that would make the loss NaN, else ``[]``."""
    if isinstance(teacher, SparseTeacher):
        return ["cached teacher"] if teacher.has_nonfinite() else []
    if isinstance(teacher, LMHead):
        return [] if torch.isfinite(teacher.hidden).all() and torch.isfinite(teacher.weight).all() else ["teacher"]
    return [] if torch.isfinite(teacher[mask]).all() else ["teacher"]


def fused_blocker(student: nn.Module, teacher: nn.Module | None, fsdp_plugin) -> str | None:
    """Why the fused path cannot run for these (unwrapped) models, ``None`` when it can. It needs plain
    ``nn.Linear`` heads, models that can skip their own projection, and heads it can read whole: unsharded, or
    sharded (ZeRO-3, FSDP2) and frozen, which are then gathered once per step for the loss. ``fsdp_plugin``: the
    run's FSDP plugin (``None`` without FSDP)."""
    if fsdp_plugin is not None:
        if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            return "FSDP1 flattens the lm_head into a flat parameter"
        from torch.distributed.fsdp import CPUOffloadPolicy

        if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy):
            return "FSDP2 CPU offload keeps the head's shards on the CPU"
    for who, model in (("student", student), ("teacher", teacher)):
        if model is not None and not projects_separately(model):
            return f"the {who}'s lm_head is not a plain nn.Linear or its forward has no logits_to_keep"
    # A trainable FSDP2-sharded student head would need its gradient routed through FSDP's reduce-scatter; a ZeRO-3
    # one is called as a module, whose hooks do that (the teacher's head is frozen: gathering it is enough). Under
    # FSDP2 the head may be unsharded at this moment (accelerate does not reshard the root after forward): decide by
    # who owns it, not by its current state.
    head = student.get_output_embeddings()
    trainable = any(p.requires_grad for p in head.parameters())
    if trainable and (fsdp_plugin is not None or (is_sharded(head) and not zero3_trainable(head))):
        return "the student's lm_head is FSDP2-sharded and trainable"
    return None


@functools.lru_cache(maxsize=32)
def _forward_takes_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def projects_separately(model: nn.Module) -> bool:
    """The fused loss can reproduce this model's logits: a plain ``nn.Linear`` head (not LoRA-adapted, not quantized)
    and a forward that can skip its own projection (``logits_to_keep``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # nn.Linear's own forward: a plain head, or FSDP2's dynamic FSDPLinear subclass; not a LoRA or quantized layer.
    plain = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
    return plain and _forward_takes_logits_to_keep(type(model).forward)


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A zero loss whose gradients are exactly zero, even if activations or weights hold NaN.

    ``[:1]`` rather than ``[0]``: a ZeRO-3 parameter is empty outside the forward pass.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    return sum(p.reshape(-1)[:1].sum() for p in params) * 0.0


def finite_or_none(loss: torch.Tensor, bad: list[str], step: int, policy: str) -> torch.Tensor | None:
    """``loss`` when no input was non-finite (``bad`` empty); else stop (``nonfinite_logits: error``) or return
    ``None``: the batch is skipped (``skip``)."""
    if not bad:
        return loss
    message = f"non-finite {' and '.join(bad)} logits at step {step}"
    if policy == "error":
        raise FloatingPointError(f"{message}; lower the learning rate, use bf16 instead of fp16, or set "
                                 "nonfinite_logits: skip")
    logger.warning("%s: this batch contributes no loss (nonfinite_logits: skip)", message)
    return None


def sequence_ids(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A packed batch's document numbers, aligned with ``labels[:, 1:]``."""
    return inputs["sequence_ids"][:, 1:] if "sequence_ids" in inputs else None
