"""sims.persona: reading and validating the persona .jsonl files, bad input per file."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from sims import cli, persona

Q = 'Is the following statement something you would say?\n"{}"'


def _line(i, match=" Yes", other=None, **extra):
    other = other if other is not None else (" No" if match == " Yes" else " Yes")
    obj = {"question": Q.format(f"statement {i}"), "statement": f"statement {i}",
           "answer_matching_behavior": match, "answer_not_matching_behavior": other, "label_confidence": 0.9}
    obj.update(extra)
    return json.dumps(obj)


def _good_lines(n):
    return [_line(i, " Yes" if i % 2 == 0 else " No") for i in range(n)]


def _write(path, lines, raw=None):
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_good_file_labels_lines_and_hash(tmp_path):
    lines = _good_lines(7)
    lines.insert(3, "   ")  # blank lines are ignored, line numbers still count them
    f = _write(tmp_path / "agreeableness.jsonl", lines)
    pf = persona.read_persona_file(f)
    assert isinstance(pf, persona.PersonaFile)
    assert pf.name == "agreeableness" and pf.n == 7
    # +1 when the matching answer is " Yes" (chosen = a = "Yes")
    np.testing.assert_array_equal(pf.s, [1, -1, 1, -1, 1, -1, 1])
    np.testing.assert_array_equal(pf.line, [1, 2, 3, 5, 6, 7, 8])
    assert pf.questions[3] == Q.format("statement 3")
    assert pf.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


def test_limit_keeps_first_statements_and_ignores_later_lines(tmp_path):
    lines = _good_lines(6) + ["{not json"]
    f = _write(tmp_path / "b.jsonl", lines)
    pf = persona.read_persona_file(f, limit=4)
    assert pf.n == 4 and pf.limit == 4
    np.testing.assert_array_equal(pf.s, [1, -1, 1, -1])
    assert isinstance(persona.read_persona_file(f), persona.Skip)  # without the limit the bad line counts
    with pytest.raises(ValueError, match="limit"):
        persona.read_persona_file(f, limit=0)


BAD_CASES = {
    # name: (lines or raw bytes, expected line, phrase in the reason)
    "missing": (_good_lines(2) + [json.dumps({"question": "q?", "answer_matching_behavior": " Yes"})],
                3, "missing field"),
    "maybe": ([_line(0), _line(1, " Maybe", " No")] + _good_lines(2), 2, "expected ' Yes' or ' No'"),
    "same": ([_line(0), _line(1, " No", " No")] + _good_lines(2), 2, "one must be ' Yes'"),
    "oneclass": ([_line(i, " Yes") for i in range(5)], 0, "one class only"),
    "empty": ([], 0, "empty file"),
    "badjson": (_good_lines(3) + ['{"question": "q", "answer_matching_behavior": " Yes",'] + _good_lines(2),
                4, "invalid JSON"),
    "notobject": (_good_lines(2) + ["[1, 2]"], 3, "expected a JSON object"),
    "emptyquestion": (_good_lines(2) + [_line(9, question="  ")], 3, "non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_file_is_skipped_with_file_and_line_while_others_load(tmp_path, case):
    lines, line_no, phrase = BAD_CASES[case]
    _write(tmp_path / "good.jsonl", _good_lines(6))
    bad = tmp_path / f"{case}.jsonl"
    if case == "empty":
        bad.write_bytes(b"")
    else:
        _write(bad, lines)
    data = persona.load_persona(tmp_path)
    assert data.names == ("good",)  # the other file is still processed
    assert len(data.questions) == 6
    (skip,) = data.skipped
    assert skip.file == str(bad) and skip.line == line_no
    assert phrase in skip.reason
    summary = data.summary()
    assert "skipped 1 file" in summary and str(bad) in summary and phrase in summary
    if line_no:
        assert f"{bad}:{line_no}:" in summary


def test_non_utf8_bytes_name_the_line(tmp_path):
    good = "\n".join(_good_lines(2)).encode() + b"\n"
    raw = good + b'{"question": "caf\xe9?", "answer_matching_behavior": " Yes", ' \
                 b'"answer_not_matching_behavior": " No"}\n'
    _write(tmp_path / "latin1.jsonl", None, raw=raw)
    _write(tmp_path / "ok.jsonl", _good_lines(4))
    data = persona.load_persona(tmp_path)
    (skip,) = data.skipped
    assert skip.line == 3 and "not UTF-8" in skip.reason and "0xe9" in skip.reason
    assert data.names == ("ok",)


def test_several_bad_lines_are_counted(tmp_path):
    f = _write(tmp_path / "x.jsonl", ["{", _line(0), "{", "["])
    skip = persona.read_persona_file(f)
    assert skip.line == 1 and skip.bad_lines == 3
    assert "and 2 more bad lines" in str(skip)


def test_no_usable_file_raises_with_every_reason(tmp_path):
    _write(tmp_path / "a.jsonl", ["{"])
    (tmp_path / "b.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable persona file") as e:
        persona.load_persona(tmp_path)
    assert "a.jsonl:1: invalid JSON" in str(e.value) and "b.jsonl: empty file" in str(e.value)


def test_behaviors_selection_order_and_unknown_name(tmp_path):
    for name in ("openness", "agreeableness", "narcissism"):
        _write(tmp_path / f"{name}.jsonl", _good_lines(4))
    files = persona.resolve_files(tmp_path, ["narcissism", "openness"])
    assert [f.stem for f in files] == ["narcissism", "openness"]
    assert [f.stem for f in persona.resolve_files(tmp_path)] == ["agreeableness", "narcissism", "openness"]
    with pytest.raises(ValueError, match="did you mean 'openness'"):
        persona.resolve_files(tmp_path, ["openess"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        persona.resolve_files(tmp_path / "nope")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .jsonl files"):
        persona.resolve_files(empty)


def test_persona_data_concatenates_behaviours(tmp_path):
    _write(tmp_path / "a.jsonl", _good_lines(4))
    _write(tmp_path / "b.jsonl", _good_lines(3))
    data = persona.load_persona([tmp_path / "b.jsonl", tmp_path / "a.jsonl"])
    assert data.names == ("b", "a")
    np.testing.assert_array_equal(data.behavior, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(data.s, [1, -1, 1, 1, -1, 1, -1])
    np.testing.assert_array_equal(data.line, [1, 2, 3, 1, 2, 3, 4])


def test_cli_exits_2_with_one_line_when_no_file_is_usable(tmp_path, capsys):
    _write(tmp_path / "a.jsonl", [_line(0, " Yes"), _line(1, " Yes")])
    rc = cli.main(["embed", "--data", str(tmp_path), "--out", str(tmp_path / "e.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "one class only" in err and "a.jsonl" in err


def test_real_persona_file_reads_clean():
    d = persona.default_data_dir()
    if not (d / "agreeableness.jsonl").exists():
        pytest.skip(f"persona data not at {d}")
    pf = persona.read_persona_file(d / "agreeableness.jsonl")
    assert isinstance(pf, persona.PersonaFile)
    assert pf.n == 1000 and int((pf.s > 0).sum()) == 500
    assert all(q.startswith("Is the following statement something you would say?") for q in pf.questions)
