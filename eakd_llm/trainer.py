"""`EAKDTrainer`: a `transformers.Trainer` whose loss is ``(1 - kd_ratio) * CE + kd_ratio * (EA-)KD``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .chunked import fused_distillation_loss
from .config import EAKDConfig
from .data import DistillationCollator
from .losses import IGNORE_INDEX, distillation_loss, loss_denominator
from .models import check_tokenizers_match, final_hidden_states, load_causal_lm, load_tokenizer, shared_vocab_size
from .sharding import (
    full_head,
    head_forward,
    is_sharded,
    parameter_elements,
    place_teacher,
    unwrap_causal_lm,
    zero3_trainable,
)

logger = logging.getLogger(__name__)

# Statistics averaged over the steps between two log lines, then over processes; min/max keep their extremes.
_MIN_KEYS = ("ea_weight_min",)
_MAX_KEYS = ("ea_weight_max",)


class EAKDTrainer(Trainer):
    """Distils ``teacher_model`` into ``model`` with EA-KD (or plain KD / SFT, see :class:`EAKDConfig`).

    The teacher is frozen (eval mode, no gradients, its own dtype) and run once per batch without gradient. Under
    DeepSpeed ZeRO-3 it becomes an inference engine holding only this rank's parameter shards; under FSDP it is
    sharded like the student; otherwise it is moved to the device as is (never wrapped in DDP: it has no gradients).

    Logged every ``logging_steps``: ``ce_loss``, ``kd_loss`` (per loss token), ``teacher_entropy`` and
    ``student_entropy`` (means at ``entropy_temperature`` over response tokens) and ``ea_weight_mean/min/max``.
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
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, EAKDConfig):
            raise TypeError(f"args must be an EAKDConfig, got {type(args).__name__}")
        if isinstance(model, str):
            model = load_causal_lm(model, args.model_dtype, args.trust_remote_code, args.attn_implementation)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the student tokenizer) or a data_collator")
            data_collator = DistillationCollator(processing_class.pad_token_id)
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
        if args.kd_ratio > 0:
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
        """``(1 - kd_ratio) * CE + kd_ratio * (EA-)KD`` over response tokens, divided by the global token count.

        The fused chunked path (:func:`eakd_llm.chunked.fused_distillation_loss`) is used when the config asks for it
        and the models allow it; it never holds full-vocabulary logits. Otherwise both models' logits are computed.
        """
        args: EAKDConfig = self.args
        labels = inputs["labels"][:, 1:]  # position t predicts token t+1
        forward_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() > 0:
            # nn.DataParallel (one process, several GPUs): the Trainer repeats the count per GPU, but this loss is
            # computed once on the gathered outputs.
            num_items_in_batch = num_items_in_batch.reshape(-1)[0]
        num_tokens = (labels != IGNORE_INDEX).sum()
        denominator = loss_denominator(num_tokens, num_items_in_batch)

        outputs_wanted = return_outputs and not args.prediction_loss_only  # logits for metrics: full path
        blocker = "outputs requested" if outputs_wanted else self._fused_blocker(model)
        self._log_loss_path(model, blocker)
        if blocker is None:
            loss, stats, outputs = self._fused_loss(model, forward_inputs, labels, denominator)
        else:
            loss, stats, outputs = self._full_logits_loss(model, forward_inputs, labels, denominator)

        if loss is None:  # a non-finite batch skipped by ``nonfinite_logits: skip``
            loss = _zero_loss(model)
        else:
            if args.average_tokens_across_devices and num_items_in_batch is not None:
                # The denominator counts every process's tokens while DDP averages gradients: undo the average.
                loss = loss * self.accelerator.num_processes
            if num_tokens > 0:
                mode = "train" if model.training else "eval"
                for key, value in stats.items():
                    if key != "num_tokens":
                        self._metrics[mode][key].append(float(value))
        return (loss, outputs) if return_outputs else loss

    def _full_logits_loss(self, model, forward_inputs, labels, denominator):
        """The reference path: full logits of both models, :func:`eakd_llm.losses.distillation_loss`."""
        args: EAKDConfig = self.args
        outputs = model(**forward_inputs, use_cache=False)
        student_logits = outputs.logits[:, :-1]
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**forward_inputs, use_cache=False).logits[:, :-1]
        mask = labels != IGNORE_INDEX
        # Only response positions matter (as in the fused path): the prompt and padding may hold anything.
        named = (("teacher", teacher_logits), ("student", student_logits))
        bad = [n for n, t in named if t is not None and not torch.isfinite(t[mask]).all()]
        if not self._finite_or_skip(bad):
            return None, {}, outputs

        num_tokens = mask.sum().clamp(min=1)
        ce_sum = F.cross_entropy(student_logits[mask].float(), labels[mask], reduction="sum")
        loss = (1.0 - args.kd_ratio) * ce_sum / denominator
        stats: dict[str, torch.Tensor] = {"ce_loss": ce_sum.detach() / num_tokens}
        if teacher_logits is not None:
            vocab = self.vocab_size
            kd, kd_stats = distillation_loss(
                student_logits[..., :vocab],
                teacher_logits[..., :vocab],
                labels,
                num_items_in_batch=denominator,
                return_stats=True,
                **_divergence_kwargs(args),
            )
            loss = loss + args.kd_ratio * args.kd_scale * kd
            stats["kd_loss"] = args.kd_scale * kd.detach() * denominator / num_tokens
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

    def _fused_loss(self, model, forward_inputs, labels, denominator):
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
            labels, self.args, self.vocab_size, denominator,
        )
        if bad is not None and not self._finite_or_skip(bad):  # e.g. an overflow in the projection
            return None, {}, outputs
        return loss, stats, outputs

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

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        is_eval_log = any(key.startswith("eval") and key.endswith("_loss") for key in logs)
        if "loss" not in logs and not is_eval_log:  # e.g. the final train summary
            return super().log(logs, *args, **kwargs)
        metrics = self._reduce_metrics(self._metrics[mode])
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        self._metrics[mode].clear()
        return super().log(logs, *args, **kwargs)

    def _reduce_metrics(self, metrics: dict[str, list[float]]) -> dict[str, float]:
        """Aggregate the steps since the last log, then across processes (every rank calls ``log``)."""
        keys = ("ce_loss", "kd_loss", "teacher_entropy", "student_entropy", "ea_weight_mean", *_MIN_KEYS, *_MAX_KEYS)
        local = []
        for key in keys:
            values = metrics.get(key, [])
            if not values:
                local.append(math.nan)
            elif key in _MIN_KEYS:
                local.append(min(values))
            elif key in _MAX_KEYS:
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
            if key in _MIN_KEYS:
                out[key] = column.min().item()
            elif key in _MAX_KEYS:
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str] | None]:
    """The trainer's fused loss from both models' final hidden states and their ``lm_head`` modules.

    Sharded heads are gathered once for the whole call, not per chunk. The teacher's head and a frozen student head (a
    ZeRO-3 partition, an FSDP2 ``DTensor``) are gathered for the call and released when it returns: the fused loss
    computes its gradients during the forward call, so the backward pass never needs them again. A trainable ZeRO-3
    student head is instead called as a module whose forward is the fused loss: ZeRO-3's own hooks gather its
    parameters for the call, gather them again for the backward, and reduce-scatter their gradient like any layer's.
    Returns ``(loss, stats, bad)``: ``bad`` names the models whose inputs hold non-finite values when the loss is not
    finite (``None`` when it is finite).
    """
    s_head = student.get_output_embeddings()
    s_scale, s_cap = _logit_transform(student)
    with contextlib.ExitStack() as stack:
        teacher_kwargs: dict[str, Any] = {"teacher_hidden": None, "teacher_weight": None}
        t_weight = None
        if teacher is not None:
            t_weight, t_bias = stack.enter_context(full_head(teacher.get_output_embeddings()))
            t_scale, t_cap = _logit_transform(teacher)
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
                kd_ratio=args.kd_ratio,
                kd_scale=args.kd_scale,
                num_items_in_batch=denominator,
                student_logit_scale=s_scale,
                student_softcap=s_cap,
                chunk_size=args.loss_chunk_size,
                compile=args.compile_loss_on(student_hidden.device.type),
                return_stats=True,
                **teacher_kwargs,
                **_divergence_kwargs(args),
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


def _logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) that the model applies to its logits after the projection (1, None for most models)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling  # Granite divides its logits
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


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
