"""Shared fixtures: one small offline tiny stack (data, tokenizer, random teacher/student) per test session."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory) -> dict[str, str]:
    from eakd_llm.studies.synthetic import prepare_tiny_stack

    root = tmp_path_factory.mktemp("tiny")
    return prepare_tiny_stack(str(root), num_train=400, num_validation=40, num_test=40, vocab_size=512, seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_with_a_free_port(make_commands, env: dict[str, str], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Start the commands ``make_commands(port)`` together and wait for all. A port the OS handed out can be taken by
    another process before ours binds it (EADDRINUSE): then everything is retried with a new port, never a fixed one."""
    for _ in range(3):
        commands = make_commands(free_port())
        processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for c in commands]
        results = []
        for process, command in zip(processes, commands):
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
        if not any(r.returncode and ("EADDRINUSE" in r.stderr or "address already in use" in r.stderr.lower())
                   for r in results):
            break
    return results


CHAT_TEXTS = [
    "Name a fruit. apple banana cherry. Convert the word to uppercase. APPLE. hello world, how are you?",
    "user assistant system Be brief. first answer second question",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
]


@pytest.fixture(scope="session")
def chatml_tokenizers(tmp_path_factory) -> dict[str, object]:
    """Tiny ChatML tokenizers (EOS ``<|im_end|>``): ``bos`` adds a BOS and its template writes it (Llama style),
    ``no_bos`` adds none (SmolLM2, Qwen)."""
    from eakd_llm.studies.synthetic import train_tokenizer

    return {
        name: train_tokenizer(CHAT_TEXTS * 20, vocab_size=400, chat_format="chatml", add_bos=name == "bos",
                              output_dir=str(tmp_path_factory.mktemp(f"chatml-{name}")))
        for name in ("bos", "no_bos")
    }
