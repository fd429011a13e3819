"""A checkpoint's weights, bound byte for byte: the sha256 of ``config.json`` and of every weight file.

A teacher cache and a folder of teacher answers hold what one set of weights computed, so they record the weights'
fingerprint and refuse other weights later. Every byte counts: bias-only or norm-only tuning, or a LoRA merged into a
few projections and saved into the same folder, changes a few kilobytes of a multi-gigabyte file, which sampled
blocks miss.

Hashing is streamed (sha256 runs at roughly 0.5-2 GB/s on one core: seconds per GB, minutes for a 70B teacher), so
each fingerprint comes with a record of its files (name, size, mtime in ns, sha256). A later check given that record
re-hashes only the files whose size or mtime changed and reuses the recorded hash of the others; writing a file
changes its mtime, so a changed file is always re-hashed and caught. The fingerprint itself covers names, sizes and
hashes only, so a copy of the same weights elsewhere (other mtimes, another path) has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_READ_BLOCK = 1 << 24  # 16 MiB


def local_checkpoint(path: str | None) -> str | None:
    """The folder holding ``path``'s files on this machine: the folder itself, or a hub id's cached snapshot (its
    folder name is the commit); ``None`` when nothing is local."""
    if not path:
        return None
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return os.path.realpath(expanded)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # not cached, or not a hub id
        return None


def file_sha256(path: str) -> str:
    """sha256 of a whole file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class WeightsFingerprint:
    """``digest``: sha256 over every file's name, size and sha256; ``files``: one record per file (``name``,
    ``size``, ``mtime_ns``, ``sha256``) for the next check; ``rehashed``: the files this check read."""

    digest: str
    files: list[dict[str, Any]]
    rehashed: list[str] = field(default_factory=list)


def fingerprint_weights(path: str | None,
                        recorded: Sequence[Mapping[str, Any]] | None = None) -> WeightsFingerprint | None:
    """The fingerprint of the weights ``path`` names (a folder or a cached hub id), or ``None`` when no weight file
    is on this machine yet (a hub id not downloaded). ``recorded``: the ``files`` of an earlier fingerprint; a file
    whose name, size and mtime match its record keeps the recorded sha256, any other file is hashed."""
    folder = local_checkpoint(path)
    if folder is None:
        return None
    names = sorted(n for n in os.listdir(folder) if n == "config.json" or n.endswith(WEIGHT_SUFFIXES))
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        return None
    known = {r["name"]: r for r in recorded or ()}
    files, rehashed = [], []
    digest = hashlib.sha256()
    for name in names:
        stat = os.stat(os.path.join(folder, name))  # through a hub snapshot's links: the blob
        record = known.get(name)
        if record and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            sha = record["sha256"]
        else:
            sha = file_sha256(os.path.join(folder, name))
            rehashed.append(name)
        files.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha})
        digest.update(f"{name}:{stat.st_size}:{sha}\n".encode())
    return WeightsFingerprint(digest.hexdigest()[:32], files, rehashed)
