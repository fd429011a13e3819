"""Fidelity to a teacher on held-out prompts, per prompt: how closely a student reproduces the teacher's answers.

The references are the teacher's own answers (chat records from :mod:`eakd_llm.teacher.answers`). For every record:

* ``ce``: the student's cross-entropy per answer token on the teacher's answer (teacher forcing; the answer's targets
  end at the template's end-of-turn token, exactly as training tokenizes chat records);
* ``top1``: top-1 agreement, the share (x100) of those answer positions where the student's most likely next token
  is the teacher's most likely next token (both argmaxes on the same teacher-forced inputs, over the same
  vocabulary: the tokenizer's tokens, never a model's padding rows);
* ``kl``: KL(T || S) per answer token over the whole shared vocabulary, from both models' logits on the same
  teacher-forced inputs at temperature 1 (exact: the quantity distillation minimises, which a cached top-k cannot
  give; CE on the teacher's greedy answers and KL to its distribution can disagree about which student is closer);
* ``tokens``: the answer positions the three are taken over. A study reports ``ce``, ``top1`` and ``kl``
  token-weighted (a ratio of sums over prompts, :func:`token_weighted`), as training's ``eval_ce_loss`` is, so a
  3-token answer weighs less than a 60-token one;
* ``rougeL``: ROUGE-L (x100) of the student's greedy answer against the teacher's answer;
* ``stopped``: 1 when the student's answer ended at an end token within the budget, else 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.dataset import tokenize_example
from ..data.prompts import EvalRecord, render_chat
from ..loss.distillation import IGNORE_INDEX, token_divergence
from ..models.generation import GenerationSettings, model_device
from .protocol import encode_record_prompt, generate_predictions, score_examples

__all__ = ["METRICS", "TOKEN_WEIGHTED", "chat_examples", "compared_scores", "generation_scores", "padded_batches",
           "teacher_forced_scores", "token_weighted", "top1_agreement"]

# metric -> True when higher is better
METRICS: dict[str, bool] = {"ce": False, "kl": False, "top1": True, "rougeL": True}
# metrics taken over answer tokens: averaged per token (ratio of sums), not per prompt
TOKEN_WEIGHTED: tuple[str, ...] = ("ce", "kl", "top1")


def token_weighted(values: Sequence[float], tokens: Sequence[int]) -> list[float]:
    """Per-prompt contributions whose plain mean is the token-weighted mean ``sum(v_p * n_p) / sum(n_p)`` of the
    per-prompt means ``values`` over ``tokens`` answer positions: ``v_p * n_p * P / N``. Every student is scored on the
    same teacher answers (the same ``n_p``), so paired differences of these contributions, prompt by prompt, are
    differences of token-weighted means and the crossed-design intervals apply to them unchanged."""
    if len(values) != len(tokens) or not values:
        raise ValueError(f"{len(values)} values for {len(tokens)} token counts")
    total = sum(tokens)
    if total <= 0:
        raise ValueError("no answer tokens to weigh by")
    return [float(v) * n * len(values) / total for v, n in zip(values, tokens)]


def compared_scores(per_prompt: Mapping[str, Sequence[float]], metric: str) -> list[float]:
    """One metric's per-prompt scores as they are averaged and compared: the :func:`token_weighted` contributions for
    the metrics taken over answer tokens, the plain per-prompt scores otherwise."""
    values = per_prompt[metric]
    return token_weighted(values, per_prompt["tokens"]) if metric in TOKEN_WEIGHTED else list(values)


def padded_batches(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int, batch_size: int):
    """``(input_ids, labels, attention_mask)`` of the examples in right-padded batches of ``batch_size``."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, example in enumerate(chunk):
            n = len(example["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (torch.as_tensor(example["input_ids"]),
                                                            torch.as_tensor(example["labels"]), 1)
        yield ids, labels, mask


def chat_examples(records: Sequence[EvalRecord], tokenizer, max_length: int,
                  max_prompt_length: int) -> list[dict[str, list[int]]]:
    """``input_ids``/``labels`` of each record's conversation with its reference as the assistant's answer,
    tokenized as training tokenizes chat records (:func:`eakd_llm.data.dataset.tokenize_example` with ``chat=True``)."""
    out = []
    for record in records:
        if record.messages is None:
            raise ValueError("fidelity scoring needs chat records (messages)")
        prompt, response = render_chat([*record.messages, {"role": "assistant", "content": record.references[0]}],
                                       tokenizer)
        out.append(tokenize_example(prompt, response, tokenizer, max_length, max_prompt_length, chat=True))
    return out


def top1_agreement(student: Sequence[int], teacher: Sequence[int]) -> float:
    """Share (x100) of positions where the two argmax sequences agree."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"top-1 agreement needs two non-empty sequences of one length, got {len(student)} and "
                         f"{len(teacher)}")
    return 100.0 * sum(int(s == t) for s, t in zip(student, teacher)) / len(student)


@torch.no_grad()
def teacher_forced_scores(model, examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int, batch_size: int = 8,
                          reference: Sequence[Sequence[int]] | None = None, vocab_size: int | None = None,
                          teacher=None) -> list[dict[str, Any]]:
    """Per example: ``ce`` (nats per answer token), ``tokens`` (answer positions), ``argmax`` (the model's most likely
    next token at each answer position, over the first ``vocab_size`` ids), given the ``reference`` argmaxes (taken
    over the same ids) ``top1``, and given the ``teacher`` model ``kl``: KL(teacher || model) per answer token over
    the first ``vocab_size`` ids (both models' shared vocabulary when ``None``)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    out: list[dict[str, Any]] = []
    try:
        for ids, labels, mask in padded_batches(examples, pad_id, batch_size):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            teacher_logits = None
            if teacher is not None:
                teacher_logits = teacher(input_ids=ids.to(model_device(teacher)),
                                         attention_mask=mask.to(model_device(teacher))).logits[:, :-1].float()
                shared = min(logits.shape[-1], teacher_logits.shape[-1], vocab_size or logits.shape[-1])
                teacher_logits = teacher_logits[..., :shared].to(device)
                logits = logits[..., :shared]
            elif vocab_size is not None:
                logits = logits[..., :vocab_size]
            targets = labels[:, 1:].to(device)
            for row in range(len(ids)):
                keep = targets[row] != IGNORE_INDEX
                row_logits, row_targets = logits[row][keep], targets[row][keep]
                ce = torch.nn.functional.cross_entropy(row_logits, row_targets).item()
                scores = {"ce": ce, "tokens": int(keep.sum()), "argmax": row_logits.argmax(-1).tolist()}
                if teacher_logits is not None:
                    scores["kl"] = token_divergence(row_logits, teacher_logits[row][keep], "fkl").mean().item()
                out.append(scores)
    finally:
        model.train(was_training)
    if reference is not None:
        if len(reference) != len(out):
            raise ValueError(f"{len(reference)} reference argmax sequences for {len(out)} examples")
        for scores, ref in zip(out, reference):
            scores["top1"] = top1_agreement(scores["argmax"], ref)
    return out


def generation_scores(model, tokenizer, records: Sequence[EvalRecord], settings: GenerationSettings,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Per record: the model's answer (``settings``; greedy for a deterministic score), its ROUGE-L (x100) against
    the record's reference, ``stopped`` (1/0) and ``new_tokens``."""
    prompts = [encode_record_prompt(tokenizer, r, settings.max_prompt_length) for r in records]
    predictions = generate_predictions(model, tokenizer, prompts, settings, seed)
    rouge = score_examples([p.text for p in predictions], [list(r.references) for r in records])["rougeL"]
    return [{"answer": p.text, "rougeL": float(score), "stopped": float(p.stopped), "new_tokens": p.new_tokens}
            for p, score in zip(predictions, rouge)]
