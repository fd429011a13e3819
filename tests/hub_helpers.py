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


def hub_teacher_arriving_on_load(monkeypatch, source: str, hub: Path, repo: str = "local/tiny-teacher") -> str:
    """``repo`` as a hub id on this machine whose weights are not there yet: the hub cache points at ``hub`` (offline)
    and loading the model copies ``source``'s weights into the snapshot first (the download ``from_pretrained`` would
    do), then loads it for real. Returns the hub id."""
    import huggingface_hub

    import eakd_llm.models.loading as loading

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = fake_hub_snapshot(source, hub, repo)
    real = loading.load_causal_lm

    def downloading(name, *args, **kwargs):
        if name == repo and not (snapshot / "model.safetensors").exists():
            shutil.copy(os.path.join(source, "model.safetensors"), snapshot / "model.safetensors")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load_causal_lm", downloading)
    return repo
