"""The demo's plan, fixed before anything trains: its sizes and seeds (:data:`FULL`, :data:`QUICK`), the methods it
trains, the comparisons it reports and the runs they need. Read by the runner (:mod:`eakd_llm.demo`) and the report
(:mod:`eakd_llm.demo_report`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and seeds of one demo run, fixed before training; :data:`FULL` is the default, :data:`QUICK` a smoke
    test."""

    num_train: int
    num_validation: int
    num_test: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    learning_rate: float
    eval_records: int
    max_new_tokens: int
    sampling_seeds: tuple[int, ...]
    train_seeds: tuple[int, ...]
    ablation_taus: tuple[float, ...]
    ablation_ratios: tuple[float, ...]
    cache_top_k: int = 32
    on_policy_fraction: float = 0.5
    max_length: int = 128
    max_prompt_length: int = 96
    entropy_temperature: float = 2.0


FULL = DemoPlan(
    num_train=4000, num_validation=200, num_test=200, teacher_steps=600, student_steps=160, batch_size=32,
    learning_rate=3e-3, eval_records=200, max_new_tokens=24, sampling_seeds=(10, 20, 30), train_seeds=(1, 2, 3),
    ablation_taus=(1.0, 2.0, 3.0), ablation_ratios=(1.0, 0.5),
)
QUICK = DemoPlan(
    num_train=600, num_validation=40, num_test=40, teacher_steps=60, student_steps=20, batch_size=16,
    learning_rate=3e-3, eval_records=24, max_new_tokens=12, sampling_seeds=(10,), train_seeds=(1,),
    ablation_taus=(1.0,), ablation_ratios=(1.0,), cache_top_k=16,
)

KD = {"kd_ratio": 0.5, "divergence": "fkl", "ea": False}
EA_TOKEN = {"kd_ratio": 0.5, "divergence": "fkl", "ea": True, "ea_granularity": "token"}
# name -> config overrides of the main comparison's methods (kd_ratio 0.5 keeps a CE term: see docs/ea-weights.md)
METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"kd_ratio": 0.0},
    "KD": KD,
    "KD × s_eff": {**KD, "kd_scale": "measured"},  # EA's effective scale in the same seed's EA-KD token run
    "EA-KD token": EA_TOKEN,
    "EA-KD token, normalised": {**EA_TOKEN, "ea_normalize": "mean"},
    "EA-KD sequence": {**EA_TOKEN, "ea_granularity": "sequence"},
    "KD, on-policy λ=0.5": {**KD, "on_policy_fraction": "plan"},
    "EA-KD token, on-policy λ=0.5": {**EA_TOKEN, "on_policy_fraction": "plan"},
    "EA-KD token, k-cache": {**EA_TOKEN, "teacher_cache": "plan"},
}
SCALE_SOURCE = {"KD × s_eff": "EA-KD token"}
# (A, B): A - B, paired by training seed, sampling seed and prompt
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("EA-KD token", "KD"),
    ("EA-KD token", "KD × s_eff"),
    ("EA-KD token, normalised", "KD"),
    ("EA-KD sequence", "KD"),
    ("KD, on-policy λ=0.5", "KD"),
    ("EA-KD token, on-policy λ=0.5", "EA-KD token"),
    ("EA-KD token, on-policy λ=0.5", "KD, on-policy λ=0.5"),
    ("EA-KD token, k-cache", "EA-KD token"),
)


@dataclass(frozen=True)
class RunSpec:
    """One student run: a method (or an ablation point) and a training seed."""

    name: str
    train_seed: int
    overrides: tuple[tuple[str, Any], ...]
    group: str = "main"  # "main" or "ablation"

    @property
    def slug(self) -> str:
        text = "".join(c if c.isascii() and c.isalnum() else "-" for c in self.name.lower()).strip("-")
        while "--" in text:
            text = text.replace("--", "-")
        return f"{self.group}/{text}/seed-{self.train_seed}"


def plan_runs(plan: DemoPlan) -> list[RunSpec]:
    """Every student run of the plan (main comparison x training seeds, then the one-seed ablation)."""
    runs = [RunSpec(name, seed, tuple(overrides.items())) for seed in plan.train_seeds
            for name, overrides in METHODS.items()]
    for tau, ratio, normalize, name in ablation_points(plan):
        if name in METHODS:
            continue  # the same run as the main comparison's first seed
        overrides = {**EA_TOKEN, "kd_ratio": ratio, "entropy_temperature": tau, "ea_normalize": normalize}
        runs.append(RunSpec(name, plan.train_seeds[0], tuple(overrides.items()), group="ablation"))
    return runs


def ablation_points(plan: DemoPlan) -> list[tuple[float, float, str, str]]:
    """``(tau', kd_ratio, normalize, run name)`` of every ablation point (some are main-comparison runs)."""
    points = []
    for normalize in ("none", "mean"):
        for ratio in plan.ablation_ratios:
            for tau in plan.ablation_taus:
                if tau == plan.entropy_temperature and ratio == 0.5:
                    name = "EA-KD token" if normalize == "none" else "EA-KD token, normalised"
                else:
                    name = f"τ′={tau:g} kd_ratio={ratio:g}{' normalised' if normalize == 'mean' else ''}"
                points.append((tau, ratio, normalize, name))
    return points


