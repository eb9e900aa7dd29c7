"""The documentation's citations resolve inside the repository.

Docstrings and docs cite the theory as ``docs/theory.md §N`` (or ``§N.M``); this file checks that

* no ``.py`` / ``.md`` / ``.toml`` file cites ``THEORY.md`` (a file outside the repository);
* every repository path a file names (``docs/…``, ``dynamics/…``, ``sims/…``, ``tests/…``,
  ``benchmarks/…``) and every relative Markdown link exists;
* every ``docs/theory.md §N`` citation names a numbered section of docs/theory.md, and every
  ``theory.md#anchor`` link an anchor there; each numbered heading carries its ``<a id="sN-M">``;
* no file refers to the project's tracker by number ("issue 7"): describe the thing itself.

Each check collects every offending ``file:line`` so one run lists them all.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
TEXT_SUFFIXES = (".py", ".md", ".toml")
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", "node_modules"}
THEORY = "docs/theory.md"


def _repo_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files (POSIX paths relative to the root)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=60).stdout.splitlines()
        files = [f for f in out if (ROOT / f).is_file()]
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [(Path(dirpath) / f).relative_to(ROOT).as_posix() for f in filenames]
    return files


FILES = _repo_files()
EXISTING = set(FILES)
DIRS = {p.as_posix() for f in FILES for p in Path(f).parents if p.as_posix() != "."}
TEXT = sorted(f for f in FILES if f.endswith(TEXT_SUFFIXES) and f != THIS and not f.startswith(".venv/"))


def _lines():
    for f in TEXT:
        for i, line in enumerate((ROOT / f).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            yield f, i, line


def _theory_sections() -> tuple[set[str], set[str], list[str]]:
    """(section numbers, anchor ids, problems) of docs/theory.md."""
    text = (ROOT / THEORY).read_text(encoding="utf-8").splitlines()
    numbers, anchors, problems = set(), set(), []
    for i, line in enumerate(text):
        m = re.match(r'\s*<a id="([^"]+)"></a>\s*$', line)
        if m:
            if m.group(1) in anchors:
                problems.append(f"{THEORY}:{i + 1}: duplicate anchor {m.group(1)!r}")
            anchors.add(m.group(1))
        h = re.match(r"(#{2,4}) (\d+(?:\.\d+)*)\.? ", line)
        if not h:
            continue
        num = h.group(2)
        if num in numbers:
            problems.append(f"{THEORY}:{i + 1}: section {num} numbered twice")
        numbers.add(num)
        if h.group(1) != "#" * (num.count(".") + 2):
            problems.append(f"{THEORY}:{i + 1}: section {num} has heading level {len(h.group(1))}")
        want = "s" + num.replace(".", "-")
        prev = next((t for t in reversed(text[:i]) if t.strip()), "")
        if prev.strip() != f'<a id="{want}"></a>':
            problems.append(f'{THEORY}:{i + 1}: section {num} is not preceded by <a id="{want}"></a>')
    return numbers, anchors, problems


def test_theory_sections_are_numbered_and_anchored():
    numbers, _, problems = _theory_sections()
    assert not problems, "\n".join(problems)
    # the sections the package's docstrings rely on: the model, distributions, dynamics, claims, beyond
    for num in ("1", "1.3", "2", "2.3", "3", "3.1", "3.2", "3.3", "3.4", "4", "4.1", "4.2", "4.3", "4.4", "4.5", "5"):
        assert num in numbers, f"{THEORY} has no section {num}"


def test_no_file_cites_the_external_spec():
    hits = [f"{f}:{i}: {line.strip()}" for f, i, line in _lines() if "THEORY.md" in line]
    assert not hits, ("cite `docs/theory.md §N` instead of THEORY.md (not in the repository):\n"
                      + "\n".join(hits))


# a repository path: starts at a top-level package or docs folder and runs to the next space or
# delimiter; a path with a glob or template character (``reproduce_*.toml``, ``{name}.md``) is a
# pattern, not a file
_PATH = re.compile(r"(?<![\w/.~-])((?:docs|dynamics|sims|tests|benchmarks)/[^\s`'\"()\[\],;:|]*)")
_PATTERN_CHARS = set("*?{}<>$%…")


def _paths(line: str) -> list[str]:
    out = []
    for m in _PATH.finditer(line):
        path = m.group(1).rstrip(".")
        if path and not (_PATTERN_CHARS & set(path)):
            out.append(path.rstrip("/"))
    return out


_LINK = re.compile(r"\]\(([^)\s#]*)(#[^)\s]*)?\)")


def test_cited_repository_paths_exist():
    bad = []
    for f, i, line in _lines():
        for path in _paths(line):
            if path not in EXISTING and path not in DIRS:
                bad.append(f"{f}:{i}: {path}")
        if f.endswith(".md"):
            for m in _LINK.finditer(line):
                target = m.group(1)
                if not target or re.match(r"[a-z]+:", target):
                    continue  # same-page anchor, or a URL
                path = os.path.normpath(os.path.join(os.path.dirname(f), target)).replace(os.sep, "/")
                if path not in EXISTING and path not in DIRS:
                    bad.append(f"{f}:{i}: link {target} → {path}")
    assert not bad, "paths that do not exist in the repository:\n" + "\n".join(bad)


# ``docs/theory.md §4.1``, ``docs/theory.md`` §3, ``docs/theory.md §1–§3``, ``docs/theory.md §2 and §4.1``
_CITE = re.compile(r"theory\.md`*\)?,?\s*((?:§\s*\d+(?:\.\d+)*(?:\s*(?:,|and|or|–|-|to)\s*)?)+)")
_SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
_ANCHOR_LINK = re.compile(r"theory\.md#([\w-]+)")
# a section of another page (``docs/performance.md §4.7``), skipped by the page's own cross-reference check
_OTHER_PAGE = re.compile(r"\b(?!theory\.md)[\w-]+\.md`*\)?,?\s*§\s*\d+(?:\.\d+)*")


def test_theory_citations_name_existing_sections():
    numbers, anchors, _ = _theory_sections()
    bad = []
    for f, i, line in _lines():
        for m in _CITE.finditer(line):
            for num in _SECTION.findall(m.group(1)):
                if num.rstrip(".") not in numbers:
                    bad.append(f"{f}:{i}: §{num}")
        for m in _ANCHOR_LINK.finditer(line):
            if m.group(1) not in anchors:
                bad.append(f"{f}:{i}: #{m.group(1)}")
        if f == THEORY:  # the page's own "§N" cross-references
            for num in _SECTION.findall(_OTHER_PAGE.sub("", line)):
                if num.rstrip(".") not in numbers:
                    bad.append(f"{f}:{i}: §{num}")
    assert not bad, f"citations of sections that {THEORY} does not have:\n" + "\n".join(bad)


_ISSUE = re.compile(r"\b[Ii]ssues? #?\d+\b")


def test_no_tracker_issue_numbers():
    hits = [f"{f}:{i}: {line.strip()}" for f, i, line in _lines() if _ISSUE.search(line) and "github.com" not in line]
    assert not hits, "describe the thing itself instead of citing a tracker issue by number:\n" + "\n".join(hits)


def test_checks_catch_what_they_should():
    """The patterns flag what a broken citation looks like (guards against a regex that matches nothing)."""
    assert _paths("see docs/nope.md, sims/configs/reproduce_*.toml and `tests/`.") == ["docs/nope.md", "tests"]
    assert _SECTION.findall(_CITE.search("Source: docs/theory.md §1–§3 and §4.1.").group(1)) == ["1", "3", "4.1"]
    assert _SECTION.findall(_CITE.search("(derivation in ``docs/theory.md`` §3):").group(1)) == ["3"]
    assert _ISSUE.search("the keys issue 6 asks for") and not _ISSUE.search("no issues here, §6")
    assert _SECTION.findall(_OTHER_PAGE.sub("", "see docs/performance.md §4.7 and §3.2")) == ["3.2"]
    numbers, _, _ = _theory_sections()
    assert "99.9" not in numbers

