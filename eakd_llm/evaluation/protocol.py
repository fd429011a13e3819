"""Instruction-following benchmark evaluation, as MiniLLM / DistiLLM (and the EA-KD paper) run it.

The protocol (MiniLLM ``evaluate_main.py`` / ``rouge_metric.py``, microsoft/LMOps):

* every benchmark record is a templated prompt plus one or more acceptable reference answers
  (:func:`load_eval_records`, :mod:`eakd_llm.data.prompts`; raw ``instruction``/``input``/``output`` records are
  rendered with the same prompt template as training, :func:`eakd_llm.data.prompts.format_instruction_prompt`; chat
  records with the tokenizer's chat template, as training renders them);
* responses are sampled (``do_sample``, temperature 1, top-p 1, no top-k, ``no_repeat_ngram_size`` 6, prompts at most
  256 tokens, 512 - 256 = 256 new tokens for every record) in left-padded batches, stopping at any of the model's end
  tokens (:func:`generate_predictions`, :mod:`eakd_llm.models.generation`), and each prediction records whether it
  stopped there or ran out of budget;
* each response is scored with ROUGE-L F-measure (``rouge_score``, Porter stemming) and exact match after light
  normalisation, the best over the record's references, averaged over records and reported x100 (:func:`score`);
* the whole generation + scoring is repeated for the seeds 10, 20, 30, 40, 50 and reported as mean ± std
  (:func:`evaluate_model`).

ROUGE-L is computed through ``evaluate`` with the local metric module :data:`ROUGE_L_METRIC_PATH`, so no Hub access is
needed. ``eakd-llm eval`` / ``scripts/evaluate.py`` is :func:`eval_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import string
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import transformers

from ..config.eakd_config import ConfigError
from ..data.prompts import EVAL_FORMATS, PROMPT_FORMATS, EvalRecord, load_eval_records, render_eval_prompt
from ..models.generation import BUDGETS, GenerationSettings, encode_prompt, end_token_ids, generate_token_ids
from .metrics import ROUGE_L_METRIC_PATH

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_NAMES",
    "DEFAULT_SEEDS",
    "EVAL_FORMATS",
    "PROMPT_FORMATS",
    "ROUGE_L_METRIC_PATH",
    "EvalRecord",
    "GenerationSettings",
    "Prediction",
    "build_eval_parser",
    "encode_prompt",
    "encode_record_prompt",
    "eval_main",
    "evaluate_model",
    "exact_match",
    "generate_predictions",
    "generate_responses",
    "load_eval_records",
    "load_model_for_eval",
    "load_rouge_l_metric",
    "normalize_answer",
    "results_markdown",
    "rouge_l",
    "score",
    "score_examples",
]

DEFAULT_SEEDS: tuple[int, ...] = (10, 20, 30, 40, 50)
BENCHMARKS: tuple[str, ...] = ("dolly", "self_inst", "vicuna", "sni", "unni")
BENCHMARK_NAMES: dict[str, str] = {
    "dolly": "DollyEval",
    "self_inst": "SelfInst",
    "vicuna": "VicunaEval",
    "sni": "S-NI",
    "unni": "UnNI",
}
METRICS: tuple[str, ...] = ("rougeL", "exact_match")
METRIC_NAMES: dict[str, str] = {"rougeL": "ROUGE-L", "exact_match": "EM"}
# How generation ended, per dataset: the share of responses that generated an end id, mean tokens per response.
GENERATION_STATS: tuple[str, ...] = ("stopped", "new_tokens")


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower-case, drop ``string.punctuation``, collapse whitespace: SQuAD v1.1 normalisation WITHOUT article removal.

    This follows MiniLLM's ``minillm/rouge_metric.py`` (microsoft/LMOps, imported by ``minillm/evaluate_main.py`` as
    ``from rouge_metric import compute_metrics``; read from the sarvex/LMOps mirror, commit 09c2374): its
    ``normalize_answer`` is "adapted ... from Squad v1.1 evaluation, without removing the articles", i.e.
    ``white_space_fix(remove_punc(lower(s)))``, and ``exact_match`` compares the two normalised strings. Leading and
    trailing whitespace disappear with the whitespace collapsing.
    """
    exclude = set(string.punctuation)
    return " ".join("".join(ch for ch in text.lower() if ch not in exclude).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(ref) for ref in references))


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _hf_home() -> str:
    """``$HF_HOME`` when set (honoured as is); else the default cache when writable; else a temporary folder.

    In the last case ``HF_HOME`` is set for this process so that libraries imported later use it too.
    """
    if os.environ.get("HF_HOME"):
        return os.path.expanduser(os.environ["HF_HOME"])
    default = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "huggingface")
    if _writable(default):
        return default
    user = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = os.path.join(tempfile.gettempdir(), f"eakd-llm-hf-home-{user}")
    os.makedirs(fallback, exist_ok=True)
    logger.info("default Hugging Face cache %s is not writable; using HF_HOME=%s", default, fallback)
    os.environ["HF_HOME"] = fallback
    return fallback


@lru_cache(maxsize=1)
def load_rouge_l_metric():
    """The local ROUGE-L ``evaluate`` metric (:data:`ROUGE_L_METRIC_PATH`), loaded once, offline.

    ``evaluate.load`` copies the module into its modules cache and imports it from there; both that cache and the
    metric's data folder must be writable. An existing ``HF_HOME`` (or ``HF_MODULES_CACHE``) is honoured; otherwise
    the default cache is used when writable, else a temporary folder. Nothing is downloaded, so ``HF_HUB_OFFLINE=1``
    and ``HF_DATASETS_OFFLINE=1`` are fine. Results are kept in memory (no arrow cache files).
    """
    home = _hf_home()
    import evaluate

    if not hasattr(evaluate, "load"):
        raise ConfigError(
            f"`import evaluate` found {getattr(evaluate, '__file__', evaluate)!r} instead of the Hugging Face evaluate "
            "library: a file or folder named evaluate shadows it on sys.path"
        )
    modules_cache = str(evaluate.config.HF_MODULES_CACHE)
    if not _writable(modules_cache):  # evaluate was imported before HF_HOME pointed somewhere writable
        evaluate.config.HF_MODULES_CACHE = type(evaluate.config.HF_MODULES_CACHE)(os.path.join(home, "modules"))
    metrics_cache = str(evaluate.config.HF_METRICS_CACHE)
    if not _writable(metrics_cache):
        metrics_cache = os.path.join(home, "metrics")
    return evaluate.load(ROUGE_L_METRIC_PATH, keep_in_memory=True, cache_dir=metrics_cache)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-prediction ROUGE-L F-measure, the max over its references, in [0, 1] (through the local metric)."""
    if not predictions:
        return []
    result = load_rouge_l_metric().compute(
        predictions=list(predictions), references=[list(refs) for refs in references]
    )
    return [float(v) for v in result["rougeL_per_example"]]


def score_examples(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per-record ``{"rougeL": [...], "exact_match": [...]}`` in [0, 100] (best over each record's references)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{index}] must be a non-empty list of strings, got {refs!r}")
    return {
        "rougeL": [100.0 * v for v in rouge_l(predictions, references)],
        "exact_match": [100.0 * exact_match(p, refs) for p, refs in zip(predictions, references)],
    }


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """``{"rougeL": .., "exact_match": ..}`` in [0, 100], as MiniLLM's ``compute_metrics``.

    Both are the best score over each record's references, averaged over records and multiplied by 100. ROUGE-L is
    the ``rouge_score`` F-measure with Porter stemming (through ``evaluate`` and the local metric module); exact match
    compares :func:`normalize_answer` forms. Values are not rounded (MiniLLM rounds to 4 decimals for display).
    """
    if not predictions:
        raise ValueError("no predictions to score")
    per_example = score_examples(predictions, references)
    return {name: float(np.mean(values)) for name, values in per_example.items()}


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One generated response and how its generation ended.

    ``text``: decoded without special tokens and stripped (what is scored); ``raw_text``: every generated token
    decoded, special tokens and the end token included; ``stopped``: an end id was generated (else the new-token
    budget ran out); ``new_tokens``: tokens generated, the end token included.
    """

    text: str
    raw_text: str
    stopped: bool
    new_tokens: int


def encode_record_prompt(tokenizer, record: EvalRecord, max_prompt_length: int) -> list[int]:
    """Prompt ids of a record, special tokens exactly once: a chat-rendered prompt holds the template's own (its BOS
    where the template writes one) and is tokenized without the tokenizer's; a plain prompt gets the tokenizer's.
    Long prompts are truncated as training truncates them (:func:`encode_prompt`)."""
    text, has_special_tokens = render_eval_prompt(record, tokenizer)
    return encode_prompt(tokenizer, text, max_prompt_length, add_special_tokens=not has_special_tokens)


def generate_predictions(
    model, tokenizer, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seed: int
) -> list[Prediction]:
    """One :class:`Prediction` per token-id prompt: left-padded batches through ``model.generate``, seeded.

    ``torch.manual_seed(seed)`` and ``transformers.set_seed(seed)`` are called before the first batch, so the same
    model, prompts, settings and seed give the same responses (on the same device). Prompts are left-padded with the
    tokenizer's pad id (the tokenizer itself is not modified). Each record generates at most
    ``settings.new_token_budget(len(prompt))`` tokens (``budget``: MiniLLM's fixed ``max_length - max_prompt_length``
    by default); generation stops and the response is cut at the first end token
    (:func:`eakd_llm.models.generation.end_token_ids`: the tokenizer's EOS, any id of the model's
    ``generation_config.eos_token_id``, the chat template's end-of-turn token).

    The checkpoint's own ``generation_config`` sampling defaults are set aside during generation so every model is
    decoded by the same protocol (:func:`eakd_llm.models.generation.generate_token_ids`).
    """
    settings.validate()
    torch.manual_seed(seed)
    transformers.set_seed(seed)
    if not prompts:
        return []
    eos_ids = end_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    generated = generate_token_ids(model, prompts, settings, eos_ids, pad_id, keep_eos=True)
    out = []
    for ids in generated:
        stopped = bool(ids) and ids[-1] in eos_ids  # cut after the first end id: only the last one can be one
        text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
        out.append(Prediction(text, tokenizer.decode(ids, skip_special_tokens=False), stopped, len(ids)))
    return out


def generate_responses(model, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int) -> list[str]:
    """The scored text of one response per plain-text prompt (:func:`generate_predictions`).

    Prompts are tokenized with the tokenizer's special tokens (BOS) and truncated to ``settings.max_prompt_length``
    as training does (:func:`encode_prompt`); responses are decoded with ``skip_special_tokens=True`` and stripped.
    """
    settings.validate()
    encoded = [encode_prompt(tokenizer, prompt, settings.max_prompt_length) for prompt in prompts]
    return [p.text for p in generate_predictions(model, tokenizer, encoded, settings, seed)]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation over datasets and seeds
# ----------------------------------------------------------------------------------------------------------------


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def evaluate_model(
    model,
    tokenizer,
    datasets: Mapping[str, list[EvalRecord]],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    settings: GenerationSettings | None = None,
    output_dir: str | None = None,
    keep_per_example: bool = False,
) -> dict[str, dict[str, Any]]:
    """Generate and score every dataset once per seed; report mean ± std over the seeds.

    Returns ``{dataset: {"rougeL": {"mean": m, "std": s, "per_seed": {seed: v}}, "exact_match": {...},
    "stopped": {...}, "new_tokens": {...}, "num_records": n}}``: ROUGE-L and exact match in [0, 100], ``stopped``
    the share of responses that generated an end id (the rest ran out of budget) in [0, 1], ``new_tokens`` the mean
    tokens generated per response. ``std`` is the POPULATION standard deviation over the seeds
    (``numpy.std``, ``ddof=0``; 0 for a single seed). Generation is re-seeded before each dataset x seed
    (:func:`generate_predictions`), so a dataset's numbers do not depend on which datasets come before it.
    ``keep_per_example``: also return ``"per_example": {metric: {seed: [score of each record]}}`` (for paired
    statistics across models).

    With ``output_dir``: ``predictions_<dataset>_seed<seed>.jsonl`` (the prompt text the model completed,
    references, prediction, ``raw_prediction``, ``stopped``, ``new_tokens`` and the record's scores),
    ``results.json`` (``{"results": <the returned dict>, "seeds": [...], "settings": {...}}``) and
    ``results.md`` (:func:`results_markdown`).
    """
    settings = settings or GenerationSettings()
    settings.validate()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("at least one seed is needed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    if not datasets:
        raise ConfigError("no evaluation dataset given")
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)

    results: dict[str, dict[str, Any]] = {}
    for name, records in datasets.items():
        if not records:
            raise ConfigError(f"evaluation dataset {name!r} has no records")
        texts = [render_eval_prompt(r, tokenizer)[0] for r in records]
        prompts = [encode_record_prompt(tokenizer, r, settings.max_prompt_length) for r in records]
        references = [list(r.references) for r in records]
        per_seed: dict[str, dict[int, float]] = {metric: {} for metric in (*METRICS, *GENERATION_STATS)}
        per_example_scores: dict[str, dict[int, list[float]]] = {metric: {} for metric in METRICS}
        for seed in seeds:
            logger.info("evaluating %s (%d records), seed %d", name, len(records), seed)
            predictions = generate_predictions(model, tokenizer, prompts, settings, seed)
            per_example = score_examples([p.text for p in predictions], references)
            for metric in METRICS:
                per_seed[metric][seed] = float(np.mean(per_example[metric]))
                per_example_scores[metric][seed] = [float(v) for v in per_example[metric]]
            per_seed["stopped"][seed] = float(np.mean([p.stopped for p in predictions]))
            per_seed["new_tokens"][seed] = float(np.mean([p.new_tokens for p in predictions]))
            if output_dir is not None:
                path = os.path.join(output_dir, f"predictions_{_file_safe(name)}_seed{seed}.jsonl")
                _write_predictions(path, records, texts, predictions, per_example)
        results[name] = {
            metric: {
                "mean": float(np.mean(list(per_seed[metric].values()))),
                "std": float(np.std(list(per_seed[metric].values()), ddof=0)),
                "per_seed": per_seed[metric],
            }
            for metric in (*METRICS, *GENERATION_STATS)
        }
        results[name]["num_records"] = len(records)
        if keep_per_example:
            results[name]["per_example"] = per_example_scores
        logger.info(
            "%s: ROUGE-L %.2f ± %.2f, EM %.2f ± %.2f, stopped %.0f%%", name, results[name]["rougeL"]["mean"],
            results[name]["rougeL"]["std"], results[name]["exact_match"]["mean"], results[name]["exact_match"]["std"],
            100 * results[name]["stopped"]["mean"],
        )

    if output_dir is not None:
        with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"results": results, "seeds": seeds, "settings": asdict(settings)}, f, indent=2)
            f.write("\n")
        with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(results_markdown(results) + "\n")
    return results


def _write_predictions(path: str, records: Sequence[EvalRecord], texts: Sequence[str],
                       predictions: Sequence[Prediction], per_example: Mapping[str, Sequence[float]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (record, text, prediction) in enumerate(zip(records, texts, predictions)):
            row = {"prompt": text, "references": record.references, "prediction": prediction.text,
                   "raw_prediction": prediction.raw_text, "stopped": prediction.stopped,
                   "new_tokens": prediction.new_tokens}
            row.update({metric: per_example[metric][i] for metric in METRICS})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def results_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table, one row per dataset: ROUGE-L and EM as ``mean ± std`` over the seeds, the share of
    responses that stopped at an end token (``–`` for results written before it was recorded), records, seeds."""
    lines = [
        "| dataset | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " | stopped | records | seeds |",
        "|---|" + "---:|" * len(METRICS) + "---:|---:|---:|",
    ]
    for name, result in results.items():
        cells = [f"{result[m]['mean']:.2f} ± {result[m]['std']:.2f}" for m in METRICS]
        stopped = f"{100 * result['stopped']['mean']:.0f}%" if "stopped" in result else "–"
        seeds = len(result[METRICS[0]]["per_seed"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {stopped} | {result['num_records']} | {seeds} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Loading a model to evaluate
# ----------------------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model_for_eval(
    path: str,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    base_model: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` ready for generation, from a full model folder / hub id or a LoRA adapter folder.

    A folder with ``adapter_config.json`` is a ``peft`` adapter: its base model (``base_model`` when given, else
    the adapter config's ``base_model_name_or_path``; a relative path that does not exist from the working directory
    is also tried relative to the adapter folder) is loaded with :func:`eakd_llm.models.loading.load_causal_lm`, the
    adapter applied and merged (``merge_and_unload``) so generation runs at full speed. The tokenizer comes from the
    adapter folder when it has one, else from the base model (:func:`eakd_llm.models.loading.load_tokenizer`). The model
    is moved to ``device`` (default: CUDA when available, else CPU) and put in eval mode.
    """
    from ..models.loading import load_causal_lm, load_tokenizer

    local = os.path.expanduser(path)
    adapter_config_path = os.path.join(local, "adapter_config.json")
    if os.path.isdir(local) and os.path.isfile(adapter_config_path):
        from peft import PeftModel

        with open(adapter_config_path, encoding="utf-8") as f:
            adapter_config = json.load(f)
        base = base_model or adapter_config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter_config_path} names no base_model_name_or_path; pass the base model explicitly")
        if not base_model and not os.path.exists(base) and os.path.exists(os.path.join(local, base)):
            base = os.path.join(local, base)
        logger.info("%s is a LoRA adapter on %s; merging it", path, base)
        model = load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code, key="base model")
        has_tokenizer = any(os.path.isfile(os.path.join(local, name)) for name in _TOKENIZER_FILES)
        tokenizer = load_tokenizer(local if has_tokenizer else base, trust_remote_code=trust_remote_code, key="model")
        model = PeftModel.from_pretrained(model, local).merge_and_unload()
    else:
        model = load_causal_lm(local if os.path.exists(local) else path, dtype=dtype,
                               trust_remote_code=trust_remote_code, key="model")
        tokenizer = load_tokenizer(local if os.path.exists(local) else path, trust_remote_code=trust_remote_code,
                                   key="model")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

EVAL_USAGE = "eakd-llm eval --model PATH --data NAME=SOURCE [--data NAME=SOURCE ...] --output-dir DIR [options]"
_GENERIC_STEMS = {"test", "valid", "validation", "dev", "train", "data", "eval"}


def _parse_data_arg(value: str) -> tuple[str, str]:
    """``NAME=SOURCE``; a bare SOURCE is named after its file (or its folder for generic names like valid.jsonl)."""
    if "=" in value and not os.path.exists(value):
        name, source = value.split("=", 1)
        if not name or not source:
            raise ConfigError(f"--data expects NAME=SOURCE, got {value!r}")
        return name, source
    stripped = value.rstrip("/")
    stem = os.path.splitext(os.path.basename(stripped))[0]
    if stem.lower() in _GENERIC_STEMS and os.path.dirname(stripped):
        stem = os.path.basename(os.path.dirname(stripped))
    return stem or "data", value


def build_eval_parser() -> argparse.ArgumentParser:
    defaults = GenerationSettings()
    parser = argparse.ArgumentParser(
        prog="eakd-llm eval",
        description="Evaluate a model (or a LoRA adapter) on instruction benchmarks with the MiniLLM/DistiLLM "
        "protocol: sampled responses scored with ROUGE-L and exact match against each record's references, "
        "mean ± std over seeds.",
    )
    parser.add_argument("--model", required=True, help="model folder, hub id, or LoRA adapter folder")
    parser.add_argument("--base-model", default=None, help="base model of a LoRA adapter (default: from its config)")
    parser.add_argument(
        "--data", action="append", required=True, metavar="NAME=SOURCE",
        help="a benchmark: NAME=FILE.jsonl, NAME=FOLDER (reads <split>.jsonl) or NAME=HUB_ID; repeatable. Standard "
        f"names: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--split", default="test", help="split read from folders and hub datasets (default: test)")
    parser.add_argument(
        "--format", default="auto", choices=EVAL_FORMATS,
        help="record format: raw (instruction/input/output), processed (prompt/output), messages (chat turns) or "
        "auto (default: messages, else processed when a prompt column exists, else raw)",
    )
    parser.add_argument(
        "--prompt-format", default="auto", choices=PROMPT_FORMATS,
        help="how prompts are written: instruction (MiniLLM template), raw (the instruction as is), chat (the "
        "tokenizer's chat template with its generation prompt) or auto (default: chat for messages records, "
        "instruction otherwise)",
    )
    parser.add_argument("--instruction-column", default="instruction")
    parser.add_argument("--context-column", default="input")
    parser.add_argument("--output-column", default=None,
                        help="reference column (default: output, or response when there is no output column)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--messages-column", default="messages")
    parser.add_argument("--references-column", default="references")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N records of each dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help=f"generation seeds (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables top-k filtering (default)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size)
    parser.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="prompt + response tokens")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument(
        "--budget", default=defaults.budget, choices=BUDGETS,
        help="new tokens per record: fixed = max_length - max_prompt_length for every record (MiniLLM, default); "
        "remaining = max_length - len(prompt)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--output-dir", required=True, help="where predictions and results are written")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--debug", action="store_true", help="raise errors with their traceback")
    return parser


def eval_main(argv: Sequence[str]) -> int:
    """``eakd-llm eval``: load the model and the benchmarks, evaluate, write results, print the markdown table.

    Returns 0, or 2 with a one-line ``eakd-llm: error: ...`` on stderr for a configuration error.
    """
    args = build_eval_parser().parse_args(list(argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        settings = GenerationSettings(
            max_prompt_length=args.max_prompt_length,
            max_length=args.max_length,
            max_new_tokens=args.max_new_tokens,
            budget=args.budget,
            do_sample=not args.greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            batch_size=args.batch_size,
        )
        settings.validate()
        datasets: dict[str, list[EvalRecord]] = {}
        for value in args.data:
            name, source = _parse_data_arg(value)
            if name in datasets:
                raise ConfigError(f"dataset name {name!r} given twice in --data")
            datasets[name] = load_eval_records(
                source,
                split=args.split,
                fmt=args.format,
                instruction_column=args.instruction_column,
                context_column=args.context_column,
                output_column=args.output_column,
                prompt_column=args.prompt_column,
                max_samples=args.max_samples,
                references_column=args.references_column,
                messages_column=args.messages_column,
                prompt_format=args.prompt_format,
            )
        model, tokenizer = load_model_for_eval(
            args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code, device=args.device,
            base_model=args.base_model,
        )
        results = evaluate_model(model, tokenizer, datasets, seeds=args.seeds, settings=settings,
                                 output_dir=args.output_dir)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    return 0
