"""Where EA's weights adapt: the spread of w over a real pair's answer tokens, per tau' and per ``ea_formula``.

At every answer token of the study's test answers (teacher forcing, as fidelity scoring does), the teacher's and the
student's entropies at each tau' give the EA weight ``w`` (:func:`eakd_llm.loss.distillation.ea_weights_from_entropies`,
H_ub = log V); the per-token divergence is KL(T || S) at tau = 1 over the shared vocabulary. Per (tau', formula):

* ``mean``, ``cv`` (std / mean), percentiles ``p10``, ``p50``, ``p90`` and ``p90_p10`` (their ratio) of w;
* ``corr_kl``: Pearson correlation of w with the per-token KL (does EA weigh where the student is far off?);
* ``s_eff_over_mean``: EA's effective scale ``sum(w d) / sum(d)`` over the mean weight (1: w and d unrelated);
* ``top20_kl_share``: the share of all KL carried by the 20% of tokens with the largest w (0.2: no concentration).

A weight that varies little (CV near 0) reweighs nothing: EA then only scales the KD term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..evaluation.fidelity import padded_batches
from ..loss.distillation import (
    EA_FORMULAS,
    IGNORE_INDEX,
    ea_weights_from_entropies,
    token_divergence,
    token_entropy,
)
from ..models.generation import model_device

ENTROPY_TEMPERATURES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)


def spread_stats(weights: np.ndarray, divergence: np.ndarray) -> dict[str, float]:
    """The spread of ``weights`` (one per token) and how it lines up with the per-token ``divergence``."""
    w = np.asarray(weights, dtype=np.float64)
    d = np.asarray(divergence, dtype=np.float64)
    if w.shape != d.shape or w.size < 2:
        raise ValueError(f"need two or more tokens with one weight and one divergence each, got {w.shape}, {d.shape}")
    mean = float(w.mean())
    p10, p50, p90 = (float(v) for v in np.percentile(w, [10, 50, 90]))
    top = np.argsort(-w, kind="stable")[: max(1, math.ceil(0.2 * w.size))]
    return {
        "mean": mean, "cv": float(w.std() / mean) if mean > 0 else float("nan"),
        "p10": p10, "p50": p50, "p90": p90, "p90_p10": p90 / p10 if p10 > 0 else float("inf"),
        "corr_kl": float(np.corrcoef(w, d)[0, 1]) if w.std() > 0 and d.std() > 0 else float("nan"),
        "s_eff_over_mean": float((w * d).sum() / d.sum() / mean) if mean > 0 and d.sum() > 0 else float("nan"),
        "top20_kl_share": float(d[top].sum() / d.sum()) if d.sum() > 0 else float("nan"),
    }


@torch.no_grad()
def token_terms(teacher, student, examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int,
                temperatures: Sequence[float] = ENTROPY_TEMPERATURES, batch_size: int = 8) -> dict[str, Any]:
    """Per answer token (all examples, in order): ``kl`` (KL(T || S) at tau = 1) and, per tau', the teacher's and the
    student's entropies ``h_t[tau']``, ``h_s[tau']``; ``vocab``: the shared vocabulary they are taken over."""
    kl, h_t, h_s = [], {t: [] for t in temperatures}, {t: [] for t in temperatures}
    vocab = None
    for ids, labels, mask in padded_batches(examples, pad_id, batch_size):
        keep = labels[:, 1:] != IGNORE_INDEX
        s = student(input_ids=ids.to(model_device(student)), attention_mask=mask.to(model_device(student))).logits
        t = teacher(input_ids=ids.to(model_device(teacher)), attention_mask=mask.to(model_device(teacher))).logits
        vocab = min(s.shape[-1], t.shape[-1])
        s = s[:, :-1, :vocab].float()[keep.to(s.device)]
        t = t[:, :-1, :vocab].float()[keep.to(t.device)].to(s.device)
        kl.append(token_divergence(s, t, "fkl"))
        for tau in temperatures:
            h_t[tau].append(token_entropy(t, tau))
            h_s[tau].append(token_entropy(s, tau))
    return {"vocab": vocab, "kl": torch.cat(kl).cpu().numpy(),
            "h_t": {tau: torch.cat(v).cpu().numpy() for tau, v in h_t.items()},
            "h_s": {tau: torch.cat(v).cpu().numpy() for tau, v in h_s.items()}}


def spread_table(terms: Mapping[str, Any], formulas: Sequence[str] = EA_FORMULAS) -> list[dict[str, Any]]:
    """One row per (tau', formula): the entropies' means and :func:`spread_stats` of the weights."""
    rows = []
    for tau, h_t in terms["h_t"].items():
        h_s = terms["h_s"][tau]
        for formula in formulas:
            w = ea_weights_from_entropies(torch.as_tensor(h_t), torch.as_tensor(h_s), terms["vocab"], formula)
            rows.append({"entropy_temperature": tau, "ea_formula": formula, "tokens": int(len(h_t)),
                         "mean_h_t": float(np.mean(h_t)), "mean_h_s": float(np.mean(h_s)),
                         **spread_stats(w.numpy(), terms["kl"])})
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| τ′ | formula | mean H_T | mean H_S | mean w | CV(w) | p90/p10 | corr(w, KL) | s_eff / mean w | "
             "KL share of top-20% w |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['entropy_temperature']:g} | {r['ea_formula']} | {r['mean_h_t']:.2f} | "
                     f"{r['mean_h_s']:.2f} | {r['mean']:.3g} | {r['cv']:.2f} | {r['p90_p10']:.3g} | "
                     f"{r['corr_kl']:+.2f} | {r['s_eff_over_mean']:.2f} | {r['top20_kl_share']:.2f} |")
    return lines
