"""The statistics of the batches between two log lines, reduced over the window and then over processes."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch

# Means over the window's batches, except min/max (extremes) and sums (added up, then turned into ratios).
MEAN_KEYS = ("ce_loss", "kd_loss", "teacher_entropy", "student_entropy", "ea_weight_mean")
MIN_KEYS = ("ea_weight_min",)
MAX_KEYS = ("ea_weight_max",)
SUM_KEYS = ("divergence_sum", "weighted_divergence_sum")
# Optimizer-step statistics: the share of steps whose gradient norm was clipped, and the pre-clip norms.
STEP_KEYS = ("grad_clipped", "grad_norm_preclip_mean", "grad_norm_preclip_max")
TOKENS = ":tokens"  # suffix of a token-weighted mean's weight column (the loss tokens behind its sum)


def _ratios(sums: Mapping[str, float], suffix: str = "") -> dict[str, float]:
    """``ea_effective_scale = sum w d / sum d`` over the window's loss tokens: the factor EA multiplies the KD term
    by, compared with plain KD (larger than the mean weight when high-entropy positions also diverge more)."""
    div, weighted = sums.get("divergence_sum" + suffix), sums.get("weighted_divergence_sum" + suffix)
    if div is None or weighted is None or not div > 0:
        return {}
    return {"ea_effective_scale" + suffix: weighted / div}


class LogWindow:
    """Collects per-batch statistics (``record``) and optimizer-step gradient norms (``record_grad_norm``) until
    ``reduce`` turns them into one log line's values; with ``by_source`` each batch statistic is also kept per data
    source (``dataset`` / ``generated``). The means are over batches, or with ``token_weighted`` over the window's
    loss tokens (an evaluation's ``ce_loss`` is then the CE per response token of the whole evaluation set)."""

    def __init__(self, by_source: bool = False, token_weighted: bool = False) -> None:
        self.by_source = by_source
        self.token_weighted = token_weighted
        self.values: dict[str, list[float]] = defaultdict(list)

    def record(self, stats: Mapping[str, torch.Tensor], source: str = "dataset",
               num_tokens: float | torch.Tensor = 1.0) -> None:
        """One batch's statistics; ``num_tokens``: its loss tokens, the weight of its means in a token-weighted
        window."""
        for key, value in stats.items():
            if key == "num_tokens":
                continue
            self._append(key, float(value), float(num_tokens))
            if self.by_source:
                self._append(f"{key}/{'dataset' if source == 'dataset' else 'generated'}", float(value),
                             float(num_tokens))

    def _append(self, key: str, value: float, num_tokens: float) -> None:
        if self.token_weighted and key.startswith(MEAN_KEYS):  # kept as a sum and its weight
            self.values[key].append(value * num_tokens)
            self.values[key + TOKENS].append(num_tokens)
        else:
            self.values[key].append(value)

    def record_grad_norm(self, norm: float, max_norm: float) -> None:
        self.values["grad_clipped"].append(float(norm > max_norm))
        self.values["grad_norm_preclip_mean"].append(norm)
        self.values["grad_norm_preclip_max"].append(norm)

    def keys(self) -> list[str]:
        """Every process reduces the same columns in one fixed order (a gather needs the same columns everywhere)."""
        batch_keys = [*MEAN_KEYS, *MIN_KEYS, *MAX_KEYS, *SUM_KEYS]
        if self.by_source:
            batch_keys += [f"{key}/{source}" for source in ("dataset", "generated") for key in batch_keys]
        if self.token_weighted:
            batch_keys += [key + TOKENS for key in batch_keys if key.startswith(MEAN_KEYS)]
        return batch_keys + list(STEP_KEYS)

    def reduce_across(self, accelerator) -> dict[str, float]:
        """:meth:`reduce` over an ``accelerate.Accelerator``'s processes."""
        return self.reduce(accelerator.gather if accelerator.num_processes > 1 else None, accelerator.device)

    def reduce(self, gather: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device) -> dict[str, float]:
        """The window's values, over the local batches and then over processes (``gather``: all processes' rows,
        ``None`` with one process); clears the window. Every process must call it."""
        keys = self.keys()
        local = [self._local(key) for key in keys]
        table = torch.tensor(local, dtype=torch.float64, device=device).unsqueeze(0)
        if gather is not None:
            table = gather(table)
        out: dict[str, float] = {}
        for i, key in enumerate(keys):
            column = table[:, i]
            column = column[~torch.isnan(column)]
            if column.numel():
                out[key] = self._combine(key, column)
        self.values.clear()
        for weight_key in [k for k in out if k.endswith(TOKENS)]:
            weight, key = out.pop(weight_key), weight_key[: -len(TOKENS)]
            out[key] = out[key] / weight
        sums = {k: out.pop(k) for k in list(out) if k.startswith(SUM_KEYS)}
        out.update(_ratios(sums))
        for source in ("dataset", "generated") if self.by_source else ():
            out.update(_ratios(sums, f"/{source}"))
        return out

    def _local(self, key: str) -> float:
        values = self.values.get(key, [])
        if not values:
            return math.nan
        return self._combine(key, torch.tensor(values, dtype=torch.float64))

    def _combine(self, key: str, values: torch.Tensor) -> float:
        if self.token_weighted and (key.startswith(MEAN_KEYS) or key.endswith(TOKENS)):
            return values.sum().item()  # a token-weighted mean's sum or weight: divided in reduce
        return _combine(key, values)

    def clear(self) -> None:
        """Forget the window's values (locally, without reducing them)."""
        self.values.clear()


def _combine(key: str, values: torch.Tensor) -> float:
    if key.startswith(MIN_KEYS):
        return values.min().item()
    if key.startswith(MAX_KEYS) or key == "grad_norm_preclip_max":
        return values.max().item()
    if key.startswith(SUM_KEYS):
        return values.sum().item()
    return values.mean().item()
