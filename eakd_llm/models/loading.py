"""Loading students, teachers and tokenizers; teacher/student compatibility checks; LoRA."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..config.eakd_config import ConfigError, EAKDConfig, looks_like_local_path

logger = logging.getLogger(__name__)


def resolve_dtype(name: str | None) -> str | torch.dtype:
    """``"auto"`` stays a string for from_pretrained; other names become torch dtypes."""
    if name is None or name == "auto":
        return "auto"
    return getattr(torch, name)


def _remote_code_error(err: Exception, key: str, path: str) -> ConfigError | None:
    text = str(err)
    if "trust_remote_code" in text:
        return ConfigError(
            f"{key}={path!r} contains custom code that would run on load; trust_remote_code is off. Review the code, "
            "then set trust_remote_code: true in the recipe to allow it"
        )
    return None


def _check_exists(path: str, key: str) -> None:
    # A path-like string that does not exist is almost always a typo, not a hub id: say so before the hub is asked.
    if looks_like_local_path(path) and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"{key}: {path!r} does not exist")


def load_tokenizer(path: str, trust_remote_code: bool = False, key: str = "model_name_or_path"):
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed (EOS is reused when the tokenizer has none)."""
    from transformers import AutoTokenizer

    _check_exists(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        message = f"{key}: cannot load a tokenizer from {path!r}: {err}"
        raise _remote_code_error(err, key, path) or ConfigError(message) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_causal_lm(
    path: str,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    key: str = "model_name_or_path",
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with config errors turned into :class:`ConfigError`."""
    from transformers import AutoModelForCausalLM

    _check_exists(path, key)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        message = f"{key}: cannot load a model from {path!r}: {err}"
        raise _remote_code_error(err, key, path) or ConfigError(message) from err


def check_trainable_student(model: nn.Module, use_peft: bool, key: str = "model_name_or_path") -> None:
    """Refuse a quantized student before training, naming the way out.

    The HF Trainer refuses it too, but only deep inside ``train()`` ("cannot perform fine-tuning on purely quantized
    models"). A config that still carries a ``quantization_config`` is enough to make the loaded model quantized, even
    when its weights are dense (e.g. a GGUF dequantised and saved by hand). GGUF cannot be trained at all, not even
    through LoRA; other methods (bitsandbytes 4/8-bit, ...) train a LoRA adapter.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is None and not getattr(base, "is_quantized", False):
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "unknown method")
    method = getattr(method, "value", method)
    dequantise = ("dequantise it first: `eakd-llm fetch-model FILE.gguf --output DIR` for a GGUF file (weights that "
                  "are already dense only need quantization_config removed from config.json)")
    if quantizer is not None and not getattr(quantizer, "is_trainable", True):
        raise ConfigError(f"{key}: the student is quantized ({method}, from the quantization_config of its "
                          f"config.json) and {method} models cannot be trained, not even through LoRA; {dequantise}")
    if not (use_peft or hasattr(model, "peft_config")):
        raise ConfigError(f"{key}: the student is quantized ({method}) and its weights cannot be trained in full: "
                          f"set use_peft: true to train a LoRA adapter on it, or {dequantise}")


def check_tokenizers_match(student_tokenizer, teacher_tokenizer, max_examples: int = 5) -> None:
    """Teacher and student must map every token they share by id range to the same id.

    KD compares distributions id by id, so a token with different ids in the two vocabularies would silently teach
    the wrong thing. Extra tokens beyond the shorter vocabulary (added specials, padding) are allowed.
    """
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    shared = min(len(student_vocab), len(teacher_vocab))
    teacher_by_id = {i: tok for tok, i in teacher_vocab.items()}
    mismatches = []
    for token, idx in student_vocab.items():
        if idx < shared and teacher_by_id.get(idx) != token:
            mismatches.append((idx, token, teacher_by_id.get(idx)))
    if mismatches:
        mismatches.sort()
        shown = "; ".join(f"id {i}: student {s!r} vs teacher {t!r}" for i, s, t in mismatches[:max_examples])
        raise ConfigError(
            f"teacher and student tokenizers disagree on {len(mismatches)} of the {shared} shared token ids ({shown}). "
            "EA-KD compares distributions token by token: use a teacher and a student from the same tokenizer family"
        )
    for name in ("eos_token_id", "bos_token_id"):
        s_id, t_id = getattr(student_tokenizer, name, None), getattr(teacher_tokenizer, name, None)
        if s_id is not None and t_id is not None and s_id != t_id:
            raise ConfigError(f"teacher and student tokenizers have different {name}: {t_id} vs {s_id}")


def shared_vocab_size(student: nn.Module, teacher: nn.Module, tokenizer=None) -> int:
    """The vocabulary both models' logits are compared on.

    Vocabularies that differ only by padding rows (e.g. Qwen2.5 7B's 152064 vs 0.5B's 151936, both above the
    tokenizer's 151665 tokens) are aligned by keeping the first ``min`` rows, which holds every real token; anything
    else is an error.
    """
    v_student, v_teacher = _config_vocab(student), _config_vocab(teacher)
    shared = min(v_student, v_teacher)
    if tokenizer is not None and shared < len(tokenizer):
        raise ConfigError(
            f"teacher vocabulary ({v_teacher}) and student vocabulary ({v_student}) differ by more than padding: the "
            f"smaller one cannot hold all {len(tokenizer)} tokens of the tokenizer"
        )
    if v_student != v_teacher:
        logger.info("aligning vocabularies: student %d, teacher %d -> comparing the first %d", v_student, v_teacher,
                    shared)
    return shared


def check_head_vocabulary(head_rows: int, student: nn.Module, tokenizer) -> int:
    """:func:`shared_vocab_size` for a teacher known by its head's rows alone (a served teacher)."""
    v_student = _config_vocab(student)
    shared = min(v_student, head_rows)
    if shared < len(tokenizer):
        raise ConfigError(f"the teacher's head ({head_rows} rows) and the student's vocabulary ({v_student}) differ "
                          f"by more than padding: the smaller one cannot hold all {len(tokenizer)} tokens of the "
                          "tokenizer")
    return shared


def _config_vocab(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is None:
        raise ConfigError(f"cannot read vocab_size from the config of {type(model).__name__}")
    return int(vocab)


def apply_lora(model: nn.Module, config: EAKDConfig) -> nn.Module:
    """Wrap the student in a LoRA adapter (``peft``) as the config describes; only the adapter is trained."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear",
    )
    if config.gradient_checkpointing:
        # Frozen embeddings would leave checkpointed blocks without an input that requires grad.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config)


def final_hidden_states(model: nn.Module, **inputs) -> torch.Tensor:
    """``[B, T, H]`` final hidden states (after the final norm) of a causal LM, keeping no other layer's.

    ``output_hidden_states=True`` would keep every layer's hidden states until the loss is done (about 0.85 GB for a
    7B teacher at 4 x 1024); instead a forward hook on the decoder (``get_decoder()``, under any DDP / DeepSpeed /
    FSDP / PEFT wrapper) catches its output, and the model projects a single position (``logits_to_keep=1``). A
    module with its own ``final_hidden_states`` method (e.g. the demo's cached teacher) is asked directly.
    """
    own = getattr(model, "final_hidden_states", None)
    if callable(own):
        return own(**inputs)
    from .sharding import unwrap_causal_lm

    decoder = unwrap_causal_lm(model).get_decoder()
    captured: list[torch.Tensor] = []

    def keep_output(module, args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep_output)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one output of {type(decoder).__name__} per forward, caught {len(captured)}")
    return captured[0]


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the models are called with: a padded batch's attention mask, or a packed batch's position ids (no mask:
    transformers then keeps the documents apart, see :mod:`eakd_llm.data.packing`)."""
    if "position_ids" in inputs:
        return {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) that the model applies to its logits after the projection (1, None for most models)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling  # Granite divides its logits
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def load_output_head(path: str, dtype: str | None = None, trust_remote_code: bool = False,
                     key: str = "teacher_model_name_or_path") -> tuple[torch.Tensor, torch.Tensor | None, float,
                                                                       float | None]:
    """``(weight, bias, scale, softcap)`` of a causal LM's output head, read alone from its safetensors files: what a
    served teacher's final hidden states are projected through (the rest of the model is never loaded).

    The head's tensor names come from the model built on the meta device (no memory); a tied head (no tensor of its
    own in the files) reads the input embedding's."""
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = os.path.expanduser(path)
    _check_exists(folder, key)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names: dict[int, list[str]] = {}  # a tied parameter has several names
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    head = model.get_output_embeddings()
    wanted = {"weight": names[id(head.weight)]}  # a tied head's parameter carries the embedding's name too
    if getattr(head, "bias", None) is not None:
        wanted["bias"] = names[id(head.bias)]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = json.load(handle)["weight_map"]
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
            files = dict.fromkeys(handle.keys(), "model.safetensors")
    else:
        raise ConfigError(f"{key} {path!r} has no safetensors weights to read the head from")
    found: dict[str, torch.Tensor] = {}
    for part, candidates in wanted.items():
        name = next((n for n in candidates if n in files), None)
        if name is None:
            raise ConfigError(f"{key} {path!r}: none of {candidates} is in its weight files")
        with safe_open(os.path.join(folder, files[name]), framework="pt") as handle:
            found[part] = handle.get_tensor(name)
    target = resolve_dtype(dtype)
    if isinstance(target, torch.dtype):
        found = {part: tensor.to(target) for part, tensor in found.items()}
    scale, softcap = logit_transform(model)
    return found["weight"], found.get("bias"), scale, softcap
