"""The real-model study's results: the table of models, the paired comparisons and the timings, as ``results.json``
and ``results.md``. Every verdict sentence is generated from the paired intervals
(:mod:`eakd_llm.studies.statistics`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import write_text_atomic
from ..evaluation.fidelity import METRICS, compared_scores
from .real_study_plan import COMPARISONS, METRIC_NAMES, PRUNED, TEACHER, TEST_SET_NAMES, StudyPlan
from .statistics import paired_difference, verdict_line

FLIPPED = {"better": "worse", "worse": "better"}


def per_prompt(row: Mapping[str, Any], metric: str) -> list[float]:
    """A row's per-prompt scores as compared: token-weighted contributions for CE and top-1 (their mean is the ratio
    of sums over answer tokens, :func:`eakd_llm.evaluation.fidelity.token_weighted`), plain scores otherwise."""
    return compared_scores(row["per_prompt"], metric)


def _per_seed(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    return [float(np.mean(per_prompt(row, metric))) for row in rows]


def summarise(name: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One table row: each metric's mean over seeds of the per-seed means (and their std with several seeds)."""
    out: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in rows]}
    for metric in (*METRICS, "stopped"):
        values = _per_seed(rows, metric)
        out[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    for key in ("seconds_per_step", "train_seconds", "eval_seconds"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["by_definition"] = list(rows[0].get("by_definition", []))
    out["teacher_cache"] = rows[0].get("teacher_cache")
    scales = [r["kd_scale"] for r in rows if r.get("kd_scale") not in (None, 1.0)]
    out["kd_scale"] = float(np.mean(scales)) if scales else None
    return out


def compare(name_a: str, rows_a: Sequence[Mapping[str, Any]], name_b: str, rows_b: Sequence[Mapping[str, Any]],
            metric: str) -> dict[str, Any]:
    """A - B on one metric, paired by training seed and prompt (:func:`eakd_llm.studies.statistics.paired_difference`);
    for a lower-is-better metric the verdict says whether A is better, i.e. lower."""
    by_seed = {r["seed"]: r for r in rows_b}
    pairs = [(r, by_seed[r["seed"]]) for r in rows_a if r["seed"] in by_seed]
    a = np.array([[per_prompt(a, metric)] for a, _ in pairs], dtype=np.float64)
    b = np.array([[per_prompt(b, metric)] for _, b in pairs], dtype=np.float64)
    result = paired_difference(a, b, f"{name_a} − {name_b}", metric)
    if not METRICS[metric]:
        result["verdict"] = FLIPPED.get(result["verdict"], result["verdict"])
    result["line"] = verdict_line(result, METRIC_NAMES[metric])
    return result


def assemble(plan: StudyPlan, seeds: Sequence[int], recipes: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
             teacher_row: Mapping[str, Any], data: Mapping[str, Any], pruned: Mapping[str, Any],
             cache: Mapping[str, Any], timings: Mapping[str, float], machine: str, wall_seconds: float,
             workers: int) -> dict[str, Any]:
    """What ``results.json`` holds: plan, data, the table, the comparisons, the timings and every run's rows."""
    groups: dict[str, list[Mapping[str, Any]]] = {TEACHER: [teacher_row]}
    groups[PRUNED] = [r for r in rows if r["name"] == PRUNED]
    controls = sorted({r["name"] for r in rows} - set(recipes) - {PRUNED})  # rows derived from recipes (kd_scaled)
    for name in [*recipes, *controls]:
        groups[name] = sorted((r for r in rows if r["name"] == name), key=lambda r: r["seed"])
    table, comparisons = _fidelity(groups)
    num_test = len(teacher_row["per_prompt"]["ce"])
    sets = {}
    for test_set in teacher_row.get("sets", {}):  # the other test sets (MT-Bench): each row's scores on it
        on_set = {name: [{**r, **r["sets"][test_set]} for r in group] for name, group in groups.items()}
        set_table, set_comparisons = _fidelity(on_set)
        sets[test_set] = {"num_prompts": len(teacher_row["sets"][test_set]["per_prompt"]["ce"]), "table": set_table,
                          "comparisons": set_comparisons}
    return {
        "plan": asdict(plan), "seeds": list(seeds), "recipes": {k: str(v) for k, v in recipes.items()},
        "num_test_prompts": num_test, "data": dict(data), "pruned": dict(pruned), "teacher_cache": dict(cache),
        "table": table, "comparisons": comparisons, "sets": sets, "timings": dict(timings), "workers": workers,
        "machine": machine, "wall_seconds": wall_seconds,
        "interval_note": ("one training seed: each interval covers prompt-to-prompt variation only, not retraining "
                          "noise" if len(seeds) == 1 else f"{len(seeds)} training seeds: crossed seed x prompt "
                          "intervals"),
        "rows": [{k: v for k, v in r.items() if k != "log_history"} for r in rows],
    }


def _fidelity(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[dict], list[dict]]:
    """The table rows and the paired comparisons of one test set's scores."""
    table = [summarise(name, group) for name, group in groups.items() if group]
    comparisons = [compare(a, groups[a], b, groups[b], metric) for a, b in COMPARISONS
                   if groups.get(a) and groups.get(b) for metric in METRICS]
    return table, comparisons


def _cell(entry: Mapping[str, float], digits: int, several: bool, scale: float = 1.0) -> str:
    text = f"{scale * entry['mean']:.{digits}f}"
    return text + (f" ± {scale * entry['std']:.{digits}f}" if several else "")


def _table(table: Sequence[Mapping[str, Any]], several: bool) -> list[str]:
    lines = ["| model | CE ↓ | KL(T‖S) ↓ | top-1 agreement % | ROUGE-L | stopped | s/step | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        marks = {m: " (def.)" for m in row["by_definition"]}
        cells = [_cell(row["ce"], 3, several) + marks.get("ce", ""),
                 _cell(row["kl"], 3, several) + marks.get("kl", ""),
                 _cell(row["top1"], 1, several) + marks.get("top1", ""),
                 _cell(row["rougeL"], 1, several) + marks.get("rougeL", ""),
                 f"{100 * row['stopped']['mean']:.0f}%",
                 f"{row['seconds_per_step']:.2f}" if row["seconds_per_step"] else "–",
                 f"{row['train_seconds']:.0f}" if row["train_seconds"] else "–"]
        name = row["name"] + (f" (kd_scale {row['kd_scale']:.2f})" if row.get("kd_scale") else "") + (
            " (teacher cache)" if row.get("teacher_cache") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    plan, data = results["plan"], results["data"]
    pruned = results["pruned"]
    lines = [f"# Real-model study: SmolLM2-135M-Instruct → {pruned['num_hidden_layers']}-layer pruned student", "",
             f"Plan: {plan['steps']} steps x batch {plan['batch_size']}, max length {plan['max_length']}, answers "
             f"of at most {plan['max_new_tokens']} tokens (greedy), training seeds {results['seeds']}; dropped layers "
             f"{pruned['dropped_layers']} (block influence). Machine: {results['machine']}. The last invocation: "
             f"{results['workers']} worker(s), wall time {results['wall_seconds'] / 60:.1f} min (a resumed study "
             "reuses earlier steps and runs: each run's own seconds are in the tables).", "",
             "## Data (the teacher's answers)", "",
             "| split | records | truncated | left out | teacher stopped share |", "|---|---:|---:|---:|---:|"]
    for split, entry in data["splits"].items():
        lines.append(f"| {split} | {entry['records']} | {entry['truncated']} | {entry['dropped']} | "
                     f"{100 * entry['stopped_share']:.0f}% |")
    lines += ["", f"## Fidelity to the teacher on {results['num_test_prompts']} unseen test prompts", "",
              "CE: the student's cross-entropy per token of the teacher's answers; KL(T‖S): the teacher's "
              "distribution against the student's at every answer position, over the whole vocabulary (what "
              "distillation minimises); top-1 agreement: the share of answer positions where the student's argmax "
              "is the teacher's (all three token-weighted over the test answers: ratios of sums, like training's "
              "eval_ce_loss); ROUGE-L: the student's greedy answer against "
              "the teacher's; stopped: answers that ended within the budget. (def.): by definition (the references "
              "are the teacher's own answers).", ""]
    several = len(results["seeds"]) > 1
    lines += _section(results["table"], results["comparisons"], several, results["interval_note"])
    for test_set, scored in results.get("sets", {}).items():
        left_out = len(results["data"].get(test_set, {}).get("left_out", []))
        note = f"; {left_out} left out, longer than the prompt budget" if left_out else ""
        lines += ["", f"## Fidelity on {scored['num_prompts']} of {TEST_SET_NAMES[test_set]} (never trained on{note})",
                  "",
                  *_section(scored["table"], scored["comparisons"], several, results["interval_note"])]
    lines += ["", "## Time", "",
              "| step | seconds |", "|---|---:|"]
    lines += [f"| {name.replace('_', ' ')} | {seconds:.0f} |" for name, seconds in results["timings"].items()]
    cache = results["teacher_cache"]
    lines += ["", f"Teacher cache: {'used for ' + ', '.join(cache['recipes']) if cache['use'] else 'not used'} "
              f"({cache['mode']}: {cache['live_teacher_examples']} teacher forwards live vs {cache['cache_examples']} "
              "to cache)."]
    return "\n".join(lines) + "\n"


def _section(table: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]], several: bool,
             note: str) -> list[str]:
    lines = [*_table(table, several), "", "### Paired differences (95% intervals)", "", f"Intervals: {note}.", "",
             "| comparison | metric | mean difference | 95% CI | verdict |", "|---|---|---:|---:|---|"]
    for c in comparisons:
        lines.append(f"| {c['name']} | {METRIC_NAMES[c['metric']]} | {c['mean_diff']:+.3f} | [{c['ci_low']:+.3f}, "
                     f"{c['ci_high']:+.3f}] | {c['verdict']} |")
    return lines


def write_markdown(results: Mapping[str, Any], path: Path) -> str:
    text = markdown(results)
    write_text_atomic(path, text)
    return text
