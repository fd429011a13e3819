"""``eakd-llm demo``: the embedded default: a controlled, multi-seed study of EA-KD, offline, on 2 CPU cores.

The plan is fixed before anything trains (:mod:`eakd_llm.studies.demo_plan`: :data:`DEFAULT`, :data:`QUICK`):

1. the tiny stack: synthetic instruction data (train/validation/test), a local BPE tokenizer, a tiny Llama teacher and
   one tiny student initialisation per training seed;
2. the teacher, trained with SFT and kept in the output folder (a second run reuses it); the runs that need no
   teacher (SFT) train beside it;
3. the headline comparison, every method trained once per training seed (the seed sets the student's initialisation
   and the data order; every method of a seed sees the same batches), with the validation CE every ``eval_steps``
   steps (the learning curves): SFT, KD, KD x s_eff (plain KD scaled by EA's effective scale sum(w d) / sum(d)
   measured in the EA-KD token run of the same seed: EA's scale without its adaptivity), EA-KD token, EA-KD token with
   normalised weights, EA-KD sequence;
4. every trained model scored on the same held-out prompts with the same sampling seeds (MiniLLM/DistiLLM protocol);
5. paired differences with crossed-design t intervals and a verdict per comparison (:mod:`eakd_llm.studies.statistics`);
6. ``results.json``, ``results.md`` and PNG plots, the learning curves among them (:mod:`eakd_llm.studies.demo_report`).

``--full`` adds, on the same seeds: EA-KD token from the teacher's top-k cache (``eakd-llm cache-teacher``'s code);
KD and EA-KD token continued on-policy (λ = 0.5) from the same seed's trained student, each beside the same student
continued off-policy for the same number of steps; and the one-seed ablation over τ′ × kd_ratio, raw and normalised.

The teacher's SFT and every run go to a pool of worker processes (one thread each: on 2 cores two single-threaded
runs do more work than one two-threaded run, and a two-threaded run slows down several times when another process
shares its cores). The console shows one progress bar and one line per finished run; the libraries' own output goes to
``demo.log`` in the output folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..models.loading import final_hidden_states
from .demo_plan import (
    COMPARISONS,
    DEFAULT,
    EA_TOKEN,
    INIT_FROM,
    METHODS,
    QUICK,
    SCALE_SOURCE,
    DemoPlan,
    RunSpec,
    depends_on,
    plan_runs,
    study_methods,
)
from .outputs import relative_paths

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The teacher's outputs, computed once per example
# ----------------------------------------------------------------------------------------------------------------


class CachedTeacher(nn.Module):
    """A frozen teacher whose final hidden states are remembered per example (keyed by its token ids).

    Every run of a worker, whatever its data order, then pays the teacher's backbone once per training example. Rows
    are right-padded, so an example's hidden states do not depend on the batch it sits in (a causal model, padding
    after the tokens); other batches (left padding, packing) are computed whole, uncached. Only the final hidden states
    ``[T, H]`` are kept (H is far smaller than the vocabulary); logits, when asked for, are projected from them with
    the teacher's own head.
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
        """The teacher's ``[B, T, H]`` final hidden states (how the fused loss asks, see
        :func:`eakd_llm.models.loading.final_hidden_states`)."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        lengths = mask.sum(1) if mask is not None else None
        right_padded = (mask is not None and set(inputs) == {"input_ids", "attention_mask"}
                        and bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()))
        if not right_padded:
            return final_hidden_states(self.teacher, **inputs)
        keys = [ids[row, : int(lengths[row])].cpu().numpy().tobytes() for row in range(ids.shape[0])]
        missing = [row for row, key in enumerate(keys) if key not in self.cache]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            width = int(lengths[missing].max())
            hidden = final_hidden_states(self.teacher, input_ids=ids[missing, :width],
                                         attention_mask=mask[missing, :width])
            for i, row in enumerate(missing):
                self.cache[keys[row]] = hidden[i, : int(lengths[row])].cpu().clone()
        out = torch.zeros(ids.shape[0], ids.shape[1], self.config.hidden_size, device=ids.device)
        for row, key in enumerate(keys):
            out[row, : int(lengths[row])] = self.cache[key].to(ids.device)
        return out

    @torch.no_grad()
    def precompute(self, sequences, batch_size: int = 64) -> None:
        """Fill the cache with these token sequences in a fixed order and batching: an example's states then do not
        depend on the batch in which a run first met it (other batch shapes round differently), so a run's result
        does not depend on which runs its worker ran before."""
        device = next(self.teacher.parameters()).device
        for start in range(0, len(sequences), batch_size):
            chunk = [list(seq) for seq in sequences[start: start + batch_size]]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq, device=device)
                mask[row, : len(seq)] = 1
            self.final_hidden_states(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def forward(self, use_cache: bool = False, logits_to_keep: int = 0, **inputs: torch.Tensor) -> SimpleNamespace:
        """Logits projected from the cached hidden states with the teacher's head (the last ``logits_to_keep``
        positions, all when 0), as a causal LM's forward gives them."""
        hidden = self.final_hidden_states(**inputs)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return SimpleNamespace(logits=self.teacher.get_output_embeddings()(kept), hidden_states=(hidden,))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (run in the main process or in a worker)
# ----------------------------------------------------------------------------------------------------------------


def _base_config(plan: DemoPlan, stack: dict[str, str], output_dir: Path, steps: int, curve: bool = False,
                 **overrides: Any):
    """A run's config; ``curve``: the validation CE every ``plan.eval_steps`` steps and at step 0 (one batch: the
    logged ``eval_ce_loss`` is the CE per token over the whole validation split)."""
    from ..config.eakd_config import EAKDConfig

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
        disable_tqdm=True,
        entropy_temperature=plan.entropy_temperature,
        max_new_tokens=plan.max_new_tokens,
        dataset_eval_split="validation",
    )
    if curve:
        values.update(eval_strategy="steps", eval_steps=plan.eval_steps, eval_on_start=True,
                      per_device_eval_batch_size=plan.num_validation, prediction_loss_only=True)
    values.update(overrides)
    return EAKDConfig(**values)


def _train(config, teacher: nn.Module | None = None) -> tuple[Any, float]:
    from ..training.train import prepare_run
    from ..training.trainer import EAKDTrainer

    parts = prepare_run(config, teacher_model=teacher)
    trainer = EAKDTrainer(args=config, **parts)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(config.output_dir)
    trainer.save_state()
    return trainer, seconds


_STACK_LAYOUT = {
    "data_dir": "data",
    "train_file": "data/train.jsonl",
    "validation_file": "data/validation.jsonl",
    "test_file": "data/test.jsonl",
    "tokenizer": "tokenizer",
    "teacher": "teacher",
    "student": "student",
}


def _prepare_stack(root: Path, plan: DemoPlan) -> dict[str, str]:
    """The tiny stack (reused when a previous run of the same plan wrote it) and one student init per seed."""
    from ..models.loading import load_tokenizer
    from .synthetic import prepare_tiny_stack, save_tiny_model

    marker = root / "stack" / "plan.json"
    wanted = {"num_train": plan.num_train, "num_validation": plan.num_validation, "num_test": plan.num_test,
              "train_seeds": list(plan.train_seeds)}
    stack = {k: str(root / "stack" / v) for k, v in _STACK_LAYOUT.items()}
    for seed in plan.train_seeds:
        stack[f"student-{seed}"] = str(root / "stack" / f"student-seed-{seed}")
    if marker.exists() and json.loads(marker.read_text()) == wanted and all(os.path.exists(p) for p in stack.values()):
        return stack
    stack.update(prepare_tiny_stack(str(root / "stack"), num_train=plan.num_train, num_validation=plan.num_validation,
                                    num_test=plan.num_test, seed=0))
    tokenizer = load_tokenizer(stack["tokenizer"])
    for seed in plan.train_seeds:  # the training seed sets the student's initialisation
        save_tiny_model("student", Path(stack[f"student-{seed}"]), tokenizer, 1000 + seed)
    marker.write_text(json.dumps(wanted))
    return stack


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


def _build_teacher_cache(root: Path, plan: DemoPlan, stack: dict[str, str], teacher_dir: str) -> dict[str, Any]:
    """The top-k cache of the teacher over the training split (the code of ``eakd-llm cache-teacher``)."""
    from ..teacher.cache import build_cache

    folder = root / f"teacher-cache-k{plan.cache_top_k}"
    config = _base_config(plan, stack, root / "tmp", 1, model_name_or_path=stack["student"],
                          teacher_model_name_or_path=teacher_dir, **EA_TOKEN)
    start = time.perf_counter()
    if (folder / "manifest.json").exists() and (root / "teacher-sft" / "demo_plan.json").stat().st_mtime > (
            folder / "manifest.json").stat().st_mtime:
        import shutil

        shutil.rmtree(folder)  # a newer teacher: the cache is stale
    manifest = build_cache(config, str(folder), plan.cache_top_k, value_format="float16", shard_size=512,
                           show_progress=False)
    seconds = time.perf_counter() - start
    files = [folder / name for name in manifest.splits["train"]["shards"]]
    return {"folder": str(folder), "top_k": plan.cache_top_k, "value_format": manifest.value_format,
            "bytes_per_token": manifest.bytes_per_token(), "tokens": manifest.splits["train"]["tokens"],
            "disk_bytes": sum(f.stat().st_size for f in files), "build_seconds": seconds}


def _evaluate(path: str, records, plan: DemoPlan) -> dict[str, Any]:
    from ..evaluation.protocol import GenerationSettings, evaluate_model, load_model_for_eval

    model, tokenizer = load_model_for_eval(path)
    settings = GenerationSettings(
        max_prompt_length=plan.max_prompt_length, max_length=plan.max_length, max_new_tokens=plan.max_new_tokens,
        batch_size=64,
    )
    results = evaluate_model(model, tokenizer, {"synthetic-test": records}, seeds=plan.sampling_seeds,
                             settings=settings, output_dir=str(Path(path) / "eval"), keep_per_example=True)
    return results["synthetic-test"]


@torch.no_grad()
def _validation_ce(model_dir: str, dataset, tokenizer) -> float:
    """Cross-entropy per response token of a trained student on the validation split."""
    from transformers import AutoModelForCausalLM

    from ..data.dataset import DistillationCollator
    from ..loss.distillation import IGNORE_INDEX

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


def _history_mean(history: list[dict[str, Any]], key: str, reduce=None) -> float | None:
    values = [entry[key] for entry in history if key in entry and "loss" in entry]
    if not values:
        return None
    return float(reduce(values)) if reduce else float(sum(values) / len(values))


# ----------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(log_path: str, stack: dict[str, str], plan: DemoPlan, threads: int) -> None:
    """One worker process: its own thread budget, its output into the log, the shared data loaded once (the teacher
    when a run first needs it: the teacher's own training may still be under way)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from ..data.dataset import build_dataset, load_split
    from ..evaluation.protocol import load_eval_records
    from ..models.loading import load_tokenizer

    hf_logging.set_verbosity_error()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    tokenizer = load_tokenizer(stack["student"])
    config = _base_config(plan, stack, Path(stack["data_dir"]).parent / "tmp", 1, model_name_or_path=stack["student"],
                          kd_ratio=0.0)
    _WORKER.update(
        tokenizer=tokenizer,
        train=build_dataset(load_split(stack["data_dir"], "train"), config, tokenizer, split="train"),
        validation=build_dataset(load_split(stack["data_dir"], "validation"), config, tokenizer, split="validation"),
        records=load_eval_records(stack["test_file"], max_samples=plan.eval_records),
    )


def _worker_teacher(teacher_dir: str) -> CachedTeacher:
    """The trained teacher, loaded once per worker, with its per-example cache of hidden states filled for the
    training and validation splits up front (:meth:`CachedTeacher.precompute`: results independent of run order)."""
    if "teacher" not in _WORKER:
        from transformers import AutoModelForCausalLM

        teacher = CachedTeacher(AutoModelForCausalLM.from_pretrained(teacher_dir).eval())
        teacher.precompute([*_WORKER["train"]["input_ids"], *_WORKER["validation"]["input_ids"]])
        _WORKER["teacher"] = teacher
    return _WORKER["teacher"]


def run_student(spec: RunSpec, plan: DemoPlan, stack: dict[str, str], root: str, teacher_dir: str,
                settings: dict[str, Any]) -> dict[str, Any]:
    """Train one student run, evaluate it, and return its row (runs in a worker). ``settings``: the teacher cache's
    folder, and for a dependent run (:func:`eakd_llm.studies.demo_plan.depends_on`) the measured ``kd_scale`` or the
    ``init_dir`` of the trained student it continues."""
    overrides = dict(spec.overrides)
    for key, value in list(overrides.items()):
        if value == "plan":
            overrides[key] = settings["teacher_cache"] if key == "teacher_cache" else plan.on_policy_fraction
        elif value == "measured":
            overrides[key] = settings["kd_scale"]
    kd = overrides.get("kd_ratio", 0.0) > 0
    cached = "teacher_cache" in overrides
    folder = Path(root) / "students" / spec.slug
    init, steps = stack[f"student-{spec.train_seed}"], plan.student_steps
    if spec.name in INIT_FROM:  # continues the same seed's trained student: its saved folder is the new start
        init, steps = settings["init_dir"], plan.continue_steps
        overrides.setdefault("learning_rate", plan.continue_learning_rate)
    config = _base_config(
        plan, stack, folder, steps, curve=True, model_name_or_path=init,
        teacher_model_name_or_path=teacher_dir if kd else None, seed=spec.train_seed, data_seed=spec.train_seed,
        **overrides,
    )
    teacher = _worker_teacher(teacher_dir) if kd and not cached else None
    known = set(teacher.cache) if teacher is not None and "on_policy_fraction" in overrides else None
    trainer, seconds = _train(config, teacher)
    if known is not None:  # generated sequences are never seen again: keep the worker's memory flat
        for key in set(teacher.cache) - known:
            del teacher.cache[key]
    history = [dict(entry) for entry in trainer.state.log_history]
    evaluation = _evaluate(str(folder), _WORKER["records"], plan)
    return {
        "name": spec.name, "group": spec.group, "train_seed": spec.train_seed, "output_dir": str(folder),
        "init": init, "steps": steps, "overrides": overrides, "train_seconds": seconds,
        "eval_ce_loss": _validation_ce(str(folder), _WORKER["validation"], _WORKER["tokenizer"]),
        "final_train_ce_loss": _history_mean([e for e in history if "loss" in e][-1:], "ce_loss"),
        "ea_weight_mean": _history_mean(history, "ea_weight_mean"),
        "ea_weight_min": _history_mean(history, "ea_weight_min", min),
        "ea_effective_scale": _history_mean(history, "ea_effective_scale"),
        "generation_time_share": _history_mean(history, "generation_time_share"),
        "generated_length": _history_mean(history, "generated_length"),
        "learning_curve": [(int(e["step"]), float(e["eval_ce_loss"])) for e in history if "eval_ce_loss" in e],
        "rougeL": evaluation["rougeL"], "exact_match": evaluation["exact_match"],
        "per_example": evaluation["per_example"],
        "log_history": history,
    }


def _evaluate_teacher(teacher_dir: str, plan: DemoPlan) -> dict[str, Any]:
    return _evaluate(teacher_dir, _WORKER["records"], plan)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout/stderr (libraries, progress bars of the tokenizer) to the log while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for handle in (*saved, fd):
            os.close(handle)


def check_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output folder that cannot be one: an existing file, or a path below a file."""
    from ..config.eakd_config import ConfigError

    path = Path(output_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                if candidate == path:
                    raise ConfigError(f"--output-dir {str(output_dir)!r} is an existing file, not a folder")
                raise ConfigError(f"--output-dir {str(output_dir)!r} cannot be created: {str(candidate)!r} is a "
                                  "file, not a folder")
            return


def run_demo(output_dir: str = "runs/demo", quick: bool = False, workers: int | None = None, full: bool = False,
             ablation: bool = True) -> dict[str, Any]:
    """Run the headline study, or with ``full`` the full one (see the module docstring), and return what
    ``results.json`` holds. ``ablation=False`` leaves the full study's ablation out."""
    check_output_dir(output_dir)

    from tqdm.auto import tqdm

    from .demo_report import assemble_results, write_markdown, write_plots
    from .statistics import machine_description

    plan = QUICK if quick else DEFAULT
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "demo.log"
    log_path.write_text("")
    workers = workers or min(2, os.cpu_count() or 1)
    started = time.perf_counter()
    console = sys.stdout

    def say(text: str) -> None:
        print(text, file=console, flush=True)

    runs = [spec for spec in plan_runs(plan, full) if ablation or spec.group == "main"]
    methods = study_methods(full)
    extra = len(runs) - len(methods) * len(plan.train_seeds)
    say(f"eakd-llm demo{' --full' if full else ''}: {len(runs)} student runs ({len(methods)} methods x "
        f"{len(plan.train_seeds)} training seeds{f' + {extra} ablation runs' if extra else ''}), {plan.student_steps} "
        f"steps each{f' ({plan.continue_steps} for the continued rows)' if full else ''}, {workers} worker "
        f"process(es); library output -> {log_path}")
    with _output_to(log_path):
        stack = _prepare_stack(root, plan)
    say(f"  tiny stack ready ({root / 'stack'})")
    done = _run_pool(runs, plan, stack, root, workers, log_path, console, tqdm)
    teacher_dir = str(root / "teacher-sft")

    say(f"  writing results.json, results.md and plots to {root}")
    with _output_to(log_path):
        stats = _entropy_statistics(root, plan, stack, teacher_dir, done["rows"])
    results = assemble_results(plan, done["rows"], done["teacher_eval"], teacher_dir, done["teacher_seconds"],
                               done["cache"], machine_description(), time.perf_counter() - started, full)
    results = relative_paths(results, root)
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    with _output_to(log_path):
        write_plots(results, done["rows"], stats, root)
    text = write_markdown(results, root / "results.md")
    say(text)
    return results


def _needs(spec: RunSpec) -> set[str]:
    """What must be finished before a run starts: the teacher (or its cache), and the same seed's run of the method
    it depends on (:func:`depends_on`)."""
    overrides = dict(spec.overrides)
    needs = set()
    if overrides.get("kd_ratio", 0.0) > 0:
        needs.add("cache" if "teacher_cache" in overrides else "teacher")
    source = depends_on(spec.name)
    if source:
        needs.add(f"{source}#{spec.train_seed}")
    return needs


def _run_pool(runs: list[RunSpec], plan: DemoPlan, stack: dict[str, str], root: Path, workers: int, log_path: Path,
              console, tqdm) -> dict[str, Any]:
    """The teacher's SFT, its cache when a run needs one, its evaluation and every student run on the worker pool.
    A run starts as soon as what it needs (:func:`_needs`) is finished, so runs without a teacher (SFT) train beside
    the teacher's SFT; a dependent run gets its source's measured scale or trained weights."""
    import multiprocessing

    teacher_dir = str(root / "teacher-sft")
    out: dict[str, Any] = {"rows": [], "teacher_eval": None, "teacher_seconds": None, "cache": None}
    settings: dict[str, Any] = {}
    finished: dict[str, dict[str, Any] | None] = {}
    needs_cache = any("teacher_cache" in dict(spec.overrides) for spec in runs)
    total, count = len(runs) + 2 + needs_cache, 0
    # One bar on a terminal; elsewhere (a log, CI) the numbered line of each finished task says the same.
    bar = tqdm(total=total, desc="demo runs", unit="run", file=console, dynamic_ncols=True,
               disable=not console.isatty())
    sources = {depends_on(spec.name) for spec in runs} - {None}
    waiting = list(runs)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(str(log_path), stack, plan, threads)) as pool:
        pending: dict[Future, RunSpec | str] = {pool.submit(_train_teacher, root, plan, stack): "teacher"}

        def submit_ready() -> None:
            # the runs others wait for first, then the rest in plan order
            ready = sorted((s for s in waiting if _needs(s) <= finished.keys()), key=lambda s: s.name not in sources)
            for spec in ready:
                waiting.remove(spec)
                given = dict(settings)
                source = depends_on(spec.name)
                if source:
                    row = finished[f"{source}#{spec.train_seed}"]
                    given.update({"kd_scale": row["ea_effective_scale"]} if spec.name in SCALE_SOURCE
                                 else {"init_dir": row["output_dir"]})
                pending[pool.submit(run_student, spec, plan, stack, str(root), teacher_dir, given)] = spec

        submit_ready()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                tag = pending.pop(future)
                result = future.result()
                bar.update(1)
                count += 1
                if tag == "teacher":
                    out["teacher_seconds"] = result[1]
                    line = f"teacher SFT, {plan.teacher_steps} steps: " + (
                        "reusing the trained teacher" if result[1] is None else f"{result[1]:.0f} s")
                    finished["teacher"] = None
                    if needs_cache:
                        pending[pool.submit(_build_teacher_cache, root, plan, stack, teacher_dir)] = "cache"
                    pending[pool.submit(_evaluate_teacher, teacher_dir, plan)] = "teacher-eval"
                elif tag == "cache":
                    out["cache"] = result
                    settings["teacher_cache"] = result["folder"]
                    finished["cache"] = None
                    line = (f"teacher top-{result['top_k']} cache: {result['bytes_per_token']} B/token, "
                            f"{result['disk_bytes'] / 2**20:.1f} MiB, {result['build_seconds']:.0f} s")
                elif tag == "teacher-eval":
                    out["teacher_eval"] = result
                    line = f"{'Teacher (SFT)':<40} evaluated: ROUGE-L {result['rougeL']['mean']:.1f}"
                else:
                    out["rows"].append(result)
                    finished[f"{tag.name}#{tag.train_seed}"] = result
                    line = (f"{tag.name:<40} seed {tag.train_seed}  {result['train_seconds']:5.1f} s  validation CE "
                            f"{result['eval_ce_loss']:.3f}  ROUGE-L {result['rougeL']['mean']:.1f}")
                bar.write(f"  [{count}/{total}] {line}", file=console)
                console.flush()
                submit_ready()
    bar.close()
    return out


def _entropy_statistics(root: Path, plan: DemoPlan, stack: dict[str, str], teacher_dir: str,
                        rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    from transformers import AutoModelForCausalLM

    from ..data.dataset import DistillationCollator, build_dataset, load_split
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(stack["student"])
    config = _base_config(plan, stack, root / "tmp", 1, model_name_or_path=stack["student"], kd_ratio=0.0)
    train = build_dataset(load_split(stack["data_dir"], "train"), config, tokenizer, split="train")
    collator = DistillationCollator(tokenizer.pad_token_id)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    seed = plan.train_seeds[0]
    trained = next(r for r in rows if r["name"] == "EA-KD token" and r["train_seed"] == seed)
    return {
        "initial student": token_statistics(teacher, AutoModelForCausalLM.from_pretrained(stack[f"student-{seed}"]),
                                            train, collator, plan.entropy_temperature),
        "EA-KD token student": token_statistics(teacher, AutoModelForCausalLM.from_pretrained(trained["output_dir"]),
                                                train, collator, plan.entropy_temperature),
    }


@torch.no_grad()
def token_statistics(teacher: nn.Module, student: nn.Module, dataset, collator, entropy_temperature: float,
                     max_examples: int = 512, batch_size: int = 64) -> dict[str, list[float]]:
    """H_T, H_S and the token-level EA weight of every response token of up to ``max_examples`` examples."""
    from ..loss.distillation import IGNORE_INDEX, ea_weights_from_entropies, token_entropy

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


def demo_main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="eakd-llm demo",
        description="A controlled multi-seed study of EA-KD on a tiny teacher/student pair (offline, CPU): SFT, KD, "
        "KD x EA's effective scale, EA-KD (token, normalised, sequence), learning curves, paired intervals and "
        "verdicts. Writes results.json, results.md and PNG plots.",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a smoke test (one training seed, tiny sizes)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: min(2, CPU count))")
    parser.add_argument("--full", action="store_true",
                        help="the full study: adds EA-KD from a teacher cache, on-policy continuations beside "
                        "off-policy ones, and the one-seed tau' x kd_ratio ablation")
    parser.add_argument("--no-ablation", action="store_true", help="with --full: skip the tau' x kd_ratio ablation")
    args = parser.parse_args(list(argv))
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    from ..config.eakd_config import ConfigError

    try:
        check_output_dir(args.output_dir)
    except ConfigError as err:
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(args.output_dir, quick=args.quick, workers=args.workers, full=args.full, ablation=not args.no_ablation)
    return 0


__all__ = ["COMPARISONS", "DEFAULT", "METHODS", "QUICK", "CachedTeacher", "DemoPlan", "RunSpec", "check_output_dir",
           "demo_main", "plan_runs", "run_demo", "token_statistics"]
