"""Instruction-benchmark evaluation: metrics, record loading, seeded generation, LoRA loading, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer

from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.data.dataset import build_dataset, format_instruction_prompt, prompt_length
from eakd_llm.data.prompts import load_split
from eakd_llm.evaluation.metrics import ROUGE_L_METRIC_PATH
from eakd_llm.evaluation.protocol import (
    BENCHMARKS,
    DEFAULT_SEEDS,
    EvalRecord,
    GenerationSettings,
    encode_prompt,
    encode_record_prompt,
    eval_main,
    evaluate_model,
    exact_match,
    generate_predictions,
    generate_responses,
    load_eval_records,
    load_model_for_eval,
    load_rouge_l_metric,
    normalize_answer,
    score,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"max_new_tokens": 8, "batch_size": 4}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models generate token by token: one thread is ~50x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(tiny_stack):
    return load_model_for_eval(tiny_stack["student"], device="cpu")


@pytest.fixture(scope="module")
def records(tiny_stack):
    return load_eval_records(tiny_stack["data_dir"], split="test", max_samples=8)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

ROUGE_CASES = [
    ("the cat is running", ["the cat runs"]),  # stemming: running / runs -> run
    ("running", ["runs"]),
    ("The Cat sat on the mat.", ["a dog sat on a log", "the cat sat on the mat"]),  # max over references
    ("", ["something"]),  # empty prediction
    ("apples and oranges", ["oranges and apples", "pears", "apple"]),
    ("Completely unrelated words", ["nothing in common here"]),
]


def test_rouge_l_module_through_evaluate_matches_rouge_score():
    import evaluate

    assert os.path.isfile(os.path.join(ROUGE_L_METRIC_PATH, "rouge_l.py"))
    metric = evaluate.load(ROUGE_L_METRIC_PATH, keep_in_memory=True)
    predictions = [p for p, _ in ROUGE_CASES]
    references = [refs for _, refs in ROUGE_CASES]
    result = metric.compute(predictions=predictions, references=references)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in ROUGE_CASES]
    assert result["rougeL_per_example"] == pytest.approx(expected, abs=1e-12)
    assert result["rougeL"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert expected[0] == pytest.approx(6 / 7)  # stemmed LCS "the cat run": P 3/4, R 3/3
    assert unstemmed.score("the cat runs", "the cat is running")["rougeL"].fmeasure == pytest.approx(4 / 7)
    assert expected[1] == 1.0  # "running" and "runs" both stem to "run"
    assert expected[2] == pytest.approx(1.0)  # the second reference matches (case and "." ignored)
    assert expected[3] == 0.0

    # One plain string per prediction is accepted too.
    single = metric.compute(predictions=["the cat runs"], references=["the cat is running"])
    assert single["rougeL"] == pytest.approx(scorer.score("the cat is running", "the cat runs")["rougeL"].fmeasure)

    # score() goes through the same module: x100, mean over records.
    assert score(predictions, references)["rougeL"] == pytest.approx(100 * sum(expected) / len(expected))
    assert load_rouge_l_metric() is load_rouge_l_metric()  # loaded once


def test_hf_cache_honours_hf_home_else_falls_back_to_a_writable_folder(monkeypatch, tmp_path):
    from eakd_llm.evaluation import protocol as evaluation

    monkeypatch.setenv("HF_HOME", str(tmp_path / "mine"))
    assert evaluation._hf_home() == str(tmp_path / "mine")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # cannot be created: its parent is a file
    home = evaluation._hf_home()
    assert home.startswith(tempfile.gettempdir()) and os.environ["HF_HOME"] == home and os.access(home, os.W_OK)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("  The Cat,  sat! ", "the cat sat"),
        ("Hello,\n\tWORLD...", "hello world"),
        ("a dog", "a dog"),  # articles are kept (MiniLLM's normalisation, unlike SQuAD's)
        ("it's 3.5%", "its 35"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_score():
    assert exact_match("Kelport.", ["kelport"]) == 1.0
    assert exact_match("the Kelport", ["Kelport"]) == 0.0  # no article removal
    assert exact_match("B", ["a", "b!"]) == 1.0  # best over references
    result = score(["Kelport.", "nope"], [["kelport"], ["yes", "no"]])
    assert result["exact_match"] == 50.0
    assert set(result) == {"rougeL", "exact_match"}
    assert all(0.0 <= v <= 100.0 for v in result.values())
    with pytest.raises(ValueError):
        score(["a"], [[]])


# ---------------------------------------------------------------------------------------------------------------
# Loading benchmark records
# ---------------------------------------------------------------------------------------------------------------


def test_load_raw_records_with_and_without_input(tmp_path):
    path = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Uppercase it.", "input": "cat", "output": "CAT"},
        ],
    )
    records = load_eval_records(path)
    assert records[0] == EvalRecord(format_instruction_prompt("Add 2 and 3."), ["5"])
    assert records[1] == EvalRecord(format_instruction_prompt("Uppercase it.", "cat"), ["CAT"])
    assert "### Input:\ncat" in records[1].prompt and "### Input" not in records[0].prompt
    assert load_eval_records(path, max_samples=1) == records[:1]
    # A folder of <split>.jsonl files.
    os.makedirs(tmp_path / "folder")
    write_jsonl(tmp_path / "folder" / "valid.jsonl", [{"instruction": "Hi.", "output": "Hello"}])
    assert load_eval_records(str(tmp_path / "folder"), split="valid")[0].references == ["Hello"]
    with pytest.raises(ConfigError, match="split 'test' not found"):
        load_eval_records(str(tmp_path / "folder"))


def test_load_processed_records_string_and_list_outputs(tmp_path):
    path = write_jsonl(
        tmp_path / "self_inst.jsonl",
        [
            {"instruction": "ignored", "prompt": "Q: one?<n>A:", "input": "", "output": "1"},
            {"instruction": "ignored", "prompt": "Q: colour?\nA:", "input": "", "output": ["red", "blue"]},
        ],
    )
    records = load_eval_records(path)  # auto: a prompt column means processed
    assert records == [EvalRecord("Q: one?\nA:", ["1"]), EvalRecord("Q: colour?\nA:", ["red", "blue"])]
    raw = load_eval_records(path, fmt="raw")  # forcing raw renders the instruction instead
    assert raw[0].prompt == format_instruction_prompt("ignored")


def test_load_synthetic_test_split_keeps_all_references(tiny_stack):
    rows = [json.loads(line) for line in Path(tiny_stack["test_file"]).read_text().splitlines()]
    records = load_eval_records(tiny_stack["data_dir"], split="test")
    assert len(records) == len(rows)
    for row, record in zip(rows, records):
        assert record.prompt == format_instruction_prompt(row["instruction"], row["input"])
        assert record.references == row["references"]
        assert row["output"] in record.references
    assert any(len(r.references) > 1 for r in records)


def test_missing_column_names_the_columns_present(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"no column 'instruction'.*columns present: question, answer"):
        load_eval_records(path)
    with pytest.raises(ConfigError, match=r"no column 'prompt'.*columns present: question, answer"):
        load_eval_records(path, fmt="processed")
    no_output = write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"'output'.*columns present: instruction, answer"):
        load_eval_records(no_output)
    assert load_eval_records(no_output, output_column="answer")[0].references == ["a"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_eval_records(str(tmp_path / "missing.jsonl"))


CHAT = [
    {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                  {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"},
                  {"role": "assistant", "content": "banana cherry"}]},
]


def test_load_messages_records(tmp_path):
    """Chat records, as training takes them: the final assistant turn is the reference and leaves the prompt."""
    path = write_jsonl(tmp_path / "test.jsonl", CHAT)
    records = load_eval_records(path)  # auto: a messages column means messages records, rendered as chat
    assert records == [
        EvalRecord("Name a fruit.", ["apple"], CHAT[0]["messages"][:1]),
        EvalRecord("second question", ["banana cherry"], CHAT[1]["messages"][:4]),
    ]
    # A references column wins; a conversation ending with the user needs one.
    refs = write_jsonl(tmp_path / "refs.jsonl", [{**CHAT[0], "references": ["pear", "plum"]},
                                                 {"messages": CHAT[1]["messages"][:4], "output": "cherry"}])
    assert [(r.references, len(r.messages)) for r in load_eval_records(refs)] == [(["pear", "plum"], 1),
                                                                                 (["cherry"], 4)]
    no_answer = write_jsonl(tmp_path / "open.jsonl", [{"messages": CHAT[1]["messages"][:4]}])
    with pytest.raises(ConfigError, match="record 0 has no reference answer"):
        load_eval_records(no_answer)
    with pytest.raises(ConfigError, match="prompt_format 'instruction' is for instruction or prompt records"):
        load_eval_records(path, prompt_format="instruction")
    with pytest.raises(ConfigError, match=r"no column 'messages' \(set by messages_column\)"):
        load_eval_records(write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}]), fmt="messages")


def test_training_record_formats_and_prompt_formats(tmp_path):
    """Training's instruction (Dolly: context/response) and prompt_response files evaluate as they are; the
    instruction can be written with the template, as is, or as a user turn."""
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Say hi.", "context": "to Bob", "response": "hi"}])
    assert load_eval_records(dolly, context_column="context") == [
        EvalRecord(format_instruction_prompt("Say hi.", "to Bob"), ["hi"])]
    assert load_eval_records(dolly, context_column="context", prompt_format="raw") == [
        EvalRecord("Say hi.\n\nto Bob", ["hi"])]
    assert load_eval_records(dolly, prompt_format="chat") == [
        EvalRecord("Say hi.", ["hi"], [{"role": "user", "content": "Say hi."}])]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: one?", "response": "1"}])
    assert load_eval_records(pairs) == [EvalRecord("Q: one?", ["1"])]
    assert load_eval_records(pairs, prompt_format="chat")[0].messages == [{"role": "user", "content": "Q: one?"}]
    with pytest.raises(ConfigError, match="prompt_format must be one of auto, chat, instruction, raw"):
        load_eval_records(pairs, prompt_format="plain")


# ---------------------------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------------------------


def _predictions(folder, name: str, seed: int) -> list[str]:
    lines = Path(folder, f"predictions_{name}_seed{seed}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prediction"] for line in lines]


def test_evaluate_model_seeds_files_and_reproducibility(student, records, tmp_path):
    model, tokenizer = student
    datasets = {"tiny": records, "tiny_head": records[:3]}
    settings = GenerationSettings(**TINY)
    first = evaluate_model(model, tokenizer, datasets, seeds=(1, 2), settings=settings, output_dir=str(tmp_path / "a"))
    assert set(first) == {"tiny", "tiny_head"}
    for name, result in first.items():
        assert result["num_records"] == len(datasets[name])
        for metric in ("rougeL", "exact_match"):
            per_seed = result[metric]["per_seed"]
            assert sorted(per_seed) == [1, 2]
            assert all(0.0 <= v <= 100.0 for v in per_seed.values())
            assert result[metric]["mean"] == pytest.approx(sum(per_seed.values()) / 2)
            assert result[metric]["std"] == pytest.approx(abs(per_seed[1] - per_seed[2]) / 2)  # ddof=0

    # Files: predictions per dataset x seed, results.json, results.md with a row per dataset.
    rows = [json.loads(line) for line in (tmp_path / "a" / "predictions_tiny_seed1.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r.prompt for r in records]
    assert [r["references"] for r in rows] == [r.references for r in records]
    assert all(isinstance(r["prediction"], str) for r in rows)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["seeds"] == [1, 2] and saved["settings"]["max_new_tokens"] == 8
    assert saved["results"]["tiny"]["rougeL"]["mean"] == first["tiny"]["rougeL"]["mean"]
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| dataset | ROUGE-L | EM |" in table
    assert any(line.startswith("| tiny |") for line in table.splitlines())
    assert any(line.startswith("| tiny_head |") for line in table.splitlines())
    assert " ± " in table

    # Same seed -> same numbers and identical predictions; another seed samples something else.
    second = evaluate_model(model, tokenizer, {"tiny": records}, seeds=(1,), settings=settings,
                            output_dir=str(tmp_path / "b"))
    assert second["tiny"]["rougeL"]["per_seed"][1] == first["tiny"]["rougeL"]["per_seed"][1]
    assert second["tiny"]["exact_match"]["per_seed"][1] == first["tiny"]["exact_match"]["per_seed"][1]
    assert _predictions(tmp_path / "b", "tiny", 1) == _predictions(tmp_path / "a", "tiny", 1)
    assert _predictions(tmp_path / "a", "tiny", 1) != _predictions(tmp_path / "a", "tiny", 2)


def test_greedy_is_identical_across_seeds(student, records, tmp_path):
    model, tokenizer = student
    settings = GenerationSettings(do_sample=False, **TINY)
    result = evaluate_model(model, tokenizer, {"tiny": records}, seeds=(1, 2), settings=settings,
                            output_dir=str(tmp_path))
    assert _predictions(tmp_path, "tiny", 1) == _predictions(tmp_path, "tiny", 2)
    assert result["tiny"]["rougeL"]["std"] == 0.0


def test_left_padding_batched_equals_one_by_one(student, records):
    model, tokenizer = student
    lengths = {}
    for record in records:
        lengths.setdefault(len(encode_prompt(tokenizer, record.prompt, 256)), record.prompt)
    prompts = list(lengths.values())[:4]
    assert len({len(encode_prompt(tokenizer, p, 256)) for p in prompts}) >= 3, "need prompts of different lengths"
    batched = generate_responses(model, tokenizer, prompts, GenerationSettings(do_sample=False, max_new_tokens=8,
                                                                                batch_size=len(prompts)), seed=0)
    single = [
        generate_responses(model, tokenizer, [p], GenerationSettings(do_sample=False, max_new_tokens=8), seed=0)[0]
        for p in prompts
    ]
    assert batched == single
    assert tokenizer.padding_side == "right"  # the tokenizer is left as it was


def test_prompt_truncation_keeps_bos_and_end(student):
    _, tokenizer = student
    prompt = format_instruction_prompt("word " * 200)
    full = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = encode_prompt(tokenizer, prompt, 32)
    assert len(full) > 32 and len(ids) == 32
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == full[-31:]
    assert encode_prompt(tokenizer, "short", 32) == tokenizer("short", add_special_tokens=True)["input_ids"]


def _prompts_of_different_lengths(tokenizer, tiny_stack, max_prompt_length: int = 64) -> list[str]:
    by_length = {}
    for record in load_eval_records(tiny_stack["data_dir"]):
        by_length.setdefault(len(encode_prompt(tokenizer, record.prompt, max_prompt_length)), record.prompt)
    prompts = list(by_length.values())[:8]
    assert len(prompts) >= 4
    return prompts


class _NewTokenCounter:
    """Wraps ``model.generate`` to record how many tokens each call may generate (its max_new_tokens)."""

    def __init__(self, model, monkeypatch):
        self.budgets: list[int] = []
        original = model.generate

        def generate(*args, generation_config, stopping_criteria, **kwargs):
            self.budgets += stopping_criteria[0].budgets.tolist()
            return original(*args, generation_config=generation_config, stopping_criteria=stopping_criteria, **kwargs)

        monkeypatch.setattr(model, "generate", generate)


def test_fixed_budget_is_minillms_max_length_minus_max_prompt_length(student, tiny_stack, monkeypatch):
    """Default (MiniLLM's evaluate_main.py): every record may generate max_length - max_prompt_length new tokens,
    whatever its prompt's length; max_new_tokens caps it."""
    model, tokenizer = student
    prompts = _prompts_of_different_lengths(tokenizer, tiny_stack)
    assert GenerationSettings().budget == "fixed"
    counter = _NewTokenCounter(model, monkeypatch)
    generate_responses(model, tokenizer, prompts, GenerationSettings(max_prompt_length=64, max_length=70,
                                                                     do_sample=False, batch_size=8), seed=0)
    assert counter.budgets == [6] * len(prompts)
    counter.budgets.clear()
    generate_responses(model, tokenizer, prompts, GenerationSettings(max_prompt_length=64, max_length=70,
                                                                     max_new_tokens=3, do_sample=False), seed=0)
    assert counter.budgets == [3] * len(prompts)


def test_remaining_budget_gives_each_record_its_own(student, tiny_stack, monkeypatch):
    model, tokenizer = student
    prompts = _prompts_of_different_lengths(tokenizer, tiny_stack)
    # max_length - prompt length differs per record: 4 new tokens for the longest prompt, more for shorter ones.
    settings = GenerationSettings(max_prompt_length=64, max_length=68, do_sample=False, no_repeat_ngram_size=0,
                                  batch_size=8, budget="remaining")
    counter = _NewTokenCounter(model, monkeypatch)
    batched = generate_responses(model, tokenizer, prompts, settings, seed=0)
    lengths = [len(encode_prompt(tokenizer, p, 64)) for p in prompts]
    assert counter.budgets == [68 - n for n in lengths] and len(set(counter.budgets)) > 1
    # A batch of one generates exactly max_length - len(prompt) tokens (or stops at EOS): batching changes nothing.
    assert batched == [generate_responses(model, tokenizer, [p], settings, seed=0)[0] for p in prompts]
    capped = generate_responses(model, tokenizer, prompts, GenerationSettings(
        max_prompt_length=64, max_length=68, max_new_tokens=2, do_sample=False, no_repeat_ngram_size=0,
        budget="remaining"), seed=0)
    assert capped == [generate_responses(model, tokenizer, [p], GenerationSettings(
        max_new_tokens=2, do_sample=False, no_repeat_ngram_size=0, budget="remaining"), seed=0)[0] for p in prompts]


def test_generation_stops_and_cuts_at_every_end_token_of_the_generation_config(student, records, tmp_path):
    """A chat model lists several end ids in generation_config.eos_token_id (Qwen2.5-Instruct: <|im_end|> and
    <|endoftext|>): generation must stop and cut at any of them, not only at the tokenizer's EOS."""
    from transformers import AutoModelForCausalLM

    from eakd_llm.models.generation import end_token_ids, generate_token_ids

    model, tokenizer = student
    prompts = [encode_prompt(tokenizer, r.prompt, 256) for r in records[:4]]
    greedy = GenerationSettings(max_new_tokens=12, do_sample=False, no_repeat_ngram_size=0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = generate_token_ids(model, prompts, greedy, [eos], pad)
    # A token the greedy student emits mid-response, which is not the tokenizer's EOS: call it the chat end token.
    second_end = next(t for ids in plain for t in ids[1:] if t != eos)

    chat = AutoModelForCausalLM.from_pretrained(model.name_or_path)
    chat.generation_config.eos_token_id = [eos, second_end]
    folder = tmp_path / "chat"
    chat.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    chat, chat_tokenizer = load_model_for_eval(str(folder), device="cpu")  # the real from_pretrained path
    assert end_token_ids(chat_tokenizer, chat) == [eos, second_end]
    ends = end_token_ids(chat_tokenizer, chat)
    cut = generate_token_ids(chat, prompts, greedy, ends, pad)
    kept = generate_token_ids(chat, prompts, greedy, ends, pad, keep_eos=True)
    for before, after, with_end in zip(plain, cut, kept):
        stop = next((i for i, t in enumerate(before) if t in (eos, second_end)), None)
        assert after == (before if stop is None else before[:stop])  # the same greedy tokens, cut at either end
        assert with_end == (before if stop is None else before[:stop + 1])
    assert any(second_end in ids for ids in plain)
    # generate_responses uses the union too: its texts are the decoded cut token lists.
    texts = generate_responses(chat, chat_tokenizer, [r.prompt for r in records[:4]], greedy, seed=0)
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in cut]


def test_top_k_zero_adds_no_top_k_filter_and_model_generation_config_is_ignored(student, records, monkeypatch):
    import transformers.generation.utils as generation_utils

    model, tokenizer = student
    created = []
    original = generation_utils.TopKLogitsWarper

    class Spy(original):
        def __init__(self, *args, **kwargs):
            created.append(kwargs.get("top_k", args[0] if args else None))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generation_utils, "TopKLogitsWarper", Spy)
    prompts = [r.prompt for r in records[:2]]
    generate_responses(model, tokenizer, prompts, GenerationSettings(max_new_tokens=2, top_k=0), seed=0)
    assert created == []
    generate_responses(model, tokenizer, prompts, GenerationSettings(max_new_tokens=2, top_k=5), seed=0)
    assert created == [5]

    # A checkpoint's own sampling defaults do not leak into the protocol, and the model's config is restored.
    greedy = GenerationSettings(max_new_tokens=4, do_sample=False)
    clean = generate_responses(model, tokenizer, prompts, greedy, seed=0)
    saved = model.generation_config
    saved.repetition_penalty, saved.top_k, saved.min_new_tokens = 50.0, 1, 4
    try:
        assert generate_responses(model, tokenizer, prompts, greedy, seed=0) == clean
        assert model.generation_config is saved
    finally:
        saved.repetition_penalty = saved.top_k = saved.min_new_tokens = None


def _chat_config(tmp_path, **kwargs) -> EAKDConfig:
    return EAKDConfig(output_dir=str(tmp_path / "out"), dataset_name=str(tmp_path / "data"), **kwargs)


@pytest.mark.parametrize("variant", ["bos", "no_bos"])
def test_chat_prompt_has_special_tokens_once_and_is_the_training_prompt(chatml_tokenizers, tmp_path, variant):
    """The rendered chat prompt holds the template's BOS (if any) and gets no second one; its ids are exactly the
    prompt prefix training builds for the same record, also when both truncate it."""
    tok = chatml_tokenizers[variant]
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "train.jsonl", CHAT)
    records = load_eval_records(path)
    bos = "<s>" if variant == "bos" else ""
    expected = [
        bos + "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
        bos + "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
        "<|im_start|>assistant\nfirst answer<|im_end|>\n<|im_start|>user\nsecond question<|im_end|>\n"
        "<|im_start|>assistant\n",
    ]
    for max_prompt_length in (60, 9):
        config = _chat_config(tmp_path, max_length=64, max_prompt_length=max_prompt_length)
        dataset = build_dataset(load_split(config.dataset_name, "train"), config, tok)
        for record, example, text in zip(records, dataset, expected):
            ids = encode_record_prompt(tok, record, max_prompt_length)
            assert ids == example["input_ids"][:prompt_length(example["labels"])]
            full = tok(text, add_special_tokens=False)["input_ids"]
            if len(full) <= max_prompt_length:
                assert ids == full
            else:
                assert len(ids) == max_prompt_length and ids[-5:] == full[-5:]
            assert ids.count(tok.bos_token_id) == (1 if bos else 0) and (ids[0] == tok.bos_token_id) == bool(bos)
    if bos:  # tokenizing the rendered text with the tokenizer's specials as well would double the BOS
        assert tok(expected[0])["input_ids"][:2] == [tok.bos_token_id] * 2


def test_instruction_prompt_is_the_training_prompt(tiny_stack, student):
    _, tokenizer = student
    config = EAKDConfig(output_dir="unused", dataset_name=tiny_stack["data_dir"], max_prompt_length=24,
                        response_column="output")
    dataset = build_dataset(load_split(tiny_stack["data_dir"], "test"), config, tokenizer, split="test",
                            max_samples=6)
    lengths = []
    for record, example in zip(load_eval_records(tiny_stack["data_dir"], max_samples=6), dataset):
        ids = encode_record_prompt(tokenizer, record, 24)
        assert ids == example["input_ids"][:prompt_length(example["labels"])]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        lengths.append(len(tokenizer(record.prompt)["input_ids"]))
    assert max(lengths) > 24  # truncated alike


def test_predictions_record_how_generation_ended(student, records, tmp_path):
    """Each prediction keeps its raw text (end token included), whether an end id stopped it and how many tokens it
    generated; results report the stopped share. One end id is a token some greedy responses emit and others not."""
    from eakd_llm.models.generation import generate_token_ids

    model, tokenizer = student
    prompts = [encode_prompt(tokenizer, r.prompt, 256) for r in records]
    greedy = GenerationSettings(max_new_tokens=10, do_sample=False, no_repeat_ngram_size=0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = generate_token_ids(model, prompts, greedy, [eos], pad, keep_eos=True)
    in_rows = {t: sum(t in ids[1:] for ids in plain) for ids in plain for t in ids[1:]}
    end = next(t for t, n in sorted(in_rows.items()) if 0 < n < len(plain) and t != eos)
    expected = []
    for ids in plain:
        stop = next((i for i, t in enumerate(ids) if t in (eos, end)), None)
        expected.append((ids if stop is None else ids[:stop + 1], stop is not None))
    assert {stopped for _, stopped in expected} == {True, False}

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos, end]
    try:
        predictions = generate_predictions(model, tokenizer, prompts, greedy, seed=0)
        results = evaluate_model(model, tokenizer, {"tiny": records}, seeds=(1,), settings=greedy,
                                 output_dir=str(tmp_path))
    finally:
        model.generation_config.eos_token_id = saved
    for prediction, (ids, stopped) in zip(predictions, expected):
        assert prediction.stopped == stopped and prediction.new_tokens == len(ids)
        assert prediction.raw_text == tokenizer.decode(ids, skip_special_tokens=False)
        assert prediction.text == tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
        assert stopped or len(ids) == 10  # not stopped: the budget ran out
    share = sum(stopped for _, stopped in expected) / len(expected)
    assert results["tiny"]["stopped"]["per_seed"][1] == pytest.approx(share)
    assert results["tiny"]["new_tokens"]["mean"] == pytest.approx(sum(len(i) for i, _ in expected) / len(expected))
    rows = [json.loads(line) for line in (tmp_path / "predictions_tiny_seed1.jsonl").read_text().splitlines()]
    assert [(r["raw_prediction"], r["stopped"], r["new_tokens"]) for r in rows] == [
        (p.raw_text, p.stopped, p.new_tokens) for p in predictions]
    assert f"| {100 * share:.0f}% |" in (tmp_path / "results.md").read_text()


def test_settings_validation(student):
    model, tokenizer = student
    with pytest.raises(ConfigError, match="max_length"):
        generate_responses(model, tokenizer, ["x"], GenerationSettings(max_prompt_length=8, max_length=8), seed=0)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        evaluate_model(model, tokenizer, {"a": [EvalRecord("x", ["y"])]}, seeds=(1, 1))
    assert DEFAULT_SEEDS == (10, 20, 30, 40, 50)
    assert BENCHMARKS == ("dolly", "self_inst", "vicuna", "sni", "unni")


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters and the command line
# ---------------------------------------------------------------------------------------------------------------


def test_lora_adapter_loads_merged(tiny_stack, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model_for_eval(tiny_stack["student"], device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_stack["student"]

    input_ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        unmerged = peft_model(input_ids=input_ids).logits
        merged_by_hand = peft_model.merge_and_unload()(input_ids=input_ids).logits
        plain, _ = load_model_for_eval(tiny_stack["student"], device="cpu")
        base_logits = plain(input_ids=input_ids).logits
        model, tokenizer = load_model_for_eval(str(adapter_dir), device="cpu")
        logits = model(input_ids=input_ids).logits
    assert not model.training
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged, not wrapped
    assert torch.allclose(logits, merged_by_hand, atol=1e-5)
    assert torch.allclose(logits, unmerged, atol=1e-5)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter really changes the model
    assert tokenizer.get_vocab() == load_model_for_eval(tiny_stack["student"], device="cpu")[1].get_vocab()


def test_eval_main_end_to_end(tiny_stack, tmp_path, capsys):
    out = tmp_path / "eval"
    code = eval_main([
        "--model", tiny_stack["student"],
        "--data", f"tiny={tiny_stack['data_dir']}",
        "--data", f"raw={tiny_stack['test_file']}",
        "--max-samples", "3", "--max-new-tokens", "4", "--seeds", "1", "2", "--batch-size", "3",
        "--output-dir", str(out), "--device", "cpu",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "| raw |" in printed
    for name in ("tiny", "raw"):
        for seed in (1, 2):
            assert len((out / f"predictions_{name}_seed{seed}.jsonl").read_text().splitlines()) == 3
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"tiny", "raw"} and saved["seeds"] == [1, 2]
    assert saved["settings"]["do_sample"] is True and saved["settings"]["top_k"] == 0
    # The same records under two names, same seeds: same numbers.
    assert saved["results"]["tiny"]["rougeL"] == saved["results"]["raw"]["rougeL"]


@pytest.fixture(scope="module")
def chatml_model(chatml_tokenizers, tmp_path_factory) -> str:
    from eakd_llm.studies.synthetic import save_tiny_model

    folder = tmp_path_factory.mktemp("chatml-model")
    save_tiny_model("student", folder, chatml_tokenizers["no_bos"], seed=0)
    return str(folder)


def test_eval_main_on_chat_records(chatml_model, tmp_path, capsys):
    """`eakd-llm eval --data smol=test.jsonl` on messages records (it used to fail: no column 'instruction')."""
    data = write_jsonl(tmp_path / "test.jsonl", CHAT)
    out = tmp_path / "eval"
    code = eval_main(["--model", chatml_model, "--data", f"smol={data}", "--max-new-tokens", "4", "--seeds", "1",
                      "--output-dir", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "| smol |" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "predictions_smol_seed1.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    assert [r["references"] for r in rows] == [["apple"], ["banana cherry"]]
    for row in rows:
        assert 1 <= row["new_tokens"] <= 4 and isinstance(row["stopped"], bool)
        assert row["stopped"] == row["raw_prediction"].endswith("<|im_end|>")
    saved = json.loads((out / "results.json").read_text())["results"]["smol"]
    assert saved["stopped"]["mean"] == sum(r["stopped"] for r in rows) / 2
    code = eval_main(["--model", chatml_model, "--data", f"smol={data}", "--prompt-format", "instruction",
                      "--output-dir", str(out), "--device", "cpu"])
    assert code == 2 and "prompt_format 'instruction'" in capsys.readouterr().err


def test_eval_main_config_error_exits_2(tiny_stack, tmp_path, capsys):
    code = eval_main(["--model", tiny_stack["student"], "--data", f"x={tmp_path / 'nope.jsonl'}",
                      "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eakd-llm: error: ") and "nope.jsonl" in err and len(err.splitlines()) == 1


def test_script_runs_despite_sharing_the_evaluate_name(tiny_stack, tmp_path):
    # scripts/evaluate.py must not shadow the `evaluate` library it imports.
    out = tmp_path / "script"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model", tiny_stack["student"],
         "--data", f"tiny={tiny_stack['test_file']}", "--max-samples", "2", "--max-new-tokens", "2",
         "--seeds", "1", "--output-dir", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=str(REPO / "scripts"),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| tiny |" in proc.stdout
    assert (out / "results.md").is_file()
