"""Depth pruning of decoder-only causal LMs: drop whole decoder layers, save an ordinary checkpoint.

The keep-set comes from an explicit list of layer indices, an evenly spaced ``uniform`` choice, or ShortGPT's block
influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):

    BI_i = 1 - mean over calibration tokens of cos(h_in_i, h_out_i)

where ``h_in_i`` / ``h_out_i`` are the hidden states entering and leaving decoder layer ``i``. A layer that barely
turns its input (BI near 0) changes little and is dropped first. Hidden states are caught with forward hooks on the
layers themselves: ``output_hidden_states`` would hand over the last layer's output after the final norm.

The pruned model keeps the original layer modules in their order; the config's ``num_hidden_layers`` and every
per-layer list (``layer_types``, ...) are sliced to the kept layers, and the ``layer_idx`` attributes the KV cache
indexes by are renumbered. ``eakd-llm prune`` (:func:`prune_main`) wraps it for saved models.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config.eakd_config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "PRUNE_FILE",
    "SCORES_FILE",
    "block_influence",
    "calibration_batches",
    "calibration_sequences",
    "check_keep",
    "check_rebuildable",
    "decoder_layers",
    "keep_highest",
    "per_layer_config_keys",
    "prune_layers",
    "prune_main",
    "uniform_keep",
]

METHODS: tuple[str, ...] = ("uniform", "block-influence")
PRUNE_FILE = "prune.json"
SCORES_FILE = "block_influence.json"
TEXT_COLUMN = "text"
# Top-level config lists that can have num_hidden_layers entries without being per-layer.
_NOT_PER_LAYER = ("architectures",)


# ----------------------------------------------------------------------------------------------------------------
# Keep-sets
# ----------------------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a decoder-only causal LM; any other layout is refused in one line."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"cannot prune {type(model).__name__}: depth pruning needs a decoder-only causal LM whose decoder layers "
            "are model.model.layers (Llama, Qwen2/3, Mistral, Gemma2/3 text, Phi-3 and alike)"
        )
    expected = getattr(model.config, "num_hidden_layers", None)
    if expected != len(layers):
        raise ConfigError(f"cannot prune {type(model).__name__}: model.model.layers has {len(layers)} layers but "
                          f"config.num_hidden_layers is {expected}")
    return layers


def check_keep(keep: Sequence[int], num_layers: int) -> list[int]:
    """The keep-set as a list, or a :class:`ConfigError` for an empty, out-of-range, repeated or unsorted one."""
    keep = list(keep)
    if not keep:
        raise ConfigError("the layers to keep are empty: keep at least one layer")
    for index in keep:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise ConfigError(f"layer {index!r} is out of range: the model has layers 0..{num_layers - 1}")
    if len(set(keep)) != len(keep):
        repeated = sorted({i for i in keep if keep.count(i) > 1})
        raise ConfigError(f"layers {repeated} are given more than once: each kept layer is listed once")
    if keep != sorted(keep):
        raise ConfigError(f"the layers to keep must be in increasing order, got {keep}: pruning keeps the layers' "
                          f"order, so another order is a mistake (did you mean {sorted(keep)}?)")
    return keep


def _check_count(num_keep: int, num_layers: int) -> None:
    if isinstance(num_keep, bool) or not isinstance(num_keep, int) or not 1 <= num_keep <= num_layers:
        raise ConfigError(f"--num-layers must be in [1, {num_layers}] (the model has {num_layers} layers), "
                          f"got {num_keep}")


def uniform_keep(num_layers: int, num_keep: int) -> list[int]:
    """``num_keep`` evenly spaced layers, always the first and the last (one layer: the first)."""
    _check_count(num_keep, num_layers)
    if num_keep == 1:
        return [0]
    # round(i * (L-1) / (N-1)) half up, in integers: exact, and strictly increasing because the step is >= 1.
    return [(2 * i * (num_layers - 1) + num_keep - 1) // (2 * (num_keep - 1)) for i in range(num_keep)]


def keep_highest(scores: Sequence[float], num_keep: int) -> list[int]:
    """The ``num_keep`` layers of highest score, in layer order; on a tie the earlier layer is kept."""
    _check_count(num_keep, len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:num_keep])


# ----------------------------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------------------------


def per_layer_config_keys(config) -> list[str]:
    """Top-level config entries holding one value per layer: lists of length ``num_hidden_layers``."""
    num_layers = config.num_hidden_layers
    return sorted(
        key for key, value in config.to_dict().items()
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key not in _NOT_PER_LAYER
        and not key.endswith(("token_id", "token_ids"))
    )


def _prune_config(config, keep: Sequence[int]) -> None:
    for key in per_layer_config_keys(config):
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in keep))
    # Qwen2/Qwen3: layers from max_window_layers on use the sliding window; keep that boundary between the same layers.
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    config.num_hidden_layers = len(keep)


def prune_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` (increasing indices) of ``model``, in place; returns ``model``.

    The config (``num_hidden_layers``, per-layer lists) follows, and every ``layer_idx`` inside a kept layer becomes
    its new position so that the KV cache, which is indexed by it, lines up with the new depth.
    """
    layers = decoder_layers(model)
    keep = check_keep(keep, len(layers))
    kept = nn.ModuleList([layers[i] for i in keep])
    for position, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    model.model.layers = kept
    configs = {id(model.config): model.config, id(model.model.config): model.model.config}
    for config in configs.values():
        _prune_config(config, keep)
    return model


def _signature(module: nn.Module) -> tuple:
    """What a module is built as: its class and its plain settings (ints, strings, ...)."""
    settings = {k: v for k, v in vars(module).items()
                if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))}
    return type(module), settings


def check_rebuildable(model: nn.Module, trust_remote_code: bool = False) -> None:
    """Refuse a pruned model that its own config would not rebuild: same parameters, and the same layer modules.

    A fresh model is built from the pruned config on the meta device (no memory) and compared: every parameter's
    name and shape, and each decoder layer's modules with their plain settings. This catches architectures whose
    layers depend on their index (e.g. an MoE block every k-th layer), where slicing the config cannot describe the
    kept layers and the checkpoint would not load back as the pruned model.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), trust_remote_code=trust_remote_code)
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in fresh.named_parameters()}
    differing = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
    if not differing:
        ours_layers, their_layers = dict(model.model.layers.named_modules()), dict(fresh.model.layers.named_modules())
        differing = [f"model.layers.{name}" for name in ours_layers
                     if name not in their_layers or _signature(ours_layers[name]) != _signature(their_layers[name])]
    if differing:
        raise ConfigError(f"cannot prune {type(model).__name__}: its pruned config rebuilds {differing[0]!r} "
                          "differently (its layers depend on their index), so the checkpoint would not be the pruned "
                          "model")


# ----------------------------------------------------------------------------------------------------------------
# Block influence
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
    """ShortGPT block influence of every decoder layer: ``1 - mean cos(h_in, h_out)`` over non-padding tokens.

    ``batches`` yield ``input_ids`` and optionally ``attention_mask`` (1 = token, 0 = padding). Only the decoder
    trunk runs (no LM head); cosines are computed in float32.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    counts = torch.zeros(len(layers), dtype=torch.float64, device=device)
    mask: dict[str, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, kwargs, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            tokens = mask["tokens"]
            sums[index] += torch.where(tokens, cos, 0.0).sum(dtype=torch.float64)
            counts[index] += tokens.sum()

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
            mask["tokens"] = attention_mask.bool()
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if counts[0] == 0:
        raise ConfigError("block influence needs calibration tokens: the calibration batches hold none")
    return (1.0 - sums / counts).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------------------------------------------


def _read_raw(path: str | None, recipe, split: str):
    """The raw records: a ``.txt`` file (one document per non-empty line) or anything the data loader reads."""
    import datasets

    from ..data.dataset import load_split

    if path is not None and os.path.isfile(path) and path.endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle if line.strip()]
        if not lines:
            raise ConfigError(f"--calibration-data {path!r} has no non-empty line")
        return datasets.Dataset.from_dict({TEXT_COLUMN: lines})
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"--calibration-data {path!r} does not exist")
    return load_split(path or recipe.dataset_name, split, None if path else recipe.dataset_config)


def _is_plain_text(columns: Sequence[str], config) -> bool:
    formats = (config.messages_column, config.instruction_column, config.prompt_column)
    return config.dataset_format == "auto" and TEXT_COLUMN in columns and not any(c in columns for c in formats)


def calibration_sequences(
    tokenizer,
    data: str | None = None,
    recipe=None,
    num_samples: int = 128,
    max_length: int = 512,
    seed: int = 0,
) -> list[list[int]]:
    """Token ids of ``num_samples`` records drawn (seeded shuffle) from ``data`` or the recipe's training split.

    Records with a ``text`` column (and none of the instruction/prompt/messages columns), or a ``.txt`` file, are
    plain text; other records are rendered and tokenized as training does (:func:`eakd_llm.data.dataset.build_dataset`,
    with the recipe's format and column keys, else the defaults). Every sequence is cut to ``max_length`` tokens.
    """
    from ..config.recipe import build_config
    from ..data.dataset import build_dataset

    if data is None and recipe is None:
        raise ConfigError("block influence needs calibration text: give --calibration-data FILE or --recipe RECIPE")
    if num_samples < 1 or max_length < 2:
        raise ConfigError(f"--calibration-samples must be >= 1 and --max-length >= 2, got {num_samples} and "
                          f"{max_length}")
    config = recipe or build_config({"output_dir": ".", "max_length": max_length, "kd_ratio": 0.0,
                                     "report_to": "none"}, source="--calibration-data")
    split = config.dataset_train_split if data is None else "train"
    raw = _read_raw(data, config, split)
    raw = raw.shuffle(seed=seed).select(range(min(num_samples, len(raw))))
    if _is_plain_text(raw.column_names, config):
        texts = [str(text) for text in raw[TEXT_COLUMN] if text is not None and str(text).strip()]
        ids = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    else:
        ids = list(build_dataset(raw, config, tokenizer, split=split)["input_ids"])
    sequences = [list(seq[:max_length]) for seq in ids if len(seq) > 0]
    if not sequences:
        raise ConfigError(f"no calibration text left in {data or config.dataset_name}")
    return sequences


def calibration_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_token_id: int) -> list[dict]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches of ``batch_size`` sequences."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        length = max(len(seq) for seq in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, seq in enumerate(chunk):
            input_ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[row, :len(seq)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_prune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eakd-llm prune",
        description="Depth-prune a decoder-only causal LM: keep some of its decoder layers and save the result as an "
        "ordinary checkpoint (with the tokenizer, prune.json, and block_influence.json when scores were computed).",
    )
    parser.add_argument("model", help="model folder (or hub id) to prune")
    parser.add_argument("--output", required=True, help="folder to write the pruned checkpoint to")
    parser.add_argument("--layers", help="comma-separated indices of the layers to KEEP, increasing (e.g. 0,1,3,5)")
    parser.add_argument("--num-layers", type=int, help="how many layers to keep (chosen by --method)")
    parser.add_argument("--method", choices=METHODS, help="how --num-layers chooses: uniform (evenly spaced, first and "
                        "last kept) or block-influence (ShortGPT: drop the layers that change the hidden states "
                        "least; the default)")
    parser.add_argument("--calibration-data", help="calibration records: a .jsonl/.json/.parquet file or folder in "
                        "a training format, records with a 'text' column, or a .txt file (one document per line); "
                        "default (with no --recipe either): the bundled instruction prompt set's training prompts, "
                        "rendered with the model's chat template")
    parser.add_argument("--recipe", help="training recipe whose data (and format/column keys) calibrates; with "
                        "--calibration-data, only its format/column keys are used")
    parser.add_argument("--calibration-samples", type=int, default=128, help="records to draw (default 128)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per calibration record (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype to load (and save) in (default: as saved)")
    parser.add_argument("--device", default="auto", help="device of the calibration forward (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of configuration errors")
    return parser


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as err:
        raise ConfigError(f"--layers {text!r}: give comma-separated layer indices to keep, e.g. 0,1,3") from err


def _check_args(args: argparse.Namespace) -> None:
    """Every command-line combination problem, before any model is loaded."""
    if (args.layers is None) == (args.num_layers is None):
        raise ConfigError("give exactly one of --layers (the layers to keep) and --num-layers (how many to keep)")
    if args.layers is not None and args.method is not None:
        raise ConfigError("--method chooses the layers for --num-layers; --layers already names them")
    if args.num_layers is not None and args.num_layers < 1:
        raise ConfigError(f"--num-layers must be >= 1, got {args.num_layers}")
    if args.num_layers is not None and args.method is None:
        args.method = "block-influence"
    scoring = args.method == "block-influence"
    if not scoring and (args.calibration_data or args.recipe):
        raise ConfigError("--calibration-data and --recipe are read by --method block-influence only")
    for name in ("calibration_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length < 2:
        raise ConfigError(f"--max-length must be >= 2, got {args.max_length}")
    _check_output(args.output, args.model, args.overwrite)


def _check_output(output: str, source: str, overwrite: bool) -> None:
    if os.path.exists(source) and os.path.exists(output) and os.path.samefile(source, output):
        raise ConfigError(f"--output {output!r} is the model folder being pruned; choose another folder")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output!r} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise ConfigError(f"--output {output!r} exists and is not empty; pass --overwrite to replace it")
        if not os.path.isfile(os.path.join(output, "config.json")):
            raise ConfigError(f"--output {output!r} is not empty and holds no model (no config.json); --overwrite "
                              "replaces model folders only, so choose another folder")


def _source_num_layers(path: str, trust_remote_code: bool) -> int:
    """The source's depth, from a weightless (meta) build of its config: the layout and a bad keep-set are refused
    before any weight is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config.eakd_config import looks_like_local_path

    if looks_like_local_path(path) and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"MODEL {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"MODEL: cannot build a causal LM from the config of {path!r}: {err}") from err
    return len(decoder_layers(skeleton))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA device is available here")
    return device


def _load_source_tokenizer(path: str, trust_remote_code: bool):
    """The source's tokenizer as saved (no pad token added), or None when it has none."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise ConfigError(f"MODEL: cannot load the tokenizer of {path!r}: {err}") from err
        logger.warning("no tokenizer could be loaded from %s; the pruned checkpoint has none", path)
        return None


BUNDLED_CALIBRATION = "the bundled instruction prompt set (eakd_llm.data.instruction_prompts, seed 0, train split)"


def bundled_calibration_sequences(tokenizer, num_samples: int, max_length: int,
                                  seed: int = 0) -> tuple[list[list[int]], str]:
    """Token ids of ``num_samples`` training prompts of the bundled instruction prompt set (seeded draw), each a user
    turn rendered with the tokenizer's chat template and its generation prompt, as a chat model sees prompts (plain
    text when the tokenizer has no template); and how they were rendered."""
    import random

    from ..data.instruction_prompts import generate_prompt_set
    from ..data.prompts import chat_prompt

    prompts = [r["prompt"] for r in generate_prompt_set(0) if r["split"] == "train"]
    random.Random(seed).shuffle(prompts)
    chosen = prompts[:num_samples]
    if getattr(tokenizer, "chat_template", None) is not None:
        texts = [chat_prompt([{"role": "user", "content": p}], tokenizer) for p in chosen]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return [seq[:max_length] for seq in ids], "chat template"
    return [tokenizer(p)["input_ids"][:max_length] for p in chosen], "plain text (the tokenizer has no chat template)"


def _calibration(tokenizer, args: argparse.Namespace) -> tuple[list[list[int]], dict[str, Any]]:
    """The calibration token ids and their description, read before any weight is loaded."""
    from ..config.recipe import load_recipe

    if tokenizer is None:
        raise ConfigError(f"MODEL {args.model!r} has no tokenizer to encode the calibration text with")
    if not (args.calibration_data or args.recipe):
        sequences, rendering = bundled_calibration_sequences(tokenizer, args.calibration_samples, args.max_length,
                                                             args.seed)
        print(f"calibration: {len(sequences)} prompts of {BUNDLED_CALIBRATION}, rendered with {rendering} "
              "(--calibration-data or --recipe to use your own data)", flush=True)
        return sequences, {"data": BUNDLED_CALIBRATION, "rendering": rendering, "recipe": None,
                           "samples_requested": args.calibration_samples, "sequences": len(sequences),
                           "tokens": sum(len(s) for s in sequences), "max_length": args.max_length,
                           "batch_size": args.batch_size, "seed": args.seed}
    recipe = load_recipe(args.recipe) if args.recipe else None
    sequences = calibration_sequences(tokenizer, args.calibration_data, recipe, args.calibration_samples,
                                      args.max_length, args.seed)
    calibration = {
        "data": args.calibration_data or recipe.dataset_name,
        "recipe": args.recipe,
        "samples_requested": args.calibration_samples,
        "sequences": len(sequences),
        "tokens": sum(len(s) for s in sequences),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    return sequences, calibration


def _print_scores(scores: Sequence[float], keep: Sequence[int]) -> None:
    print("layer  block influence  kept")
    for index, score in enumerate(scores):
        print(f"{index:>5}  {score:>15.6f}  {'yes' if index in keep else 'dropped'}")


def _prepare_output(output: str) -> None:
    if os.path.isdir(output) and os.listdir(output):  # --overwrite of a model folder (checked up front)
        shutil.rmtree(output)
    os.makedirs(output, exist_ok=True)


def _write_json(path: str, payload: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def _save(model: nn.Module, tokenizer, output: str, provenance: dict[str, Any], scores: dict | None) -> None:
    _prepare_output(output)
    model.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    if scores is not None:
        _write_json(os.path.join(output, SCORES_FILE), scores)
    _write_json(os.path.join(output, PRUNE_FILE), provenance)


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything, load, choose the keep-set, prune, save; returns the provenance written to ``prune.json``."""
    from .loading import load_causal_lm

    _check_args(args)
    num_layers = _source_num_layers(args.model, args.trust_remote_code)
    keep = check_keep(_parse_layers(args.layers), num_layers) if args.layers is not None else None
    if args.num_layers is not None:
        _check_count(args.num_layers, num_layers)
    device = _resolve_device(args.device)
    tokenizer = _load_source_tokenizer(args.model, args.trust_remote_code)
    if args.method == "block-influence":
        sequences, calibration = _calibration(tokenizer, args)
    model = load_causal_lm(args.model, args.dtype, args.trust_remote_code, key="MODEL")
    decoder_layers(model)
    scores = None
    if args.method == "uniform":
        keep = uniform_keep(num_layers, args.num_layers)
    elif args.method == "block-influence":
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)  # masked out
        scores = block_influence(model.to(device), calibration_batches(sequences, args.batch_size, pad))
        keep = keep_highest(scores, args.num_layers)
        _print_scores(scores, keep)
    if len(keep) == num_layers:
        logger.warning("keeping all %d layers: the checkpoint is the source model re-saved", num_layers)
    sliced = per_layer_config_keys(model.config)
    prune_layers(model, keep)
    check_rebuildable(model, args.trust_remote_code)
    dropped = [i for i in range(num_layers) if i not in keep]
    provenance = {
        "source": args.model,
        "source_num_hidden_layers": num_layers,
        "num_hidden_layers": len(keep),
        "kept_layers": keep,
        "dropped_layers": dropped,
        "method": "layers" if args.layers is not None else args.method,
        "scores_file": SCORES_FILE if scores is not None else None,
        "sliced_config_keys": sliced,
    }
    scores_record = None if scores is None else {
        "definition": "BI_i = 1 - mean over non-padding calibration tokens of cos(input of layer i, output of layer i) "
                      "(ShortGPT, Men et al. 2024); the lowest-BI layers are dropped",
        "scores": scores,
        "kept_layers": keep,
        "dropped_layers": dropped,
        "calibration": calibration,
    }
    _save(model, tokenizer, args.output, provenance, scores_record)
    return provenance


def prune_main(argv: Sequence[str]) -> int:
    """``eakd-llm prune``: 0 on success, 2 with a one-line ``eakd-llm: error: ...`` for a configuration error."""
    args = build_prune_parser().parse_args(list(argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        provenance = run_prune(args)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"eakd-llm: error: {err}", file=sys.stderr)
        return 2
    print(f"pruned {provenance['source']}: kept layers {provenance['kept_layers']} of "
          f"{provenance['source_num_hidden_layers']} -> {args.output}")
    return 0
