"""Keyword adapters for the loss tests: the test grids name every setting as a keyword (``divergence="jsd"``,
``student_bias=...``); these build the :class:`~eakd_llm.loss.distillation.LossSettings` and
:class:`~eakd_llm.loss.chunked.LMHead` objects the loss functions take, so each test states only what it varies."""

from __future__ import annotations

from dataclasses import fields

from eakd_llm.loss.chunked import LMHead, fused_distillation_loss
from eakd_llm.loss.distillation import DEFAULT_ENTROPY_TEMPERATURE, LossSettings, distillation_loss

SETTING_NAMES = {f.name for f in fields(LossSettings)}


def settings_of(kwargs: dict) -> LossSettings:
    """Pop the :class:`LossSettings` fields out of ``kwargs`` (``ea_granularity`` etc.) and build the settings."""
    values = {name: kwargs.pop(name) for name in list(kwargs) if name in SETTING_NAMES}
    if values.get("entropy_temperature", 0) is None:
        values["entropy_temperature"] = DEFAULT_ENTROPY_TEMPERATURE
    return LossSettings(**values)


def fused_loss_kw(
    student_hidden=None, student_weight=None, teacher_hidden=None, teacher_weight=None, labels=None, *,
    teacher_sparse=None, student_bias=None, teacher_bias=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
    student_softcap=None, teacher_softcap=None, **kwargs,
):
    """:func:`fused_distillation_loss` called with the flat keywords of the test grids."""
    settings = settings_of(kwargs)
    student = LMHead(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
    teacher = teacher_sparse
    if teacher is None and teacher_hidden is not None and teacher_weight is not None:
        teacher = LMHead(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
    return fused_distillation_loss(student, teacher, labels, settings, **kwargs)


def distillation_loss_kw(student_logits, teacher_logits, labels, divergence="fkl", **kwargs):
    """:func:`distillation_loss` called with the flat keywords of the test grids (the divergence may be positional)."""
    kwargs["divergence"] = divergence
    settings = settings_of(kwargs)
    return distillation_loss(student_logits, teacher_logits, labels, settings, **kwargs)
