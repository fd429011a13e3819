#!/usr/bin/env python
"""How often the demo's paired 95% intervals give a verdict: false verdicts when A and B do not differ, power when
they do, on simulated studies with the demo's design (:func:`eakd_llm.studies.statistics.simulate_scores`: training
seeds x sampling seeds x prompts, prompts shared by all seeds).

Intervals compared: the one the demo uses (:func:`eakd_llm.studies.statistics.paired_difference`, crossed-design t), a
Satterthwaite t interval on the same variance estimate, a bootstrap of the crossed design (seeds resampled, one
prompt resample shared by all of them) and the former two-stage bootstrap (prompts resampled afresh within each
drawn seed, as if nested in it). Bootstraps use ``--num-bootstrap`` replicates.

    python scripts/interval_coverage.py --studies 1000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eakd_llm.studies.statistics import paired_difference, simulate_scores, t_quantile, verdict, verdict_rate  # noqa: E402

SCENARIOS: dict[str, dict[str, Any]] = {
    "default: 3 seeds, prompt 3, seed 0.5, seed x prompt 3, sampling 10": {},
    "no training-seed effect": {"seed_sd": 0.0},
    "large shared prompt effect (prompt 8)": {"prompt_sd": 8.0},
    "large training-seed effect (seed 1.0)": {"seed_sd": 1.0},
    "prompt-dominated (prompt 6, seed 0, seed x prompt 0)": {"prompt_sd": 6.0, "seed_sd": 0.0,
                                                             "seed_prompt_sd": 0.0},
    "2 training seeds": {"train_seeds": 2},
    "5 training seeds": {"train_seeds": 5},
}

Interval = Callable[[np.ndarray, np.ndarray], dict[str, Any]]


def _result(low: float, high: float) -> dict[str, Any]:
    return {"ci_low": low, "ci_high": high, "verdict": verdict(low, high)}


def nested_bootstrap(num_bootstrap: int, seed: int) -> Interval:
    """The former interval: training seeds resampled, then the prompts afresh within each drawn seed."""
    rng = np.random.default_rng(seed)

    def interval(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        diff = (a - b).mean(axis=1)
        seeds, prompts = diff.shape
        seed_draws = rng.integers(0, seeds, size=(num_bootstrap, seeds))
        prompt_draws = rng.integers(0, prompts, size=(num_bootstrap, seeds, prompts))
        replicates = diff[seed_draws[..., None], prompt_draws].mean(axis=(1, 2))
        return _result(*np.quantile(replicates, [0.025, 0.975]))

    return interval


def crossed_bootstrap(num_bootstrap: int, seed: int) -> Interval:
    """Training seeds resampled and one prompt resample shared by all drawn seeds (percentile interval)."""
    rng = np.random.default_rng(seed)

    def interval(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        diff = (a - b).mean(axis=1)
        seeds, prompts = diff.shape
        seed_draws = rng.integers(0, seeds, size=(num_bootstrap, seeds))
        prompt_draws = rng.integers(0, prompts, size=(num_bootstrap, prompts))
        replicates = diff[seed_draws[:, :, None], prompt_draws[:, None, :]].mean(axis=(1, 2))
        return _result(*np.quantile(replicates, [0.025, 0.975]))

    return interval


def satterthwaite(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The same variance estimate as the demo's, with one t quantile at Satterthwaite's degrees of freedom."""
    diff = (a - b).mean(axis=1)
    seeds, prompts = diff.shape
    seed_means, prompt_means, mean = diff.mean(axis=1), diff.mean(axis=0), diff.mean()
    cells = seeds * prompts
    ms_seed = prompts * seed_means.var(ddof=1) / cells
    ms_prompt = seeds * prompt_means.var(ddof=1) / cells
    residual = diff - seed_means[:, None] - prompt_means[None, :] + mean
    ms_error = (residual**2).sum() / ((seeds - 1) * (prompts - 1)) / cells
    terms = [(ms_seed, seeds - 1)]
    if ms_prompt > ms_error:
        terms += [(ms_prompt, prompts - 1), (ms_error, (seeds - 1) * (prompts - 1))]
    variance = ms_seed + max(ms_prompt - ms_error, 0.0)
    df = max(variance**2 / sum(v**2 / d for v, d in terms), seeds - 1)
    half = t_quantile(0.975, df) * math.sqrt(variance)
    return _result(mean - half, mean + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000, help="simulated studies per scenario (default 1000)")
    parser.add_argument("--difference", type=float, default=3.0, help="true A - B for the power (default 3.0)")
    parser.add_argument("--num-bootstrap", type=int, default=500, help="bootstrap replicates (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    methods: dict[str, Interval] = {
        "crossed t (demo)": lambda a, b: paired_difference(a, b, "A - B", "score"),
        "Satterthwaite t": satterthwaite,
        "crossed bootstrap": crossed_bootstrap(args.num_bootstrap, args.seed),
        "nested bootstrap (former)": nested_bootstrap(args.num_bootstrap, args.seed),
    }
    started = time.perf_counter()
    se = math.sqrt(0.05 * 0.95 / args.studies)
    print(f"{args.studies} simulated studies per scenario (3 sampling seeds, 200 prompts unless said); false = share "
          f"of better/worse verdicts with no true difference (95% intervals promise 5%; Monte Carlo s.e. about "
          f"{100 * se:.1f} points), power = the same share at a true difference of {args.difference:g}.\n")
    print("| scenario | " + " | ".join(f"{m}: false / power" for m in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for index, (scenario, settings) in enumerate(SCENARIOS.items()):
        null = simulate_scores(args.studies, seed=args.seed + 2 * index, **settings)
        shifted = simulate_scores(args.studies, seed=args.seed + 2 * index + 1, difference=args.difference,
                                  **settings)
        cells = [f"{100 * verdict_rate(*null, method):.1f}% / {100 * verdict_rate(*shifted, method):.1f}%"
                 for method in methods.values()]
        print(f"| {scenario} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
