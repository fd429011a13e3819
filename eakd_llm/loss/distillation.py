"""Distillation divergences and EA-KD entropy weights, in pure PyTorch (no transformers import).

Conventions shared by every function here:

* logits have shape ``[..., V]`` (usually ``[B, T, V]``); the caller aligns student and teacher logits with the labels
  (for a causal LM: ``logits[:, :-1]`` against ``labels[:, 1:]``) and slices both to a common vocabulary;
* ``labels == -100`` (:data:`IGNORE_INDEX`) marks positions that carry no loss;
* all arithmetic is done in float32 whatever the input dtype, so bf16/fp16 models get fp32 loss math.

EA-KD (Entropy-based Adaptive Knowledge Distillation, arXiv 2311.13621) re-weights each position's distillation loss by

    w = (H_T + H_T * H_S / H_ub) / 2,        H_ub = log |V|,

where H_T and H_S are the teacher's and student's entropies of ``softmax(logits / tau')`` in nats. ``w`` is detached:
it steers which positions the student learns from, it is not itself optimised.

Two options separate EA's *relative* weighting from its *scale* (the paper's weights are not normalised, so EA also
multiplies the KD term by their mean, about 4 at tau' = 2 on the demo's pair):

* ``ea_formula``: ``full`` (the formula above), ``teacher`` (``w = H_T``) or ``interaction`` (``w = H_T * H_S / H_ub``),
  the terms of the paper's weight ablation;
* ``ea_normalize``: ``none`` (the paper) or ``mean``: the weights are divided by their mean over the micro-batch's loss
  tokens (sequence granularity: the token-weighted mean over sequences), detached, so their mean is 1 and only the
  relative weighting remains (:func:`ea_normalizer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")
GRANULARITIES = ("token", "sequence")
EA_FORMULAS = ("full", "teacher", "interaction")
EA_NORMALIZATIONS = ("none", "mean")
DEFAULT_ENTROPY_TEMPERATURE = 2.0

Divergence = Literal["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
Granularity = Literal["token", "sequence"]
EAFormula = Literal["full", "teacher", "interaction"]
EANormalization = Literal["none", "mean"]


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def check_temperature(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_ea_options(ea_granularity: str, ea_formula: str, ea_normalize: str) -> None:
    """The EA granularity, weight formula and normalisation are known values."""
    check_choice("ea_granularity", ea_granularity, GRANULARITIES)
    check_choice("ea_formula", ea_formula, EA_FORMULAS)
    check_choice("ea_normalize", ea_normalize, EA_NORMALIZATIONS)


def check_divergence_params(divergence: str, skew_alpha: float, jsd_beta: float) -> None:
    """The divergence is known and the parameter it uses (skew alpha or JSD beta) is in (0, 1)."""
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence in ("skl", "srkl") and not 0.0 < skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in (0, 1), got {skew_alpha}")
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dimension; 0 * log 0 is taken as 0 (e.g. for -inf logits).

    Only exact zeros are masked, so a NaN anywhere still propagates to the loss and is caught, never hidden.
    """
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p == 0, torch.zeros_like(terms), terms).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    terms = p * log_p
    return -torch.where(p == 0, torch.zeros_like(terms), terms).sum(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]``, any float dtype (computed in fp32).
        temperature: softmax temperature, > 0.

    Returns:
        ``[...]`` fp32 entropies in ``[0, log V]``. Differentiable; callers that weight with it detach.
    """
    check_temperature("temperature", temperature)
    return entropy_from_log_probs(log_probs(logits, temperature))


def divergence_from_log_probs(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    divergence: Divergence = "fkl",
    skew_alpha: float = 0.1,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """The per-position divergence between two log-distributions ``[..., V]`` -> ``[...]``.

    Split out of :func:`token_divergence` so the chunked loss can reuse the math on log-probabilities it already has.
    See :func:`token_divergence` for the formulas.
    """
    check_divergence_params(divergence, skew_alpha, jsd_beta)
    log_s, log_t = student_log_probs, teacher_log_probs
    if divergence == "fkl":
        return _kl(log_t, log_s)
    if divergence == "rkl":
        return _kl(log_s, log_t)
    if divergence == "skl":  # KL(p_T || a*p_T + (1-a)*p_S)
        return _kl(log_t, _log_mixture(log_t, log_s, skew_alpha))
    if divergence == "srkl":  # KL(p_S || (1-a)*p_T + a*p_S)
        return _kl(log_s, _log_mixture(log_s, log_t, skew_alpha))
    if divergence == "jsd":
        log_m = _log_mixture(log_t, log_s, jsd_beta)  # m = b*p_T + (1-b)*p_S
        return jsd_beta * _kl(log_t, log_m) + (1.0 - jsd_beta) * _kl(log_s, log_m)
    # tvd
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence = "fkl",
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions, summed over the vocabulary.

    With ``p_T = softmax(teacher_logits / temperature)`` and ``p_S = softmax(student_logits / temperature)``:

    * ``fkl``:  KL(p_T || p_S)  (forward KL, classic KD)
    * ``rkl``:  KL(p_S || p_T)  (reverse KL, MiniLLM)
    * ``skl``:  KL(p_T || a*p_T + (1-a)*p_S)   (skew forward KL, DistiLLM; a = ``skew_alpha``)
    * ``srkl``: KL(p_S || (1-a)*p_T + a*p_S)   (skew reverse KL, DistiLLM)
    * ``jsd``:  b*KL(p_T || m) + (1-b)*KL(p_S || m), m = b*p_T + (1-b)*p_S  (generalized JSD; b = ``jsd_beta``)
    * ``tvd``:  1/2 * sum |p_T - p_S|  (total variation distance)

    Args:
        student_logits, teacher_logits: ``[..., V]`` with the same shape.

    Returns:
        ``[...]`` fp32 divergences; differentiable with respect to both inputs.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}; slice both to the shared vocabulary first"
        )
    check_temperature("temperature", temperature)
    return divergence_from_log_probs(
        log_probs(student_logits, temperature),
        log_probs(teacher_logits, temperature),
        divergence=divergence,
        skew_alpha=skew_alpha,
        jsd_beta=jsd_beta,
    )


@dataclass
class SparseTeacher:
    """A teacher distribution known on its top-k tokens plus one tail bucket, per loss token (an offline cache).

    Attributes (``N`` loss tokens in row-major order of the batch's loss positions):
        ids: ``[N, k]`` the teacher's top-k token ids. A row with fewer entries (an entropy-adaptive cache, whose
            ``k`` is its ceiling) ends in empty slots: id ``-1``, log-probability ``-inf``; its first slot is never
            empty.
        log_probs: ``[N, k]`` their log-probabilities at the divergence temperature tau (normalised over the full
            vocabulary, not over the top-k).
        log_tail: ``[N]`` log of the mass outside the row's entries at tau (``-inf`` or ignored when ``k == V``).
        entropy: ``[N]`` the teacher's exact entropy at the entropy temperature tau', over the full vocabulary.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    log_tail: torch.Tensor
    entropy: torch.Tensor

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def rows(self, start: int, end: int) -> SparseTeacher:
        return SparseTeacher(self.ids[start:end], self.log_probs[start:end], self.log_tail[start:end],
                             self.entropy[start:end])

    def has_nonfinite(self) -> bool:
        """NaN or +inf anywhere, or a non-finite entropy: values that make the loss NaN (a ``-inf`` log-probability
        is a zero probability, which the divergences handle)."""
        values = (self.log_probs.float(), self.log_tail.float())
        return bool(any((v.isnan() | (v == float("inf"))).any() for v in values) or
                    not torch.isfinite(self.entropy.float()).all())


def fill_empty_slots(ids: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` ids whose empty slots (``-1``) repeat their row's first id, which is never empty: a gather there is
    discarded by the caller and a scatter there is idempotent, so the slot touches nothing."""
    return torch.where(ids < 0, ids[:, :1], ids)


def bucket_log_probs(student_log_probs: torch.Tensor, teacher: SparseTeacher) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student, teacher)`` log-distributions ``[N, k + 1]`` over the teacher's top-k tokens plus the tail bucket
    (everything else), or ``[N, k]`` when ``k == V`` (no tail).

    The student's tail is the log-sum-exp of its log-probabilities outside the top-k (exact, differentiable). The
    teacher's buckets are renormalised to sum to 1 (a quantised cache sums to 1 only approximately). An empty slot
    (id ``-1``) is an empty bucket on both sides: log-probability ``-inf``, no gradient, its mass left in the tail.
    """
    vocab = student_log_probs.shape[-1]
    ids = teacher.ids.long()
    empty = ids < 0
    ids = fill_empty_slots(ids)  # then the gathered empty slots are emptied
    log_s = student_log_probs.gather(-1, ids).masked_fill(empty, float("-inf"))
    log_t = teacher.log_probs.float().masked_fill(empty, float("-inf"))
    if teacher.k < vocab:
        outside = student_log_probs.scatter(-1, ids, float("-inf"))
        log_s = torch.cat([log_s, outside.logsumexp(-1, keepdim=True)], dim=-1)
        log_t = torch.cat([log_t, teacher.log_tail.float().unsqueeze(-1)], dim=-1)
    log_t = log_t - log_t.logsumexp(-1, keepdim=True)
    return log_s, log_t


def sparse_divergence(
    student_log_probs: torch.Tensor,
    teacher: SparseTeacher,
    divergence: Divergence = "fkl",
    skew_alpha: float = 0.1,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """The divergence between the teacher's top-k + tail distribution and the student's, coarsened the same way
    (:func:`bucket_log_probs`), ``[N]``.

    With ``k == V`` it is the full divergence (the buckets are the vocabulary). With ``k < V`` it is the divergence of
    the two distributions with the tail tokens merged into one bucket, which by the data-processing inequality never
    exceeds the full one; the gap is the divergence *inside* the tail, weighted by its mass (for forward KL exactly
    ``p_T(tail) * KL(p_T(.|tail) || p_S(.|tail))``): small when the teacher's tail mass is small.
    """
    log_s, log_t = bucket_log_probs(student_log_probs, teacher)
    return divergence_from_log_probs(log_s, log_t, divergence, skew_alpha=skew_alpha, jsd_beta=jsd_beta)


def ea_weights_from_entropies(
    teacher_entropy: torch.Tensor, student_entropy: torch.Tensor, vocab_size: int, formula: EAFormula = "full"
) -> torch.Tensor:
    """EA weights from already computed entropies (detached, fp32), by ``formula``:

    * ``full``: ``w = (H_T + H_T * H_S / log V) / 2`` (the paper's weight);
    * ``teacher``: ``w = H_T`` (the teacher-entropy term alone);
    * ``interaction``: ``w = H_T * H_S / log V`` (the interaction term alone).
    """
    check_choice("ea_formula", formula, EA_FORMULAS)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 for EA weights (H_ub = log V), got {vocab_size}")
    h_t = teacher_entropy.detach().float()
    if formula == "teacher":
        return h_t
    interaction = h_t * student_entropy.detach().float() / math.log(vocab_size)
    return interaction if formula == "interaction" else 0.5 * (h_t + interaction)


def ea_normalizer(token_weights: torch.Tensor, normalize: EANormalization = "none") -> torch.Tensor:
    """The detached scalar the EA weights are divided by: 1 for ``none``; for ``mean``, the mean of ``token_weights``
    (one weight per loss token, sequence weights repeated over their tokens, so a sequence counts by its length).

    A batch without loss tokens, or whose weights are all 0 (every teacher distribution one-hot), gets 1: there is no
    relative weighting to keep, and dividing would give NaN.
    """
    check_choice("ea_normalize", normalize, EA_NORMALIZATIONS)
    one = torch.ones((), device=token_weights.device, dtype=torch.float32)
    if normalize == "none" or token_weights.numel() == 0:
        return one
    mean = token_weights.detach().float().mean()
    return torch.where(mean > 0, mean, one)


def sequence_weights(
    h_t: torch.Tensor,
    h_s: torch.Tensor,
    row_of_token: torch.Tensor,
    num_rows: int,
    vocab_size: int,
    formula: EAFormula = "full",
) -> torch.Tensor:
    """Sequence-level EA weights ``[num_rows]`` from flattened per-token entropies ``[N]`` and each token's row.

    H_T and H_S are averaged over each row's tokens, then combined; a row without tokens gets weight 0.
    """
    counts = torch.zeros(num_rows, device=h_t.device).index_add_(0, row_of_token, torch.ones_like(h_t)).clamp(min=1)
    mean_t = torch.zeros(num_rows, device=h_t.device).index_add_(0, row_of_token, h_t) / counts
    mean_s = torch.zeros(num_rows, device=h_t.device).index_add_(0, row_of_token, h_s) / counts
    return ea_weights_from_entropies(mean_t, mean_s, vocab_size, formula)


def ea_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    granularity: Granularity = "token",
    formula: EAFormula = "full",
    normalize: EANormalization = "none",
) -> torch.Tensor:
    """EA-KD weights ``w = (H_T + H_T * H_S / H_ub) / 2`` with ``H_ub = log V``, detached.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` (token granularity also accepts any ``[..., V]``).
        labels: ``[B, T]``; positions with ``-100`` are excluded from the sequence averages and from the ``mean``
            normaliser. Token weights are computed for every position; the loss ignores the masked ones.
        temperature: the entropy temperature tau' of ``softmax(logits / tau')``.
        granularity: ``"token"`` -> ``[B, T]`` (one weight per position); ``"sequence"`` -> ``[B]``: H_T and H_S are
            first averaged over each sequence's loss positions, then combined by the same formula (a sequence without
            any loss position gets weight 0).
        formula: ``full`` (above), ``teacher`` (``H_T``) or ``interaction`` (``H_T * H_S / H_ub``), see
            :func:`ea_weights_from_entropies`.
        normalize: ``none``, or ``mean``: divide by the mean weight over the loss positions (sequence granularity: the
            token-weighted mean of the sequence weights), see :func:`ea_normalizer`.
    """
    check_choice("granularity", granularity, GRANULARITIES)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    with torch.no_grad():
        h_t = token_entropy(teacher_logits, temperature)
        h_s = token_entropy(student_logits, temperature)
        vocab_size = student_logits.shape[-1]
        mask = torch.ones_like(h_t, dtype=torch.bool) if labels is None else labels != IGNORE_INDEX
        if granularity == "token":
            weights = ea_weights_from_entropies(h_t, h_s, vocab_size, formula)
            return weights / ea_normalizer(weights[mask], normalize)
        if h_t.dim() != 2:
            raise ValueError(f"sequence granularity needs [B, T, V] logits, got {tuple(student_logits.shape)}")
        row_of_token = torch.arange(h_t.shape[0], device=h_t.device).unsqueeze(1).expand_as(mask)[mask]
        weights = sequence_weights(h_t[mask], h_s[mask], row_of_token, h_t.shape[0], vocab_size, formula)
        return weights / ea_normalizer(weights[row_of_token], normalize)


def sequence_rows(labels: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(row of each loss token [N], number of rows)``: the sequence each loss position belongs to, for sequence-level
    EA. Without ``sequence_ids`` a sequence is a row of ``labels``; packed batches give each document's number
    (``sequence_ids [B, T]``, non-decreasing in row-major order over the loss positions)."""
    mask = labels != IGNORE_INDEX
    if sequence_ids is None:
        return torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask], labels.shape[0]
    if sequence_ids.shape != labels.shape:
        raise ValueError(f"sequence_ids shape {tuple(sequence_ids.shape)} does not match labels {tuple(labels.shape)}")
    rows = sequence_ids[mask]
    if rows.numel() and (rows.min() < 0 or (rows[1:] < rows[:-1]).any()):
        raise ValueError("sequence_ids must be >= 0 on loss positions and non-decreasing in row-major order")
    return rows, int(rows.max()) + 1 if rows.numel() else 0


def loss_denominator(num_loss_tokens: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """N in ``sum / N``: the global token count when the Trainer gives one, else the local count, never below 1."""
    if num_items_in_batch is None:
        return num_loss_tokens.float().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(num_loss_tokens.device).float().clamp(min=1)
    return torch.tensor(float(max(num_items_in_batch, 1)), device=num_loss_tokens.device)


@dataclass(frozen=True)
class LossSettings:
    """How the loss is computed, built once (e.g. :meth:`from_config`) and shared by both loss paths.

    ``loss = (1 - kd_ratio) * CE + kd_ratio * kd_scale * KD``; :func:`distillation_loss` computes the KD term alone
    (it reads every field but ``kd_ratio`` and ``kd_scale``), :func:`eakd_llm.loss.chunked.fused_distillation_loss` the
    whole loss. Validated on creation, so a bad value fails before any tensor is touched.

    Attributes:
        divergence: one of :data:`DIVERGENCES`, see :func:`token_divergence`.
        temperature: tau of the divergence; the KD term is multiplied by tau^2 so gradients keep their scale.
        ea: weight each position by its EA weight (``False``: every w is 1, plain KD).
        ea_granularity: ``"token"`` or ``"sequence"`` (every position of a sequence shares its sequence weight).
        entropy_temperature: tau' of the entropies, separate from tau (2.0, the paper's value for transformers).
        skew_alpha, jsd_beta: the mixing parameters of the skew KLs and the generalized JSD, in (0, 1).
        ea_formula: ``full`` (the paper's weight), ``teacher`` (``H_T``) or ``interaction`` (``H_T * H_S / H_ub``).
        ea_normalize: ``none`` (the paper), or ``mean``: the weights are divided by their mean over the call's loss
            positions (:func:`ea_normalizer`), so EA reweights positions without scaling the KD term. The mean is
            taken per call (per micro-batch), so gradient accumulation equals one big batch only up to that mean.
        kd_ratio: ``r`` in ``[0, 1]``; 0 is plain SFT (teacher unused), 1 is pure KD (no CE term).
        kd_scale: a constant multiplier of the KD term (> 0), a control for experiments: plain KD scaled by EA's
            effective scale has EA's KD scale without its adaptivity.
    """

    divergence: Divergence = "fkl"
    temperature: float = 1.0
    ea: bool = True
    ea_granularity: Granularity = "token"
    entropy_temperature: float = DEFAULT_ENTROPY_TEMPERATURE
    skew_alpha: float = 0.1
    jsd_beta: float = 0.5
    ea_formula: EAFormula = "full"
    ea_normalize: EANormalization = "none"
    kd_ratio: float = 0.5
    kd_scale: float = 1.0

    def __post_init__(self) -> None:
        check_divergence_params(self.divergence, self.skew_alpha, self.jsd_beta)
        check_ea_options(self.ea_granularity, self.ea_formula, self.ea_normalize)
        check_temperature("temperature", self.temperature)
        check_temperature("entropy_temperature", self.entropy_temperature)
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")
        check_temperature("kd_scale", self.kd_scale)  # the same rule: a finite number > 0

    @classmethod
    def from_config(cls, config: object) -> LossSettings:
        """The settings of a config with attributes of the same names (an ``EAKDConfig``); ``entropy_temperature``
        ``None`` means the default."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        if values["entropy_temperature"] is None:
            values["entropy_temperature"] = DEFAULT_ENTROPY_TEMPERATURE
        return cls(**values)

    def for_generated_batch(self) -> LossSettings:
        """A student-generated batch has no ground truth, so no CE term: ``kd_ratio`` 1 with the KD term scaled by the
        configured ``kd_ratio`` (the same KD weight as on dataset batches)."""
        if self.kd_ratio == 0:
            return self
        return replace(self, kd_ratio=1.0, kd_scale=self.kd_ratio * self.kd_scale)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_ratio > 0


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    labels: torch.Tensor,
    settings: LossSettings | None = None,
    *,
    sequence_ids: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The (EA-weighted) distillation loss ``tau^2 * sum_n w_n * d_n / N`` over positions with ``labels != -100``.

    Args:
        student_logits, teacher_logits: ``[B, T, V]``, aligned with ``labels`` and sliced to the same vocabulary. The
            teacher may instead be a :class:`SparseTeacher` (an offline cache) over the ``N`` loss positions: the
            divergence is then taken on its top-k tokens plus one tail bucket (:func:`sparse_divergence`) and H_T is
            its stored exact entropy, so the EA weights stay exact.
        labels: ``[B, T]``; ``-100`` marks positions without loss.
        settings: divergence, temperatures and EA options (:class:`LossSettings`; ``kd_ratio`` and ``kd_scale`` are
            not used here). ``None``: the defaults (forward KL, token-level EA at tau' = 2).
        sequence_ids: ``[B, T]`` document numbers of a packed batch (several documents per row): sequence-level EA
            then averages per document. ``None``: each row is one sequence.
        num_items_in_batch: N, the global number of loss positions (over gradient-accumulation steps and processes),
            as the HF Trainer passes it, so accumulated/distributed gradients equal one big batch's. ``None``: the
            local count. A batch without loss positions gives 0 (never NaN).
        return_stats: also return detached statistics over the loss positions: ``teacher_entropy``,
            ``student_entropy`` (means, at tau'), ``ea_weight_mean/min/max`` (of the formula's weights *before*
            normalisation, so they show the scale EA would apply), ``divergence_sum`` and ``weighted_divergence_sum``
            (``sum d_n`` and ``sum w_n d_n`` with those weights: their ratio is EA's effective scale of the KD term)
            and ``num_tokens``.

    Returns:
        A scalar fp32 loss, or ``(loss, stats)`` with ``return_stats=True``.
    """
    settings = LossSettings() if settings is None else settings
    sparse = isinstance(teacher_logits, SparseTeacher)
    if not sparse and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}; slice both to the shared vocabulary first"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(student_logits.shape)}")

    mask = labels != IGNORE_INDEX
    # Work only on loss positions: at LLM scale the prompt and padding are a large share of B*T*V.
    s_logits = student_logits[mask]  # [N, V]
    if sparse and teacher_logits.ids.shape[0] != s_logits.shape[0]:
        raise ValueError(f"the sparse teacher has {teacher_logits.ids.shape[0]} tokens for {s_logits.shape[0]} loss "
                         "positions")
    row_of_token, num_rows = sequence_rows(labels, sequence_ids)

    tau, tau_e = settings.temperature, settings.entropy_temperature
    log_s = log_probs(s_logits, tau)
    params = {"skew_alpha": settings.skew_alpha, "jsd_beta": settings.jsd_beta}
    if sparse:
        per_token = sparse_divergence(log_s, teacher_logits, settings.divergence, **params)
    else:
        t_logits = teacher_logits[mask]
        log_t = log_probs(t_logits.detach(), tau)
        per_token = divergence_from_log_probs(log_s, log_t, settings.divergence, **params)

    if settings.ea or return_stats:
        with torch.no_grad():
            same_tau = tau_e == tau
            if sparse:
                h_t = teacher_logits.entropy.float()
            else:
                h_t = entropy_from_log_probs(log_t if same_tau else log_probs(t_logits, tau_e))
            h_s = entropy_from_log_probs(log_s.detach() if same_tau else log_probs(s_logits.detach(), tau_e))
            weights = weights_for_tokens(
                h_t, h_s, row_of_token, num_rows, s_logits.shape[-1], settings.ea_granularity, settings.ea_formula
            )
    unweighted = per_token
    if settings.ea:
        per_token = per_token * (weights / ea_normalizer(weights, settings.ea_normalize))

    num_tokens = mask.sum()
    loss = (tau**2) * per_token.sum() / loss_denominator(num_tokens, num_items_in_batch)
    if not return_stats:
        return loss
    stats = {"num_tokens": num_tokens.detach()}
    if num_tokens > 0:
        stats.update(entropy_stats(h_t, h_s, weights))
        stats.update(divergence_sums(unweighted.detach(), weights))
    return loss, stats


def divergence_sums(divergence: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum d_n`` and ``sum w_n d_n`` (weights before normalisation): their ratio over a logging window is EA's
    effective scale of the KD term, larger than the mean weight when high-entropy positions also diverge more."""
    return {"divergence_sum": divergence.sum(), "weighted_divergence_sum": (weights * divergence).sum()}


def entropy_stats(h_t: torch.Tensor, h_s: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logged entropy and weight statistics of ``N > 0`` loss tokens (both loss paths)."""
    return {
        "teacher_entropy": h_t.mean(),
        "student_entropy": h_s.mean(),
        "ea_weight_mean": weights.mean(),
        "ea_weight_min": weights.min(),
        "ea_weight_max": weights.max(),
    }


def weights_for_tokens(
    h_t: torch.Tensor,
    h_s: torch.Tensor,
    row_of_token: torch.Tensor,
    num_rows: int,
    vocab_size: int,
    granularity: str,
    formula: EAFormula = "full",
) -> torch.Tensor:
    """EA weights (before normalisation) for flattened loss tokens ``[N]``; sequence granularity averages the
    entropies per row first. Both loss paths take their weights from here and :func:`ea_normalizer`."""
    if granularity == "token":
        return ea_weights_from_entropies(h_t, h_s, vocab_size, formula)
    return sequence_weights(h_t, h_s, row_of_token, num_rows, vocab_size, formula)[row_of_token]
