#!/usr/bin/env python
"""The distributed code paths on one GPU: the real ``scripts/distill.py`` under ``accelerate launch`` with the
project's ZeRO-3 and FSDP2 configs (one process), against a plain single-process run of the same recipe.

For each student kind (full fine-tuning, LoRA, and a full student trained fully on-policy with greedy generation) it
runs the tiny recipe for a few steps three ways (plain, ZeRO-3, FSDP2 on the same GPU, all fp32) and compares the
per-step training losses and the loss path each run reports ("EA-KD loss path: ..."). It also checks that each run's
final save left a loadable model or adapter plus tokenizer in its output folder (FSDP's SHARDED_STATE_DICT config
included) by loading it as ``eakd-llm eval`` does. One process on one GPU exercises the wrapping code (DeepSpeed
engines, ``zero.Init`` loading, the teacher inference engine, FSDP2 sharding through accelerate's plugin, gathered
heads in the fused loss, generation from a sharded student) but not the communication between ranks, which the CPU
tests under torchrun/gloo cover.

Usage (on a machine with one GPU)::

    python scripts/gpu_checks.py --out OUT_DIR [--steps 8]

Writes ``OUT_DIR/gpu_checks.json`` (losses, differences, loss paths, durations, return codes) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate_configs"


def _run(command: list[str], log: Path, timeout: int) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def _losses(output_dir: Path) -> list[float]:
    path = output_dir / "trainer_state.json"
    if not path.exists():
        return []
    return [e["loss"] for e in json.loads(path.read_text())["log_history"] if "loss" in e]


def _loadable(output_dir: Path) -> str:
    """'ok' when the final save left a model (or adapter) and tokenizer that eakd-llm eval loads, else why not."""
    try:
        from eakd_llm.evaluation.protocol import load_model_for_eval

        load_model_for_eval(str(output_dir), device="cpu")
        return "ok"
    except Exception as err:  # report, do not stop the other checks
        return f"{type(err).__name__}: {err}"[:500]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/eakd-gpu-checks")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per run")
    parser.add_argument("--launchers", default="plain,zero3,fsdp2", help="comma-separated subset (plain is the base)")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    from eakd_llm.studies.synthetic import prepare_tiny_stack

    stack = prepare_tiny_stack(str(work / "tiny"), num_train=400, num_validation=40, num_test=40, vocab_size=512,
                               seed=0)
    results: dict = {"runs": {}, "comparisons": {}}
    launchers = {
        "plain": [sys.executable],
        "zero3": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero3.yaml"),
                  "--num_processes", "1", "--mixed_precision", "no"],
        "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
                  "--num_processes", "1", "--mixed_precision", "no"],
    }
    launchers = {k: v for k, v in launchers.items() if k in args.launchers.split(",")}
    students = {"full": [], "lora": ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
                                     "--lora_dropout", "0.0", "--learning_rate", "1e-2"],
                "on-policy": ["--on_policy_fraction", "1", "--generation_top_k", "1", "--max_new_tokens", "12"]}
    for student, student_args in students.items():
        for launcher, prefix in launchers.items():
            name = f"{launcher}-{student}"
            output_dir = work / name
            command = [
                *prefix, str(REPO / "scripts" / "distill.py"), str(REPO / "recipes" / "tiny" / "eakd_token.yaml"),
                "--model_name_or_path", stack["student"], "--teacher_model_name_or_path", stack["teacher"],
                "--dataset_name", stack["data_dir"], "--output_dir", str(output_dir), "--use_cpu", "false",
                "--max_steps", str(args.steps), "--logging_steps", "1", "--save_strategy", "no",
                "--eval_strategy", "no", "--per_device_train_batch_size", "8", "--max_length", "96",
                "--max_prompt_length", "64", "--disable_tqdm", "true", "--report_to", "none", *student_args,
            ]
            log = work / f"{name}.log"
            code, seconds = _run(command, log, args.timeout)
            text = log.read_text(errors="replace")
            paths = sorted(set(re.findall(r"EA-KD loss path: (.*)", text)))
            teacher = sorted(set(re.findall(r"teacher: (.*)", text)))
            results["runs"][name] = {"returncode": code, "seconds": round(seconds, 1), "losses": _losses(output_dir),
                                     "loss_paths": paths, "teacher": teacher, "log_tail": text[-1500:] if code else "",
                                     "final_model": _loadable(output_dir) if code == 0 else "run failed"}
            (out / "gpu_checks.json").write_text(json.dumps(results, indent=2) + "\n")  # kept if cut short
            print(f"{name:<12} rc={code} {seconds:5.1f}s paths={paths} teacher={teacher} "
                  f"final model={results['runs'][name]['final_model']} losses={results['runs'][name]['losses']}",
                  flush=True)
        base = results["runs"][f"plain-{student}"]["losses"]
        for launcher in [k for k in launchers if k != "plain"]:
            got = results["runs"][f"{launcher}-{student}"]["losses"]
            comparison = {"steps": len(got), "same_length": len(got) == len(base) and bool(got)}
            if comparison["same_length"]:
                comparison["max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, base))
            results["comparisons"][f"{launcher}-{student}"] = comparison
            print(f"{launcher}-{student} vs plain-{student}: {comparison}", flush=True)
    (out / "gpu_checks.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
