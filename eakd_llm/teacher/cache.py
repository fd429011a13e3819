"""The offline teacher: its top-k log-probabilities and exact entropies, cached once, then training without it.

``eakd-llm cache-teacher RECIPE --output DIR --top-k K`` (:func:`build_cache`) runs the recipe's teacher once over the
training (and evaluation) split and stores, for every response token (every position whose next token is a
response token):

* the top-k token ids, bit-packed: ``ceil(log2 V)`` bits each, or a ``V``-bit membership bitmap when that is smaller
  (ids are kept in ascending order either way);
* their log-probabilities at the recipe's temperature tau, normalised over the full vocabulary, as ``float32``
  (exact), ``float16`` or ``uint8`` (per-token affine quantisation of the log-probabilities: offset and step in fp32);
* the log of the remaining (tail) mass at tau, fp32;
* the teacher's exact entropy at the entropy temperature tau', fp32: one float that keeps EA exact from a cache, since
  the EA weight needs H_T over the *whole* vocabulary, which a top-k cache loses.

With ``--top-k-mass M`` (an entropy-adaptive k) each token keeps only the fewest top entries whose mass at tau
reaches ``M``, at least ``--top-k-min`` and at most ``K``: many where the teacher is uncertain, few where it is sure.
Such a shard stores each token's entry count (int16) and one bit-packed stream of the kept ids and their values;
reading lays a token's entries out as a row of ``K`` slots whose unused ones are empty (id ``-1``, log-probability
``-inf``), which the loss treats as empty buckets (:func:`eakd_llm.loss.distillation.bucket_log_probs`). Measured on
SmolLM2 (docs/inference-engine.md) it saves ~14% of the bytes of a fixed k at a slightly lower error at the high end
and nothing at small budgets, so fixed k stays the default.

Storage: ``safetensors`` shards of a fixed number of examples each (memory-mapped when read), every shard holding its
own index (example key -> first token, token count) in its metadata, written to a temporary name and renamed when
complete. Examples are found by content: the key is a hash of the tokenized example (``input_ids`` and ``labels``),
never a step or a position. ``manifest.json`` records the teacher, tokenizer, tau, tau', k, vocabulary size, lengths,
the value format and a fingerprint of each split's tokenized data; a cache that does not match a recipe is refused
before training (:func:`check_manifest`). A killed build resumes: finished shards are kept, the rest recomputed.

Training reads it (``teacher_cache: DIR``) through :class:`CachedTeacherCollator`, which lays each batch's entries out
in the order of its loss positions as a :class:`~eakd_llm.loss.distillation.SparseTeacher`: no teacher is loaded, and
the loss takes the divergence on the top-k tokens plus one tail bucket (see
:func:`eakd_llm.loss.distillation.sparse_divergence`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..config.eakd_config import ConfigError, EAKDConfig
from ..loss.chunked import head_logits
from ..loss.distillation import IGNORE_INDEX, SparseTeacher, entropy_from_log_probs, fill_empty_slots, log_probs
from ..models.fingerprint import WeightsFingerprint, fingerprint_weights

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: the manifest binds the teacher's weights; 3: every byte of them (sha256 of each file)
VALUE_FORMATS = ("float32", "float16", "uint8")
MANIFEST = "manifest.json"
TEACHER_KEYS = ("teacher_ids", "teacher_log_probs", "teacher_log_tail", "teacher_entropy")


# ----------------------------------------------------------------------------------------------------------------
# Keys and fingerprints
# ----------------------------------------------------------------------------------------------------------------


def example_key(input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """The content key of a tokenized example (its tokens and its loss mask)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset) -> str:
    """A hash of a tokenized split: its examples' keys in order."""
    digest = hashlib.blake2b(digest_size=16)
    for example in dataset:
        digest.update(example_key(example["input_ids"], example["labels"]).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.blake2b(json.dumps(vocab, ensure_ascii=False).encode(), digest_size=16)
    digest.update(f"{tokenizer.bos_token_id}|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}".encode())
    return digest.hexdigest()


def resolved_teacher(path: str | None) -> str | None:
    """A local teacher folder as an absolute, symlink-free path; a hub id as it is. Recorded to say where a cache
    came from; what binds a cache to its teacher is the weights' fingerprint (a moved teacher is the same teacher)."""
    if path and os.path.exists(os.path.expanduser(path)):
        return os.path.realpath(os.path.expanduser(path))
    return path


def num_loss_tokens(labels: Sequence[int]) -> int:
    """Cached entries of an example: positions whose next token carries loss."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size)))


def uses_bitmap(k: int, vocab_size: int) -> bool:
    """Store the top-k ids as a V-bit membership bitmap when that is smaller than k packed ids."""
    return vocab_size <= k * id_bits(vocab_size)


def bytes_per_token(k: int, vocab_size: int, value_format: str) -> int:
    """Bytes one cached token takes: ids + values (+ uint8's offset and step) + tail + entropy."""
    ids = math.ceil(vocab_size / 8) if uses_bitmap(k, vocab_size) else math.ceil(k * id_bits(vocab_size) / 8)
    values = {"float32": 4 * k, "float16": 2 * k, "uint8": k + 8}[value_format]
    return ids + values + 8


def adaptive_bytes(entries: int, tokens: int, vocab_size: int, value_format: str) -> int:
    """Bytes an entropy-adaptive cache takes for ``tokens`` tokens holding ``entries`` entries in all: the id stream,
    the values, and per token its count (2) + tail + entropy (+ uint8's offset and step)."""
    values = {"float32": 4, "float16": 2, "uint8": 1}[value_format] * entries
    per_token = 2 + 8 + (8 if value_format == "uint8" else 0)
    return math.ceil(entries * id_bits(vocab_size) / 8) + values + per_token * tokens


def _id_bits_of(ids: np.ndarray, bits: int) -> np.ndarray:
    """``[...]`` ids -> ``[..., bits]`` uint8 bits, MSB first."""
    return ((ids.astype(np.int64)[..., None] >> np.arange(bits - 1, -1, -1, dtype=np.int64)) & 1).astype(np.uint8)


def _ids_of_bits(raw: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_id_bits_of`: ``[..., bits]`` bits -> ``[...]`` int64 ids."""
    bits = raw.shape[-1]
    return (raw.astype(np.int64) << np.arange(bits - 1, -1, -1, dtype=np.int64)).sum(-1)


def encode_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[N, k]`` ascending ids -> ``[N, bytes]`` uint8 (bitmap or fixed-width bit packing, MSB first)."""
    n, k = ids.shape
    if uses_bitmap(k, vocab_size):
        bitmap = np.zeros((n, vocab_size), dtype=np.uint8)
        np.put_along_axis(bitmap, ids.astype(np.int64), 1, axis=1)
        return np.packbits(bitmap, axis=1)
    bits = id_bits(vocab_size)
    return np.packbits(_id_bits_of(ids, bits).reshape(n, k * bits), axis=1)


def encode_id_stream(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[M]`` ids -> one uint8 stream, ``ceil(log2 V)`` bits each (MSB first): an adaptive cache's kept ids."""
    return np.packbits(_id_bits_of(ids, id_bits(vocab_size)).reshape(-1))


def decode_id_stream(stream, first: int, count: int, vocab_size: int) -> np.ndarray:
    """Ids ``first .. first + count - 1`` of an :func:`encode_id_stream` stream (an array or a safetensors slice:
    only the bytes holding them are read), ``[count]`` int64."""
    bits = id_bits(vocab_size)
    start, end = first * bits, (first + count) * bits
    chunk = np.asarray(stream[start // 8:math.ceil(end / 8)], dtype=np.uint8)
    return _ids_of_bits(np.unpackbits(chunk)[start % 8:start % 8 + count * bits].reshape(count, bits))


def decode_ids(packed: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """Inverse of :func:`encode_ids`: ``[N, k]`` int64 ascending ids."""
    n = packed.shape[0]
    if uses_bitmap(k, vocab_size):
        bitmap = np.unpackbits(packed, axis=1, count=vocab_size)
        return np.nonzero(bitmap)[1].reshape(n, k).astype(np.int64)
    bits = id_bits(vocab_size)
    return _ids_of_bits(np.unpackbits(packed, axis=1, count=k * bits).reshape(n, k, bits))


UINT8_LOG_PROB_RANGE = 50.0


def encode_values(values: torch.Tensor, value_format: str) -> dict[str, torch.Tensor]:
    """``[N, k]`` fp32 log-probabilities -> the stored tensors of ``value_format``."""
    if value_format == "float32":
        return {"values": values.float().contiguous()}
    if value_format == "float16":
        return {"values": values.half().contiguous()}
    high = values.max(-1).values
    # A -inf log-probability (a masked token, kept when k == V) would make the step infinite and decode to NaN: store
    # at most UINT8_LOG_PROB_RANGE nats below the row's top, a probability e^-50 of it, whose mass is negligible.
    values = torch.maximum(values, (high - UINT8_LOG_PROB_RANGE).unsqueeze(-1))
    step = ((high - values.min(-1).values) / 255).clamp(min=1e-12)
    codes = ((high.unsqueeze(-1) - values) / step.unsqueeze(-1)).round().clamp(0, 255).to(torch.uint8)
    return {"values": codes.contiguous(), "value_offset": high.float(), "value_step": step.float()}


def decode_values(stored: Mapping[str, torch.Tensor], value_format: str) -> torch.Tensor:
    if value_format != "uint8":
        return stored["values"].float()
    return stored["value_offset"].unsqueeze(-1) - stored["values"].float() * stored["value_step"].unsqueeze(-1)


def entry_counts(top_log_probs: torch.Tensor, mass: float, k_min: int) -> torch.Tensor:
    """An entropy-adaptive k: per row of descending top-k log-probabilities ``[N, k]``, the fewest leading entries
    whose probability mass reaches ``mass``, clamped to ``[k_min, k]`` (``[N]`` int64)."""
    below = top_log_probs.float().exp().cumsum(-1) < mass
    return (below.sum(-1) + 1).clamp(k_min, top_log_probs.shape[-1])


@torch.no_grad()
def teacher_entries(
    logits: torch.Tensor, k: int, temperature: float, entropy_temperature: float, mass: float | None = None,
    k_min: int = 1,
) -> dict[str, torch.Tensor]:
    """Top-k ids (ascending), their log-probabilities at tau, the log tail mass at tau and the entropy at tau' of
    ``[N, V]`` teacher logits (already cut to the shared vocabulary).

    ``mass``: keep per row only :func:`entry_counts` entries (an entropy-adaptive k); the rest of the row's ``k``
    slots are empty (id ``-1``, log-probability ``-inf``, after the kept ids) and their mass is in the tail.
    """
    log_p = log_probs(logits, temperature)
    top, ids = log_p.topk(k, dim=-1)
    vocab = logits.shape[-1]
    if mass is not None:  # drop the entries past each row's count; the dropped ids sort last, then become -1
        empty = torch.arange(k, device=ids.device) >= entry_counts(top, mass, k_min).unsqueeze(-1)
        ids, top = ids.masked_fill(empty, vocab), top.masked_fill(empty, float("-inf"))
    order = ids.argsort(-1)
    ids, top = ids.gather(-1, order), top.gather(-1, order)
    if mass is not None:
        ids = ids.masked_fill(ids == vocab, -1)
    if k < vocab:
        log_tail = log_p.scatter(-1, fill_empty_slots(ids), float("-inf")).logsumexp(-1)
    else:
        log_tail = torch.full((logits.shape[0],), float("-inf"))
    same = entropy_temperature == temperature
    entropy = entropy_from_log_probs(log_p if same else log_probs(logits, entropy_temperature))
    return {"ids": ids, "log_probs": top, "log_tail": log_tail.float(), "entropy": entropy.float()}


# ----------------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CacheManifest:
    """What a cache was built from and how it is stored (``manifest.json``)."""

    version: int
    teacher: str
    tokenizer: str
    temperature: float
    entropy_temperature: float
    top_k: int
    vocab_size: int
    teacher_vocab_size: int
    max_length: int
    max_prompt_length: int
    value_format: str
    shard_size: int
    teacher_dtype: str
    splits: dict[str, dict[str, Any]]  # split -> {"fingerprint", "examples", "tokens", "shards"}
    teacher_fingerprint: str | None = None  # fingerprint_weights() digest of the weights the cache was built from
    teacher_files: list[dict[str, Any]] | None = None  # its per-file record: later checks re-hash changed files only
    # what ran the teacher: "transformers" (its forward here) or "vllm" (a served teacher's final hidden states, the
    # head applied here); either way every entry, H_T included, comes from the full-vocabulary logits
    engine: str = "transformers"
    # an entropy-adaptive k (``None``: a fixed k): each token keeps the fewest entries whose mass at tau reaches
    # top_k_mass, at least top_k_min and at most top_k
    top_k_mass: float | None = None
    top_k_min: int | None = None

    @property
    def adaptive(self) -> bool:
        return self.top_k_mass is not None

    def describe(self) -> str:
        """What the cache holds, for logs: ``top-64 cache (float16, 264 B/token)``; an adaptive one with its bytes
        per token as built."""
        if not self.adaptive:
            return f"top-{self.top_k} cache ({self.value_format}, {self.bytes_per_token()} B/token)"
        built = [entry["bytes_per_token"] for entry in self.splits.values() if "bytes_per_token" in entry]
        size = f"{max(built)} B/token as built" if built else f"at most {self.bytes_per_token()} B/token"
        return (f"entropy-adaptive cache, k in [{self.top_k_min}, {self.top_k}] to mass {self.top_k_mass} "
                f"({self.value_format}, {size})")

    def bytes_per_token(self) -> int:
        """Bytes per token (with an adaptive k: at most, every token keeping ``top_k`` entries)."""
        if self.adaptive:
            return adaptive_bytes(self.top_k, 1, self.vocab_size, self.value_format)
        return bytes_per_token(self.top_k, self.vocab_size, self.value_format)

    def write(self, folder: str) -> None:
        path = os.path.join(folder, MANIFEST)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def read(cls, folder: str) -> CacheManifest:
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise ConfigError(f"teacher_cache: {folder!r} has no {MANIFEST}: not a cache written by eakd-llm "
                              "cache-teacher (or its build never started)")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise ConfigError(f"teacher_cache: {path} is not a valid cache manifest ({err})") from err
        for split, entry in manifest.splits.items():
            for shard in entry.get("shards", []):
                # Shards are files of the cache folder itself: a name with a folder in it ("../x", "/abs/x") would
                # read outside the cache.
                if not isinstance(shard, str) or shard in ("", ".", "..") or os.path.basename(shard) != shard or (
                        os.sep != "/" and "/" in shard):
                    raise ConfigError(f"teacher_cache: {path} names shard {shard!r} of split {split!r}, which is not "
                                      "a file name inside the cache folder; the manifest is damaged or not a cache's")
        return manifest


# Recorded in the manifest but not compared: where the teacher was (a moved teacher is the same teacher) and the
# per-file record that spares re-hashing unchanged files.
UNBOUND_FIELDS = ("teacher", "teacher_files")


def teacher_weights(config: EAKDConfig,
                    recorded: Sequence[Mapping[str, Any]] | None = None) -> WeightsFingerprint | None:
    """The fingerprint of the recipe's teacher weights (``None``: none on this machine)."""
    return fingerprint_weights(config.teacher_model_name_or_path, recorded)


def expected_manifest_fields(config: EAKDConfig, tokenizer, weights: WeightsFingerprint | None) -> dict[str, Any]:
    """The manifest fields a recipe requires of a cache (besides the data fingerprints), for the teacher
    ``weights``."""
    return {
        "version": CACHE_VERSION,
        "teacher": resolved_teacher(config.teacher_model_name_or_path),
        "teacher_fingerprint": weights.digest if weights else None,
        "teacher_files": weights.files if weights else None,
        "teacher_dtype": str(config.teacher_dtype or config.model_dtype),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "temperature": float(config.temperature),
        "entropy_temperature": float(config.entropy_temperature),
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
    }


def check_manifest(manifest: CacheManifest, config: EAKDConfig, tokenizer, datasets: Mapping[str, Any]) -> None:
    """Refuse a cache built for another teacher's weights, tokenizer, temperature, entropy temperature, lengths or
    data, naming every mismatch (:class:`ConfigError`). The teacher's files are re-hashed when their size or mtime
    differ from the manifest's record."""
    names = {"tokenizer": "tokenizer (its vocabulary or special tokens differ)", "version": "cache version",
             "teacher_dtype": "teacher_dtype", "teacher_fingerprint": "teacher weights"}
    problems = []
    teacher = config.teacher_model_name_or_path
    weights = teacher_weights(config, manifest.teacher_files) if teacher else None
    for key, wanted in expected_manifest_fields(config, tokenizer, weights).items():
        have = getattr(manifest, key)
        if key in UNBOUND_FIELDS or (key.startswith("teacher") and not teacher):
            continue  # training from the cache alone: the recipe need not name the teacher
        if have != wanted:
            if key == "tokenizer":
                shown = "built with another tokenizer"
            elif key == "teacher_fingerprint" and weights is None:
                shown = (f"{teacher!r} has no weights on this machine to check the cache against: fetch them, or "
                         "drop teacher_model_name_or_path to train from the cache alone")
            elif key == "teacher_fingerprint":
                shown = (f"the cache was built from other weights than {teacher!r} holds now (retrained or "
                         f"updated? changed: {', '.join(weights.rehashed) or 'the file list'}): rebuild it with "
                         "eakd-llm cache-teacher")
            else:
                shown = f"cache {have!r}, recipe {wanted!r}"
            problems.append(f"{names.get(key, key)}: {shown}")
    for split, dataset in datasets.items():
        entry = manifest.splits.get(split)
        if entry is None:
            problems.append(f"split {split!r}: not in the cache (cached: {', '.join(manifest.splits) or 'none'})")
        elif not entry.get("complete"):
            problems.append(f"split {split!r}: its build did not finish (run eakd-llm cache-teacher again to resume)")
        elif entry["fingerprint"] != data_fingerprint(dataset):
            problems.append(f"split {split!r}: the tokenized data differs from the cached data (dataset, format, "
                            "columns, max_train_samples or exclude_eval_prompts changed)")
    if problems:
        raise ConfigError(f"teacher_cache {config.teacher_cache!r} does not match this recipe: " + "; ".join(problems))


def check_cache_vocabulary(manifest: CacheManifest, student, tokenizer) -> None:
    """The student and the cached teacher must compare the same vocabulary (as :func:`shared_vocab_size` checks for a
    live teacher)."""
    from ..models.loading import _config_vocab

    student_vocab = _config_vocab(student)
    shared = min(student_vocab, manifest.teacher_vocab_size)
    if shared != manifest.vocab_size or shared < len(tokenizer):
        raise ConfigError(
            f"teacher_cache: built for a shared vocabulary of {manifest.vocab_size} (teacher "
            f"{manifest.teacher_vocab_size}), but this student has {student_vocab} (tokenizer {len(tokenizer)}): "
            "rebuild the cache for this student"
        )


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def write_shard(path: str, keys: list[tuple[str, int, int]], entries: list[dict[str, torch.Tensor]],
                manifest: CacheManifest) -> None:
    """One shard: the concatenated entries of its examples and their index, written atomically."""
    from safetensors.torch import save_file

    cat = {name: torch.cat([e[name] for e in entries]) if entries else torch.zeros(0)
           for name in ("ids", "log_probs", "log_tail", "entropy")}
    tensors = {"log_tail": cat["log_tail"].float().contiguous(), "entropy": cat["entropy"].float().contiguous()}
    if manifest.adaptive:
        ids, log_p = cat["ids"].reshape(-1, manifest.top_k), cat["log_probs"].reshape(-1, manifest.top_k)
        kept = ids >= 0
        # empty slots take their row's top value so that they never widen uint8's range; only kept values are stored
        values = encode_values(torch.where(kept, log_p, log_p.max(-1, keepdim=True).values),
                               manifest.value_format)
        values["values"] = values["values"][kept].contiguous()
        tensors.update(values, counts=kept.sum(-1).to(torch.int16),
                       ids=torch.from_numpy(encode_id_stream(ids[kept].numpy(), manifest.vocab_size)))
    else:
        tensors.update(encode_values(cat["log_probs"], manifest.value_format),
                       ids=torch.from_numpy(encode_ids(cat["ids"].numpy(), manifest.vocab_size)))
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"keys": json.dumps(keys)})
    os.replace(tmp, path)


def read_shard_index(path: str) -> list[tuple[str, int, int]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return [tuple(entry) for entry in json.loads(handle.metadata()["keys"])]
    except Exception as err:
        raise ConfigError(f"teacher_cache: shard {path} is corrupted or unreadable ({type(err).__name__}: {err}); "
                          "delete it and run eakd-llm cache-teacher again to rebuild it") from err


class TeacherCache:
    """Reads a cache: example key -> :class:`SparseTeacher` rows (shards memory-mapped, opened lazily per process)."""

    def __init__(self, folder: str, manifest: CacheManifest | None = None) -> None:
        self.folder = folder
        self.manifest = manifest or CacheManifest.read(folder)
        self.index: dict[str, tuple[str, int, int]] = {}
        for split, entry in self.manifest.splits.items():
            for shard in entry.get("shards", []):
                path = os.path.join(folder, shard)
                if not os.path.isfile(path):
                    raise ConfigError(f"teacher_cache: shard {shard} of split {split!r} is missing from {folder}; "
                                      "run eakd-llm cache-teacher again to rebuild it")
                for key, offset, count in read_shard_index(path):
                    self.index[key] = (path, offset, count)
        self._handles: dict[str, Any] = {}
        self._entry_starts: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}, "_entry_starts": {}}

    def _handle(self, path: str):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def entries(self, input_ids: Sequence[int], labels: Sequence[int]) -> SparseTeacher:
        key = example_key(input_ids, labels)
        if key not in self.index:
            raise KeyError(f"example {key} is not in teacher cache {self.folder} (the data changed after the build)")
        path, offset, count = self.index[key]
        k = self.manifest.top_k
        if count == 0:  # no loss token (an empty slice at a shard's end is out of range for safetensors)
            return SparseTeacher(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0), torch.zeros(0))
        handle = self._handle(path)
        per_token = ("value_offset", "value_step") if self.manifest.value_format == "uint8" else ()
        if not self.manifest.adaptive:
            per_token += ("values",)
        stored = {name: handle.get_slice(name)[offset:offset + count] for name in per_token}
        vocab = self.manifest.vocab_size
        if self.manifest.adaptive:
            ids, log_p = self._adaptive_rows(path, offset, count, stored)
        else:
            ids = torch.from_numpy(decode_ids(handle.get_slice("ids")[offset:offset + count].numpy(), k, vocab))
            log_p = decode_values(stored, self.manifest.value_format)
        return SparseTeacher(
            ids=ids,
            log_probs=log_p,
            log_tail=handle.get_slice("log_tail")[offset:offset + count].float(),
            entropy=handle.get_slice("entropy")[offset:offset + count].float(),
        )

    def _adaptive_rows(self, path: str, offset: int, count: int,
                       stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``offset .. offset + count - 1`` of an adaptive shard as ``[count, k]`` rows with empty slots."""
        handle = self._handle(path)
        if path not in self._entry_starts:  # where each token's entries begin in the shard's streams
            counts = handle.get_slice("counts")[:].numpy().astype(np.int64)
            self._entry_starts[path] = np.concatenate([[0], np.cumsum(counts)])
        starts = self._entry_starts[path][offset:offset + count + 1]
        first, entries = int(starts[0]), int(starts[-1] - starts[0])
        kept = torch.arange(self.manifest.top_k) < torch.from_numpy(np.diff(starts)).unsqueeze(-1)
        ids = torch.full(kept.shape, -1, dtype=torch.long)
        ids[kept] = torch.from_numpy(decode_id_stream(handle.get_slice("ids"), first, entries,
                                                      self.manifest.vocab_size))
        codes = handle.get_slice("values")[first:first + entries]
        dense = torch.zeros(kept.shape, dtype=codes.dtype)
        dense[kept] = codes
        log_p = decode_values({**stored, "values": dense}, self.manifest.value_format)
        return ids, log_p.masked_fill(~kept, float("-inf"))


@dataclass
class CachedTeacherCollator:
    """The run's collator plus each batch's cached teacher entries, in the order of its loss positions
    (``labels[:, 1:] != -100``, row-major; a packed batch's documents in their packed order)."""

    collator: Callable
    cache: TeacherCache

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        order = batch.pop("example_order").tolist() if "example_order" in batch else range(len(features))
        parts = [self.cache.entries(features[i]["input_ids"], features[i]["labels"]) for i in order]
        for name, key in zip(("ids", "log_probs", "log_tail", "entropy"), TEACHER_KEYS):
            batch[key] = torch.cat([getattr(part, name) for part in parts])
        return batch


def sparse_teacher_of(batch: Mapping[str, torch.Tensor]) -> SparseTeacher | None:
    """The :class:`SparseTeacher` a :class:`CachedTeacherCollator` put in a batch (``None`` if it has none)."""
    if TEACHER_KEYS[0] not in batch:
        return None
    return SparseTeacher(*(batch[key] for key in TEACHER_KEYS))


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def _shard_ranges(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_examples)) for start in range(0, num_examples, shard_size)]


def _batches(dataset, start: int, end: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    for first in range(start, end, batch_size):
        yield [dataset[i] for i in range(first, min(first + batch_size, end))]


@torch.no_grad()
def shard_entries(
    teacher, examples: list[dict[str, Any]], collator, manifest: CacheManifest, device: torch.device,
    chunk_size: int = 1024,
) -> list[dict[str, torch.Tensor]]:
    """Entries of a batch of examples, one dict per example (CPU tensors). ``teacher``: a live model (its sharded head
    gathered once for the batch, after the forward, as the fused loss does) or a
    :class:`~eakd_llm.teacher.served.ServedTeacher` (hidden states from the server, the head applied here). The
    hidden states are projected ``chunk_size`` tokens at a time, so full ``[N, V]`` logits of the batch are never
    held."""
    from ..models.loading import model_inputs

    batch = collator(examples)
    inputs = {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}
    loss_positions = inputs["labels"][:, 1:] != IGNORE_INDEX
    with _hidden_and_head(teacher, inputs, model_inputs(inputs)) as (hidden, weight, bias, scale, softcap):
        hidden = hidden[:, :-1][loss_positions]
        parts = []
        for start in range(0, hidden.shape[0], chunk_size):
            logits = head_logits(hidden[start:start + chunk_size], weight, bias, scale, softcap, manifest.vocab_size)
            parts.append({name: value.cpu() for name, value in teacher_entries(
                logits, manifest.top_k, manifest.temperature, manifest.entropy_temperature, manifest.top_k_mass,
                manifest.top_k_min or 1).items()})
    merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]} if parts else None
    if merged is None:  # no example of the batch has a loss token
        merged = {"ids": torch.zeros(0, manifest.top_k, dtype=torch.long), "log_probs": torch.zeros(0, manifest.top_k),
                  "log_tail": torch.zeros(0), "entropy": torch.zeros(0)}
    out, offset = [], 0
    for example in examples:
        count = num_loss_tokens(example["labels"])
        out.append({name: value[offset:offset + count] for name, value in merged.items()})
        offset += count
    return out


@contextlib.contextmanager
def _hidden_and_head(teacher, inputs: Mapping[str, torch.Tensor], forward_inputs: Mapping[str, torch.Tensor]):
    """``(hidden [B, T, d], weight, bias, scale, softcap)`` of a batch, from a live teacher or a served one."""
    from .served import ServedTeacher

    if isinstance(teacher, ServedTeacher):
        hidden = teacher.hidden(inputs)
        weight, bias = teacher._head(hidden.device)
        yield hidden, weight, bias, teacher.scale, teacher.softcap
        return
    from ..models.loading import final_hidden_states, logit_transform
    from ..models.sharding import full_head, unwrap_causal_lm

    hidden = final_hidden_states(teacher, **forward_inputs)
    causal_lm = unwrap_causal_lm(teacher)
    scale, softcap = logit_transform(causal_lm)
    with full_head(causal_lm.get_output_embeddings()) as (weight, bias):
        yield hidden, weight, bias, scale, softcap


def build_cache(
    config: EAKDConfig,
    output_dir: str,
    top_k: int,
    value_format: str = "float16",
    shard_size: int = 256,
    batch_size: int | None = None,
    show_progress: bool = True,
    server: str | None = None,
    top_k_mass: float | None = None,
    top_k_min: int | None = None,
) -> CacheManifest:
    """Run the recipe's teacher once over its training (and evaluation) split and write the cache to ``output_dir``.

    Every process of an ``accelerate launch`` takes its share of the shards (round robin); with a sharded teacher
    (ZeRO-3, FSDP) the processes run their forwards in lockstep, filling with repeats where they have fewer. A folder
    already holding a cache for other settings is refused (nothing is overwritten); one holding the same settings is
    resumed: finished shards are kept.

    ``server``: the URL of a teacher served by an inference engine (``eakd-llm serve-teacher``): its final hidden
    states are asked for and projected through the teacher's head here (no teacher model is loaded), the manifest
    records ``engine: vllm``; the entries are the same as a transformers forward's within float error.

    ``top_k_mass``: an entropy-adaptive k: each token keeps the fewest entries whose mass at tau reaches it, at least
    ``top_k_min`` (default 1) and at most ``top_k`` (which must then be below V: the rest of the mass needs the tail).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    from ..data.dataset import DistillationCollator, build_dataset, load_split
    from ..models.loading import load_tokenizer
    from ..models.sharding import place_teacher
    from .served import connect_served_teacher

    if value_format not in VALUE_FORMATS:
        raise ConfigError(f"--value-format {value_format!r} is not allowed; choose one of: {', '.join(VALUE_FORMATS)}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if not config.teacher_model_name_or_path:
        raise ConfigError("cache-teacher needs teacher_model_name_or_path in the recipe")
    if config.teacher_cache:
        raise ConfigError("cache-teacher builds a cache: drop teacher_cache from the recipe for this command")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output {output_dir!r} exists and is not a folder")
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path, config.trust_remote_code,
                               key="tokenizer_name_or_path" if config.tokenizer_name_or_path else "model_name_or_path")
    teacher_vocab = AutoConfig.from_pretrained(config.teacher_model_name_or_path,
                                               trust_remote_code=config.trust_remote_code).get_text_config().vocab_size
    student_vocab = AutoConfig.from_pretrained(config.model_name_or_path,
                                               trust_remote_code=config.trust_remote_code).get_text_config().vocab_size
    vocab = min(teacher_vocab, student_vocab)
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k must be in [1, V] = [1, {vocab}] (the shared vocabulary), got {top_k}")
    _check_adaptive(top_k, top_k_mass, top_k_min, vocab)

    splits = {config.dataset_train_split: config.max_train_samples}
    if config.dataset_eval_split:
        splits[config.dataset_eval_split] = config.max_eval_samples
    datasets = {split: build_dataset(load_split(config.dataset_name, split, config.dataset_config), config, tokenizer,
                                     split=split, max_samples=limit) for split, limit in splits.items()}
    existing = CacheManifest.read(output_dir) if os.path.isfile(os.path.join(output_dir, MANIFEST)) else None
    teacher = connect_served_teacher(config, tokenizer, server) if server else None
    weights = teacher_weights(config, existing.teacher_files if existing else None)
    if weights is None and server:
        raise ConfigError(f"teacher_model_name_or_path {config.teacher_model_name_or_path!r} must be a local folder "
                          "with a served teacher: its head and weights' fingerprint are read from it")
    if weights is None:  # a hub id not downloaded yet: load (download) it first, then fingerprint what arrived
        teacher = _load_teacher(config)
        weights = teacher_weights(config)
    manifest = CacheManifest(
        **expected_manifest_fields(config, tokenizer, weights), top_k=top_k, vocab_size=vocab,
        teacher_vocab_size=teacher_vocab,
        value_format=value_format, shard_size=shard_size, engine="vllm" if server else "transformers",
        top_k_mass=None if top_k_mass is None else float(top_k_mass),
        top_k_min=None if top_k_mass is None else int(1 if top_k_min is None else top_k_min),
        splits={split: {"fingerprint": data_fingerprint(ds), "examples": len(ds),
                        "tokens": sum(num_loss_tokens(labels) for labels in ds["labels"]),
                        "shards": [shard_name(split, i) for i in range(len(_shard_ranges(len(ds), shard_size)))],
                        "complete": False} for split, ds in datasets.items()},
    )
    if existing is not None:
        unbound = dict.fromkeys((*UNBOUND_FIELDS, "splits"))
        mine = {**asdict(manifest), **unbound}
        theirs = {**asdict(existing), **unbound}
        differ = [key for key in mine if mine[key] != theirs[key]]
        differ += [f"split {s}" for s in manifest.splits
                   if existing.splits.get(s, {}).get("fingerprint") != manifest.splits[s]["fingerprint"]]
        if differ:
            raise ConfigError(f"--output {output_dir!r} already holds a teacher cache built with other settings "
                              f"({', '.join(differ)}); nothing was overwritten: choose another --output folder")
        for split, entry in existing.splits.items():
            if split not in manifest.splits:
                manifest.splits[split] = entry

    accelerator = Accelerator()
    main = accelerator.is_main_process
    total_tokens = sum(manifest.splits[s]["tokens"] for s in datasets)
    if main:
        os.makedirs(output_dir, exist_ok=True)
        size = total_tokens * manifest.bytes_per_token()
        k_text = (f"k={top_k}" if not manifest.adaptive else
                  f"adaptive k in [{manifest.top_k_min}, {top_k}] to mass {manifest.top_k_mass}")
        print(f"teacher cache: {sum(len(d) for d in datasets.values())} examples, {total_tokens} response tokens, "
              f"{k_text}, {value_format}: {'at most ' if manifest.adaptive else ''}{manifest.bytes_per_token()} "
              f"B/token, {'at most' if manifest.adaptive else 'about'} {size / 2**20:.1f} MiB -> {output_dir}",
              flush=True)
        manifest.write(output_dir)
    accelerator.wait_for_everyone()

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if server:
        placement, lockstep = f"served by {server}", False
    else:
        teacher = teacher or _load_teacher(config)
        teacher, placement = place_teacher(teacher, accelerator, config, deepspeed, fsdp)
        lockstep = deepspeed or fsdp  # sharded parameters: every process must take part in every forward
    collator = DistillationCollator(tokenizer.pad_token_id)
    batch_size = batch_size or config.per_device_eval_batch_size
    world, rank = accelerator.num_processes, accelerator.process_index
    logger.info("cache-teacher: teacher %s on %s, %d process(es)", placement, accelerator.device, world)

    plan = []  # per round, for this process: (split, its shard's example span or None, path, work to do, steps)
    for split, dataset in datasets.items():
        ranges = _shard_ranges(len(dataset), shard_size)
        for first in range(0, len(ranges), world):
            span = ranges[first + rank] if first + rank < len(ranges) else None
            path = os.path.join(output_dir, shard_name(split, first + rank)) if span else None
            todo = span is not None and not _shard_complete(path, dataset, span)
            steps = max(math.ceil((end - start) / batch_size) for start, end in ranges[first:first + world])
            plan.append((split, span, path, todo, steps))
    try:
        _build_shards(plan, datasets, teacher, collator, manifest, accelerator, batch_size, lockstep,
                      show_progress and main)
    finally:
        if server:
            teacher.close()
    accelerator.wait_for_everyone()
    if main:
        for split, dataset in datasets.items():
            ranges = _shard_ranges(len(dataset), shard_size)
            paths = [os.path.join(output_dir, shard_name(split, i)) for i in range(len(ranges))]
            manifest.splits[split]["complete"] = all(_shard_complete(p, dataset, r) for p, r in zip(paths, ranges))
            if manifest.adaptive and manifest.splits[split]["complete"]:
                _record_entries(manifest, split, paths)
        manifest.write(output_dir)
    accelerator.wait_for_everyone()
    return CacheManifest.read(output_dir)  # what the main process recorded, on every process


def _build_shards(plan, datasets, teacher, collator, manifest, accelerator, batch_size: int, lockstep: bool,
                  show_progress: bool) -> None:
    """Every shard of this process's plan that is not complete yet, written as its examples' entries."""
    from tqdm.auto import tqdm

    work = sum(span[1] - span[0] for _, span, _, todo, _ in plan if todo)
    progress = tqdm(total=work, desc="Caching teacher", unit="ex", disable=not show_progress)
    for split, span, path, todo, steps in plan:
        dataset = datasets[split]
        batches = list(_batches(dataset, *span, batch_size)) if todo else []
        keys, entries, done = [], [], 0
        for step in range(steps if lockstep else len(batches)):
            examples = batches[step] if step < len(batches) else [dataset[0]]  # lockstep filler, discarded
            result = shard_entries(teacher, examples, collator, manifest, accelerator.device)
            if step >= len(batches):
                continue
            for example, entry in zip(examples, result):
                count = entry["entropy"].shape[0]
                keys.append((example_key(example["input_ids"], example["labels"]), done, count))
                entries.append(entry)
                done += count
            progress.update(len(examples))
        if todo:
            write_shard(path, keys, entries, manifest)
    progress.close()


def _check_adaptive(top_k: int, mass: float | None, k_min: int | None, vocab: int) -> None:
    if mass is None:
        if k_min is not None:
            raise ConfigError("--top-k-min is the floor of an entropy-adaptive k: use it with --top-k-mass")
        return
    if not 0 < mass <= 1:
        raise ConfigError(f"--top-k-mass must be in (0, 1] (the top-k probability mass to keep per token), got {mass}")
    if top_k >= vocab:
        raise ConfigError(f"--top-k-mass needs --top-k (its ceiling) below V = {vocab}: the mass it drops goes to the "
                          f"tail bucket; got --top-k {top_k}")
    if top_k > 32767:
        raise ConfigError(f"--top-k is at most 32767 with --top-k-mass (entry counts are int16), got {top_k}")
    if k_min is not None and not 1 <= k_min <= top_k:
        raise ConfigError(f"--top-k-min must be in [1, --top-k] = [1, {top_k}], got {k_min}")


def _record_entries(manifest: CacheManifest, split: str, paths: list[str]) -> None:
    """An adaptive split's entry count and bytes per token, as built (``entries``, ``bytes_per_token``)."""
    from safetensors import safe_open

    entries = 0
    for path in paths:
        with safe_open(path, framework="pt") as handle:
            entries += int(handle.get_slice("counts")[:].long().sum())
    tokens = manifest.splits[split]["tokens"]
    manifest.splits[split]["entries"] = entries
    manifest.splits[split]["bytes_per_token"] = round(
        adaptive_bytes(entries, tokens, manifest.vocab_size, manifest.value_format) / max(tokens, 1), 1)
    print(f"teacher cache: split {split!r}: {entries / max(tokens, 1):.1f} entries per token on average, "
          f"{manifest.splits[split]['bytes_per_token']} B/token (a fixed k={manifest.top_k}: "
          f"{bytes_per_token(manifest.top_k, manifest.vocab_size, manifest.value_format)} B/token)", flush=True)


def _load_teacher(config: EAKDConfig):
    from ..models.loading import load_causal_lm

    return load_causal_lm(config.teacher_model_name_or_path, config.teacher_dtype or config.model_dtype,
                          config.trust_remote_code, config.attn_implementation, key="teacher_model_name_or_path")


def _shard_complete(path: str, dataset, span: tuple[int, int]) -> bool:
    """A finished shard holds exactly the keys of its examples (a partial or foreign one is rebuilt)."""
    if not os.path.isfile(path):
        return False
    try:
        keys = [key for key, _, _ in read_shard_index(path)]
    except ConfigError:
        return False
    wanted = [example_key(dataset[i]["input_ids"], dataset[i]["labels"]) for i in range(*span)]
    return keys == wanted
