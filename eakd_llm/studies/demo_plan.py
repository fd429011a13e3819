"""The demo's plan, fixed before anything trains: its sizes and seeds (:data:`DEFAULT`, :data:`QUICK`), the methods it
trains, the comparisons it reports and the runs they need. Read by the runner (:mod:`eakd_llm.studies.demo`) and the
report (:mod:`eakd_llm.studies.demo_report`).

Two studies share one plan: the headline (``eakd-llm demo``: :data:`METHODS`, :data:`COMPARISONS`, sized to run in
about ten minutes on 2 CPU cores) and the full study (``eakd-llm demo --full``), which adds :data:`FULL_METHODS`,
:data:`FULL_COMPARISONS` and the one-seed τ′ × kd_ratio ablation. The sizes were chosen from the measured learning
curve of ``scripts/demo_learning_curve.py`` (numbers in docs/study.md), before the study ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and seeds of one demo run, fixed before training; :data:`DEFAULT` is the default, :data:`QUICK` a smoke
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
    eval_steps: int  # validation CE every eval_steps training steps (and at step 0): the learning curves
    continue_steps: int  # --full: steps of the on-policy run and of its off-policy twin, from a trained student
    continue_learning_rate: float  # their peak learning rate (a trained student: a smaller step than from scratch)
    cache_top_k: int = 32
    on_policy_fraction: float = 0.5
    max_length: int = 128
    max_prompt_length: int = 96
    entropy_temperature: float = 2.0


DEFAULT = DemoPlan(
    num_train=4000, num_validation=200, num_test=200, teacher_steps=600, student_steps=400, batch_size=32,
    learning_rate=3e-3, eval_records=200, max_new_tokens=24, sampling_seeds=(10, 20, 30), train_seeds=(1, 2, 3),
    ablation_taus=(1.0, 2.0, 3.0), ablation_ratios=(1.0, 0.5), eval_steps=50, continue_steps=100,
    continue_learning_rate=1e-3,
)
QUICK = DemoPlan(
    num_train=600, num_validation=40, num_test=40, teacher_steps=60, student_steps=20, batch_size=16,
    learning_rate=3e-3, eval_records=24, max_new_tokens=12, sampling_seeds=(10,), train_seeds=(1,),
    ablation_taus=(1.0,), ablation_ratios=(1.0,), eval_steps=10, continue_steps=6, continue_learning_rate=1e-3,
    cache_top_k=16,
)

KD = {"kd_ratio": 0.5, "divergence": "fkl", "ea": False}
EA_TOKEN = {"kd_ratio": 0.5, "divergence": "fkl", "ea": True, "ea_granularity": "token"}
ON_POLICY = "on-policy λ=0.5"
# name -> config overrides of the headline's methods (kd_ratio 0.5 keeps a CE term: see docs/ea-weights.md)
METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"kd_ratio": 0.0},
    "KD": KD,
    "KD × s_eff": {**KD, "kd_scale": "measured"},  # EA's effective scale in the same seed's EA-KD token run
    "EA-KD token": EA_TOKEN,
    "EA-KD token, normalised": {**EA_TOKEN, "ea_normalize": "mean"},
    "EA-KD sequence": {**EA_TOKEN, "ea_granularity": "sequence"},
}
# --full adds these (same training seeds). The continued rows start from the same seed's trained student of the
# method INIT_FROM names and train plan.continue_steps more steps: on-policy, or off-policy (the same number of steps).
FULL_METHODS: dict[str, dict[str, Any]] = {
    "EA-KD token, k-cache": {**EA_TOKEN, "teacher_cache": "plan"},
    f"KD, continued {ON_POLICY}": {**KD, "on_policy_fraction": "plan"},
    "KD, continued off-policy": KD,
    f"EA-KD token, continued {ON_POLICY}": {**EA_TOKEN, "on_policy_fraction": "plan"},
    "EA-KD token, continued off-policy": EA_TOKEN,
}
SCALE_SOURCE = {"KD × s_eff": "EA-KD token"}
INIT_FROM = {name: ("KD" if name.startswith("KD,") else "EA-KD token") for name in FULL_METHODS if "continued" in name}
# (A, B): A - B, paired by training seed, sampling seed and prompt
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("KD", "SFT"),
    ("EA-KD token", "KD"),
    ("EA-KD token", "KD × s_eff"),
    ("EA-KD token, normalised", "KD"),
    ("EA-KD sequence", "KD"),
)
FULL_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("EA-KD token, k-cache", "EA-KD token"),
    (f"KD, continued {ON_POLICY}", "KD, continued off-policy"),
    (f"EA-KD token, continued {ON_POLICY}", "EA-KD token, continued off-policy"),
    (f"EA-KD token, continued {ON_POLICY}", f"KD, continued {ON_POLICY}"),
)


def study_methods(full: bool) -> dict[str, dict[str, Any]]:
    """The multi-seed methods of the headline, or of the full study."""
    return {**METHODS, **FULL_METHODS} if full else dict(METHODS)


def study_comparisons(full: bool) -> tuple[tuple[str, str], ...]:
    return COMPARISONS + FULL_COMPARISONS if full else COMPARISONS


def depends_on(name: str) -> str | None:
    """The method whose run of the same seed must finish before this one starts (its scale, or its weights)."""
    return SCALE_SOURCE.get(name) or INIT_FROM.get(name)


@dataclass(frozen=True)
class RunSpec:
    """One student run: a method (or an ablation point) and a training seed."""

    name: str
    train_seed: int
    overrides: tuple[tuple[str, Any], ...]
    group: str = "main"  # "main" (a multi-seed method) or "ablation"

    @property
    def slug(self) -> str:
        text = "".join(c if c.isascii() and c.isalnum() else "-" for c in self.name.lower()).strip("-")
        while "--" in text:
            text = text.replace("--", "-")
        return f"{self.group}/{text}/seed-{self.train_seed}"


def plan_runs(plan: DemoPlan, full: bool = False) -> list[RunSpec]:
    """Every student run of the plan: methods x training seeds; with ``full``, then the one-seed ablation."""
    runs = [RunSpec(name, seed, tuple(overrides.items())) for seed in plan.train_seeds
            for name, overrides in study_methods(full).items()]
    if not full:
        return runs
    for tau, ratio, normalize, name in ablation_points(plan):
        if name in METHODS:
            continue  # the same run as the headline's first seed
        overrides = {**EA_TOKEN, "kd_ratio": ratio, "entropy_temperature": tau, "ea_normalize": normalize}
        runs.append(RunSpec(name, plan.train_seeds[0], tuple(overrides.items()), group="ablation"))
    return runs


def ablation_points(plan: DemoPlan) -> list[tuple[float, float, str, str]]:
    """``(tau', kd_ratio, normalize, run name)`` of every ablation point (some are headline runs)."""
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
