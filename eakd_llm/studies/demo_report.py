"""The demo's results: ``results.json`` (every per-seed number and interval), ``results.md`` and the plots.

Every sentence of the verdicts is generated here from the paired intervals (:mod:`eakd_llm.studies.statistics`), never
written by hand, so what the report says is what the numbers say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .demo_plan import INIT_FROM, ON_POLICY, ablation_points, study_comparisons, study_methods
from .statistics import paired_difference, seed_summary, stack_scores, verdict_line

METRICS = {"rougeL": "ROUGE-L", "exact_match": "exact match"}


def _scores(rows: list[dict[str, Any]], metric: str, sampling_seeds) -> np.ndarray:
    rows = sorted(rows, key=lambda r: r["train_seed"])
    return stack_scores([{int(k): v for k, v in r["per_example"][metric].items()} for r in rows], sampling_seeds)


def _summary(values: list[float | None]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "per_train_seed": values}


def _learning_curve(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Validation CE per token at each evaluated step: per training seed, and the mean over seeds (steps every seed
    evaluated)."""
    curves = [dict(r.get("learning_curve") or []) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if not steps:
        return None
    per_seed = [[c[step] for step in steps] for c in curves]
    return {"steps": steps, "mean": [float(np.mean(v)) for v in zip(*per_seed)], "per_train_seed": per_seed}


def assemble_results(plan, rows: list[dict[str, Any]], teacher_eval: dict[str, Any] | None, teacher_dir: str,
                     teacher_seconds: float | None, cache: dict[str, Any] | None, machine: str,
                     total_seconds: float, full: bool = False) -> dict[str, Any]:
    """Everything ``results.json`` holds: per method its training seeds, per-seed numbers, spread and learning curve;
    the paired comparisons with intervals and verdicts; the ablation; the plan, machine and wall time."""
    from dataclasses import asdict

    seeds = list(plan.sampling_seeds)
    main = {name: sorted((r for r in rows if r["group"] == "main" and r["name"] == name),
                         key=lambda r: r["train_seed"]) for name in study_methods(full)}
    methods: dict[str, Any] = {}
    if teacher_eval is not None:
        methods["Teacher (SFT)"] = {
            "train_seeds": [], "output_dir": teacher_dir, "train_seconds": teacher_seconds,
            **{m: {"mean": teacher_eval[m]["mean"], "std": teacher_eval[m]["std"], "std_over": "sampling seeds",
                   "per_sampling_seed": teacher_eval[m]["per_seed"]} for m in METRICS},
        }
    for name, runs in main.items():
        if not runs:
            continue
        entry: dict[str, Any] = {
            "train_seeds": [r["train_seed"] for r in runs],
            "overrides": runs[0]["overrides"],
            "steps": runs[0].get("steps"),
            "continues": INIT_FROM.get(name),
            "eval_ce_loss": _summary([r["eval_ce_loss"] for r in runs]),
            "train_seconds": _summary([r["train_seconds"] for r in runs]),
            "ea_weight_mean": _summary([r["ea_weight_mean"] for r in runs]),
            "ea_weight_min": _summary([r["ea_weight_min"] for r in runs]),
            "ea_effective_scale": _summary([r.get("ea_effective_scale") for r in runs]),
            "generation_time_share": _summary([r["generation_time_share"] for r in runs]),
            "generated_length": _summary([r["generated_length"] for r in runs]),
            "kd_scale": _summary([r["overrides"].get("kd_scale") for r in runs]),
            "learning_curve": _learning_curve(runs),
            "per_run": [{"train_seed": r["train_seed"], "output_dir": r["output_dir"],
                         **({"init_from": r["init"]} if name in INIT_FROM else {}),
                         **{m: {"mean": r[m]["mean"], "std_over_sampling_seeds": r[m]["std"],
                                "per_sampling_seed": r[m]["per_seed"]} for m in METRICS}} for r in runs],
        }
        for metric in METRICS:
            entry[metric] = {**seed_summary(_scores(runs, metric, seeds)), "std_over": "training seeds"}
        methods[name] = entry

    comparisons = []
    for a, b in study_comparisons(full):
        if not main.get(a) or not main.get(b):
            continue
        if [r["train_seed"] for r in main[a]] != [r["train_seed"] for r in main[b]]:
            continue
        for metric, label in METRICS.items():
            result = paired_difference(_scores(main[a], metric, seeds), _scores(main[b], metric, seeds),
                                       f"{a} − {b}", metric)
            result["line"] = verdict_line(result, label)
            comparisons.append(result)

    by_name = {r["name"]: r for r in rows if r["train_seed"] == plan.train_seeds[0]}
    ablation = []
    for tau, ratio, normalize, name in ablation_points(plan) if any(r["group"] == "ablation" for r in rows) else ():
        row = by_name.get(name)
        if row is None:
            continue
        ablation.append({
            "entropy_temperature": tau, "kd_ratio": ratio, "ea_normalize": normalize, "run": name,
            "train_seed": row["train_seed"], "train_seconds": row["train_seconds"],
            "ea_weight_mean": row["ea_weight_mean"], "ea_weight_min": row["ea_weight_min"],
            "eval_ce_loss": row["eval_ce_loss"],
            **{m: {"mean": row[m]["mean"], "std": row[m]["std"], "std_over": "sampling seeds",
                   "per_sampling_seed": row[m]["per_seed"]} for m in METRICS},
        })
    return {
        "study": "full" if full else "headline",
        "plan": asdict(plan),
        "machine": machine,
        "total_seconds": total_seconds,
        "num_test_records": plan.eval_records,
        "teacher_cache": cache,
        "methods": methods,
        "comparisons": comparisons,
        "ablation": ablation,
    }


def _fmt(metric: dict[str, Any] | None, digits: int = 1) -> str:
    if metric is None:
        return "–"
    return f"{metric['mean']:.{digits}f} ± {metric['std']:.{digits}f}"


def _teacher_share(methods: dict[str, Any], name: str = "KD") -> str:
    """A sentence giving the student's mean ROUGE-L as a share of the teacher's, or "" without both rows."""
    teacher, row = methods.get("Teacher (SFT)"), methods.get(name)
    if not teacher or not row or not teacher["rougeL"]["mean"] > 0:
        return ""
    return (f" The {name} student's mean ROUGE-L is {100 * row['rougeL']['mean'] / teacher['rougeL']['mean']:.0f}% "
            "of the teacher's.")


def _curve_lines(methods: dict[str, Any], continued: bool) -> list[str]:
    """A table of the mean validation CE per step: the from-scratch rows, or the continued rows."""
    curves = {name: row["learning_curve"] for name, row in methods.items()
              if row.get("learning_curve") and bool(row.get("continues")) == continued}
    if not curves:
        return []
    steps = sorted({step for curve in curves.values() for step in curve["steps"]})
    lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for step in steps:
        cells = []
        for curve in curves.values():
            values = dict(zip(curve["steps"], curve["mean"]))
            cells.append(f"{values[step]:.3f}" if step in values else "–")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> str:
    plan = results["plan"]
    train_seeds = ", ".join(str(s) for s in plan["train_seeds"])
    sampling = ", ".join(str(s) for s in plan["sampling_seeds"])
    cache = results["teacher_cache"]
    methods = results["methods"]
    full = results.get("study") == "full"
    continued = (f" The continued rows start from the same seed's trained KD or EA-KD token student and train "
                 f"{plan.get('continue_steps')} more steps (peak learning rate "
                 f"{plan.get('continue_learning_rate', 0):g}): on-policy, or off-policy for the same number of steps."
                 if full else "")
    lines = [
        f"# eakd-llm demo{' --full' if full else ''} results",
        "",
        f"Held-out synthetic test split ({results['num_test_records']} prompts), sampled at temperature 1 "
        f"(MiniLLM/DistiLLM protocol) with sampling seeds {sampling}. Every student: {plan['student_steps']} steps, "
        f"batch {plan['batch_size']}, trained once per training seed ({train_seeds}: the student's initialisation and "
        f"the data order).{continued} ROUGE-L and exact match ×100: mean ± std over training seeds (each seed's score "
        f"averaged over the prompts and sampling seeds).{_teacher_share(methods)} Machine: {results['machine']}. "
        f"Total wall time: {results['total_seconds']:.0f} s.",
        "",
        "| model | ROUGE-L | exact match | validation CE | mean EA weight w̄ | effective EA scale "
        "| train time per run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in methods.items():
        if name == "Teacher (SFT)":
            seconds = "cached" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}"
            lines.append(f"| {name} (std over sampling seeds) | {_fmt(row['rougeL'])} | {_fmt(row['exact_match'])} "
                         f"| – | – | – | {seconds} |")
            continue
        weight = scale = "–"
        if row["overrides"].get("ea"):
            weight, scale = _fmt(row["ea_weight_mean"], 2), _fmt(row["ea_effective_scale"], 2)
        elif name.startswith("KD × s_eff") and row["kd_scale"]:
            scale = f"kd_scale {_fmt(row['kd_scale'], 2)}"
        lines.append(f"| {name} | {_fmt(row['rougeL'])} | {_fmt(row['exact_match'])} | {_fmt(row['eval_ce_loss'], 3)} "
                     f"| {weight} | {scale} | {_fmt(row['train_seconds'], 0)} |")
    curve = _curve_lines(methods, continued=False)
    if curve:
        lines += ["", "## Learning curves", "",
                  "Validation cross-entropy per response token (the whole validation split) during training, mean "
                  "over training seeds.", "", "![learning curves](learning_curves.png)", "", *curve]
        more = _curve_lines(methods, continued=True)
        if more:
            lines += ["", "Continued rows (step 0: the trained student they start from):", "", *more]
    if results["comparisons"]:
        lines += [
            "",
            "## Paired differences (A − B)",
            "",
            "Paired by training seed, sampling seed and prompt. 95% interval: "
            + "; ".join(dict.fromkeys(c["method"] for c in results["comparisons"]))
            + " (every seed is scored on the same prompts; see eakd_llm/studies/statistics.py). Verdict: better / "
            "worse when the interval excludes 0. With few training seeds the t quantile of the seed part is large, so "
            "a real but small difference can stay not distinguishable: read the intervals with the per-seed "
            "differences beside them.",
            "",
            "| comparison | metric | mean difference | 95% CI | per training seed | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in results["comparisons"]:
            per_seed = ", ".join(f"{v:+.1f}" for v in c["per_train_seed_diff"])
            lines.append(f"| {c['name']} | {METRICS[c['metric']]} | {c['mean_diff']:+.2f} | "
                         f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {per_seed} | {c['verdict']} |")
        lines += ["", "Verdicts:", ""] + [f"- {c['line']}" for c in results["comparisons"]]
    generation = [(n, r) for n, r in methods.items() if r.get("generation_time_share")]
    if generation:
        lines += ["", "## Cost of on-policy generation", ""]
        for name, row in generation:
            off = methods.get(name.replace(ON_POLICY, "off-policy"))
            slower = (f", {row['train_seconds']['mean'] / off['train_seconds']['mean']:.2f}× the off-policy run's "
                      f"time" if off and off.get("train_seconds") else "")
            lines.append(f"- {name}: generation took {100 * row['generation_time_share']['mean']:.0f}% of the "
                         f"training time (mean {row['generated_length']['mean']:.1f} new tokens per response){slower}.")
    if cache:
        lines += ["", "## Teacher cache", "",
                  f"Top-{cache['top_k']} cache ({cache['value_format']} log-probabilities): {cache['bytes_per_token']} "
                  f"bytes per response token, {cache['disk_bytes'] / 2**20:.1f} MiB for {cache['tokens']} training "
                  f"tokens, built in {cache['build_seconds']:.0f} s; the row `EA-KD token, k-cache` trains from it "
                  "with no teacher in memory."]
    if results["ablation"]:
        lines += [
            "",
            f"## Ablation: entropy temperature τ′ × kd_ratio, raw and normalised EA weights (training seed "
            f"{plan['train_seeds'][0]})",
            "",
            "One training seed: ± is the std over sampling seeds only (no training noise). kd_ratio 1.0 is pure EA-KD "
            "(no cross-entropy term). `min w` is the smallest EA weight logged in training (before normalisation).",
            "",
            "| τ′ | kd_ratio | weights | ROUGE-L | exact match | validation CE | mean w | min w |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in results["ablation"]:
            lines.append(
                f"| {row['entropy_temperature']:g} | {row['kd_ratio']:g} | "
                f"{'normalised' if row['ea_normalize'] == 'mean' else 'raw'} | {_fmt(row['rougeL'])} | "
                f"{_fmt(row['exact_match'])} | {row['eval_ce_loss']:.3f} | {row['ea_weight_mean']:.3f} | "
                f"{row['ea_weight_min']:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def write_plots(results: dict[str, Any], rows: list[dict[str, Any]], stats: dict[str, dict[str, list[float]]],
                folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = results["methods"]
    names = list(methods)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.bar(range(len(names)), [methods[n]["rougeL"]["mean"] for n in names],
           yerr=[methods[n]["rougeL"]["std"] for n in names], capsize=4,
           color=["#555555" if n.startswith("Teacher") else "#DD8452" if "EA" in n else "#4C72B0" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ROUGE-L (×100)")
    ax.set_title("Held-out ROUGE-L (mean ± std over training seeds; teacher: over sampling seeds)")
    fig.tight_layout()
    fig.savefig(folder / "rougeL.png", dpi=120)
    plt.close(fig)
    written.append("rougeL.png")

    comparisons = results["comparisons"]
    if comparisons:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 + 0.45 * len(comparisons)), sharey=True)
        for ax, metric in zip(axes, METRICS):
            rows_m = [c for c in comparisons if c["metric"] == metric]
            y = np.arange(len(rows_m))[::-1]
            means = np.array([c["mean_diff"] for c in rows_m])
            low = means - np.array([c["ci_low"] for c in rows_m])
            high = np.array([c["ci_high"] for c in rows_m]) - means
            colors = ["#2ca02c" if c["verdict"] == "better" else "#d62728" if c["verdict"] == "worse" else "#7f7f7f"
                      for c in rows_m]
            for yi, mean, lo, hi, color in zip(y, means, low, high, colors):
                ax.errorbar([mean], [yi], xerr=[[lo], [hi]], fmt="o", color=color, capsize=3)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_title(f"{METRICS[metric]}: A − B, 95% CI")
            ax.set_yticks(y, [c["name"] for c in rows_m], fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "paired_differences.png", dpi=120)
        plt.close(fig)
        written.append("paired_differences.png")

    written += _plot_learning_curves(methods, folder, plt)

    import torch

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    first = next(iter(stats.values()))
    axes[0].hist(first["teacher_entropy"], bins=40, color="#555555", label="teacher")
    axes[0].set_title("teacher entropy H_T")
    for ax, key, title in ((axes[1], "student_entropy", "student entropy H_S"), (axes[2], "ea_weight", "EA weight w")):
        values = [v for run in stats.values() for v in run[key]]
        bins = torch.linspace(min(values), max(values) + 1e-6, 41).tolist()  # shared bins: spikes stay visible
        for label, run in stats.items():
            ax.hist(run[key], bins=bins, alpha=0.55, label=label)
        ax.set_title(title)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("nats")
    axes[0].set_ylabel("training tokens")
    fig.suptitle(f"Over response tokens of the training set (τ′ = {results['plan']['entropy_temperature']:g})")
    fig.tight_layout()
    fig.savefig(folder / "entropy_distributions.png", dpi=120)
    plt.close(fig)
    written.append("entropy_distributions.png")
    return written


def _plot_learning_curves(methods: dict[str, Any], folder: Path, plt) -> list[str]:
    """``learning_curves.png``: validation CE per token vs step, mean over training seeds per method (a second panel
    for the continued rows of ``--full``, step 0 being the trained student they start from)."""
    from matplotlib.ticker import FormatStrFormatter

    panels = [[(n, r) for n, r in methods.items() if r.get("learning_curve") and bool(r.get("continues")) == c]
              for c in (False, True)]
    panels = [p for p in panels if p]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, row in panel:
            curve = row["learning_curve"]
            ax.plot(curve["steps"], curve["mean"], marker="o", markersize=3, label=name,
                    linestyle="--" if "KD ×" in name or "normalised" in name else "-")
        ax.set_xlabel("step" + (" (continued)" if panel[0][1].get("continues") else ""))
        ax.set_ylabel("validation CE per token (log scale)")
        ax.set_yscale("log")  # the late differences between methods stay visible
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format(FormatStrFormatter("%g"))
        ax.set_title("continued from the trained students" if panel[0][1].get("continues")
                     else "from scratch", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Validation cross-entropy during training (mean over training seeds)")
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=120)
    plt.close(fig)
    return ["learning_curves.png"]
