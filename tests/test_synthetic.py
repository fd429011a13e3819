"""Tests for the offline synthetic tiny stack (data, tokenizer, tiny Llama teacher/student)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from eakd_llm.studies import synthetic
from eakd_llm.studies.synthetic import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    ANTONYM_PAIRS,
    CAPITALS,
    CATEGORIES,
    TASK_FAMILIES,
    generate_records,
    generate_splits,
    prepare_tiny_stack,
    tiny_llama_config,
    train_tokenizer,
    write_jsonl,
    write_splits,
)

RECORD_KEYS = {"instruction", "input", "output", "family", "references"}
CLOSED = [name for name, family in TASK_FAMILIES.items() if not family.open_ended]
OPEN = [name for name, family in TASK_FAMILIES.items() if family.open_ended]


# ---------------------------------------------------------------------------------------------------------------
# Task families and records
# ---------------------------------------------------------------------------------------------------------------


def test_task_families_cover_closed_and_open_ended():
    assert len(TASK_FAMILIES) >= 8
    assert len(CLOSED) >= 5 and len(OPEN) >= 3
    uses_input = set()
    for name, family in TASK_FAMILIES.items():
        assert family.name == name
        prompts = family.prompts()
        keys = [(p.instruction, p.input) for p in prompts]
        assert len(keys) == len(set(keys)), f"{name} has duplicate prompts"
        assert len(prompts) >= 40, f"{name} prompt space too small to populate held-out splits"
        assert prompts == family.prompts(), "prompt enumeration must be deterministic"
        with_input = sum(1 for p in prompts if p.input)
        if with_input:
            uses_input.add(name)
    # The input field is used by some prompts and left empty by others.
    assert len(uses_input) >= 4
    assert all(p.input for p in TASK_FAMILIES["pet_name"].prompts())
    assert sum(1 for p in TASK_FAMILIES["name_item"].prompts() if not p.input) > 40
    uppercase = TASK_FAMILIES["uppercase"].prompts()
    assert any(p.input == "apple" and p.instruction == "Convert the word to uppercase." for p in uppercase)
    assert any(p.instruction == "What is 3 plus 4?" and p.input == "" for p in TASK_FAMILIES["addition"].prompts())


def test_generate_records_is_deterministic_per_seed():
    a = generate_records(200, seed=3)
    b = generate_records(200, seed=3)
    c = generate_records(200, seed=4)
    assert a == b
    assert a != c
    assert json.dumps(a) == json.dumps(b)  # also byte-identical once serialised


def test_records_schema_and_family_coverage():
    records = generate_records(600, seed=0)
    assert len(records) == 600
    assert {r["family"] for r in records} == set(TASK_FAMILIES)
    for r in records:
        assert set(r) == RECORD_KEYS
        assert all(isinstance(r[k], str) for k in ("instruction", "input", "output", "family"))
        assert isinstance(r["references"], list) and all(isinstance(x, str) for x in r["references"])
        assert r["output"] in r["references"]
        assert len(r["references"]) == len(set(r["references"]))
        assert 1 <= len(r["output"].split()) <= 15, r
        assert r["instruction"].strip() and r["output"].strip()


def test_family_mixture_is_roughly_uniform():
    records = generate_records(1200, seed=1)
    counts = defaultdict(int)
    for r in records:
        counts[r["family"]] += 1
    expected = 1200 / len(TASK_FAMILIES)
    assert all(abs(c - expected) <= 1 for c in counts.values()), counts
    # ... but not in a fixed round-robin order.
    first_block = [r["family"] for r in records[: len(TASK_FAMILIES)]]
    second_block = [r["family"] for r in records[len(TASK_FAMILIES) : 2 * len(TASK_FAMILIES)]]
    assert first_block != second_block


def _subject(record: dict, pattern: str) -> str:
    """The word a closed-family prompt is about: the input when present, else parsed from the instruction."""
    if record["input"]:
        return record["input"]
    match = re.search(pattern, record["instruction"])
    assert match, record
    return match.group(1)


def _expected_closed_answer(r: dict) -> str:
    family = r["family"]
    if family == "uppercase":
        return _subject(r, r"Write (\w+) in uppercase").upper()
    if family == "sort_letters":
        return "".join(sorted(_subject(r, r"letters of (\w+) alphabetically")))
    if family == "addition":
        a, b = (int(x) for x in re.findall(r"\d+", r["instruction"] + " " + r["input"]))
        return str(a + b)
    if family == "capital":
        return CAPITALS[_subject(r, r"of (\w+)[?.]")]
    if family == "antonym":
        word = _subject(r, r"(?:opposite|antonym) of (\w+)")
        return {**dict(ANTONYM_PAIRS), **{b: a for a, b in ANTONYM_PAIRS}}[word]
    if family == "repeat_word":
        n = {"two": 2, "three": 3, "four": 4}[re.search(r"(two|three|four) times", r["instruction"]).group(1)]
        return " ".join([_subject(r, r"(?:word|Say) (\w+) (?:two|three|four)")] * n)
    if family == "last_letter":
        return _subject(r, r"letter of (\w+)")[-1]
    raise AssertionError(f"no checker for {family}")


def test_closed_family_answers_are_correct():
    records = generate_records(700, seed=5, families=CLOSED)
    assert {r["family"] for r in records} == set(CLOSED)
    for r in records:
        assert r["output"] == _expected_closed_answer(r), r
        assert r["references"] == [r["output"]]
    # Spot-check a few unambiguous cases directly.
    uppercase = [r for r in records if r["family"] == "uppercase" and r["input"]]
    assert uppercase and all(r["output"] == r["input"].upper() for r in uppercase)
    additions = [r for r in records if r["family"] == "addition"]
    assert any(int(r["output"]) >= 10 for r in additions)


def test_open_ended_families_have_many_valid_answers():
    records = generate_records(3000, seed=2, families=OPEN)
    outputs_per_prompt: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in records:
        assert len(r["references"]) > 1, r
        outputs_per_prompt[(r["family"], r["instruction"], r["input"])].add(r["output"])
    for family in OPEN:
        best = max(len(v) for (f, _, _), v in outputs_per_prompt.items() if f == family)
        assert best >= 3, f"{family}: a repeated prompt should get several different answers"
    for r in records:
        if r["family"] == "name_item":
            category = next(c for c in CATEGORIES if c in r["instruction"] or c == r["input"])
            assert r["output"].rstrip(".").lower() in CATEGORIES[category][1]
            assert set(r["references"]) >= set(CATEGORIES[category][1])  # finite set: all members listed
        elif r["family"] == "greeting":
            person = r["input"] or re.search(r"(?:for|to|Greet) (\w+)\.", r["instruction"]).group(1)
            assert person in r["output"]
        elif r["family"] == "short_sentence":
            assert r["output"].endswith(".") and 5 <= len(r["output"].split()) <= 15


def test_generate_records_arguments():
    records = generate_records(30, seed=0, families=["addition", "name_item"])
    assert {r["family"] for r in records} == {"addition", "name_item"}
    assert generate_records(0) == []
    with pytest.raises(ValueError, match="num_records"):
        generate_records(-1)
    with pytest.raises(ValueError, match="unknown task families"):
        generate_records(5, families=["uppercase", "no_such_family"])


# ---------------------------------------------------------------------------------------------------------------
# Splits and JSONL
# ---------------------------------------------------------------------------------------------------------------


def _prompt_keys(records: list[dict]) -> set[tuple[str, str]]:
    return {(r["instruction"], r["input"]) for r in records}


def test_generate_splits_sizes_disjointness_and_coverage():
    splits = generate_splits(300, 60, 60, seed=0)
    assert list(splits) == ["train", "validation", "test"]
    assert [len(splits[s]) for s in splits] == [300, 60, 60]
    train, val, test = (_prompt_keys(splits[s]) for s in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test
    for split, records in splits.items():
        assert {r["family"] for r in records} == set(TASK_FAMILIES), split
        assert all(r["output"] in r["references"] for r in records)


def test_generate_splits_default_sizes_are_disjoint():
    splits = generate_splits(4000, 200, 200, seed=7)
    train = _prompt_keys(splits["train"])
    assert not train & _prompt_keys(splits["validation"])
    assert not train & _prompt_keys(splits["test"])
    assert not _prompt_keys(splits["validation"]) & _prompt_keys(splits["test"])


def test_generate_splits_determinism_and_arguments():
    assert generate_splits(50, 12, 12, seed=1) == generate_splits(50, 12, 12, seed=1)
    assert generate_splits(50, 12, 12, seed=1) != generate_splits(50, 12, 12, seed=2)
    empty = generate_splits(20, 0, 0)
    assert len(empty["train"]) == 20 and empty["validation"] == [] and empty["test"] == []
    for bad in [(-1, 1, 1), (1, -1, 1), (1, 1, -5)]:
        with pytest.raises(ValueError):
            generate_splits(*bad)


def test_write_splits_round_trip(tmp_path: Path):
    splits = generate_splits(30, 12, 12, seed=0)
    splits["train"][0] = {**splits["train"][0], "output": "naïve café ✓"}  # non-ASCII survives as UTF-8
    paths = write_splits(splits, tmp_path / "data")
    assert set(paths) == {"train", "validation", "test"}
    for split, path in paths.items():
        assert Path(path) == tmp_path / "data" / f"{split}.jsonl"
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == splits[split]
    assert "naïve café ✓" in Path(paths["train"]).read_text(encoding="utf-8")
    single = write_jsonl([{"a": 1}, {"b": "x"}], tmp_path / "nested" / "x.jsonl")
    assert Path(single).read_text(encoding="utf-8") == '{"a": 1}\n{"b": "x"}\n'


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    texts = []
    for r in generate_records(300, seed=0):
        texts += [r["instruction"], r["input"], r["output"]]
        fmt = ALPACA_PROMPT_WITH_INPUT if r["input"] else ALPACA_PROMPT_NO_INPUT
        texts.append(fmt.format(instruction=r["instruction"], input=r["input"]) + r["output"])
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_corpus(), vocab_size=600)


ROUND_TRIP_TEXTS = [
    " hello world",
    "Hello, world!\n\n### Response:\n",
    "Convert the word to uppercase.",
    "  two  spaces\tand tab",
    "naïve café — 日本 🙂",
]


def test_tokenizer_special_tokens(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert len(tokenizer) == 600
    # Special tokens are atomic even inside text.
    assert tokenizer("a</s>b", add_special_tokens=False)["input_ids"].count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip_and_bos(tokenizer, text):
    with_bos = tokenizer(text)["input_ids"]
    without = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert with_bos[0] == tokenizer.bos_token_id
    assert with_bos[1:] == without
    assert tokenizer.bos_token_id not in without and tokenizer.eos_token_id not in with_bos
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text
    assert tokenizer.decode(without) == text


def test_tokenizer_is_compact_on_template_text(tokenizer):
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Name a fruit.")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(prompt) / 3  # BPE merges learned, not byte-per-token


def test_tokenizer_is_deterministic(tokenizer):
    again = train_tokenizer(_corpus(), vocab_size=600)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again(ROUND_TRIP_TEXTS[1])["input_ids"] == tokenizer(ROUND_TRIP_TEXTS[1])["input_ids"]


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "apple"},
        {"role": "user", "content": "Another?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nName a fruit.</s>\n<|assistant|>\napple</s>\n"
        "<|user|>\nAnother?</s>\n<|assistant|>\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Name a fruit.</s>\n")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # template supplies bos once
    assert ids.count(tokenizer.eos_token_id) == 4
    assert ids[-2] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_tokenizer_save_and_reload(tmp_path: Path):
    from transformers import AutoTokenizer

    original = train_tokenizer(_corpus(), vocab_size=600, output_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(reloaded) == len(original)
    assert reloaded.get_vocab() == original.get_vocab()
    assert reloaded.all_special_tokens == original.all_special_tokens
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(original, attr)
    for text in ROUND_TRIP_TEXTS:
        assert reloaded(text)["input_ids"] == original(text)["input_ids"]
        assert reloaded(text)["input_ids"][0] == reloaded.bos_token_id
        assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    assert reloaded.chat_template == original.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>\nHi</s>\n<|assistant|>\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Tiny Llama configs and the full stack
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_llama_config_roles_and_overrides():
    teacher = tiny_llama_config("teacher", 777, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    student = tiny_llama_config("student", 777, num_hidden_layers=3)
    assert teacher.vocab_size == student.vocab_size == 777
    assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_attention_heads) == (128, 4, 4)
    assert (teacher.num_key_value_heads, teacher.intermediate_size) == (2, 384)
    assert (student.hidden_size, student.num_attention_heads, student.num_key_value_heads) == (64, 2, 1)
    assert student.num_hidden_layers == 3  # override wins
    assert teacher.max_position_embeddings == 512 and teacher.tie_word_embeddings is False
    assert (teacher.bos_token_id, teacher.eos_token_id, teacher.pad_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="student.*teacher|teacher.*student"):
        tiny_llama_config("assistant", 100)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_stack")
    paths = prepare_tiny_stack(root, num_train=300, num_validation=24, num_test=24, vocab_size=1024, seed=0)
    return root, paths


def test_prepare_tiny_stack_writes_everything(stack):
    root, paths = stack
    assert set(paths) == {"data_dir", "train_file", "validation_file", "test_file", "tokenizer", "teacher", "student"}
    assert all(isinstance(v, str) for v in paths.values())
    assert paths["data_dir"] == str(root / "data")
    for split, count in (("train", 300), ("validation", 24), ("test", 24)):
        path = Path(paths[f"{split}_file"])
        assert path == root / "data" / f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(records) == count and all(set(r) == RECORD_KEYS for r in records)
    train_keys = _prompt_keys([json.loads(x) for x in Path(paths["train_file"]).read_text().splitlines()])
    test_keys = _prompt_keys([json.loads(x) for x in Path(paths["test_file"]).read_text().splitlines()])
    assert not train_keys & test_keys
    assert (Path(paths["tokenizer"]) / "tokenizer.json").is_file()
    for role in ("teacher", "student"):
        folder = Path(paths[role])
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (folder / name).is_file(), f"{role}/{name} missing"


def test_prepare_tiny_stack_models_reload(stack):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths = stack
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    sizes = {}
    for role, expected in synthetic.TINY_ROLES.items():
        model = AutoModelForCausalLM.from_pretrained(paths[role])
        config = model.config
        assert type(model).__name__ == "LlamaForCausalLM"
        assert config.vocab_size == len(tokenizer)
        assert all(getattr(config, key) == value for key, value in expected.items())
        assert config.tie_word_embeddings is False
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
        gen = model.generation_config
        assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 2)
        role_tokenizer = AutoTokenizer.from_pretrained(paths[role])
        text = "Name a fruit."
        assert role_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer))
        assert torch.isfinite(logits).all()
        sizes[role] = sum(p.numel() for p in model.parameters())
    assert sizes["teacher"] > 2 * sizes["student"]


def test_prepare_tiny_stack_is_deterministic_and_seeded(stack, tmp_path: Path):
    from safetensors.torch import load_file

    root, paths = stack
    again = prepare_tiny_stack(tmp_path, num_train=300, num_validation=24, num_test=24, seed=0)
    for key in ("train_file", "validation_file", "test_file"):
        assert Path(again[key]).read_bytes() == Path(paths[key]).read_bytes()
    assert (Path(again["tokenizer"]) / "tokenizer.json").read_bytes() == (
        Path(paths["tokenizer"]) / "tokenizer.json"
    ).read_bytes()
    first = load_file(str(Path(paths["teacher"]) / "model.safetensors"))
    second = load_file(str(Path(again["teacher"]) / "model.safetensors"))
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    # Weights are exactly LlamaForCausalLM(config) initialised under torch.manual_seed(seed) / (seed + 1).
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    for role, role_seed in (("teacher", 0), ("student", 1)):
        saved = load_file(str(Path(paths[role]) / "model.safetensors"))
        torch.manual_seed(role_seed)
        fresh = LlamaForCausalLM(AutoConfig.from_pretrained(paths[role])).state_dict()
        assert saved.keys() <= fresh.keys()
        assert all(torch.equal(saved[k], fresh[k]) for k in saved), role


def test_prepare_tiny_stack_overrides(tmp_path: Path):
    from transformers import AutoConfig

    paths = prepare_tiny_stack(
        tmp_path,
        num_train=60,
        num_validation=12,
        num_test=12,
        vocab_size=400,
        teacher_overrides={"num_hidden_layers": 1},
        student_overrides={"intermediate_size": 96},
    )
    assert AutoConfig.from_pretrained(paths["teacher"]).num_hidden_layers == 1
    assert AutoConfig.from_pretrained(paths["student"]).intermediate_size == 96
    assert AutoConfig.from_pretrained(paths["student"]).vocab_size <= 400
