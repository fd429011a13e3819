"""Paired statistics of the demo's study: spread over training seeds, the two-stage bootstrap and its verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from eakd_llm.study import paired_difference, seed_summary, stack_scores, verdict, verdict_line


def test_seed_summary_is_over_per_seed_means():
    scores = np.array([[[1.0, 3.0], [3.0, 5.0]], [[10.0, 10.0], [10.0, 10.0]]])  # [2 train seeds, 2 samplings, 2]
    summary = seed_summary(scores)
    assert summary["per_train_seed"] == [3.0, 10.0]
    assert summary["mean"] == 6.5 and summary["std"] == pytest.approx(np.std([3.0, 10.0], ddof=1))
    assert seed_summary(scores[:1])["std"] == 0.0


def test_verdicts_follow_the_interval():
    assert verdict(0.1, 2.0) == "better"
    assert verdict(-2.0, -0.1) == "worse"
    assert verdict(-0.5, 0.5) == "not distinguishable at 95%"


def test_a_clear_difference_is_better_and_the_mean_is_the_paired_mean():
    rng = np.random.default_rng(1)
    b = rng.normal(20, 5, size=(3, 3, 200))
    a = b + 2.0 + rng.normal(0, 1, size=b.shape)
    result = paired_difference(a, b, "A - B", "rougeL")
    assert result["mean_diff"] == pytest.approx((a - b).mean())
    assert result["ci_low"] < result["mean_diff"] < result["ci_high"]
    assert result["verdict"] == "better" and result["ci_low"] > 1.5
    assert paired_difference(b, a, "B - A", "rougeL")["verdict"] == "worse"
    assert verdict_line(result).startswith("A - B: rougeL +")


def test_no_difference_is_not_distinguishable_and_seed_noise_widens_the_interval():
    rng = np.random.default_rng(2)
    b = rng.normal(20, 5, size=(3, 3, 200))
    same = paired_difference(b + rng.normal(0, 1, size=b.shape), b, "same", "rougeL")
    assert same["verdict"] == "not distinguishable at 95%"
    # Per-training-seed offsets (+3, -3, 0) average to 0: the two-stage bootstrap must see that spread.
    offsets = np.array([3.0, -3.0, 0.0])[:, None, None]
    noisy = paired_difference(b + offsets + rng.normal(0, 1, size=b.shape), b, "noisy", "rougeL")
    assert noisy["ci_high"] - noisy["ci_low"] > 3 * (same["ci_high"] - same["ci_low"])
    assert noisy["verdict"] == "not distinguishable at 95%"
    one_seed = paired_difference(b[:1] + 1.0, b[:1], "one", "rougeL")
    assert one_seed["method"].startswith("bootstrap over prompts") and one_seed["verdict"] == "better"


def test_paired_difference_is_seeded_and_checks_shapes():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 2, 50)), rng.normal(size=(3, 2, 50))
    assert paired_difference(a, b, "x", "m") == paired_difference(a, b, "x", "m")
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(a, b[:2], "x", "m")


def test_stack_scores_orders_sampling_seeds():
    per_seed = [{10: [1, 2], 20: [3, 4]}, {20: [7, 8], 10: [5, 6]}]
    assert stack_scores(per_seed, [10, 20]).tolist() == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
