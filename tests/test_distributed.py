"""Several processes on CPU (gloo) and crash recovery: the real script under `accelerate launch`, and SIGKILL + resume.

Select with ``pytest -m distributed``; they run in CI too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_with_a_free_port
from safetensors.torch import load_file

from eakd_llm.models.sharding import check_saved_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(tiny_stack, output_dir: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "scripts" / "distill.py"), str(REPO / "recipes" / "tiny" / "eakd_token.yaml"),
        "--model_name_or_path", tiny_stack["student"], "--teacher_model_name_or_path", tiny_stack["teacher"],
        "--dataset_name", tiny_stack["data_dir"], "--output_dir", str(output_dir),
        "--logging_steps", "1", "--disable_tqdm", "true", "--eval_strategy", "no",
        "--max_length", "96", "--max_prompt_length", "64", *extra,
    ]


def _single(tiny_stack, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *_args(tiny_stack, output_dir, *extra)], env=_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _launch(tiny_stack, output_dir: Path, processes: int, *extra: str) -> None:
    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                 str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(port), *_args(tiny_stack, output_dir, *extra)]]

    (result,) = run_with_a_free_port(commands, _env())
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _assert_same_weights(a: Path, b: Path, exact: bool, name: str = "model.safetensors") -> None:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=key)


def test_ddp_two_processes_match_one_process(tiny_stack, tmp_path):
    """Global batch 8: 1 process x 8, 2 processes x 4, and 2 processes x 2 x 2 accumulation steps."""
    # eval batches of 4: the 40 validation examples split evenly over 2 processes (else accelerate repeats some)
    steps = ["--max_steps", "4", "--save_strategy", "no", "--per_device_eval_batch_size", "4"]
    _single(tiny_stack, tmp_path / "one", "--per_device_train_batch_size", "8", *steps)
    _launch(tiny_stack, tmp_path / "ddp", 2, "--per_device_train_batch_size", "4", *steps)
    _launch(tiny_stack, tmp_path / "ddp_ga", 2, "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", *steps)
    reference = _losses(tmp_path / "one")
    assert len(reference) == 4
    for run in ("ddp", "ddp_ga"):
        losses = _losses(tmp_path / run)
        assert losses == pytest.approx(reference, rel=1e-5), (run, losses, reference)
        print(f"{run}: max relative loss difference {max(abs(a - b) / abs(b) for a, b in zip(losses, reference)):.1e}")
        _assert_same_weights(tmp_path / "one", tmp_path / run, exact=False)
        # the final validation CE: per response token over both processes' parts of the set, as in one process
        ce = [json.loads((tmp_path / r / "eval_results.json").read_text())["eval_ce_loss"] for r in (run, "one")]
        assert ce[0] == pytest.approx(ce[1], rel=1e-5), (run, ce)


def _launch_deepspeed(tiny_stack, output_dir: Path, config: str, *extra: str) -> str:
    """The real script under ``accelerate launch`` with a project DeepSpeed config, 2 ranks on CPU; returns the log.

    accelerate picks its CPU (MULTI_CPU) mode, which ignores DeepSpeed, when ACCELERATE_USE_CPU is set; without it, and
    without a GPU, it finds no backend and counts one process. ``--ddp_backend gloo`` names the backend, so DeepSpeed
    initialises gloo and the Trainer sees the real world size.
    """
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(REPO / "recipes" / "accelerate_configs" / config), "--num_processes", "2",
                 "--mixed_precision", "no", "--main_process_port", str(port),
                 *_args(tiny_stack, output_dir, "--use_cpu", "false", "--ddp_backend", "gloo", *extra)]]

    (result,) = run_with_a_free_port(commands, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _tied_student(tiny_stack, folder: Path) -> str:
    """The tiny student with its lm_head tied to the input embeddings (as in Qwen2.5-0.5B), saved like the others."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    model.config.tie_word_embeddings = True
    tied = type(model)(model.config)
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    tied.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_stack["student"]).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("config", "student", "loss_path"),
    [
        ("zero3.yaml", "full", "fused chunked (chunk 1024, sharded heads gathered once per step)"),
        ("zero3.yaml", "tied", "fused chunked (chunk 1024, sharded heads gathered once per step)"),
        ("zero3.yaml", "lora", "fused chunked (chunk 1024, sharded heads gathered once per step)"),
        ("zero3.yaml", "tied-lora", "fused chunked (chunk 1024, sharded heads gathered once per step)"),
        ("zero2.yaml", "full", "fused chunked (chunk 1024)"),
    ],
)
def test_deepspeed_two_ranks_match_one_process(tiny_stack, tmp_path, config, student, loss_path):
    """ZeRO-2/3 student and teacher through the HF Trainer, 2 ranks x 4 against 1 process x 8: same per-step losses,
    same final weights; under ZeRO-3 each rank holds half of the teacher. ZeRO-3 full and tied students train their
    partitioned head through the fused loss (called as a module, so ZeRO-3 gathers it and reduce-scatters its
    gradient); a LoRA student's frozen head is gathered."""
    pytest.importorskip("deepspeed", reason="install the deepspeed extra")
    pytest.importorskip("accelerate")
    lora = student.endswith("lora")
    extra = ["--max_steps", "3", "--save_strategy", "no"]
    if student.startswith("tied"):  # Qwen2.5-0.5B ties its head to the embeddings
        extra += ["--model_name_or_path", _tied_student(tiny_stack, tmp_path / "tied-student")]
    if lora:
        extra += ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
                  "--learning_rate", "1e-2"]
    _single(tiny_stack, tmp_path / "one", "--per_device_train_batch_size", "8", *extra)
    log = _launch_deepspeed(tiny_stack, tmp_path / "ds", config, "--per_device_train_batch_size", "4", *extra)

    assert f"EA-KD loss path: {loss_path}" in log
    stage = 3 if config == "zero3.yaml" else 0  # ZeRO-1/2 leave the frozen teacher whole (stage 0)
    holdings = [tuple(map(int, m)) for m in re.findall(
        rf"teacher: DeepSpeed ZeRO-{stage} inference engine on cpu; this process holds (\d+) of its (\d+)", log)]
    assert len(holdings) == 2, log[-3000:]
    for local, full in holdings:
        assert local == (full // 2 if stage == 3 else full)
    reference, losses = _losses(tmp_path / "one"), _losses(tmp_path / "ds")
    assert len(reference) == 3 and losses == pytest.approx(reference, rel=1e-5), (losses, reference)
    print(f"{config} {student}: max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(losses, reference)):.1e}")
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    _assert_same_weights(tmp_path / "one", tmp_path / "ds", exact=False, name=weights)
    check_saved_model(str(tmp_path / "ds"), adapter=lora)  # a loadable model or adapter plus tokenizer


def _checkpoint_written(checkpoint: Path, step: int) -> bool:
    """The Trainer writes trainer_state.json last; it is complete once it parses (it is not written atomically)."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    except (OSError, ValueError, KeyError):
        return False


def _kill_after_checkpoint(command: list[str], checkpoint: Path, step: int) -> None:
    """SIGKILL the run once ``checkpoint`` is complete. Waits for the run's own progress, not for a time: the only
    bound is the hang guard of the whole test (a run that ends first is an error)."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not _checkpoint_written(checkpoint, step):
            if process.poll() is not None:
                raise AssertionError(f"run ended before {checkpoint.name}: {process.stderr.read()[-3000:]}")
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=600) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


@pytest.mark.parametrize("lora", [False, True])
def test_sigkilled_run_resumes_to_the_same_result(tiny_stack, tmp_path, lora):
    extra = ["--max_steps", "24", "--save_steps", "8", "--save_total_limit", "10", "--save_strategy", "steps",
             "--per_device_train_batch_size", "8"]
    if lora:
        extra += ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    _single(tiny_stack, tmp_path / "straight", *extra)

    crashed = tmp_path / "crashed"
    _kill_after_checkpoint([sys.executable, *_args(tiny_stack, crashed, *extra)], crashed / "checkpoint-8", 8)
    assert not (crashed / "trainer_state.json").exists()  # it really died before the end
    _single(tiny_stack, crashed, *extra, "--resume_from_checkpoint", str(crashed / "checkpoint-8"))

    straight_losses, resumed_losses = _losses(tmp_path / "straight"), _losses(crashed)
    assert len(straight_losses) == 24
    # the resumed state carries the log of steps 1-8 from the checkpoint, then logs steps 9-24 again
    assert resumed_losses == straight_losses
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    _assert_same_weights(tmp_path / "straight", crashed, exact=True, name=weights)


def test_on_policy_two_processes_match_one_process(tiny_stack, tmp_path):
    """Every step on-policy (top-k 1: greedy, so both layouts generate the same responses): 2 processes x 4 equal
    1 process x 8, since the loss is divided by the generated tokens counted over both processes."""
    extra = ["--max_steps", "2", "--save_strategy", "no", "--on_policy_fraction", "1", "--generation_top_k", "1",
             "--max_new_tokens", "12"]
    _single(tiny_stack, tmp_path / "one", "--per_device_train_batch_size", "8", *extra)
    _launch(tiny_stack, tmp_path / "ddp", 2, "--per_device_train_batch_size", "4", *extra)
    reference, losses = _losses(tmp_path / "one"), _losses(tmp_path / "ddp")
    assert len(reference) == 2 and losses == pytest.approx(reference, rel=1e-5), (losses, reference)
    print(f"on-policy DDP: max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(losses, reference)):.1e}")
    _assert_same_weights(tmp_path / "one", tmp_path / "ddp", exact=False)


def test_on_policy_zero3_two_ranks_match_one_process(tiny_stack, tmp_path):
    """On-policy generation from a ZeRO-3 student (parameters gathered once per generate call) and scoring by the
    ZeRO-3 teacher engine: the same losses as one unsharded process."""
    pytest.importorskip("deepspeed", reason="install the deepspeed extra")
    extra = ["--max_steps", "2", "--save_strategy", "no", "--on_policy_fraction", "1", "--generation_top_k", "1",
             "--max_new_tokens", "12"]
    _single(tiny_stack, tmp_path / "one", "--per_device_train_batch_size", "8", *extra)
    _launch_deepspeed(tiny_stack, tmp_path / "ds", "zero3.yaml", "--per_device_train_batch_size", "4", *extra)
    reference, losses = _losses(tmp_path / "one"), _losses(tmp_path / "ds")
    assert len(reference) == 2 and losses == pytest.approx(reference, rel=1e-5), (losses, reference)
    print(f"on-policy ZeRO-3: max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(losses, reference)):.1e}")


def test_two_machines_on_localhost_match_one_process(tiny_stack, tmp_path):
    """The multi-node launch path: two `accelerate launch` "machines" (--num_machines 2, --machine_rank 0/1, one
    process each, gloo over localhost) give the losses and weights of one process with the same global batch; the
    main machine writes the final model and tokenizer."""
    steps = ["--max_steps", "3", "--save_strategy", "no"]
    _single(tiny_stack, tmp_path / "one", "--per_device_train_batch_size", "8", *steps)

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                 "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                 *_args(tiny_stack, tmp_path / "nodes", "--per_device_train_batch_size", "4", *steps)]
                for rank in (0, 1)]

    results = run_with_a_free_port(commands, _env())
    for rank, result in enumerate(results):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    reference, losses = _losses(tmp_path / "one"), _losses(tmp_path / "nodes")
    assert len(reference) == 3 and losses == pytest.approx(reference, rel=1e-5), (losses, reference)
    print(f"2 machines: max relative loss difference {max(abs(a - b) / abs(b) for a, b in zip(losses, reference)):.1e}")
    _assert_same_weights(tmp_path / "one", tmp_path / "nodes", exact=False)
    assert (tmp_path / "nodes" / "tokenizer_config.json").exists()


@pytest.mark.parametrize("launch", ["ddp", "zero3"])
def test_cache_teacher_on_two_processes_equals_one(tiny_stack, tmp_path, launch):
    """cache-teacher under accelerate launch with 2 processes (shards taken round robin; under ZeRO-3 the processes
    run their teacher forwards in lockstep, the one with fewer shards filling in) writes the same shards, byte for
    byte, as one process."""
    if launch == "zero3":
        pytest.importorskip("deepspeed", reason="install the deepspeed extra")
    recipe = str(REPO / "recipes" / "tiny" / "eakd_token.yaml")
    args = [recipe, "--model_name_or_path", tiny_stack["student"], "--teacher_model_name_or_path",
            tiny_stack["teacher"], "--dataset_name", tiny_stack["data_dir"], "--max_train_samples", "150",
            "--max_length", "96", "--max_prompt_length", "64", "--eval_strategy", "no", "--dataset_eval_split", "",
            "--output_dir", str(tmp_path / "unused"), "--top-k", "8", "--shard-size", "50"]
    single = subprocess.run([sys.executable, "-m", "eakd_llm.cli", "cache-teacher", *args, "--output",
                             str(tmp_path / "one")], env=_env(), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    env = _env() if launch == "ddp" else {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    config = ["--multi_gpu"] if launch == "ddp" else [
        "--config_file", str(REPO / "recipes" / "accelerate_configs" / "zero3.yaml"), "--mixed_precision", "no"]
    extra = [] if launch == "ddp" else ["--use_cpu", "false", "--ddp_backend", "gloo"]

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", "2",
                 "--main_process_port", str(port), "-m", "eakd_llm.cli", "cache-teacher", *args, *extra,
                 "--output", str(tmp_path / "two")]]

    (two,) = run_with_a_free_port(commands, env)
    assert two.returncode == 0, two.stderr[-3000:]
    shards = json.loads((tmp_path / "one" / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) == 3  # an odd count: under ZeRO-3 the second process fills the last round
    for name in shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["complete"]
