"""The training entry point shared by ``eakd-llm train`` and ``scripts/distill.py``."""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import set_seed

from ..config.eakd_config import ConfigError, EAKDConfig
from ..data.dataset import build_dataset, load_split
from ..models.loading import (
    check_head_vocabulary,
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    shared_vocab_size,
)
from ..models.sharding import save_final_model
from ..models.student import load_student
from ..teacher.cache import CacheManifest, TeacherCache, check_cache_vocabulary, check_manifest
from ..teacher.served import connect_served_teacher
from .trainer import EAKDTrainer

logger = logging.getLogger(__name__)


def prepare_run(config: EAKDConfig, teacher_model: Any = None) -> dict[str, Any]:
    """Everything a run needs, loaded and checked before any training step: tokenizers, data, models.

    The cheap checks come first (paths, tokenizers, data), the expensive ones (model weights) last, so a bad recipe
    fails in seconds. ``teacher_model``: an already loaded teacher to reuse (e.g. across the runs of a sweep).
    """
    config.validate_for_training()
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path, config.trust_remote_code,
                               key="tokenizer_name_or_path" if config.tokenizer_name_or_path else "model_name_or_path")
    cache = None
    if config.kd_ratio > 0 and config.teacher_cache:
        cache_manifest = CacheManifest.read(config.teacher_cache)  # a wrong folder fails before the data is read
    if config.kd_ratio > 0 and not config.teacher_cache:  # checked here, before data and weights are loaded
        teacher_tokenizer = load_tokenizer(
            config.teacher_model_name_or_path, config.trust_remote_code, key="teacher_model_name_or_path"
        )
        check_tokenizers_match(tokenizer, teacher_tokenizer)

    train_dataset = build_dataset(
        load_split(config.dataset_name, config.dataset_train_split, config.dataset_config),
        config,
        tokenizer,
        split=config.dataset_train_split,
        max_samples=config.max_train_samples,
    )
    eval_dataset = None
    if config.dataset_eval_split:
        eval_dataset = build_dataset(
            load_split(config.dataset_name, config.dataset_eval_split, config.dataset_config),
            config,
            tokenizer,
            split=config.dataset_eval_split,
            max_samples=config.max_eval_samples,
        )
    elif config.eval_strategy != "no":
        raise ConfigError(f"eval_strategy={config.eval_strategy.value!r} needs dataset_eval_split")
    if config.kd_ratio > 0 and config.teacher_cache:
        splits = {config.dataset_train_split: train_dataset}
        if eval_dataset is not None:
            splits[config.dataset_eval_split] = eval_dataset
        check_manifest(cache_manifest, config, tokenizer, splits)
        cache = TeacherCache(config.teacher_cache, cache_manifest)  # every shard present and readable

    served = None
    if config.kd_ratio > 0 and config.teacher_server:  # the server is checked before the student's weights load
        served = connect_served_teacher(config, tokenizer, config.teacher_server)
    model = load_student(config)  # model_name_or_path's weights or student_init_from's, LoRA-wrapped with use_peft
    teacher = teacher_model if config.kd_ratio > 0 and cache is None and served is None else None
    if config.kd_ratio > 0 and cache is None and served is None and teacher is None:
        teacher = load_causal_lm(
            config.teacher_model_name_or_path,
            config.teacher_dtype or config.model_dtype,
            config.trust_remote_code,
            config.attn_implementation,
            key="teacher_model_name_or_path",
        )
    if teacher is not None:
        shared_vocab_size(model, teacher, tokenizer)  # the vocabulary check names the real problem first
    if cache is not None:
        check_cache_vocabulary(cache.manifest, model, tokenizer)
    if served is not None:
        check_head_vocabulary(served.weight.shape[0], model, tokenizer)
    _check_token_ids(train_dataset, model, teacher)
    return {
        "model": model,
        "teacher_model": teacher,
        "processing_class": tokenizer,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        **({"teacher_cache": cache} if cache is not None else {}),
        **({"teacher_server": served} if served is not None else {}),
    }


def _check_token_ids(dataset, model, teacher, num_examples: int = 1000) -> None:
    """Token ids beyond a model's embedding table would fail deep inside the first forward pass: say so now."""
    sample = dataset.select(range(min(num_examples, len(dataset))))["input_ids"]
    max_id = max(max(ids) for ids in sample)
    for key, m in (("model_name_or_path", model), ("teacher_model_name_or_path", teacher)):
        if m is None:
            continue
        weight = m.get_input_embeddings().weight
        rows = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3 partitions: full shape
        if max_id >= rows:
            raise ConfigError(
                f"the tokenized data has token id {max_id} but the model of {key} embeds only {rows} tokens: the "
                "tokenizer does not belong to this model (or added tokens need resize_token_embeddings)"
            )


def run_training(config: EAKDConfig) -> EAKDTrainer:
    """Prepare, train (resuming when ``resume_from_checkpoint`` is set), save the final model and its tokenizer."""
    resume = config.resume_from_checkpoint
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if resume is None:
            raise ConfigError(f"resume_from_checkpoint: last, but {config.output_dir} holds no checkpoint-N folder")
    elif resume is not None and not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint: {resume!r} is not a checkpoint folder")
    parts = prepare_run(config)
    trainer = EAKDTrainer(args=config, **parts)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        if "teacher_server" in parts:  # requests asked for ahead are not waited for once the run stops
            parts["teacher_server"].close()
    save_final_model(trainer, config.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if parts["eval_dataset"] is not None:
        metrics = final_evaluation(trainer)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer


def final_evaluation(trainer: EAKDTrainer) -> dict[str, float]:
    """The final model's evaluation metrics (``eval_ce_loss`` and the other statistics included): those of the
    Trainer's own evaluation at the last step when it ran one (and did not load a best checkpoint afterwards), else
    a new evaluation. Every process takes the same branch (each holds the same log history)."""
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if (last is not None and last["step"] == state.global_step and "eval_ce_loss" in last
            and not trainer.args.load_best_model_at_end):
        logger.info("final evaluation: the one at step %d", state.global_step)
        return {key: value for key, value in last.items() if key != "step"}
    return trainer.evaluate()
