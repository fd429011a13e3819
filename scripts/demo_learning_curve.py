"""The measured learning curve behind the demo's plan (``eakd_llm/studies/demo_plan.py``): how long must the students
train?

Trains the demo's teacher (or reuses it from ``--output-dir``), then SFT, KD and EA-KD token students of one training
seed for several step budgets, each with its own cosine schedule (what a plan with that budget would run), the
validation CE every ``eval_steps`` steps, and at the end the demo's held-out ROUGE-L (same prompts, same sampling
seeds). Prints a table (final validation CE, ROUGE-L and its share of the teacher's, seconds per step) and writes
``learning_curve.json``. Sizes other than the step budgets are the demo's (:data:`eakd_llm.studies.demo_plan.DEFAULT`).

    PYTHONPATH=$PWD python scripts/demo_learning_curve.py --output-dir /tmp/demo-curve --budgets 160,300,450,600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

# The project's root first, and not this folder: scripts/evaluate.py would shadow the evaluate library (workers too,
# which inherit this path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from eakd_llm.studies.demo import (  # noqa: E402  (the project's root on the path first)
    _evaluate_teacher,
    _output_to,
    _prepare_stack,
    _train_teacher,
    _worker_init,
    run_student,
)
from eakd_llm.studies.demo_plan import DEFAULT, METHODS, RunSpec  # noqa: E402


def _run(spec: RunSpec, budget: int, plan, stack, root: str, teacher_dir: str) -> dict:
    row = run_student(spec, replace(plan, student_steps=budget), stack, root, teacher_dir, {})
    return {"method": spec.name, "budget": budget, "train_seconds": row["train_seconds"],
            "validation_ce": row["eval_ce_loss"], "rougeL": row["rougeL"]["mean"],
            "rougeL_per_sampling_seed": row["rougeL"]["per_seed"], "exact_match": row["exact_match"]["mean"],
            "learning_curve": row["learning_curve"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo-learning-curve")
    parser.add_argument("--budgets", default="160,300,450,600", help="student step budgets, comma separated")
    parser.add_argument("--methods", default="SFT,KD,EA-KD token", help=f"among: {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=DEFAULT.train_seeds[0], help="the training seed")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS or m == "KD × s_eff"]
    if unknown or not budgets or min(budgets) < 1:
        parser.error(f"--methods must name independent methods among {', '.join(METHODS)} (got {unknown}); "
                     "--budgets positive integers")
    plan = replace(DEFAULT, train_seeds=(args.seed,))
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "learning_curve.log"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    with _output_to(log_path):
        stack = _prepare_stack(root, plan)
    stack_seconds = time.perf_counter() - started
    import torch

    torch.set_num_threads(1)  # as in the demo's workers: two threads on two shared cores mostly wait for each other
    with _output_to(log_path):
        teacher_dir, teacher_seconds = _train_teacher(root, plan, stack)
    print(f"stack {stack_seconds:.0f} s; teacher SFT ({plan.teacher_steps} steps): "
          f"{'reused' if teacher_seconds is None else f'{teacher_seconds:.0f} s'}", flush=True)

    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // args.workers)
    results, teacher = [], None
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(str(log_path), stack, plan, threads)) as pool:
        futures = {pool.submit(_evaluate_teacher, teacher_dir, plan): None}
        for budget in sorted(budgets, reverse=True):  # longest first: the pool ends evenly
            for name in methods:
                spec = RunSpec(name, args.seed, tuple(METHODS[name].items()), group=f"curve-{budget}")
                futures[pool.submit(_run, spec, budget, plan, stack, str(root), teacher_dir)] = spec
        for future in as_completed(futures):
            if futures[future] is None:
                teacher = future.result()["rougeL"]["mean"]
                print(f"teacher ROUGE-L {teacher:.1f}", flush=True)
                continue
            row = future.result()
            results.append(row)
            print(f"{row['method']:<14} {row['budget']:4d} steps: {row['train_seconds']:5.0f} s, validation CE "
                  f"{row['validation_ce']:.3f}, ROUGE-L {row['rougeL']:.1f}", flush=True)
    results.sort(key=lambda r: (methods.index(r["method"]), r["budget"]))
    print(f"\nteacher ROUGE-L {teacher:.1f} (sampling seeds {', '.join(map(str, plan.sampling_seeds))}); training "
          f"seed {args.seed}; batch {plan.batch_size}, peak lr {plan.learning_rate:g}, cosine schedule per budget\n")
    print("| method | steps | validation CE | ROUGE-L | % of teacher | exact match | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['budget']} | {r['validation_ce']:.3f} | {r['rougeL']:.1f} | "
              f"{100 * r['rougeL'] / teacher:.0f}% | {r['exact_match']:.1f} | {r['train_seconds'] / r['budget']:.3f} |")
    longest = max(budgets)
    print(f"\nvalidation CE during the {longest}-step runs (every {plan.eval_steps} steps):\n")
    curves = {r["method"]: dict(r["learning_curve"]) for r in results if r["budget"] == longest}
    print("| step | " + " | ".join(curves) + " |")
    print("|---" * (len(curves) + 1) + "|")
    for step in sorted(set().union(*curves.values())):
        print(f"| {step} | " + " | ".join(f"{c[step]:.3f}" if step in c else "–" for c in curves.values()) + " |")
    out = {"plan": {**plan.__dict__, "train_seeds": [args.seed]}, "budgets": budgets, "teacher_rougeL": teacher,
           "teacher_seconds": teacher_seconds, "stack_seconds": stack_seconds,
           "total_seconds": time.perf_counter() - started, "runs": results}
    (root / "learning_curve.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"\n{root / 'learning_curve.json'}; total {out['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
