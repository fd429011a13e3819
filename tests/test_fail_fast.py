"""Every bad recipe, model or dataset stops `eakd-llm train` before training with one clear line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import LlamaForCausalLM

from eakd_llm.cli import train_main
from eakd_llm.studies.synthetic import tiny_llama_config, train_tokenizer


def _recipe(tiny_stack, tmp_path: Path, **changes) -> Path:
    values = {
        "model_name_or_path": tiny_stack["student"],
        "teacher_model_name_or_path": tiny_stack["teacher"],
        "dataset_name": tiny_stack["data_dir"],
        "response_column": "output",
        "kd_ratio": 0.5,
        "max_length": 96,
        "max_prompt_length": 64,
        "max_steps": 1,
        "use_cpu": True,
        "save_strategy": "no",
        "output_dir": str(tmp_path / "out"),
    }
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _data(tmp_path: Path, records, name="data") -> str:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    with open(folder / "train.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(folder)


def _fails(capsys, argv, expected: str) -> None:
    assert train_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("eakd-llm: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def _other_tokenizer_model(tmp_path: Path) -> str:
    folder = tmp_path / "other_teacher"
    tokenizer = train_tokenizer(["completely different words zebra quantum xylophone"] * 50, vocab_size=300)
    LlamaForCausalLM(tiny_llama_config("teacher", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _small_vocab_teacher(tiny_stack, tmp_path: Path) -> str:
    """Same tokenizer, but an output layer that cannot hold all of its tokens."""
    from eakd_llm.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_stack["teacher"])
    folder = tmp_path / "small_teacher"
    LlamaForCausalLM(tiny_llama_config("teacher", vocab_size=len(tokenizer) - 7)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _remote_code_model(tiny_stack, tmp_path: Path) -> str:
    folder = tmp_path / "remote_code"
    folder.mkdir()
    config = json.loads((Path(tiny_stack["student"]) / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise RuntimeError('this must never be executed')\n")
    for name in Path(tiny_stack["student"]).iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / name.name).write_bytes(name.read_bytes())
    return str(folder)


def _adapter(tiny_stack, tmp_path: Path) -> str:
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "adapter"
    model = LlamaForCausalLM.from_pretrained(tiny_stack["student"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return str(folder)


def _quantized_model(tiny_stack, tmp_path: Path) -> str:
    """The student with dense weights but a config that still says gguf (a dequantised GGUF saved by hand)."""
    folder = tmp_path / "quantized_student"
    folder.mkdir(exist_ok=True)
    for name in Path(tiny_stack["student"]).iterdir():
        (folder / name.name).write_bytes(name.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "student.gguf", "dequantize": False}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


QUANTIZED = ("model_name_or_path: the student is quantized (gguf, from the quantization_config of its config.json) "
             "and gguf models cannot be trained, not even through LoRA; dequantise it first: `eakd-llm fetch-model "
             "FILE.gguf --output DIR`")

CASES = {
    "unknown key": (lambda s, t: ([_recipe(s, t), "--kd_ration", "0.5"], "unknown key 'kd_ration' in the command line; "
                                  "did you mean 'kd_ratio'?")),
    "unknown key in recipe": (lambda s, t: ([_recipe(s, t, tempreature=2.0)], "unknown key 'tempreature' in recipe")),
    "wrong type": (lambda s, t: ([_recipe(s, t), "--kd_ratio", "half"], "kd_ratio expects float, got 'half'")),
    "temperature <= 0": (lambda s, t: ([_recipe(s, t), "--temperature", "0"],
                                       "temperature must be a finite number > 0")),
    "temperature inf": (lambda s, t: ([_recipe(s, t), "--entropy_temperature", ".inf"],
                                      "entropy_temperature must be a finite number > 0")),
    "kd_ratio > 1": (lambda s, t: ([_recipe(s, t), "--kd_ratio", "1.5"], "kd_ratio must be in [0, 1]")),
    "skew_alpha outside (0,1)": (lambda s, t: ([_recipe(s, t), "--skew_alpha", "1"], "skew_alpha must be in (0, 1)")),
    "jsd_beta outside (0,1)": (lambda s, t: ([_recipe(s, t), "--jsd_beta", "0"], "jsd_beta must be in (0, 1)")),
    "unknown divergence": (lambda s, t: ([_recipe(s, t), "--divergence", "kl"], "divergence='kl' is not allowed; "
                                         "choose one of: fkl, rkl, skl, srkl, jsd, tvd")),
    "unknown granularity": (lambda s, t: ([_recipe(s, t), "--ea_granularity", "batch"],
                                          "ea_granularity='batch' is not allowed")),
    "missing model": (lambda s, t: ([_recipe(s, t, model_name_or_path=str(t / "no" / "such" / "student"))],
                                    "model_name_or_path: ")),
    "missing teacher": (lambda s, t: ([_recipe(s, t, teacher_model_name_or_path=str(t / "no" / "such" / "teacher"))],
                                      "teacher_model_name_or_path: ")),
    "teacher not given": (lambda s, t: ([_recipe(s, t, teacher_model_name_or_path=None)],
                                        "teacher_model_name_or_path (or teacher_cache) is required when kd_ratio > 0")),
    "tokenizer mismatch": (lambda s, t: ([_recipe(s, t, teacher_model_name_or_path=_other_tokenizer_model(t))],
                                         "tokenizers disagree")),
    "vocabulary beyond padding": (lambda s, t: ([_recipe(s, t, teacher_model_name_or_path=_small_vocab_teacher(s, t))],
                                                "differ by more than padding")),
    "missing column": (lambda s, t: ([_recipe(s, t, response_column="answer")],
                                     "no column 'answer' (set by response_column); columns present: instruction")),
    "empty column": (lambda s, t: ([_recipe(s, t, dataset_name=_data(t, [{"prompt": "hi", "response": ""}]),
                                            response_column="response")],
                                   "column 'response' is empty in the first record")),
    "empty dataset": (lambda s, t: ([_recipe(s, t, dataset_name=_data(t, []))], "split of")),
    "missing split": (lambda s, t: ([_recipe(s, t, dataset_eval_split="dev", eval_strategy="steps")],
                                    "split 'dev' not found")),
    "yaml syntax": (lambda s, t: ([_bad_yaml(t)], "while parsing a flow sequence at line 3")),
    "trust_remote_code off": (lambda s, t: ([_recipe(s, t, model_name_or_path=_remote_code_model(s, t),
                                                     kd_ratio=0.0, teacher_model_name_or_path=None)],
                                            "trust_remote_code is off")),
    "resume from nothing": (lambda s, t: ([_recipe(s, t), "--resume_from_checkpoint", "last"],
                                          "holds no checkpoint-N folder")),
    "unknown EA formula": (lambda s, t: ([_recipe(s, t), "--ea_formula", "both"],
                                         "ea_formula='both' is not allowed; choose one of: full, teacher, "
                                         "interaction")),
    "unknown EA normalisation": (lambda s, t: ([_recipe(s, t), "--ea_normalize", "sum"],
                                               "ea_normalize='sum' is not allowed; choose one of: none, mean")),
    "kd_scale <= 0": (lambda s, t: ([_recipe(s, t), "--kd_scale", "0"], "kd_scale must be a finite number > 0")),
    "compile_loss value": (lambda s, t: ([_recipe(s, t), "--compile_loss", "sometimes"],
                                         "compile_loss='sometimes' is not allowed; choose one of: true, false, auto")),
    "on-policy fraction > 1": (lambda s, t: ([_recipe(s, t), "--on_policy_fraction", "1.5"],
                                             "on_policy_fraction must be in [0, 1]")),
    "generation top-p 0": (lambda s, t: ([_recipe(s, t), "--generation_top_p", "0"],
                                         "generation_top_p must be in (0, 1]")),
    "generation temperature 0": (lambda s, t: ([_recipe(s, t), "--generation_temperature", "0"],
                                               "generation_temperature must be a finite number > 0")),
    "generation top-k < 0": (lambda s, t: ([_recipe(s, t), "--generation_top_k", "-1"],
                                           "generation_top_k must be >= 0")),
    "max_new_tokens too long": (lambda s, t: ([_recipe(s, t), "--max_new_tokens", "200"],
                                              "max_new_tokens must be in [1, max_length - 1] = [1, 95]")),
    "on-policy without teacher": (lambda s, t: ([_recipe(s, t, kd_ratio=0.0), "--on_policy_fraction", "0.5"],
                                                "need a teacher to score the generated responses")),
    "prompt-only data, not fully on-policy": (lambda s, t: (
        [_recipe(s, t, dataset_name=_data(t, [{"prompt": "hi there"}]), on_policy_fraction=0.5)],
        "a prompt-only dataset (no response column) needs every step's responses generated")),
    "on-policy warmup < 0": (lambda s, t: ([_recipe(s, t), "--on_policy_warmup_steps", "-1"],
                                           "on_policy_warmup_steps must be >= 0 (optimizer steps), got -1")),
    "on-policy ramp < 0": (lambda s, t: ([_recipe(s, t), "--on_policy_fraction_warmup_steps", "-5"],
                                         "on_policy_fraction_warmup_steps must be >= 0 (optimizer steps), got -5")),
    "student_init_from missing": (lambda s, t: ([_recipe(s, t, student_init_from=str(t / "no-run"))],
                                                f"student_init_from: {str(t / 'no-run')!r} is not a folder")),
    "student_init_from holds no model": (lambda s, t: ([_recipe(s, t, student_init_from=str(t))],
                                                       "holds neither a model (config.json) nor a LoRA adapter")),
    "student_init_from adapter without LoRA": (lambda s, t: ([_recipe(s, t, student_init_from=_adapter(s, t))],
                                                             "holds a LoRA adapter (adapter_config.json) but use_peft "
                                                             "is false: set use_peft: true")),
    "student_init_from another architecture": (lambda s, t: (
        [_recipe(s, t, student_init_from=_other_tokenizer_model(t))], "is not the architecture of model_name_or_path")),
    "evaluation file to exclude missing": (lambda s, t: ([_recipe(s, t, exclude_eval_prompts=[str(t / "nope.jsonl")])],
                                                         "nope.jsonl' is not a file")),
    "quantized student": (lambda s, t: ([_recipe(s, t, model_name_or_path=_quantized_model(s, t))], QUANTIZED)),
    "quantized student with LoRA": (lambda s, t: ([_recipe(s, t, model_name_or_path=_quantized_model(s, t),
                                                           use_peft=True)], QUANTIZED)),
    "teacher cache missing": (lambda s, t: ([_recipe(s, t, teacher_cache=str(t))], "has no manifest.json")),
    "teacher cache with on-policy": (lambda s, t: ([_recipe(s, t, teacher_cache=str(t), on_policy_fraction=0.5)],
                                                   "teacher_cache holds the teacher's outputs for the dataset's")),
}


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: x\nkd_ratio: 0.5\ndivergence: [fkl\noutput_dir: out\n")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_fast_with_one_clear_line(tiny_stack, tmp_path, capsys, case):
    argv, expected = CASES[case](tiny_stack, tmp_path)
    _fails(capsys, argv, expected)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_debug_flag_shows_the_traceback(tiny_stack, tmp_path):
    from eakd_llm.config.eakd_config import ConfigError

    with pytest.raises(ConfigError, match="kd_ratio must be in"):
        train_main([str(_recipe(tiny_stack, tmp_path)), "--kd_ratio", "2", "--debug"])


def test_trainable_quantization_needs_lora(tiny_stack):
    """A method that trains through adapters (bitsandbytes-like, faked here: no GPU kernels needed) is refused for
    full training, with use_peft as the way out, and accepted with it or under a PEFT wrapper."""
    from types import SimpleNamespace

    from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
    from eakd_llm.models.loading import apply_lora, check_trainable_student, load_causal_lm

    model = load_causal_lm(tiny_stack["student"])
    check_trainable_student(model, use_peft=False)  # an ordinary student passes
    model.hf_quantizer = SimpleNamespace(is_trainable=True, quantization_config=SimpleNamespace(
        quant_method="bitsandbytes"))
    with pytest.raises(ConfigError, match=r"^model_name_or_path: the student is quantized \(bitsandbytes\) and its "
                       r"weights cannot be trained in full: set use_peft: true to train a LoRA adapter on it"):
        check_trainable_student(model, use_peft=False)
    check_trainable_student(model, use_peft=True)
    config = EAKDConfig(output_dir="unused", use_peft=True, use_cpu=True, report_to="none")
    check_trainable_student(apply_lora(model, config), use_peft=False)
