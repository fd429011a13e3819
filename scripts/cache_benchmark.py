#!/usr/bin/env python
"""The offline teacher cache on the demo's models (CPU): bytes per token, build time, and training from the cache
against training with the teacher in memory.

* bytes per response token at k in {8, 32, 128} for each value format, from the shard files on disk (and the
  formula's count beside them), on the demo's vocabulary (1024) and, by the formula, on Qwen2.5's (151,936);
* the build time of a k = 32 float16 cache over the demo's training split (4000 records);
* one epoch of EA-KD token training (125 steps of 32) with the online teacher and from that cache, each in its own
  process: wall time and peak resident memory (``ru_maxrss``), and the teacher's parameter bytes the cached run never
  loads.

The teacher is the demo's tiny teacher with random weights (speed and size do not depend on them; the quality
delta of a cache is measured by the demo's ``EA-KD token, k-cache`` row). Writes ``<output>/teacher-cache-cpu.md`` and
``.json``.

    python scripts/cache_benchmark.py --output benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eakd_llm.studies.statistics import machine_description  # noqa: E402
from eakd_llm.teacher.cache import VALUE_FORMATS, bytes_per_token  # noqa: E402

QWEN_VOCAB = 151_936


def _config(stack: dict[str, str], out: Path, **overrides):
    from eakd_llm.config.eakd_config import EAKDConfig

    values = dict(
        output_dir=str(out), model_name_or_path=stack["student"], teacher_model_name_or_path=stack["teacher"],
        dataset_name=stack["data_dir"], dataset_format="instruction", response_column="output", max_length=128,
        max_prompt_length=96, per_device_train_batch_size=32, use_cpu=True, report_to="none", disable_tqdm=True,
        save_strategy="no", logging_steps=25, learning_rate=3e-3, seed=1, data_seed=1,
    )
    values.update(overrides)
    return EAKDConfig(**values)


def train_once(stack_json: str, out: str, steps: int, cache: str | None, threads: int) -> None:
    """Child process: one training run; prints its wall time and peak RSS as JSON."""
    import resource

    from eakd_llm.training.train import prepare_run
    from eakd_llm.training.trainer import EAKDTrainer

    torch.set_num_threads(threads)
    stack = json.loads(stack_json)
    overrides = {"teacher_cache": cache, "teacher_model_name_or_path": None} if cache else {}
    config = _config(stack, Path(out), max_steps=steps, **overrides)
    start = time.perf_counter()
    parts = prepare_run(config)
    trainer = EAKDTrainer(args=config, **parts)
    ready = time.perf_counter()
    trainer.train()
    done = time.perf_counter()
    teacher_bytes = 0 if parts["teacher_model"] is None else sum(
        p.numel() * p.element_size() for p in parts["teacher_model"].parameters())
    print(json.dumps({"setup_seconds": ready - start, "train_seconds": done - ready,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "teacher_parameter_bytes": teacher_bytes}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=125, help="training steps (125 x 32 = one epoch of 4000)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stack_json, out, steps, cache = args.child
        train_once(stack_json, out, int(steps), None if cache == "-" else cache, args.threads)
        return 0

    from eakd_llm.studies.synthetic import prepare_tiny_stack
    from eakd_llm.teacher.cache import CacheManifest, build_cache

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    stack = prepare_tiny_stack(str(work / "stack"), num_train=4000, num_validation=40, num_test=40, seed=0)
    vocab = json.loads((Path(stack["teacher"]) / "config.json").read_text())["vocab_size"]

    sizes = []
    for k in (8, 32, 128):
        for fmt in ("float16", "uint8"):
            folder = work / f"cache-k{k}-{fmt}"
            start = time.perf_counter()
            build_cache(_config(stack, work / "tmp", max_train_samples=1000), str(folder), k, fmt, shard_size=500,
                        show_progress=False)
            seconds = time.perf_counter() - start
            manifest = CacheManifest.read(str(folder))
            files = [folder / name for name in manifest.splits["train"]["shards"]]
            tokens = manifest.splits["train"]["tokens"]
            sizes.append({"k": k, "format": fmt, "tokens": tokens,
                          "disk_bytes_per_token": sum(f.stat().st_size for f in files) / tokens,
                          "bytes_per_token": bytes_per_token(k, vocab, fmt),
                          "qwen_bytes_per_token": bytes_per_token(k, QWEN_VOCAB, fmt),
                          "build_seconds_1000_records": seconds})
    start = time.perf_counter()
    full = work / "cache-k32-full"
    build_cache(_config(stack, work / "tmp"), str(full), 32, "float16", shard_size=500, show_progress=False)
    build_seconds = time.perf_counter() - start

    runs = {}
    for name, cache in (("online teacher", "-"), ("k=32 cache", str(full))):
        result = subprocess.run(
            [sys.executable, __file__, "--threads", str(args.threads), "--child", json.dumps(stack),
             str(work / f"train-{name[:6].strip()}"), str(args.steps), cache],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        runs[name] = json.loads(result.stdout.strip().splitlines()[-1])
    speedup = runs["online teacher"]["train_seconds"] / runs["k=32 cache"]["train_seconds"]
    result = {"machine": machine_description(), "threads": args.threads, "vocab_size": vocab, "sizes": sizes,
              "build_seconds_k32_4000_records": build_seconds, "epoch_steps": args.steps, "runs": runs,
              "epoch_speedup": speedup, "formats": list(VALUE_FORMATS),
              "command": "python scripts/cache_benchmark.py " + " ".join(sys.argv[1:])}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher-cache-cpu.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Offline teacher cache on the demo's models (CPU)",
        "",
        f"Machine: {result['machine']}, {args.threads} threads. Demo stack (vocabulary {vocab}), teacher with random "
        "weights (size and speed do not depend on them).",
        "",
        "## Bytes per response token",
        "",
        f"On disk (safetensors shards, index included) for 1000 records, and by the formula at the demo's vocabulary "
        f"and at Qwen2.5's ({QWEN_VOCAB:,}; ids take 18 bits there):",
        "",
        "| k | values | on disk (demo) | formula (demo) | formula (Qwen2.5 vocabulary) |",
        "|---:|---|---:|---:|---:|",
    ]
    for s in sizes:
        lines.append(f"| {s['k']} | {s['format']} | {s['disk_bytes_per_token']:.1f} | {s['bytes_per_token']} | "
                     f"{s['qwen_bytes_per_token']} |")
    lines += [
        "",
        "## Build and training",
        "",
        f"Building the k = 32 float16 cache of the 4000 training records: {build_seconds:.1f} s.",
        "",
        f"One epoch of EA-KD token training ({args.steps} steps of 32), each in its own process:",
        "",
        "| teacher | train s | setup s | peak RSS MiB | teacher parameters in memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['train_seconds']:.1f} | {r['setup_seconds']:.1f} | {r['max_rss_mib']:.0f} | "
                     f"{r['teacher_parameter_bytes'] / 2**20:.2f} MiB |")
    lines += ["", f"Epoch speed-up from the cache: {speedup:.2f}× (the tiny teacher is 4.5× the student's size; a "
              "7B-70B teacher's forward dominates a step far more).", "", f"Command: `{result['command']}`"]
    (out / "teacher-cache-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
