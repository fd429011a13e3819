"""EAKDTrainer: loss composition, vocabulary alignment, tokenizer checks, accumulation, logging, non-finite logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.data.dataset import DistillationCollator
from eakd_llm.loss.distillation import ea_weights, token_divergence
from eakd_llm.models.loading import check_tokenizers_match, load_tokenizer, shared_vocab_size
from eakd_llm.studies.synthetic import tiny_llama_config, train_tokenizer
from eakd_llm.training.train import prepare_run, run_training
from eakd_llm.training.trainer import EAKDTrainer


def _config(tiny_stack, tmp_path, **overrides) -> EAKDConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=tiny_stack["student"],
        teacher_model_name_or_path=tiny_stack["teacher"],
        dataset_name=tiny_stack["data_dir"],
        response_column="output",
        max_length=96,
        max_prompt_length=64,
        use_cpu=True,
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return EAKDConfig(**values)


def _trainer(tiny_stack, tmp_path, **overrides) -> EAKDTrainer:
    config = _config(tiny_stack, tmp_path, **overrides)
    return EAKDTrainer(args=config, **prepare_run(config))


def _batch(trainer: EAKDTrainer, n: int = 4) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _reference_loss(student, teacher, batch, config: EAKDConfig, vocab: int) -> torch.Tensor:
    """(1 - r) * CE + r * tau^2 * sum(w * d) / N, assembled from the public per-token functions."""
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(s[mask], labels[mask])
    d = token_divergence(s[..., :vocab], t[..., :vocab], config.divergence, config.temperature)
    if config.ea:
        w = ea_weights(s[..., :vocab], t[..., :vocab], labels, config.entropy_temperature, config.ea_granularity,
                       config.ea_formula, config.ea_normalize)
        if config.ea_granularity == "sequence":
            w = w[:, None].expand_as(d)
    else:
        w = torch.ones_like(d)
    kd = config.temperature**2 * (w * d)[mask].sum() / mask.sum()
    return (1 - config.kd_ratio) * ce + config.kd_ratio * config.kd_scale * kd


@pytest.mark.parametrize(
    "overrides",
    [
        {"kd_ratio": 0.5, "ea": True, "ea_granularity": "token"},
        {"kd_ratio": 0.3, "ea": True, "ea_granularity": "sequence", "divergence": "rkl", "temperature": 2.0},
        {"kd_ratio": 1.0, "ea": False, "divergence": "jsd"},
        {"kd_ratio": 0.5, "ea": True, "entropy_temperature": 1.0, "divergence": "tvd"},
        {"kd_ratio": 0.5, "ea": True, "ea_granularity": "sequence", "ea_normalize": "mean", "ea_formula": "teacher"},
        {"kd_ratio": 0.4, "ea": True, "ea_normalize": "mean", "ea_formula": "interaction", "divergence": "srkl"},
        {"kd_ratio": 0.5, "ea": False, "kd_scale": 4.0},
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_compute_loss_matches_reference(tiny_stack, tmp_path, overrides, fused, monkeypatch):
    trainer = _trainer(tiny_stack, tmp_path, fused_loss=fused, loss_chunk_size=7, **overrides)
    paths = []
    for name in ("_fused_loss", "_full_logits_loss"):
        original = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *a, _o=original, _n=name: (paths.append(_n), _o(*a))[1])
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    assert paths == ["_fused_loss" if fused else "_full_logits_loss"]
    expected = _reference_loss(trainer.model, trainer.teacher, batch, trainer.args, trainer.vocab_size)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # and the gradients of the student agree with the reference's
    grads = torch.autograd.grad(loss, list(trainer.model.parameters()))
    expected_grads = torch.autograd.grad(
        _reference_loss(trainer.model, trainer.teacher, batch, trainer.args, trainer.vocab_size),
        list(trainer.model.parameters()),
    )
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sft_needs_no_teacher_and_is_cross_entropy(tiny_stack, tmp_path):
    trainer = _trainer(tiny_stack, tmp_path, kd_ratio=0.0, teacher_model_name_or_path=None)
    assert trainer.teacher is None
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    hf_loss = trainer.model(**batch).loss  # transformers' own shifted causal-LM cross-entropy
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_teacher_is_frozen_and_not_wrapped(tiny_stack, tmp_path):
    trainer = _trainer(tiny_stack, tmp_path)
    assert isinstance(trainer.teacher, LlamaForCausalLM)
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    batch = _batch(trainer)
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert any(p.grad is not None for p in trainer.model.parameters())


def test_kd_without_teacher_is_an_error(tiny_stack, tmp_path):
    config = _config(tiny_stack, tmp_path)
    parts = prepare_run(config)
    parts["teacher_model"] = None
    with pytest.raises(ValueError, match="needs a teacher_model"):
        EAKDTrainer(args=config, **parts)


def test_padded_teacher_vocabulary_is_aligned(tiny_stack, tmp_path):
    """Extra padding rows in the teacher's output layer (like Qwen2.5 7B vs 0.5B) must not change the loss."""
    config = _config(tiny_stack, tmp_path, kd_ratio=0.5)
    parts = prepare_run(config)
    vocab = parts["model"].config.vocab_size
    reference = EAKDTrainer(args=config, **parts)
    batch = _batch(reference)
    expected = reference.compute_loss(reference.model, batch)

    padded = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"])
    padded.resize_token_embeddings(vocab + 24)
    with torch.no_grad():
        padded.lm_head.weight[vocab:] = 50.0  # padding rows that would dominate the softmax if they were compared
    parts["teacher_model"] = padded
    trainer = EAKDTrainer(args=config, **parts)
    assert trainer.vocab_size == vocab
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


def test_vocabulary_smaller_than_tokenizer_is_an_error(tiny_stack):
    tokenizer = load_tokenizer(tiny_stack["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    small = LlamaForCausalLM(tiny_llama_config("teacher", vocab_size=len(tokenizer) - 10))
    with pytest.raises(ConfigError, match="differ by more than padding"):
        shared_vocab_size(student, small, tokenizer)
    assert shared_vocab_size(student, student, tokenizer) == len(tokenizer)


def test_tokenizer_mismatch_is_an_error(tiny_stack, tmp_path):
    student_tok = load_tokenizer(tiny_stack["student"])
    check_tokenizers_match(student_tok, load_tokenizer(tiny_stack["teacher"]))
    other = train_tokenizer(["completely different words zebra quantum xylophone"] * 50, vocab_size=300)
    with pytest.raises(ConfigError, match="tokenizers disagree on .* shared token ids"):
        check_tokenizers_match(student_tok, other)


def test_tokenizer_mismatch_fails_before_training(tiny_stack, tmp_path):
    other_dir = tmp_path / "other_teacher"
    other = train_tokenizer(["completely different words zebra quantum xylophone"] * 50, vocab_size=300)
    model = LlamaForCausalLM(tiny_llama_config("teacher", vocab_size=len(other)))
    model.save_pretrained(other_dir)
    other.save_pretrained(other_dir)
    with pytest.raises(ConfigError, match="tokenizers disagree"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=str(other_dir)))


@pytest.mark.parametrize(("granularity", "fused"), [("token", True), ("sequence", True), ("token", False)])
def test_gradient_accumulation_equals_one_big_batch(tiny_stack, tmp_path, granularity, fused):
    """One SGD step on 8 sequences equals 2 accumulated micro-batches of 4 (same data, global token count)."""
    common = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1,
                  weight_decay=0.0, ea_granularity=granularity, kd_ratio=0.5, fused_loss=fused)
    big = _trainer(tiny_stack, tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, **common)
    small = _trainer(tiny_stack, tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     **common)
    before = {k: v.clone() for k, v in big.model.state_dict().items()}
    big.train()
    small.train()
    moved = 0.0
    for (name, p_big), p_small in zip(big.model.state_dict().items(), small.model.state_dict().values()):
        torch.testing.assert_close(p_small, p_big, rtol=1e-4, atol=1e-6, msg=f"{name} differs")
        moved = max(moved, (p_big - before[name]).abs().max().item())
    assert moved > 1e-4  # the step really changed the weights


def test_logs_losses_entropies_and_weights(tiny_stack, tmp_path):
    trainer = _trainer(tiny_stack, tmp_path, max_steps=4, logging_steps=2, kd_ratio=0.5)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("ce_loss", "kd_loss", "teacher_entropy", "student_entropy", "ea_weight_mean", "ea_weight_min",
                    "ea_weight_max"):
            assert key in entry and math.isfinite(entry[key]), key
        assert 0 <= entry["ea_weight_min"] <= entry["ea_weight_mean"] <= entry["ea_weight_max"]
        # sum w d / sum d is a d-weighted mean of the weights: inside their range
        assert entry["ea_weight_min"] <= entry["ea_effective_scale"] <= entry["ea_weight_max"]
        assert entry["grad_norm_preclip_mean"] <= entry["grad_norm_preclip_max"]
        clipped = entry["grad_norm_preclip_max"] > trainer.args.max_grad_norm
        assert (entry["grad_clipped"] > 0) == clipped and 0 <= entry["grad_clipped"] <= 1
        vocab = trainer.vocab_size
        assert 0 <= entry["teacher_entropy"] <= math.log(vocab) + 1e-6
        # w <= (H_T + H_T) / 2 = H_T pointwise; with tau' = 2 the weights are bounded by log V.
        assert entry["ea_weight_max"] <= math.log(vocab) + 1e-6
        # The logged total is the mix of the logged parts.
        assert entry["loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * entry["kd_loss"], rel=0.05)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_nonfinite_teacher_logits(tiny_stack, tmp_path, policy, fused):
    trainer = _trainer(tiny_stack, tmp_path, nonfinite_logits=policy, fused_loss=fused)
    with torch.no_grad():
        trainer.teacher.lm_head.weight[0, 0] = float("nan")
    batch = _batch(trainer)
    if policy == "error":
        with pytest.raises(FloatingPointError, match="non-finite teacher logits at step 0"):
            trainer.compute_loss(trainer.model, batch)
    else:
        loss = trainer.compute_loss(trainer.model, batch)
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is None or torch.all(p.grad == 0) for p in trainer.model.parameters())


def test_collator_is_built_from_the_tokenizer(tiny_stack, tmp_path):
    trainer = _trainer(tiny_stack, tmp_path)
    assert isinstance(trainer.data_collator, DistillationCollator)
    assert trainer.data_collator.pad_token_id == trainer.processing_class.pad_token_id


def test_tokens_beyond_the_embedding_table_fail_before_training(tiny_stack, tmp_path):
    tokenizer = load_tokenizer(tiny_stack["student"])
    folder = tmp_path / "small_student"
    LlamaForCausalLM(tiny_llama_config("student", vocab_size=len(tokenizer) // 2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match="has token id .* embeds only"):
        prepare_run(_config(tiny_stack, tmp_path, kd_ratio=0.0, model_name_or_path=str(folder)))


def test_fused_and_full_paths_agree_for_a_lora_student(tiny_stack, tmp_path):
    lora = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, kd_ratio=0.5, ea_granularity="sequence")
    fused = _trainer(tiny_stack, tmp_path / "f", fused_loss=True, **lora)
    full = _trainer(tiny_stack, tmp_path / "u", fused_loss=False, **lora)
    assert fused._fused_supported(fused.model) and not full._fused_supported(full.model)
    full.model.load_state_dict(fused.model.state_dict())
    batch = _batch(fused)
    loss_fused, loss_full = fused.compute_loss(fused.model, batch), full.compute_loss(full.model, batch)
    torch.testing.assert_close(loss_fused, loss_full, rtol=1e-5, atol=1e-6)
    trainable = [(n, p) for n, p in fused.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    grads_fused = torch.autograd.grad(loss_fused, [p for _, p in trainable])
    full_params = dict(full.model.named_parameters())
    grads_full = torch.autograd.grad(loss_full, [full_params[n] for n, _ in trainable])
    for got, want in zip(grads_fused, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_sharded_student_heads_and_the_fused_path(tiny_stack, tmp_path, monkeypatch, caplog):
    """Which sharded student heads the fused path takes: ZeRO-3 (here: flagged) trainable or frozen, FSDP2 only frozen.
    A trainable ZeRO-3 head is called as a module (its hooks gather and reduce); compile_loss reaches the loss."""
    import eakd_llm.models.sharding as sharding_module
    import eakd_llm.training.loss_paths as loss_paths_module

    trainer = _trainer(tiny_stack, tmp_path, kd_ratio=0.5, compile_loss=True)
    head = trainer.model.get_output_embeddings()
    assert trainer._fused_supported(trainer.model)
    monkeypatch.setattr(sharding_module, "is_dtensor", lambda t: t is head.weight)  # an FSDP2 shard
    assert trainer._fused_blocker(trainer.model) == "the student's lm_head is FSDP2-sharded and trainable"
    head.requires_grad_(False)
    assert trainer._fused_supported(trainer.model)  # frozen: gathered with full_tensor()
    monkeypatch.undo()

    head.requires_grad_(True)
    monkeypatch.setattr(head.weight, "ds_id", 0, raising=False)  # what DeepSpeed ZeRO-3 puts on its parameters
    # the full shape, as inside the module's forward when ZeRO-3's hook has gathered it (the hooks themselves need an
    # engine: tests/test_distributed.py runs them, 2 ranks, against one process)
    monkeypatch.setattr(head.weight, "ds_shape", head.weight.shape, raising=False)
    assert trainer._fused_supported(trainer.model)
    calls, seen = [], {}
    head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    original = loss_paths_module.fused_distillation_loss
    monkeypatch.setattr(loss_paths_module, "fused_distillation_loss",
                        lambda *a, **k: (seen.update(k), original(*a, **{**k, "compile": False}))[1])
    batch = _batch(trainer)
    with caplog.at_level("INFO", logger="eakd_llm.training.trainer"):
        loss = trainer.compute_loss(trainer.model, batch)
    assert seen["compile"] is True and seen["chunk_size"] == trainer.args.loss_chunk_size
    assert "EA-KD loss path: fused chunked (chunk 1024, compiled, sharded heads gathered once per step)" in caplog.text
    # the head ran as a module on the hidden states of every position (the model's own call projects one position)
    assert any(shape[1] == batch["input_ids"].shape[1] - 1 for shape in calls)
    assert "forward" not in vars(head)  # its own forward is back
    (grad,) = torch.autograd.grad(loss, [head.weight])
    expected = torch.autograd.grad(
        _reference_loss(trainer.model, trainer.teacher, batch, trainer.args, trainer.vocab_size), [head.weight])[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_fsdp_runs_choose_the_loss_path_by_plugin(tiny_stack, tmp_path, monkeypatch):
    """Under FSDP the choice depends on the plugin and on who owns the head, not on whether the head happens to be
    unsharded at that moment: FSDP1 and FSDP2 CPU offload -> full logits; FSDP2 -> fused only for a frozen head."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    trainer = _trainer(tiny_stack, tmp_path, kd_ratio=0.5)
    head = trainer.model.get_output_embeddings()

    def plugin(version, offload):
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version, cpu_offload=offload))
        monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(state=state))

    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    plugin(1, None)
    assert trainer._fused_blocker(trainer.model) == "FSDP1 flattens the lm_head into a flat parameter"
    plugin(2, CPUOffloadPolicy())
    assert trainer._fused_blocker(trainer.model) == "FSDP2 CPU offload keeps the head's shards on the CPU"
    plugin(2, OffloadPolicy())
    assert trainer._fused_blocker(trainer.model) == "the student's lm_head is FSDP2-sharded and trainable"
    head.requires_grad_(False)
    assert trainer._fused_blocker(trainer.model) is None


def test_data_parallel_token_count_is_collapsed(tiny_stack, tmp_path):
    """nn.DataParallel makes the Trainer pass the count once per GPU ([n_gpu, 1]); the loss is computed once."""
    trainer = _trainer(tiny_stack, tmp_path, kd_ratio=0.5)
    batch = _batch(trainer)
    count = (batch["labels"][:, 1:] != -100).sum()
    expected = trainer.compute_loss(trainer.model, batch, num_items_in_batch=count)
    repeated = count.reshape(1, 1).expand(2, 1)
    got = trainer.compute_loss(trainer.model, batch, num_items_in_batch=repeated)
    assert got.dim() == 0
    torch.testing.assert_close(got, expected)


def test_zero_loss_survives_empty_parameter_shards():
    from eakd_llm.training.loss_paths import zero_loss

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    model.weight.data = torch.empty(0)  # what a ZeRO-3 partition looks like outside the forward pass
    loss = zero_loss(model)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(model.bias.grad, torch.zeros(2))


def test_models_keep_only_their_final_hidden_states(tiny_stack, tmp_path):
    """The fused path asks neither model for every layer's hidden states (output_hidden_states would keep them all
    until the loss is done: ~0.85 GB for a 7B teacher at 4 x 1024); it catches the decoder's output instead."""
    trainer = _trainer(tiny_stack, tmp_path, kd_ratio=0.5)
    seen = []
    for model in (trainer.model, trainer.teacher):
        model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    assert len(seen) == 2
    assert all(not kwargs.get("output_hidden_states") and kwargs.get("logits_to_keep") == 1 for kwargs in seen)
    expected = _reference_loss(trainer.model, trainer.teacher, batch, trainer.args, trainer.vocab_size)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The final evaluation: eval_ce_loss compares runs, evaluated once
# ----------------------------------------------------------------------------------------------------------------------


def _validation_ce(model_dir: str, dataset) -> float:
    """The saved student's cross-entropy per response token over the evaluation set, one unpadded example at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for record in dataset:
            ids, labels = torch.tensor(record["input_ids"]), torch.tensor(record["labels"])
            logits = model(ids[None]).logits[0, :-1]
            total += F.cross_entropy(logits.float(), labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    return total / count


def _run(tiny_stack, tmp_path, monkeypatch, **overrides) -> tuple[dict, int]:
    """A short run through ``run_training``: its eval_results.json and how often ``evaluate`` ran."""
    calls = []
    original = EAKDTrainer.evaluate
    monkeypatch.setattr(EAKDTrainer, "evaluate", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    values = dict(dataset_eval_split="validation", eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8,
                  kd_ratio=0.5, learning_rate=1e-3)
    config = _config(tiny_stack, tmp_path, **{**values, **overrides})
    trainer = run_training(config)
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_ce_loss"] == results["eval_ce_loss"]
    results["validation_ce"] = _validation_ce(config.output_dir, trainer.eval_dataset)
    return results, len(calls)


@pytest.mark.parametrize(("max_steps", "eval_strategy", "expected_calls"), [(2, "steps", 1), (3, "steps", 2),
                                                                            (2, "no", 1)])
def test_final_evaluation_runs_once_and_saves_the_validation_ce(tiny_stack, tmp_path, monkeypatch, max_steps,
                                                                 eval_strategy, expected_calls):
    # eval_steps 2: at the last step of a 2-step run (reused, not repeated), before the last one of a 3-step run
    results, calls = _run(tiny_stack, tmp_path, monkeypatch, max_steps=max_steps, eval_strategy=eval_strategy)
    assert calls == expected_calls
    for key in ("eval_loss", "eval_ce_loss", "eval_kd_loss", "eval_teacher_entropy", "eval_student_entropy",
                "eval_ea_weight_mean", "eval_ea_effective_scale"):
        assert math.isfinite(results[key]), key
    # per response token over the whole set (5 batches of unequal token counts), not a mean of batch means
    assert results["eval_ce_loss"] == pytest.approx(results["validation_ce"], rel=1e-4)
    assert results["eval_loss"] == pytest.approx(0.5 * results["eval_ce_loss"] + 0.5 * results["eval_kd_loss"],
                                                 rel=0.05)


def test_eval_ce_loss_compares_kd_and_eakd_where_eval_loss_does_not(tiny_stack, tmp_path, monkeypatch):
    # kd_ratio 1: eval_loss is the KD term alone, which EA multiplies by its effective scale (about log V with this
    # random, near-uniform teacher)
    kd, _ = _run(tiny_stack, tmp_path / "kd", monkeypatch, ea=False, kd_ratio=1.0)
    eakd, _ = _run(tiny_stack, tmp_path / "eakd", monkeypatch, ea=True, kd_ratio=1.0)
    for results in (kd, eakd):
        assert results["eval_ce_loss"] == pytest.approx(results["validation_ce"], rel=1e-4)
        assert results["eval_loss"] == pytest.approx(results["eval_kd_loss"], rel=0.05)
    assert eakd["eval_ea_effective_scale"] > 3
    assert eakd["eval_loss"] > 3 * kd["eval_loss"]  # the objectives: not comparable
    assert abs(eakd["eval_loss"] - eakd["eval_ce_loss"]) > 0.5 * eakd["eval_ce_loss"]
    # Two steps from one initialisation (here even equal: EA's near-constant weights only scale the gradient, which
    # clipping undoes).
    assert eakd["eval_ce_loss"] == pytest.approx(kd["eval_ce_loss"], rel=0.02)
