"""On-policy and sequence-level KD: which steps generate, the re-collated batches, their loss and its normaliser."""

from __future__ import annotations

import json

import pytest
import torch
from loss_helpers import distillation_loss_kw as distillation_loss

import eakd_llm.training.on_policy as on_policy_module
from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.loss.distillation import IGNORE_INDEX
from eakd_llm.training.on_policy import on_policy_fraction_at, step_source
from eakd_llm.training.train import prepare_run
from eakd_llm.training.trainer import EAKDTrainer


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


def test_on_policy_fraction_schedule_hand_values():
    """Warmup steps at 0, a ramp in equal increments lambda * k / (ramp + 1), then lambda."""
    at = [on_policy_fraction_at(s, 0.8, warmup=10, ramp=3) for s in range(16)]
    assert at[:10] == [0.0] * 10  # the warmup: off-policy
    assert at[10:14] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # the ramp's midpoint (step 11) is half of lambda
    assert at[14:] == [0.8, 0.8] and on_policy_fraction_at(10**6, 0.8, 10, 3) == 0.8
    assert [on_policy_fraction_at(s, 0.5, 0, 0) for s in range(3)] == [0.5] * 3  # no warmup, no ramp: as before
    assert [on_policy_fraction_at(s, 1.0, 0, 1) for s in range(3)] == [0.5, 1.0, 1.0]  # a ramp alone
    assert [on_policy_fraction_at(s, 1.0, 2, 0) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]  # a warmup alone
    assert {on_policy_fraction_at(s, 0.0, 3, 5) for s in range(20)} == {0.0}


def test_realised_on_policy_share_follows_the_schedule():
    """Over many steps the student-generated share of each window matches the schedule's mean λ within 4 binomial
    standard deviations; the warmup draws no student step; seq_kd's other steps (the warmup's too) are the teacher's."""
    seed, fraction, warmup, ramp = 3, 0.6, 300, 1000
    lambdas = [on_policy_fraction_at(s, fraction, warmup, ramp) for s in range(2300)]
    student = [step_source(seed, s, lam, False) == "student" for s, lam in enumerate(lambdas)]
    assert not any(student[:warmup])
    for start, end in ((300, 800), (800, 1300), (1300, 2300)):
        window = lambdas[start:end]
        mean, variance = sum(window), sum(lam * (1 - lam) for lam in window)
        assert abs(sum(student[start:end]) - mean) <= 4 * variance**0.5, (start, end)
    with_teacher = [step_source(seed, s, lam, True) for s, lam in enumerate(lambdas)]
    assert set(with_teacher[:warmup]) == {"teacher"}
    assert [d == "student" for d in with_teacher] == student  # seq_kd changes only the non-student steps


def test_warmup_steps_never_generate_and_the_log_reports_the_schedule(tiny_stack, tmp_path, monkeypatch):
    trainer = _trainer(tiny_stack, tmp_path, on_policy_warmup_steps=2, on_policy_fraction_warmup_steps=1,
                       max_steps=4)
    generated_at = []
    original = on_policy_module.generate_token_ids

    def spy(*args, **kwargs):
        generated_at.append(trainer.state.global_step)
        return original(*args, **kwargs)

    monkeypatch.setattr(on_policy_module, "generate_token_ids", spy)
    trainer.train()
    lambdas = [0.0, 0.0, 0.5, 1.0]  # two warmup steps, a one-step ramp at lambda / 2, then lambda = 1
    drawn = [step_source(0, s, lam, False) == "student" for s, lam in enumerate(lambdas)]
    assert drawn[:2] == [False, False] and drawn[3]
    assert sorted(set(generated_at)) == [s for s in range(4) if drawn[s]]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["on_policy_fraction_now"] for entry in logged] == pytest.approx(lambdas)
    assert [entry["on_policy"] for entry in logged] == [float(d) for d in drawn]


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
    with pytest.raises(ConfigError, match="on_policy_fraction: 1 with no warmup steps"):  # warmup steps are dataset's
        prepare_run(_config(tiny_stack, tmp_path, dataset_name=str(folder), on_policy_warmup_steps=1))


def test_generation_leaves_a_lora_students_generation_config_as_it_was(tiny_stack):
    """peft's generate copies the config it is given onto the base model: both must get their own back, or the
    model's extra end tokens are lost from the second generation on."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from eakd_llm.models.generation import GenerationSettings, generate_token_ids

    base = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    base.generation_config.eos_token_id = [2, 7]
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    settings = GenerationSettings(max_prompt_length=8, max_length=16, max_new_tokens=3, do_sample=False,
                                  no_repeat_ngram_size=0)
    generate_token_ids(model, [[0, 5, 6]], settings, eos_ids=[2, 7], pad_id=1)
    assert model.get_base_model().generation_config.eos_token_id == [2, 7]
    assert model.generation_config.eos_token_id == [2, 7]


# ----- starting from a trained student (student_init_from) -----


def _perturbed_student(tiny_stack, folder) -> dict[str, torch.Tensor]:
    """model_name_or_path's student with seeded noise on every weight, saved (without a tokenizer) to ``folder``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    return {name: value.clone() for name, value in model.state_dict().items()}


def _student_weights(tiny_stack) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_stack["student"]).state_dict()


def test_student_init_from_loads_the_checkpoints_weights(tiny_stack, tmp_path):
    folder = tmp_path / "off-policy-run"
    perturbed = _perturbed_student(tiny_stack, folder)
    original = _student_weights(tiny_stack)
    parts = prepare_run(_config(tiny_stack, tmp_path, on_policy_fraction=0.5, student_init_from=str(folder)))
    loaded = parts["model"].state_dict()
    assert loaded.keys() == perturbed.keys()
    for name, value in loaded.items():
        assert torch.equal(value, perturbed[name]), name
        assert not torch.equal(value, original[name]), name
    assert all(p.requires_grad for p in parts["model"].parameters())
    assert parts["processing_class"].name_or_path == tiny_stack["student"]  # the folder holds no tokenizer
    # a LoRA student on a full checkpoint: a fresh adapter over the checkpoint's weights
    lora = prepare_run(_config(tiny_stack, tmp_path, use_peft=True, lora_r=2, student_init_from=str(folder)))["model"]
    base = lora.get_base_model()
    assert torch.equal(base.model.embed_tokens.weight, perturbed["model.embed_tokens.weight"])
    assert not base.model.embed_tokens.weight.requires_grad


def test_student_init_from_a_lora_adapter_keeps_training_it(tiny_stack, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_stack["student"]),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: a trained adapter does not
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    saved = {name: value.clone() for name, value in model.named_parameters() if "lora_" in name}
    folder = tmp_path / "lora-run"
    model.save_pretrained(folder)
    student = prepare_run(_config(tiny_stack, tmp_path, use_peft=True, lora_r=8, lora_alpha=16,
                                  student_init_from=str(folder)))["model"]
    loaded = {name: p for name, p in student.named_parameters() if "lora_" in name}
    assert loaded.keys() == saved.keys()  # the adapter's own targets and rank (q, v; r=2), not the recipe's
    for name, parameter in loaded.items():
        assert torch.equal(parameter, saved[name]) and parameter.requires_grad, name
    original = _student_weights(tiny_stack)
    base = student.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, original["model.layers.0.self_attn.q_proj.weight"]) and not base.requires_grad
    assert student.peft_config["default"].r == 2


def test_student_init_from_another_architecture_is_refused(tiny_stack, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_stack["student"])
    config.num_hidden_layers += 1
    folder = tmp_path / "deeper"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"student_init_from: .* is not the architecture of model_name_or_path .*: "
                                          r"num_hidden_layers \d+ vs \d+"):
        prepare_run(_config(tiny_stack, tmp_path, student_init_from=str(folder)))
