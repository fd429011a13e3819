"""EA's scale at a real vocabulary: pre-clip gradient norms, the share of clipped steps and the KD:CE ratio.

Teacher SmolLM2-135M-Instruct (V = 49,152; fetched once by ``fetch-model``'s code into ``$EAKD_LLM_CACHE``), student its
uniform depth-pruned copy (``--student-layers``), trained on chat records (the tiny stack's synthetic instructions,
rendered with SmolLM2's chat template) for ``--steps`` optimizer steps with ``max_grad_norm`` 1.0, for each of: plain
KD, EA-KD token (raw weights) and EA-KD token with ``ea_normalize: mean``, all at τ′ = 2 and kd_ratio 0.5, from the
same initialisation and batches. Prints one table and writes ``--output`` (JSON).

    python scripts/real_scale_measurement.py --steps 12 --output benchmarks/results/real-scale-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = {
    "KD": {"ea": False},
    "EA-KD token": {"ea": True, "ea_normalize": "none"},
    "EA-KD token, normalised": {"ea": True, "ea_normalize": "mean"},
}


def chat_data(folder: Path, num_train: int, seed: int) -> Path:
    from eakd_llm.studies.synthetic import generate_records

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for record in generate_records(num_train, seed=seed):
            user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return folder


def pruned_student(teacher: str, folder: Path, layers: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eakd_llm.models.prune import prune_layers, uniform_keep

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    prune_layers(model, uniform_keep(model.config.num_hidden_layers, layers)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return str(folder)


def run(row: str, overrides: dict, args, teacher: str, student: str, data: Path, root: Path) -> dict:
    from eakd_llm.config.eakd_config import EAKDConfig
    from eakd_llm.training.train import run_training

    config = EAKDConfig(
        output_dir=str(root / row.replace(" ", "_").replace(",", "")), model_name_or_path=student,
        teacher_model_name_or_path=teacher, dataset_name=str(data), max_length=args.max_length,
        max_prompt_length=args.max_length // 2, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        logging_steps=1, learning_rate=args.learning_rate, max_grad_norm=1.0, kd_ratio=0.5, entropy_temperature=2.0,
        use_cpu=True, save_strategy="no", seed=args.seed, disable_tqdm=True, report_to=[], **overrides,
    )
    start = time.perf_counter()
    trainer = run_training(config)
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    norms = [entry["grad_norm_preclip_mean"] for entry in logs]
    kd_term = [0.5 * entry["kd_loss"] for entry in logs]  # kd_loss is per token and includes tau^2 and the weights
    ce_term = [0.5 * entry["ce_loss"] for entry in logs]
    return {
        "row": row, "overrides": overrides, "steps": len(logs), "seconds": seconds,
        "grad_norm_preclip_median": statistics.median(norms), "grad_norm_preclip_min": min(norms),
        "grad_norm_preclip_max": max(norms), "clipped_share": statistics.mean(e["grad_clipped"] for e in logs),
        "kd_to_ce_ratio_median": statistics.median(k / c for k, c in zip(kd_term, ce_term)),
        "ea_weight_mean": statistics.mean(e["ea_weight_mean"] for e in logs),
        "ea_effective_scale": statistics.mean(e["ea_effective_scale"] for e in logs),
        "ce_first": logs[0]["ce_loss"], "ce_last": logs[-1]["ce_loss"],
        "per_step": [{k: e.get(k) for k in ("grad_norm_preclip_mean", "grad_clipped", "ce_loss", "kd_loss",
                                            "ea_weight_mean", "ea_effective_scale")} for e in logs],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from eakd_llm.models.fetch import default_cache_dir, ensure_smollm2
    from eakd_llm.studies.statistics import machine_description

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    teacher = str(ensure_smollm2(default_cache_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = chat_data(root / "data", args.num_train, args.seed)
        student = pruned_student(teacher, root / "student", args.student_layers)
        results = [run(row, overrides, args, teacher, student, data, root) for row, overrides in ROWS.items()]
    print(f"\n{machine_description()}; SmolLM2-135M-Instruct -> {args.student_layers}-layer uniform prune, "
          f"{args.batch_size} x {args.max_length} tokens, {args.steps} steps, lr {args.learning_rate}, "
          "max_grad_norm 1.0")
    print("| row | pre-clip grad norm median [min, max] | clipped steps | KD:CE (median) | w̄ | s_eff | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['grad_norm_preclip_median']:.2f} [{r['grad_norm_preclip_min']:.2f}, "
              f"{r['grad_norm_preclip_max']:.2f}] | {r['clipped_share']:.0%} | {r['kd_to_ce_ratio_median']:.2f} | "
              f"{r['ea_weight_mean']:.2f} | {r['ea_effective_scale']:.2f} | {r['seconds'] / r['steps']:.1f} |")
    if args.output:
        payload = {"machine": machine_description(), "python": sys.version.split()[0], "platform": platform.platform(),
                   "settings": vars(args), "results": results}
        Path(args.output).write_text(json.dumps(payload, indent=2, default=lambda v: None if isinstance(v, float)
                                                and not math.isfinite(v) else str(v)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
