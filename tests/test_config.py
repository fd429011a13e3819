"""EAKDConfig validation, recipe YAML loading, command-line overrides and the generated config reference page."""

from __future__ import annotations

from pathlib import Path

import pytest

from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.config.recipe import build_config, load_recipe, parse_overrides, read_yaml
from eakd_llm.config.reference import REFERENCE_BEGIN, REFERENCE_DOC, REFERENCE_END, config_reference_markdown

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("divergence", "kl", "divergence='kl' is not allowed; choose one of: fkl, rkl, skl, srkl, jsd, tvd"),
        ("ea_granularity", "batch", "ea_granularity='batch' is not allowed; choose one of: token, sequence"),
        ("dataset_format", "csv", "dataset_format='csv' is not allowed"),
        ("model_dtype", "fp8", "model_dtype='fp8' is not allowed"),
        ("teacher_dtype", "int4", "teacher_dtype='int4' is not allowed"),
        ("nonfinite_logits", "ignore", "nonfinite_logits='ignore' is not allowed; choose one of: error, skip"),
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("temperature", -1.0, "temperature must be a finite number > 0"),
        ("entropy_temperature", 0.0, "entropy_temperature must be a finite number > 0"),
        ("temperature", float("inf"), "temperature must be a finite number > 0"),
        ("kd_ratio", 1.5, r"kd_ratio must be in [0, 1]"),
        ("kd_ratio", -0.1, r"kd_ratio must be in [0, 1]"),
        ("skew_alpha", 0.0, r"skew_alpha must be in (0, 1)"),
        ("skew_alpha", 1.0, r"skew_alpha must be in (0, 1)"),
        ("jsd_beta", 1.0, r"jsd_beta must be in (0, 1)"),
        ("max_length", 1, "max_length must be >= 2"),
        ("max_prompt_length", 512, "max_prompt_length must be in [1, max_length)"),
        ("max_train_samples", 0, "max_train_samples must be >= 1"),
        ("on_policy_warmup_steps", -1, "on_policy_warmup_steps must be >= 0 (optimizer steps), got -1"),
        ("on_policy_fraction_warmup_steps", -2, "on_policy_fraction_warmup_steps must be >= 0"),
        ("student_init_from", "/no/such/run", "student_init_from: '/no/such/run' is not a folder"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as info:
        EAKDConfig(output_dir=str(tmp_path), **{key: value})
    assert message in str(info.value)


def test_config_accepts_edges_and_keeps_distillation_defaults(tmp_path):
    config = EAKDConfig(output_dir=str(tmp_path), kd_ratio=0.0)
    assert config.kd_ratio == 0.0
    assert EAKDConfig(output_dir=str(tmp_path), kd_ratio=1.0).kd_ratio == 1.0
    assert config.entropy_temperature == 2.0  # the paper's tau' for transformer teachers
    assert config.trust_remote_code is False
    assert config.remove_unused_columns is False
    assert config.ea is True and config.ea_granularity == "token" and config.divergence == "fkl"


def test_lora_checks_only_when_peft_is_on(tmp_path):
    EAKDConfig(output_dir=str(tmp_path), lora_r=0)  # ignored without use_peft
    with pytest.raises(ConfigError, match="lora_r must be >= 1"):
        EAKDConfig(output_dir=str(tmp_path), use_peft=True, lora_r=0)
    with pytest.raises(ConfigError, match=r"lora_dropout must be in \[0, 1\)"):
        EAKDConfig(output_dir=str(tmp_path), use_peft=True, lora_dropout=1.0)


def test_compile_loss_needs_the_fused_loss(tmp_path):
    assert EAKDConfig(output_dir=str(tmp_path), compile_loss=True).compile_loss is True
    with pytest.raises(ConfigError, match="compile_loss: true needs fused_loss: true"):
        EAKDConfig(output_dir=str(tmp_path), compile_loss=True, fused_loss=False)


def test_validate_for_training_requires_paths(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        EAKDConfig(output_dir=str(tmp_path)).validate_for_training()
    with pytest.raises(ConfigError,
                       match="teacher_model_name_or_path \\(or teacher_cache\\) is required when kd_ratio > 0"):
        EAKDConfig(output_dir=str(tmp_path), model_name_or_path="m", dataset_name="d").validate_for_training()
    with pytest.raises(ConfigError, match="dataset_name is required"):
        EAKDConfig(output_dir=str(tmp_path), model_name_or_path="m", kd_ratio=0.0).validate_for_training()
    # SFT needs no teacher
    EAKDConfig(output_dir=str(tmp_path), model_name_or_path="m", kd_ratio=0.0, dataset_name="d").validate_for_training()


def test_every_distillation_field_has_help():
    import dataclasses

    from eakd_llm.config.reference import distillation_fields

    fields = distillation_fields()
    assert len(fields) >= 30
    for f in fields:
        assert f.metadata.get("help"), f"{f.name} has no help text"
    names = {f.name for f in dataclasses.fields(EAKDConfig)}
    for required in ("model_name_or_path", "teacher_model_name_or_path", "divergence", "temperature",
                     "entropy_temperature", "ea", "ea_granularity", "kd_ratio", "skew_alpha", "jsd_beta",
                     "max_length", "max_prompt_length", "model_dtype", "trust_remote_code", "use_peft", "lora_r",
                     "lora_alpha", "lora_dropout", "lora_target_modules", "dataset_name"):
        assert required in names


# ----- recipes and overrides -----


def test_overrides_parse_yaml_scalars_and_flags():
    parsed = parse_overrides(
        ["--kd_ratio", "0.3", "--ea=false", "--use_peft", "--lora_target_modules", "[q_proj, v_proj]",
         "--output-dir", "out", "--run_name", "007"]
    )
    assert parsed == {
        "kd_ratio": 0.3,
        "ea": False,
        "use_peft": True,
        "lora_target_modules": ["q_proj", "v_proj"],
        "output_dir": "out",
        "run_name": 7,  # YAML reads it as a number ...
    }
    # ... and the field type turns it back into what the field needs, or refuses.
    with pytest.raises(ConfigError, match="run_name expects"):
        build_config({"output_dir": "out", "run_name": 7})
    with pytest.raises(ConfigError, match="expected --key value"):
        parse_overrides(["kd_ratio", "0.3"])


def test_unknown_key_suggests_the_close_match(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'kd_ration' in recipe; did you mean 'kd_ratio'"):
        build_config({"output_dir": str(tmp_path), "kd_ration": 0.5})
    with pytest.raises(ConfigError, match="unknown key 'totally_unrelated'") as info:
        build_config({"output_dir": str(tmp_path), "totally_unrelated": 1})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kd_ratio": "abc"}, "kd_ratio expects float, got 'abc'"),
        ({"max_length": 1.5}, "max_length expects int, got 1.5"),
        ({"ea": "maybe"}, "ea expects bool, got 'maybe'"),
        ({"lora_r": True}, "lora_r expects int, got True"),
        ({"lora_target_modules": 3}, "lora_target_modules expects list[str] or null, got 3"),
        ({"divergence": ["fkl"]}, "divergence expects str, got ['fkl']"),
    ],
)
def test_wrong_types_are_reported_with_the_key(tmp_path, values, message):
    with pytest.raises(ConfigError) as info:
        build_config({"output_dir": str(tmp_path), **values})
    assert message in str(info.value)


def test_lossless_conversions(tmp_path):
    config = build_config({"output_dir": str(tmp_path), "kd_ratio": 1, "max_length": 64.0, "ea": "false",
                           "lora_target_modules": "q_proj", "learning_rate": 1e-4, "eval_strategy": "steps",
                           "dataset_eval_split": "validation"})
    assert config.kd_ratio == 1.0 and isinstance(config.kd_ratio, float)
    assert config.max_length == 64 and isinstance(config.max_length, int)
    assert config.ea is False
    assert config.lora_target_modules == ["q_proj"]
    assert build_config({"output_dir": str(tmp_path), "lora_target_modules": "q_proj, v_proj"}).lora_target_modules == [
        "q_proj", "v_proj"]
    assert config.eval_strategy == "steps"
    # PyYAML reads exponents without a dot ("1e-5") as strings; float keys still take them.
    config = build_config({"output_dir": str(tmp_path), **parse_overrides(["--learning_rate", "1e-5"])})
    assert config.learning_rate == 1e-5


def test_recipe_file_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nkd_ratio: 0.5\ndivergence: rkl\n")
    config = load_recipe(str(recipe), ["--divergence", "jsd", "--jsd_beta", "0.3"])
    assert config.divergence == "jsd" and config.jsd_beta == 0.3 and config.kd_ratio == 0.5
    with pytest.raises(ConfigError, match="unknown key 'tempreature' in the command line; did you mean 'temperature'"):
        load_recipe(str(recipe), ["--tempreature", "2"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("output_dir: out\nkd_ratio: 0.5\ndivergence: [fkl\nea: true\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        read_yaml(str(recipe))
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(str(missing))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_yaml(str(listy))


def test_yaml_is_loaded_safely(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(str(recipe))


def test_output_dir_required(tmp_path):
    with pytest.raises(ConfigError, match="output_dir is required"):
        build_config({"kd_ratio": 0.5})


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")
                                          if "accelerate_configs" not in str(p)))
def test_every_shipped_recipe_validates(recipe):
    import torch

    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU.
    config = load_recipe(str(REPO / recipe), [] if torch.cuda.is_available() else ["--bf16", "false"])
    assert config.output_dir
    assert config.model_name_or_path
    assert config.dataset_name
    if config.kd_ratio > 0:
        assert config.teacher_model_name_or_path
        assert config.kd_ratio < 1, "EA/KD recipes keep a CE term (see docs/ea-weights.md on starvation)"
    if "dolly-15k" in config.dataset_name:  # DollyEval is drawn from dolly-15k: its prompts must stay out of training
        assert any(path.endswith("dolly/valid.jsonl") for path in config.exclude_eval_prompts or [])


def test_docs_embed_the_generated_config_reference():
    page = (REPO / REFERENCE_DOC).read_text(encoding="utf-8")
    start, end = page.index(REFERENCE_BEGIN) + len(REFERENCE_BEGIN), page.index(REFERENCE_END)
    assert page[start:end].strip() == config_reference_markdown().strip(), (
        f"{REFERENCE_DOC} is stale: regenerate it with `python -m eakd_llm.config.reference` from the repository root"
    )


def test_yaml_12_scalars_no_is_a_string_and_exponents_are_floats(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\neval_strategy: no\nlearning_rate: 2e-5\nea: false\n")
    config = load_recipe(str(recipe), ["--save_strategy", "no", "--warmup_steps", "1e1"])
    assert config.eval_strategy == "no" and config.save_strategy == "no"
    assert config.learning_rate == 2e-5 and config.ea is False
    assert config.warmup_steps == 10


def test_compile_loss_is_auto_by_default_on_for_cuda_only(tmp_path):
    config = build_config({"output_dir": str(tmp_path)})
    assert config.compile_loss == "auto"
    assert config.compile_loss_on("cuda") is True and config.compile_loss_on("cpu") is False
    assert build_config({"output_dir": str(tmp_path), "compile_loss": False}).compile_loss_on("cuda") is False
    assert build_config({"output_dir": str(tmp_path), "compile_loss": "true"}).compile_loss_on("cpu") is True
    with pytest.raises(ConfigError, match="compile_loss: true needs fused_loss: true"):
        build_config({"output_dir": str(tmp_path), "compile_loss": True, "fused_loss": False})
    # auto with the full-logits path is fine: there is nothing to compile
    assert build_config({"output_dir": str(tmp_path), "fused_loss": False}).compile_loss == "auto"


def test_on_policy_and_generation_keys(tmp_path):
    config = build_config({"output_dir": str(tmp_path), "max_length": 128, "max_prompt_length": 96,
                           "on_policy_fraction": 0.5})
    assert config.generation_budget == 32  # max_length - max_prompt_length, as MiniLLM's evaluation
    assert build_config({"output_dir": str(tmp_path), "max_new_tokens": 7}).generation_budget == 7
    for key, value, message in (("on_policy_fraction", -0.1, "on_policy_fraction must be in [0, 1]"),
                                ("generation_top_p", 1.5, "generation_top_p must be in (0, 1]"),
                                ("generation_top_k", -2, "generation_top_k must be >= 0"),
                                ("max_new_tokens", 0, "max_new_tokens must be in [1, max_length - 1]")):
        with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("(", "\\(")):
            build_config({"output_dir": str(tmp_path), key: value})


def test_student_init_from_must_be_a_model_folder_outside_output_dir(tmp_path):
    run = tmp_path / "off-policy"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "config.json").write_text("{}")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    config = build_config({"output_dir": str(tmp_path / "on-policy"), "student_init_from": str(run / "checkpoint-10")})
    assert config.student_init_from == str(run / "checkpoint-10")
    assert build_config({"output_dir": str(tmp_path / "o"), "use_peft": True,
                         "student_init_from": str(run / "adapter")}).use_peft
    for values, message in (
        ({"output_dir": str(run), "student_init_from": str(run / "checkpoint-10")}, "lies in this run's output_dir"),
        ({"output_dir": str(tmp_path / "o"), "student_init_from": str(run)}, "holds neither a model (config.json)"),
        ({"output_dir": str(tmp_path / "o"), "student_init_from": str(run / "adapter")}, "but use_peft is false"),
        ({"output_dir": str(tmp_path / "o"), "student_init_from": str(run / "checkpoint-10" / "config.json")},
         "is not a folder"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_config(values)


def test_on_policy_schedule_keys_and_every_step_generates(tmp_path):
    def config(**values):
        return build_config({"output_dir": str(tmp_path), **values})

    assert config(on_policy_fraction=1.0).every_step_generates
    assert not config(on_policy_fraction=1.0, on_policy_warmup_steps=3).every_step_generates  # warmup: dataset steps
    assert not config(on_policy_fraction=1.0, on_policy_fraction_warmup_steps=3).every_step_generates
    assert config(on_policy_fraction=0.5, on_policy_warmup_steps=3, seq_kd=True).every_step_generates
    assert not config(on_policy_fraction=0.5).every_step_generates
    assert (config().on_policy_warmup_steps, config().on_policy_fraction_warmup_steps) == (0, 0)
