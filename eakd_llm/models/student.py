"""Loading the student to train: ``model_name_or_path``'s weights, or a trained checkpoint's (``student_init_from``).

On-policy distillation as GKD and DistiLLM run it starts from a student already trained on the data (e.g. the same
seed's off-policy run), so its first samples are worth scoring. ``student_init_from`` names that checkpoint: a full
model folder (config.json + weights, loaded as it was saved) or, for a LoRA student, an adapter folder
(adapter_config.json), whose adapter is put back on ``model_name_or_path`` and keeps training.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from ..config.eakd_config import ConfigError, EAKDConfig, check_student_init_folder
from .loading import apply_lora, check_trainable_student, load_causal_lm

logger = logging.getLogger(__name__)

# Config attributes (through get_text_config and attribute_map, so gpt2's n_embd reads as hidden_size) that fix the
# parameters' shapes: a checkpoint differing in one is another model, not a trained copy of the student.
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size")


def load_student(config: EAKDConfig) -> nn.Module:
    """The student as the run trains it: loaded, checked trainable, LoRA-wrapped with ``use_peft``."""
    init = config.student_init_from
    kind = check_student_init_folder(init, config.use_peft) if init else None
    if kind == "adapter":
        model = _load(config, config.model_name_or_path, "model_name_or_path")
        check_trainable_student(model, use_peft=True)
        return load_lora_adapter(model, init, config)
    if kind == "model":
        model = _load(config, init, "student_init_from")
        check_same_architecture(model, config)
        logger.info("student: weights from student_init_from %s (architecture of %s)", init,
                    config.model_name_or_path)
    else:
        model = _load(config, config.model_name_or_path, "model_name_or_path")
    # before the teacher is loaded: the HF Trainer would say so late
    check_trainable_student(model, config.use_peft, key="student_init_from" if kind else "model_name_or_path")
    return apply_lora(model, config) if config.use_peft else model


def _load(config: EAKDConfig, path: str, key: str) -> nn.Module:
    return load_causal_lm(os.path.expanduser(path) if key == "student_init_from" else path, config.model_dtype,
                          config.trust_remote_code, config.attn_implementation, key=key)


def architecture(model_config) -> dict[str, object]:
    """The shape-defining values of a model config (:data:`ARCHITECTURE_KEYS`; absent ones are None)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return {key: getattr(text, key, None) for key in ARCHITECTURE_KEYS}


def check_same_architecture(model: nn.Module, config: EAKDConfig) -> None:
    """``student_init_from``'s model must be ``model_name_or_path``'s architecture (a wrong folder fails here)."""
    from transformers import AutoConfig

    try:
        expected = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model_name_or_path: cannot read the student config from "
                          f"{config.model_name_or_path!r}: {err}") from err
    want, got = architecture(expected), architecture(model.config)
    differ = [f"{key} {got[key]} vs {want[key]}" for key in ARCHITECTURE_KEYS if got[key] != want[key]]
    if differ:
        raise ConfigError(f"student_init_from: {config.student_init_from!r} is not the architecture of "
                          f"model_name_or_path {config.model_name_or_path!r}: {', '.join(differ)}")


def load_lora_adapter(model: nn.Module, folder: str, config: EAKDConfig) -> nn.Module:
    """``model`` wrapped in the LoRA adapter saved in ``folder``, trainable. The adapter's own settings (rank, alpha,
    target modules, dropout) apply, not the lora_* keys."""
    from peft import PeftConfig, PeftModel

    folder = os.path.expanduser(folder)
    saved = PeftConfig.from_pretrained(folder)
    differ = [f"{key} {getattr(saved, name, None)} (recipe {getattr(config, key)})"
              for key, name in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"))
              if getattr(saved, name, None) != getattr(config, key)]
    if differ:
        logger.warning("student_init_from: the adapter's own LoRA settings apply: %s", ", ".join(differ))
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # as apply_lora: checkpointed blocks need an input that requires grad
    try:
        peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"student_init_from: cannot load the LoRA adapter in {folder!r} onto model_name_or_path "
                          f"{config.model_name_or_path!r} (adapter made for {saved.base_model_name_or_path!r}): "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    logger.info("student: %s with the LoRA adapter of student_init_from %s", config.model_name_or_path, folder)
    return peft_model
