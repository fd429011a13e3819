"""`EAKDTrainer`: a `transformers.Trainer` whose loss is ``(1 - kd_ratio) * CE + kd_ratio * (EA-)KD``."""

from __future__ import annotations

import contextlib
import copy
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

from .chunked import _is_dtensor, fused_distillation_loss
from .config import EAKDConfig
from .data import DistillationCollator
from .losses import IGNORE_INDEX, distillation_loss, loss_denominator
from .models import check_tokenizers_match, load_causal_lm, load_tokenizer, shared_vocab_size

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
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            teacher = _deepspeed_inference_engine(teacher, self.accelerator, self.args)
            placement = f"DeepSpeed ZeRO-{teacher.zero_optimization_stage()} inference engine"
        elif self.is_fsdp_enabled:
            teacher = _fsdp_shard(teacher, self.accelerator)
            placement = "FSDP-sharded"
        else:
            teacher = teacher.to(self.accelerator.device)
            placement = "replicated"
        local, full = _parameter_elements(teacher)
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
            loss = loss + args.kd_ratio * kd
            stats["kd_loss"] = kd.detach() * denominator / num_tokens
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
        models = [_causal_lm(model)] + ([] if self.teacher is None else [_causal_lm(self.teacher)])
        for who, m in zip(("student", "teacher"), models):
            if not _projects_separately(m):
                return f"the {who}'s lm_head is not a plain nn.Linear or its forward has no logits_to_keep"
        # A trainable FSDP2-sharded student head would need its gradient routed through FSDP's reduce-scatter; a
        # ZeRO-3 one is called as a module, whose hooks do that (the teacher's head is frozen: gathering it is enough).
        # Under FSDP2 the head may be unsharded at this moment (accelerate does not reshard the root after forward):
        # decide by who owns it, not by its current state.
        head = models[0].get_output_embeddings()
        trainable = any(p.requires_grad for p in head.parameters())
        if trainable and (self.is_fsdp_enabled or (_is_sharded(head) and not _zero3_trainable(head))):
            return "the student's lm_head is FSDP2-sharded and trainable"
        return None

    def _log_loss_path(self, model: nn.Module, blocker: str | None) -> None:
        """Say once which loss path runs (``blocker``: why not the fused one, ``None`` when it runs)."""
        if blocker is None:
            models = [model] + ([] if self.teacher is None else [self.teacher])
            sharded = self.is_fsdp_enabled or any(_is_sharded(_causal_lm(m).get_output_embeddings()) for m in models)
            path = (f"fused chunked (chunk {self.args.loss_chunk_size}{', compiled' if self.args.compile_loss else ''}"
                    f"{', sharded heads gathered once per step' if sharded else ''})")
        else:
            path = f"full logits ({blocker})"
        if path != self._loss_path:
            self._loss_path = path
            logger.info("EA-KD loss path: %s", path)

    def _fused_loss(self, model, forward_inputs, labels, denominator):
        """CE and KD from the final hidden states, projected chunk by chunk (see :mod:`eakd_llm.chunked`)."""
        # logits_to_keep=1: the model projects one position only; the loss projects the response positions itself.
        outputs = model(**forward_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        student_hidden = outputs.hidden_states[-1][:, :-1]
        t_hidden = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(**forward_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            t_hidden = t_out.hidden_states[-1][:, :-1]
            del t_out  # the other layers' hidden states are not needed: free them before the loss
        loss, stats, bad = fused_head_loss(
            _causal_lm(model), student_hidden, None if self.teacher is None else _causal_lm(self.teacher), t_hidden,
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
            t_weight, t_bias = stack.enter_context(_full_head(teacher.get_output_embeddings()))
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
                num_items_in_batch=denominator,
                student_logit_scale=s_scale,
                student_softcap=s_cap,
                chunk_size=args.loss_chunk_size,
                compile=args.compile_loss,
                return_stats=True,
                **teacher_kwargs,
                **_divergence_kwargs(args),
            )
            stats.update(chunk_stats)
            return loss

        if _zero3_trainable(s_head):
            with _head_forward(s_head, lambda hidden: loss_from_head(hidden, s_head.weight, s_head.bias)):
                loss = s_head(student_hidden)
            s_weight = None  # partitioned again: not inspectable below
        else:
            s_weight, s_bias = stack.enter_context(_full_head(s_head))
            loss = loss_from_head(student_hidden, s_weight, s_bias)
        bad = None
        if not torch.isfinite(loss):
            suspects = (("teacher", (teacher_hidden, t_weight)), ("student", (student_hidden, s_weight)))
            bad = [name for name, tensors in suspects
                   if any(t is not None and not torch.isfinite(t).all() for t in tensors)] or ["teacher or student"]
    return loss, stats, bad


def _zero3_trainable(head: nn.Module) -> bool:
    """A ZeRO-3-partitioned head with a trainable parameter."""
    return any(hasattr(p, "ds_id") and p.requires_grad for p in head.parameters(recurse=False))


@contextlib.contextmanager
def _head_forward(head: nn.Module, forward):
    """Temporarily make ``forward`` the head's forward (an instance attribute, so ``head(...)`` runs its hooks)."""
    own = head.__dict__.get("forward")  # an instance-level forward someone else installed (e.g. an accelerate hook)
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = own


def _parameter_elements(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model), for ZeRO-3 partitions, FSDP2 DTensors and plain
    parameters alike."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition, the full shape's size
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        elif hasattr(p, "_unpadded_unsharded_size"):  # an FSDP1 FlatParameter (sharded or not)
            local, full = local + p.numel(), full + p._unpadded_unsharded_size.numel()
        elif _is_dtensor(p):
            local, full = local + p.to_local().numel(), full + p.numel()
        else:
            local, full = local + p.numel(), full + p.numel()
    return local, full


def _is_sharded(module: nn.Module) -> bool:
    """Does the module hold ZeRO-3 partitioned or FSDP2 (``DTensor``) parameters?"""
    return any(hasattr(p, "ds_id") or _is_dtensor(p) for p in module.parameters(recurse=False))


@contextlib.contextmanager
def _full_head(head: nn.Module):
    """``(weight, bias)`` of a linear head as full tensors while the context is open.

    ZeRO-3: the partitioned parameters are all-gathered (``GatheredParameters``) and re-partitioned on exit. FSDP2:
    ``full_tensor()`` of a frozen ``DTensor`` parameter. Unsharded heads are yielded as they are (gradients flow).
    """
    weight, bias = head.weight, head.bias
    if any(hasattr(p, "ds_id") for p in (weight, bias) if p is not None):
        import deepspeed

        params = [p for p in (weight, bias) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield weight, bias
        return
    if _is_dtensor(weight) or (bias is not None and _is_dtensor(bias)):
        yield tuple(p.detach().full_tensor() if p is not None and _is_dtensor(p) else p for p in (weight, bias))
        return
    yield weight, bias


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
    }


def _causal_lm(model: nn.Module) -> nn.Module:
    """The causal-LM module under DDP / DeepSpeed / FSDP1 wrappers and a PEFT wrapper."""
    # DDP, FSDP1 and DeepSpeed engines keep the model in ``.module`` (a DeepSpeed engine also forwards unknown
    # attributes to it, so hasattr(engine, "get_output_embeddings") is no test of being unwrapped).
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


# ----------------------------------------------------------------------------------------------------------------
# Sharded teachers
# ----------------------------------------------------------------------------------------------------------------


def _deepspeed_inference_engine(teacher: nn.Module, accelerator, args: EAKDConfig) -> nn.Module:
    """Wrap the frozen teacher in a DeepSpeed engine with the run's ZeRO settings (stage 3 shards it)."""
    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = ds_config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
        if hidden is not None:
            # Numeric values for the "auto" bucket sizes, as the Trainer computes them for the student.
            zero["reduce_bucket_size"] = hidden * hidden
            zero["stage3_param_persistence_threshold"] = 10 * hidden
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    else:
        zero["stage"] = 0  # ZeRO-1/2 only shard optimizer state and gradients, which a frozen teacher has not
    for key in ("optimizer", "scheduler"):
        ds_config.pop(key, None)
    # Batch sizes mean nothing to a forward-only engine, but DeepSpeed checks that they agree with the world size:
    # give it the per-device size and let it derive the global one.
    ds_config.pop("train_batch_size", None)
    for key, value in (("train_micro_batch_size_per_gpu", args.per_device_train_batch_size),
                       ("gradient_accumulation_steps", args.gradient_accumulation_steps)):
        if not isinstance(ds_config.get(key), int):
            ds_config[key] = value
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine


def shard_teacher_fsdp2(
    teacher: nn.Module,
    mesh=None,
    mp_policy=None,
    offload_policy=None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a frozen teacher with FSDP2: ``fully_shard`` on every decoder layer (``_no_split_modules``), then the root.

    Each rank keeps 1/world of every parameter; a layer's parameters are gathered for its forward and freed after.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward}
    for key, value in (("mesh", mesh), ("mp_policy", mp_policy), ("offload_policy", offload_policy)):
        if value is not None:
            kwargs[key] = value
    layer_names = set(getattr(teacher, "_no_split_modules", None) or ())
    layers = [m for m in teacher.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ValueError(f"{type(teacher).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher


def _fsdp_shard(teacher: nn.Module, accelerator) -> nn.Module:
    """Shard the frozen teacher with the run's FSDP plugin (FSDP2 ``fully_shard`` or FSDP1 wrapping)."""
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) == 2:
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None and getattr(accelerator, "parallelism_config", None) is not None:
            mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

        mp_policy, offload = plugin.mixed_precision_policy, plugin.cpu_offload
        # No teacher.to(device) first: fully_shard moves one layer's parameters at a time to the mesh's device and
        # shards them there (an offload policy then copies the shards back to the CPU), so a teacher larger than one
        # GPU never has to fit on one.
        return shard_teacher_fsdp2(
            teacher,
            mesh=mesh,
            mp_policy=mp_policy if isinstance(mp_policy, MixedPrecisionPolicy) else None,
            offload_policy=offload if isinstance(offload, OffloadPolicy) else None,
            reshard_after_forward=bool(getattr(plugin, "reshard_after_forward", True)),
        )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # set_auto_wrap_policy stores a policy bound to the teacher's layer classes: do it on a copy, so the student is
    # still wrapped by its own classes.
    plugin = copy.copy(plugin)
    plugin.set_auto_wrap_policy(teacher)
    return FSDP(
        teacher,
        sharding_strategy=plugin.sharding_strategy,
        cpu_offload=plugin.cpu_offload,
        auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy,
        sync_module_states=plugin.sync_module_states,
        backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch,
        use_orig_params=plugin.use_orig_params,
        limit_all_gathers=plugin.limit_all_gathers,
        device_id=accelerator.device,
    )
