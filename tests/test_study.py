"""Paired statistics of the demo's study: spread over training seeds, the crossed-design t interval (checked by hand
and on simulated studies: false-verdict rate and power) and its verdicts."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from eakd_llm.studies.statistics import (
    paired_difference,
    seed_summary,
    simulate_scores,
    stack_scores,
    t_quantile,
    verdict,
    verdict_line,
    verdict_rate,
)


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
    # Per-training-seed offsets (+3, -3, 0) average to 0: the interval must see that spread.
    offsets = np.array([3.0, -3.0, 0.0])[:, None, None]
    noisy = paired_difference(b + offsets + rng.normal(0, 1, size=b.shape), b, "noisy", "rougeL")
    assert noisy["ci_high"] - noisy["ci_low"] > 3 * (same["ci_high"] - same["ci_low"])
    assert noisy["verdict"] == "not distinguishable at 95%"
    one_seed = paired_difference(b[:1] + 1.0, b[:1], "one", "rougeL")
    assert one_seed["method"].startswith("t interval over the 200 prompts") and one_seed["verdict"] == "better"


def test_paired_difference_is_seeded_and_checks_shapes():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 2, 50)), rng.normal(size=(3, 2, 50))
    assert paired_difference(a, b, "x", "m") == paired_difference(a, b, "x", "m")
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(a, b[:2], "x", "m")


def test_stack_scores_orders_sampling_seeds():
    per_seed = [{10: [1, 2], 20: [3, 4]}, {20: [7, 8], 10: [5, 6]}]
    assert stack_scores(per_seed, [10, 20]).tolist() == [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]


def test_t_quantile_matches_closed_forms_and_tables():
    for q in (0.9, 0.975, 0.995):
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-6)  # Cauchy
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-6)
    assert t_quantile(0.975, 3) == pytest.approx(3.182446, rel=1e-6)  # printed t tables
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, rel=1e-6)
    assert t_quantile(0.975, 1e9) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), rel=1e-6)
    for df in (1.5, 2.5, 7.3):  # real df: the t density integrated in t itself up to the quantile gives back q
        x = np.linspace(0.0, t_quantile(0.975, df), 200001)
        density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (
            1 + x**2 / df) ** (-(df + 1) / 2)
        assert 0.5 + float(((density[1:] + density[:-1]) / 2 * np.diff(x)).sum()) == pytest.approx(0.975, abs=1e-7)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0.5)


def test_interval_arithmetic_by_hand():
    # differences d[seed, prompt] (one sampling seed), worked out on paper:
    #   seed means 3, 4 -> mean 3.5, seed part var([3, 4]) / 2 = 0.5 / 2 = 1/4, at t(1 df);
    #   prompt means 2, 2, 6.5 -> var / 3 = 6.75 / 3 = 9/4; residuals -.5 .5 0 / .5 -.5 0 -> MS_error = 1 / (1 * 2),
    #   over S P = 6: 1/12; prompt part 9/4 - 1/12 = 13/6, at t(2 df).
    diff = np.array([[1.0, 2.0, 6.0], [3.0, 2.0, 7.0]])
    b = np.zeros((2, 1, 3))
    result = paired_difference(diff[:, None, :], b, "hand", "m")
    t1, t2 = math.tan(math.pi * 0.475), 0.95 / math.sqrt(2 * 0.975 * 0.025)
    half = math.sqrt(t1**2 / 4 + t2**2 * 13 / 6)
    assert result["mean_diff"] == pytest.approx(3.5)
    assert (result["seed_variance"], result["prompt_variance"]) == (pytest.approx(0.25), pytest.approx(13 / 6))
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(3.5 - half), pytest.approx(3.5 + half))
    assert result["per_train_seed_diff"] == [3.0, 4.0] and result["num_bootstrap"] == 0
    assert result["method"].startswith("crossed design")
    # sampling seeds are averaged before anything else: splitting each score over two sampling seeds changes nothing
    split = np.stack([diff - 1.0, diff + 1.0], axis=1)
    assert paired_difference(split, np.zeros((2, 2, 3)), "hand", "m")["ci_low"] == pytest.approx(3.5 - half)
    # no prompt effect beyond the noise: the prompt part is 0, not negative
    flat = paired_difference(np.array([[[1.0, 3.0]], [[3.0, 1.0]], [[2.0, 2.0]]]), np.zeros((3, 1, 2)), "f", "m")
    assert flat["prompt_variance"] == 0.0


def test_one_training_seed_is_a_t_interval_over_prompts():
    d = [0.5, 1.5, 2.0, -1.0, 3.0]
    result = paired_difference(np.array(d)[None, None, :], np.zeros((1, 1, 5)), "one", "m")
    half = t_quantile(0.975, 4) * statistics.stdev(d) / math.sqrt(5)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(1.2 - half), pytest.approx(1.2 + half))
    assert result["seed_variance"] is None
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference(np.ones((1, 1, 1)), np.zeros((1, 1, 1)), "x", "m")
    with pytest.raises(ValueError, match="NaN"):
        paired_difference(np.full((2, 1, 3), np.nan), np.zeros((2, 1, 3)), "x", "m")


@pytest.mark.parametrize("settings", [{}, {"seed_sd": 1.0}, {"prompt_sd": 8.0}, {"train_seeds": 2}],
                         ids=["default", "seed-dominated", "prompt-dominated", "two-seeds"])
def test_false_verdicts_stay_near_the_promised_5_percent(settings):
    # 1000 simulated null studies (3 x 3 x 200 unless said: shared prompt effects, seed effects, seed x prompt and
    # sampling noise): the 95% interval may say better/worse in about 5% of them (Monte Carlo s.e. 0.7 points);
    # the former nested bootstrap gives 9-16% on these very studies, an over-wide interval ~0%.
    a, b = simulate_scores(1000, seed=11, **settings)
    assert a.shape == (1000, settings.get("train_seeds", 3), 3, 200)
    assert 0.01 <= verdict_rate(a, b) <= 0.08


def test_a_large_true_difference_is_found():
    a, b = simulate_scores(1000, seed=12, difference=4.0)
    assert (a - b).mean() == pytest.approx(4.0, abs=0.1)
    assert verdict_rate(a, b) >= 0.8
    assert all(paired_difference(x, y, "A - B", "s")["verdict"] != "worse" for x, y in zip(a[:200], b[:200]))
