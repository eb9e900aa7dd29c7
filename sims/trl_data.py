"""Reading a user's preference data in TRL format for ``dpo-sims embed --format trl``.

TRL's ``DPOTrainer`` reads rows with string columns ``prompt``, ``chosen`` and
``rejected`` (the "standard, explicit prompt" preference format). This module
reads such rows from

- a ``.jsonl`` file (one JSON object per line; a ``.json`` file holding a JSON
  list of objects is read too),
- a ``.parquet`` file (``pyarrow``),
- a folder written by ``datasets.Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``; pick a split of
  a ``DatasetDict`` with ``split``),

and maps them onto the package's two-token model (docs/theory.md §1): the
answers over the whole file must be exactly two distinct single-token strings
``a`` and ``b`` (compared after stripping whitespace), each row's chosen and
rejected answers are those two in some order, and the label is ``s = +1`` when
the chosen answer is ``a``. ``a`` is "Yes" when the answers are Yes/No (as for
the persona data, so a persona file converted to TRL gives the same ``s``),
otherwise the alphabetically first. Answers of more than one token need a
multi-position model, which the package does not have: they are refused with
a one-line error.

An optional behaviour column (``behavior_column``) splits the rows into
behaviours (named by the column's values, in order of first appearance);
without it every row belongs to one behaviour named after the file. An
optional confidence column (the persona files' ``label_confidence``) is read
into ``confidence (n,)`` in ``emb.npz``; ``dpo-sims real --soft-labels`` trains on it
(per-pair soft labels, :class:`sims.real.RealConfig`).

The result is a :class:`sims.persona.PersonaData` (one
:class:`~sims.persona.PersonaFile` per behaviour, whose ``sha256`` hashes the
answers and the prompts, the embedding cache key), so the persona embedding
path (:func:`sims.embed.embed_persona`) embeds it unchanged.

``pyarrow`` and ``datasets`` are imported only for the formats that need them
(both are in the ``[embed]`` extra).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from .persona import PersonaData, PersonaFile

__all__ = ["TRL_COLUMNS", "TrlData", "read_trl_rows", "load_trl"]

TRL_COLUMNS = ("prompt", "chosen", "rejected")
_DEFAULT_CONFIDENCE = "label_confidence"


@dataclasses.dataclass(frozen=True)
class TrlData:
    """TRL preference rows mapped to the two-token model.

    Attributes:
      data: :class:`~sims.persona.PersonaData` (prompts as ``questions``, one
        file per behaviour, ``line`` = 1-based row number in the source).
      answers: ``(a, b)``, the two answers as written in the data (the first
        occurrence of each; ``s = +1`` means chosen = ``a``).
      confidence: ``(n,)`` float32 per row in ``data`` order (NaN where absent), or
        ``None`` without a confidence column.
      confidence_column: the column read for it ('' if none).
      source: the file or folder read.
    """

    data: PersonaData
    answers: tuple
    confidence: np.ndarray | None
    confidence_column: str
    source: Path


def _bad(source, msg):
    return ValueError(f"{source}: {msg}")


def read_trl_rows(path, split: str | None = None) -> tuple[list[dict], list[str]]:
    """Read the rows of a TRL-format file or ``save_to_disk`` folder.

    Args:
      path: ``.jsonl`` / ``.json`` / ``.parquet`` file, or a ``datasets`` folder.
      split: the split of a ``DatasetDict`` folder (default: ``train`` if present,
        else the only split).

    Returns:
      ``(rows, columns)``: a list of dicts and the column names.

    Raises:
      FileNotFoundError: no such path.
      ValueError: an unknown file type, unreadable content (invalid JSON on line
        k, a non-object row, a broken parquet file or folder), or a missing split.
      sims.embed.MissingExtraError: pyarrow / datasets not installed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TRL data {str(path)!r} does not exist; pass a .jsonl, .parquet or "
                                "datasets.save_to_disk folder with --data")
    if path.is_dir():
        return _read_dataset_folder(path, split)
    if split is not None:
        raise _bad(path, f"--split {split!r} applies only to a datasets.save_to_disk folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    raise _bad(path, f"unknown TRL file type {suffix or '(no suffix)'!r}; pass a .jsonl, .json, .parquet file "
                     "or a datasets.save_to_disk folder")


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, f"not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    stripped = text.lstrip()
    rows = []
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad(path, f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        where = lambda i: f"item {i}"  # noqa: E731
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _bad(path, f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        where = lambda i: f"row {i}"  # noqa: E731
    for i, r in enumerate(rows, start=1):
        if not isinstance(r, dict):
            raise _bad(path, f"{where(i)}: expected a JSON object with prompt, chosen, rejected; got "
                             f"{type(r).__name__}")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return rows, columns


def _missing_extra(pkg, err):
    from .embed import MissingExtraError, _INSTALL_HINT

    return MissingExtraError(f"reading this TRL data needs {pkg}: {_INSTALL_HINT}")


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise _missing_extra("pyarrow", e) from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a broken file
        raise _bad(path, f"not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return table.to_pylist(), list(table.column_names)


def _read_dataset_folder(path: Path, split):
    try:
        import datasets
    except ImportError as e:
        raise _missing_extra("the datasets package", e) from e
    if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()):
        raise _bad(path, "a folder that datasets.save_to_disk did not write (no dataset_info.json, state.json or "
                         "dataset_dict.json); pass a .jsonl/.parquet file or a save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise _bad(path, f"datasets.load_from_disk failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if "train" in ds:
                split = "train"
            elif len(splits) == 1:
                split = splits[0]
            else:
                raise _bad(path, f"a DatasetDict with splits {splits}; choose one with --split")
        if split not in ds:
            raise _bad(path, f"split {split!r} not in the DatasetDict's splits {splits}; pass --split with one")
        ds = ds[split]
    elif split is not None and split != "train":
        raise _bad(path, f"--split {split!r}: the folder holds one Dataset, not a DatasetDict; drop --split")
    return ds.to_list(), list(ds.column_names)


def _answer_key(value, field, row, source):
    if isinstance(value, list):
        raise _bad(source, f"row {row}: {field} is a list (TRL's conversational format); apply the chat template "
                           "first so prompt, chosen and rejected are strings")
    if not isinstance(value, str) or not value.strip():
        raise _bad(source, f"row {row}: {field} must be a non-empty string, got {value!r}")
    key = value.strip()
    if len(key.split()) > 1:
        raise _bad(source, f"row {row}: {field} {value[:60]!r} has {len(key.split())} words; only single-token "
                           "answers map to the two-token model (the multi-position model does not exist yet)")
    return key


def load_trl(path, *, behavior_column: str | None = None, confidence_column: str | None = None,
             behaviors=None, limit: int | None = None, split: str | None = None) -> TrlData:
    """Read TRL preference data and map it to the two-token model.

    Args:
      path: see :func:`read_trl_rows`.
      behavior_column: column naming each row's behaviour/category (``None``: one
        behaviour named after the file or folder).
      confidence_column: column of per-row label confidences in [0, 1]
        (``None``: ``label_confidence`` if present, else none; ``""``: none).
      behaviors: behaviour names to keep, in that order (``None``: all, in order
        of first appearance).
      limit: at most this many rows per behaviour, the first in file order (≥ 1).
      split: see :func:`read_trl_rows`.

    Returns:
      :class:`TrlData`.

    Raises:
      ValueError: a missing column (names the columns present), a non-string
        or empty prompt/answer, chosen equal to rejected, an answer of more than
        one word (no multi-position model), more or fewer than two distinct
        answers, a confidence outside [0, 1], a behaviour with one class only or
        an unknown ``behaviors`` name; every message names the row.
      FileNotFoundError: no such path.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    source = Path(path)
    rows, columns = read_trl_rows(source, split)
    if not rows:
        raise _bad(source, "no rows; a TRL preference file needs prompt, chosen, rejected rows")
    need = list(TRL_COLUMNS) + ([behavior_column] if behavior_column else [])
    conf_col = (_DEFAULT_CONFIDENCE if _DEFAULT_CONFIDENCE in columns else "") if confidence_column is None \
        else confidence_column
    if conf_col:
        need.append(conf_col)
    missing = [c for c in need if c not in columns]
    if missing:
        raise _bad(source, f"missing column(s) {missing}; the columns are {columns} (TRL format: prompt, chosen, "
                           "rejected; name the others with --behavior-column / --confidence-column)")
    first_raw: dict[str, str] = {}
    parsed = []
    for i, r in enumerate(rows, start=1):
        prompt = r.get("prompt")
        if isinstance(prompt, list):
            raise _bad(source, f"row {i}: prompt is a list (TRL's conversational format); apply the chat template "
                               "first so prompt, chosen and rejected are strings")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _bad(source, f"row {i}: prompt must be a non-empty string, got {prompt!r}")
        c = _answer_key(r.get("chosen"), "chosen", i, source)
        j = _answer_key(r.get("rejected"), "rejected", i, source)
        if c == j:
            raise _bad(source, f"row {i}: chosen and rejected are both {c!r}; a preference pair needs two answers")
        first_raw.setdefault(c, r["chosen"])
        first_raw.setdefault(j, r["rejected"])
        if len(first_raw) > 2:
            raise _bad(source, f"row {i}: a third distinct answer {sorted(first_raw)}; the two-token model needs "
                               "exactly two answers over the whole file (e.g. ' Yes' and ' No')")
        beh = r.get(behavior_column) if behavior_column else None
        if behavior_column and (beh is None or (isinstance(beh, str) and not beh.strip())):
            raise _bad(source, f"row {i}: {behavior_column} is empty; every row needs a behaviour")
        conf = np.nan
        if conf_col:
            v = r.get(conf_col)
            if v is not None:
                try:
                    conf = float(v)
                except (TypeError, ValueError):
                    raise _bad(source, f"row {i}: {conf_col} is {v!r}; expected a number in [0, 1]") from None
                if not 0.0 <= conf <= 1.0:
                    raise _bad(source, f"row {i}: {conf_col} = {conf}; expected a number in [0, 1]")
        parsed.append((i, prompt, c, "" if beh is None else str(beh), conf))
    keys = sorted(first_raw)
    if {k.lower() for k in keys} == {"yes", "no"}:
        keys = sorted(keys, key=lambda k: k.lower() != "yes")
    a = keys[0]
    answers = (first_raw[keys[0]], first_raw[keys[1]])
    default_name = source.stem if source.is_file() else source.name
    order: dict[str, list] = {}
    for row in parsed:
        order.setdefault(row[3] if behavior_column else default_name, []).append(row)
    if behaviors is not None:
        unknown = [b for b in behaviors if b not in order]
        if unknown:
            raise _bad(source, f"behaviour(s) {unknown} not in the data; the behaviours are {list(order)[:10]}"
                               + (" …" if len(order) > 10 else ""))
        order = {b: order[b] for b in dict.fromkeys(behaviors)}
    files, confs = [], []
    for name, rs in order.items():
        rs = rs[:limit] if limit is not None else rs
        s = np.array([1 if r[2] == a else -1 for r in rs], np.int8)
        if np.all(s == s[0]):
            raise _bad(source, f"behaviour {name!r}: all {len(s)} rows choose {rs[0][2]!r}; the Gaussian fit needs "
                               "rows of both classes (chosen = each of the two answers)")
        prompts = tuple(r[1] for r in rs)
        h = hashlib.sha256(json.dumps({"answers": answers, "prompts": prompts}).encode())
        files.append(PersonaFile(name=name, path=source, sha256=h.hexdigest(), questions=prompts, s=s,
                                 line=np.array([r[0] for r in rs], np.int32), limit=None))
        confs.append(np.array([r[4] for r in rs], np.float32))
    return TrlData(data=PersonaData(files=tuple(files), skipped=()), answers=answers,
                   confidence=np.concatenate(confs) if conf_col else None, confidence_column=conf_col,
                   source=source)
