"""Loading, rendering and tokenizing instruction data, and the padding collator.

Three record formats are understood:

* ``prompt_response``: a prompt column and a response column, used as they are;
* ``messages``: chat turns ``[{"role": ..., "content": ...}, ...]`` ending with the assistant's answer, rendered with
  the tokenizer's chat template; the answer's targets end at (and include) the template's end-of-turn token, what the
  template writes after it is cut (:func:`eakd_llm.data.prompts.render_chat`, docs/chat.md);
* ``instruction``: instruction / optional context / response records, rendered with the MiniLLM/DistiLLM prompt
  template (the one the EA-KD, MiniLLM and DistiLLM papers train and evaluate with).

Every example becomes ``input_ids`` and ``labels``, with ``-100`` on the prompt so the loss covers response tokens
only; EOS is appended to the response so students learn to stop (a chat answer stops at its end-of-turn token).
Record loading and prompt rendering live in :mod:`eakd_llm.data.prompts`, shared with evaluation.
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config.eakd_config import ConfigError, EAKDConfig
from ..loss.distillation import IGNORE_INDEX
from .prompts import (  # noqa: F401  (DATA_FILE_EXTENSIONS, the templates, load_split: re-exported, once defined here)
    DATA_FILE_EXTENSIONS,
    PROMPT_TEMPLATE_NO_CONTEXT,
    PROMPT_TEMPLATE_WITH_CONTEXT,
    format_instruction_prompt,
    load_eval_records,
    load_split,
    render_chat,
    special_token_ids,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def detect_format(columns: Sequence[str], config: EAKDConfig) -> str:
    """The record format named by ``dataset_format``, or the one the columns imply when it is ``auto``."""
    if config.dataset_format != "auto":
        return config.dataset_format
    if config.messages_column in columns:
        return "messages"
    if config.instruction_column in columns:
        return "instruction"
    return "prompt_response"


def required_columns(fmt: str, config: EAKDConfig, prompt_only: bool = False) -> list[str]:
    if fmt == "messages":
        return [config.messages_column]
    prompt = config.instruction_column if fmt == "instruction" else config.prompt_column
    return [prompt] if prompt_only else [prompt, config.response_column]


def is_prompt_only(columns: Sequence[str], fmt: str, config: EAKDConfig) -> bool:
    """A dataset of prompts without responses (for fully on-policy or seq_kd runs: responses are generated)."""
    return fmt != "messages" and config.response_column not in columns


def check_columns(columns: Sequence[str], fmt: str, config: EAKDConfig, split: str, prompt_only: bool = False) -> None:
    """Raise a :class:`ConfigError` naming the missing column, the key that sets it, and the columns present."""
    keys = {
        config.messages_column: "messages_column",
        config.instruction_column: "instruction_column",
        config.prompt_column: "prompt_column",
        config.response_column: "response_column",
    }
    for column in required_columns(fmt, config, prompt_only):
        if column not in columns:
            hint = ""
            if column == config.response_column and split == config.dataset_train_split:
                hint = ("; a prompt-only dataset (no response column) needs every step's responses generated: "
                        "on_policy_fraction: 1 with no warmup steps, or seq_kd: true (got on_policy_fraction="
                        f"{config.on_policy_fraction}, on_policy_warmup_steps={config.on_policy_warmup_steps}, "
                        f"on_policy_fraction_warmup_steps={config.on_policy_fraction_warmup_steps}, "
                        f"seq_kd={config.seq_kd})")
            raise ConfigError(
                f"{split} data ({fmt} format) has no column {column!r} (set by {keys.get(column, 'config')}); "
                f"columns present: {', '.join(columns)}{hint}"
            )


def render_example(record: Mapping[str, Any], fmt: str, config: EAKDConfig, tokenizer) -> tuple[str, str]:
    """``(prompt_text, response_text)`` of one record in the given format."""
    if fmt == "instruction":
        context = record.get(config.context_column) or ""
        prompt = format_instruction_prompt(str(record[config.instruction_column]), str(context))
        return prompt, str(record[config.response_column])
    if fmt == "prompt_response":
        return str(record[config.prompt_column]), str(record[config.response_column])
    # The answer ends at the template's end-of-turn token: what generation stops at (prompts.render_chat).
    return render_chat(record[config.messages_column], tokenizer, column=config.messages_column)


# ----------------------------------------------------------------------------------------------------------------
# Decontamination: training records whose prompt is an evaluation prompt
# ----------------------------------------------------------------------------------------------------------------

_TEMPLATE = re.compile(r"### Instruction:\n(.*?)\n\n(?:### Input:\n(.*?)\n\n)?### Response:", re.S)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def prompt_key(instruction: str, context: str | None = None) -> str:
    """The normalised prompt compared across datasets: instruction + context, lower-cased, punctuation removed,
    whitespace collapsed (so re-encoded quotes, trailing spaces and casing do not hide a duplicate)."""
    text = f"{instruction} {context or ''}".lower().translate(_PUNCTUATION)
    return " ".join(text.split())


def prompt_text_key(prompt: str) -> str:
    """:func:`prompt_key` of a rendered prompt: the MiniLLM template's instruction and input when it has them (so a
    processed benchmark prompt matches a raw training record), else the whole text."""
    match = _TEMPLATE.search(prompt.replace("<n>", "\n"))
    return prompt_key(match[1], match[2]) if match else prompt_key(prompt)


def record_prompt_key(record: Mapping[str, Any], fmt: str, config: EAKDConfig) -> str:
    """:func:`prompt_key` of a raw training record in its format."""
    if fmt == "instruction":
        return prompt_key(str(record[config.instruction_column]), str(record.get(config.context_column) or ""))
    if fmt == "prompt_response":
        return prompt_text_key(str(record[config.prompt_column]))
    users = [m.get("content", "") for m in record[config.messages_column] or [] if m.get("role") == "user"]
    return prompt_text_key(str(users[-1]) if users else "")


def excluded_prompt_keys(paths: Iterable[str]) -> set[str]:
    """The normalised prompts of evaluation files (raw instruction/input, processed prompt or messages records)."""
    keys: set[str] = set()
    for path in paths:
        if not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"exclude_eval_prompts: {path!r} is not a file (give the evaluation .jsonl/.json files)")
        keys.update(prompt_text_key(record.prompt) for record in load_eval_records(path, split="test"))
    return keys


def drop_eval_prompts(raw, fmt: str, config: EAKDConfig, split: str):
    """``raw`` without the records whose prompt appears in ``config.exclude_eval_prompts`` (logged with the count)."""
    keys = excluded_prompt_keys(config.exclude_eval_prompts)
    kept = raw.filter(lambda record: record_prompt_key(record, fmt, config) not in keys, desc="Decontaminating")
    dropped = len(raw) - len(kept)
    logger.warning("exclude_eval_prompts: dropped %d of %d %s records whose prompt appears in %s (%d prompts)",
                   dropped, len(raw), split, ", ".join(config.exclude_eval_prompts), len(keys))
    if len(kept) == 0:
        raise ConfigError(
            f"exclude_eval_prompts removed every {split} record: the training data is the evaluation data"
        )
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing
# ----------------------------------------------------------------------------------------------------------------


def tokenize_example(
    prompt: str,
    response: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    prompt_has_special_tokens: bool = False,
    chat: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels of one example; the prompt is masked with -100 and EOS ends the response.

    A prompt longer than ``max_prompt_length`` keeps its end (where the instruction meets ``### Response:``) and its
    BOS; the response is then cut to fit ``max_length``. ``chat``: a chat-rendered example, whose prompt holds the
    template's own special tokens and whose response ending with a special token (the template's end of turn,
    :func:`eakd_llm.data.prompts.render_chat`) gets no EOS: the turn ends there, as generation does.
    """
    # A chat template already writes its own special tokens; plain prompts get the tokenizer's (e.g. BOS).
    prompt_ids = tokenizer(prompt, add_special_tokens=not (prompt_has_special_tokens or chat))["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    turn_ended = chat and bool(response_ids) and response_ids[-1] in special_token_ids(tokenizer)
    if eos is not None and eos not in response_ids and not turn_ended:
        response_ids = response_ids + [eos]
    if len(prompt_ids) > max_prompt_length:
        bos = tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[0] == bos else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)):]
    response_ids = response_ids[: max(0, max_length - len(prompt_ids))]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def build_dataset(raw, config: EAKDConfig, tokenizer, split: str = "train", max_samples: int | None = None):
    """Tokenize a raw split into ``input_ids``/``labels``; drop examples with no response token left.

    Raises :class:`ConfigError` for an empty split, a missing column, or when every response was truncated away.
    """
    if max_samples is not None:
        raw = raw.select(range(min(max_samples, len(raw))))
    if len(raw) == 0:
        raise ConfigError(f"the {split} split of {config.dataset_name} is empty")
    fmt = detect_format(raw.column_names, config)
    generated = split == config.dataset_train_split and config.every_step_generates
    prompt_only = generated and is_prompt_only(raw.column_names, fmt, config)
    check_columns(raw.column_names, fmt, config, split, prompt_only)
    first = raw[0]
    for column in required_columns(fmt, config, prompt_only):
        if first[column] in (None, "", []):
            raise ConfigError(f"{split} data: column {column!r} is empty in the first record")
    if config.exclude_eval_prompts and split == config.dataset_train_split:
        raw = drop_eval_prompts(raw, fmt, config, split)

    def encode(record):
        if prompt_only:
            record = {**record, config.response_column: ""}
        prompt, response = render_example(record, fmt, config, tokenizer)
        if prompt_only:  # no response: the prompt alone, every label masked (responses are generated in training)
            example = tokenize_example(prompt, "", tokenizer, config.max_prompt_length + 1, config.max_prompt_length)
            n = prompt_length(example["labels"])
            return {"input_ids": example["input_ids"][:n], "labels": example["labels"][:n]}
        return tokenize_example(
            prompt,
            response,
            tokenizer,
            config.max_length,
            config.max_prompt_length,
            chat=fmt == "messages",
        )

    tokenized = raw.map(encode, remove_columns=raw.column_names, desc=f"Tokenizing {split}")
    if prompt_only:
        logger.info("%s data is prompt-only (no %r column): every response is generated during training", split,
                    config.response_column)
        return tokenized
    # labels[0] is never a target (nothing precedes it): an example needs a response token after the first position.
    kept = tokenized.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"][1:]), desc="Dropping empty")
    dropped = len(tokenized) - len(kept)
    if len(kept) == 0:
        raise ConfigError(
            f"every {split} example's response was truncated away (max_length={config.max_length}, "
            f"max_prompt_length={config.max_prompt_length}); raise max_length or lower max_prompt_length"
        )
    if dropped:
        logger.warning("%d of %d %s examples had no response token left after truncation and were dropped",
                       dropped, len(tokenized), split)
    return kept


@dataclass
class DistillationCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask``.

    ``packing_capacity``: pack the examples into rows of at most this many tokens instead
    (:func:`eakd_llm.data.packing.pack_batch`: ``position_ids`` and ``sequence_ids`` per document, no
    ``attention_mask``). ``with_prompts``: also return the prompts left-padded (``prompt_input_ids``,
    ``prompt_attention_mask``) for on-policy generation; a prompt is an example's tokens before its first response
    label.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    packing_capacity: int | None = None
    with_prompts: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packing_capacity:
            from .packing import pack_batch

            batch = pack_batch(features, self.pad_token_id, self.packing_capacity)
        else:
            batch = self._pad(features)
        if self.with_prompts:
            prompts = [list(f["input_ids"][: prompt_length(f["labels"])]) for f in features]
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = left_pad(prompts, self.pad_token_id)
        return batch

    def _pad(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(feature["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.as_tensor(feature["labels"])
        return batch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of left-padded prompts: every prompt ends where generation starts."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first response label (the whole example when it has none: a prompt-only record)."""
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return index
    return len(labels)
