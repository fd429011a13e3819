#!/usr/bin/env python
"""Where EA's weights adapt on a real pair: the spread of w per tau' and per ea_formula over a study's answers.

Reads an ``eakd-llm study`` folder: its teacher, its test (or training) answers and the students to measure (default:
the untrained pruned student and, when trained, the first seed's KD student), and writes a JSON file and a markdown
table (mean, CV and percentiles of w, corr(w, per-token KL), s_eff / mean w, KL share of the top-20% weighted tokens;
:mod:`eakd_llm.studies.weight_spread`)::

    python scripts/ea_weight_spread.py --study-dir runs/smollm2-study --output docs/real-model/weight-spread
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The project's root first, and not this folder: scripts/evaluate.py would shadow the evaluate library.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from eakd_llm._atomic import write_text_atomic  # noqa: E402  (the project's root on the path first)
from eakd_llm.data.prompts import load_eval_records  # noqa: E402
from eakd_llm.evaluation.fidelity import chat_examples  # noqa: E402
from eakd_llm.evaluation.protocol import load_model_for_eval  # noqa: E402
from eakd_llm.studies.weight_spread import (  # noqa: E402
    ENTROPY_TEMPERATURES,
    markdown_table,
    spread_table,
    token_terms,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-dir", required=True, help="an eakd-llm study folder")
    parser.add_argument("--students", nargs="+", default=None, help="student folders relative to the study folder "
                        "(default: student-pruned and students/kd/seed-<first seed> when present)")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="whose answers (default test)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(ENTROPY_TEMPERATURES))
    parser.add_argument("--output", required=True, help="output path without suffix: writes .json and .md")
    args = parser.parse_args(argv)
    root = Path(args.study_dir)
    plan = json.loads((root / "plan.json").read_text(encoding="utf-8"))["plan"]
    students = args.students or ["student-pruned"] + sorted(
        str(p.relative_to(root)) for p in (root / "students" / "kd").glob("seed-*") if (p / "row.json").exists())[:1]
    teacher, tokenizer = load_model_for_eval(str(root / "teacher"), dtype="float32")
    records = load_eval_records(str(root / "data" / f"{args.split}.jsonl"), fmt="messages")
    examples = chat_examples(records, tokenizer, plan["max_length"], plan["max_prompt_length"])
    results, lines = {"study_dir_plan": plan, "split": args.split, "students": {}}, []
    for name in students:
        student, _ = load_model_for_eval(str(root / name), dtype="float32")
        rows = spread_table(token_terms(teacher, student, examples, tokenizer.pad_token_id, args.temperatures))
        results["students"][name] = rows
        lines += [f"## {name} ({rows[0]['tokens']} answer tokens of {len(records)} {args.split} answers)", "",
                  *markdown_table(rows), ""]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_text_atomic(output.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
