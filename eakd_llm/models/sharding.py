"""DeepSpeed / FSDP plumbing, apart from the loss: placing the frozen teacher, reading sharded ``lm_head`` weights,
gathering parameters for generation, and the final save.

Every function here works on plain modules too (no DeepSpeed, no FSDP), so callers never branch on the launch mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any

from torch import nn

from ..loss.chunked import is_dtensor

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Unwrapping and inspecting
# ----------------------------------------------------------------------------------------------------------------


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The causal-LM module under DDP / DeepSpeed / FSDP1 wrappers and a PEFT wrapper."""
    # DDP, FSDP1 and DeepSpeed engines keep the model in ``.module`` (a DeepSpeed engine also forwards unknown
    # attributes to it, so hasattr(engine, "get_output_embeddings") is no test of being unwrapped).
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(module: nn.Module) -> bool:
    """Does the module hold ZeRO-3 partitioned or FSDP2 (``DTensor``) parameters?"""
    return any(hasattr(p, "ds_id") or is_dtensor(p) for p in module.parameters(recurse=False))


def zero3_trainable(head: nn.Module) -> bool:
    """A ZeRO-3-partitioned head with a trainable parameter."""
    return any(hasattr(p, "ds_id") and p.requires_grad for p in head.parameters(recurse=False))


@contextlib.contextmanager
def full_head(head: nn.Module):
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
    if is_dtensor(weight) or (bias is not None and is_dtensor(bias)):
        yield tuple(p.detach().full_tensor() if p is not None and is_dtensor(p) else p for p in (weight, bias))
        return
    yield weight, bias


@contextlib.contextmanager
def head_forward(head: nn.Module, forward):
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


def parameter_elements(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model), for ZeRO-3 partitions, FSDP2 DTensors and plain
    parameters alike."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition, the full shape's size
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        elif hasattr(p, "_unpadded_unsharded_size"):  # an FSDP1 FlatParameter (sharded or not)
            local, full = local + p.numel(), full + p._unpadded_unsharded_size.numel()
        elif is_dtensor(p):
            local, full = local + p.to_local().numel(), full + p.numel()
        else:
            local, full = local + p.numel(), full + p.numel()
    return local, full


# ----------------------------------------------------------------------------------------------------------------
# Sharded teachers
# ----------------------------------------------------------------------------------------------------------------


def place_teacher(teacher: nn.Module, accelerator, args: Any, deepspeed: bool, fsdp: bool) -> tuple[nn.Module, str]:
    """The frozen teacher (eval mode, no gradients) placed as the run is launched, and a description of where.

    DeepSpeed: an inference engine with the run's ZeRO settings (ZeRO-3 shards it). FSDP: sharded with the run's
    plugin. Otherwise moved to the device as is, never wrapped in DDP (it has no gradients).
    """
    teacher.eval()
    teacher.requires_grad_(False)
    if deepspeed:
        teacher = deepspeed_inference_engine(teacher, accelerator, args)
        return teacher, f"DeepSpeed ZeRO-{teacher.zero_optimization_stage()} inference engine"
    if fsdp:
        return fsdp_shard_teacher(teacher, accelerator), "FSDP-sharded"
    return teacher.to(accelerator.device), "replicated"


def deepspeed_inference_engine(teacher: nn.Module, accelerator, args: Any) -> nn.Module:
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


def fsdp_shard_teacher(teacher: nn.Module, accelerator) -> nn.Module:
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


# ----------------------------------------------------------------------------------------------------------------
# Generation with sharded models
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """The unwrapped causal LM with whole parameters for ``generate``, gathered once for the call, not per token.

    ZeRO-3: every partitioned parameter is all-gathered (``GatheredParameters``) for the block and re-partitioned on
    exit. FSDP2: every ``fully_shard``-ed module is unsharded and kept unsharded across its forwards (no reshard after
    each token's forward), then resharded. FSDP1: ``summon_full_params``. DDP and plain models: unwrapped as they are.
    The block must not change the parameters (generation only reads them).
    """
    inner = model
    while isinstance(getattr(inner, "module", None), nn.Module):  # DDP / DeepSpeed engine / FSDP1 wrapper
        inner = inner.module
    partitioned = [p for p in inner.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        # ZeRO-3's per-module hooks would release the gathered parameters after every module's forward (and gather
        # them again for the next token): take them off for the call, as DeepSpeed's own unwrap_model_for_generation.
        offload = getattr(model, "optimizer", None)
        offload = getattr(offload, "parameter_offload", offload)
        hooked = offload is not None and hasattr(offload, "forward_hooks") and hasattr(offload, "module")
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            if hooked:
                for param in partitioned:  # else releasing them can raise "still active in submodules"
                    getattr(param, "ds_active_sub_modules", set()).clear()
                for hook in offload.forward_hooks + offload.backward_hooks:
                    hook.remove()
                offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield inner
            finally:
                if hooked:
                    offload._register_deepspeed_module(offload.module)
        return
    fsdp2 = [m for m in inner.modules() if hasattr(m, "unshard") and hasattr(m, "set_reshard_after_forward")]
    if fsdp2:
        # Keep every module unsharded across the call, then put back each module's own reshard setting (the plugin's,
        # and FSDP2's special case of the root), which set_reshard_after_forward would otherwise overwrite.
        saved = []
        for module in fsdp2:
            state = module._get_fsdp_state()
            saved.append((state, state._auto_reshard_after_forward,
                          [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]))
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield inner
        finally:
            for state, auto, groups in saved:
                state._auto_reshard_after_forward = auto
                for group, info in groups:
                    group.post_forward_mesh_info = info
            for module in fsdp2:
                module.reshard()
        return
    if model is not inner and type(model).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, recurse=True, writeback=False):
            yield inner
        return
    yield inner


# ----------------------------------------------------------------------------------------------------------------
# The final save
# ----------------------------------------------------------------------------------------------------------------


class SaveError(RuntimeError):
    """The final save left no loadable model (or adapter) and tokenizer in the output folder."""


_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def save_final_model(trainer, output_dir: str) -> None:
    """``trainer.save_model(output_dir)`` that always writes a loadable model, under every launch mode.

    FSDP: the plugin's ``SHARDED_STATE_DICT`` (FSDP2's default, good for checkpoints) makes ``Trainer.save_model`` write
    nothing at all; the final save switches to ``FULL_STATE_DICT`` (gathered on rank 0, offloaded to the CPU) first.
    Every process must call this (the gathers are collective). The main process then checks the folder
    (:func:`check_saved_model`) and raises :class:`SaveError` if it holds no loadable weights, config or tokenizer.
    """
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            logger.info("final save: FSDP state_dict_type %s -> FULL_STATE_DICT (a sharded state dict is no model)",
                        plugin.state_dict_type)
            plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(output_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        check_saved_model(output_dir, adapter=hasattr(trainer.model, "peft_config"))


def check_saved_model(output_dir: str, adapter: bool) -> None:
    """Raise :class:`SaveError` unless ``output_dir`` holds loadable weights (or a LoRA adapter) and a tokenizer.

    Reads only file names, the config and the safetensors headers: cheap even for a 70B model.
    """
    present = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    wanted = _ADAPTER_FILES if adapter else _WEIGHT_FILES
    config = "adapter_config.json" if adapter else "config.json"
    problems = []
    weights = [name for name in wanted if name in present]
    if not weights:
        problems.append(f"no {' or '.join(wanted)}")
    if config not in present:
        problems.append(f"no {config}")
    if not any(name in present for name in _TOKENIZER_FILES):
        problems.append("no tokenizer files")
    for name in weights:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(os.path.join(output_dir, name), framework="pt") as handle:
                    if not list(handle.keys()):
                        problems.append(f"{name} holds no tensors")
            except Exception as err:  # a truncated or empty file
                problems.append(f"{name} is unreadable ({type(err).__name__}: {err})")
    if problems:
        hint = (" Under DeepSpeed ZeRO-3 set zero3_save_16bit_model: true in the accelerate config (or convert the "
                "checkpoint with zero_to_fp32.py)." if any(n.startswith("global_step") for n in present) else "")
        raise SaveError(
            f"the final save left no loadable {'adapter' if adapter else 'model'} in {output_dir}: "
            f"{'; '.join(problems)} (files present: {', '.join(present) or 'none'}).{hint}"
        )
