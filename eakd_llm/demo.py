"""``eakd-llm demo``: the embedded default that shows EA-KD working, offline, on a CPU, in minutes.

One process runs the whole study so the libraries load once and the teacher's outputs are computed once:

1. the tiny stack: synthetic instruction data (train/validation/test), a local BPE tokenizer, tiny Llama models;
2. the teacher, trained with SFT (``kd_ratio: 0``) and cached in the output folder;
3. the student, trained the same number of steps with SFT, KD (forward KL), EA-KD token and sequence level, and
   reverse KL with and without EA; every distilled run sees the same batches, so the teacher's logits for a batch
   are computed once and reused (:class:`CachedTeacher`);
4. the teacher and every student evaluated on the held-out test split with the MiniLLM/DistiLLM protocol (ROUGE-L
   and exact match, sampling, mean ± std over seeds);
5. an ablation of EA-KD over the entropy temperature and ``kd_ratio``, token and sequence level;
6. ``results.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .models import final_hidden_states

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# What runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DemoPlan:
    """Sizes of one demo run; :data:`FULL` is the default, :data:`QUICK` the CI smoke test."""

    num_train: int
    num_validation: int
    num_test: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    learning_rate: float
    eval_records: int
    max_new_tokens: int
    seeds: tuple[int, ...]
    ablation: tuple[tuple[str, float, float], ...]  # (granularity, entropy_temperature, kd_ratio)
    max_length: int = 128
    max_prompt_length: int = 96


_ABLATION_FULL = tuple(
    (granularity, tau, ratio)
    for granularity in ("token", "sequence")
    for ratio in (1.0, 0.5)
    for tau in (1.0, 2.0, 3.0)
)
FULL = DemoPlan(
    num_train=4000, num_validation=200, num_test=200, teacher_steps=600, student_steps=300, batch_size=32,
    learning_rate=3e-3, eval_records=200, max_new_tokens=24, seeds=(10, 20, 30), ablation=_ABLATION_FULL,
)
QUICK = DemoPlan(
    num_train=600, num_validation=40, num_test=40, teacher_steps=60, student_steps=30, batch_size=16,
    learning_rate=3e-3, eval_records=24, max_new_tokens=16, seeds=(10,),
    ablation=(("token", 1.0, 1.0), ("token", 2.0, 0.5)),
)

# name -> config overrides of the student run (kd_ratio 0.5 keeps the CE term beside KD, see the README)
METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"kd_ratio": 0.0},
    "KD (fkl)": {"kd_ratio": 0.5, "divergence": "fkl", "ea": False},
    "EA-KD token (fkl)": {"kd_ratio": 0.5, "divergence": "fkl", "ea": True, "ea_granularity": "token"},
    "EA-KD sequence (fkl)": {"kd_ratio": 0.5, "divergence": "fkl", "ea": True, "ea_granularity": "sequence"},
    "KD (rkl)": {"kd_ratio": 0.5, "divergence": "rkl", "ea": False},
    "EA-KD token (rkl)": {"kd_ratio": 0.5, "divergence": "rkl", "ea": True, "ea_granularity": "token"},
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# ----------------------------------------------------------------------------------------------------------------
# Teacher outputs computed once per batch
# ----------------------------------------------------------------------------------------------------------------


class CachedTeacher(nn.Module):
    """A frozen teacher whose final hidden states are remembered per batch (keyed by the token ids and mask).

    Runs with the same seed see the same batches, so a sweep pays the teacher's backbone once. Only the final hidden
    states ``[B, T, H]`` are kept (H is far smaller than the vocabulary); logits, when asked for, are projected from
    them with the teacher's own head, so cached and uncached batches give identical values.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.config = teacher.config
        self.cache: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get_output_embeddings(self) -> nn.Module:
        return self.teacher.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.teacher.get_input_embeddings()

    @torch.no_grad()
    def final_hidden_states(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's ``[B, T, H]`` final hidden states, computed once per distinct batch (how the fused loss asks,
        see :func:`eakd_llm.models.final_hidden_states`)."""
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(inputs):
            value = inputs[name]
            if torch.is_tensor(value):
                digest.update(name.encode())
                digest.update(str(tuple(value.shape)).encode())
                digest.update(value.cpu().numpy().tobytes())
        key = digest.digest()
        hidden = self.cache.get(key)
        if hidden is None:
            self.misses += 1
            hidden = final_hidden_states(self.teacher, **inputs).cpu()
            self.cache[key] = hidden
        else:
            self.hits += 1
        return hidden.to(inputs["input_ids"].device)

    @torch.no_grad()
    def forward(self, use_cache: bool = False, **inputs: torch.Tensor) -> SimpleNamespace:
        """Full logits (the full-logits loss path), projected from the cached hidden states with the teacher's head."""
        hidden = self.final_hidden_states(**inputs)
        return SimpleNamespace(logits=self.teacher.get_output_embeddings()(hidden), hidden_states=(hidden,))


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    name: str
    output_dir: str
    train_seconds: float
    overrides: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)


def _stage(message: str) -> None:
    print(f"== {message}", flush=True)


def _base_config(plan: DemoPlan, stack: dict[str, str], output_dir: Path, steps: int, **overrides: Any):
    from .config import EAKDConfig

    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        dataset_name=stack["data_dir"],
        dataset_format="instruction",
        response_column="output",
        max_length=plan.max_length,
        max_prompt_length=plan.max_prompt_length,
        learning_rate=plan.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_steps=steps,
        per_device_train_batch_size=plan.batch_size,
        weight_decay=0.0,
        logging_steps=max(1, steps // 15),
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=42,
        data_seed=42,
        report_to="none",
    )
    values.update(overrides)
    return EAKDConfig(**values)


def _train(config, teacher: nn.Module | None = None) -> tuple[Any, float]:
    from .train import prepare_run
    from .trainer import EAKDTrainer

    parts = prepare_run(config, teacher_model=teacher)
    trainer = EAKDTrainer(args=config, **parts)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(config.output_dir)
    trainer.save_state()
    return trainer, seconds


def _prepare_stack(root: Path, plan: DemoPlan) -> dict[str, str]:
    from .synthetic import prepare_tiny_stack

    marker = root / "stack" / "plan.json"
    wanted = {"num_train": plan.num_train, "num_validation": plan.num_validation, "num_test": plan.num_test}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        stack = {k: str(root / "stack" / v) for k, v in _STACK_LAYOUT.items()}
        if all(os.path.exists(p) for p in stack.values()):
            return stack
    stack = prepare_tiny_stack(str(root / "stack"), **wanted, seed=0)
    marker.write_text(json.dumps(wanted))
    return stack


_STACK_LAYOUT = {
    "data_dir": "data",
    "train_file": "data/train.jsonl",
    "validation_file": "data/validation.jsonl",
    "test_file": "data/test.jsonl",
    "tokenizer": "tokenizer",
    "teacher": "teacher",
    "student": "student",
}


def _train_teacher(root: Path, plan: DemoPlan, stack: dict[str, str]) -> tuple[str, float | None]:
    """SFT of the teacher, reused when a finished one with the same plan is in the output folder."""
    folder = root / "teacher-sft"
    marker = folder / "demo_plan.json"
    wanted = {"steps": plan.teacher_steps, "num_train": plan.num_train, "lr": plan.learning_rate}
    if marker.exists() and json.loads(marker.read_text()) == wanted and (folder / "model.safetensors").exists():
        return str(folder), None
    config = _base_config(plan, stack, folder, plan.teacher_steps, model_name_or_path=stack["teacher"], kd_ratio=0.0)
    _, seconds = _train(config)
    marker.write_text(json.dumps(wanted))
    (folder / "demo_train_seconds.json").write_text(json.dumps({"seconds": seconds}))
    return str(folder), seconds


def _train_student(root: Path, plan: DemoPlan, stack: dict[str, str], name: str, overrides: dict[str, Any],
                   teacher_dir: str, teacher: CachedTeacher) -> RunRecord:
    folder = root / "students" / _slug(name)
    kd = overrides.get("kd_ratio", 0.0) > 0
    config = _base_config(
        plan, stack, folder, plan.student_steps, model_name_or_path=stack["student"],
        teacher_model_name_or_path=teacher_dir if kd else None, **overrides,
    )
    trainer, seconds = _train(config, teacher if kd else None)
    history = [dict(entry) for entry in trainer.state.log_history]
    return RunRecord(name=name, output_dir=str(folder), train_seconds=seconds, overrides=overrides,
                     log_history=history)


def _evaluate(path: str, records, plan: DemoPlan, name: str) -> dict[str, Any]:
    from .evaluation import GenerationSettings, evaluate_model, load_model_for_eval

    model, tokenizer = load_model_for_eval(path)
    settings = GenerationSettings(
        max_prompt_length=plan.max_prompt_length, max_length=plan.max_length, max_new_tokens=plan.max_new_tokens,
        batch_size=64,
    )
    results = evaluate_model(model, tokenizer, {"synthetic-test": records}, seeds=plan.seeds, settings=settings,
                             output_dir=str(Path(path) / "eval"))
    return results["synthetic-test"]


# ----------------------------------------------------------------------------------------------------------------
# Entropy and weight distributions
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_statistics(teacher: nn.Module, student: nn.Module, dataset, collator, entropy_temperature: float,
                     max_examples: int = 512, batch_size: int = 64) -> dict[str, list[float]]:
    """H_T, H_S and the token-level EA weight of every response token of up to ``max_examples`` examples."""
    from .losses import IGNORE_INDEX, ea_weights_from_entropies, token_entropy

    out: dict[str, list[float]] = {"teacher_entropy": [], "student_entropy": [], "ea_weight": []}
    teacher.eval()
    student.eval()
    n = min(max_examples, len(dataset))
    for start in range(0, n, batch_size):
        batch = collator([dataset[i] for i in range(start, min(n, start + batch_size))])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        t_logits = teacher(**inputs).logits[:, :-1][mask]
        s_logits = student(**inputs).logits[:, :-1][mask]
        vocab = min(t_logits.shape[-1], s_logits.shape[-1])
        h_t = token_entropy(t_logits[:, :vocab], entropy_temperature)
        h_s = token_entropy(s_logits[:, :vocab], entropy_temperature)
        out["teacher_entropy"] += h_t.tolist()
        out["student_entropy"] += h_s.tolist()
        out["ea_weight"] += ea_weights_from_entropies(h_t, h_s, vocab).tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _fmt(metric: dict[str, Any]) -> str:
    return f"{metric['mean']:.1f} ± {metric['std']:.1f}"


def write_markdown(results: dict[str, Any], path: Path) -> str:
    seeds = ", ".join(str(s) for s in results["plan"]["seeds"])
    lines = [
        "# eakd-llm demo results",
        "",
        f"Held-out synthetic test split ({results['num_test_records']} prompts), sampling at temperature 1 "
        f"(MiniLLM/DistiLLM protocol), mean ± std over seeds {seeds}. ROUGE-L and exact match are ×100. "
        f"Every student: {results['plan']['student_steps']} steps, batch {results['plan']['batch_size']}. "
        f"Machine: {results['machine']}. Total wall time: {results['total_seconds']:.0f} s. The first distilled "
        "run's train time includes computing the teacher's hidden states, which every later run reuses.",
        "",
        "| model | ROUGE-L | exact match | validation CE | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in results["methods"]:
        ce = f"{row['eval_ce_loss']:.3f}" if row.get("eval_ce_loss") is not None else "–"
        seconds = f"{row['train_seconds']:.0f}" if row.get("train_seconds") is not None else "cached"
        lines.append(f"| {row['name']} | {_fmt(row['rougeL'])} | {_fmt(row['exact_match'])} | {ce} | {seconds} |")
    if results.get("ablation"):
        lines += [
            "",
            "## EA-KD ablation (forward KL): entropy temperature τ′ × kd_ratio",
            "",
            "kd_ratio 1.0 is pure EA-KD (no cross-entropy term); 0.5 keeps CE beside the weighted KD term. "
            "`min w` is the smallest EA weight logged during training: near 0, confident teacher tokens (EOS among "
            "them) get almost no signal.",
            "",
            "| granularity | τ′ | kd_ratio | ROUGE-L | exact match | mean w | min w | train time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in results["ablation"]:
            lines.append(
                f"| {row['granularity']} | {row['entropy_temperature']:g} | {row['kd_ratio']:g} | "
                f"{_fmt(row['rougeL'])} | {_fmt(row['exact_match'])} | {row['ea_weight_mean']:.3f} | "
                f"{row['ea_weight_min']:.3f} | {row['train_seconds']:.0f} |"
            )
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def write_plots(results: dict[str, Any], runs: list[RunRecord], stats: dict[str, dict[str, list[float]]],
                folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results["methods"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [row["name"] for row in rows]
    ax.bar(range(len(rows)), [row["rougeL"]["mean"] for row in rows], yerr=[row["rougeL"]["std"] for row in rows],
           color=["#555555"] + ["#4C72B0" if "EA" not in n else "#DD8452" for n in names[1:]], capsize=4)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylabel("ROUGE-L (×100)")
    ax.set_title("Held-out ROUGE-L (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(folder / "rougeL.png", dpi=120)
    plt.close(fig)
    written.append("rougeL.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        points = [(e["step"], e["ce_loss"]) for e in run.log_history if "ce_loss" in e and "loss" in e]
        if points:
            ax.plot(*zip(*points), label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy per token")
    ax.set_title("Training curves (CE term, comparable across methods)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=120)
    plt.close(fig)
    written.append("loss_curves.png")

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


def _machine() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [e[key] for e in history if key in e]
    return values[-1] if values else None


def _window(history: list[dict[str, Any]], key: str, reduce) -> float:
    values = [e[key] for e in history if key in e and "loss" in e]
    return reduce(values) if values else math.nan


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def run_demo(output_dir: str = "runs/demo", quick: bool = False, seeds: tuple[int, ...] | None = None,
             ablation: bool = True) -> dict[str, Any]:
    """Run the whole study (see the module docstring) and return what ``results.json`` holds."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .data import DistillationCollator, build_dataset, load_split
    from .evaluation import load_eval_records
    from .models import load_tokenizer

    hf_logging.set_verbosity_error()
    plan = QUICK if quick else FULL
    if seeds:
        plan = DemoPlan(**{**asdict(plan), "seeds": tuple(seeds)})
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    num_stages = 5 + len(METHODS)

    _stage(f"[1/{num_stages}] tiny stack: synthetic data, local tokenizer, tiny Llama models -> {root / 'stack'}")
    stack = _prepare_stack(root, plan)

    _stage(f"[2/{num_stages}] teacher SFT, {plan.teacher_steps} steps (cached in {root / 'teacher-sft'})")
    teacher_dir, teacher_seconds = _train_teacher(root, plan, stack)
    if teacher_seconds is None:
        print("   reusing the trained teacher", flush=True)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    teacher = CachedTeacher(teacher_model)

    runs: list[RunRecord] = []
    for i, (name, overrides) in enumerate(METHODS.items()):
        _stage(f"[{3 + i}/{num_stages}] student: {name}, {plan.student_steps} steps")
        runs.append(_train_student(root, plan, stack, name, overrides, teacher_dir, teacher))

    stage = 3 + len(METHODS)
    _stage(f"[{stage}/{num_stages}] evaluating the teacher and {len(runs)} students on the test split "
           f"(seeds {', '.join(map(str, plan.seeds))})")
    records = load_eval_records(stack["test_file"], max_samples=plan.eval_records)
    teacher_state = json.loads((Path(teacher_dir) / "trainer_state.json").read_text())
    rows = [{
        "name": "Teacher (SFT)", "output_dir": teacher_dir, "train_seconds": teacher_seconds,
        "eval_ce_loss": None, "final_train_ce_loss": _last(teacher_state["log_history"], "ce_loss"),
        **_evaluate(teacher_dir, records, plan, "teacher"),
    }]
    tokenizer = load_tokenizer(stack["student"])
    config = _base_config(plan, stack, root / "tmp", 1, model_name_or_path=stack["student"], kd_ratio=0.0)
    validation = build_dataset(load_split(stack["data_dir"], "validation"), config, tokenizer, split="validation")
    for run in runs:
        rows.append({
            "name": run.name, "output_dir": run.output_dir, "train_seconds": run.train_seconds,
            "overrides": run.overrides, "final_train_ce_loss": _last(run.log_history, "ce_loss"),
            "eval_ce_loss": _validation_ce(run.output_dir, validation, tokenizer),
            **_evaluate(run.output_dir, records, plan, run.name),
        })

    ablation_rows = []
    if ablation:
        stage += 1
        _stage(f"[{stage}/{num_stages}] EA-KD ablation: {len(plan.ablation)} runs over τ′ × kd_ratio × granularity")
        for granularity, tau, ratio in plan.ablation:
            name = f"EA-KD {granularity} tau'={tau:g} kd_ratio={ratio:g}"
            overrides = {"kd_ratio": ratio, "divergence": "fkl", "ea": True, "ea_granularity": granularity,
                         "entropy_temperature": tau}
            run = _train_student(root / "ablation", plan, stack, name, overrides, teacher_dir, teacher)
            ablation_rows.append({
                "granularity": granularity, "entropy_temperature": tau, "kd_ratio": ratio,
                "train_seconds": run.train_seconds, "output_dir": run.output_dir,
                "ea_weight_mean": _window(run.log_history, "ea_weight_mean", lambda v: sum(v) / len(v)),
                "ea_weight_min": _window(run.log_history, "ea_weight_min", min),
                **_evaluate(run.output_dir, records, plan, name),
            })

    stage += 1
    _stage(f"[{stage}/{num_stages}] writing results.json, results.md and plots to {root}")
    train = build_dataset(load_split(stack["data_dir"], "train"), config, tokenizer, split="train")
    collator = DistillationCollator(tokenizer.pad_token_id)
    tau = 2.0
    stats = {
        "initial student": token_statistics(teacher_model, AutoModelForCausalLM.from_pretrained(stack["student"]),
                                            train, collator, tau),
        "EA-KD token student": token_statistics(
            teacher_model, AutoModelForCausalLM.from_pretrained(runs[2].output_dir), train, collator, tau
        ),
    }
    results = {
        "plan": {**asdict(plan), "entropy_temperature": tau},
        "machine": _machine(),
        "num_test_records": len(records),
        "teacher_cache": {"hits": teacher.hits, "misses": teacher.misses},
        "methods": rows,
        "ablation": ablation_rows,
        "total_seconds": time.perf_counter() - started,
    }
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    write_plots(results, runs, stats, root)
    text = write_markdown(results, root / "results.md")
    print(text, flush=True)
    return results


@torch.no_grad()
def _validation_ce(model_dir: str, dataset, tokenizer) -> float:
    """Cross-entropy per response token of a trained student on the validation split."""
    from transformers import AutoModelForCausalLM

    from .data import DistillationCollator
    from .losses import IGNORE_INDEX

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    collator = DistillationCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(dataset), 64):
        batch = collator([dataset[i] for i in range(start, min(len(dataset), start + 64))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def demo_main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="eakd-llm demo",
        description="Train a tiny teacher, distil tiny students with SFT, KD and EA-KD, and compare them on held-out "
        "data (offline, CPU). Writes results.json, results.md and PNG plots.",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a smoke test in about 2 minutes (tiny sizes)")
    parser.add_argument("--seeds", type=int, nargs="+", help="evaluation seeds (default: 10 20 30; quick: 10)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the τ′ × kd_ratio ablation")
    args = parser.parse_args(list(argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(args.output_dir, quick=args.quick, seeds=tuple(args.seeds) if args.seeds else None,
             ablation=not args.no_ablation)
    return 0
