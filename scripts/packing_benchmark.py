#!/usr/bin/env python
"""Packing on the demo's data: the padding it saves and the training speed it buys (CPU).

For every batch of the demo's training split (tiny stack, 4000 records, batch 32, max_length 128), the padded and the
packed collations are compared: the share of positions that hold no token, the rows per batch, and the time of a
training step (student forward + backward, teacher forward, fused EA-KD loss) over the same batches, best of three
passes. Writes ``<output>/packing-cpu.md`` and ``.json``.

    python scripts/packing_benchmark.py --output benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eakd_llm.config.eakd_config import EAKDConfig  # noqa: E402
from eakd_llm.data.dataset import DistillationCollator  # noqa: E402
from eakd_llm.data.packing import padding_fraction  # noqa: E402
from eakd_llm.studies.statistics import machine_description  # noqa: E402
from eakd_llm.studies.synthetic import prepare_tiny_stack  # noqa: E402
from eakd_llm.training.train import prepare_run  # noqa: E402
from eakd_llm.training.trainer import EAKDTrainer  # noqa: E402


def step_seconds(trainer: EAKDTrainer, batches: list[dict[str, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per pass")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="packing-bench-"))
    stack = prepare_tiny_stack(str(work / "stack"), num_train=4000, num_validation=40, num_test=40, seed=0)
    config = EAKDConfig(
        output_dir=str(work / "out"), model_name_or_path=stack["student"], teacher_model_name_or_path=stack["teacher"],
        dataset_name=stack["data_dir"], dataset_format="instruction", response_column="output", max_length=128,
        max_prompt_length=96, per_device_train_batch_size=32, use_cpu=True, report_to="none", disable_tqdm=True,
        ea_granularity="sequence",
    )
    trainer = EAKDTrainer(args=config, **prepare_run(config))
    dataset = trainer.train_dataset
    pad = trainer.processing_class.pad_token_id
    collators = {"padded": DistillationCollator(pad), "packed": DistillationCollator(pad, packing_capacity=128)}
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    groups = [[dataset[i] for i in order[s:s + 32]] for s in range(0, len(order) - 31, 32)]
    stats: dict[str, dict[str, float]] = {}
    batches: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name, collator in collators.items():
        collated = [collator(group) for group in groups]
        batches[name] = collated[: args.batches]
        stats[name] = {
            "padding_fraction": statistics.fmean(padding_fraction(b) for b in collated),
            "rows_per_batch": statistics.fmean(b["input_ids"].shape[0] for b in collated),
            "positions_per_batch": statistics.fmean(b["input_ids"].numel() for b in collated),
        }
    tokens = sum(len(f["input_ids"]) for group in groups[: args.batches] for f in group)
    step_seconds(trainer, batches["packed"][:2])  # warm-up (and the packing isolation check)
    for name in collators:
        passes = [step_seconds(trainer, batches[name]) for _ in range(3)]
        stats[name]["seconds_per_batch"] = min(passes) / args.batches
        stats[name]["tokens_per_second"] = tokens / min(passes)
        stats[name]["pass_seconds"] = passes
    speedup = stats["packed"]["tokens_per_second"] / stats["padded"]["tokens_per_second"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_description(), "threads": args.threads, "batches_timed": args.batches,
              "batches_counted": len(groups), "stats": stats, "speedup": speedup,
              "command": "python scripts/packing_benchmark.py " + " ".join(sys.argv[1:])}
    stem = "packing-cpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Packing on the demo's data (CPU)",
        "",
        f"Machine: {result['machine']}, {args.threads} threads. Demo training split (4000 records), batches of 32, "
        f"max_length 128; padding over all {len(groups)} batches, time over the first {args.batches} (best of 3 "
        "passes; one step = student forward + backward, teacher forward, fused EA-KD loss, sequence level).",
        "",
        "| collation | padding (share of positions) | rows per batch | positions per batch | s per batch | "
        "tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(f"| {name} | {100 * s['padding_fraction']:.1f}% | {s['rows_per_batch']:.1f} | "
                     f"{s['positions_per_batch']:.0f} | {s['seconds_per_batch']:.4f} | {s['tokens_per_second']:,.0f} |")
    lines += ["", f"Packed / padded tokens per second: {speedup:.2f}×.", "", f"Command: `{result['command']}`"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
