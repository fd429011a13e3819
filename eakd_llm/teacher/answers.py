"""``eakd-llm generate-data``: a teacher's answers to a prompt file, as chat records to train students on.

Each prompt (``{"id", "prompt", "family"?, "split"?}`` a line) becomes one user turn (after an optional system turn),
rendered with the teacher's chat template and its generation prompt, tokenized without a second set of special tokens
(as evaluation does, :mod:`eakd_llm.data.prompts`), and answered through the shared generation code
(:func:`eakd_llm.models.generation.generate_token_ids`, greedy by default) up to the template's end of turn or the
new-token budget. Records are the project's messages format plus metadata::

    {"id": ..., "family": ..., "messages": [{"role": "user", ...}, {"role": "assistant", ...}],
     "stopped": true, "new_tokens": 17}

``stopped``: the answer ended at an end token (false: the budget ran out, the answer is truncated); ``new_tokens``:
tokens generated, the end token included.

The output folder holds ``settings.json``, ``generations.jsonl`` (every answered prompt, appended batch by batch: an
interrupted run resumes from it) and one ``<split>.jsonl`` per split of the prompt file. ``settings.json`` binds the
folder to what changes the answers: every byte of the teacher's weights (:mod:`eakd_llm.models.fingerprint`; not its
path, so a moved teacher resumes), the tokenizer (vocabulary, chat template, end ids), dtype and device type, the
generation settings and the prompt file's sha256. A run with other settings is refused, naming them, never mixed.
Sampled answers are seeded per prompt (:func:`row_seed`), so a resume or another ``--batch-size`` samples the same
answer for a prompt (up to the rounding of differently padded batches).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .._atomic import write_text_atomic
from ..config.eakd_config import ConfigError
from ..data.prompts import chat_prompt
from ..models.fingerprint import file_sha256, fingerprint_weights
from ..models.generation import GenerationSettings, encode_prompt, end_token_ids, generate_token_ids

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATIONS_FILE",
    "SETTINGS_FILE",
    "SPLITS",
    "DataSettings",
    "PromptRecord",
    "file_sha256",
    "generate_data_main",
    "generate_teacher_data",
    "read_prompt_file",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SETTINGS_FILE = "settings.json"
GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FORMAT = 2  # 2: binds every byte of the weights, dtype, device, tokenizer and end ids
# Recorded in settings.json but not compared: where the teacher was (a moved teacher is the same teacher) and the
# per-file record that spares re-hashing unchanged weight files.
UNBOUND_KEYS = ("teacher", "teacher_files")


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompt file."""

    id: str
    prompt: str
    family: str = ""
    split: str = "train"


@dataclass
class DataSettings:
    """How the teacher answers: greedy when ``temperature`` is 0, else sampled (``top_p``, seeded by ``seed``).

    ``max_prompt_length``: longer rendered prompts are refused (not cut); ``no_repeat_ngram_size`` 0 keeps the
    teacher's own greedy answers; ``system``: a system turn before every prompt (None: the template's default).
    ``batch_size`` is not part of what a folder is bound to: a resumed run may use another.
    """

    max_new_tokens: int = 128
    max_prompt_length: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    no_repeat_ngram_size: int = 0
    system: str | None = None
    batch_size: int = 16

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.system is not None and not self.system.strip():
            raise ConfigError("--system is empty: give the text of the system turn or leave it out")
        self.generation().validate()

    def generation(self) -> GenerationSettings:
        """The shared generation settings these stand for."""
        return GenerationSettings(
            max_prompt_length=self.max_prompt_length, max_length=self.max_prompt_length + self.max_new_tokens,
            max_new_tokens=self.max_new_tokens, budget="fixed", do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0, top_p=self.top_p, top_k=0,
            no_repeat_ngram_size=self.no_repeat_ngram_size, batch_size=self.batch_size,
        )

    def identity(self) -> dict[str, Any]:
        """What a finished record depends on (the batch size aside)."""
        values = asdict(self)
        values.pop("batch_size")
        if self.temperature == 0:  # greedy: the sampling knobs change nothing
            values.update(top_p=None, seed=None)
        return values


# ----------------------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------------------


def _prompt_record(row: Any, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with id and prompt, got {type(row).__name__}")
    for key in ("id", "prompt"):
        if key not in row:
            raise ConfigError(f"{where}: no {key!r} field (a prompt record needs id and prompt; family and split "
                              "are optional)")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)) or str(row["id"]) == "":
        raise ConfigError(f"{where}: id must be a non-empty string or an integer, got {row['id']!r}")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ConfigError(f"{where}: prompt must be a non-empty string, got {row['prompt']!r}")
    split = row.get("split", "train")
    if split not in SPLITS:
        raise ConfigError(f"{where}: split={split!r} is not allowed; choose one of: {', '.join(SPLITS)}")
    family = row.get("family", "")
    if not isinstance(family, str):
        raise ConfigError(f"{where}: family must be a string, got {family!r}")
    return PromptRecord(str(row["id"]), row["prompt"], family, split)


def read_prompt_file(path: str) -> list[PromptRecord]:
    """The records of a ``.jsonl`` prompt file; every problem is a one-line :class:`ConfigError` naming the line."""
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path!r} is not a file")
    if not path.lower().endswith(".jsonl"):
        raise ConfigError(f"--prompts {path!r}: expected a .jsonl file (one JSON object a line)")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON: {err}") from err
            record = _prompt_record(row, where)
            if record.id in seen:
                raise ConfigError(f"{where}: id {record.id!r} was already used on line {seen[record.id]}; ids must "
                                  "be unique")
            seen[record.id] = number
            records.append(record)
    if not records:
        raise ConfigError(f"--prompts {path!r} holds no prompt")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------


def conversation(record: PromptRecord, system: str | None) -> list[dict[str, str]]:
    """The turns before the answer: an optional system turn, then the prompt as the user's turn."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    return turns + [{"role": "user", "content": record.prompt}]


def rendered_length(record: PromptRecord, tokenizer, system: str | None) -> int:
    """Tokens of a prompt once rendered as a chat turn (with the system turn and the generation prompt)."""
    return len(tokenizer(chat_prompt(conversation(record, system), tokenizer), add_special_tokens=False)["input_ids"])


def encode_prompts(records: Sequence[PromptRecord], tokenizer, settings: DataSettings) -> list[list[int]]:
    """Chat-rendered prompt ids (the template's special tokens once); a prompt over ``max_prompt_length`` tokens is
    refused with its id rather than cut."""
    out = []
    for record in records:
        text = chat_prompt(conversation(record, settings.system), tokenizer)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(full) > settings.max_prompt_length:
            raise ConfigError(f"prompt {record.id!r} is {len(full)} tokens once rendered, more than "
                              f"--max-prompt-length {settings.max_prompt_length}; raise it or shorten the prompt")
        out.append(encode_prompt(tokenizer, text, settings.max_prompt_length, add_special_tokens=False))
    return out


def answer_record(record: PromptRecord, ids: Sequence[int], end_ids: Sequence[int], tokenizer,
                  system: str | None) -> dict[str, Any]:
    """The record of one generated answer (``ids`` cut after the first end token, which is kept)."""
    stopped = bool(ids) and ids[-1] in end_ids
    text = tokenizer.decode(list(ids[:-1] if stopped else ids), skip_special_tokens=True).strip()
    return {"id": record.id, "family": record.family, "split": record.split,
            "messages": conversation(record, system) + [{"role": "assistant", "content": text}],
            "stopped": stopped, "new_tokens": len(ids)}


def _read_generations(path: str, wanted: Mapping[str, PromptRecord]) -> dict[str, dict[str, Any]]:
    """Finished records of an earlier run: those of the prompt file's ids. Records end at ``\n`` alone (a prompt or
    answer may hold U+2028, U+2029 or U+0085, which ``str.splitlines`` would split on). Bytes after the last ``\n``
    are a torn append (even when they parse: the newline never made it) and are cut from the file, so the next
    append starts on a line of its own; those records are generated again."""
    done: dict[str, dict[str, Any]] = {}
    if not os.path.isfile(path):
        return done
    with open(path, "rb") as handle:
        data = handle.read()
    complete, newline, torn = data.rpartition(b"\n")
    if torn:
        os.truncate(path, len(complete) + len(newline))
    lines = complete.split(b"\n") if newline else []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}:{number}: not a valid JSON record ({err}); the folder is damaged: use another "
                              "--output") from err
        if row.get("id") in wanted:
            done[row["id"]] = row
    return done


def _differing(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The (dotted) keys whose values differ between two settings dicts."""
    keys = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            keys += _differing(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def _read_settings(output: str) -> dict[str, Any] | None:
    path = os.path.join(output, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON; use another --output") from err


def _bind_folder(output: str, bound: dict[str, Any], recorded: dict[str, Any]) -> None:
    """Write ``settings.json`` (``bound`` plus ``recorded``), or check that the folder's ``bound`` values are the same
    (else a one-line refusal naming the keys) and refresh its ``recorded`` ones."""
    existing = _read_settings(output)
    if existing is not None:
        have = {k: v for k, v in existing.items() if k not in UNBOUND_KEYS}
        if have != bound:
            keys = _differing(bound, have)
            raise ConfigError(f"--output {output!r} holds answers generated with other settings ({', '.join(keys)} "
                              "differ); nothing was changed: use another --output folder")
    elif os.path.isdir(output) and os.listdir(output):
        raise ConfigError(f"--output {output!r} is not empty and holds no {SETTINGS_FILE}; use an empty or new folder")
    os.makedirs(output, exist_ok=True)
    write_text_atomic(os.path.join(output, SETTINGS_FILE), json.dumps({**bound, **recorded}, indent=2) + "\n")


def _end_ids(teacher: str, tokenizer, trust_remote_code: bool) -> list[int]:
    """The ids generation stops at, read without loading the weights: the model's generation config is its
    ``generation_config.json``, else the one its config implies (as ``from_pretrained`` does)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(teacher)
    except OSError:
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(teacher,
                                                                               trust_remote_code=trust_remote_code))
    return end_token_ids(tokenizer, SimpleNamespace(generation_config=config))


def row_seed(seed: int, record_id: str) -> int:
    """The sampling seed of one prompt: a hash of the run's seed and the prompt's id, so a prompt's answer depends
    on neither its batch nor its position, and seeds ``s`` and ``s + 1`` share no draws."""
    digest = hashlib.sha256(f"{seed}\0{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _write_splits(output: str, records: Sequence[PromptRecord], done: Mapping[str, dict[str, Any]],
                  drop_truncated: bool) -> dict[str, dict[str, Any]]:
    """``<split>.jsonl`` in prompt-file order (the ``split`` key left out: the file names it); per split: records
    written, truncated answers and those left out."""
    summary: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        rows = [done[r.id] for r in records if r.split == split]
        if not rows:
            continue
        kept = [row for row in rows if row["stopped"] or not drop_truncated]
        path = os.path.join(output, f"{split}.jsonl")
        write_text_atomic(path, "".join(json.dumps({k: v for k, v in row.items() if k != "split"},
                                                   ensure_ascii=False) + "\n" for row in kept))
        truncated = sum(not row["stopped"] for row in rows)
        summary[split] = {"file": path, "records": len(kept), "truncated": truncated,
                          "dropped": len(rows) - len(kept), "stopped_share": 1 - truncated / len(rows)}
    return summary


def generate_teacher_data(
    teacher: str,
    prompts_file: str,
    output: str,
    settings: DataSettings | None = None,
    drop_truncated: bool = False,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Answer every prompt of ``prompts_file`` with ``teacher`` into ``output`` (see the module docstring); returns
    the summary also written to ``summary.json`` (per split: records, truncated, dropped, stopped share; prompts
    generated now and reused; seconds).

    ``drop_truncated``: leave answers that ran out of budget out of the split files (a chat template would close them
    with an end of turn the teacher never wrote); they stay in ``generations.jsonl``.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from ..models.loading import load_causal_lm, load_tokenizer
    from .cache import resolved_teacher, tokenizer_fingerprint

    settings = settings or DataSettings()
    settings.validate()
    records = read_prompt_file(prompts_file)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output!r} exists and is not a folder")
    tokenizer = load_tokenizer(teacher, trust_remote_code, key="TEACHER")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"TEACHER {teacher!r}: its tokenizer has no chat_template, so prompts cannot be written as "
                          "chat turns")
    encoded = dict(zip((r.id for r in records), encode_prompts(records, tokenizer, settings)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ends = _end_ids(teacher, tokenizer, trust_remote_code)
    model = None
    weights = fingerprint_weights(teacher, (_read_settings(output) or {}).get("teacher_files"))
    if weights is None:  # a hub id not downloaded yet: load (download) it first, then fingerprint what arrived
        model = load_causal_lm(teacher, dtype, trust_remote_code, key="TEACHER")
        weights = fingerprint_weights(teacher)
    _bind_folder(output, {
        "format": SETTINGS_FORMAT, "teacher_fingerprint": weights.digest if weights else None,
        "prompts_sha256": file_sha256(prompts_file), "generation": settings.identity(), "dtype": dtype,
        "device": torch.device(device).type,
        "tokenizer": {"vocabulary": tokenizer_fingerprint(tokenizer), "end_ids": ends,
                      "chat_template_sha256": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()},
    }, {"teacher": resolved_teacher(teacher), "teacher_files": weights.files if weights else None})
    log_path = os.path.join(output, GENERATIONS_FILE)
    wanted = {r.id: r for r in records}
    done = _read_generations(log_path, wanted)
    pending = [r for r in records if r.id not in done]
    started = time.perf_counter()
    if pending:
        model = model or load_causal_lm(teacher, dtype, trust_remote_code, key="TEACHER")
        model.to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
        generation = settings.generation()
        progress = tqdm(total=len(pending), desc="Teacher answers", unit="prompt", disable=not show_progress)
        with open(log_path, "a", encoding="utf-8") as log:
            for start in range(0, len(pending), settings.batch_size):
                batch = pending[start:start + settings.batch_size]
                answers = generate_token_ids(model, [encoded[r.id] for r in batch], generation, ends, pad,
                                             keep_eos=True, row_seeds=[row_seed(settings.seed, r.id) for r in batch])
                rows = [answer_record(r, ids, ends, tokenizer, settings.system) for r, ids in zip(batch, answers)]
                log.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                log.flush()
                done.update((row["id"], row) for row in rows)
                progress.update(len(batch))
        progress.close()
    summary = {"splits": _write_splits(output, records, done, drop_truncated), "generated": len(pending),
               "reused": len(records) - len(pending), "seconds": time.perf_counter() - started,
               "drop_truncated": drop_truncated}
    write_text_atomic(os.path.join(output, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_generate_data_parser() -> argparse.ArgumentParser:
    defaults = DataSettings()
    parser = argparse.ArgumentParser(
        prog="eakd-llm generate-data",
        description="Answer a prompt file with a teacher model (its chat template, greedy by default) and write the "
        "answers as chat records (messages format, with id, family, stopped, new_tokens) into one <split>.jsonl per "
        "split. Resumable: a second run with the same settings keeps the finished answers.",
    )
    parser.add_argument("teacher", help="teacher model folder (or hub id) with a chat template")
    parser.add_argument("--prompts", required=True, help="prompt file: .jsonl records with id, prompt and optional "
                        "family and split (train, validation or test; default train)")
    parser.add_argument("--output", required=True, help="folder for settings.json, generations.jsonl, <split>.jsonl")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="answer budget in tokens")
    parser.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length,
                        help="longest rendered prompt in tokens (longer ones are refused)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="0 (default) = greedy; > 0 samples at this temperature")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus filtering when sampling")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size,
                        help="forbid repeating n-grams of this size (default 0: the teacher's own answers)")
    parser.add_argument("--system", default=None, help="a system turn before every prompt (default: none; the "
                        "chat template may add its own)")
    parser.add_argument("--drop-truncated", action="store_true", help="leave answers that ran out of budget out of "
                        "the split files (they stay in generations.jsonl)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def generate_data_main(argv: Sequence[str]) -> int:
    """0 on success, 2 with one ``eakd-llm: error: ...`` line for a bad input."""
    args = build_generate_data_parser().parse_args(list(argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    settings = DataSettings(max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            no_repeat_ngram_size=args.no_repeat_ngram_size, system=args.system,
                            batch_size=args.batch_size)
    try:
        summary = generate_teacher_data(args.teacher, args.prompts, args.output, settings, args.drop_truncated,
                                        args.dtype, args.device, args.trust_remote_code, not args.no_progress)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    for split, entry in summary["splits"].items():
        print(f"{split}: {entry['records']} records -> {entry['file']} ({entry['truncated']} truncated, "
              f"{entry['dropped']} left out)")
    print(f"{summary['generated']} answers generated, {summary['reused']} reused, {summary['seconds']:.0f} s")
    return 0
