"""A set of short real-language instructions written for this project (not drawn from any dataset).

Eight families of everyday requests a small chat model answers in one to three sentences: ``facts``, ``arithmetic``
(word problems with small numbers), ``rewriting``, ``lists``, ``definitions``, ``classification``, ``extraction`` and
``howto``. Every prompt is a hand-written template filled with an entry of a hand-written word list.

Train/validation/test are split so that the test prompts are unseen in training, twice over:

* by entity: each group's entities (a country, a sentence, an item, ...) go to one split only (70/10/20, a seeded
  shuffle), so no test entity appears in any training prompt, under any phrasing;
* by template: each group's last template is held out of training entirely; it is asked about validation and test
  entities only.

:func:`generate_prompt_set` is deterministic for a seed; ``data/prompts/instructions.jsonl`` is its output for seed 0
(``python -m eakd_llm.data.instruction_prompts`` rewrites it). Records: ``{"id", "family", "prompt", "split"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SPLITS: tuple[str, ...] = ("train", "validation", "test")
FAMILIES: tuple[str, ...] = ("facts", "arithmetic", "rewriting", "lists", "definitions", "classification",
                             "extraction", "howto")
TEST_SHARE, VALIDATION_SHARE = 0.2, 0.1
DEFAULT_PATH = os.path.join("data", "prompts", "instructions.jsonl")

# ----------------------------------------------------------------------------------------------------------------
# Word lists
# ----------------------------------------------------------------------------------------------------------------

COUNTRIES = ("France", "Japan", "Brazil", "Egypt", "Canada", "Italy", "Kenya", "India", "Mexico", "Norway",
             "Australia", "Spain", "Germany", "Peru", "China", "Greece", "Turkey", "Argentina", "Sweden", "Portugal",
             "Thailand", "Nigeria", "Ireland", "Chile", "Poland", "Vietnam", "Morocco", "the Netherlands", "Cuba",
             "Finland", "Iceland", "Austria", "Colombia", "Ghana", "Denmark", "South Korea")
ANIMALS = ("lion", "penguin", "dolphin", "elephant", "owl", "frog", "camel", "bee", "shark", "kangaroo", "polar bear",
           "octopus", "eagle", "rabbit", "giraffe", "crocodile", "bat", "squirrel", "whale", "horse", "snail",
           "parrot", "tortoise", "wolf", "zebra", "ant", "panda", "salmon")
ITEMS = ("apples", "pencils", "cookies", "marbles", "stickers", "books", "balloons", "oranges", "cupcakes", "toy cars",
         "shells", "crayons", "eggs", "buttons", "flowers", "stamps", "candles", "carrots", "bananas", "cards", "socks",
         "plates", "coins", "tomatoes", "bottles", "rocks", "ribbons", "paper cups", "muffins", "kites")
PEOPLE = (("Anna", "she"), ("Ben", "he"), ("Carlos", "he"), ("Divya", "she"), ("Elena", "she"), ("Farid", "he"),
          ("Grace", "she"), ("Hiro", "he"), ("Isabel", "she"), ("Jonas", "he"), ("Kofi", "he"), ("Lena", "she"),
          ("Mateo", "he"), ("Nadia", "she"), ("Omar", "he"), ("Priya", "she"), ("Rosa", "she"), ("Sam", "he"),
          ("Tariq", "he"), ("Uma", "she"), ("Victor", "he"), ("Wendy", "she"), ("Yusuf", "he"), ("Zoe", "she"),
          ("Leo", "he"), ("Mia", "she"), ("Noah", "he"), ("Ava", "she"), ("Liam", "he"), ("Chloe", "she"),
          ("Ethan", "he"), ("Sofia", "she"), ("Lucas", "he"), ("Amara", "she"), ("Ivan", "he"), ("Mei", "she"),
          ("Tom", "he"), ("Sara", "she"), ("Diego", "he"), ("Ines", "she"))
CITIES = ("Paris", "Lisbon", "Toronto", "Nairobi", "Osaka", "Denver", "Madrid", "Cairo", "Lima", "Oslo", "Dublin",
          "Seoul", "Chicago", "Rome", "Sydney", "Vienna", "Mumbai", "Boston", "Prague", "Berlin", "Athens", "Hanoi",
          "Bogota", "Accra", "Helsinki", "Havana", "Warsaw", "Istanbul", "Manila", "Quito")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
SENTENCES = (
    "I walk to the shop every morning.", "We eat dinner at seven.", "The kids play in the garden after school.",
    "She writes a letter to her grandmother.", "My brother fixes old bikes in the garage.",
    "The dog sleeps next to the fire.", "They watch a movie on Friday night.",
    "He drinks a cup of coffee before work.", "The train leaves the station at noon.",
    "I can't find my keys anywhere.", "We need to buy some milk and bread.",
    "The teacher explains the lesson very slowly.", "My friends and I go hiking in the hills.",
    "The baby laughs when the cat jumps.", "Our team wins most of its games.",
    "The wind blows the leaves across the road.", "I think the meeting is a waste of time.",
    "She sings in the choir on Sundays.", "The shop opens at nine and closes at five.",
    "He forgets his umbrella every time it rains.", "They build a sandcastle on the beach.",
    "I really like the new cafe on the corner.", "The bus is late again today.", "My mom bakes bread on the weekend.",
    "We clean the kitchen after every meal.", "The students ask a lot of questions.",
    "Grandpa tells funny stories about his childhood.", "I send my sister a message every day.",
    "The river floods the fields in spring.", "You should call the doctor about that cough.",
    "The kids are super excited about the trip.", "He paints the fence bright blue.",
    "Our neighbors have a big noisy dog.", "I don't understand this math problem.",
    "The farmer feeds the chickens at dawn.", "She reads the news on her phone.",
    "We plant tomatoes in the backyard.", "The museum is free on Mondays.", "They run around the lake every evening.",
    "The computer makes a strange noise.", "My cousin visits us every summer.",
    "I want to learn how to play the guitar.", "The cook cuts the onions into small pieces.",
    "The phone rings in the middle of the night.", "Lots of people come to the market on Saturday.",
)
CATEGORIES = ("fruits that are red", "animals that can fly", "musical instruments", "things you find in a kitchen",
              "colors of the rainbow", "vegetables that grow underground", "sports played with a ball",
              "countries in Europe", "planets in the solar system", "tools a carpenter uses",
              "things people take to the beach", "farm animals", "jobs in a hospital", "board games",
              "types of weather", "things that are cold", "flowers", "insects", "ways to travel to work",
              "winter clothes", "kinds of trees", "school subjects", "pets that live in a cage", "breakfast foods",
              "sea animals", "shapes", "things made of wood", "birds", "holidays", "languages spoken in Asia",
              "kitchen appliances", "rivers in Africa", "desserts", "parts of a car", "things you can recycle",
              "hobbies you can do at home", "green vegetables", "parts of the human body", "dairy products",
              "sources of energy")
WORDS = (("a", "volcano"), ("a", "library"), ("a", "thermometer"), ("a", "passport"), ("a", "glacier"),
         ("a", "recipe"), ("an", "orchestra"), ("an", "umbrella"), ("an", "island"), ("a", "battery"),
         ("a", "calendar"), ("a", "microscope"), ("a", "desert"), ("a", "pharmacy"), ("a", "bridge"),
         ("a", "compass"), ("a", "vaccine"), ("a", "harbor"), ("a", "telescope"), ("a", "budget"), ("a", "planet"),
         ("a", "magnet"), ("a", "museum"), ("an", "election"), ("a", "lighthouse"), ("a", "rainbow"),
         ("a", "skeleton"), ("a", "dictionary"), ("a", "tornado"), ("a", "vitamin"), ("a", "receipt"),
         ("a", "fossil"), ("a", "satellite"), ("a", "peninsula"), ("an", "insect"), ("an", "airport"),
         ("a", "hurricane"), ("an", "alphabet"), ("an", "engine"), ("an", "email"), ("a", "forest"),
         ("a", "canal"), ("a", "ladder"), ("a", "pyramid"), ("an", "echo"), ("an", "orbit"), ("a", "shadow"),
         ("a", "puzzle"))
PRODUCE = ("an apple", "a carrot", "a banana", "broccoli", "a grape", "spinach", "a potato", "a mango", "a cucumber",
           "a strawberry", "an onion", "a pear", "lettuce", "a cherry", "a pumpkin", "a lemon", "cabbage", "a peach",
           "a pineapple", "celery", "a plum", "garlic", "a watermelon", "a radish")
ANIMAL_GROUPS = ("cow", "robin", "trout", "lizard", "beetle", "goat", "sparrow", "tuna", "snake", "butterfly",
                 "mouse", "duck", "cod", "turtle", "housefly", "deer", "swan", "gecko", "grasshopper", "monkey",
                 "pigeon", "eel", "ladybug", "hamster")
REVIEWS = (
    "The food was cold and the waiter was rude.", "I loved every minute of this film.",
    "The hotel room was clean and the staff were friendly.", "This phone stopped working after two days.",
    "Best pizza I have had in years!", "The book was boring and far too long.",
    "Great value for the price, I would buy it again.", "The delivery was late and the box was damaged.",
    "My kids had a wonderful time at the park.", "The chair broke the first time I sat on it.",
    "The concert was amazing and the sound was perfect.", "I waited an hour and nobody helped me.",
    "This soap smells lovely and feels soft on the skin.", "The shoes hurt my feet after ten minutes.",
    "A beautiful, funny and moving story.", "The app crashes every time I open it.",
    "Our guide was kind and knew a lot about the city.", "The coffee tasted burnt and bitter.",
    "These headphones are comfortable and sound great.", "The museum was crowded, noisy and overpriced.",
    "I am very happy with this jacket.", "The game was a complete waste of money.",
    "Fresh bread, friendly bakers, lovely shop.", "The paint started peeling after a week.",
)
TASKS = ("boil an egg", "plant a tomato seed", "tie a shoelace", "make a cup of tea", "clean a window",
         "wash a wool sweater", "fold a paper airplane", "change a light bulb", "save money each month",
         "fall asleep faster", "learn new words in a foreign language", "pack a suitcase", "remove a coffee stain",
         "keep a plant alive indoors", "make a paper boat", "brush a dog's fur", "cook rice", "start running",
         "write a thank-you note", "fix a flat bicycle tire", "make a sandwich", "organize a messy desk",
         "memorize a short poem", "prepare for a job interview", "cool down a hot room", "sharpen a pencil",
         "water a garden", "iron a shirt", "make pancakes", "read a paper map", "take care of a goldfish",
         "build a birdhouse", "stay focused while studying", "defrost a freezer", "learn to whistle",
         "make lemonade", "remember a password", "calm down before a test", "clean a bathroom mirror",
         "set up a tent")
EXTRACTION_FRAMES = (
    "{n1} will meet {n2} in {c1} on {date}.",
    "On {date}, {n1} took the train from {c1} to {c2}.",
    "{n1} opened a small bakery in {c1} on {date}, {year}.",
    "The library in {c1} will be closed on {date}, says {n1}.",
    "{n1}'s birthday party is on {date} at a park in {c1}.",
    "{n1} and {n2} moved to {c1} on {date}, {year}.",
    "The concert in {c1} was moved to {date} because {n1} was ill.",
    "{n1} sent the package to {c1} on {date}.",
)
NUM_EXTRACTION_SENTENCES = 64

# ----------------------------------------------------------------------------------------------------------------
# Templates: each group's LAST template is held out of training (asked about validation and test entities only)
# ----------------------------------------------------------------------------------------------------------------

Fill = Callable[[str, Any, random.Random], str]


@dataclass(frozen=True)
class Group:
    """Templates asked about a list of entities; ``fill(template, entity, rng)`` writes one prompt."""

    family: str
    name: str
    templates: tuple[str, ...]
    entities: tuple[Any, ...]
    fill: Fill


def _plain(template: str, entity: Any, rng: random.Random) -> str:
    article = "an" if str(entity)[:1].lower() in "aeiou" else "a"
    return template.format(x=entity, a_x=f"{article} {entity}")


def _word(template: str, entity: tuple[str, str], rng: random.Random) -> str:
    return template.format(a=entity[0], x=entity[1])


def _word_problem(template: str, items: str, rng: random.Random) -> str:
    name, pronoun = rng.choice(PEOPLE)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return template.format(name=name, pronoun=pronoun, Pronoun=pronoun.capitalize(), items=items, a=a, b=b,
                           c=a + b + rng.randint(1, 5), m=a * b)


def _sentence(template: str, sentence: str, rng: random.Random) -> str:
    return template.format(s=sentence)


def extraction_sentences(seed: int) -> list[str]:
    """The sentences extraction questions are asked about: the frames filled with names, cities and dates."""
    rng = random.Random(f"extraction-{seed}")
    out = []
    for i in range(NUM_EXTRACTION_SENTENCES):
        (n1, _), (n2, _) = rng.sample(PEOPLE, 2)
        c1, c2 = rng.sample(CITIES, 2)
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"
        out.append(EXTRACTION_FRAMES[i % len(EXTRACTION_FRAMES)].format(
            n1=n1, n2=n2, c1=c1, c2=c2, date=date, year=rng.randint(2015, 2024)))
    return out


def groups(seed: int = 0) -> list[Group]:
    """Every template group of the set (the extraction sentences depend on the seed)."""
    return [
        Group("facts", "country", ("What is the capital of {x}?", "On which continent is {x}?",
                                   "What language is mainly spoken in {x}?",
                                   "Tell me one well-known fact about {x}."), COUNTRIES, _plain),
        Group("facts", "animal", ("Where does {a_x} usually live?", "What does {a_x} eat?",
                                  "How big is a typical {x}?", "Name one special ability of {a_x}."), ANIMALS, _plain),
        Group("arithmetic", "word-problem", (
            "{name} has {a} {items}. {Pronoun} buys {b} more. How many {items} does {pronoun} have now?",
            "{name} had {c} {items} and gave {b} of them to a friend. How many {items} are left?",
            "There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
            "{name} shares {m} {items} equally among {b} friends. How many {items} does each friend get?",
            "A shop sold {a} {items} in the morning and {b} in the afternoon. How many {items} did it sell that day?",
            "{name} needs {c} {items} but only has {a}. How many more {items} does {pronoun} need?",
        ), ITEMS, _word_problem),
        Group("rewriting", "sentence", ("Rewrite this sentence in the past tense: {s}",
                                        "Make this sentence more formal: {s}", "Make this sentence shorter: {s}",
                                        "Turn this sentence into a question: {s}"), SENTENCES, _sentence),
        Group("lists", "category", ("Name three {x}.", "List four {x}.", "Give two examples of {x}.",
                                    "What are three common {x}?"), CATEGORIES, _plain),
        Group("definitions", "word", ("What is {a} {x}?", "Explain in one sentence what {a} {x} is.",
                                      'Define the word "{x}".', 'What does the word "{x}" mean?'), WORDS, _word),
        Group("classification", "produce", ("Is {x} a fruit or a vegetable?",
                                            "Should {x} be called a fruit or a vegetable?",
                                            "Tell me whether {x} is a fruit or a vegetable."), PRODUCE, _plain),
        Group("classification", "animal-group", (
            "Is {a_x} a mammal, a bird, a fish, a reptile or an insect?",
            "Which animal group does the {x} belong to: mammals, birds, fish, reptiles or insects?",
            "Classify the {x} as a mammal, bird, fish, reptile or insect."), ANIMAL_GROUPS, _plain),
        Group("classification", "sentiment", ('Is this review positive or negative? "{s}"',
                                              'What is the sentiment of this review, positive or negative? "{s}"',
                                              'Classify this review as positive or negative: "{s}"'), REVIEWS,
              _sentence),
        Group("extraction", "sentence", ("What is the date in this sentence? {s}",
                                         "Who is mentioned in this sentence? {s}",
                                         "Which city is named in this sentence? {s}"),
              tuple(extraction_sentences(seed)), _sentence),
        Group("howto", "task", ("How do I {x}?", "Explain briefly how to {x}.", "What is the first step to {x}?",
                                "Give me one tip to {x}."), TASKS, _plain),
    ]


# ----------------------------------------------------------------------------------------------------------------
# The set and its split
# ----------------------------------------------------------------------------------------------------------------


def entity_splits(num_entities: int, rng: random.Random) -> list[str]:
    """The split of each entity index: a seeded shuffle, then 20% test, 10% validation (at least one each), the
    rest train."""
    order = list(range(num_entities))
    rng.shuffle(order)
    test = max(1, round(TEST_SHARE * num_entities))
    validation = max(1, round(VALIDATION_SHARE * num_entities))
    split = ["train"] * num_entities
    for position, index in enumerate(order):
        split[index] = "test" if position < test else "validation" if position < test + validation else "train"
    return split


def generate_prompt_set(seed: int = 0) -> list[dict[str, str]]:
    """Every prompt as ``{"id", "family", "prompt", "split"}``: train first, then validation, then test, each split in
    a seeded shuffled order (so its first N records mix the families). Deterministic for a seed."""
    by_split: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for group in groups(seed):
        rng = random.Random(f"{group.family}-{group.name}-{seed}")
        splits = entity_splits(len(group.entities), rng)
        held_out = len(group.templates) - 1
        for e, entity in enumerate(group.entities):
            for t, template in enumerate(group.templates):
                if t == held_out and splits[e] == "train":
                    continue
                prompt = group.fill(template, entity, rng)
                by_split[splits[e]].append({"id": f"{group.family}-{group.name}-t{t}-e{e:02d}",
                                            "family": group.family, "prompt": prompt, "split": splits[e]})
    records = []
    for split in SPLITS:
        random.Random(f"order-{split}-{seed}").shuffle(by_split[split])
        records.extend(by_split[split])
    return records


def write_prompt_set(path: str, records: Sequence[dict[str, str]]) -> str:
    """Write records as JSON lines (one record a line, UTF-8)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the project's instruction prompt set as JSON lines.")
    parser.add_argument("--output", default=DEFAULT_PATH, help=f"file to write (default: {DEFAULT_PATH})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the filled-in values (default 0)")
    args = parser.parse_args(argv)
    records = generate_prompt_set(args.seed)
    write_prompt_set(args.output, records)
    counts = {split: sum(r["split"] == split for r in records) for split in SPLITS}
    print(f"{len(records)} prompts -> {args.output} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
