"""Data formats, loss masks, truncation, column errors and the collator."""

from __future__ import annotations

import json

import pytest
import torch

from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.data.dataset import (
    PROMPT_TEMPLATE_NO_CONTEXT,
    DistillationCollator,
    build_dataset,
    format_instruction_prompt,
    load_split,
    tokenize_example,
)
from eakd_llm.loss.distillation import IGNORE_INDEX
from eakd_llm.studies.synthetic import train_tokenizer

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Name a fruit. apple banana cherry. Convert the word to uppercase. APPLE. hello world, how are you?",
    "user assistant system the a an is of to and in",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS * 20, vocab_size=400, output_dir=str(tmp_path_factory.mktemp("tok")))


def _config(tmp_path, **kwargs) -> EAKDConfig:
    return EAKDConfig(output_dir=str(tmp_path / "out"), dataset_name=str(tmp_path / "data"), **kwargs)


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _decode_response(tokenizer, example):
    ids = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert ids == [label for label in example["labels"] if label != IGNORE_INDEX]
    return ids


def test_instruction_template_matches_minillm():
    assert format_instruction_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert format_instruction_prompt("Say hi.", "to Bob") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
        "### Input:\nto Bob\n\n### Response:\n"
    )
    assert format_instruction_prompt("Say hi.", "  ") == PROMPT_TEMPLATE_NO_CONTEXT.format(instruction="Say hi.")


def test_tokenize_masks_prompt_and_appends_eos(tokenizer):
    example = tokenize_example("Name a fruit.", " apple", tokenizer, max_length=64, max_prompt_length=32)
    prompt_ids = tokenizer("Name a fruit.")["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    response = example["labels"][n:]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == " apple"
    assert len(example["input_ids"]) == len(example["labels"])


def test_truncation_keeps_prompt_end_with_bos_and_cuts_response(tokenizer):
    prompt = "hello world, " * 30 + "### Response:\n"
    example = tokenize_example(prompt, " apple banana cherry " * 10, tokenizer, max_length=40, max_prompt_length=12)
    assert len(example["input_ids"]) == 40
    prompt_part = [i for i, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    assert len(prompt_part) == 12
    assert prompt_part[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompt_part[1:]).endswith("### Response:\n")
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == 28  # response cut to fit, EOS lost


def test_instruction_format_end_to_end(tmp_path, tokenizer):
    _write(tmp_path / "data" / "train.jsonl", [
        {"instruction": "Convert the word to uppercase.", "input": "apple", "output": "APPLE"},
        {"instruction": "Name a fruit.", "input": "", "output": "banana"},
    ])
    config = _config(tmp_path, response_column="output")
    dataset = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    assert dataset.column_names == ["input_ids", "labels"]
    first = dataset[0]
    text = tokenizer.decode(first["input_ids"], skip_special_tokens=True)
    assert text == format_instruction_prompt("Convert the word to uppercase.", "apple") + "APPLE"
    assert tokenizer.decode(_decode_response(tokenizer, first), skip_special_tokens=True) == "APPLE"
    second = tokenizer.decode(dataset[1]["input_ids"], skip_special_tokens=True)
    assert "### Input:" not in second and second.endswith("### Response:\nbanana")


def test_dolly_columns(tmp_path, tokenizer):
    _write(tmp_path / "data" / "train.jsonl", [
        {"instruction": "Say hi.", "context": "to Bob", "response": "hi Bob", "category": "open_qa"},
    ])
    config = _config(tmp_path, context_column="context")
    dataset = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    assert "### Input:\nto Bob" in tokenizer.decode(dataset[0]["input_ids"])


def test_prompt_response_format_and_single_file(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    _write(path, [{"question": "hello world", "answer": " how are you?"}])
    config = EAKDConfig(output_dir=str(tmp_path / "o"), dataset_name=str(path), prompt_column="question",
                        response_column="answer")
    dataset = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    example = dataset[0]
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == "hello world how are you?"
    assert tokenizer.decode(_decode_response(tokenizer, example), skip_special_tokens=True) == " how are you?"


def test_parquet_files(tmp_path, tokenizer):
    import datasets

    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list([{"prompt": "hello", "response": " world"}]).to_parquet(
        str(tmp_path / "data" / "train.parquet")
    )
    config = _config(tmp_path)
    dataset = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    assert len(dataset) == 1


def test_messages_format_uses_chat_template(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "apple"},
    ]
    _write(tmp_path / "data" / "train.jsonl", [{"messages": messages}])
    config = _config(tmp_path)
    dataset = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    example = dataset[0]
    # The tiny template: <s> once, every turn "<|role|>\n{content}</s>\n".
    prompt = "<s><|system|>\nBe brief.</s>\n<|user|>\nName a fruit.</s>\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == prompt[:-len("<|assistant|>\n")] + (
        "<|assistant|>\napple</s>\n")
    # The turn's targets end at its end-of-turn token </s>; the template's newline after it is cut.
    assert tokenizer.decode(example["input_ids"]) == prompt + "apple</s>"
    assert example["input_ids"] == tokenizer(prompt + "apple</s>", add_special_tokens=False)["input_ids"]
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's BOS, no second one
    assert tokenizer.decode(_decode_response(tokenizer, example)) == "apple</s>"
    assert example["labels"][-1] == tokenizer.eos_token_id


def _chatml(turns: list[tuple[str, str]], bos: str = "") -> str:
    return bos + "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


@pytest.mark.parametrize("variant", ["bos", "no_bos"])
def test_chatml_targets_end_at_im_end_and_its_newline_is_cut(tmp_path, chatml_tokenizers, variant):
    """ChatML writes "<|im_end|>\n" after every turn; generation stops at <|im_end|>: the last target is <|im_end|>
    and the newline after it is no target (cut). Multi-turn: only the last assistant turn is learnt."""
    tok = chatml_tokenizers[variant]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    bos = "<s>" if variant == "bos" else ""
    single = [("user", "Name a fruit."), ("assistant", "apple")]
    multi = [("system", "Be brief."), ("user", "Name a fruit."), ("assistant", "first answer"),
             ("user", "second question"), ("assistant", "banana cherry")]
    records = [{"messages": [{"role": r, "content": c} for r, c in turns]} for turns in (single, multi)]
    _write(tmp_path / "data" / "train.jsonl", records)
    dataset = build_dataset(load_split(str(tmp_path / "data"), "train"), _config(tmp_path), tok)
    for turns, record, example in zip((single, multi), records, dataset):
        prompt = _chatml(turns[:-1], bos) + "<|im_start|>assistant\n"
        assert tok.apply_chat_template(record["messages"], tokenize=False) == _chatml(turns, bos)  # "\n" written
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(turns[-1][1], add_special_tokens=False)["input_ids"]
        assert example["input_ids"] == prompt_ids + answer_ids + [im_end]  # nothing after <|im_end|>
        assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [im_end]
        assert example["input_ids"].count(tok.bos_token_id) == (1 if bos else 0)
    assert "first answer<|im_end|>\n" in tok.decode(dataset[1]["input_ids"])  # earlier turns: prompt, as written


def test_end_of_turn_that_is_not_eos_and_templates_without_one(tmp_path, chatml_tokenizers):
    """An end-of-turn token other than EOS (ChatML with EOS </s>, like Gemma's <end_of_turn>) is still the last
    target, with no EOS after it, and generation stops there; a template whose turns end in plain text keeps the old
    rule: EOS appended after the rendered answer."""
    import copy

    import datasets

    from eakd_llm.data.prompts import chat_end_token_id
    from eakd_llm.models.generation import end_token_ids

    tok = copy.deepcopy(chatml_tokenizers["no_bos"])
    tok.eos_token = "</s>"
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")
    assert tok.eos_token_id == eos != im_end
    raw = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hello"},
                                                    {"role": "assistant", "content": "apple"}]}])
    example = build_dataset(raw, _config(tmp_path), tok)[0]
    assert example["labels"][-1] == im_end and eos not in example["input_ids"]
    assert chat_end_token_id(tok) == im_end
    assert end_token_ids(tok) == [eos, im_end]  # generation stops where the targets stopped

    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    example = build_dataset(raw, _config(tmp_path), tok)[0]
    assert tok.decode(example["input_ids"]) == "user: hello\nassistant: apple\n</s>"
    assert example["labels"][-1] == eos
    assert chat_end_token_id(tok) is None and end_token_ids(tok) == [eos]


def test_messages_must_end_with_assistant(tmp_path, tokenizer):
    _write(tmp_path / "data" / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="must end with an assistant message"):
        build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)


def test_missing_column_names_the_columns_present(tmp_path, tokenizer):
    _write(tmp_path / "data" / "train.jsonl", [{"instruction": "Say hi.", "answer": "hi"}])
    config = _config(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    message = str(info.value)
    assert "no column 'response' (set by response_column)" in message
    assert "columns present: instruction, answer" in message


def test_missing_split_lists_available(tmp_path, tokenizer):
    _write(tmp_path / "data" / "train.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ConfigError, match="split 'validation' not found .* available splits: train"):
        load_split(str(tmp_path / "data"), "validation")


def test_empty_first_value_and_all_truncated(tmp_path, tokenizer):
    _write(tmp_path / "data" / "train.jsonl", [{"prompt": "hello", "response": ""}])
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match="column 'response' is empty in the first record"):
        build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)

    _write(tmp_path / "long" / "train.jsonl", [{"prompt": "hello world, " * 40, "response": "apple"}] * 3)
    config = EAKDConfig(output_dir=str(tmp_path / "o"), dataset_name=str(tmp_path / "long"), max_length=8,
                        max_prompt_length=7)
    dataset = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    assert len(dataset) == 3  # one response token survives
    config = EAKDConfig(output_dir=str(tmp_path / "o"), dataset_name=str(tmp_path / "long"), max_length=8,
                        max_prompt_length=7)
    config.max_length = 7  # bypass validation to reach the data check
    with pytest.raises(ConfigError, match="every train example's response was truncated away"):
        build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)


def test_empty_dataset(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    config = _config(tmp_path)
    raw = load_split(config.dataset_name, "train").select([])
    with pytest.raises(ConfigError, match="split of .* is empty"):
        build_dataset(raw, config, tokenizer)


def test_collator_pads_right_and_masks():
    collator = DistillationCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collator([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, -100, -100, -100],
                                        [-100, -100, 7, 8, 9, -100, -100, -100]]
    assert batch["input_ids"].dtype == torch.long



def test_example_whose_only_target_is_position_zero_is_dropped(tmp_path, tokenizer):
    """labels[0] is never predicted (nothing precedes it): an empty prompt with an EOS-only response is dropped."""
    import datasets

    class NoBos:  # a tokenizer that adds no BOS, like GPT-2's
        bos_token_id = None
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            return tokenizer(text, add_special_tokens=False)

    raw = datasets.Dataset.from_list([{"prompt": "hi", "response": "hello"}, {"prompt": "", "response": ""}])
    kept = build_dataset(raw, _config(tmp_path), NoBos())
    assert len(kept) == 1
    assert kept[0]["input_ids"][-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------------------------
# Decontamination (exclude_eval_prompts)
# ----------------------------------------------------------------------------------------------------------------------

DOLLY_LIKE = [
    {"instruction": "Name a fruit.", "context": "", "response": "apple"},
    {"instruction": "Convert the word to uppercase.", "context": "apple", "response": "APPLE"},
    {"instruction": "Convert the word to uppercase.", "context": "banana", "response": "BANANA"},
    {"instruction": "Say hello.", "context": "", "response": "hello world"},
]


def test_exclude_eval_prompts_drops_training_records_whose_prompt_is_evaluated(tokenizer, tmp_path, caplog):
    """Dolly-style training data (instruction/context/response) against MiniLLM-style evaluation files: a raw one
    (instruction/input/output, other casing and spacing) and a processed one (templated prompt with <n> markers)."""
    _write(tmp_path / "data" / "train.jsonl", DOLLY_LIKE)
    raw_eval = tmp_path / "dolly" / "valid.jsonl"
    _write(raw_eval, [{"instruction": "convert the word to  UPPERCASE", "input": "Apple", "output": "APPLE"},
                      {"instruction": "Name a vegetable.", "input": "", "output": "leek"}])
    processed_eval = tmp_path / "other" / "valid.jsonl"
    prompt = format_instruction_prompt("Say hello.").replace("\n", "<n>")
    _write(processed_eval, [{"prompt": prompt, "output": "hello world"}])
    config = _config(tmp_path, dataset_format="instruction", context_column="context",
                     exclude_eval_prompts=[str(raw_eval), str(processed_eval)], max_length=64)
    raw = load_split(config.dataset_name, "train")
    with caplog.at_level("WARNING", logger="eakd_llm.data.dataset"):
        kept = build_dataset(raw, config, tokenizer)
    assert len(kept) == 2  # "uppercase/apple" and "say hello" are evaluation prompts; the banana one is not
    responses = sorted(tokenizer.decode(_decode_response(tokenizer, ex), skip_special_tokens=True).strip()
                       for ex in kept)
    assert responses == ["BANANA", "apple"]
    assert "dropped 2 of 4 train records" in caplog.text
    # Without the option nothing is dropped.
    assert len(build_dataset(raw, _config(tmp_path, dataset_format="instruction", context_column="context",
                                          max_length=64), tokenizer)) == 4


def test_exclude_eval_prompts_reads_chat_evaluation_files(tokenizer, tmp_path):
    """A messages-format evaluation file: its last user turn is the prompt compared with the training records."""
    _write(tmp_path / "data" / "train.jsonl", DOLLY_LIKE)
    chat_eval = tmp_path / "chat.jsonl"
    _write(chat_eval, [{"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "say hello"},
                                     {"role": "assistant", "content": "hello world"}]}])
    config = _config(tmp_path, dataset_format="instruction", context_column="context",
                     exclude_eval_prompts=[str(chat_eval)], max_length=64)
    kept = build_dataset(load_split(config.dataset_name, "train"), config, tokenizer)
    responses = sorted(tokenizer.decode(_decode_response(tokenizer, ex), skip_special_tokens=True) for ex in kept)
    assert responses == ["APPLE", "BANANA", "apple"]  # "Say hello." was evaluated


def test_exclude_eval_prompts_errors(tokenizer, tmp_path):
    _write(tmp_path / "data" / "train.jsonl", DOLLY_LIKE[:1])
    raw = load_split(str(tmp_path / "data"), "train")
    missing = _config(tmp_path, dataset_format="instruction", context_column="context",
                      exclude_eval_prompts=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError, match="exclude_eval_prompts: .*nope.jsonl' is not a file"):
        build_dataset(raw, missing, tokenizer)
    _write(tmp_path / "eval.jsonl", [{"instruction": "Name a fruit.", "output": "pear"}])
    everything = _config(tmp_path, dataset_format="instruction", context_column="context",
                         exclude_eval_prompts=[str(tmp_path / "eval.jsonl")])
    with pytest.raises(ConfigError, match="removed every train record"):
        build_dataset(raw, everything, tokenizer)


# Chat templates of four families, written for tokenizers built here: each family's end-of-turn token, and what its
# template writes after the last answer when no generation prompt is asked for.
CHAT_FAMILIES = {
    "phi3": ("<|end|>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"],
             "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"),
    "llama3": ("<|eot_id|>", "<|eot_id|>", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"],
               "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
               "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "gemma": ("<end_of_turn>", "<eos>", ["<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"],
              "{{ '<bos>' }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
              "m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "chatml": ("<|im_end|>", "<|im_end|>", [], None),
}


@pytest.mark.parametrize("family", sorted(CHAT_FAMILIES))
def test_chat_targets_end_at_the_templates_end_of_turn_token(tmp_path, chatml_tokenizers, family):
    """The last target is the template's end-of-turn token, whatever the template writes after it: Phi-3 writes
    "<|end|>\\n<|endoftext|>" after the last answer, and generation stops at <|end|>, so neither the newline nor
    <|endoftext|> may be targets. The same token is the one generation stops at (chat_end_token_id)."""
    import copy

    import datasets
    from tokenizers import AddedToken

    from eakd_llm.data.prompts import chat_end_token_id, render_chat
    from eakd_llm.models.generation import end_token_ids

    end_of_turn, eos, markers, template = CHAT_FAMILIES[family]
    tok = copy.deepcopy(chatml_tokenizers["no_bos"])
    if template is not None:
        tok.add_tokens([AddedToken(m, special=True, normalized=False) for m in markers], special_tokens=True)
        tok.eos_token, tok.chat_template = eos, template
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple pie"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert "apple pie" + end_of_turn in full
    _, response = render_chat(messages, tok)
    assert response == "apple pie" + end_of_turn
    example = build_dataset(datasets.Dataset.from_list([{"messages": messages}]), _config(tmp_path), tok)[0]
    eot_id = tok.convert_tokens_to_ids(end_of_turn)
    targets = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert targets == tok("apple pie", add_special_tokens=False)["input_ids"] + [eot_id]
    assert example["input_ids"][-1] == eot_id
    assert chat_end_token_id(tok) == eot_id
    assert eot_id in end_token_ids(tok)
