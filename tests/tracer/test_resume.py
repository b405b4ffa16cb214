"""The one rule for reading a resumable run's JSON lines back."""

import json

import pytest

from tracer.resume import append_jsonl, read_jsonl


def _write(path, rows, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)


def test_append_then_read_keys_rows_by_id(tmp_path):
    path = tmp_path / "run" / "records.jsonl"
    assert read_jsonl(path, key="case_id") == {}  # a missing file holds no rows
    append_jsonl(path, {"case_id": 3, "es": 1.0})
    append_jsonl(path, {"case_id": 1, "es": 0.0})
    assert read_jsonl(path, key="case_id") == {3: {"case_id": 3, "es": 1.0}, 1: {"case_id": 1, "es": 0.0}}
    assert list(read_jsonl(path, key=lambda r: str(r["case_id"]))) == ["3", "1"]


@pytest.mark.parametrize("torn", [b'{"case_id": 3, "es"', b'{"case_id": 3}', b'{"case_id": 3, "es": 1.0}\n\n{"ca'])
def test_a_torn_last_line_is_dropped_and_cut_only_with_repair(tmp_path, torn):
    path = tmp_path / "records.jsonl"
    _write(path, [{"case_id": 1}, {"case_id": 2}], torn)
    good = json.dumps({"case_id": 1}) + "\n" + json.dumps({"case_id": 2}) + "\n"
    want = [1, 2] + ([3] if torn.count(b"\n") else [])
    assert list(read_jsonl(path, key="case_id")) == want
    assert path.read_bytes().endswith(torn)  # reading alone never writes
    assert list(read_jsonl(path, key="case_id", repair=True)) == want
    assert path.read_text().startswith(good) and not path.read_bytes().endswith(torn[-3:])
    append_jsonl(path, {"case_id": 4})  # the next append starts on a fresh line
    assert list(read_jsonl(path, key="case_id"))[-1] == 4


def test_a_later_line_for_the_same_id_replaces_the_earlier_in_its_place(tmp_path):
    path = tmp_path / "records.jsonl"
    _write(path, [{"case_id": 1, "v": "old"}, {"case_id": 2, "v": "x"}, {"case_id": 1, "v": "new"}])
    rows = read_jsonl(path, key="case_id")
    assert list(rows) == [1, 2] and rows[1]["v"] == "new"


def test_a_corrupt_line_before_the_end_or_a_row_without_id_is_refused(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"case_id": 1}\nnot json\n{"case_id": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(path, key="case_id", repair=True)
    assert path.read_text().endswith('{"case_id": 2}\n')  # nothing cut
    path.write_text('{"case_id": 1}\n{"known_id": 2}\n')
    with pytest.raises(ValueError, match="line 2 has no id field 'case_id'"):
        read_jsonl(path, key="case_id")
