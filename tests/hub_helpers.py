"""A Hugging Face hub cache entry laid out on disk, for tests of hub ids without a network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fake_hub_snapshot(source: str, hub: Path, repo: str) -> Path:
    """A hub cache entry for ``repo`` as huggingface_hub lays it out (``refs/main`` naming a snapshot folder), holding
    every file of the checkpoint folder ``source`` but its weights: what a first run finds before it downloads
    them. Returns the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = hub / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    for name in os.listdir(source):
        if name != "model.safetensors":
            shutil.copy(os.path.join(source, name), snapshot / name)
    return snapshot
