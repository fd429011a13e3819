"""Resume files written whole: the content, no temporary file left behind, and the permissions open() would give."""

from __future__ import annotations

import os

import pytest

from eakd_llm._atomic import write_text_atomic


def test_written_whole_with_the_modes_of_open(tmp_path):
    path = tmp_path / "settings.json"
    write_text_atomic(path, "one\u2028two\n")
    assert path.read_text(encoding="utf-8") == "one\u2028two\n"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777  # not mkstemp's owner-only 0600
    write_text_atomic(path, "replaced")
    assert path.read_text() == "replaced" and sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt",
                                                                                          "settings.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    write_text_atomic(path, "old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
