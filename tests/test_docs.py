"""The documentation holds together: README.md stays short, its fresh-machine commands stay as they are, and every
relative link in README.md and docs/**/*.md reaches an existing file and, for ``page.md#anchor``, an existing heading
(GitHub's slug rule)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 12288  # bytes: the README is the entry page, the details live in docs/
MAIN_JOB = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]" '
            "&& eakd-llm demo")
TEST_JOB = "bash .ci/run"

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text lower-cased, every character that is not a
    letter, digit, underscore, hyphen or space dropped, each space made a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed: links and headings inside them are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The heading anchors of a page, duplicates numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(without_code(page.read_text(encoding="utf-8"))) if not SCHEME.match(t)]


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """Each relative link of ``page`` that names a missing file, leaves ``root`` or names a missing heading."""
    problems = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page.resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def test_readme_fits_its_budget():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move details into docs/"


@pytest.mark.parametrize("page", [str(p.relative_to(REPO)) for p in doc_pages()])
def test_every_relative_link_resolves(page):
    assert broken_links(REPO / page) == []


def test_every_docs_page_is_linked_from_somewhere():
    linked = set()
    for page in doc_pages():
        for target in relative_links(page):
            path_part = target.partition("#")[0]
            if path_part:
                linked.add((page.parent / unquote(path_part)).resolve())
    orphans = [str(p.relative_to(REPO)) for p in doc_pages()[1:] if p.resolve() not in linked]
    assert orphans == []


def test_github_slug_rule():
    # anchors GitHub gives these headings (github-slugger)
    assert github_slug("Quick start (fresh machine, offline, CPU)") == "quick-start-fresh-machine-offline-cpu"
    assert github_slug("Scale or adaptivity: `ea_normalize`, `ea_formula`, `kd_scale`") == (
        "scale-or-adaptivity-ea_normalize-ea_formula-kd_scale")
    assert github_slug("τ′ and the cross-entropy term") == "τ-and-the-cross-entropy-term"
    assert github_slug("Paired differences (A − B)") == "paired-differences-a--b"
    assert github_slug("See [the docs](docs/x.md) **now**") == "see-the-docs-now"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#two-words) [dup](a.md#two-words-1) [self](#here) [web](https://example.org/x.md#nope)\n"
        "# Here\n\n```\n[in code](missing.md)\n```\n`[inline](missing.md)`\n"
        "[gone](missing.md) [bad anchor](a.md#three-words) [up](../../outside.md)\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "a.md#three-words", "../../outside.md"]


def test_readme_keeps_the_fresh_machine_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert f"{MAIN_JOB}\n" in blocks and f"{TEST_JOB}\n" in blocks
    # what the two commands rely on
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"]["eakd-llm"] == "eakd_llm.cli:main"
    assert "test" in project["optional-dependencies"]
    from eakd_llm.cli import COMMANDS

    assert "demo" in COMMANDS
    ci = REPO / ".ci" / "run"
    assert ci.is_file() and ci.stat().st_mode & 0o111, ".ci/run must exist and be executable"
