"""A fused, chunked EA-KD loss that never materialises full-vocabulary logits (pure PyTorch).

:func:`fused_distillation_loss` takes the final hidden states and the ``lm_head`` weights of the student and the
teacher instead of their logits, and computes exactly

    loss = (1 - r) * CE_sum / N  +  r * s * tau^2 * sum_n w_n * d_n / N        (r = ``kd_ratio``, s = ``kd_scale``)

which is ``(1 - r) * CE_sum / N + r * eakd_llm.loss.distillation.distillation_loss(s_logits[..., :V], t_logits[..., :V],
labels, ..., num_items_in_batch=N)`` with ``s_logits = softcap_s(scale_s * (student_hidden @ student_weight.T +
student_bias))`` (and the same for the teacher), ``CE_sum`` the summed cross-entropy of the full student logits over the
loss tokens, ``d_n`` the per-token divergence at temperature tau over the shared vocabulary ``V`` (or over a cached
teacher's top-k tokens plus a tail bucket), ``w_n`` the (detached) EA weight ``(H_T + H_T * H_S / log V) / 2`` from the
entropies at tau' (or another ``ea_formula``; divided by its mean over the loss tokens with ``ea_normalize="mean"``; 1
without EA), and ``N = num_items_in_batch`` or the local number of loss tokens (at least 1).

Layout (Liger ``chunked_loss`` style): the chunking machinery (:class:`_FusedDistillationFunction`,
:func:`_fused_forward`, :func:`_plan_chunks`, the projection helpers) is separate from the per-chunk maths
(:func:`_chunk_terms`), which calls the same :mod:`eakd_llm.loss.distillation` helpers that ``distillation_loss`` calls,
so both paths run the same per-token formulas.

Memory: positions without a loss token are dropped before projecting (``[B, T, H] -> [N, H]``); the ``N`` loss tokens
are processed in chunks of ``chunk_size``, and for each chunk the ``[c, V]`` logits of both models, the loss and
the gradient of the chunk's loss with respect to the student logits are computed, then immediately projected back to
the gradients of the student hidden chunk (``[c, H_s]``) and of the student weight/bias (accumulated in fp32). So the
extra peak memory is ``O(chunk_size * V)`` (a handful of ``[c, V]`` temporaries) plus the fp32 ``[V_s, H_s]``
weight-gradient accumulator and the ``[N, H_s]`` hidden-gradient buffer, never ``O(N * V)``. The backward pass only
scales the stored gradients by the incoming gradient.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch._functorch.config
import torch.nn.functional as F

# The validators and the log-softmax/entropy helpers are the ones distillation_loss itself uses, so both paths raise
# the same messages and run bit-identical per-token maths.
from .distillation import (
    IGNORE_INDEX,
    LossSettings,
    SparseTeacher,
    divergence_from_log_probs,
    divergence_sums,
    ea_normalizer,
    ea_weights_from_entropies,
    entropy_from_log_probs,
    entropy_stats,
    log_probs,
    loss_denominator,
    sequence_rows,
    sparse_divergence,
    weights_for_tokens,
)

__all__ = ["LMHead", "fused_distillation_loss"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMHead:
    """One model's side of the fused loss: its final hidden states and output projection, whose logits are
    ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (no tanh without a softcap).

    Attributes:
        hidden: ``[B, T, H]`` final hidden states (after the final norm), aligned with the labels: position ``t``
            predicts ``labels[:, t]`` (for a causal LM: ``hidden[:, :-1]`` against ``input_ids[:, 1:]``). The
            student's get gradients (hence its backbone / LoRA adapters); the teacher's never do.
        weight: ``[V, H]`` ``lm_head`` weight (tied embeddings are fine). Must be the full weight: a ZeRO-3 / FSDP
            shard (``numel() == 0``, a ``DTensor``) raises a ``ValueError``; gather it once per step and pass the
            gathered tensor. The student's gets a gradient when it requires one.
        bias: optional ``[V]`` ``lm_head`` bias.
        logit_scale: multiplier of the logits (models with a ``logit_scale``).
        softcap: Gemma-2-style final logit softcapping ``c * tanh(z / c)`` (after the scale), or ``None``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def check(self, who: str, labels: torch.Tensor) -> None:
        _check_weight(f"{who}_weight", self.weight)
        _check_shapes(who, self.hidden, self.weight, self.bias, labels)
        if not math.isfinite(self.logit_scale):
            raise ValueError(f"{who}_logit_scale must be finite, got {self.logit_scale}")
        if self.softcap is not None and (not self.softcap > 0 or not math.isfinite(self.softcap)):
            raise ValueError(f"{who}_softcap must be None or a finite number > 0, got {self.softcap}")


def fused_distillation_loss(
    student: LMHead,
    teacher: LMHead | SparseTeacher | None,
    labels: torch.Tensor,
    settings: LossSettings | None = None,
    *,
    vocab_size: int | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
    compile: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(1 - kd_ratio) * CE + kd_ratio * kd_scale * (EA-)KD`` from hidden states and ``lm_head`` weights, chunk by
    chunk.

    Equal (up to fp32 summation order) to computing both models' full logits ``z_s``, ``z_t`` (:class:`LMHead`) and::

        (1 - kd_ratio) * F.cross_entropy(z_s, labels, reduction="sum") / N
            + kd_ratio * kd_scale * distillation_loss(z_s[..., :V], z_t[..., :V], labels, settings, ...,
                                                      num_items_in_batch=N)

    but the peak extra memory is ``O(chunk_size * V)`` instead of ``O(B * T * V)``.

    Args:
        student: the student's hidden states and head (:class:`LMHead`); its hidden states, weight and bias get
            gradients when they require them.
        teacher: the teacher's hidden states and head; or its cached top-k distribution of the ``N`` loss tokens
            (:class:`eakd_llm.loss.distillation.SparseTeacher`, row-major order of the loss positions): the KD term is
            then taken on the top-k tokens plus one tail bucket, H_T is the cached exact entropy, and no teacher
            projection is computed; ``None`` when ``kd_ratio == 0``. Gets no gradient.
        labels: ``[B, T]`` targets; ``-100`` marks positions without loss.
        settings: :class:`eakd_llm.loss.distillation.LossSettings` (``None``: the defaults). With
            ``ea_normalize="mean"`` the weights' mean over all loss tokens is known only after the last chunk: with a CE
            term, the KD gradient is then accumulated apart (one more set of fp32 gradient buffers, ``[V_s, H_s]`` and
            ``[N, H_s]``, and a second gradient GEMM per chunk) and scaled by 1 / mean at the end; without CE it costs
            nothing.
        vocab_size: ``V``, the shared vocabulary of the KD term: the first ``V`` columns of both models' logits
            (``None``: ``min(V_s, V_t)``, i.e. vocabularies differing only by padding rows; ``V_s`` with a cached
            teacher). CE always uses all ``V_s`` student columns.
        sequence_ids: packed batches' document numbers, as in :func:`eakd_llm.loss.distillation.distillation_loss` (they
            must number the documents in row-major order).
        num_items_in_batch: ``N``, the global loss-token count (gradient accumulation / several processes); ``None``:
            the local count. A batch without loss tokens gives 0 (no NaN) and zero gradients.
        chunk_size: number of loss tokens per chunk (>= 1); the loss maths keeps about 10-15 fp32 ``[chunk_size, V_s]``
            temporaries alive at its peak (measured on CPU), so e.g. 1024 x 151,936 -> 6-9 GB, 256 -> a quarter.
        compile: run the per-chunk maths (log-softmaxes, divergence, entropies, CE and their gradient with respect to
            the logits) through ``torch.compile``, which fuses its elementwise passes over ``[c, V]`` into a few
            kernels. The chunk length is a dynamic dimension; each loss configuration (divergence, EA, temperatures,
            with or without gradients; a one-token chunk) is one more compilation of the same function, and Dynamo's
            recompile limit (8 by default) bounds how many one process compiles before falling back to eager. Same
            maths, fp32 results equal to the eager path up to summation order. The projections stay GEMMs either way.
        return_stats: also return detached statistics: those of ``distillation_loss`` (``teacher_entropy``,
            ``student_entropy``, ``ea_weight_mean/min/max``, ``divergence_sum``, ``weighted_divergence_sum``,
            ``num_tokens``) plus ``ce_loss`` and ``kd_loss`` per loss token (``kd_loss`` includes ``kd_scale``, tau^2
            and the EA weights, as the trainer logs it).

    Returns:
        A scalar fp32 loss, or ``(loss, stats)`` with ``return_stats=True``.

    Precision: all softmax/divergence/entropy maths is fp32. The projections are fp32 GEMMs (bf16/fp16 weights are
    upcast once per call, hidden states chunk by chunk) except on CUDA with bf16/fp16 inputs (or under an active
    low-precision autocast), where they are low-precision GEMMs returning low-precision logits, exactly as an HF
    ``lm_head`` computes them (so the full-logits path sees the same values), upcast to fp32 for the maths; the
    gradient of the logits is rounded to that dtype before its two GEMMs, as in HF's backward, but taken of the chunk's
    un-normalised loss (entries of order 1) and divided by ``N`` in fp32 afterwards, so fp16 cannot underflow it
    before a loss scale arrives. The hidden-state and weight gradients are accumulated in fp32.

    Cost: one pass over the chunks. Per chunk of ``c`` tokens: the student projection (``c * V_s * H_s`` MACs), the
    teacher projection (``c * V * H_t``) and, when gradients are needed, the hidden and weight gradients
    (``2 * c * V_s * H_s``) -- the GEMMs of the full-logits path, but on the loss tokens only (the full path also
    projects prompt and padding positions), plus a backward of the chunk's loss maths done inside the forward. Without
    gradients (evaluation) only the forward part runs. Kept between forward and backward: the fp32 gradients of the
    student hidden states ``[N, H_s]``, weight ``[V_s, H_s]`` (when it requires grad) and bias.

    Sequence granularity: every token of a row shares the weight of the row's *mean* entropies, so a row's weight is
    known only after all its tokens have been projected. Chunks are therefore cut at row boundaries (a chunk never
    splits a row unless that row alone has more than ``chunk_size`` loss tokens); a row that fits in a chunk gets its
    weight from the entropies of that same chunk's logits before the chunk's gradient is taken: no extra cost. A row
    longer than ``chunk_size`` spans several chunks; since the weight is a detached scalar per row, the KD gradient of
    its non-final chunks is accumulated *unweighted* into side accumulators (fp32 ``[V_s, H_s]`` weight gradient,
    ``[V_s]`` bias gradient, ``[N, H_s]`` hidden gradient, allocated only when such a row exists) and scaled by the row
    weight once the row's last chunk is done. With ``0 < kd_ratio < 1`` the (unweighted) CE gradient of those tokens
    must be kept apart, which costs a second backward of the chunk's loss maths (elementwise, ``O(c * V_s)``) and one
    more hidden- and weight-gradient GEMM (``2 * c * V_s * H_s``) for those tokens only; with ``kd_ratio == 1`` it
    costs nothing. The alternative, a no-grad pre-pass that stores only the ``[N]`` entropies H_T, H_S of the long rows'
    tokens, must recompute both projections for them (``c * V * (H_s + H_t)``) plus two more log-softmaxes (the teacher
    logits themselves cannot be cached, they are ``[N, V]``): dearer whenever ``H_t >= H_s`` and never cheaper at
    ``kd_ratio == 1``. Tip: a ``chunk_size`` of at least the longest row's loss-token count makes sequence granularity
    free.
    """
    settings = LossSettings() if settings is None else settings
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    student.check("student", labels)
    mask = labels != IGNORE_INDEX
    num_tokens = mask.sum()
    use_teacher = settings.kd_ratio > 0
    if not use_teacher:
        teacher = None
    elif teacher is None:
        raise ValueError(f"kd_ratio={settings.kd_ratio} needs a teacher (an LMHead or a SparseTeacher); kd_ratio 0 is "
                         "plain SFT")
    vocab_size = _shared_vocab(student, teacher, vocab_size, labels)
    if isinstance(teacher, SparseTeacher):
        if teacher.ids.shape[0] != int(num_tokens):
            raise ValueError(f"teacher_sparse has {teacher.ids.shape[0]} tokens for {int(num_tokens)} loss positions")
        tensors = (student.hidden, student.weight, labels, teacher.log_probs)
    else:
        tensors = (student.hidden, student.weight, labels) + (() if teacher is None else (teacher.hidden,
                                                                                          teacher.weight))
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")

    spec = _LossSpec(
        settings=settings,
        use_teacher=use_teacher,
        vocab_size=int(vocab_size),
        student_logit_scale=float(student.logit_scale),
        teacher_logit_scale=float(teacher.logit_scale) if isinstance(teacher, LMHead) else 1.0,
        student_softcap=student.softcap,
        teacher_softcap=teacher.softcap if isinstance(teacher, LMHead) else None,
        need_ce=settings.kd_ratio < 1 or return_stats,
        need_entropies=use_teacher and (settings.ea or return_stats),
        autocast_dtype=_autocast_dtype(student.hidden.device.type),
        compile=bool(compile),
    )

    # Drop the positions without loss before projecting anything: [B, T, H] -> [N, H].
    denominator = loss_denominator(num_tokens, num_items_in_batch)
    rows, num_rows = sequence_rows(labels, sequence_ids)
    teacher_in: SparseTeacher | tuple | None = teacher
    if isinstance(teacher, LMHead):  # padding rows beyond V never enter the KD term
        bias = teacher.bias[: spec.vocab_size] if teacher.bias is not None else None
        teacher_in = (teacher.hidden[mask], teacher.weight[: spec.vocab_size], bias)

    grad_enabled = torch.is_grad_enabled()
    needs = tuple(
        grad_enabled and t is not None and t.requires_grad for t in (student.hidden, student.weight, student.bias)
    )
    stats_out: dict[str, torch.Tensor] = {}
    loss = _FusedDistillationFunction.apply(
        student.hidden[mask], student.weight, student.bias, teacher_in, labels[mask], rows, num_rows, denominator,
        spec, chunk_size, needs, stats_out,
    )
    if not return_stats:
        return loss
    return loss, _stats(stats_out, num_tokens, rows, num_rows, spec)


def _shared_vocab(student: LMHead, teacher: LMHead | SparseTeacher | None, vocab_size: int | None,
                  labels: torch.Tensor) -> int:
    """``V`` of the KD term, checked against both heads (a teacher head is also checked against ``labels``)."""
    v_s = student.weight.shape[0]
    if not isinstance(teacher, LMHead):
        vocab_size = v_s if vocab_size is None else vocab_size
        if teacher is not None and not 2 <= vocab_size <= v_s:
            raise ValueError(f"vocab_size must be in [2, V_s = {v_s}], got {vocab_size}")
        return vocab_size
    teacher.check("teacher", labels)
    v_t = teacher.weight.shape[0]
    vocab_size = min(v_s, v_t) if vocab_size is None else vocab_size
    if not 2 <= vocab_size <= min(v_s, v_t):
        raise ValueError(
            f"vocab_size must be in [2, min(V_s, V_t)] = [2, {min(v_s, v_t)}] (student {v_s}, teacher {v_t}), "
            f"got {vocab_size}"
        )
    return vocab_size


def _stats(buffers: dict[str, torch.Tensor], num_tokens: torch.Tensor, rows: torch.Tensor, num_rows: int,
           spec: _LossSpec) -> dict[str, torch.Tensor]:
    """The detached statistics of a call from the per-token buffers :func:`_fused_forward` filled."""
    settings = spec.settings
    count = num_tokens.clamp(min=1)
    stats: dict[str, torch.Tensor] = {"num_tokens": num_tokens.detach(), "ce_loss": buffers["ce_sum"] / count}
    if not spec.use_teacher:
        return stats
    stats["kd_loss"] = settings.kd_scale * settings.temperature**2 * buffers["kd_sum"] / count
    if int(num_tokens) > 0:
        h_t, h_s = buffers["teacher_entropy"], buffers["student_entropy"]
        weights = weights_for_tokens(h_t, h_s, rows, num_rows, spec.vocab_size, settings.ea_granularity,
                                     settings.ea_formula)
        stats.update(entropy_stats(h_t, h_s, weights))
        stats.update(divergence_sums(buffers["divergence"], weights))
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # device types without autocast support
        return None


def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def _check_weight(name: str, weight: torch.Tensor) -> None:
    gather = (
        "gather the full lm_head weight once per step (DeepSpeed: deepspeed.zero.GatheredParameters([weight]); "
        "FSDP2: weight.full_tensor(); FSDP1: FSDP.summon_full_params) and pass the gathered tensor"
    )
    if is_dtensor(weight):
        raise ValueError(
            f"{name} is a DTensor (an FSDP2/tensor-parallel shard of shape {tuple(weight.shape)}); {gather}"
        )
    zero3_shard = hasattr(weight, "ds_id") and tuple(weight.shape) != tuple(getattr(weight, "ds_shape", ()))
    if weight.numel() == 0 or zero3_shard:
        raise ValueError(
            f"{name} has shape {tuple(weight.shape)} ({weight.numel()} elements): it looks like a ZeRO-3/FSDP shard, "
            f"not the full [V, H] weight; {gather}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a [V, H] matrix, got shape {tuple(weight.shape)}")


def _check_shapes(
    who: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> None:
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"{who}_hidden must be [B, T, H] aligned with labels {tuple(labels.shape)}, got {tuple(hidden.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who}_hidden has hidden size {hidden.shape[-1]} but {who}_weight {tuple(weight.shape)} expects "
            f"{weight.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{who}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"{who}_hidden and {who}_weight must be floating point, got {hidden.dtype}, {weight.dtype}")


# ----------------------------------------------------------------------------------------------------------------------
# Per-chunk maths
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossSpec:
    """The settings plus what one call derived from its inputs (hashable: it keys the compiled chunk maths)."""

    settings: LossSettings
    use_teacher: bool
    vocab_size: int
    student_logit_scale: float
    teacher_logit_scale: float
    student_softcap: float | None
    teacher_softcap: float | None
    need_ce: bool  # compute the CE values (the loss has a CE term, or the stats report it)
    need_entropies: bool  # compute H_T, H_S (EA weights or stats)
    autocast_dtype: torch.dtype | None  # the caller's autocast dtype for this device (None: autocast off)
    compile: bool = False  # run _chunk_terms through torch.compile


@dataclass
class _ChunkTerms:
    ce: torch.Tensor | None  # [c] per-token cross-entropy on the full student vocabulary
    divergence: torch.Tensor | None  # [c] per-token divergence at tau on the shared vocabulary
    teacher_entropy: torch.Tensor | None  # [c] at tau', detached
    student_entropy: torch.Tensor | None  # [c] at tau', detached


def _transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """``z -> scale * z``, then ``softcap * tanh(z / softcap)`` when a softcap is given."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                softcap: float | None, vocab_size: int) -> torch.Tensor:
    """fp32 logits of ``hidden`` through a head (``weight`` / ``bias`` cut to the first ``vocab_size`` rows), with the
    model's logit scale and softcap: what an :class:`LMHead` gives, materialised (the teacher cache's chunks, a served
    teacher's full-logits path)."""
    logits = hidden @ weight[:vocab_size].t()
    if bias is not None:
        logits = logits + bias[:vocab_size]
    return _transform_logits(logits.float(), scale, softcap)


def _chunk_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher | None,
    targets: torch.Tensor,
    spec: _LossSpec,
    ce_grad: bool,
) -> _ChunkTerms:
    """The per-token loss terms of one chunk, from the raw projections (differentiable in ``student_logits``).

    Args:
        student_logits: ``[c, V_s]`` (or ``[c, V]`` when no CE is needed) ``h_s @ W_s.T + b_s``, fp32 or the
            low-precision logits of a CUDA GEMM (upcast here, so the maths below is fp32 either way).
        teacher_logits: ``[c, V]`` ``h_t @ W_t[:V].T + b_t[:V]`` (same dtypes), the chunk's rows of a cached
            :class:`~eakd_llm.loss.distillation.SparseTeacher` (top-k + tail divergence, stored H_T), or ``None``
            without teacher.
        targets: ``[c]`` labels (all valid).
        ce_grad: keep the CE term in the graph (else it is computed detached, for the stats only).

    With ``z_s, z_t`` the transformed logits (scale, softcap), ``log p = log_softmax(z[:, :V] / tau)``:
    ``ce = -log_softmax(z_s)[target]``, ``divergence = divergence_from_log_probs(log p_S, log p_T)``, and the entropies
    ``H = -sum p' log p'`` of ``p' = softmax(z[:, :V] / tau')`` (reusing ``log p`` when ``tau' == tau``).
    """
    z_s = _transform_logits(student_logits.float(), spec.student_logit_scale, spec.student_softcap)

    def cross_entropy(log_probs: torch.Tensor | None) -> torch.Tensor | None:
        if not spec.need_ce:
            return None
        if log_probs is not None:  # log_softmax(z_s) already computed for the KD term (tau 1, same vocabulary)
            return -(log_probs if ce_grad else log_probs.detach()).gather(1, targets.unsqueeze(1)).squeeze(1)
        return F.cross_entropy(z_s if ce_grad else z_s.detach(), targets, reduction="none")

    if teacher_logits is None:
        return _ChunkTerms(cross_entropy(None), None, None, None)
    z_s_kd = z_s[:, : spec.vocab_size] if z_s.shape[-1] != spec.vocab_size else z_s
    settings = spec.settings
    log_s = log_probs(z_s_kd, settings.temperature)
    ce = cross_entropy(log_s if settings.temperature == 1.0 and z_s_kd is z_s else None)
    if isinstance(teacher_logits, SparseTeacher):
        per_token = sparse_divergence(log_s, teacher_logits, settings.divergence, settings.skew_alpha,
                                       settings.jsd_beta)
        h_t = h_s = None
        if spec.need_entropies:
            with torch.no_grad():
                h_t = teacher_logits.entropy.float()
                same_tau = settings.entropy_temperature == settings.temperature
                h_s = entropy_from_log_probs(
                    log_s.detach() if same_tau else log_probs(z_s_kd.detach(), settings.entropy_temperature)
                )
        return _ChunkTerms(ce, per_token, h_t, h_s)
    with torch.no_grad():
        z_t = _transform_logits(teacher_logits.float(), spec.teacher_logit_scale, spec.teacher_softcap)
        log_t = log_probs(z_t, settings.temperature)
    per_token = divergence_from_log_probs(
        log_s, log_t, settings.divergence, skew_alpha=settings.skew_alpha, jsd_beta=settings.jsd_beta
    )
    h_t = h_s = None
    if spec.need_entropies:
        with torch.no_grad():
            if settings.entropy_temperature == settings.temperature:
                h_t, h_s = entropy_from_log_probs(log_t), entropy_from_log_probs(log_s.detach())
            else:
                h_t = entropy_from_log_probs(log_probs(z_t, settings.entropy_temperature))
                h_s = entropy_from_log_probs(log_probs(z_s_kd.detach(), settings.entropy_temperature))
    return _ChunkTerms(ce, per_token, h_t, h_s)


@functools.lru_cache(maxsize=64)
def _compiled_chunk_terms(spec: _LossSpec, ce_grad: bool, sparse: bool):
    """:func:`_chunk_terms` for one loss configuration, compiled (a tuple of tensors in, a tuple out)."""

    def terms(student_logits, targets, *teacher):
        t = _chunk_terms(student_logits, SparseTeacher(*teacher) if sparse else teacher[0], targets, spec, ce_grad)
        return t.ce, t.divergence, t.teacher_entropy, t.student_entropy

    return torch.compile(terms, fullgraph=True)


def _run_chunk_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher | None,
    targets: torch.Tensor,
    spec: _LossSpec,
    ce_grad: bool,
) -> _ChunkTerms:
    """:func:`_chunk_terms`, eager or compiled as ``spec.compile`` says."""
    if not spec.compile:
        return _chunk_terms(student_logits, teacher_logits, targets, spec, ce_grad)
    sparse = isinstance(teacher_logits, SparseTeacher)
    if sparse:
        teacher = (teacher_logits.ids, teacher_logits.log_probs, teacher_logits.log_tail, teacher_logits.entropy)
    else:
        teacher = (teacher_logits,)
    for tensor in (student_logits, targets, *teacher):
        if tensor is not None:  # chunks differ in length (the last one, row boundaries): one dynamic-length graph
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return _ChunkTerms(*_compiled_chunk_terms(spec, ce_grad, sparse)(student_logits, targets, *teacher))


# ----------------------------------------------------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------------------------------------------------

_OUT_DTYPE_SUPPORTED: bool | None = None  # does torch.mm(..., out_dtype=float32) work for bf16/fp16 on CUDA?


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32; ``a``, ``b`` share one dtype. Low precision: fp32 output without rounding when possible."""
    global _OUT_DTYPE_SUPPORTED
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _OUT_DTYPE_SUPPORTED is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_SUPPORTED = True
            return out
        except (RuntimeError, TypeError):
            _OUT_DTYPE_SUPPORTED = False
    return (a @ b).float()


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` without rounding the product to the inputs' low-precision dtype."""
    global _OUT_DTYPE_SUPPORTED
    if a.dtype in _LOW_PRECISION and a.is_cuda and _OUT_DTYPE_SUPPORTED is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_SUPPORTED = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_SUPPORTED = False
    acc.addmm_(a.float(), b.float())


def _low_precision_gemms(device: torch.device) -> bool:
    """Whether bf16/fp16 inputs get bf16/fp16 GEMMs on this device (CUDA); elsewhere the projections run in fp32."""
    return device.type == "cuda"


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """GEMM dtype: low precision only on CUDA (bf16/fp16 inputs or the caller's low-precision autocast), else fp32."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if autocast_dtype in _LOW_PRECISION:
        dtype = autocast_dtype
    return dtype if _low_precision_gemms(hidden.device) and dtype in _LOW_PRECISION else torch.float32


def _project_rows(projection: _Projection, cols: int, start: int, end: int) -> torch.Tensor:
    return projection.forward(projection.chunk(start, end), cols)


class _Projection:
    """``z = h @ W.T + b`` on chunks of rows, with the matching backward.

    The logits come out in the compute dtype: fp32, or on CUDA with bf16/fp16 inputs the low-precision logits an HF
    ``lm_head`` returns (fp32 accumulation, rounded once), which the chunk maths upcasts inside its (compiled) graph;
    the gradient of the logits then comes back in that dtype too, half the bytes of fp32 per ``[c, V]`` tensor. The
    weight is cast to the compute dtype once per call (a no-op when it already has it).
    """

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, autocast_dtype: torch.dtype | None
    ) -> None:
        self.dtype = _compute_dtype(hidden, weight, autocast_dtype)
        self.hidden = hidden
        self.weight = weight.detach().to(self.dtype)
        self.bias = None if bias is None else bias.detach().to(self.dtype)

    def chunk(self, start: int, end: int) -> torch.Tensor:
        return self.hidden[start:end].detach().to(self.dtype)

    def forward(self, h: torch.Tensor, cols: int) -> torch.Tensor:
        """``[c, cols]`` logits (compute dtype) over the first ``cols`` vocabulary rows."""
        if self.bias is not None:
            return torch.addmm(self.bias[:cols], h, self.weight[:cols].t())
        return h @ self.weight[:cols].t()

    def backward(
        self,
        grad_logits: torch.Tensor,
        h: torch.Tensor,
        grad_hidden: torch.Tensor | None,
        grad_weight: torch.Tensor | None,
        grad_bias: torch.Tensor | None,
    ) -> None:
        """Accumulate ``dL/dh = dz @ W``, ``dL/dW += dz.T @ h``, ``dL/db += sum dz`` (fp32) for ``dz [c, cols]``
        in the compute dtype (the gradient of :meth:`forward`'s logits)."""
        cols = grad_logits.shape[-1]
        if grad_hidden is not None:
            grad_hidden += _mm_fp32(grad_logits, self.weight[:cols])
        if grad_weight is not None:
            _addmm_fp32_(grad_weight[:cols], grad_logits.t(), h)
        if grad_bias is not None:
            grad_bias[:cols] += grad_logits.float().sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# Chunking machinery
# ----------------------------------------------------------------------------------------------------------------------


def _plan_chunks(row_starts: list[int], chunk_size: int, keep_rows_whole: bool) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of at most ``chunk_size`` tokens covering ``[0, N)``.

    ``row_starts[r]`` is the index of row ``r``'s first token (``row_starts[-1] == N``; empty rows repeat a value).
    ``keep_rows_whole``: end a chunk at a row boundary rather than inside a row, unless the row starts at the chunk's
    start (a row longer than ``chunk_size``, which must be split). Such a split row's non-final chunks then hold only
    that row's tokens.
    """
    num_tokens = row_starts[-1]
    chunks = []
    start = 0
    while start < num_tokens:
        end = min(start + chunk_size, num_tokens)
        if keep_rows_whole and end < num_tokens:
            row_start = row_starts[bisect.bisect_right(row_starts, end) - 1]  # start of the row holding token `end`
            if start < row_start < end:
                end = row_start
        chunks.append((start, end))
        start = end
    return chunks


@dataclass
class _GradBuffers:
    """fp32 gradient accumulators of the student's hidden states ``[N, H]``, weight ``[V_s, H]`` and bias ``[V_s]``
    (``None`` where no gradient is needed)."""

    h: torch.Tensor | None
    w: torch.Tensor | None
    b: torch.Tensor | None

    @classmethod
    def zeros(cls, num_tokens: int, w_s: torch.Tensor, needs: tuple[bool, bool, bool]) -> _GradBuffers:
        device = w_s.device
        need_h, need_w, need_b = needs
        return cls(
            torch.zeros(num_tokens, w_s.shape[1], device=device) if need_h else None,
            torch.zeros(w_s.shape, device=device) if need_w else None,
            torch.zeros(w_s.shape[0], device=device) if need_b else None,
        )

    def add_scaled_(self, other: _GradBuffers, alpha: torch.Tensor | float, tokens: slice = slice(None)) -> None:
        """``self += alpha * other`` (the hidden-state rows only over ``tokens``), then ``other`` is zeroed."""
        for mine, theirs, part in ((self.h, other.h, tokens), (self.w, other.w, slice(None)),
                                   (self.b, other.b, slice(None))):
            if mine is not None:
                mine[part] += alpha * theirs[part]
                theirs[part] = 0.0

    def scale_(self, factor: torch.Tensor | float) -> None:
        for grad in (self.h, self.w, self.b):
            if grad is not None:
                grad.mul_(factor)

    def astuple(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.h, self.w, self.b

    def rows(self, start: int, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The hidden-state rows of tokens ``[start, end)`` and the whole weight and bias buffers."""
        return (self.h[start:end] if self.h is not None else None), self.w, self.b


@dataclass
class _ChunkWeights:
    """The EA weights of one chunk's tokens, as far as they are known."""

    values: torch.Tensor | None = None  # [c]; None: every weight is 1 (or not known yet, see `pending`)
    pending: bool = False  # the chunk's last row goes on in the next chunk: its weight is not known yet
    ended_row: tuple[torch.Tensor, int] | None = None  # a pending row that ended here: (its weight, its first token)


class _NoWeights:
    """Plain KD or no KD term: every weight is 1."""

    def chunk(self, start: int, end: int, terms: _ChunkTerms) -> _ChunkWeights:
        return _ChunkWeights()


@dataclass
class _TokenWeights:
    """Token granularity: a token's weight is final as soon as its chunk's entropies are."""

    vocab: int
    formula: str

    def chunk(self, start: int, end: int, terms: _ChunkTerms) -> _ChunkWeights:
        return _ChunkWeights(ea_weights_from_entropies(terms.teacher_entropy, terms.student_entropy, self.vocab,
                                                       self.formula))


class _SequenceWeights:
    """Sequence granularity: a row's weight comes from its mean entropies, known once its last token is projected.

    Chunks end at row boundaries (:func:`_plan_chunks`), so only a row longer than a chunk stays ``pending`` across
    chunks; its weight is handed out (``ended_row``) with the chunk where it ends.
    """

    def __init__(self, rows: torch.Tensor, num_rows: int, row_starts: list[int], vocab: int, formula: str) -> None:
        self.rows, self.row_starts, self.vocab, self.formula = rows, row_starts, vocab, formula
        self.count = torch.bincount(rows, minlength=num_rows).float().clamp(min=1)
        self.sum_t = torch.zeros(num_rows, device=rows.device)
        self.sum_s = torch.zeros(num_rows, device=rows.device)
        self.pending_row: int | None = None

    def chunk(self, start: int, end: int, terms: _ChunkTerms) -> _ChunkWeights:
        chunk_rows = self.rows[start:end]
        self.sum_t.index_add_(0, chunk_rows, terms.teacher_entropy)
        self.sum_s.index_add_(0, chunk_rows, terms.student_entropy)
        last_row = bisect.bisect_right(self.row_starts, end - 1) - 1
        if self.row_starts[last_row + 1] > end:  # the last row goes on
            if self.pending_row is None:
                self.pending_row = last_row
            return _ChunkWeights(pending=True)
        # every row of this chunk ends in it: their weights are final
        row_weights = ea_weights_from_entropies(self.sum_t / self.count, self.sum_s / self.count, self.vocab,
                                                self.formula)
        ended = None
        if self.pending_row is not None:
            ended = (row_weights[self.pending_row], self.row_starts[self.pending_row])
            self.pending_row = None
        return _ChunkWeights(row_weights[chunk_rows], ended_row=ended)


def _chunk_weighting(spec: _LossSpec, rows: torch.Tensor, num_rows: int, row_starts: list[int]):
    settings = spec.settings
    if not (spec.use_teacher and settings.ea):
        return _NoWeights()
    if settings.ea_granularity == "token":
        return _TokenWeights(spec.vocab_size, settings.ea_formula)
    return _SequenceWeights(rows, num_rows, row_starts, spec.vocab_size, settings.ea_formula)


class _GradientRoutes:
    """The loss sums and fp32 gradient buffers of one call, and where each chunk's KD part goes until its scale is
    known. One destination per reason to wait:

    * ``final``: the main buffers. When a chunk's KD scale is final there, CE and KD take one backward together.
    * ``by_mean``: ``ea_normalize: mean`` -- everything KD, scaled by 1 / mean weight after the last chunk. Without a
      CE term every gradient is KD, so this is ``final`` itself (scaled at the end: no second buffer).
    * ``by_row``: the non-final chunks of a row longer than ``chunk_size`` (sequence granularity), unweighted; scaled
      by the row's weight when the row ends and moved to ``settled`` (``by_mean`` or ``final``).

    A chunk whose KD part waits takes two backwards: CE into ``final``, KD into its destination.
    """

    def __init__(self, spec: _LossSpec, num_tokens: int, w_s: torch.Tensor, needs: tuple[bool, bool, bool]) -> None:
        settings = spec.settings
        self.ce_in_loss, self.kd_in_loss = settings.kd_ratio < 1, spec.use_teacher
        self.normalized = spec.use_teacher and settings.ea and settings.ea_normalize != "none"
        # Gradients are taken of the un-normalised sums (entries of order 1, safe to round to fp16 for the backward
        # GEMMs; 1/N can be far below fp16's smallest normal) and divided by N in fp32 at the end.
        self.ce_coef = 1.0 - settings.kd_ratio
        self.kd_coef = settings.kd_ratio * settings.kd_scale * settings.temperature**2
        zero = torch.zeros((), device=w_s.device, dtype=torch.float32)
        self.ce_sum, self.kd_sum, self.pending_kd = zero, zero.clone(), zero.clone()
        self.num_tokens, self.w_s, self.needs = num_tokens, w_s, needs
        self.final = _GradBuffers.zeros(num_tokens, w_s, needs) if any(needs) else None
        separate = self.final is not None and self.normalized and self.ce_in_loss
        self.settled = _GradBuffers.zeros(num_tokens, w_s, needs) if separate else self.final
        self.by_row: _GradBuffers | None = None  # allocated at the first long row

    def add(self, student: _Projection, h: torch.Tensor, s_logits: torch.Tensor, start: int, end: int,
            ce: torch.Tensor | None, kd: torch.Tensor | None, pending: bool) -> None:
        """Add a chunk's summed CE and (weighted, unless ``pending``) KD terms and their gradients."""
        if ce is not None:
            self.ce_sum += ce.detach()
        if kd is not None:
            if pending:
                self.pending_kd += kd.detach()
            else:
                self.kd_sum += kd.detach()
        if self.final is None:
            return
        if pending and self.by_row is None:
            self.by_row = _GradBuffers.zeros(self.num_tokens, self.w_s, self.needs)
        kd_target = self.by_row if pending else self.settled
        if kd_target is self.final or kd is None:  # one gradient of the whole chunk loss
            total = self.ce_coef * ce if self.ce_in_loss else None
            if kd is not None:
                total = self.kd_coef * kd if total is None else total + self.kd_coef * kd
            (d_logits,) = torch.autograd.grad(total, s_logits)
            student.backward(d_logits, h, *self.final.rows(start, end))
            return
        if self.ce_in_loss:  # CE is never EA-weighted: its gradient cannot wait with the KD one
            (d_ce,) = torch.autograd.grad(self.ce_coef * ce, s_logits, retain_graph=True)
            student.backward(d_ce, h, *self.final.rows(start, end))
        (d_kd,) = torch.autograd.grad(self.kd_coef * kd, s_logits)
        student.backward(d_kd, h, *kd_target.rows(start, end))

    def end_row(self, weight: torch.Tensor, first_token: int, start: int) -> None:
        """A long row ended in the chunk starting at ``start``: weight its earlier chunks' deferred KD part."""
        self.kd_sum += weight * self.pending_kd
        self.pending_kd.zero_()
        if self.final is not None:
            self.settled.add_scaled_(self.by_row, weight, slice(first_token, start))

    def finish(self, normalizer: torch.Tensor | None, denominator: torch.Tensor) -> torch.Tensor:
        """Apply the batch-wide factors (1 / mean weight, 1 / N) and return the loss."""
        if normalizer is not None:
            self.kd_sum /= normalizer
            if self.final is not None:
                if self.settled is self.final:
                    self.final.scale_(1.0 / normalizer)
                else:
                    self.final.add_scaled_(self.settled, 1.0 / normalizer)
        if self.final is not None:
            self.final.scale_(1.0 / denominator)
        loss = self.ce_coef * self.ce_sum / denominator if self.ce_in_loss else torch.zeros_like(self.ce_sum)
        if self.kd_in_loss:
            loss = loss + self.kd_coef * self.kd_sum / denominator
        return loss

    def gradients(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.final.astuple() if self.final is not None else (None, None, None)


def _fused_forward(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    teacher_in: SparseTeacher | tuple | None,
    targets: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    denominator: torch.Tensor,
    spec: _LossSpec,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...], dict[str, torch.Tensor]]:
    """Loss, gradients (fp32; ``None`` where not needed) and ``[N]`` statistics buffers, one chunk at a time:
    project the chunk -> per-token terms -> weights -> gradients (routed by :class:`_GradientRoutes`)."""
    num_tokens = h_s.shape[0]
    need_grad = any(needs)
    student = _Projection(h_s, w_s, b_s, spec.autocast_dtype)
    teacher_rows = _teacher_rows(teacher_in, spec)
    student_cols = w_s.shape[0] if spec.need_ce else spec.vocab_size  # pure KD without stats: the shared columns
    row_starts = [0, *torch.cumsum(torch.bincount(rows, minlength=num_rows), 0).tolist()]
    weighting = _chunk_weighting(spec, rows, num_rows, row_starts)
    routes = _GradientRoutes(spec, num_tokens, w_s, needs)
    buffers = _TokenBuffers.empty(num_tokens, h_s.device, spec)

    chunks = _plan_chunks(row_starts, chunk_size, keep_rows_whole=isinstance(weighting, _SequenceWeights))
    # Function.forward runs without grad mode: the per-chunk maths needs it to differentiate w.r.t. the logits.
    # Compiled chunk maths: a row split across chunks takes two gradients of one chunk graph (retain_graph), which
    # AOTAutograd's donated buffers forbid; its backward is compiled at the first autograd.grad, inside this block.
    no_donation = torch._functorch.config.patch(donated_buffer=False) if spec.compile else contextlib.nullcontext()
    with torch.enable_grad() if need_grad else contextlib.nullcontext(), no_donation:
        for start, end in chunks:
            hs_chunk = student.chunk(start, end)
            with torch.no_grad():
                s_logits = student.forward(hs_chunk, student_cols)
                t_logits = teacher_rows(start, end) if teacher_rows is not None else None
            s_logits.requires_grad_(need_grad)
            ce_grad = routes.ce_in_loss and need_grad
            terms = _run_chunk_terms(s_logits, t_logits, targets[start:end], spec, ce_grad)
            buffers.record(start, end, terms)
            weights = weighting.chunk(start, end, terms)
            ce = terms.ce.sum() if terms.ce is not None else None
            kd = None
            if spec.use_teacher:
                kd = (terms.divergence * weights.values).sum() if weights.values is not None else terms.divergence.sum()
            routes.add(student, hs_chunk, s_logits, start, end, ce, kd, weights.pending)
            terms = s_logits = t_logits = None  # free this chunk's [c, V] tensors before the next chunk's
            if weights.ended_row is not None:
                routes.end_row(*weights.ended_row, start)

    normalizer = None
    if routes.normalized:  # the weights' mean over the batch's tokens, now that every token's weight is known
        normalizer = ea_normalizer(buffers.weights(rows, num_rows, spec), spec.settings.ea_normalize)
    loss = routes.finish(normalizer, denominator.to(device=h_s.device, dtype=torch.float32))
    return loss, routes.gradients(), {"ce_sum": routes.ce_sum, "kd_sum": routes.kd_sum, **buffers.asdict()}


def _teacher_rows(teacher_in: SparseTeacher | tuple | None, spec: _LossSpec):
    """The teacher's side of a chunk (the one interface the chunk maths consumes): ``rows(start, end)`` gives the
    logits projected from its hidden states, or the chunk's rows of a cached top-k distribution."""
    if teacher_in is None:
        return None
    if isinstance(teacher_in, SparseTeacher):
        return teacher_in.rows
    return functools.partial(_project_rows, _Projection(*teacher_in, spec.autocast_dtype), spec.vocab_size)


@dataclass
class _TokenBuffers:
    """Per-token ``[N]`` values kept for the weights' normaliser and the statistics (detached)."""

    teacher_entropy: torch.Tensor | None
    student_entropy: torch.Tensor | None
    divergence: torch.Tensor | None

    @classmethod
    def empty(cls, num_tokens: int, device: torch.device, spec: _LossSpec) -> _TokenBuffers:
        def new(wanted: bool) -> torch.Tensor | None:
            return torch.empty(num_tokens, device=device) if wanted else None

        return cls(new(spec.need_entropies), new(spec.need_entropies), new(spec.need_entropies))

    def record(self, start: int, end: int, terms: _ChunkTerms) -> None:
        if self.teacher_entropy is not None:
            self.teacher_entropy[start:end] = terms.teacher_entropy
            self.student_entropy[start:end] = terms.student_entropy
            self.divergence[start:end] = terms.divergence.detach()

    def weights(self, rows: torch.Tensor, num_rows: int, spec: _LossSpec) -> torch.Tensor:
        settings = spec.settings
        return weights_for_tokens(self.teacher_entropy, self.student_entropy, rows, num_rows, spec.vocab_size,
                                  settings.ea_granularity, settings.ea_formula)

    def asdict(self) -> dict[str, torch.Tensor]:
        values = (self.teacher_entropy, self.student_entropy, self.divergence)
        return {k: v for k, v in zip(("teacher_entropy", "student_entropy", "divergence"), values) if v is not None}


_COMPILE_FAILURE: str | None = None  # why torch.compile of the chunk maths failed in this process (then: eager)


def _note_compile_failure(err: Exception) -> None:
    global _COMPILE_FAILURE
    _COMPILE_FAILURE = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    logger.warning("compile_loss: torch.compile of the fused loss's chunk maths failed (%s); continuing with the eager "
                   "chunk maths (same loss, slower). Set compile_loss: false to skip the attempt.", _COMPILE_FAILURE)


def _eager_if_compile_failed(spec: _LossSpec) -> _LossSpec:
    return dataclasses.replace(spec, compile=False) if spec.compile and _COMPILE_FAILURE else spec


class _FusedDistillationFunction(torch.autograd.Function):
    """Runs :func:`_fused_forward` (losses *and* gradients) in ``forward``; ``backward`` scales the stored gradients.

    Only the student hidden states, weight and bias are differentiable inputs; the teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, teacher, targets, rows, num_rows, denominator, spec, chunk_size, needs, stats_out):
        # GEMM dtypes are chosen explicitly (spec.autocast_dtype holds the caller's autocast state): no autocast inside.
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            args = (h_s, w_s, b_s, teacher, targets, rows, num_rows, denominator)
            try:
                loss, grads, buffers = _fused_forward(*args, _eager_if_compile_failed(spec), chunk_size, needs)
            except Exception as err:  # any compiler failure (no C compiler, an inductor bug, ...)
                if not spec.compile or _COMPILE_FAILURE:
                    raise
                _note_compile_failure(err)  # the eager maths below re-raises anything that is not the compiler's
                loss, grads, buffers = _fused_forward(*args, _eager_if_compile_failed(spec), chunk_size, needs)
        stats_out.update(buffers)
        ctx.grads = grads
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        out = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):  # our own fp32 buffers: scale in place, no second copy
            out.append(None if grad is None else grad.mul_(grad_output).to(dtype))
        ctx.grads = None
        return (*out, None, None, None, None, None, None, None, None, None)
