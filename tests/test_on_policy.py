"""On-policy and sequence-level KD: which steps generate, the re-collated batches, their loss and its normaliser."""

from __future__ import annotations

import json

import pytest
import torch
from loss_helpers import distillation_loss_kw as distillation_loss

import eakd_llm.on_policy as on_policy_module
from eakd_llm.config import ConfigError, EAKDConfig
from eakd_llm.losses import IGNORE_INDEX
from eakd_llm.on_policy import step_source
from eakd_llm.train import prepare_run
from eakd_llm.trainer import EAKDTrainer


def _config(tiny_stack, tmp_path, **overrides) -> EAKDConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), model_name_or_path=tiny_stack["student"],
        teacher_model_name_or_path=tiny_stack["teacher"], dataset_name=tiny_stack["data_dir"],
        response_column="output", max_length=96, max_prompt_length=64, use_cpu=True, per_device_train_batch_size=4,
        max_steps=3, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, max_new_tokens=12,
        on_policy_fraction=1.0, learning_rate=1e-2,
    )
    values.update(overrides)
    return EAKDConfig(**values)


def _trainer(tiny_stack, tmp_path, **overrides) -> EAKDTrainer:
    config = _config(tiny_stack, tmp_path, **overrides)
    return EAKDTrainer(args=config, **prepare_run(config))


def _group(trainer: EAKDTrainer, n: int, start: int = 0) -> list[dict[str, torch.Tensor]]:
    return [trainer.data_collator([trainer.train_dataset[start + i * 4 + j] for j in range(4)]) for i in range(n)]


def test_step_source_is_a_seeded_draw_per_step():
    assert {step_source(0, s, 0.0, False) for s in range(200)} == {"dataset"}
    assert {step_source(0, s, 1.0, False) for s in range(200)} == {"student"}
    draws = [step_source(7, s, 0.3, False) for s in range(4000)]
    assert 0.27 < draws.count("student") / len(draws) < 0.33
    assert draws == [step_source(7, s, 0.3, False) for s in range(4000)]  # the same on every process and on resume
    assert draws != [step_source(8, s, 0.3, False) for s in range(4000)]  # another seed draws otherwise
    with_teacher = [step_source(7, s, 0.3, True) for s in range(4000)]
    assert [d == "student" for d in with_teacher] == [d == "student" for d in draws]
    assert set(with_teacher) == {"student", "teacher"}  # seq_kd: every other step is teacher-generated


def test_student_generated_batch_is_prompt_plus_response_with_loss_on_the_response(tiny_stack, tmp_path):
    trainer = _trainer(tiny_stack, tmp_path)
    (batch,) = _group(trainer, 1)
    new = trainer.on_policy.complete(batch, trainer.model, "student", seed=3)
    assert new["source"] == "student"
    eos = trainer.processing_class.eos_token_id
    for row in range(4):
        n_prompt = int(batch["prompt_attention_mask"][row].sum())
        prompt = batch["prompt_input_ids"][row, -n_prompt:]
        ids, labels = new["input_ids"][row], new["labels"][row]
        assert torch.equal(ids[:n_prompt], prompt)  # the dataset's prompt, then the generation
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        response = labels[n_prompt:][labels[n_prompt:] != IGNORE_INDEX]
        assert 1 <= len(response) <= 12
        assert torch.equal(response, ids[n_prompt:n_prompt + len(response)])
        assert eos not in response[:-1].tolist()  # cut at the first end token, which is kept (students learn to stop)
    again = trainer.on_policy.complete(batch, trainer.model, "student", seed=3)
    assert torch.equal(again["input_ids"], new["input_ids"])  # seeded


def test_on_policy_loss_is_kd_only_over_the_generated_tokens(tiny_stack, tmp_path):
    """No CE on student-generated tokens; the loss is kd_ratio * KD with N = the tokens that carry loss after
    generation (what get_batch_samples counts)."""
    trainer = _trainer(tiny_stack, tmp_path, kd_ratio=0.4, fused_loss=False)
    batches, num_items = trainer.get_batch_samples(iter(_group(trainer, 2)), 2, torch.device("cpu"))
    assert [b["source"] for b in batches] == ["student", "student"]
    generated = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    assert int(num_items) == generated
    batch = batches[0]
    trainer.model.train()  # as in training (the split statistics are kept for training batches)
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = trainer.model(**inputs).logits[:, :-1]
    with torch.no_grad():
        t = trainer.teacher(**inputs).logits[:, :-1]
    kd = distillation_loss(s, t, batch["labels"][:, 1:], num_items_in_batch=num_items, entropy_temperature=2.0)
    torch.testing.assert_close(loss, 0.4 * kd, rtol=1e-5, atol=1e-7)
    # kd_loss is logged per token at the config's scale, as on dataset batches (not with kd_ratio folded in)
    per_token = distillation_loss(s, t, batch["labels"][:, 1:], entropy_temperature=2.0)
    assert trainer.log_windows["train"].values["kd_loss/generated"][-1] == pytest.approx(per_token.item(), rel=1e-5)


def test_seq_kd_generates_with_the_teacher_and_keeps_ce(tiny_stack, tmp_path, monkeypatch):
    trainer = _trainer(tiny_stack, tmp_path, on_policy_fraction=0.0, seq_kd=True)
    used = []
    original = on_policy_module.gathered_for_generation

    def spy(model):
        used.append(model)
        return original(model)

    monkeypatch.setattr(on_policy_module, "gathered_for_generation", spy)
    batches, _ = trainer.get_batch_samples(iter(_group(trainer, 1)), 1, torch.device("cpu"))
    assert used == [trainer.teacher] and batches[0]["source"] == "teacher"
    settings = trainer.loss_settings  # teacher-generated batches keep the config's CE and KD weights
    assert (settings.kd_ratio, settings.kd_scale) == (trainer.args.kd_ratio, 1.0)
    generated = settings.for_generated_batch()  # student-generated ones drop CE and keep KD's weight
    assert (generated.kd_ratio, generated.kd_scale) == (1.0, trainer.args.kd_ratio)


def test_empty_generations_give_zero_loss_not_nan(tiny_stack, tmp_path, monkeypatch):
    trainer = _trainer(tiny_stack, tmp_path)
    monkeypatch.setattr(on_policy_module, "generate_token_ids", lambda model, prompts, *a, **k: [[] for _ in prompts])
    batches, num_items = trainer.get_batch_samples(iter(_group(trainer, 2)), 2, torch.device("cpu"))
    assert int(num_items) == 0
    for fused in (True, False):
        trainer.args.fused_loss = fused
        loss = trainer.compute_loss(trainer.model, batches[0], num_items_in_batch=num_items)
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainer.model.parameters())


def _run_losses(tiny_stack, tmp_path, name, **overrides) -> list[float]:
    trainer = _trainer(tiny_stack, tmp_path / name, **overrides)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_accumulation_on_generated_batches_equals_one_big_batch(tiny_stack, tmp_path):
    """2 micro-batches x 4 equal 1 x 8 also when every step is generated: the loss is normalised by the generated
    tokens of the whole accumulation group (top-k 1 makes the sampling greedy, so both runs generate the same)."""
    common = dict(generation_top_k=1, max_steps=2, ea_granularity="sequence")
    one = _run_losses(tiny_stack, tmp_path, "one", per_device_train_batch_size=8, **common)
    accumulated = _run_losses(tiny_stack, tmp_path, "ga", per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, **common)
    assert len(one) == 2
    assert accumulated == pytest.approx(one, rel=1e-5)


def test_logs_report_generation_and_split_ea_statistics(tiny_stack, tmp_path):
    trainer = _trainer(tiny_stack, tmp_path, on_policy_fraction=0.5, max_steps=6, logging_steps=3)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    shares = [entry["on_policy"] for entry in logged]
    expected = [sum(step_source(0, s, 0.5, False) == "student" for s in range(start, start + 3)) / 3
                for start in (0, 3)]
    assert shares == pytest.approx(expected)
    for entry in logged:
        assert 0.0 <= entry["generation_time_share"] <= 1.0
        if entry["on_policy"] > 0:
            assert 1 <= entry["generated_length"] <= 12
            assert {"ea_weight_mean/generated", "teacher_entropy/generated", "kd_loss/generated"} <= set(entry)
        if entry["on_policy"] < 1:
            assert {"ea_weight_mean/dataset", "ce_loss/dataset"} <= set(entry)


def test_prompt_only_dataset_trains_fully_on_policy(tiny_stack, tmp_path):
    rows = [json.loads(line) for line in open(tiny_stack["train_file"], encoding="utf-8")][:40]
    folder = tmp_path / "prompts"
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"instruction": row["instruction"], "input": row.get("input", "")}) + "\n")
    trainer = _trainer(tiny_stack, tmp_path, dataset_name=str(folder), max_steps=2)
    assert all(all(label == IGNORE_INDEX for label in ex["labels"]) for ex in trainer.train_dataset)
    trainer.train()
    assert all(entry["on_policy"] == 1.0 for entry in trainer.state.log_history if "loss" in entry)
    with pytest.raises(ConfigError, match="prompt-only dataset .* needs every step's responses generated"):
        prepare_run(_config(tiny_stack, tmp_path, dataset_name=str(folder), on_policy_fraction=0.5))


def test_generation_leaves_a_lora_students_generation_config_as_it_was(tiny_stack):
    """peft's generate copies the config it is given onto the base model: both must get their own back, or the
    model's extra end tokens are lost from the second generation on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from eakd_llm.generation import GenerationSettings, generate_token_ids

    base = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    base.generation_config.eos_token_id = [2, 7]
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    settings = GenerationSettings(max_prompt_length=8, max_length=16, max_new_tokens=3, do_sample=False,
                                  no_repeat_ngram_size=0)
    generate_token_ids(model, [[0, 5, 6]], settings, eos_ids=[2, 7], pad_id=1)
    assert model.get_base_model().generation_config.eos_token_id == [2, 7]
    assert model.generation_config.eos_token_id == [2, 7]
