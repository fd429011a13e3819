"""Record formats below training and evaluation: reading records, rendering prompts, the end of a chat turn.

Training (:mod:`eakd_llm.data.dataset`) and evaluation (:mod:`eakd_llm.evaluation.protocol`) both import this
module and it imports neither, so the two share one prompt template, one chat rendering and one record loader without
an import cycle.

* :func:`load_split` reads a split of a hub dataset, a local data file or a folder of split files;
* :func:`format_instruction_prompt` is the MiniLLM/DistiLLM instruction template;
* :func:`render_chat` splits a conversation into the prompt (with the generation prompt) and the last assistant turn,
  which ends at the template's end-of-turn token: what the template writes after it (ChatML's newline after
  ``<|im_end|>``) is cut, so training targets end where generation stops (:func:`chat_end_token_id`);
* :func:`load_eval_records` reads benchmark records of every format training takes into :class:`EvalRecord`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.eakd_config import ConfigError, looks_like_local_path

PROMPT_TEMPLATE_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_TEMPLATE_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DATA_FILE_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EVAL_FORMATS: tuple[str, ...] = ("auto", "raw", "processed", "messages")
PROMPT_FORMATS: tuple[str, ...] = ("auto", "chat", "instruction", "raw")
# Reference columns tried when none is named: MiniLLM's benchmarks use "output", training data "response".
DEFAULT_OUTPUT_COLUMNS: tuple[str, ...] = ("output", "response")


def format_instruction_prompt(instruction: str, context: str | None = None) -> str:
    """The MiniLLM/DistiLLM prompt for an instruction and its optional context."""
    if context and context.strip():
        return PROMPT_TEMPLATE_WITH_CONTEXT.format(instruction=instruction, context=context)
    return PROMPT_TEMPLATE_NO_CONTEXT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------------------------
# Loading a split
# ----------------------------------------------------------------------------------------------------------------


def _local_data_files(path: str) -> tuple[str, dict[str, list[str]]]:
    """Builder name and ``{split: files}`` for a local file (its split is ``train``) or a folder of split files."""
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in DATA_FILE_EXTENSIONS:
            raise ConfigError(
                f"dataset_name: unsupported file type {ext!r} ({path}); use one of {', '.join(DATA_FILE_EXTENSIONS)}"
            )
        return DATA_FILE_EXTENSIONS[ext], {"train": [path]}
    files: dict[str, list[str]] = {}
    builders = set()
    for name in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in DATA_FILE_EXTENSIONS:
            files.setdefault(stem, []).append(os.path.join(path, name))
            builders.add(DATA_FILE_EXTENSIONS[ext.lower()])
    if not files:
        raise ConfigError(f"dataset_name: folder {path} has no .jsonl, .json or .parquet files")
    if len(builders) > 1:
        raise ConfigError(f"dataset_name: folder {path} mixes json and parquet files; keep one kind")
    return builders.pop(), files


def load_split(dataset_name: str, split: str, dataset_config: str | None = None):
    """Load one split of a hub dataset, a local data file or a folder of ``<split>.jsonl``-style files."""
    import datasets

    if os.path.exists(dataset_name):
        builder, files = _local_data_files(dataset_name)
        if split not in files:
            raise ConfigError(
                f"split {split!r} not found in {dataset_name}; available splits: {', '.join(sorted(files))}"
            )
        for path in files[split]:
            if os.path.getsize(path) == 0:
                raise ConfigError(f"the {split} split of {dataset_name} is empty: {path} has no records")
        try:
            return datasets.load_dataset(builder, data_files={split: files[split]}, split=split)
        except Exception as err:  # malformed JSON lines, unreadable parquet, ...: name the file, not the internals
            raise ConfigError(
                f"cannot read the {split} split from {', '.join(files[split])}: {type(err).__name__}: {err}"
            ) from err
    try:
        return datasets.load_dataset(dataset_name, dataset_config, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise ConfigError(f"split {split!r} not found in dataset {dataset_name}: {err}") from err
        raise
    except FileNotFoundError as err:
        raise ConfigError(
            f"dataset_name: {dataset_name!r} is neither a local path nor a reachable hub dataset"
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# Chat rendering and the end of a turn
# ----------------------------------------------------------------------------------------------------------------


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones and every added token marked special (chat markers)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def _check_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat records need a tokenizer with a chat_template; this tokenizer has none")


def chat_prompt(messages: Sequence[Mapping[str, Any]], tokenizer) -> str:
    """The conversation rendered with the tokenizer's chat template and its generation prompt (the assistant's
    header): the text a model completes. It holds the template's own special tokens (BOS where the template writes
    it), so it is tokenized with ``add_special_tokens=False``."""
    _check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def cut_after_end_of_turn(response: str, tokenizer) -> tuple[str, bool]:
    """``(response, ends_turn)``: a rendered assistant turn cut after its end-of-turn token.

    When the turn, trailing whitespace aside, ends with special tokens, the first of that trailing run is the end of
    the turn (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``; Phi-3 writes
    ``<|end|>\n<|endoftext|>`` after the last answer and generation stops at ``<|end|>``), and everything after it
    is cut: generation stops at that token, so nothing after it is ever generated. Otherwise the response is returned
    as is (``ends_turn`` False: an EOS is appended as for any plain response).
    """
    stripped = response.rstrip()
    special = special_token_ids(tokenizer)
    ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] not in special:
        return response, False
    markers = sorted({tokenizer.convert_ids_to_tokens(i) for i in special} - {None, ""}, key=len, reverse=True)
    end = len(stripped)
    rest = stripped
    while True:  # peel special tokens and whitespace off the end; the last one peeled ends the turn
        marker = next((m for m in markers if rest.endswith(m)), None)
        if marker is None:
            break
        rest = rest[:-len(marker)]
        end = len(rest) + len(marker)
        rest = rest.rstrip()
    return stripped[:end], True


def render_chat(messages: Sequence[Mapping[str, Any]], tokenizer, column: str = "messages") -> tuple[str, str]:
    """``(prompt, response)`` of a conversation ending with the assistant's answer.

    ``prompt`` is :func:`chat_prompt` of the turns before the answer; ``response`` is the answer as the template
    writes it, up to and including its end-of-turn token (:func:`cut_after_end_of_turn`).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(
            f"column {column!r}: every conversation must end with an assistant message (the response "
            f"to learn); got roles {[m.get('role') for m in messages or []]}"
        )
    prompt = chat_prompt(messages[:-1], tokenizer)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            "the chat template renders the conversation differently from its prompt plus generation prompt, so the "
            "response cannot be separated; use the prompt_response format instead"
        )
    return prompt, cut_after_end_of_turn(full[len(prompt):], tokenizer)[0]


def chat_end_token_id(tokenizer) -> int | None:
    """The chat template's end-of-turn token id (the last target of every chat record), or None (no template, or a
    template whose turns do not end with a special token). Found by rendering a one-turn probe conversation."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        _, response = render_chat(probe, tokenizer)
    except Exception:  # a template that refuses the probe (e.g. requires a system turn): no end-of-turn known
        return None
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return int(ids[-1]) if ids and ids[-1] in special_token_ids(tokenizer) else None


# ----------------------------------------------------------------------------------------------------------------
# Evaluation records
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalRecord:
    """One benchmark record and its acceptable answers (at least one).

    ``prompt`` is the text a model completes. A chat record (``messages`` set: the conversation before the answer)
    is rendered with the tokenizer's chat template when it is evaluated (:func:`render_eval_prompt`); its ``prompt``
    is then the last user turn (what decontamination compares).
    """

    prompt: str
    references: list[str]
    messages: list[dict[str, Any]] | None = None


def render_eval_prompt(record: EvalRecord, tokenizer) -> tuple[str, bool]:
    """``(text, has_special_tokens)`` a model completes for ``record``: the chat rendering of a chat record (its
    special tokens already written by the template), else ``record.prompt`` (tokenized with the tokenizer's)."""
    if record.messages is not None:
        return chat_prompt(record.messages, tokenizer), True
    return record.prompt, False


def _read_json_records(path: str) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` file (one object a line) or a ``.json`` file (a list, or ``{"data": [...]}``)."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            records = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{number}: not valid JSON: {err}") from err
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: not valid JSON: {err}") from err
            records = data.get("data") if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path}: expected JSON objects (one per record)")
    return records


def _split_file(folder: str, split: str) -> str:
    for ext in (".jsonl", ".json"):
        candidate = os.path.join(folder, split + ext)
        if os.path.isfile(candidate):
            return candidate
    present = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jsonl", ".json")))
    raise ConfigError(
        f"split {split!r} not found in {folder} (no {split}.jsonl or {split}.json); "
        f"files present: {', '.join(present) or 'none'}"
    )


def _load_raw_records(source: str, split: str) -> list[dict[str, Any]]:
    if os.path.isfile(source):
        if not source.lower().endswith((".jsonl", ".json")):
            raise ConfigError(f"{source}: evaluation data must be a .jsonl or .json file (or a folder of them)")
        return _read_json_records(source)
    if os.path.isdir(source):
        return _read_json_records(_split_file(source, split))
    if looks_like_local_path(source):
        raise ConfigError(f"evaluation data {source!r} does not exist")
    # A hub dataset id (needs network access or a populated datasets cache).
    return [dict(row) for row in load_split(source, split)]


@dataclass
class _Columns:
    instruction: str
    context: str
    prompt: str
    references: str
    messages: str


def _references(row: Mapping[str, Any], columns: _Columns, outputs: Sequence[str]) -> list[str]:
    """The first non-empty of the references and output columns (an empty answer string only when all are empty)."""
    values = [row.get(c) for c in (columns.references, *outputs)]
    value = next((v for v in values if v not in (None, "", [])), next((v for v in values if v is not None), None))
    return [str(v) for v in value] if isinstance(value, list) else [] if value is None else [str(value)]


def _text_record(row: Mapping[str, Any], fmt: str, prompt_format: str, columns: _Columns) -> tuple[str, list | None]:
    """``(prompt, messages)`` of a raw (instruction) or processed (prompt) record in ``prompt_format``."""
    if fmt == "processed":
        text = str(row.get(columns.prompt) or "").replace("<n>", "\n")
        if prompt_format == "chat":
            return text, [{"role": "user", "content": text}]
        return text, None
    instruction, context = str(row.get(columns.instruction) or ""), str(row.get(columns.context) or "")
    if prompt_format in ("auto", "instruction"):
        return format_instruction_prompt(instruction, context), None
    text = f"{instruction}\n\n{context}" if context.strip() else instruction
    return text, ([{"role": "user", "content": text}] if prompt_format == "chat" else None)


def _chat_record(row: Mapping[str, Any], columns: _Columns, index: int, source: str) -> tuple[list, list[str]]:
    """``(messages before the answer, default references)`` of a messages record: a trailing assistant turn is the
    reference and leaves the prompt."""
    messages = row.get(columns.messages)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError(f"evaluation data {source!r}: record {index}: {columns.messages!r} must be a list of "
                          "{role, content} objects")
    if messages and messages[-1].get("role") == "assistant":
        return [dict(m) for m in messages[:-1]], [str(messages[-1].get("content") or "")]
    return [dict(m) for m in messages], []


def _detect_eval_format(fmt: str, columns: Sequence[str], names: _Columns) -> str:
    if fmt != "auto":
        return fmt
    if names.messages in columns:
        return "messages"
    return "processed" if names.prompt in columns else "raw"


def _check_eval_columns(source: str, fmt: str, columns: Sequence[str], names: _Columns, outputs: Sequence[str]):
    text_column, option = {
        "processed": (names.prompt, "prompt_column"),
        "raw": (names.instruction, "instruction_column"),
        "messages": (names.messages, "messages_column"),
    }[fmt]
    if text_column not in columns:
        raise ConfigError(
            f"evaluation data {source!r} ({fmt} format) has no column {text_column!r} (set by {option}); "
            f"columns present: {', '.join(columns)}"
        )
    if fmt != "messages" and not any(c in columns for c in (*outputs, names.references)):
        raise ConfigError(
            f"evaluation data {source!r} has no reference column: none of {', '.join(map(repr, outputs))} (set by "
            f"output_column) nor {names.references!r}; columns present: {', '.join(columns)}"
        )


def load_eval_records(
    source: str,
    split: str = "test",
    fmt: str = "auto",
    instruction_column: str = "instruction",
    context_column: str = "input",
    output_column: str | None = None,
    prompt_column: str = "prompt",
    max_samples: int | None = None,
    references_column: str = "references",
    messages_column: str = "messages",
    prompt_format: str = "auto",
) -> list[EvalRecord]:
    """Benchmark records from a ``.jsonl``/``.json`` file, a folder of ``<split>.jsonl`` files, or a Hub dataset id.

    Record formats (``fmt``), every one training takes:

    * ``raw``: ``instruction_column``, optional ``context_column`` and a reference column (MiniLLM's raw files,
      training's instruction format);
    * ``processed``: ``prompt_column`` already templated (MiniLLM's ``<n>`` newline markers are turned back into
      newlines, as its ``PromptDataset`` does) and a reference column (training's prompt_response format);
    * ``messages``: ``messages_column``, chat turns ``[{"role", "content"}, ...]``; a final assistant turn is the
      reference and is left out of the prompt;
    * ``auto``: ``messages`` when that column is present, else ``processed`` when ``prompt_column`` is, else ``raw``.

    How the prompt is written (``prompt_format``): ``instruction`` renders raw records with the MiniLLM template
    (:func:`format_instruction_prompt`, as training does); ``raw`` takes the instruction (a blank line, then the
    context) as is; ``chat`` makes it a user turn for the tokenizer's chat template; ``auto`` is ``chat`` for messages
    records and ``instruction`` otherwise. Processed prompts are used as written except under ``chat``; messages
    records are always chat.

    References: ``references_column`` when present (a list of acceptable answers, e.g. the synthetic tiny splits),
    else ``output_column`` (default: ``output``, or ``response`` as training data names it), a string or a list of
    strings; for messages records the final assistant turn when neither is present. ``max_samples`` keeps the first
    records. A missing column raises :class:`ConfigError` naming the columns present.
    """
    if fmt not in EVAL_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(EVAL_FORMATS)}; got {fmt!r}")
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}; got {prompt_format!r}")
    rows = _load_raw_records(os.path.expanduser(source), split)
    if max_samples is not None:
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
        rows = rows[:max_samples]
    if not rows:
        raise ConfigError(f"evaluation data {source!r} ({split}) has no records")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    names = _Columns(instruction_column, context_column, prompt_column, references_column, messages_column)
    outputs = (output_column,) if output_column else DEFAULT_OUTPUT_COLUMNS
    fmt = _detect_eval_format(fmt, columns, names)
    if fmt == "messages" and prompt_format in ("instruction", "raw"):
        raise ConfigError(f"messages records are rendered with the chat template; prompt_format {prompt_format!r} "
                          "is for instruction or prompt records (use chat or auto)")
    _check_eval_columns(source, fmt, columns, names, outputs)

    records: list[EvalRecord] = []
    for index, row in enumerate(rows):
        references = _references(row, names, outputs)
        if fmt == "messages":
            messages, last_turn = _chat_record(row, names, index, source)
            users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
            prompt, references = (users[-1] if users else ""), references or last_turn
            if not messages:
                raise ConfigError(f"evaluation data {source!r}: record {index} has no turn before its answer")
        else:
            prompt, messages = _text_record(row, fmt, prompt_format, names)
            if not prompt.strip():
                column = prompt_column if fmt == "processed" else instruction_column
                raise ConfigError(f"evaluation data {source!r}: record {index} has an empty {column!r}")
        if not references:
            raise ConfigError(
                f"evaluation data {source!r}: record {index} has no reference answer "
                f"(columns {', '.join(map(repr, outputs))} / {references_column!r})"
            )
        records.append(EvalRecord(prompt=prompt, references=references, messages=messages))
    return records
