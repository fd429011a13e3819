"""The real entry points (``scripts/distill.py``, ``eakd-llm``) on the tiny stack: training, checkpoints, LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _distill(recipe: str, tiny_stack: dict[str, str], output_dir: Path, *overrides: str):
    args = [
        sys.executable, str(REPO / "scripts" / "distill.py"), str(REPO / "recipes" / "tiny" / recipe),
        "--model_name_or_path", tiny_stack["student"],
        "--dataset_name", tiny_stack["data_dir"],
        "--output_dir", str(output_dir),
        "--max_steps", "30", "--logging_steps", "5", "--eval_steps", "15", "--save_steps", "15",
        "--save_total_limit", "2", "--per_device_train_batch_size", "16",
        "--max_length", "96", "--max_prompt_length", "64",
        "--disable_tqdm", "true",
    ]
    if recipe != "sft_student.yaml":
        args += ["--teacher_model_name_or_path", tiny_stack["teacher"]]
    result = _run(args + list(overrides))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _losses(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("recipe", ["kd.yaml", "eakd_token.yaml", "eakd_sequence.yaml"])
def test_distill_script_trains_saves_and_reloads(tiny_stack, tmp_path, recipe):
    out = tmp_path / "run"
    _distill(recipe, tiny_stack, out)
    logs = _losses(out)
    assert len(logs) == 6
    # A random teacher here: the KD part can only fall so far, the cross-entropy part must fall clearly.
    assert logs[-1]["loss"] < 0.95 * logs[0]["loss"], [entry["loss"] for entry in logs]
    assert logs[-1]["ce_loss"] < 0.9 * logs[0]["ce_loss"], [entry["ce_loss"] for entry in logs]
    if recipe != "kd.yaml":
        assert all("ea_weight_mean" in entry and "teacher_entropy" in entry for entry in logs)
    # final model and an intermediate checkpoint load with from_pretrained, and the final one is the trained one
    final = AutoModelForCausalLM.from_pretrained(out)
    checkpoint = AutoModelForCausalLM.from_pretrained(out / "checkpoint-15")
    initial = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    ids = torch.tensor([[0, 10, 20, 30, 40]])
    assert not torch.allclose(final(ids).logits, initial(ids).logits)
    assert not torch.allclose(final(ids).logits, checkpoint(ids).logits)
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert (out / "eval_results.json").exists()


def test_lora_student_saves_only_the_adapter_and_merges(tiny_stack, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "lora"
    _distill("eakd_token.yaml", tiny_stack, out, "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
             "--learning_rate", "1e-2")
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_stack["student"]

    base = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    ids = torch.tensor([[0, 10, 20, 30, 40]])
    base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(base, out)
    adapted.eval()
    adapted_logits = adapted(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # the adapter learned something
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)
    # the adapter folder alone finds its base model
    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(auto(ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_cli_reports_bad_recipe_without_traceback(tiny_stack, tmp_path):
    result = _run([sys.executable, "-m", "eakd_llm.cli", "train", str(REPO / "recipes" / "tiny" / "kd.yaml"),
                   "--kd_ration", "0.5"])
    assert result.returncode == 2
    assert "eakd-llm: error: unknown key 'kd_ration' in the command line; did you mean 'kd_ratio'?" in result.stderr
    assert "Traceback" not in result.stderr

    result = _run([sys.executable, "-m", "eakd_llm.cli", "train", str(REPO / "recipes" / "tiny" / "kd.yaml"),
                   "--model_name_or_path", str(tmp_path / "nope" / "student"), "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 2
    assert "model_name_or_path" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_lora_adapter_trained_from_a_relative_path_loads_from_anywhere(tiny_stack, tmp_path):
    """A recipe naming the student relatively (as the study's recipes do: model_name_or_path: student-pruned) is
    resolved when the config is built, so the adapter records an absolute base model and loads from any working
    directory (it used to record 'student-pruned' and load only from the folder it was trained in)."""
    import shutil

    from eakd_llm.evaluation.protocol import load_model_for_eval

    work = tmp_path / "work"
    shutil.copytree(tiny_stack["student"], work / "student-pruned")
    args = [sys.executable, str(REPO / "scripts" / "distill.py"), str(REPO / "recipes" / "tiny" / "eakd_token.yaml"),
            "--model_name_or_path", "student-pruned", "--teacher_model_name_or_path", tiny_stack["teacher"],
            "--dataset_name", tiny_stack["data_dir"], "--output_dir", "lora", "--max_steps", "2",
            "--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "4",
            "--max_length", "96", "--max_prompt_length", "64", "--disable_tqdm", "true", "--use_peft", "true",
            "--lora_r", "4", "--lora_alpha", "8"]
    result = _run(args, cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    adapter = work / "lora"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "student-pruned")
    assert Path.cwd() != work
    model, _ = load_model_for_eval(str(adapter), device="cpu")
    student = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    assert model.config.num_hidden_layers == student.config.num_hidden_layers
