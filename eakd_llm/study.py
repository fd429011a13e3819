"""Statistics of a multi-seed study: spread over training seeds and paired differences with bootstrap intervals.

A method is trained with several training seeds (model initialisation and data order); each trained model is scored
on the same held-out prompts with the same sampling seeds. Scores are arrays ``[training seed, sampling seed, prompt]``.

* :func:`seed_summary`: the mean over training seeds of each seed's mean score, and the standard deviation of those
  per-seed means (``ddof=1`` when there are several seeds): the spread a reader should expect from retraining.
* :func:`paired_difference`: method A minus method B, paired by training seed (the same initialisation and data
  order), sampling seed and prompt. The interval is a two-stage (hierarchical) percentile bootstrap: each replicate
  resamples the training seeds with replacement, then the prompts with replacement within each drawn seed, and
  averages the paired differences (already averaged over sampling seeds). It therefore carries both the
  training-seed noise and the prompt-sampling noise; with one training seed only the prompts are resampled. With few
  training seeds the resampling understates the between-seed variance (by about 1/n of it: a third at n = 3), so the
  intervals are somewhat narrow; the per-seed differences are reported beside them.
* :func:`verdict`: ``better`` / ``worse`` when the 95% interval excludes 0, else ``not distinguishable at 95%``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95


def seed_summary(scores: np.ndarray) -> dict[str, Any]:
    """``{"mean", "std", "per_train_seed"}`` of ``[train seed, sampling seed, prompt]`` scores."""
    scores = np.asarray(scores, dtype=np.float64)
    per_seed = scores.reshape(scores.shape[0], -1).mean(axis=1)
    std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return {"mean": float(per_seed.mean()), "std": std, "per_train_seed": [float(v) for v in per_seed]}


def verdict(ci_low: float, ci_high: float) -> str:
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "not distinguishable at 95%"


def paired_difference(
    a: np.ndarray, b: np.ndarray, name: str, metric: str, num_bootstrap: int = 4000, seed: int = 0
) -> dict[str, Any]:
    """A - B with a two-stage bootstrap 95% interval (module docstring); ``a``, ``b``: ``[train seed, sampling
    seed, prompt]`` scores of the same seeds and prompts."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"paired scores must have one shape [train seed, sampling seed, prompt], got {a.shape} and "
                         f"{b.shape}")
    diff = (a - b).mean(axis=1)  # [train seed, prompt]: paired over sampling seeds
    seeds, prompts = diff.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, size=(num_bootstrap, seeds)) if seeds > 1 else np.zeros(
        (num_bootstrap, 1), dtype=np.int64)
    prompt_draws = rng.integers(0, prompts, size=(num_bootstrap, seeds, prompts))
    replicates = diff[seed_draws[..., None], prompt_draws].mean(axis=(1, 2))
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return {
        "name": name,
        "metric": metric,
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "verdict": verdict(float(low), float(high)),
        "per_train_seed_diff": [float(v) for v in diff.mean(axis=1)],
        "method": ("two-stage bootstrap: training seeds, then prompts within each seed" if seeds > 1
                   else "bootstrap over prompts (one training seed)"),
        "num_bootstrap": num_bootstrap,
    }


def verdict_line(comparison: dict[str, Any], metric_name: str | None = None) -> str:
    """One sentence for a comparison, e.g. ``EA-KD token − KD: ROUGE-L +1.2 [95% CI +0.3, +2.1] → better``."""
    metric = metric_name or comparison["metric"]
    return (f"{comparison['name']}: {metric} {comparison['mean_diff']:+.2f} [95% CI {comparison['ci_low']:+.2f}, "
            f"{comparison['ci_high']:+.2f}] → {comparison['verdict']}")


def stack_scores(per_seed: Sequence[dict[int, Sequence[float]]], sampling_seeds: Sequence[int]) -> np.ndarray:
    """``[train seed, sampling seed, prompt]`` from one ``{sampling seed: per-prompt scores}`` dict per training
    seed."""
    return np.array([[list(scores[s]) for s in sampling_seeds] for scores in per_seed], dtype=np.float64)


def machine_description() -> str:
    """The machine a measurement ran on: the GPU's name, or the CPU's model and core count; with the torch version."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
