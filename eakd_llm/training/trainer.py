"""`EAKDTrainer`: a `transformers.Trainer` whose loss is ``(1 - kd_ratio) * CE + kd_ratio * (EA-)KD``."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..config.eakd_config import ConfigError, EAKDConfig
from ..data.dataset import DistillationCollator
from ..loss.distillation import IGNORE_INDEX, LossSettings, loss_denominator
from ..models.isolation import check_isolation
from ..models.loading import (
    check_tokenizers_match,
    check_trainable_student,
    final_hidden_states,
    load_causal_lm,
    load_tokenizer,
    model_inputs,
    shared_vocab_size,
)
from ..models.sharding import is_sharded, parameter_elements, place_teacher, unwrap_causal_lm
from ..teacher.cache import TeacherCache
from ..teacher.served import ServedTeacher
from ..teacher.source import CachedTeacher, LiveTeacher, TeacherSource
from .log_window import LogWindow
from .loss_paths import finite_or_none, full_logits_loss, fused_blocker, fused_head_loss, sequence_ids, zero_loss
from .on_policy import OnPolicyBatches

logger = logging.getLogger(__name__)


class EAKDTrainer(Trainer):
    """Distils ``teacher_model`` into ``model`` with EA-KD (or plain KD / SFT, see :class:`EAKDConfig`).

    The teacher's side of each batch comes from a :mod:`eakd_llm.teacher.source`: a frozen model (eval mode, no
    gradients, its own dtype) run once per batch without gradient and placed as the run is launched
    (:func:`eakd_llm.models.sharding.place_teacher`: a ZeRO-3 inference engine, FSDP shards, or a plain copy per
    device), or with ``teacher_cache`` the teacher's cached top-k entries that each batch carries
    (:mod:`eakd_llm.teacher.cache`). With ``on_policy_fraction`` / ``seq_kd`` some steps' batches are generated
    (:mod:`eakd_llm.training.on_policy`); with ``packing`` several examples share a row (:mod:`eakd_llm.data.packing`).
    The loss itself is one of the two paths of :mod:`eakd_llm.training.loss_paths`.

    Logged every ``logging_steps``: ``ce_loss``, ``kd_loss`` (per loss token), ``teacher_entropy`` and
    ``student_entropy`` (means at ``entropy_temperature`` over response tokens), ``ea_weight_mean/min/max``,
    ``ea_effective_scale`` (``sum w d / sum d`` over the window's tokens: the factor EA multiplies the KD term by) and
    ``grad_clipped`` (the share of optimizer steps whose gradient norm exceeded ``max_grad_norm``, with the pre-clip
    norms' mean and max); with generation also ``on_policy``, ``on_policy_fraction_now`` (λ after its warmup and
    ramp), ``generated_length``, ``generation_time_share`` and the statistics by source.
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
        teacher_server: ServedTeacher | None = None,
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
        source_collator = data_collator
        if teacher_cache is not None:  # each batch carries its cached teacher entries
            data_collator = CachedTeacher(teacher_cache).wrap_collator(data_collator)
        elif teacher_server is not None and not args.every_step_generates:
            # each batch is asked of the server as it is made, ahead of its step (not when every step replaces it)
            data_collator = teacher_server.wrap_collator(data_collator)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        # compute_loss divides by the global loss-token count (num_items_in_batch), which the Trainer then counts and
        # passes; it no longer divides by the accumulation steps, except when no count is given (local mean).
        self.model_accepts_loss_kwargs = True
        self.loss_settings = LossSettings.from_config(args)
        self.teacher_source: TeacherSource | None = None
        self.teacher: nn.Module | None = None
        self.vocab_size: int | None = None
        self._loss_path: str | None = None
        self._packing_checked = False
        self._student: tuple[nn.Module, nn.Module] | None = None  # (wrapped, unwrapped causal LM), set on first use
        self.on_policy = OnPolicyBatches.for_trainer(args, processing_class, source_collator, teacher_cache,
                                                     self.accelerator.process_index) if generates else None
        self.log_windows = {"train": LogWindow(by_source=self.on_policy is not None),
                            "eval": LogWindow(token_weighted=True)}
        self._last_log_time = time.perf_counter()
        fsdp1 = self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1
        if args.packing and fsdp1:
            raise ConfigError("packing is not supported under FSDP1 (its check that models keep packed documents apart "
                              "needs the root's parameters unsharded): use FSDP2 (fsdp_version: 2) or packing: false")
        if args.kd_ratio > 0 and teacher_cache is not None:
            manifest = teacher_cache.manifest
            self.vocab_size = manifest.vocab_size
            self.teacher_source = CachedTeacher(teacher_cache)
            logger.info("teacher: none loaded; %s in %s", manifest.describe(), teacher_cache.folder)
        elif args.kd_ratio > 0 and teacher_server is not None:
            self.vocab_size = min(teacher_server.weight.shape[0],
                                  self.accelerator.unwrap_model(model).config.get_text_config().vocab_size)
            self.teacher_source = teacher_server
            logger.info("teacher: served by %s (%s); its head projected here", teacher_server.client.url,
                        teacher_server.client.model)
        elif args.kd_ratio > 0:
            teacher_model = self._load_teacher(teacher_model, teacher_processing_class, processing_class)
            self.vocab_size = shared_vocab_size(self.accelerator.unwrap_model(model), teacher_model, processing_class)
            self.teacher = self._prepare_teacher(teacher_model)
            self.teacher_source = LiveTeacher(self.teacher)

    def _load_teacher(self, teacher_model, teacher_tokenizer, student_tokenizer) -> nn.Module:
        args: EAKDConfig = self.args
        if teacher_model is None:
            raise ValueError(f"kd_ratio={args.kd_ratio} needs a teacher_model (kd_ratio 0 is plain SFT)")
        if isinstance(teacher_model, str):
            key = "teacher_model_name_or_path"
            if teacher_tokenizer is None:
                teacher_tokenizer = load_tokenizer(teacher_model, args.trust_remote_code, key=key)
            teacher_model = load_causal_lm(teacher_model, args.teacher_dtype or args.model_dtype,
                                           args.trust_remote_code, args.attn_implementation, key=key)
        if teacher_tokenizer is not None and student_tokenizer is not None:
            check_tokenizers_match(student_tokenizer, teacher_tokenizer)
        return teacher_model

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher, placement = place_teacher(teacher, self.accelerator, self.args, self.is_deepspeed_enabled,
                                           self.is_fsdp_enabled)
        local, full = parameter_elements(teacher)
        logger.info("teacher: %s on %s; this process holds %d of its %d parameter elements", placement,
                    self.accelerator.device, local, full)
        return teacher

    def _causal_lm(self, model: nn.Module) -> nn.Module:
        """The student's causal LM under its wrappers, unwrapped once per wrapped model (the Trainer wraps it when
        training starts)."""
        if self._student is None or self._student[0] is not model:
            self._student = (model, unwrap_causal_lm(model))
        return self._student[1]

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

        The fused chunked path (:func:`eakd_llm.training.loss_paths.fused_head_loss`) is used when the config asks for
        it and the models allow it; it never holds full-vocabulary logits. Otherwise both models' logits are computed.
        """
        args: EAKDConfig = self.args
        labels = inputs["labels"][:, 1:]  # position t predicts token t+1
        if args.packing and not self._packing_checked:
            self._check_packing(model)
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() > 0:
            # nn.DataParallel (one process, several GPUs): the Trainer repeats the count per GPU, but this loss is
            # computed once on the gathered outputs.
            num_items_in_batch = num_items_in_batch.reshape(-1)[0]
        num_tokens = (labels != IGNORE_INDEX).sum()
        denominator = loss_denominator(num_tokens, num_items_in_batch)
        source = inputs.get("source", "dataset")
        settings = self.loss_settings.for_generated_batch() if source == "student" else self.loss_settings

        outputs_wanted = return_outputs and not args.prediction_loss_only  # logits for metrics: full path
        blocker = "outputs requested" if outputs_wanted else self._fused_blocker(model)
        self._log_loss_path(model, blocker)
        loss_path = self._fused_loss if blocker is None else self._full_logits_loss
        loss, stats, outputs = loss_path(model, inputs, labels, denominator, settings)

        if loss is None:  # a non-finite batch skipped by ``nonfinite_logits: skip``
            loss = zero_loss(model)
        else:
            if args.average_tokens_across_devices and num_items_in_batch is not None:
                # The denominator counts every process's tokens while DDP averages gradients: undo the average.
                loss = loss * self.accelerator.num_processes
            if num_tokens > 0:
                if source == "student" and "kd_loss" in stats:
                    # The batch's KD term carries kd_ratio inside its scale (no CE): log it at the config's scale, so
                    # kd_loss means the same on dataset and generated batches.
                    stats["kd_loss"] = stats["kd_loss"] * args.kd_scale / settings.kd_scale
                self.log_windows["train" if model.training else "eval"].record(stats, source, num_tokens)
        return (loss, outputs) if return_outputs else loss

    def _full_logits_loss(self, model, inputs, labels, denominator, settings):
        """The reference path: full logits of both models (a cached teacher: its top-k entries)."""
        forward_inputs = model_inputs(inputs)
        outputs = model(**forward_inputs, use_cache=False)
        teacher = None
        if self.teacher_source is not None and settings.needs_teacher:
            teacher = self.teacher_source.full_side(inputs, forward_inputs, self.vocab_size)
        loss, stats, bad = full_logits_loss(outputs.logits[:, :-1], teacher, labels, settings, denominator,
                                            self.vocab_size, sequence_ids(inputs))
        return finite_or_none(loss, bad, self.state.global_step, self.args.nonfinite_logits), stats, outputs

    def _fused_loss(self, model, inputs, labels, denominator, settings):
        """CE and KD from the final hidden states, projected chunk by chunk (see :mod:`eakd_llm.loss.chunked`)."""
        forward_inputs = model_inputs(inputs)
        # logits_to_keep=1: the model projects one position only; the loss projects the response positions itself.
        student_hidden = final_hidden_states(model, **forward_inputs)[:, :-1]
        args: EAKDConfig = self.args
        with self._teacher_side(inputs, forward_inputs, settings) as teacher:
            loss, stats, bad = fused_head_loss(
                self._causal_lm(model), student_hidden, teacher, labels, settings, denominator, self.vocab_size,
                sequence_ids(inputs), args.loss_chunk_size, args.compile_loss_on(student_hidden.device.type),
            )
        # no logits in the outputs: the fused path never materialises them
        return finite_or_none(loss, bad, self.state.global_step, self.args.nonfinite_logits), stats, {}

    def _teacher_side(self, inputs, forward_inputs, settings):
        if self.teacher_source is None or not settings.needs_teacher:
            return contextlib.nullcontext()
        return self.teacher_source.fused_side(inputs, forward_inputs)

    def _fused_supported(self, model: nn.Module) -> bool:
        return self._fused_blocker(model) is None

    def _fused_blocker(self, model: nn.Module) -> str | None:
        if not self.args.fused_loss:
            return "fused_loss is off"
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        teacher = self.teacher_source.causal_lm if isinstance(self.teacher_source, LiveTeacher) else None
        return fused_blocker(self._causal_lm(model), teacher, plugin)

    def _log_loss_path(self, model: nn.Module, blocker: str | None) -> None:
        """Say once which loss path runs (``blocker``: why not the fused one, ``None`` when it runs)."""
        if blocker is None:
            models = [self._causal_lm(model)] + ([] if self.teacher is None else [self.teacher_source.causal_lm])
            sharded = self.is_fsdp_enabled or any(is_sharded(m.get_output_embeddings()) for m in models)
            compiled = self.args.compile_loss_on(self.accelerator.device.type)
            path = (f"fused chunked (chunk {self.args.loss_chunk_size}{', compiled' if compiled else ''}"
                    f"{', sharded heads gathered once per step' if sharded else ''})")
        else:
            path = f"full logits ({blocker})"
        if path != self._loss_path:
            self._loss_path = path
            logger.info("EA-KD loss path: %s", path)

    def _check_packing(self, model: nn.Module) -> None:
        """Once, before the first packed batch: both models must keep packed documents apart (else ConfigError)."""
        vocab = self.vocab_size or self._causal_lm(model).config.get_text_config().vocab_size
        for name, m in (("student", model), ("teacher", self.teacher)):
            if m is not None:
                difference = check_isolation(m, name, vocab, self.accelerator.device)
                logger.info("packing: the %s keeps packed documents apart (relative difference %.1e)", name,
                            difference)
        self._packing_checked = True

    # ------------------------------------------------------------------------------------------------------------
    # Generated batches, gradient clipping and logging
    # ------------------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The Trainer's accumulation group of micro-batches, generated by the student or the teacher when this step
        draws so (:mod:`eakd_llm.training.on_policy`), counted *after* generation: the loss is divided by the tokens
        that really carry it, over the group's micro-batches and every process."""
        if self.on_policy is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = self.on_policy.next_group(epoch_iterator, num_batches, self.state.global_step, self.model_wrapped,
                                            self.teacher)
        return batches, self._get_num_items_in_batch(batches, device)

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, plus the pre-clip norm for the log's ``grad_clipped`` share."""
        norm = super()._clip_grad_norm(model)
        if norm is not None:
            self.log_windows["train"].record_grad_norm(float(norm), self.args.max_grad_norm)
        return norm

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """The Trainer's loop plus the evaluation's statistics over all its response tokens in the metrics (log line,
        ``evaluate()``, eval_results.json): ``eval_ce_loss`` compares runs, ``eval_loss`` (the objective) does not."""
        self.log_windows["eval"].clear()  # e.g. compute_loss called on a model in eval mode outside an evaluation
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        window = self.log_windows["eval"].reduce_across(self.accelerator)  # once per evaluation, on every process
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in window.items()})
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" not in logs:  # evaluation lines (their statistics come from evaluation_loop), the final summary
            return super().log(logs, *args, **kwargs)
        metrics = self.log_windows["train"].reduce_across(self.accelerator)
        if self.on_policy is not None:
            now = time.perf_counter()
            metrics.update(self.on_policy.metrics(now - self._last_log_time))
            self._last_log_time = now
        return super().log({**logs, **metrics}, *args, **kwargs)
