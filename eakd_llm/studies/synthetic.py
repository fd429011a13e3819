"""Deterministic, offline "tiny stack" for tests and CPU recipes.

EA-KD needs a teacher whose next-token distribution carries real entropy, a student to distil into, a tokenizer
shared by both, and instruction data with held-out prompts. None of that may touch the network in tests or CPU
recipes, so this module builds all of it from scratch:

* :data:`TASK_FAMILIES` — small instruction/response task families built from fixed vocabularies. Closed families
  (uppercase a word, add two digits, ...) have exactly one right answer; open-ended families ("Name a fruit.",
  "Write a short sentence about a cat.") have many valid answers, which is what gives a trained teacher entropy.
* :func:`generate_records` / :func:`generate_splits` — seeded record generators; splits are disjoint by
  ``(instruction, input)`` so a held-out prompt never appears in training.
* :func:`train_tokenizer` — a byte-level BPE tokenizer (``<s>``, ``</s>``, ``<pad>``, ``<unk>``) with a chat template.
* :func:`tiny_llama_config` / :func:`prepare_tiny_stack` — randomly initialised tiny Llama teacher and student saved
  in ``save_pretrained`` layout, loadable with the ``Auto*`` classes offline.

Everything is deterministic: only ``random.Random`` instances are used for data, and ``torch.manual_seed`` for
model initialisation.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy so that generating data does not import torch/transformers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "CHATML_TOKENS",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ROLE_TOKENS",
    "SPLIT_NAMES",
    "TASK_FAMILIES",
    "TINY_ROLES",
    "UNK_TOKEN",
    "Prompt",
    "TaskFamily",
    "generate_records",
    "generate_splits",
    "prepare_tiny_stack",
    "tiny_llama_config",
    "train_tokenizer",
    "write_jsonl",
    "write_splits",
]

SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")

# Open-ended families can have hundreds of valid answers; records keep a bounded representative list instead.
MAX_REFERENCES = 32

# ---------------------------------------------------------------------------------------------------------------
# Fixed vocabularies (small on purpose so a ~1M-parameter model can learn them)
# ---------------------------------------------------------------------------------------------------------------

WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "window", "pencil", "yellow", "cloud", "tiger", "bread", "stone",
    "candle", "forest", "planet", "silver", "music", "orange", "rabbit", "summer", "winter", "ladder",
    "mirror", "rocket", "turtle", "button", "castle", "dragon", "flower", "jacket", "kitten", "lemon",
    "market", "needle", "pillow", "shadow", "basket", "circle", "puzzle", "wagon", "violet", "honey",
)  # fmt: skip

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("high", "low"), ("wet", "dry"), ("rich", "poor"), ("strong", "weak"), ("loud", "quiet"),
    ("long", "short"), ("thick", "thin"), ("young", "old"), ("clean", "dirty"), ("day", "night"),
    ("push", "pull"), ("win", "lose"), ("inside", "outside"), ("true", "false"), ("left", "right"),
    ("north", "south"), ("east", "west"), ("buy", "sell"), ("first", "last"), ("near", "far"),
)  # fmt: skip

# Invented countries so the capital task is pure memorisation from training data, not world knowledge.
CAPITALS: dict[str, str] = {
    "Zorvania": "Kelport", "Mirelia": "Ostrand", "Quenland": "Fallow", "Brakistan": "Durnhelm",
    "Velloria": "Sapphira", "Tundaria": "Frostby", "Ombrosia": "Nightvale", "Calderra": "Emberton",
    "Lunaris": "Silverholm", "Pelagia": "Coralhaven", "Drovania": "Millbrook", "Esterwald": "Pinecrest",
    "Glimmera": "Brightwater", "Harvenia": "Goldfield", "Istoria": "Oldgate", "Jorundia": "Stonebridge",
    "Korvalis": "Ravenmoor", "Lithmere": "Glassford", "Marrowind": "Windhollow", "Norvessa": "Northwick",
    "Orlandia": "Meadowgate", "Pyrrhia": "Ashford", "Rivenna": "Fallsbury", "Sylvaria": "Greenhollow",
}  # fmt: skip

# category singular -> (plural, members)
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fruit": ("fruits", ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach",
                         "pear", "plum", "kiwi", "melon", "lime", "apricot", "fig", "papaya")),
    "animal": ("animals", ("cat", "dog", "horse", "rabbit", "tiger", "lion", "bear", "fox",
                           "wolf", "deer", "mouse", "owl", "duck", "goat", "sheep", "zebra")),
    "color": ("colors", ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown",
                         "black", "white", "gray", "gold")),
    "vegetable": ("vegetables", ("carrot", "potato", "onion", "pepper", "tomato", "cabbage", "pea",
                                 "bean", "spinach", "lettuce", "celery", "radish")),
    "flower": ("flowers", ("rose", "tulip", "daisy", "lily", "orchid", "poppy", "sunflower", "violet",
                           "iris", "lotus")),
    "drink": ("drinks", ("water", "milk", "tea", "coffee", "juice", "lemonade", "cocoa", "soda", "cider")),
    "sport": ("sports", ("soccer", "tennis", "golf", "hockey", "rugby", "cricket", "boxing", "rowing",
                         "skiing", "cycling")),
    "tool": ("tools", ("hammer", "saw", "drill", "wrench", "shovel", "rake", "ruler", "knife", "axe")),
}  # fmt: skip

SENTENCE_SUBJECTS: tuple[str, ...] = (
    "cat", "dog", "horse", "rabbit", "bird", "fox", "bear", "duck", "mouse", "owl", "frog", "goat",
)  # fmt: skip
SENTENCE_ADJECTIVES: tuple[str, ...] = (
    "little", "happy", "sleepy", "brave", "quiet", "old", "young", "clever", "lazy", "friendly", "tiny", "curious",
)  # fmt: skip
SENTENCE_VERBS: tuple[str, ...] = (
    "sleeps", "runs", "jumps", "plays", "sits", "rests", "waits", "hides", "walks", "sings",
)  # fmt: skip
SENTENCE_PLACES: tuple[str, ...] = (
    "in the garden", "on the hill", "near the river", "under the tree", "by the door",
    "in the sun", "at night", "in the snow", "on the grass", "behind the house",
)  # fmt: skip

PET_ANIMALS: tuple[str, ...] = ("dog", "cat", "rabbit", "hamster", "parrot", "fish", "turtle", "horse")
PET_TRAITS: tuple[str, ...] = ("small", "big", "brown", "white", "black", "fluffy", "old", "young")
PET_NAMES: tuple[str, ...] = (
    "Max", "Bella", "Luna", "Charlie", "Daisy", "Milo", "Coco", "Rocky", "Ruby", "Oscar", "Pepper", "Sunny",
    "Biscuit", "Ginger", "Shadow", "Maple", "Olive", "Buddy", "Pip", "Willow",
)  # fmt: skip

PEOPLE: tuple[str, ...] = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack",
    "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Task families
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt of a family; ``params`` carries what is needed to answer it without re-parsing the text."""

    instruction: str
    input: str
    params: tuple[Any, ...]


@dataclass(frozen=True)
class TaskFamily:
    """A task family: a finite, enumerable prompt space and an answer function.

    ``answer(params, rng)`` returns ``(output, references)`` where ``output`` is one sampled acceptable answer and
    ``references`` the acceptable answers, always containing ``output``: the complete set when it has at most
    ``MAX_REFERENCES`` members (closed families: exactly ``[output]``), else ``output`` plus a sampled representative
    list of ``MAX_REFERENCES - 1`` other valid answers.
    """

    name: str
    description: str
    open_ended: bool
    build_prompts: Callable[[], list[Prompt]]
    answer: Callable[[tuple[Any, ...], random.Random], tuple[str, list[str]]]

    def prompts(self) -> list[Prompt]:
        """All prompts of the family in a canonical (deterministic) order."""
        return self.build_prompts()

    def make_record(self, prompt: Prompt, rng: random.Random) -> dict[str, Any]:
        output, references = self.answer(prompt.params, rng)
        return {
            "instruction": prompt.instruction,
            "input": prompt.input,
            "output": output,
            "family": self.name,
            "references": references,
        }


def _an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _prompts(templates: Sequence[tuple[str, str]], values: Iterable[tuple[Any, ...]], **fmt: Any) -> list[Prompt]:
    """Cross product of ``(instruction, input)`` templates with parameter tuples, formatted by position ``{0}``..."""
    out: list[Prompt] = []
    for params in values:
        for instruction, inp in templates:
            out.append(Prompt(instruction.format(*params, **fmt), inp.format(*params, **fmt), tuple(params)))
    return out


def _single(answer: str) -> tuple[str, list[str]]:
    return answer, [answer]


def _pick(options: Sequence[str], rng: random.Random) -> tuple[str, list[str]]:
    """Sample one of ``options`` (canonical order, deduplicated) and return a bounded reference list."""
    options = list(dict.fromkeys(options))  # dedupe, keep order (sets would depend on PYTHONHASHSEED)
    output = options[rng.randrange(len(options))]
    if len(options) <= MAX_REFERENCES:
        return output, options
    others = [o for o in options if o != output]
    return output, [output, *rng.sample(others, MAX_REFERENCES - 1)]


# --- closed families (exactly one right answer) -------------------------------------------------------------------

_UPPERCASE_TEMPLATES = (
    ("Convert the word to uppercase.", "{0}"),
    ("Write the word in capital letters.", "{0}"),
    ("Make this word uppercase.", "{0}"),
    ("Write {0} in uppercase.", ""),
)
_SORT_TEMPLATES = (
    ("Sort the letters of the word alphabetically.", "{0}"),
    ("Put the letters of the word in alphabetical order.", "{0}"),
    ("Sort the letters of {0} alphabetically.", ""),
)
_ADD_TEMPLATES = (
    ("What is {0} plus {1}?", ""),
    ("Add {0} and {1}.", ""),
    ("What is the sum of {0} and {1}?", ""),
    ("Compute {0} + {1}.", ""),
    ("Add the two numbers.", "{0} + {1}"),
)
_CAPITAL_TEMPLATES = (
    ("What is the capital of {0}?", ""),
    ("Name the capital city of {0}.", ""),
    ("Which city is the capital of {0}?", ""),
    ("What is the capital of this country?", "{0}"),
    ("Give the capital city of the country.", "{0}"),
)
_ANTONYM_TEMPLATES = (
    ("Give the antonym of the word.", "{0}"),
    ("What is the opposite of the word?", "{0}"),
    ("What is the opposite of {0}?", ""),
    ("Write the antonym of {0}.", ""),
)
_REPEAT_TEMPLATES = (
    ("Repeat the word {1} times.", "{0}"),
    ("Write the word {0} {1} times.", ""),
    ("Say {0} {1} times.", ""),
)
_LAST_LETTER_TEMPLATES = (
    ("What is the last letter of the word?", "{0}"),
    ("Give the last letter of {0}.", ""),
    ("Which letter does the word end with?", "{0}"),
)

_ANTONYMS: dict[str, str] = {**{a: b for a, b in ANTONYM_PAIRS}, **{b: a for a, b in ANTONYM_PAIRS}}
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


# --- open-ended families (many acceptable answers) ----------------------------------------------------------------

_NAME_ITEM_TEMPLATES = (
    ("Name {an}.", ""),
    ("Name one {0}.", ""),
    ("Give an example of {an}.", ""),
    ("Tell me {an}.", ""),
    ("Can you name {an}?", ""),
    ("Say the name of {an}.", ""),
    ("Give one example of {an}.", ""),
    ("Name something from this category.", "{0}"),
)
_LIST_TWO_TEMPLATES = (
    ("List two {1}.", ""),
    ("Name two {1}.", ""),
    ("Give me two {1}.", ""),
    ("What are two {1}?", ""),
    ("Tell me two {1}.", ""),
    ("Write down two {1}.", ""),
    ("Can you list two {1}?", ""),
    ("List two things from this category.", "{1}"),
)
_SENTENCE_TEMPLATES = (
    ("Write a short sentence about {an}.", ""),
    ("Describe {an} in one sentence.", ""),
    ("Say something about {an}.", ""),
    ("Tell me something about {an}.", ""),
    ("Write a sentence about {an}.", ""),
    ("Write one sentence about this animal.", "{0}"),
)
_PET_INSTRUCTIONS = ("Suggest a name for this pet.", "Give this pet a name.", "What could we call this pet?")
_GREETING_TEMPLATES = (
    ("Write a greeting for {0}.", ""),
    ("Say hello to {0}.", ""),
    ("Greet {0}.", ""),
    ("Write a short greeting for this person.", "{0}"),
)


def _per_value_prompts(templates: Sequence[tuple[str, str]], values: Sequence[str]) -> list[Prompt]:
    """Like :func:`_prompts` for single-noun families, also filling ``{an}`` with the right article."""
    out: list[Prompt] = []
    for value in values:
        out.extend(_prompts(templates, [(value,)], an=_an(value)))
    return out


def _name_item_answer(params: tuple[Any, ...], rng: random.Random) -> tuple[str, list[str]]:
    members = CATEGORIES[params[0]][1]
    # Two surface forms per item so even a single item choice leaves some entropy in the continuation.
    return _pick([form for m in members for form in (m, m.capitalize() + ".")], rng)


def _list_two_answer(params: tuple[Any, ...], rng: random.Random) -> tuple[str, list[str]]:
    members = CATEGORIES[params[0]][1]
    a, b = rng.sample(members, 2)
    output = rng.choice((f"{a} and {b}", f"{a}, {b}", f"{a.capitalize()} and {b}."))
    options = [
        form
        for x in members
        for y in members
        if x != y
        for form in (f"{x} and {y}", f"{x}, {y}", f"{x.capitalize()} and {y}.")
    ]
    others = [o for o in options if o != output]
    return output, [output, *rng.sample(others, MAX_REFERENCES - 1)]


def _sentence_answer(params: tuple[Any, ...], rng: random.Random) -> tuple[str, list[str]]:
    subject = params[0]

    def make(r: random.Random) -> str:
        article, adjective = r.choice(("The", "A", "My")), r.choice(SENTENCE_ADJECTIVES)
        noun_phrase = _an(adjective).capitalize() if article == "A" else f"{article} {adjective}"
        return f"{noun_phrase} {subject} {r.choice(SENTENCE_VERBS)} {r.choice(SENTENCE_PLACES)}."

    output = make(rng)
    # 3 * 12 * 10 * 10 = 3600 valid sentences per subject: keep a sampled representative list.
    references = [output]
    while len(references) < MAX_REFERENCES:
        candidate = make(rng)
        if candidate not in references:
            references.append(candidate)
    return output, references


def _pet_answer(params: tuple[Any, ...], rng: random.Random) -> tuple[str, list[str]]:
    forms = ("{0}", "How about {0}?", "{0} would be a good name.")
    return _pick([f.format(name) for name in PET_NAMES for f in forms], rng)


def _greeting_answer(params: tuple[Any, ...], rng: random.Random) -> tuple[str, list[str]]:
    person = params[0]
    options = [f"{hello}, {person}{end}" for hello in ("Hello", "Hi", "Hey", "Good morning") for end in ("!", ".")]
    options += [f"Nice to meet you, {person}.", f"Welcome, {person}!", f"Hello there, {person}!"]
    return _pick(options, rng)


def _family(
    name: str,
    description: str,
    open_ended: bool,
    build_prompts: Callable[[], list[Prompt]],
    answer: Callable[[tuple[Any, ...], random.Random], tuple[str, list[str]]],
) -> tuple[str, TaskFamily]:
    return name, TaskFamily(name, description, open_ended, build_prompts, answer)


TASK_FAMILIES: dict[str, TaskFamily] = dict(
    [
        _family(
            "uppercase",
            "Convert a word to uppercase.",
            False,
            lambda: _prompts(_UPPERCASE_TEMPLATES, [(w,) for w in WORDS]),
            lambda p, rng: _single(p[0].upper()),
        ),
        _family(
            "sort_letters",
            "Sort the letters of a word alphabetically.",
            False,
            lambda: _prompts(_SORT_TEMPLATES, [(w,) for w in WORDS]),
            lambda p, rng: _single("".join(sorted(p[0]))),
        ),
        _family(
            "addition",
            "Add two single-digit numbers.",
            False,
            lambda: _prompts(_ADD_TEMPLATES, [(a, b) for a in range(10) for b in range(10)]),
            lambda p, rng: _single(str(p[0] + p[1])),
        ),
        _family(
            "capital",
            "Capital of an invented country from a fixed table.",
            False,
            lambda: _prompts(_CAPITAL_TEMPLATES, [(c,) for c in CAPITALS]),
            lambda p, rng: _single(CAPITALS[p[0]]),
        ),
        _family(
            "antonym",
            "Antonym of a word from a fixed table.",
            False,
            lambda: _prompts(_ANTONYM_TEMPLATES, [(w,) for w in _ANTONYMS]),
            lambda p, rng: _single(_ANTONYMS[p[0]]),
        ),
        _family(
            "repeat_word",
            "Repeat a word N times.",
            False,
            lambda: _prompts(_REPEAT_TEMPLATES, [(w, word, n) for w in WORDS for n, word in _NUMBER_WORDS.items()]),
            lambda p, rng: _single(" ".join([p[0]] * p[2])),
        ),
        _family(
            "last_letter",
            "Last letter of a word.",
            False,
            lambda: _prompts(_LAST_LETTER_TEMPLATES, [(w,) for w in WORDS]),
            lambda p, rng: _single(p[0][-1]),
        ),
        _family(
            "name_item",
            "Name a member of a category (open-ended).",
            True,
            lambda: _per_value_prompts(_NAME_ITEM_TEMPLATES, list(CATEGORIES)),
            _name_item_answer,
        ),
        _family(
            "list_two",
            "List two members of a category (open-ended).",
            True,
            lambda: _prompts(_LIST_TWO_TEMPLATES, [(c, plural) for c, (plural, _) in CATEGORIES.items()]),
            _list_two_answer,
        ),
        _family(
            "short_sentence",
            "Write a short sentence about an animal (open-ended).",
            True,
            lambda: _per_value_prompts(_SENTENCE_TEMPLATES, SENTENCE_SUBJECTS),
            _sentence_answer,
        ),
        _family(
            "pet_name",
            "Suggest a name for a described pet (open-ended).",
            True,
            lambda: [
                Prompt(instruction, _an(f"{trait} {animal}"), (animal, trait))
                for animal in PET_ANIMALS
                for trait in PET_TRAITS
                for instruction in _PET_INSTRUCTIONS
            ],
            _pet_answer,
        ),
        _family(
            "greeting",
            "Greet a person (open-ended).",
            True,
            lambda: _prompts(_GREETING_TEMPLATES, [(p,) for p in PEOPLE]),
            _greeting_answer,
        ),
    ]
)


# ---------------------------------------------------------------------------------------------------------------
# Record generation and splits
# ---------------------------------------------------------------------------------------------------------------


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _resolve_families(families: Sequence[str] | None) -> list[str]:
    if families is None:
        return list(TASK_FAMILIES)
    if isinstance(families, str):
        families = [families]
    names = list(dict.fromkeys(families))
    unknown = [n for n in names if n not in TASK_FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; allowed: {sorted(TASK_FAMILIES)}")
    if not names:
        raise ValueError("families must name at least one task family")
    return names


def _sample_records(
    num_records: int, rng: random.Random, pools: Mapping[str, Sequence[Prompt]]
) -> list[dict[str, Any]]:
    """Uniform family mixture, stratified: each block of ``len(pools)`` records is a shuffled permutation of the
    families, so every family appears as soon as ``num_records >= len(pools)`` while order stays random."""
    names = list(pools)
    records: list[dict[str, Any]] = []
    order: list[str] = []
    for _ in range(num_records):
        if not order:
            order = names[:]
            rng.shuffle(order)
        name = order.pop()
        pool = pools[name]
        records.append(TASK_FAMILIES[name].make_record(pool[rng.randrange(len(pool))], rng))
    return records


def generate_records(num_records: int, seed: int = 0, families: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Generate ``num_records`` records, deterministically for a given ``seed``.

    Each record is ``{"instruction", "input", "output", "family", "references"}`` with ``output in references``.
    Families (all by default) are mixed uniformly at random. No split disjointness: use :func:`generate_splits`.
    """
    _check_count("num_records", num_records)
    names = _resolve_families(families)
    rng = random.Random(f"eakd-synthetic/records/{seed}")  # str seeds are hashed stably (sha512), unlike hash()
    return _sample_records(num_records, rng, {n: TASK_FAMILIES[n].prompts() for n in names})


def generate_splits(num_train: int, num_validation: int, num_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """Generate train/validation/test splits disjoint by ``(instruction, input)``.

    Each family's prompt space is shuffled with ``seed`` and cut into per-split prompt pools, sized in proportion to
    the requested counts (at least one prompt per non-empty split, at least one left for train), so every family can
    appear in every split and a held-out prompt never appears in training. Records are then sampled per split from
    its own pools.
    """
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, count in counts.items():
        _check_count(f"num_{split}", count)
    total = sum(counts.values())
    rng = random.Random(f"eakd-synthetic/splits/{seed}")
    pools: dict[str, dict[str, list[Prompt]]] = {split: {} for split in SPLIT_NAMES}
    for name, family in TASK_FAMILIES.items():
        # Dedupe by (instruction, input): two param tuples could in principle render to the same prompt.
        unique = list({(p.instruction, p.input): p for p in family.prompts()}.values())
        rng.shuffle(unique)
        n = len(unique)
        sizes = {}
        for split in ("validation", "test"):
            sizes[split] = 0 if counts[split] == 0 else max(1, round(n * counts[split] / total))
        # Always leave train at least one prompt per family (and never overflow the prompt space).
        while sizes["validation"] + sizes["test"] > n - 1:
            bigger = max(("validation", "test"), key=lambda s: sizes[s])
            sizes[bigger] -= 1
        pools["validation"][name] = unique[: sizes["validation"]]
        pools["test"][name] = unique[sizes["validation"] : sizes["validation"] + sizes["test"]]
        pools["train"][name] = unique[sizes["validation"] + sizes["test"] :]
    splits: dict[str, list[dict]] = {}
    for split in SPLIT_NAMES:
        split_rng = random.Random(f"eakd-synthetic/splits/{seed}/{split}")
        split_pools = {name: pool for name, pool in pools[split].items() if pool}
        splits[split] = _sample_records(counts[split], split_rng, split_pools) if counts[split] else []
    return splits


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> str:
    """Write ``records`` as UTF-8 JSON lines (parent directories created). Returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def write_splits(splits: Mapping[str, Iterable[Mapping[str, Any]]], data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write each split to ``data_dir/<split>.jsonl`` and return ``{split: path}``."""
    return {split: write_jsonl(records, Path(data_dir) / f"{split}.jsonl") for split, records in splits.items()}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>\n{content}</s>\n"; the conversation starts with <s> because apply_chat_template tokenizes
# with add_special_tokens=False, so the template itself must supply bos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# ChatML, as SmolLM2-Instruct and Qwen2.5-Instruct write it: each turn ends with <|im_end|> and a newline.
CHATML_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _alpaca_prompt(record: Mapping[str, Any]) -> str:
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    output_dir: str | os.PathLike[str] | None = None,
    chat_format: str = "tiny",
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<s>``=0 (bos), ``</s>``=1 (eos), ``<pad>``=2, ``<unk>``=3, then the chat role markers.
    Encoding with ``add_special_tokens=True`` prepends ``<s>`` (no eos); ``skip_special_tokens=True`` decoding
    round-trips ordinary text exactly. Deterministic for the same texts. Saved with ``save_pretrained`` when
    ``output_dir`` is given.

    The chat template renders ``<s><|user|>\n{content}</s>\n...<|assistant|>\n``: it supplies ``<s>`` itself
    because ``apply_chat_template`` tokenizes with ``add_special_tokens=False``.

    ``chat_format="chatml"``: ChatML instead (:data:`CHATML_TEMPLATE`, ``<|im_start|>``/``<|im_end|>`` special
    tokens, EOS ``<|im_end|>`` as SmolLM2-Instruct and Qwen2.5-Instruct), its template starting with ``<s>`` when
    ``add_bos``. ``add_bos=False``: encoding adds no BOS (GPT-2, Qwen, SmolLM2 tokenizers).
    """
    if chat_format not in ("tiny", "chatml"):
        raise ValueError(f"chat_format must be 'tiny' or 'chatml', got {chat_format!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    chatml = chat_format == "chatml"
    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *(CHATML_TOKENS if chatml else ROLE_TOKENS)]
    if vocab_size <= len(specials) + 256:
        raise ValueError(f"vocab_size must exceed {len(specials) + 256} (specials + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False + ByteLevel decoder keeps decode(encode(text)) == text, leading spaces included.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is ever out-of-vocabulary
        show_progress=False,
    )
    backend.train_from_iterator((t for t in texts if t), trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
        )
    template = CHAT_TEMPLATE
    if chatml:
        template = ("{{ bos_token }}" if add_bos else "") + CHATML_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=CHATML_TOKENS[1] if chatml else EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(CHATML_TOKENS if chatml else ROLE_TOKENS),
        # No add_bos_token/add_eos_token kwargs on purpose: transformers 5 drops them from tokenizer_config.json and
        # would then rebuild the post-processor differently on reload. The TemplateProcessing above, stored in
        # tokenizer.json, is the single source of truth (so `tokenizer.add_bos_token` reads False, yet bos is added).
        padding_side="right",
        model_max_length=512,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )
    if output_dir is not None:
        tokenizer.save_pretrained(str(output_dir))
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Tiny Llama models
# ---------------------------------------------------------------------------------------------------------------

TINY_ROLES: dict[str, dict[str, int]] = {
    "teacher": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
    },
    "student": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 192,
    },
}


def tiny_llama_config(role: str, vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A tiny ``LlamaConfig`` for ``role`` in :data:`TINY_ROLES`; ``overrides`` (e.g. bos/eos/pad ids) win."""
    from transformers import LlamaConfig

    if role not in TINY_ROLES:
        raise ValueError(f"unknown role {role!r}; allowed roles: {sorted(TINY_ROLES)}")
    kwargs: dict[str, Any] = {
        **TINY_ROLES[role],
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,  # KD losses read the LM head; keep it independent of the embeddings
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_model(
    role: str, folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int, overrides: Mapping[str, Any] | None = None
) -> None:
    """A randomly initialised tiny model of ``role`` (initialisation from ``seed``) saved with its tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_llama_config(role, len(tokenizer), **{**special_ids, **(overrides or {})})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def prepare_tiny_stack(
    output_dir: str | os.PathLike[str],
    num_train: int = 4000,
    num_validation: int = 200,
    num_test: int = 200,
    vocab_size: int = 1024,
    seed: int = 0,
    teacher_overrides: dict[str, Any] | None = None,
    student_overrides: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write synthetic splits, a tokenizer and randomly initialised tiny teacher/student under ``output_dir``.

    Layout: ``data/{train,validation,test}.jsonl``, ``tokenizer/``, ``teacher/``, ``student/`` (each model folder
    also holds the tokenizer). Returns ``{"data_dir", "train_file", "validation_file", "test_file", "tokenizer",
    "teacher", "student"}``.
    """
    root = Path(output_dir)
    data_dir = root / "data"
    splits = generate_splits(num_train, num_validation, num_test, seed=seed)
    files = write_splits(splits, data_dir)

    # Train the tokenizer on the training split only (no leakage of held-out prompts), including the full prompt
    # template so its boilerplate tokenizes compactly. Special tokens are left out of the texts: they are atomic ids.
    texts: list[str] = []
    for record in splits["train"]:
        texts.extend((record["instruction"], record["input"], record["output"]))
        texts.append(_alpaca_prompt(record) + record["output"])
    texts.append(ALPACA_PROMPT_WITH_INPUT)
    texts.append(ALPACA_PROMPT_NO_INPUT)
    tokenizer_dir = root / "tokenizer"
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, output_dir=tokenizer_dir)

    save_tiny_model("teacher", root / "teacher", tokenizer, seed, teacher_overrides)
    save_tiny_model("student", root / "student", tokenizer, seed + 1, student_overrides)
    return {
        "data_dir": str(data_dir),
        "train_file": files["train"],
        "validation_file": files["validation"],
        "test_file": files["test"],
        "tokenizer": str(tokenizer_dir),
        "teacher": str(root / "teacher"),
        "student": str(root / "student"),
    }
