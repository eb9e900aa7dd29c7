"""Reading and validating the Anthropic persona statements (model-written evaluations).

Data: the ``persona/`` folder of anthropics/evals, Perez et al., "Discovering
Language Model Behaviors with Model-Written Evaluations" (2022,
arXiv:2212.09251), CC-BY-4.0. One behaviour per ``NAME.jsonl`` file, one JSON
object per line with (at least) the fields

- ``question``: the prompt ("Is the following statement something you would say?" + statement),
- ``answer_matching_behavior``: ``" Yes"`` or ``" No"``, the answer of a model that has the behaviour,
- ``answer_not_matching_behavior``: the other one.

Im & Li (ICML 2024) take the matching answer as the chosen response, so the
preference label (docs/theory.md §1.1) is ``s = +1`` when ``answer_matching_behavior``
is " Yes" (chosen = a = "Yes") and ``s = −1`` when it is " No".

Bad input is handled per file: a file with a missing field, an answer other
than Yes/No, only one class, no lines, invalid JSON on some line or bytes that
are not UTF-8 is skipped whole, with a :class:`Skip` naming the file, the line
and the reason; the other files are still read, and
:meth:`PersonaData.summary` lists what was skipped and why. Only when no file
is usable does :func:`load_persona` raise.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "REQUIRED_FIELDS",
    "Skip",
    "PersonaFile",
    "PersonaData",
    "default_data_dir",
    "data_dir_candidates",
    "data_dir_hint",
    "resolve_files",
    "read_persona_file",
    "load_persona",
    "read_label_confidence",
]

REQUIRED_FIELDS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
_ANSWERS = {"Yes": 1, "No": -1}
_DATA_ENV = "DPO_DYNAMICS_PERSONA"
_MAX_LISTED = 3  # bad lines quoted per skipped file


@dataclasses.dataclass(frozen=True)
class Skip:
    """One skipped file: ``file``, the first offending ``line`` (1-based; 0 = the
    whole file), the ``reason`` and how many lines were bad (``bad_lines``)."""

    file: str
    line: int
    reason: str
    bad_lines: int = 1

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        more = f" (and {self.bad_lines - 1} more bad lines)" if self.bad_lines > 1 else ""
        return f"{where}: {self.reason}{more}"


@dataclasses.dataclass(frozen=True)
class PersonaFile:
    """The usable content of one persona file.

    Attributes:
      name: behaviour name (the file stem). path: the file.
      sha256: hex digest of the file's bytes (the embedding cache key).
      questions: the ``question`` strings, in file order (after ``limit``).
      s: ``(n,)`` int8 labels, +1 when the matching answer is " Yes".
      line: ``(n,)`` int32 1-based line numbers of the kept statements.
      limit: the ``limit`` the file was read with (``None`` = all lines).
    """

    name: str
    path: Path
    sha256: str
    questions: tuple
    s: np.ndarray
    line: np.ndarray
    limit: int | None = None

    @property
    def n(self) -> int:
        return len(self.questions)


@dataclasses.dataclass(frozen=True)
class PersonaData:
    """Persona statements from several files.

    Attributes:
      files: the usable :class:`PersonaFile` s; behaviour ``k`` is ``files[k]``.
      skipped: one :class:`Skip` per file that could not be used.
    """

    files: tuple
    skipped: tuple

    @property
    def names(self) -> tuple:
        return tuple(f.name for f in self.files)

    @property
    def questions(self) -> list:
        """All questions, behaviour by behaviour, ``n`` strings."""
        return [q for f in self.files for q in f.questions]

    @property
    def s(self) -> np.ndarray:
        """``(n,)`` int8 labels ±1 (+1: chosen = " Yes")."""
        return np.concatenate([f.s for f in self.files]).astype(np.int8)

    @property
    def behavior(self) -> np.ndarray:
        """``(n,)`` int32 behaviour index into :attr:`names`."""
        return np.concatenate([np.full(f.n, k, np.int32) for k, f in enumerate(self.files)])

    @property
    def line(self) -> np.ndarray:
        """``(n,)`` int32 1-based line of each statement in its file."""
        return np.concatenate([f.line for f in self.files]).astype(np.int32)

    def summary(self) -> str:
        """Human-readable summary: how many files and statements were read, and
        each skipped file with the reason."""
        n = sum(f.n for f in self.files)
        head = f"read {len(self.files)} persona file(s), {n} statement(s)"
        if not self.skipped:
            return head + "; nothing skipped"
        lines = [head + f"; skipped {len(self.skipped)} file(s):"]
        lines += [f"  - {s}" for s in self.skipped]
        return "\n".join(lines)


def data_dir_candidates() -> list[tuple[str, Path]]:
    """The places :func:`default_data_dir` looks for the persona folder, in order: ``(label, path)``.

    1. ``$DPO_DYNAMICS_PERSONA`` when set (then the only candidate: an explicit choice);
    2. the source checkout of this package: ``<repo>/../shared/data/persona`` (an editable
       install, or running from the checkout);
    3. ``shared/data/persona`` in the current directory or any folder above it — so a
       non-editable ``pip install .`` run from inside the checkout (``<repo>/../shared``)
       still finds it.

    (The command-line flag, ``--data``, comes before all of these.)
    """
    env = os.environ.get(_DATA_ENV)
    if env:
        return [(f"${_DATA_ENV}", Path(env))]
    out = [("the source checkout", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "persona")]
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was removed
        return out
    for a in (cwd, *cwd.parents):
        cand = a / "shared" / "data" / "persona"
        if all(cand != p for _, p in out):
            out.append(("the current directory or above", cand))
    return out


def default_data_dir() -> Path:
    """Where the persona files are looked for when no path is given (no ``--data``).

    The first existing folder of :func:`data_dir_candidates` (``$DPO_DYNAMICS_PERSONA``,
    then the source checkout's ``../shared/data/persona``, then ``shared/data/persona`` in
    the current directory or above); when none exists, the first candidate (so the error
    names it; :func:`data_dir_hint` says where else was looked).
    """
    cands = data_dir_candidates()
    for _, path in cands:
        if path.is_dir():
            return path
    return cands[0][1]


def data_dir_hint(flag: str | None = "--data") -> str:
    """One line for errors: where the persona folder was looked for, and how to point at it
    (``flag``: the command's option for a data path, or None when it has none)."""
    cands = data_dir_candidates()
    alt = f" or pass {flag} DIR" if flag else ""
    if cands[0][0].startswith("$"):
        return f"${_DATA_ENV}={cands[0][1]} is not a folder of persona .jsonl files; fix it{alt}"
    return (f"no persona folder found (looked in {cands[0][1]} and shared/data/persona in the current directory "
            f"and above); set ${_DATA_ENV}=DIR{alt}")


def resolve_files(data: str | os.PathLike | Sequence[str | os.PathLike] | None,
                  behaviors: Iterable[str] | None = None) -> list[Path]:
    """The persona files to read.

    Args:
      data: a directory (every ``*.jsonl`` in it, sorted by name), one file, or
        a list of files/directories; ``None`` → :func:`default_data_dir`.
      behaviors: optional behaviour names (file stems) to keep, in that order.

    Returns:
      the ``.jsonl`` paths.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: no ``.jsonl`` file found, a behaviour name not among the
        files (with the closest names), or two files with the same behaviour name.
    """
    if data is None:
        entries = [default_data_dir()]
    elif isinstance(data, (str, os.PathLike)):
        entries = [Path(data)]
    else:
        entries = [Path(p) for p in data]
    files: list[Path] = []
    for p in entries:
        if p.is_dir():
            files += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            hint = f"; {data_dir_hint()}" if data is None else ""
            raise FileNotFoundError(f"persona data path {str(p)!r} does not exist{hint}")
    if not files:
        raise ValueError(f"no .jsonl files in {[str(p) for p in entries]}; pass a persona directory or .jsonl files")
    by_name: dict[str, Path] = {}
    for f in files:
        if f.stem in by_name and by_name[f.stem].resolve() != f.resolve():
            raise ValueError(f"two files for behaviour {f.stem!r}: {by_name[f.stem]} and {f}; pass only one")
        by_name.setdefault(f.stem, f)
    if behaviors is None:
        return list(by_name.values())
    out = []
    for b in behaviors:
        if b not in by_name:
            close = difflib.get_close_matches(b, list(by_name), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"behaviour {b!r} has no file among the {len(by_name)} persona files{hint}; "
                             "pass file stems, e.g. --behaviors agreeableness openness")
        if by_name[b] not in out:
            out.append(by_name[b])
    return out


def _answer(value):
    """'Yes' → +1, 'No' → −1 (leading/trailing whitespace ignored), else None."""
    if not isinstance(value, str):
        return None
    return _ANSWERS.get(value.strip())


def read_persona_file(path: str | os.PathLike, limit: int | None = None) -> PersonaFile | Skip:
    """Read and validate one persona ``.jsonl`` file.

    Every line must be a JSON object with non-empty string ``question`` and
    answers ``answer_matching_behavior`` / ``answer_not_matching_behavior``
    that are " Yes" and " No" in some order; blank lines are ignored. With
    ``limit``, only the first ``limit`` statements are kept (the files
    alternate Yes/No, so the first lines are balanced), and lines after them
    are not checked.

    Returns:
      a :class:`PersonaFile`, or a :class:`Skip` (file, first bad line,
      reason) when the file cannot be used: non-UTF-8 bytes, invalid JSON, a
      missing field, an answer other than Yes/No, no statements, or one class
      only. Never raises for bad content.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: ``limit`` < 1.
    """
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    raw = path.read_bytes()
    name = str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return Skip(name, line, f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                                "re-encode the file as UTF-8")
    questions, labels, lines = [], [], []
    bad: list[tuple[int, str]] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(questions) >= limit:
            break
        if not raw_line.strip():
            continue
        try:
            obj = json.loads(raw_line)
        except json.JSONDecodeError as e:
            bad.append((lineno, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            bad.append((lineno, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        missing = [f for f in REQUIRED_FIELDS if f not in obj]
        if missing:
            bad.append((lineno, f"missing field(s) {missing}; each line needs {list(REQUIRED_FIELDS)}"))
            continue
        q = obj["question"]
        if not isinstance(q, str) or not q.strip():
            bad.append((lineno, f"field 'question' must be a non-empty string, got {q!r}"))
            continue
        match, other = _answer(obj["answer_matching_behavior"]), _answer(obj["answer_not_matching_behavior"])
        if match is None or other is None:
            field = "answer_matching_behavior" if match is None else "answer_not_matching_behavior"
            bad.append((lineno, f"field {field!r} is {obj[field]!r}; expected ' Yes' or ' No'"))
            continue
        if match == other:
            bad.append((lineno, "answer_matching_behavior and answer_not_matching_behavior are both "
                                f"{obj['answer_matching_behavior']!r}; one must be ' Yes' and the other ' No'"))
            continue
        questions.append(q)
        labels.append(match)
        lines.append(lineno)
    if bad:
        first_line, reason = bad[0]
        return Skip(name, first_line, reason, bad_lines=len(bad))
    if not questions:
        return Skip(name, 0, "empty file: no statements")
    s = np.asarray(labels, np.int8)
    if np.all(s == s[0]):
        only = "Yes" if s[0] > 0 else "No"
        return Skip(name, 0, f"one class only: all {len(s)} statements have answer_matching_behavior ' {only}'; "
                             "the fit needs both Yes and No statements")
    return PersonaFile(name=path.stem, path=path, sha256=hashlib.sha256(raw).hexdigest(),
                       questions=tuple(questions), s=s, line=np.asarray(lines, np.int32),
                       limit=None if limit is None else int(limit))


def load_persona(data=None, behaviors: Iterable[str] | None = None, limit: int | None = None) -> PersonaData:
    """Read persona files, skipping (and recording) the unusable ones.

    Args:
      data, behaviors: as in :func:`resolve_files`.
      limit: keep at most this many statements per file (``None`` = all).

    Returns:
      :class:`PersonaData` with the usable files and a :class:`Skip` per
      skipped file (see :meth:`PersonaData.summary`).

    Raises:
      ValueError: no file is usable (the message lists each skip), or a bad
        ``data``/``behaviors``/``limit`` argument.
      FileNotFoundError: a path that does not exist.
    """
    files, skipped = [], []
    for path in resolve_files(data, behaviors):
        out = read_persona_file(path, limit)
        (skipped if isinstance(out, Skip) else files).append(out)
    if not files:
        raise ValueError("no usable persona file: " + "; ".join(str(s) for s in skipped))
    return PersonaData(files=tuple(files), skipped=tuple(skipped))


def read_label_confidence(path: str | os.PathLike, lines, sha256: str | None = None) -> np.ndarray:
    """The ``label_confidence`` field of given lines of a persona file, ``(len(lines),)`` float32.

    Used by ``dpo-sims real --soft-labels`` on an ``emb.npz`` that records each statement's
    file and line (persona embeddings) but no ``confidence`` array. ``label_confidence`` is
    the preference model's confidence that the statement's label is right (Perez et al.
    2022), in [1/2, 1] in the released files.

    Args:
      path: the persona ``.jsonl`` file. lines: 1-based line numbers (``emb.npz`` ``line``).
      sha256: the file's digest when it was embedded (``file_sha256``); checked when given.

    Returns:
      ``(len(lines),)`` float32; NaN where a line has no numeric ``label_confidence``.

    Raises:
      FileNotFoundError: the file is gone. ValueError: the file changed since it was
        embedded (digest), or a line number beyond the file's end.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"persona file {str(path)!r} (recorded in emb.npz) does not exist; it is needed for "
                                "its label_confidence — restore it or re-embed with a confidence column")
    raw = path.read_bytes()
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path} changed since it was embedded (SHA-256 differs); re-run dpo-sims embed")
    text = raw.decode("utf-8").splitlines()
    out = np.full(len(lines), np.nan, np.float32)
    for i, ln in enumerate(np.asarray(lines, int)):
        if not 1 <= ln <= len(text):
            raise ValueError(f"{path}: line {ln} is beyond the file's {len(text)} lines; re-run dpo-sims embed")
        v = json.loads(text[ln - 1]).get("label_confidence")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = v
    return out
