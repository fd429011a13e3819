"""`EAKDTrainer`: a `transformers.Trainer` whose loss is ``(1 - kd_ratio) * CE + kd_ratio * (EA-)KD``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import time
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .chunked import fused_distillation_loss
from .config import ConfigError, EAKDConfig
from .data import DistillationCollator
from .losses import IGNORE_INDEX, SparseTeacher, distillation_loss, loss_denominator
from .models import (
    check_tokenizers_match,
    check_trainable_student,
    final_hidden_states,
    load_causal_lm,
    load_tokenizer,
    logit_transform,
    shared_vocab_size,
)
from .on_policy import OnPolicyBatches
from .packing import check_isolation
from .sharding import (
    full_head,
    head_forward,
    is_sharded,
    parameter_elements,
    place_teacher,
    unwrap_causal_lm,
    zero3_trainable,
)
from .teacher_cache import CachedTeacherCollator, TeacherCache, sparse_teacher_of

logger = logging.getLogger(__name__)

# Statistics averaged over the steps between two log lines, then over processes; min/max keep their extremes.
_EA_KEYS = ("teacher_entropy", "student_entropy", "ea_weight_mean", "ea_weight_min", "ea_weight_max")
_MIN_KEYS = ("ea_weight_min",)
_MAX_KEYS = ("ea_weight_max",)


class EAKDTrainer(Trainer):
    """Distils ``teacher_model`` into ``model`` with EA-KD (or plain KD / SFT, see :class:`EAKDConfig`).

    The teacher is frozen (eval mode, no gradients, its own dtype) and run once per batch without gradient, placed as
    the run is launched (:func:`eakd_llm.sharding.place_teacher`: a ZeRO-3 inference engine, FSDP shards, or a plain
    copy per device). With ``teacher_cache`` no teacher is loaded: each batch carries the teacher's cached top-k entries
    (:mod:`eakd_llm.teacher_cache`). With ``on_policy_fraction`` / ``seq_kd`` some steps' batches are generated
    (:mod:`eakd_llm.on_policy`); with ``packing`` several examples share a row (:mod:`eakd_llm.packing`).

    Logged every ``logging_steps``: ``ce_loss``, ``kd_loss`` (per loss token), ``teacher_entropy`` and
    ``student_entropy`` (means at ``entropy_temperature`` over response tokens) and ``ea_weight_mean/min/max``; with
    generation also ``on_policy``, ``generated_length``, ``generation_time_share`` and the statistics by source.
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: EAKDConfig,
        teacher_model: nn.Module | str | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        data_collator=None,
        teacher_cache: TeacherCache | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, EAKDConfig):
            raise TypeError(f"args must be an EAKDConfig, got {type(args).__name__}")
        if isinstance(model, str):
            model = load_causal_lm(model, args.model_dtype, args.trust_remote_code, args.attn_implementation)
        check_trainable_student(model, use_peft=False)  # a PEFT-wrapped student passes through its peft_config
        generates = args.on_policy_fraction > 0 or args.seq_kd
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the student tokenizer) or a data_collator")
            data_collator = DistillationCollator(
                processing_class.pad_token_id, packing_capacity=args.max_length if args.packing else None,
                with_prompts=generates,
            )
        if teacher_cache is not None:  # each batch carries its cached teacher entries
            data_collator = CachedTeacherCollator(data_collator, teacher_cache)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        # compute_loss divides by the global loss-token count (num_items_in_batch), which the Trainer then counts and
        # passes; it no longer divides by the accumulation steps, except when no count is given (local mean).
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

        self.teacher: nn.Module | None = None
        self.vocab_size: int | None = None
        self._loss_path: str | None = None
        self._packing_checked = False
        self.on_policy: OnPolicyBatches | None = None
        if generates:
            if processing_class is None:
                raise ValueError("on-policy / seq_kd generation needs processing_class (the student tokenizer)")
            if teacher_cache is not None:
                raise ValueError("a teacher cache holds the teacher's outputs for the dataset's responses only: it "
                                 "cannot score generated ones (on_policy_fraction / seq_kd)")
            if not getattr(data_collator, "with_prompts", False):
                raise ValueError("on-policy / seq_kd generation needs a collator that returns the prompts "
                                 "(prompt_input_ids): DistillationCollator(..., with_prompts=True)")
            # Generated responses are re-collated without the prompt columns (they are only read to generate).
            recollate = dataclasses.replace(data_collator, with_prompts=False) if isinstance(
                data_collator, DistillationCollator) else data_collator
            self.on_policy = OnPolicyBatches(args, processing_class, recollate, self.accelerator.process_index)
        self._last_log_time = time.perf_counter()
        fsdp1 = self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1
        if args.packing and fsdp1:
            raise ConfigError("packing is not supported under FSDP1 (its check that models keep packed documents apart "
                              "needs the root's parameters unsharded): use FSDP2 (fsdp_version: 2) or packing: false")
        if args.kd_ratio > 0 and teacher_cache is not None:
            manifest = teacher_cache.manifest
            self.vocab_size = manifest.vocab_size
            logger.info("teacher: none loaded; top-%d cache %s (%s, %d B/token)", manifest.top_k, teacher_cache.folder,
                        manifest.value_format, manifest.bytes_per_token())
        elif args.kd_ratio > 0:
            if teacher_model is None:
                raise ValueError(f"kd_ratio={args.kd_ratio} needs a teacher_model (kd_ratio 0 is plain SFT)")
            if isinstance(teacher_model, str):
                if teacher_processing_class is None:
                    teacher_processing_class = load_tokenizer(
                        teacher_model, args.trust_remote_code, key="teacher_model_name_or_path"
                    )
                teacher_model = load_causal_lm(
                    teacher_model,
                    args.teacher_dtype or args.model_dtype,
                    args.trust_remote_code,
                    args.attn_implementation,
                    key="teacher_model_name_or_path",
                )
            if teacher_processing_class is not None and processing_class is not None:
                check_tokenizers_match(processing_class, teacher_processing_class)
            self.vocab_size = shared_vocab_size(self.accelerator.unwrap_model(model), teacher_model, processing_class)
            self.teacher = self._prepare_teacher(teacher_model)

    # ------------------------------------------------------------------------------------------------------------
    # Teacher placement
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher, placement = place_teacher(teacher, self.accelerator, self.args, self.is_deepspeed_enabled,
                                           self.is_fsdp_enabled)
        local, full = parameter_elements(teacher)
        logger.info("teacher: %s on %s; this process holds %d of its %d parameter elements", placement,
                    self.accelerator.device, local, full)
        return teacher

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``(1 - kd_ratio) * CE + kd_ratio * kd_scale * (EA-)KD`` over response tokens, divided by the global token
        count. Student-generated batches (``inputs["source"] == "student"``) carry no CE term.

        The fused chunked path (:func:`eakd_llm.chunked.fused_distillation_loss`) is used when the config asks for it
        and the models allow it; it never holds full-vocabulary logits. Otherwise both models' logits are computed.
        """
        args: EAKDConfig = self.args
        labels = inputs["labels"][:, 1:]  # position t predicts token t+1
        sequence_ids = inputs["sequence_ids"][:, 1:] if "sequence_ids" in inputs else None
        forward_inputs = model_inputs(inputs)
        if args.packing and not self._packing_checked:
            self._check_packing(model)
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() > 0:
            # nn.DataParallel (one process, several GPUs): the Trainer repeats the count per GPU, but this loss is
            # computed once on the gathered outputs.
            num_items_in_batch = num_items_in_batch.reshape(-1)[0]
        num_tokens = (labels != IGNORE_INDEX).sum()
        denominator = loss_denominator(num_tokens, num_items_in_batch)
        source = inputs.get("source", "dataset")
        terms = _loss_terms(args, source, sequence_ids)
        sparse = sparse_teacher_of(inputs)

        outputs_wanted = return_outputs and not args.prediction_loss_only  # logits for metrics: full path
        blocker = "outputs requested" if outputs_wanted else self._fused_blocker(model)
        self._log_loss_path(model, blocker)
        if blocker is None:
            loss, stats, outputs = self._fused_loss(model, forward_inputs, labels, denominator, terms, sparse)
        else:
            loss, stats, outputs = self._full_logits_loss(model, forward_inputs, labels, denominator, terms, sparse)

        if loss is None:  # a non-finite batch skipped by ``nonfinite_logits: skip``
            loss = _zero_loss(model)
        else:
            if args.average_tokens_across_devices and num_items_in_batch is not None:
                # The denominator counts every process's tokens while DDP averages gradients: undo the average.
                loss = loss * self.accelerator.num_processes
            if num_tokens > 0:
                if source == "student" and "kd_loss" in stats:
                    # The batch's KD term carries kd_ratio inside its scale (no CE): log it at the config's scale, so
                    # kd_loss means the same on dataset and generated batches.
                    stats["kd_loss"] = stats["kd_loss"] * args.kd_scale / terms[1]
                self._record(stats, "train" if model.training else "eval", source)
        return (loss, outputs) if return_outputs else loss

    def _full_logits_loss(self, model, forward_inputs, labels, denominator, terms, sparse=None):
        """The reference path: full logits of both models, :func:`eakd_llm.losses.distillation_loss` (a cached teacher:
        its top-k entries, ``sparse``)."""
        kd_ratio, kd_scale, kd_kwargs = terms
        outputs = model(**forward_inputs, use_cache=False)
        student_logits = outputs.logits[:, :-1]
        teacher_logits = None
        if sparse is not None:
            teacher_logits = sparse
        elif self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**forward_inputs, use_cache=False).logits[:, :-1]
        mask = labels != IGNORE_INDEX
        # Only response positions matter (as in the fused path): the prompt and padding may hold anything.
        named = (("teacher", None if sparse is not None else teacher_logits), ("student", student_logits))
        bad = [n for n, t in named if t is not None and not torch.isfinite(t[mask]).all()]
        if not self._finite_or_skip(bad):
            return None, {}, outputs

        num_tokens = mask.sum().clamp(min=1)
        ce_sum = F.cross_entropy(student_logits[mask].float(), labels[mask], reduction="sum")
        loss = (1.0 - kd_ratio) * ce_sum / denominator
        stats: dict[str, torch.Tensor] = {"ce_loss": ce_sum.detach() / num_tokens}
        if teacher_logits is not None:
            vocab = self.vocab_size
            kd, kd_stats = distillation_loss(
                student_logits[..., :vocab],
                teacher_logits if sparse is not None else teacher_logits[..., :vocab],
                labels,
                num_items_in_batch=denominator,
                return_stats=True,
                **kd_kwargs,
            )
            loss = loss + kd_ratio * kd_scale * kd
            stats["kd_loss"] = kd_scale * kd.detach() * denominator / num_tokens
            stats.update(kd_stats)
        return loss, stats, outputs

    def _fused_supported(self, model: nn.Module) -> bool:
        return self._fused_blocker(model) is None

    def _fused_blocker(self, model: nn.Module) -> str | None:
        """Why the fused path cannot run (``None``: it can). It needs plain ``nn.Linear`` heads, models that can skip
        their own projection, and heads it can read whole: unsharded, or sharded (ZeRO-3, FSDP2) and frozen, which
        are then gathered once per step for the loss."""
        if not self.args.fused_loss:
            return "fused_loss is off"
        if self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            if getattr(plugin, "fsdp_version", 1) != 2:
                return "FSDP1 flattens the lm_head into a flat parameter"
            from torch.distributed.fsdp import CPUOffloadPolicy

            if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
                return "FSDP2 CPU offload keeps the head's shards on the CPU"
        models = [unwrap_causal_lm(model)] + ([] if self.teacher is None else [unwrap_causal_lm(self.teacher)])
        for who, m in zip(("student", "teacher"), models):
            if not _projects_separately(m):
                return f"the {who}'s lm_head is not a plain nn.Linear or its forward has no logits_to_keep"
        # A trainable FSDP2-sharded student head would need its gradient routed through FSDP's reduce-scatter; a
        # ZeRO-3 one is called as a module, whose hooks do that (the teacher's head is frozen: gathering it is enough).
        # Under FSDP2 the head may be unsharded at this moment (accelerate does not reshard the root after forward):
        # decide by who owns it, not by its current state.
        head = models[0].get_output_embeddings()
        trainable = any(p.requires_grad for p in head.parameters())
        if trainable and (self.is_fsdp_enabled or (is_sharded(head) and not zero3_trainable(head))):
            return "the student's lm_head is FSDP2-sharded and trainable"
        return None

    def _log_loss_path(self, model: nn.Module, blocker: str | None) -> None:
        """Say once which loss path runs (``blocker``: why not the fused one, ``None`` when it runs)."""
        if blocker is None:
            models = [model] + ([] if self.teacher is None else [self.teacher])
            heads = [unwrap_causal_lm(m).get_output_embeddings() for m in models]
            sharded = self.is_fsdp_enabled or any(is_sharded(head) for head in heads)
            compiled = self.args.compile_loss_on(self.accelerator.device.type)
            path = (f"fused chunked (chunk {self.args.loss_chunk_size}{', compiled' if compiled else ''}"
                    f"{', sharded heads gathered once per step' if sharded else ''})")
        else:
            path = f"full logits ({blocker})"
        if path != self._loss_path:
            self._loss_path = path
            logger.info("EA-KD loss path: %s", path)

    def _fused_loss(self, model, forward_inputs, labels, denominator, terms, sparse=None):
        """CE and KD from the final hidden states, projected chunk by chunk (see :mod:`eakd_llm.chunked`)."""
        # logits_to_keep=1: the model projects one position only; the loss projects the response positions itself.
        student_hidden = final_hidden_states(model, **forward_inputs)[:, :-1]
        t_hidden = None
        if self.teacher is not None:
            with torch.no_grad():
                t_hidden = final_hidden_states(self.teacher, **forward_inputs)[:, :-1]
        outputs: dict[str, torch.Tensor] = {}  # no logits: the fused path never materialises them
        loss, stats, bad = fused_head_loss(
            unwrap_causal_lm(model), student_hidden,
            None if self.teacher is None else unwrap_causal_lm(self.teacher), t_hidden,
            labels, self.args, self.vocab_size, denominator, terms, sparse,
        )
        if bad is not None and not self._finite_or_skip(bad):  # e.g. an overflow in the projection
            return None, {}, outputs
        return loss, stats, outputs

    def _check_packing(self, model: nn.Module) -> None:
        """Once, before the first packed batch: both models must keep packed documents apart (else ConfigError)."""
        vocab = self.vocab_size or unwrap_causal_lm(model).config.get_text_config().vocab_size
        for name, m in (("student", model), ("teacher", self.teacher)):
            if m is not None:
                difference = check_isolation(m, name, vocab, self.accelerator.device)
                logger.info("packing: the %s keeps packed documents apart (relative difference %.1e)", name,
                            difference)
        self._packing_checked = True

    def _finite_or_skip(self, bad: list[str]) -> bool:
        """Stop (``nonfinite_logits: error``) or skip the batch (``skip``) when any logit is NaN or infinite."""
        if not bad:
            return True
        message = f"non-finite {' and '.join(bad)} logits at step {self.state.global_step}"
        if self.args.nonfinite_logits == "error":
            raise FloatingPointError(
                f"{message}; lower the learning rate, use bf16 instead of fp16, or set nonfinite_logits: skip"
            )
        logger.warning("%s: this batch contributes no loss (nonfinite_logits: skip)", message)
        return False

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------

    def _record(self, stats: dict[str, torch.Tensor], mode: str, source: str) -> None:
        """Keep a batch's statistics for the next log line; with generation on, also by data source."""
        for key, value in stats.items():
            if key == "num_tokens":
                continue
            self._metrics[mode][key].append(float(value))
            if self.on_policy is not None and mode == "train":
                self._metrics[mode][f"{key}/{'dataset' if source == 'dataset' else 'generated'}"].append(float(value))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The Trainer's accumulation group of micro-batches, generated by the student or the teacher when this step
        draws so (:mod:`eakd_llm.on_policy`), counted *after* generation: the loss is divided by the tokens that
        really carry it, over the group's micro-batches and every process."""
        if self.on_policy is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches:
            batches = self.on_policy.prepare(batches, self.state.global_step, self.model_wrapped, self.teacher)
        return batches, self._get_num_items_in_batch(batches, device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        is_eval_log = any(key.startswith("eval") and key.endswith("_loss") for key in logs)
        if "loss" not in logs and not is_eval_log:  # e.g. the final train summary
            return super().log(logs, *args, **kwargs)
        metrics = self._reduce_metrics(self._metrics[mode], self._metric_keys(mode))
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        elif self.on_policy is not None:
            now = time.perf_counter()
            metrics.update(self.on_policy.metrics(now - self._last_log_time))
            self._last_log_time = now
        logs = {**logs, **metrics}
        self._metrics[mode].clear()
        return super().log(logs, *args, **kwargs)

    def _metric_keys(self, mode: str) -> list[str]:
        """The statistics every process reduces, in one fixed order (a gather needs the same columns everywhere)."""
        keys = ["ce_loss", "kd_loss", *_EA_KEYS]
        if self.on_policy is not None and mode == "train":
            keys += [f"{key}/{source}" for source in ("dataset", "generated") for key in ("ce_loss", "kd_loss",
                                                                                           *_EA_KEYS)]
        return keys

    def _reduce_metrics(self, metrics: dict[str, list[float]], keys: list[str]) -> dict[str, float]:
        """Aggregate the steps since the last log, then across processes (every rank calls ``log``)."""
        local = []
        for key in keys:
            values = metrics.get(key, [])
            if not values:
                local.append(math.nan)
            elif key.startswith(_MIN_KEYS):
                local.append(min(values))
            elif key.startswith(_MAX_KEYS):
                local.append(max(values))
            else:
                local.append(sum(values) / len(values))
        table = torch.tensor(local, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            table = self.accelerator.gather(table.unsqueeze(0))
        else:
            table = table.unsqueeze(0)
        out = {}
        for i, key in enumerate(keys):
            column = table[:, i]
            column = column[~torch.isnan(column)]
            if column.numel() == 0:
                continue
            if key.startswith(_MIN_KEYS):
                out[key] = column.min().item()
            elif key.startswith(_MAX_KEYS):
                out[key] = column.max().item()
            else:
                out[key] = column.mean().item()
        return out


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def fused_head_loss(
    student: nn.Module,
    student_hidden: torch.Tensor,
    teacher: nn.Module | None,
    teacher_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    args: EAKDConfig,
    vocab_size: int | None,
    denominator: torch.Tensor,
    terms: tuple[float, float, dict[str, Any]] | None = None,
    teacher_sparse: SparseTeacher | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str] | None]:
    """The trainer's fused loss from both models' final hidden states and their ``lm_head`` modules.

    ``terms``: ``(kd_ratio, kd_scale, kd_kwargs)`` of the batch (default: the config's, for a dataset batch).
    ``teacher_sparse``: a cached teacher's entries instead of a teacher model (``teacher`` is then ``None``).

    Sharded heads are gathered once for the whole call, not per chunk. The teacher's head and a frozen student head (a
    ZeRO-3 partition, an FSDP2 ``DTensor``) are gathered for the call and released when it returns: the fused loss
    computes its gradients during the forward call, so the backward pass never needs them again. A trainable ZeRO-3
    student head is instead called as a module whose forward is the fused loss: ZeRO-3's own hooks gather its
    parameters for the call, gather them again for the backward, and reduce-scatter their gradient like any layer's.
    Returns ``(loss, stats, bad)``: ``bad`` names the models whose inputs hold non-finite values when the loss is not
    finite (``None`` when it is finite).
    """
    kd_ratio, kd_scale, kd_kwargs = terms or _loss_terms(args, "dataset", None)
    s_head = student.get_output_embeddings()
    s_scale, s_cap = logit_transform(student)
    with contextlib.ExitStack() as stack:
        teacher_kwargs: dict[str, Any] = {"teacher_hidden": None, "teacher_weight": None,
                                          "teacher_sparse": teacher_sparse}
        t_weight = None
        if teacher is not None:
            t_weight, t_bias = stack.enter_context(full_head(teacher.get_output_embeddings()))
            t_scale, t_cap = logit_transform(teacher)
            teacher_kwargs = dict(teacher_hidden=teacher_hidden, teacher_weight=t_weight, teacher_bias=t_bias,
                                  teacher_logit_scale=t_scale, teacher_softcap=t_cap)
        stats: dict[str, torch.Tensor] = {}

        def loss_from_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            loss, chunk_stats = fused_distillation_loss(
                hidden,
                weight,
                labels=labels,
                student_bias=bias,
                vocab_size=vocab_size,
                kd_ratio=kd_ratio,
                kd_scale=kd_scale,
                num_items_in_batch=denominator,
                student_logit_scale=s_scale,
                student_softcap=s_cap,
                chunk_size=args.loss_chunk_size,
                compile=args.compile_loss_on(student_hidden.device.type),
                return_stats=True,
                **teacher_kwargs,
                **kd_kwargs,
            )
            stats.update(chunk_stats)
            return loss

        if zero3_trainable(s_head):
            with head_forward(s_head, lambda hidden: loss_from_head(hidden, s_head.weight, s_head.bias)):
                loss = s_head(student_hidden)
            s_weight = None  # partitioned again: not inspectable below
        else:
            s_weight, s_bias = stack.enter_context(full_head(s_head))
            loss = loss_from_head(student_hidden, s_weight, s_bias)
        bad = None
        if not torch.isfinite(loss):
            suspects = (("teacher", (teacher_hidden, t_weight)), ("student", (student_hidden, s_weight)))
            bad = [name for name, tensors in suspects
                   if any(t is not None and not torch.isfinite(t).all() for t in tensors)] or ["teacher or student"]
    return loss, stats, bad


def _divergence_kwargs(args: EAKDConfig) -> dict[str, Any]:
    """The KD settings both loss paths (full logits and fused) take from the config."""
    return {
        "divergence": args.divergence,
        "temperature": args.temperature,
        "ea": args.ea,
        "ea_granularity": args.ea_granularity,
        "entropy_temperature": args.entropy_temperature,
        "skew_alpha": args.skew_alpha,
        "jsd_beta": args.jsd_beta,
        "ea_formula": args.ea_formula,
        "ea_normalize": args.ea_normalize,
    }


def _loss_terms(
    args: EAKDConfig, source: str, sequence_ids: torch.Tensor | None
) -> tuple[float, float, dict[str, Any]]:
    """``(kd_ratio, kd_scale, kd_kwargs)`` of a batch. A student-generated batch has no CE term: ``kd_ratio`` 1 with
    the KD term scaled by the configured ``kd_ratio`` (the same KD weight as on dataset batches)."""
    kd_kwargs = {**_divergence_kwargs(args), "sequence_ids": sequence_ids}
    if source == "student" and args.kd_ratio > 0:
        return 1.0, args.kd_ratio * args.kd_scale, kd_kwargs
    return args.kd_ratio, args.kd_scale, kd_kwargs


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the models are called with: a padded batch's attention mask, or a packed batch's position ids (no mask:
    transformers then keeps the documents apart, see :mod:`eakd_llm.packing`)."""
    if "position_ids" in inputs:
        return {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def _zero_loss(model: nn.Module) -> torch.Tensor:
    """A zero loss whose gradients are exactly zero, even if activations or weights hold NaN.

    ``[:1]`` rather than ``[0]``: a ZeRO-3 parameter is empty outside the forward pass.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    return sum(p.reshape(-1)[:1].sum() for p in params) * 0.0


@functools.lru_cache(maxsize=32)
def _forward_takes_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def _projects_separately(model: nn.Module) -> bool:
    """The fused loss can reproduce this model's logits: a plain ``nn.Linear`` head (not LoRA-adapted, not quantized)
    and a forward that can skip its own projection (``logits_to_keep``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # nn.Linear's own forward: a plain head, or FSDP2's dynamic FSDPLinear subclass; not a LoRA or quantized layer.
    plain = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
    return plain and _forward_takes_logits_to_keep(type(model).forward)
