"""On-policy and sequence-level KD: training on responses the student (or the teacher) generates for the prompts.

GKD's scheme (TRL ``GKDTrainer``'s ``lmbda`` and ``seq_kd``): per optimizer step, with probability λ
(``on_policy_fraction``, after an optional warmup and ramp: :func:`on_policy_fraction_at`) the step's prompts are
completed by the current student; otherwise, with ``seq_kd``, by the teacher; otherwise the dataset's responses are
used. The decision is drawn from the run's seed and the step number, so every micro-batch of an accumulation group
and every process agrees, and a resumed run draws the same.

A generated batch is re-collated as prompt + response with the loss on the generated tokens (the end token included,
so students learn to stop), by the run's own collator (padding or packing). The trainer then scores it with the teacher
and computes KD and the EA weights on those tokens exactly as on dataset tokens. Student-generated tokens carry no CE
term (they have no ground truth, and CE on one's own samples reinforces its mistakes); teacher-generated ones keep it
(sequence-level KD). Generation happens when the Trainer fetches the accumulation group's batches
(:meth:`OnPolicyBatches.prepare`), before it counts their loss tokens, so the loss is normalised by the tokens that
really carry loss after generation, across accumulation steps and processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.eakd_config import EAKDConfig
from ..data.dataset import DistillationCollator
from ..models.generation import GenerationSettings, end_token_ids, generate_token_ids
from ..models.sharding import gathered_for_generation, unwrap_causal_lm

SOURCES = ("dataset", "student", "teacher")


def on_policy_fraction_at(step: int, fraction: float, warmup: int = 0, ramp: int = 0) -> float:
    """The effective λ of optimizer step ``step`` (0-based): 0 for the ``warmup`` first steps, then ``ramp`` steps
    rising in equal increments (``fraction * k / (ramp + 1)`` at the k-th, k = 1..ramp), then ``fraction``.

    A pure function of its arguments, like :func:`step_source`, so every process and micro-batch (and a resumed run)
    uses the same λ for a step.
    """
    if step < warmup:
        return 0.0
    k = step - warmup + 1  # 1 on the first step after the warmup
    return fraction * k / (ramp + 1) if k <= ramp else fraction


def step_source(seed: int, step: int, on_policy_fraction: float, seq_kd: bool) -> str:
    """Where step ``step``'s responses come from: ``student`` with probability ``on_policy_fraction``, else ``teacher``
    with ``seq_kd``, else ``dataset``. A pure function of its arguments (the same on every process, and on resume)."""
    if on_policy_fraction > 0:
        digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
        draw = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        if draw < on_policy_fraction:
            return "student"
    return "teacher" if seq_kd else "dataset"


@dataclass
class GenerationLog:
    """What happened since the last log line: steps by source, generated responses and their lengths, seconds."""

    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    responses: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    fraction_now: float = 0.0  # λ of the latest step (kept across log lines)

    def clear(self) -> None:
        self.steps = dict.fromkeys(SOURCES, 0)
        self.responses = self.new_tokens = 0
        self.seconds = 0.0


class OnPolicyBatches:
    """Replaces a step's dataset batches with generated ones when :func:`step_source` says so.

    ``collator`` re-collates ``{"input_ids", "labels"}`` features (the run's padding or packing collator);
    ``process_index`` decorrelates the samples of different processes.
    """

    def __init__(self, args: EAKDConfig, tokenizer, collator: Callable, process_index: int = 0) -> None:
        self.args = args
        self.collator = collator
        self.process_index = process_index
        self.pad_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.settings = GenerationSettings(
            max_prompt_length=args.max_prompt_length,
            max_length=args.max_length,
            max_new_tokens=args.generation_budget,
            budget="remaining",  # prompt + response never exceed max_length
            do_sample=True,
            temperature=args.generation_temperature,
            top_p=args.generation_top_p,
            top_k=args.generation_top_k,
            no_repeat_ngram_size=0,
            batch_size=1 << 30,  # one generate call for the whole micro-batch
        )
        self.log = GenerationLog()

    @classmethod
    def for_trainer(cls, args: EAKDConfig, tokenizer, collator: Callable, teacher_cache: Any,
                    process_index: int = 0) -> OnPolicyBatches:
        """The trainer's generated batches: checks that the run can generate, and re-collates generated responses
        with ``collator`` without its prompt columns (they are only read to generate)."""
        if tokenizer is None:
            raise ValueError("on-policy / seq_kd generation needs processing_class (the student tokenizer)")
        if teacher_cache is not None:
            raise ValueError("a teacher cache holds the teacher's outputs for the dataset's responses only: it "
                             "cannot score generated ones (on_policy_fraction / seq_kd)")
        if not getattr(collator, "with_prompts", False):
            raise ValueError("on-policy / seq_kd generation needs a collator that returns the prompts "
                             "(prompt_input_ids): DistillationCollator(..., with_prompts=True)")
        if isinstance(collator, DistillationCollator):
            collator = dataclasses.replace(collator, with_prompts=False)
        return cls(args, tokenizer, collator, process_index)

    def next_group(self, epoch_iterator, num_batches: int, step: int, student, teacher) -> list[dict[str, Any]]:
        """The next (up to) ``num_batches`` micro-batches of ``epoch_iterator``, prepared for ``step``."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        return self.prepare(batches, step, student, teacher) if batches else batches

    def prepare(self, batches: list[dict[str, Any]], step: int, student, teacher) -> list[dict[str, Any]]:
        """The step's micro-batches, generated by the student or the teacher when the step draws so."""
        fraction = self.fraction_at(step)
        source = step_source(self.args.seed, step, fraction, self.args.seq_kd)
        self.log.steps[source] += 1
        self.log.fraction_now = fraction
        if source == "dataset":
            return batches
        model = student if source == "student" else teacher
        start = time.perf_counter()
        out = [self.complete(batch, model, source, seed=self._seed(step, index)) for index, batch in enumerate(batches)]
        self.log.seconds += time.perf_counter() - start
        return out

    def fraction_at(self, step: int) -> float:
        """λ at ``step`` under the run's warmup and ramp (:func:`on_policy_fraction_at`)."""
        args = self.args
        return on_policy_fraction_at(step, args.on_policy_fraction, args.on_policy_warmup_steps,
                                     args.on_policy_fraction_warmup_steps)

    def _seed(self, step: int, micro_batch: int) -> int:
        text = f"{self.args.seed}:{step}:{micro_batch}:{self.process_index}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")

    def complete(self, batch: dict[str, Any], model, source: str, seed: int) -> dict[str, Any]:
        """``batch``'s prompts completed by ``model``, re-collated with the loss on the generated tokens."""
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        with gathered_for_generation(model) as causal_lm, torch.random.fork_rng(devices=_rng_devices(ids)):
            torch.manual_seed(seed)  # forked: the training RNG (dropout, data order) is left as it was
            eos_ids = end_token_ids(self.tokenizer, unwrap_causal_lm(causal_lm))
            responses = generate_token_ids(causal_lm, prompts, self.settings, eos_ids, self.pad_id, keep_eos=True)
        self.log.responses += len(responses)
        self.log.new_tokens += sum(len(r) for r in responses)
        features = [{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in zip(prompts, responses)]
        new = self.collator(features)
        new = {key: value.to(ids.device) if torch.is_tensor(value) else value for key, value in new.items()}
        new["source"] = source
        return new

    def metrics(self, wall_seconds: float) -> dict[str, float]:
        """Log values since the last call: ``on_policy`` (share of steps trained on student generations),
        ``on_policy_fraction_now`` (λ of the latest step, under the warmup and ramp), ``generated_length`` (mean new
        tokens per generated response), ``generation_time_share``."""
        steps = sum(self.log.steps.values())
        out = {
            "on_policy": self.log.steps["student"] / steps if steps else 0.0,
            "on_policy_fraction_now": self.log.fraction_now,
            "generated_length": self.log.new_tokens / self.log.responses if self.log.responses else 0.0,
            "generation_time_share": min(1.0, self.log.seconds / wall_seconds) if wall_seconds > 0 else 0.0,
        }
        if self.args.seq_kd:
            out["seq_kd"] = self.log.steps["teacher"] / steps if steps else 0.0
        self.log.clear()
        return out


def _rng_devices(tensor: torch.Tensor) -> list[int]:
    return [tensor.device.index or 0] if tensor.is_cuda else []
